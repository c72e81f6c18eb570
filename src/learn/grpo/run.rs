//! The run directory: the options, the task splits and each step's records, written before a
//! step counts as done, so that a crashed run resumes where it stopped.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::dataset::{Dataset, Task};
use super::super::verify::Verifier;
use super::records::{StepResult, Validation};
use super::LearnOptions;
use crate::config::Bounds;
use crate::error::{Error, Result};

/// A run on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub created: chrono::DateTime<chrono::Utc>,
    pub dataset: String,
    pub instruction: String,
    /// The verifier the data set calls for, when the options name none.
    pub default_verifier: String,
    pub tasks: usize,
    pub validation: usize,
    pub steps: u64,
    pub options: LearnOptions,
    /// How the tasks the gate measures on were chosen, when the run held some out itself
    /// because none were given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_split: Option<String>,
}

/// Every how many tasks one is held out for the gate when a run is given no validation tasks.
const GATE_EVERY: usize = 5;

/// `train` and `validation`, with a share of `train` held out as the gate's tasks when
/// `gated` and none were given: every fifth task (of at least ten), never learned from. Returns
/// what was done, for the run's record.
fn gate_split(
    gated: bool,
    train: Vec<Task>,
    validation: Vec<Task>,
) -> (Vec<Task>, Vec<Task>, Option<String>) {
    if !gated || !validation.is_empty() {
        return (train, validation, None);
    }
    let n = train.len();
    if n < 2 * GATE_EVERY {
        let note = format!(
            "no validation tasks were given and {n} tasks are too few to hold some out: \
             the gate cannot measure this run, so what it learns is held"
        );
        return (train, validation, Some(note));
    }
    let (mut kept, mut held) = (Vec::new(), Vec::new());
    for (i, t) in train.into_iter().enumerate() {
        if i % GATE_EVERY == GATE_EVERY - 1 {
            held.push(t);
        } else {
            kept.push(t);
        }
    }
    let note = format!(
        "no validation tasks were given: every {GATE_EVERY}th of the {n} tasks ({} of them) was \
         held out for the gate and not learned from",
        held.len()
    );
    (kept, held, Some(note))
}

/// An open run directory: its info and its task splits.
pub struct Run {
    pub info: RunInfo,
    pub dir: PathBuf,
    pub(super) tasks: Vec<Task>,
    pub(super) validation: Vec<Task>,
}

pub(super) fn io(context: &str, e: impl std::fmt::Display) -> Error {
    Error::internal(format!("{context}: {e}"))
}

pub(super) fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).map_err(Error::internal)?;
    crate::experience::write_atomic(path, &bytes)
}

pub(super) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| io(&path.display().to_string(), e))?;
    serde_json::from_str(&text).map_err(|e| io(&path.display().to_string(), e))
}

pub(super) fn write_tasks(path: &Path, tasks: &[Task]) -> Result<()> {
    let mut text = String::new();
    for t in tasks {
        text.push_str(
            &serde_json::to_string(
                &serde_json::json!({"question": t.question, "answer": t.answer, "origin": t.origin}),
            )
            .map_err(Error::internal)?,
        );
        text.push('\n');
    }
    crate::experience::write_atomic(path, text.as_bytes())
}

pub(super) fn read_tasks(path: &Path) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).map_err(|e| io(&path.display().to_string(), e))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).map_err(|e| io(&path.display().to_string(), e))?;
            Ok(Task {
                question: v["question"].as_str().unwrap_or_default().to_owned(),
                answer: v["answer"].as_str().unwrap_or_default().to_owned(),
                origin: v["origin"].as_str().map(str::to_owned),
            })
        })
        .collect()
}

impl Run {
    /// Starts a new run directory under `runs_dir` for `train` (and `validation`, evaluated
    /// after every step when not empty, and what the gate measures candidates on). A `gated`
    /// run (its library's `promote` is not `always`) given no validation tasks holds some of
    /// `train` out for the gate.
    pub fn create(
        runs_dir: &Path,
        options: LearnOptions,
        data: &Dataset,
        (train, validation): (Vec<Task>, Vec<Task>),
        gated: bool,
        bounds: &Bounds,
    ) -> Result<Run> {
        options.check(bounds)?;
        let (train, validation, gate_split) = gate_split(gated, train, validation);
        if train.is_empty() {
            return Err(Error::invalid("there are no tasks to learn from", "tasks"));
        }
        if train.len() > bounds.max_tasks || validation.len() > bounds.max_tasks {
            return Err(Error::invalid(
                format!(
                    "a run may have at most {} tasks and as many validation tasks",
                    bounds.max_tasks
                ),
                "tasks",
            ));
        }
        let id = format!(
            "{}-{}-{}",
            options.library,
            chrono::Utc::now().format("%Y%m%dT%H%M%S"),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let dir = runs_dir.join(&id);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir.display().to_string(), e))?;
        let per_epoch = train.len().div_ceil(options.batch_size) as u64;
        let info = RunInfo {
            id,
            created: chrono::Utc::now(),
            dataset: data.name.clone(),
            instruction: options
                .instruction
                .clone()
                .unwrap_or_else(|| data.instruction.clone()),
            default_verifier: data.verifier.name(),
            tasks: train.len(),
            validation: validation.len(),
            steps: per_epoch * u64::from(options.epochs),
            options,
            gate_split,
        };
        write_tasks(&dir.join("tasks.jsonl"), &train)?;
        write_tasks(&dir.join("validation.jsonl"), &validation)?;
        write_json(&dir.join("run.json"), &info)?;
        Ok(Run {
            info,
            dir,
            tasks: train,
            validation,
        })
    }

    /// Opens a run directory to resume it.
    pub fn open(dir: &Path) -> Result<Run> {
        let info: RunInfo = read_json(&dir.join("run.json"))?;
        Ok(Run {
            tasks: read_tasks(&dir.join("tasks.jsonl"))?,
            validation: read_tasks(&dir.join("validation.jsonl"))?,
            info,
            dir: dir.to_owned(),
        })
    }

    pub(super) fn step_dir(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step-{step:04}"))
    }

    pub(super) fn message(&self, step: u64) -> String {
        format!("learn run {} step {step}/{}", self.info.id, self.info.steps)
    }

    /// The task indices of `step` (1-based): epoch `e` visits the tasks in an order shuffled
    /// by `seed + e`, cut into batches.
    pub(super) fn batch(&self, step: u64) -> (u32, Vec<usize>) {
        let per_epoch = self.tasks.len().div_ceil(self.info.options.batch_size) as u64;
        let epoch = (step - 1) / per_epoch;
        let b = ((step - 1) % per_epoch) as usize;
        let mut order = Dataset {
            name: String::new(),
            tasks: (0..self.tasks.len())
                .map(|i| Task {
                    question: i.to_string(),
                    answer: String::new(),
                    origin: None,
                })
                .collect(),
            verifier: Verifier::Exact,
            instruction: String::new(),
        };
        order.shuffle(self.info.options.seed.wrapping_add(epoch));
        let idx: Vec<usize> = order
            .tasks
            .iter()
            .map(|t| t.question.parse().unwrap())
            .skip(b * self.info.options.batch_size)
            .take(self.info.options.batch_size)
            .collect();
        (epoch as u32 + 1, idx)
    }

    /// Results of the finished steps, in order.
    pub fn results(&self) -> Vec<StepResult> {
        (1..=self.info.steps)
            .map_while(|s| read_json(&self.step_dir(s).join("result.json")).ok())
            .collect()
    }

    /// Validation accuracy before the first step, when it was measured.
    pub fn baseline(&self) -> Option<f64> {
        read_json::<Validation>(&self.dir.join("baseline.json"))
            .ok()
            .map(|v| v.accuracy)
    }
}
