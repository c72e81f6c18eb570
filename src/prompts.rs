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

/// The prompt templates: the built-in ones, overridden file by file from a directory.
pub struct Prompts {
    env: Environment<'static>,
}

impl Prompts {
    /// The built-in templates with `overrides`'s files in their place; every template is parsed
    /// now, so a broken one fails at start-up.
    pub fn load(overrides: Option<&Path>) -> anyhow::Result<Prompts> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_keep_trailing_newline(false);
        for (name, text) in DEFAULTS {
            let text = match overrides.map(|d| d.join(name)).filter(|p| p.is_file()) {
                Some(p) => std::fs::read_to_string(&p)
                    .map_err(|e| anyhow::anyhow!("reading prompt {}: {e}", p.display()))?,
                None => (*text).to_owned(),
            };
            env.add_template_owned(name.to_string(), text)
                .map_err(|e| anyhow::anyhow!("prompt template {name}: {e}"))?;
        }
        Ok(Prompts { env })
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
