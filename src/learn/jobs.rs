//! Learning runs started over HTTP: each is a tokio task with live progress, one per library
//! at a time. Jobs are kept in memory; their run directories are not, so a job lost to a
//! restart is resumed by starting a new one that names its run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use indexmap::IndexMap;
use serde::Serialize;

use super::grpo::{self, Progress, Run, RunSummary};
use crate::error::{Error, Result};
use crate::methods::Context;
use crate::router::Router;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

pub struct Job {
    pub id: String,
    pub library: String,
    pub run: String,
    pub run_dir: PathBuf,
    pub created: i64,
    progress: Arc<Progress>,
    state: Mutex<State>,
}

struct State {
    status: Status,
    error: Option<String>,
    result: Option<RunSummary>,
    abort: Option<tokio::task::AbortHandle>,
}

impl Job {
    pub fn status(&self) -> Status {
        self.state.lock().unwrap().status
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn view(&self) -> serde_json::Value {
        let s = self.state.lock().unwrap();
        serde_json::json!({
            "id": self.id,
            "object": "learn.job",
            "library": self.library,
            "run": self.run,
            "run_dir": self.run_dir,
            "created_at": self.created,
            "status": s.status,
            "progress": self.progress.snapshot(),
            "result": s.result,
            "error": s.error,
        })
    }
}

pub struct Jobs {
    jobs: Mutex<IndexMap<String, Arc<Job>>>,
    runs_dir: PathBuf,
}

impl Jobs {
    pub fn new(runs_dir: &Path) -> Jobs {
        Jobs {
            jobs: Mutex::default(),
            runs_dir: runs_dir.to_owned(),
        }
    }

    pub fn runs_dir(&self) -> &Path {
        &self.runs_dir
    }

    /// Starts `run` in the background. A library learns in one job at a time: two runs
    /// committing to one library would each learn against a library the other is changing.
    pub fn start(&self, ctx: Context, router: Arc<Router>, run: Run) -> Result<Arc<Job>> {
        let mut jobs = self.jobs.lock().unwrap();
        let library = run.info.options.library.clone();
        if let Some(j) = jobs
            .values()
            .find(|j| j.library == library && j.status() == Status::Running)
        {
            return Err(Error::Conflict(format!(
                "library '{library}' is already learning in job {}; wait for it or cancel it",
                j.id
            )));
        }
        let job = Arc::new(Job {
            id: format!("job_{}", uuid::Uuid::new_v4().simple()),
            library,
            run: run.info.id.clone(),
            run_dir: run.dir.clone(),
            created: chrono::Utc::now().timestamp(),
            progress: Arc::new(Progress::default()),
            state: Mutex::new(State {
                status: Status::Running,
                error: None,
                result: None,
                abort: None,
            }),
        });
        let task = {
            let job = job.clone();
            tokio::spawn(async move {
                let outcome = grpo::learn(&ctx, &router, &run, &job.progress).await;
                let mut s = job.state.lock().unwrap();
                if s.status != Status::Running {
                    // Cancelled while finishing; the cancellation stands.
                    return;
                }
                match outcome {
                    Ok(summary) => {
                        s.status = Status::Succeeded;
                        s.result = Some(summary);
                    }
                    Err(e) => {
                        tracing::error!(job = %job.id, error = %e, "learning job failed");
                        s.status = Status::Failed;
                        s.error = Some(e.to_string());
                    }
                }
                s.abort = None;
            })
        };
        job.state.lock().unwrap().abort = Some(task.abort_handle());
        jobs.insert(job.id.clone(), job.clone());
        // Keep the list bounded: forget the oldest finished jobs.
        while jobs.len() > 100 {
            let Some(old) = jobs
                .iter()
                .find(|(_, j)| j.status() != Status::Running)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            jobs.shift_remove(&old);
        }
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no job with id '{id}'"), "id"))
    }

    pub fn list(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().unwrap().values().cloned().collect()
    }

    /// Stops a running job between model calls. What it committed stays; its run can be
    /// resumed later. Cancelling a finished job changes nothing.
    pub fn cancel(&self, id: &str) -> Result<Arc<Job>> {
        let job = self.get(id)?;
        {
            let mut s = job.state.lock().unwrap();
            if s.status == Status::Running {
                if let Some(a) = s.abort.take() {
                    a.abort();
                }
                s.status = Status::Cancelled;
            }
        }
        Ok(job)
    }
}
