//! Learning runs started over HTTP: each is a tokio task with live progress, one per library
//! at a time. Jobs are kept in memory; their run directories are not, so a job lost to a
//! restart is resumed by starting a new one that names its run.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::FutureExt;
use indexmap::IndexMap;
use parking_lot::Mutex;
use serde::Serialize;

use super::grpo::{self, Progress, Run, RunSummary};
use crate::error::{Error, Result};
use crate::methods::Context;
use crate::router::Router;

/// Where a learning job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// A learning run started through the API, running in the server's background lane.
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
    fn finish(&self, outcome: Result<RunSummary>) {
        let mut s = self.state.lock();
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
                tracing::error!(job = %self.id, error = %e, "learning job failed");
                s.status = Status::Failed;
                s.error = Some(e.to_string());
            }
        }
        s.abort = None;
    }

    /// The job's status now.
    pub fn status(&self) -> Status {
        self.state.lock().status
    }

    /// The job as `GET /v1/jobs/{id}` shows it.
    pub fn view(&self) -> serde_json::Value {
        let s = self.state.lock();
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

/// The server's learning jobs: at most `max_running` at once, one per library.
pub struct Jobs {
    jobs: Mutex<IndexMap<String, Arc<Job>>>,
    runs_dir: PathBuf,
    /// Most jobs running at once (`bounds.max_jobs`): one per library would let a client that
    /// creates libraries start as many jobs as it likes.
    max_running: usize,
}

impl Jobs {
    /// No jobs yet; runs go under `runs_dir`.
    pub fn new(runs_dir: &Path, max_running: usize) -> Jobs {
        Jobs {
            jobs: Mutex::default(),
            runs_dir: runs_dir.to_owned(),
            max_running: max_running.max(1),
        }
    }

    /// Whether a job is running for `library` now.
    pub fn learning(&self, library: &str) -> bool {
        self.jobs
            .lock()
            .values()
            .any(|j| j.library == library && j.status() == Status::Running)
    }

    /// Where the jobs' run directories are.
    pub fn runs_dir(&self) -> &Path {
        &self.runs_dir
    }

    /// Starts `run` in the background. A library learns in one job at a time: two runs
    /// committing to one library would each learn against a library the other is changing.
    pub fn start(&self, ctx: Context, router: Arc<Router>, run: Run) -> Result<Arc<Job>> {
        let progress = Arc::new(Progress::default());
        let (library, id, dir) = (
            run.info.options.library.clone(),
            run.info.id.clone(),
            run.dir.clone(),
        );
        let p = progress.clone();
        let work = async move { grpo::learn(&ctx, &router, &run, &p).await };
        self.spawn(library, id, dir, progress, work)
    }

    fn spawn(
        &self,
        library: String,
        run: String,
        run_dir: PathBuf,
        progress: Arc<Progress>,
        work: impl std::future::Future<Output = Result<RunSummary>> + Send + 'static,
    ) -> Result<Arc<Job>> {
        let mut jobs = self.jobs.lock();
        if let Some(j) = jobs
            .values()
            .find(|j| j.library == library && j.status() == Status::Running)
        {
            return Err(Error::Conflict(format!(
                "library '{library}' is already learning in job {}; wait for it or cancel it",
                j.id
            )));
        }
        let running = jobs
            .values()
            .filter(|j| j.status() == Status::Running)
            .count();
        if running >= self.max_running {
            return Err(Error::Overloaded {
                message: format!(
                    "{running} learning jobs are running, the most this server runs at once \
                     (bounds.max_jobs); wait for one to finish or cancel one"
                ),
                retry_after_secs: 60,
            });
        }
        let job = Arc::new(Job {
            id: format!("job_{}", uuid::Uuid::new_v4().simple()),
            library,
            run,
            run_dir,
            created: chrono::Utc::now().timestamp(),
            progress,
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
                // A panic inside the loop fails the job instead of leaving it "running" and
                // its library answering 409 until a restart.
                let outcome = AssertUnwindSafe(work)
                    .catch_unwind()
                    .await
                    .unwrap_or_else(|panic| {
                        Err(Error::Internal(format!(
                            "the learning job crashed: {}",
                            crate::error::panic_message(&*panic)
                        )))
                    });
                job.finish(outcome);
            })
        };
        job.state.lock().abort = Some(task.abort_handle());
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

    /// The job `id`; 404 if there is none.
    pub fn get(&self, id: &str) -> Result<Arc<Job>> {
        self.jobs
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no job with id '{id}'"), "id"))
    }

    /// Every job this server started, oldest first.
    pub fn list(&self) -> Vec<Arc<Job>> {
        self.jobs.lock().values().cloned().collect()
    }

    /// Stops a running job between model calls. What it committed stays; its run can be
    /// resumed later. Cancelling a finished job changes nothing.
    pub fn cancel(&self, id: &str) -> Result<Arc<Job>> {
        let job = self.get(id)?;
        {
            let mut s = job.state.lock();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_job_fails_and_frees_its_library() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(dir.path(), 2);
        let start = |work: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<RunSummary>> + Send>,
        >| {
            jobs.spawn(
                "lib".into(),
                "run".into(),
                dir.path().into(),
                Arc::default(),
                work,
            )
        };
        let job = start(Box::pin(async { panic!("index out of bounds") })).unwrap();
        for _ in 0..100 {
            if job.status() != Status::Running {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(job.status(), Status::Failed);
        let view = job.view();
        assert!(
            view["error"]
                .as_str()
                .unwrap()
                .contains("index out of bounds"),
            "{view}"
        );
        // The library may learn again at once.
        let again = start(Box::pin(std::future::pending())).unwrap();
        assert_eq!(again.status(), Status::Running);
        jobs.cancel(&again.id).unwrap();
    }

    #[tokio::test]
    async fn running_jobs_are_bounded_across_libraries() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs::new(dir.path(), 2);
        let start = |lib: &str| {
            jobs.spawn(
                lib.into(),
                "run".into(),
                dir.path().into(),
                Arc::default(),
                std::future::pending(),
            )
        };
        let a = start("a").unwrap();
        start("b").unwrap();
        assert!(matches!(start("c"), Err(Error::Overloaded { .. })));
        // A finished (here: cancelled) job frees its place.
        jobs.cancel(&a.id).unwrap();
        start("c").unwrap();
    }
}
