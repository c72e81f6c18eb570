//! Verifiers: does a model's answer match the known one?
//!
//! Numeric answers are read the way people write them: GSM8K's `#### N`, LaTeX `\boxed{N}`,
//! "the answer is N", thousands separators, currency signs, units and percent signs; failing
//! all of those, the last number in the text.

use std::sync::LazyLock;

use regex::Regex;

use crate::backend::{Backend, ChatRequest, Message, OutputFormat, Role, Sampling};
use crate::error::{Error, Result};
use crate::prompts::Prompts;

/// How a rollout's answer is compared with the reference.
#[derive(Debug, Clone)]
pub enum Verifier {
    /// Both sides read as numbers, equal within a relative 1e-6.
    Numeric,
    /// Equal after trimming and case folding.
    Exact,
    /// The answer matches the pattern; `{answer}` in it stands for the escaped reference.
    Regex(String),
}

impl Verifier {
    /// Its name as `--verifier` and the APIs' `verifier` write it.
    pub fn name(&self) -> String {
        match self {
            Verifier::Numeric => "numeric".into(),
            Verifier::Exact => "exact".into(),
            Verifier::Regex(p) => format!("regex:{p}"),
        }
    }
}

/// How attempts are scored: by a rule against the reference, or by an LLM judge.
#[derive(Debug, Clone)]
pub enum Scoring {
    Rule(Verifier),
    Judge,
}

impl Scoring {
    /// Reads a verifier's name as `learn --verifier`, `eval --verifier` and the learn API's
    /// `verifier` write it: numeric, exact, regex:PATTERN or judge.
    pub fn parse(s: &str) -> Result<Scoring> {
        Ok(match s {
            "numeric" => Scoring::Rule(Verifier::Numeric),
            "exact" => Scoring::Rule(Verifier::Exact),
            "judge" => Scoring::Judge,
            r if r.starts_with("regex:") => {
                let p = &r["regex:".len()..];
                Regex::new(&p.replace("{answer}", "x")).map_err(|e| {
                    Error::invalid(format!("the verifier's regex is invalid: {e}"), "verifier")
                })?;
                Scoring::Rule(Verifier::Regex(p.to_owned()))
            }
            other => {
                return Err(Error::invalid(
                    format!(
                        "unknown verifier '{other}': use numeric, exact, regex:PATTERN or judge"
                    ),
                    "verifier",
                ))
            }
        })
    }
}

impl Verifier {
    /// 1.0 for a correct answer, 0.0 otherwise.
    pub fn score(&self, output: &str, reference: &str) -> f64 {
        let ok = match self {
            Verifier::Numeric => match (extract_number(output), extract_number(reference)) {
                (Some(a), Some(b)) => numbers_equal(a, b),
                _ => false,
            },
            Verifier::Exact => normalise(output) == normalise(reference),
            Verifier::Regex(p) => {
                let p = p.replace("{answer}", &regex::escape(reference.trim()));
                Regex::new(&p).is_ok_and(|r| r.is_match(output))
            }
        };
        if ok {
            1.0
        } else {
            0.0
        }
    }
}

/// An LLM judge: another model (or the same one) reads the question, the reference and the
/// answer and says CORRECT or INCORRECT. For answers no rule can compare (free text, web
/// research), at the price of one model call per rollout.
pub struct Judge {
    pub backend: std::sync::Arc<dyn Backend>,
    pub prompts: std::sync::Arc<Prompts>,
    /// Extra attempts when the judge's reply carries no grade.
    pub retries: u32,
    pub max_tokens: u32,
    /// Decode the reply under [`JUDGE_GRAMMAR`] when the backend can (`methods.constrain`).
    pub constrain: bool,
}

/// The judge's reply as a grammar: one line of reasoning, then the grade line. A small judge
/// left to itself wanders past its token budget before grading, and an ungraded answer
/// scores 0 whatever it was; held to this, every reply carries a grade.
pub const JUDGE_GRAMMAR: &str = "start: REASON \"\\n\" \"GRADE: \" grade END?\n\
grade: \"CORRECT\" | \"INCORRECT\"\n\
REASON: /[^\\n]{1,400}/\n\
END: /\\n[\\n ]{0,8}/\n";

static GRADE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)grade\s*:\s*\**\s*(correct|incorrect)").unwrap());

/// The judge's grade: the last `GRADE: CORRECT|INCORRECT` in the reply.
pub fn parse_grade(reply: &str) -> Option<bool> {
    GRADE
        .captures_iter(&reply.replace("**", ""))
        .last()
        .map(|c| c[1].eq_ignore_ascii_case("correct"))
}

impl Judge {
    /// The reward (1.0 or 0.0) and the judge's reasoning. A judge that never gives a grade
    /// scores the answer 0 and says so in the reasoning, so that the run goes on.
    pub async fn grade(
        &self,
        question: &str,
        answer: &str,
        reference: &str,
    ) -> Result<(f64, String)> {
        let prompt = self.prompts.render(
            "judge.j2",
            minijinja::context! { question, answer, reference },
        )?;
        let format = if self.constrain && self.backend.constrains() {
            OutputFormat::Grammar(JUDGE_GRAMMAR.to_owned())
        } else {
            OutputFormat::Text
        };
        let mut last = String::new();
        for _ in 0..=self.retries {
            let out = self
                .backend
                .complete(ChatRequest {
                    priority: crate::backend::Priority::Background,
                    messages: vec![Message::new(Role::User, prompt.clone())],
                    sampling: Sampling {
                        max_tokens: Some(self.max_tokens),
                        temperature: Some(0.0),
                        n: 1,
                        format: format.clone(),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await?;
            last = out
                .choices
                .into_iter()
                .next()
                .map(|c| c.text)
                .unwrap_or_default();
            if let Some(ok) = parse_grade(&last) {
                return Ok((if ok { 1.0 } else { 0.0 }, last));
            }
        }
        Ok((0.0, format!("[the judge gave no grade] {last}")))
    }
}

fn normalise(s: &str) -> String {
    s.trim().trim_end_matches('.').to_lowercase()
}

/// Equal up to a relative 1e-6, so "0.1+0.2" and 0.3 agree and large answers are not held to
/// absolute precision.
pub fn numbers_equal(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * b.abs().max(1.0)
}

/// A number as written: optional sign and currency, digits with optional thousands commas,
/// optional decimals, or a simple fraction.
const NUMBER: &str = r"-?\s?[$€£]?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?";

static HASHES: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(&format!(r"####\s*({NUMBER})")).unwrap());
static BOXED: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"\\boxed\{([^{}]*)\}").unwrap());
static ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(&format!(
        r"(?i)answer\s*(?:is|:|=)\s*(?:\*\*)?\s*({NUMBER})"
    ))
    .unwrap()
});
static ANY: LazyLock<Regex> = LazyLock::new(|| Regex::new(NUMBER).unwrap());

/// The answer's number, by the first rule that finds one (the last match of that rule).
pub fn extract_number(text: &str) -> Option<f64> {
    for rule in [&*HASHES, &*ANSWER_IS] {
        if let Some(n) = rule
            .captures_iter(text)
            .filter_map(|c| parse_number(&c[1]))
            .last()
        {
            return Some(n);
        }
    }
    if let Some(n) = BOXED
        .captures_iter(text)
        .filter_map(|c| {
            ANY.find_iter(&c[1])
                .last()
                .and_then(|m| parse_number(m.as_str()))
        })
        .last()
    {
        return Some(n);
    }
    ANY.find_iter(text)
        .filter_map(|m| parse_number(m.as_str()))
        .last()
}

fn parse_number(s: &str) -> Option<f64> {
    let cleaned: String = s
        .chars()
        .filter(|c| !matches!(c, '$' | '€' | '£' | ',' | ' '))
        .collect();
    if let Some((n, d)) = cleaned.split_once('/') {
        let (n, d): (f64, f64) = (n.parse().ok()?, d.parse().ok()?);
        return (d != 0.0).then(|| n / d);
    }
    // "-$5" and "$-5" both mean minus five.
    let neg = cleaned.matches('-').count() % 2 == 1;
    let v: f64 = cleaned.replace('-', "").parse().ok()?;
    Some(if neg { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::scripted::{Script, Scripted};
    use std::sync::Arc;

    /// On a backend that decodes under grammars the judge's reply is held to its grade line;
    /// on one that cannot, it is free text, read as before.
    #[tokio::test]
    async fn the_judge_is_held_to_its_grade_line_where_the_backend_can() {
        for constraining in [true, false] {
            let reply = |_: &ChatRequest| Script::words("Both reach 72.\nGRADE: CORRECT");
            let backend = if constraining {
                Scripted::constraining(reply)
            } else {
                Scripted::new(reply)
            };
            let judge = Judge {
                backend: backend.clone(),
                prompts: Arc::new(Prompts::builtin()),
                retries: 0,
                max_tokens: 64,
                constrain: true,
            };
            let (reward, why) = judge.grade("q", "72", "72").await.unwrap();
            assert_eq!(
                (reward, why.as_str()),
                (1.0, "Both reach 72.\nGRADE: CORRECT")
            );
            let format = &backend.received()[0].sampling.format;
            match format {
                OutputFormat::Grammar(g) => assert!(constraining && g.contains("GRADE: ")),
                other => assert!(!constraining && *other == OutputFormat::Text, "{other:?}"),
            }
        }
    }

    #[test]
    fn reads_answers_as_people_write_them() {
        let cases = [
            ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72.0),
            ("So the total is \\boxed{1,250}.", 1250.0),
            ("Therefore, the answer is $18.", 18.0),
            ("The answer is: **-3**", -3.0),
            ("She pays $1,234.50 in total", 1234.5),
            ("He walks 3 miles a day, so 21 miles a week.", 21.0),
            ("The final answer is 3/4", 0.75),
            ("about 40%", 40.0),
            ("Answer = 7 apples, not 9", 7.0),
        ];
        for (text, want) in cases {
            assert_eq!(extract_number(text), Some(want), "{text}");
        }
        assert_eq!(extract_number("no digits here"), None);
    }

    #[test]
    fn reads_judge_grades() {
        assert_eq!(parse_grade("Same number.\nGRADE: CORRECT"), Some(true));
        assert_eq!(parse_grade("**GRADE:** INCORRECT"), Some(false));
        assert_eq!(
            parse_grade("grade: correct? no.\nGRADE: INCORRECT"),
            Some(false)
        );
        assert_eq!(parse_grade("I think it is right."), None);
    }

    #[test]
    fn scores_numeric_exact_and_regex() {
        assert_eq!(
            Verifier::Numeric.score("so it costs $1,000.", "#### 1000"),
            1.0
        );
        assert_eq!(
            Verifier::Numeric.score("the answer is 999", "#### 1000"),
            0.0
        );
        assert_eq!(Verifier::Exact.score(" True. ", "true"), 1.0);
        assert_eq!(Verifier::Exact.score("False", "True"), 0.0);
        let r = Verifier::Regex(r"(?i)\b{answer}\b".into());
        assert_eq!(r.score("I think the answer is yes.", "Yes"), 1.0);
        assert_eq!(r.score("yesterday", "Yes"), 0.0);
    }

    /// Every GSM8K reference solution scores as correct against its own final answer, and the
    /// worked solution (the text before `####`) mostly ends on that number too.
    #[test]
    fn agrees_with_real_gsm8k_answers() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/gsm8k_train_head500.jsonl"
        );
        let Ok(text) = std::fs::read_to_string(path) else {
            panic!("GSM8K data not found at {path}");
        };
        let mut worked_ok = 0;
        let rows: Vec<serde_json::Value> = text
            .lines()
            .take(500)
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for row in &rows {
            let answer = row["answer"].as_str().unwrap();
            let gold = answer.rsplit("####").next().unwrap().trim();
            assert_eq!(Verifier::Numeric.score(answer, gold), 1.0, "{answer}");
            let worked = answer.split("####").next().unwrap();
            worked_ok += Verifier::Numeric.score(worked, gold) as usize;
        }
        // The worked solutions end on the answer in the great majority of cases; the rest end
        // on a unit conversion or a restatement. This guards the last-number fallback.
        assert!(
            worked_ok * 100 / rows.len() >= 85,
            "{worked_ok}/{}",
            rows.len()
        );
    }
}
