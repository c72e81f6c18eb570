//! Evaluations started over HTTP: two versions of a library (or one and none) compared on
//! the same tasks in the background, in the learning lane, each a tokio task with its
//! progress. A finished evaluation is written to `<runs-dir>/evaluations/<id>.json`, so it is
//! still found after it leaves memory or the server restarts.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use indexmap::IndexMap;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::compare::Comparison;
use super::jobs::Status;
use crate::error::{Error, Result};

/// The most evaluations kept in memory; older finished ones are read from their files.
const KEPT: usize = 100;

/// One evaluation: what was asked, where it is, and what it found.
pub struct Evaluation {
    pub id: String,
    pub library: String,
    /// The owner tag of the (admin) key that started it.
    created_by: Option<String>,
    created: i64,
    /// The request as the client sent it (normalised), echoed in every view.
    request: Value,
    answers_done: AtomicU64,
    answers_total: AtomicU64,
    state: Mutex<State>,
}

struct State {
    status: Status,
    report: Option<Comparison>,
    error: Option<String>,
    abort: Option<tokio::task::AbortHandle>,
}

impl Evaluation {
    /// The evaluation as `GET .../evaluations/{id}` shows it.
    pub fn view(&self) -> Value {
        let s = self.state.lock();
        json!({
            "id": self.id,
            "object": "evaluation",
            "library": self.library,
            "created_by": self.created_by,
            "created_at": self.created,
            "status": s.status,
            "request": self.request,
            "progress": {
                "answers": self.answers_done.load(Ordering::Relaxed),
                "total": self.answers_total.load(Ordering::Relaxed),
            },
            "report": s.report,
            "error": s.error,
        })
    }

    /// Counts answers as the comparison reports them.
    pub fn tick(&self, tick: super::eval::Tick<'_>) {
        match tick {
            super::eval::Tick::Arm { answers, .. } => {
                self.answers_total.fetch_add(answers, Ordering::Relaxed);
            }
            super::eval::Tick::Answer => {
                self.answers_done.fetch_add(1, Ordering::Relaxed);
            }
            super::eval::Tick::ArmDone => {}
        }
    }
}

/// The server's evaluations: at most `max_running` at once.
pub struct Evaluations {
    items: Mutex<IndexMap<String, Arc<Evaluation>>>,
    dir: PathBuf,
    max_running: usize,
}

impl Evaluations {
    /// No evaluations yet; finished ones are written under `runs_dir/evaluations`.
    pub fn new(runs_dir: &Path, max_running: usize) -> Evaluations {
        Evaluations {
            items: Mutex::default(),
            dir: runs_dir.join("evaluations"),
            max_running: max_running.max(1),
        }
    }

    /// Starts `work` for `library` on behalf of the key tagged `created_by`, in the background;
    /// 429 when as many are running as the server runs at once.
    pub fn start<F>(
        self: &Arc<Self>,
        library: &str,
        created_by: Option<String>,
        request: Value,
        work: impl FnOnce(Arc<Evaluation>) -> F,
    ) -> Result<Arc<Evaluation>>
    where
        F: std::future::Future<Output = Result<Comparison>> + Send + 'static,
    {
        let mut items = self.items.lock();
        let running = items
            .values()
            .filter(|e| e.state.lock().status == Status::Running)
            .count();
        if running >= self.max_running {
            return Err(Error::Overloaded {
                message: format!(
                    "{running} evaluations are running, the most this server runs at once \
                     (bounds.max_jobs); wait for one to finish"
                ),
                retry_after_secs: 60,
            });
        }
        let eval = Arc::new(Evaluation {
            id: format!("eval_{}", uuid::Uuid::new_v4().simple()),
            library: library.to_owned(),
            created_by,
            created: chrono::Utc::now().timestamp(),
            request,
            answers_done: AtomicU64::new(0),
            answers_total: AtomicU64::new(0),
            state: Mutex::new(State {
                status: Status::Running,
                report: None,
                error: None,
                abort: None,
            }),
        });
        let future = work(eval.clone());
        let (me, e) = (self.clone(), eval.clone());
        let task = tokio::spawn(async move {
            let outcome = future.await;
            // finish writes and syncs the report's file: a blocking thread's work.
            let _ = tokio::task::spawn_blocking(move || me.finish(&e, outcome)).await;
        });
        eval.state.lock().abort = Some(task.abort_handle());
        items.insert(eval.id.clone(), eval.clone());
        self.forget_old(&mut items);
        Ok(eval)
    }

    fn finish(&self, e: &Evaluation, outcome: Result<Comparison>) {
        {
            let mut s = e.state.lock();
            match outcome {
                Ok(report) => {
                    s.status = Status::Succeeded;
                    s.report = Some(report);
                }
                Err(err) => {
                    tracing::warn!(evaluation = %e.id, error = %err, "evaluation failed");
                    s.status = Status::Failed;
                    s.error = Some(err.to_string());
                }
            }
            s.abort = None;
        }
        let write = std::fs::create_dir_all(&self.dir)
            .map_err(Error::from)
            .and_then(|()| {
                let bytes = serde_json::to_vec_pretty(&e.view()).map_err(Error::internal)?;
                crate::experience::write_atomic(&self.dir.join(format!("{}.json", e.id)), &bytes)
            });
        if let Err(err) = write {
            tracing::warn!(evaluation = %e.id, error = %err, "could not keep the evaluation");
        }
    }

    /// Drops the oldest finished evaluations past [`KEPT`] from memory (their files stay).
    fn forget_old(&self, items: &mut IndexMap<String, Arc<Evaluation>>) {
        while items.len() > KEPT {
            let oldest_done = items
                .iter()
                .position(|(_, e)| e.state.lock().status != Status::Running);
            match oldest_done {
                Some(i) => {
                    items.shift_remove_index(i);
                }
                None => break,
            }
        }
    }

    /// The view of evaluation `id` of `library`, from memory or its file.
    pub fn view(&self, library: &str, id: &str) -> Result<Value> {
        let not_found =
            || Error::not_found(format!("no evaluation '{id}' of library '{library}'"), "id");
        if let Some(e) = self.items.lock().get(id) {
            return if e.library == library {
                Ok(e.view())
            } else {
                Err(not_found())
            };
        }
        let valid = id
            .strip_prefix("eval_")
            .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !valid {
            return Err(not_found());
        }
        let text = std::fs::read_to_string(self.dir.join(format!("{id}.json")))
            .map_err(|_| not_found())?;
        let v: Value = serde_json::from_str(&text).map_err(Error::internal)?;
        if v["library"] == library {
            Ok(v)
        } else {
            Err(not_found())
        }
    }

    /// The evaluations of `library` in memory, newest first.
    pub fn list(&self, library: &str) -> Vec<Value> {
        self.items
            .lock()
            .values()
            .rev()
            .filter(|e| e.library == library)
            .map(|e| e.view())
            .collect()
    }

    /// Cancels a running evaluation; false when it was not running.
    pub fn cancel(&self, library: &str, id: &str) -> bool {
        let items = self.items.lock();
        let Some(e) = items.get(id).filter(|e| e.library == library) else {
            return false;
        };
        let mut s = e.state.lock();
        if s.status != Status::Running {
            return false;
        }
        if let Some(a) = s.abort.take() {
            a.abort();
        }
        s.status = Status::Cancelled;
        true
    }
}
