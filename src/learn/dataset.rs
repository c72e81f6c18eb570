//! Task sets with known answers: GSM8K-style JSONL (`question`, `answer`), or BIG-Bench-Hard
//! JSON (`{"examples": [{"input", "target"}]}`).

use std::path::Path;

use anyhow::Context;

use super::verify::Verifier;

/// One task with a known answer.
#[derive(Debug, Clone)]
pub struct Task {
    pub question: String,
    /// The reference answer as the verifier reads it.
    pub answer: String,
    /// Where the task came from, when it is not a data set's: recorded traffic names the
    /// completion and the feedback (`chatcmpl-... fb_...`), and learned experiences cite it.
    pub origin: Option<String>,
}

/// A task set and how its answers are checked.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub tasks: Vec<Task>,
    /// The verifier that fits the answers: numeric for GSM8K, exact for BBH.
    pub verifier: Verifier,
    /// What the model is told besides the question.
    pub instruction: String,
}

impl Dataset {
    /// Reads a task file of at most `max_bytes`. Only regular files are read, and a larger
    /// one is refused by its size before a byte is read: a device such as `/dev/zero` once
    /// cost a read of the whole bound before it was refused. (The read is still bounded, in
    /// case the file grows meanwhile.)
    pub fn load(path: &Path, max_bytes: u64) -> anyhow::Result<Dataset> {
        use std::io::Read;
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        let meta = file
            .metadata()
            .with_context(|| format!("reading {}", path.display()))?;
        if !meta.is_file() {
            anyhow::bail!("{} is not a regular file", path.display());
        }
        if meta.len() > max_bytes {
            anyhow::bail!(
                "{} is larger than the {max_bytes} bytes a task file may have (bounds.max_dataset_bytes)",
                path.display()
            );
        }
        let mut bytes = Vec::new();
        file.take(max_bytes.saturating_add(1))
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() as u64 > max_bytes {
            anyhow::bail!(
                "{} is larger than the {max_bytes} bytes a task file may have (bounds.max_dataset_bytes)",
                path.display()
            );
        }
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if let Some(examples) = v.get("examples").and_then(|e| e.as_array()) {
                let tasks = examples
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        Ok(Task {
                            question: e["input"]
                                .as_str()
                                .with_context(|| {
                                    format!("{}: examples[{i}].input", path.display())
                                })?
                                .to_owned(),
                            answer: e["target"]
                                .as_str()
                                .with_context(|| {
                                    format!("{}: examples[{i}].target", path.display())
                                })?
                                .to_owned(),
                            origin: None,
                        })
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                return Ok(Dataset::from_tasks(&name, tasks));
            }
        }
        let tasks = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                let question = v["question"]
                    .as_str()
                    .with_context(|| format!("{} line {}: no 'question'", path.display(), i + 1))?;
                let answer = v["answer"]
                    .as_str()
                    .with_context(|| format!("{} line {}: no 'answer'", path.display(), i + 1))?;
                // GSM8K's answers are worked solutions ending in "#### N"; keep N.
                let answer = answer.rsplit("####").next().unwrap_or(answer).trim();
                Ok(Task {
                    question: question.to_owned(),
                    answer: answer.to_owned(),
                    origin: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Dataset {
            name,
            tasks,
            verifier: Verifier::Numeric,
            instruction:
                "Solve the problem step by step. End with 'The answer is N.' where N is a number."
                    .into(),
        })
    }
}

impl Dataset {
    /// A task set given inline: numeric answers are compared as numbers, anything else
    /// exactly.
    pub fn from_tasks(name: &str, tasks: Vec<Task>) -> Dataset {
        let numeric = tasks.iter().all(|t| t.answer.trim().parse::<f64>().is_ok());
        Dataset {
            name: name.to_owned(),
            verifier: if numeric {
                Verifier::Numeric
            } else {
                Verifier::Exact
            },
            instruction: if numeric {
                "Solve the task. End with 'The answer is N.'".into()
            } else {
                "Solve the task. Reply with the answer alone.".into()
            },
            tasks,
        }
    }

    /// Shuffles the tasks deterministically: the same seed gives the same order everywhere,
    /// so `--seed S --offset A --limit B` names the same split on every machine.
    pub fn shuffle(&mut self, seed: u64) {
        shuffle(&mut self.tasks, seed);
    }
}

/// splitmix64, then Fisher-Yates: portable, so a seed means the same order on every machine.
fn shuffle(tasks: &mut [Task], seed: u64) {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..tasks.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        tasks.swap(i, j);
    }
}

/// Which tasks of a data set a run uses. The CLI's `--seed/--offset/--limit/--validation` and
/// the learn API's `split_seed/offset/limit/validation_size` mean the same thing, so both go
/// through [`Dataset::split`] and name the same tasks for the same numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Split {
    /// Shuffle with this seed first ([`Dataset::shuffle`]).
    pub seed: Option<u64>,
    /// Tasks to skip, to keep one split disjoint from another.
    pub offset: usize,
    /// Tasks to use after the offset (all that remain when `None`).
    pub limit: Option<usize>,
    /// Tasks held out after the used ones (for validation).
    pub held_out: usize,
}

impl Dataset {
    /// The tasks `split` selects, and the held-out ones that follow them.
    pub fn split(&self, split: &Split) -> (Vec<Task>, Vec<Task>) {
        let mut tasks = self.tasks.clone();
        if let Some(seed) = split.seed {
            shuffle(&mut tasks, seed);
        }
        let mut rest = tasks.split_off(split.offset.min(tasks.len()));
        let n = split.limit.unwrap_or(rest.len()).min(rest.len());
        let mut held_out = rest.split_off(n);
        held_out.truncate(split.held_out);
        (rest, held_out)
    }

    /// The same data set with only the tasks `split` selects.
    pub fn select(mut self, split: &Split) -> Dataset {
        self.tasks = self.split(split).0;
        self
    }
}

/// The library's recorded completions that have feedback, as a data set to learn from; an
/// error naming `source` when there is none, since a run over no tasks would learn nothing.
pub fn learnable_traffic(
    traffic: &crate::experience::traffic::Traffic,
    library: &str,
) -> crate::Result<Dataset> {
    let scored = traffic.scored(library)?;
    if scored.is_empty() {
        return Err(crate::Error::invalid(
            format!("library '{library}' has no recorded completions with feedback to learn from"),
            "source",
        ));
    }
    Ok(from_traffic(library, &scored))
}

/// Tasks from recorded traffic and the feedback on it: the question is the conversation the
/// client sent, and the reference is what the person said is right: `expected` when given;
/// otherwise the served answer itself when it was marked good, or, when it was marked bad, a
/// description a judge can grade against. Each task's origin names the completion and the
/// feedback, so that what is learned from it cites them.
pub fn from_traffic(
    library: &str,
    scored: &[(
        crate::experience::traffic::Record,
        crate::experience::traffic::Feedback,
    )],
) -> Dataset {
    let tasks = scored
        .iter()
        .map(|(r, f)| {
            let answer = match (&f.expected, f.score >= 0.5) {
                (Some(e), _) => e.clone(),
                (None, true) => r.answer.clone(),
                // The comment is a user's free text: it reaches the learner quoted, as data,
                // so that it reads as what someone said, not as an instruction to follow.
                (None, false) => format!(
                    "Not known. A person marked this answer as wrong{}: {}",
                    f.comment
                        .as_deref()
                        .map(|c| format!(
                            " (their comment, quoted: {})",
                            serde_json::Value::from(c)
                        ))
                        .unwrap_or_default(),
                    r.answer
                ),
            };
            Task {
                question: conversation(&r.messages),
                answer,
                origin: Some(format!("{} {}", r.id, f.id)),
            }
        })
        .collect();
    let mut data = Dataset::from_tasks(&format!("traffic:{library}"), tasks);
    if !matches!(data.verifier, Verifier::Numeric) {
        data.instruction = "Answer the user's request.".into();
    }
    data
}

/// A recorded conversation as one question: a lone user message as it is, a longer one as a
/// transcript that ends with the last turn.
fn conversation(messages: &[serde_json::Value]) -> String {
    let text = |m: &serde_json::Value| m["content"].as_str().unwrap_or_default().to_owned();
    match messages {
        [one] => text(one),
        many => many
            .iter()
            .map(|m| format!("{}: {}", m["role"].as_str().unwrap_or("user"), text(m)))
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn numbered(n: usize) -> Dataset {
        let tasks = (0..n)
            .map(|i| Task {
                question: format!("q{i}"),
                answer: i.to_string(),
                origin: None,
            })
            .collect();
        Dataset::from_tasks("n", tasks)
    }

    fn questions(tasks: &[Task]) -> Vec<&str> {
        tasks.iter().map(|t| t.question.as_str()).collect()
    }

    #[test]
    fn a_split_skips_takes_and_holds_out_in_order() {
        let d = numbered(6);
        let split = Split {
            offset: 1,
            limit: Some(2),
            held_out: 2,
            ..Default::default()
        };
        let (used, held) = d.split(&split);
        assert_eq!(questions(&used), ["q1", "q2"]);
        assert_eq!(questions(&held), ["q3", "q4"]);
        // Past the end, everything is just empty.
        let far = Split {
            offset: 10,
            held_out: 3,
            ..Default::default()
        };
        let (used, held) = d.split(&far);
        assert!(used.is_empty() && held.is_empty());
        let all = d.split(&Split::default());
        assert_eq!(all.0.len(), 6);
        assert!(all.1.is_empty());
    }

    #[test]
    fn a_seeded_split_is_the_shuffled_order_and_disjoint() {
        let d = numbered(20);
        let mut shuffled = d.clone();
        shuffled.shuffle(7);
        assert_ne!(questions(&shuffled.tasks), questions(&d.tasks));
        let split = Split {
            seed: Some(7),
            offset: 3,
            limit: Some(5),
            held_out: 4,
        };
        let (used, held) = d.split(&split);
        assert_eq!(questions(&used), questions(&shuffled.tasks[3..8]));
        assert_eq!(questions(&held), questions(&shuffled.tasks[8..12]));
        assert_eq!(questions(&d.clone().select(&split).tasks), questions(&used));
    }
}
