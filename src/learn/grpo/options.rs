//! What a learning run is asked to do, checked against the bounds before anything runs.

use serde::{Deserialize, Serialize};

use super::super::verify::Scoring;
use crate::config::Bounds;
use crate::error::{Error, Result};

/// What a run does. Stored in the run directory, so a resumed run does exactly the same.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LearnOptions {
    pub library: String,
    /// The model that makes the attempts.
    pub model: String,
    /// The model that summarises, compares and edits the library (default: `model`).
    pub learner_model: Option<String>,
    pub epochs: u32,
    pub batch_size: usize,
    /// Attempts per task (G).
    pub group_size: u32,
    pub temperature: f32,
    /// Token limit of an attempt.
    pub max_tokens: u32,
    /// Token limit of a learner call.
    pub learner_max_tokens: u32,
    /// Model calls in flight at once.
    pub concurrency: usize,
    /// `numeric`, `exact`, `regex:PATTERN` or `judge`; default: what fits the data set.
    pub verifier: Option<String>,
    /// The judge's model (default: `learner_model`).
    pub judge_model: Option<String>,
    /// What the model is told besides the question (default: what fits the data set).
    pub instruction: Option<String>,
    /// Most lessons one group may yield.
    pub max_lessons: usize,
    /// Extra attempts at a learner call whose reply does not parse.
    pub retries: u32,
    /// Seed of the per-epoch task order.
    pub seed: u64,
    /// Tags put on every learned experience.
    pub tags: Vec<String>,
    /// Hold every step's changes for a person's review, whatever the library's `review`
    /// setting. Jobs started by feedback (`auto_learn`) always do: what users said must not
    /// change what other users are served without a recorded decision.
    pub review: bool,
}

impl Default for LearnOptions {
    fn default() -> Self {
        LearnOptions {
            library: String::new(),
            model: crate::backend::fetch::DEFAULT_MODEL_ID.into(),
            learner_model: None,
            epochs: 3,
            batch_size: 8,
            group_size: 5,
            temperature: 0.7,
            max_tokens: 512,
            learner_max_tokens: 384,
            concurrency: 4,
            verifier: None,
            judge_model: None,
            instruction: None,
            max_lessons: 2,
            retries: 2,
            seed: 42,
            tags: vec![],
            review: false,
        }
    }
}

impl LearnOptions {
    /// Checks what can be checked before any model runs, against the server's bounds: each of
    /// these counts sizes a loop or an allocation.
    pub fn check(&self, bounds: &Bounds) -> Result<()> {
        crate::experience::validate_library_name(&self.library)?;
        let within = |v: u64, lo: u64, hi: u64, p: &'static str| {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid(
                    format!("{p} must be from {lo} to {hi}, got {v}"),
                    p,
                ))
            }
        };
        within(self.epochs.into(), 1, bounds.max_epochs.into(), "epochs")?;
        within(
            self.batch_size as u64,
            1,
            bounds.max_batch_size as u64,
            "batch_size",
        )?;
        if self.group_size < 2 {
            return Err(Error::invalid(
                "group_size must be at least 2: a group of one has no winners and losers to compare",
                "group_size",
            ));
        }
        within(
            self.group_size.into(),
            2,
            bounds.max_group_size.into(),
            "group_size",
        )?;
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(Error::invalid(
                "temperature must be between 0 and 2",
                "temperature",
            ));
        }
        if self.max_tokens == 0 || self.learner_max_tokens == 0 {
            return Err(Error::invalid(
                "token limits must be at least 1",
                "max_tokens",
            ));
        }
        within(
            self.concurrency as u64,
            1,
            bounds.max_concurrency as u64,
            "concurrency",
        )?;
        within(self.retries.into(), 0, bounds.max_retries.into(), "retries")?;
        within(
            self.max_lessons as u64,
            1,
            bounds.max_lessons as u64,
            "max_lessons",
        )?;
        if let Some(v) = &self.verifier {
            Scoring::parse(v)?;
        }
        crate::experience::validate_tags(&self.tags)?;
        Ok(())
    }

    pub(super) fn learner(&self) -> &str {
        self.learner_model.as_deref().unwrap_or(&self.model)
    }
}
