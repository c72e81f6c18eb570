//! What a run writes down: every attempt, every group's comparison, each step's result.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::super::ops::{Proposal, Rejected};

/// One attempt at one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollout {
    pub task: usize,
    pub attempt: u32,
    pub output: String,
    pub reward: f64,
    /// The judge's reasoning, when a judge scored it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critique: Option<String>,
    /// Why the attempt has no output, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the learner made of one group. Written by the learner and read back by
/// `learn::evidence`, so a field renamed here is renamed for both.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupRecord {
    pub task: usize,
    pub question: String,
    pub answer: String,
    pub rewards: Vec<f64>,
    pub summaries: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advantage_reply: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lessons: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_reply: Option<String>,
    /// The comparison reply hit `learner_max_tokens`, so its unfinished last line was not read.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub advantage_cut: bool,
    /// The same for the operations reply: a cut operation never reaches the library.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub update_cut: bool,
    pub proposals: Vec<Proposal>,
    pub rejected: Vec<Rejected>,
    /// Why the group yielded nothing, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A step's consolidation: the proposals in, the merged operations out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Consolidation {
    pub proposals: Vec<Proposal>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// The reply hit `learner_max_tokens`, so its unfinished last line was not read.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub reply_cut: bool,
    pub rejected: Vec<Rejected>,
    /// Set when the model's merge could not be used and the rule-based merge was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// ADDs left out because they say nearly what an experience (or an earlier ADD) says.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub duplicates: Vec<Duplicate>,
    pub result: Vec<Proposal>,
}

/// An ADD merged into what it nearly repeats, by embedding similarity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Duplicate {
    pub text: String,
    /// The experience's id, or the earlier ADD's text.
    pub of: String,
    pub similarity: f32,
}

/// Accuracy on the held-out tasks, with its 95% interval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Validation {
    pub accuracy: f64,
    pub ci95: [f64; 2],
    pub tasks: usize,
}

/// The outcome of one finished step.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub step: u64,
    pub epoch: u32,
    pub tasks: Vec<usize>,
    pub rollouts: usize,
    pub failed_rollouts: usize,
    pub mean_reward: f64,
    pub mixed_groups: usize,
    pub skipped_groups: usize,
    /// The library version this step committed, if it changed anything.
    pub version: Option<u64>,
    pub added: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
    /// Proposals this step left for review, when the library reviews what learning does.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proposed: Vec<String>,
    pub library_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
    /// The gate's decision on this step's candidate, when the library is gated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<crate::learn::gate::Decision>,
    /// What the step cost: every model call it made (attempts, judge, learner, the gate's
    /// measurement and validation), and its wall time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<LearningCost>,
    /// How the learner's replies read this step, call by call.
    #[serde(default)]
    pub replies: LearnerReplies,
}

/// The learner's calls of one kind: how many were made, and how many replies could not be
/// read (each paid again as a retry while retries last).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyCount {
    pub calls: u64,
    pub unreadable: u64,
}

/// The learner's calls by kind, and whether they were decoded under their grammars.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct LearnerReplies {
    pub constrained: bool,
    pub summary: ReplyCount,
    pub comparison: ReplyCount,
    pub operations: ReplyCount,
    pub consolidation: ReplyCount,
}

/// Which of the learner's calls a reply answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Summary,
    Comparison,
    Operations,
    Consolidation,
}

impl LearnerReplies {
    /// Counts one reply to an `ask` call, readable or not.
    pub fn count(&mut self, ask: Ask, readable: bool) {
        let c = match ask {
            Ask::Summary => &mut self.summary,
            Ask::Comparison => &mut self.comparison,
            Ask::Operations => &mut self.operations,
            Ask::Consolidation => &mut self.consolidation,
        };
        c.calls += 1;
        c.unreadable += u64::from(!readable);
    }
}

/// What learning cost: attempts (rollouts), model calls, tokens, wall time, and money when a
/// priced upstream model was used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LearningCost {
    pub rollouts: u64,
    #[serde(flatten)]
    pub calls: crate::backend::Metered,
    pub wall_secs: f64,
}

impl LearningCost {
    /// Both together.
    pub fn plus(self, o: LearningCost) -> LearningCost {
        let price = match (self.calls.price, o.calls.price) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0.0) + b.unwrap_or(0.0)),
        };
        LearningCost {
            rollouts: self.rollouts + o.rollouts,
            calls: crate::backend::Metered {
                model_calls: self.calls.model_calls + o.calls.model_calls,
                prompt_tokens: self.calls.prompt_tokens + o.calls.prompt_tokens,
                completion_tokens: self.calls.completion_tokens + o.calls.completion_tokens,
                price,
            },
            wall_secs: self.wall_secs + o.wall_secs,
        }
    }
}

impl StepResult {
    /// A step that has done nothing yet, over these tasks, with the library at this size.
    pub fn empty(step: u64, epoch: u32, tasks: Vec<usize>, library_size: usize) -> Self {
        StepResult {
            step,
            epoch,
            tasks,
            rollouts: 0,
            failed_rollouts: 0,
            mean_reward: 0.0,
            mixed_groups: 0,
            skipped_groups: 0,
            version: None,
            added: vec![],
            updated: vec![],
            deleted: vec![],
            proposed: vec![],
            library_size,
            validation: None,
            gate: None,
            cost: None,
            replies: LearnerReplies::default(),
        }
    }
}

/// What a whole run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    pub run: String,
    pub dir: PathBuf,
    pub library: String,
    pub steps: Vec<StepResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_validation: Option<f64>,
    pub version: u64,
    pub experiences: usize,
    /// The steps' costs together.
    pub cost: LearningCost,
}
