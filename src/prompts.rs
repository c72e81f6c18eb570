//! Prompt templates (minijinja). The defaults live in `prompts/` and are compiled into the
//! binary; a deployment can override any of them with a file of the same name in its own
//! prompts directory. All templates are parsed at startup, so a broken override stops the
//! server before it serves anything.

use std::path::Path;

use minijinja::Environment;
use serde::Serialize;

use crate::error::{Error, Result};

macro_rules! template {
    ($name:literal) => {
        ($name, include_str!(concat!("../prompts/", $name)))
    };
}

/// (name, built-in text) of every template.
const DEFAULTS: &[(&str, &str)] = &[
    template!("experience_prior.j2"),
    template!("learner_system.j2"),
    template!("rollout_summary.j2"),
    template!("group_advantage.j2"),
    template!("group_update.j2"),
    template!("batch_consolidate.j2"),
    template!("judge.j2"),
    template!("iterresearch_round.j2"),
    template!("plan_rules.j2"),
    template!("plan_pseudocode.j2"),
    template!("plan_code.j2"),
    template!("plan_refine.j2"),
    template!("plan_direct.j2"),
];

/// The templates whose replies a method decodes under a grammar where the backend can
/// (`methods.constrain`), with the literal text that grammar makes every reply contain. A
/// prompt that never mentions it asks for some other form, and the model would be held to
/// one it was not asked for: the answers suffer, and nothing at run time says why.
const GRAMMAR_MARKERS: &[(&str, &[&str], &str)] = &[
    (
        "group_advantage.j2",
        &["<lessons>", "</lessons>"],
        "learn::ops::lessons_grammar",
    ),
    (
        "group_update.j2",
        &["ADD: "],
        "learn::ops::operations_grammar",
    ),
    (
        "batch_consolidate.j2",
        &["ADD: "],
        "learn::ops::operations_grammar",
    ),
    ("judge.j2", &["GRADE: "], "learn::verify::JUDGE_GRAMMAR"),
    (
        "iterresearch_round.j2",
        &["Report: ", "Action: ", "Final answer: "],
        "methods::iterresearch::round_grammar",
    ),
    (
        "plan_code.j2",
        &["```python"],
        "planning::ipp::program_grammar",
    ),
    (
        "plan_refine.j2",
        &["```python"],
        "planning::ipp::program_grammar",
    ),
    ("plan_direct.j2", &["["], "planning::ipp::actions_grammar"),
];

/// The prompt templates: the built-in ones, overridden file by file from a directory.
pub struct Prompts {
    env: Environment<'static>,
    /// The templates a directory replaced, with their text.
    overridden: Vec<(&'static str, String)>,
}

impl Prompts {
    /// The built-in templates with `overrides`'s files in their place; every template is parsed
    /// now, so a broken one fails at start-up.
    pub fn load(overrides: Option<&Path>) -> anyhow::Result<Prompts> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_keep_trailing_newline(false);
        let mut overridden = Vec::new();
        for (name, text) in DEFAULTS {
            let text = match overrides.map(|d| d.join(name)).filter(|p| p.is_file()) {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .map_err(|e| anyhow::anyhow!("reading prompt {}: {e}", p.display()))?;
                    overridden.push((*name, text.clone()));
                    text
                }
                None => (*text).to_owned(),
            };
            env.add_template_owned(name.to_string(), text)
                .map_err(|e| anyhow::anyhow!("prompt template {name}: {e}"))?;
        }
        Ok(Prompts { env, overridden })
    }

    /// What the overriding templates leave out of the forms their grammars hold replies to,
    /// one sentence each; empty when every override agrees with its grammar.
    pub fn grammar_conflicts(&self) -> Vec<String> {
        self.overridden
            .iter()
            .filter_map(|(name, text)| conflict(name, text))
            .collect()
    }

    /// Logs [`Self::grammar_conflicts`] at start-up, where replies are decoded under grammars,
    /// so that an override that asks for another form is found before it is served.
    pub fn report_grammar_conflicts(&self, constrain: bool) {
        if !constrain {
            return;
        }
        for c in self.grammar_conflicts() {
            tracing::warn!("{c} (set [methods] constrain = false to decode such replies freely)");
        }
    }

    /// The templates compiled into the binary, with no overrides.
    pub fn builtin() -> Prompts {
        Prompts::load(None).expect("built-in prompts are valid")
    }

    /// Renders template `name` with `ctx`, trimmed; a name with no template is an internal
    /// error, since every caller names a built-in one.
    pub fn render<S: Serialize>(&self, name: &str, ctx: S) -> Result<String> {
        self.env
            .get_template(name)
            .and_then(|t| t.render(ctx))
            .map(|s| s.trim().to_owned())
            .map_err(|e| Error::internal(format!("rendering prompt {name}: {e}")))
    }
}

/// Why template `name`'s text `text` contradicts the grammar its replies decode under, if it
/// does: it never mentions text that grammar puts in every reply.
fn conflict(name: &str, text: &str) -> Option<String> {
    let (_, markers, grammar) = GRAMMAR_MARKERS.iter().find(|(n, ..)| *n == name)?;
    let missing: Vec<String> = markers
        .iter()
        .filter(|m| !text.contains(**m))
        .map(|m| format!("{:?}", m.trim_end()))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "prompt {name} is overridden but never mentions {}, which its replies must contain \
             ({grammar})",
            missing.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_prompts_ask_for_what_their_grammars_hold_replies_to() {
        for (name, text) in DEFAULTS {
            assert_eq!(conflict(name, text), None, "{name}");
        }
    }

    #[test]
    fn an_override_that_asks_for_another_form_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("judge.j2"), "Answer yes or no.").unwrap();
        std::fs::write(dir.path().join("plan_rules.j2"), "Any rules at all.").unwrap();
        std::fs::write(
            dir.path().join("group_update.j2"),
            "Reply with lines like ADD: Name: advice.",
        )
        .unwrap();
        let conflicts = Prompts::load(Some(dir.path())).unwrap().grammar_conflicts();
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(
            conflicts[0].starts_with("prompt judge.j2 is overridden but never mentions \"GRADE:\""),
            "{}",
            conflicts[0]
        );
        assert!(Prompts::builtin().grammar_conflicts().is_empty());
    }
}
