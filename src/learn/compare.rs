//! Two contents of one library compared on the same tasks: a version against its parent, a
//! learning step's candidate against the live library, or any version against none.
//!
//! Each side is served exactly as clients would be served it (the library's own `inject` and
//! `top_k`, the prior template, the direct method) from a scratch store that holds just that
//! side's experiences, so what is measured is what the side would serve, whatever is live.
//! The scratch store is a temporary directory, removed when the comparison ends.

use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::eval::{self, Cost, EvalOptions, Grader, OnTick};
use super::stats::{self, Paired};
use crate::error::{Error, Result};
use crate::experience::{Change, Experience, Settings, Store, StoreOptions};
use crate::methods::Context;
use crate::router::Route;

/// One side of a comparison.
#[derive(Debug, Clone)]
pub struct Side {
    /// What the report calls it: `"none"`, `"version 3"`, `"candidate"`.
    pub label: String,
    /// Its experiences; `None` is no library at all.
    pub experiences: Option<Vec<Experience>>,
}

impl Side {
    /// No library.
    pub fn none() -> Side {
        Side {
            label: "none".into(),
            experiences: None,
        }
    }

    /// A library's content at `version`.
    pub fn version(lib: &crate::experience::Library, version: u64) -> Result<Side> {
        Ok(Side {
            label: format!("version {version}"),
            experiences: Some(lib.state_at(version)?),
        })
    }
}

/// One task on which the sides scored differently.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disagreement {
    pub task: usize,
    pub question: String,
    pub baseline: f64,
    pub candidate: f64,
}

/// What a comparison found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    pub dataset: String,
    pub model: String,
    pub samples: u32,
    /// What the sides are (`"none"`, `"version 3"`, `"candidate"`); their figures are
    /// `baseline` and `candidate`.
    pub baseline_label: String,
    pub candidate_label: String,
    #[serde(flatten)]
    pub paired: Paired,
    /// The tasks on which they disagree (at most [`MAX_SHOWN`], the first ones).
    pub disagreements: Vec<Disagreement>,
    pub cost: Cost,
}

/// The most disagreeing tasks a report lists (all are counted in `disagree`).
pub const MAX_SHOWN: usize = 50;

/// Longest question text a report repeats, in characters.
const QUESTION_CHARS: usize = 300;

/// How the sides are answered and scored.
pub struct Plan<'a> {
    /// The route the tasks go through (the direct method on the model); its library is set
    /// per side.
    pub route: &'a Route,
    /// The library's settings (inject, top_k), so each side is served as the library is.
    pub settings: Settings,
    pub options: EvalOptions,
    pub grader: Grader<'a>,
    pub confidence: f64,
}

/// Answers every task of `ds` with `baseline`'s content and with `candidate`'s and compares
/// them task by task.
pub async fn compare(
    ctx: &Context,
    plan: &Plan<'_>,
    baseline: &Side,
    candidate: &Side,
    ds: &Dataset,
    on_tick: OnTick<'_>,
) -> Result<Comparison> {
    let scratch = tempfile::Builder::new()
        .prefix("experient-compare-")
        .tempdir()
        .map_err(|e| Error::internal(format!("a scratch directory for the comparison: {e}")))?;
    let store = std::sync::Arc::new(Store::open(scratch.path(), StoreOptions::default())?);
    let mut scores = Vec::new();
    let mut cost = Cost::default();
    for (name, side) in [("baseline", baseline), ("candidate", candidate)] {
        let library = match &side.experiences {
            None => None,
            Some(experiences) => {
                let lib = store.create(name)?;
                lib.set_settings(plan.settings.clone())?;
                let restore = experiences.iter().cloned().map(Change::Restore).collect();
                store.commit(name, "the side's content", restore)?;
                Some(name.to_owned())
            }
        };
        let route = Route {
            library,
            ..plan.route.clone()
        };
        let side_ctx = Context {
            store: store.clone(),
            ..ctx.clone()
        };
        on_tick(eval::Tick::Arm {
            label: &side.label,
            answers: ds.tasks.len() as u64 * u64::from(plan.options.samples),
        });
        let done = eval::task_scores(&side_ctx, &route, ds, &plan.options, plan.grader, on_tick)
            .await
            .map_err(|e| Error::internal(format!("comparing {}: {e:#}", side.label)))?;
        on_tick(eval::Tick::ArmDone);
        cost = cost.plus(done.cost);
        scores.push(done.scores);
    }
    let paired = stats::paired(&scores[0], &scores[1], plan.confidence);
    let disagreements = paired
        .disagree
        .iter()
        .take(MAX_SHOWN)
        .map(|&t| Disagreement {
            task: t,
            question: ds.tasks[t].question.chars().take(QUESTION_CHARS).collect(),
            baseline: scores[0][t],
            candidate: scores[1][t],
        })
        .collect();
    Ok(Comparison {
        dataset: ds.name.clone(),
        model: plan.route.model.clone(),
        samples: plan.options.samples,
        baseline_label: baseline.label.clone(),
        candidate_label: candidate.label.clone(),
        paired,
        disagreements,
        cost,
    })
}

/// The experiences `changes` would leave on top of `parent`, as a side called `label`.
pub fn with_changes(parent: &[Experience], changes: &[Change], label: &str) -> Result<Side> {
    let scratch = tempfile::Builder::new()
        .prefix("experient-candidate-")
        .tempdir()
        .map_err(|e| Error::internal(format!("a scratch directory for the candidate: {e}")))?;
    let store = Store::open(scratch.path(), StoreOptions::default())?;
    let lib = store.create("candidate")?;
    lib.commit(
        "parent",
        parent.iter().cloned().map(Change::Restore).collect(),
    )?;
    lib.commit("candidate", changes.to_vec())?;
    Ok(Side {
        label: label.to_owned(),
        experiences: Some(lib.all()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experience::{Provenance, Source};

    #[test]
    fn a_candidate_is_its_parent_with_the_changes_applied() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.create("l").unwrap();
        store.add("l", "First: one.", vec![]).unwrap();
        store.add("l", "Second: two.", vec![]).unwrap();
        let parent = store.library("l").unwrap().all();
        let changes = vec![
            Change::Delete { id: "E1".into() },
            Change::Add {
                text: "Third: three.".into(),
                tags: vec![],
                source: Source::Learned,
                provenance: Provenance::default(),
            },
        ];
        let side = with_changes(&parent, &changes, "candidate").unwrap();
        let texts: Vec<String> = side
            .experiences
            .unwrap()
            .into_iter()
            .map(|e| format!("{} {}", e.id, e.text))
            .collect();
        assert_eq!(texts, ["E2 Second: two.", "E3 Third: three."]);
        // The live library is untouched.
        assert_eq!(store.library("l").unwrap().len(), 2);
    }
}
