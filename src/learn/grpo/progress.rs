//! How far a run has got, for `GET /v1/jobs/{id}` and for whoever draws it.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::Serialize;

/// Live progress of a run, read by `GET /v1/jobs/{id}` and passed, on every change, to the
/// watcher the caller gave (the CLI draws its bar from it; library code draws nothing).
#[derive(Default)]
pub struct Progress {
    pub step: AtomicU64,
    pub steps: AtomicU64,
    pub rollouts_done: AtomicU64,
    pub rollouts_total: AtomicU64,
    phase: Mutex<String>,
    watcher: Option<Watcher>,
}

/// Called with the progress after every change.
pub type Watcher = Box<dyn Fn(&ProgressSnapshot) + Send + Sync>;

/// Progress at one moment, as the jobs API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ProgressSnapshot {
    pub step: u64,
    pub steps: u64,
    pub rollouts_done: u64,
    pub rollouts_total: u64,
    pub phase: String,
}

impl Progress {
    /// Progress that also calls `watcher` on every change.
    pub fn watched(watcher: Watcher) -> Progress {
        Progress {
            watcher: Some(watcher),
            ..Default::default()
        }
    }

    pub(super) fn changed(&self) {
        if let Some(w) = &self.watcher {
            w(&self.snapshot());
        }
    }

    pub(super) fn phase(&self, step: u64, what: &str) {
        let steps = self.steps.load(Ordering::Relaxed);
        self.step.store(step, Ordering::Relaxed);
        *self.phase.lock() = format!("step {step}/{steps}: {what}");
        self.changed();
    }

    pub(super) fn rollout_done(&self) {
        self.rollouts_done.fetch_add(1, Ordering::Relaxed);
        self.changed();
    }

    /// The progress now.
    pub fn snapshot(&self) -> ProgressSnapshot {
        ProgressSnapshot {
            step: self.step.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
            rollouts_done: self.rollouts_done.load(Ordering::Relaxed),
            rollouts_total: self.rollouts_total.load(Ordering::Relaxed),
            phase: self.phase.lock().clone(),
        }
    }
}
