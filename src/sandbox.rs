//! Running model-written Python safely: monty (a Python interpreter made for LLM code, with no
//! filesystem, network or environment access unless the host grants it) in a short-lived
//! worker process.
//!
//! monty bounds time and recursion itself, but its memory limit needs its allocator installed
//! as the whole process's global allocator, which would count (and could kill) the server's
//! model weights. So each program runs in `experient sandbox`, a child of the server with an
//! empty environment, its data segment capped by `RLIMIT_DATA` and its CPU time by
//! `RLIMIT_CPU`, and killed by the parent at a wall-clock deadline. Whatever the program does,
//! the server sees a result or a clean error; a crash of the interpreter is a crash of the
//! child.
//!
//! The worker inherits nothing it does not need: every file descriptor but its three pipes is
//! closed at exec (a server started from a shell may hold others), it runs in an empty
//! directory of its own, may open few files, create no process and write no file
//! (`RLIMIT_NOFILE`, `RLIMIT_NPROC`, `RLIMIT_FSIZE`), and leads its own process group, which is
//! killed whole at the deadline. At most `server.max_sandboxes` workers run at once across
//! the server; programs beyond that wait their turn.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

/// The process-wide cap on running workers: the semaphore and its size.
static WORKERS: OnceLock<(Arc<Semaphore>, usize)> = OnceLock::new();
const DEFAULT_WORKERS: usize = 4;

/// Sets how many workers may run at once in this process; the first call wins, and without one
/// the cap is 4. A process-wide cap, because every caller (planning, IterResearch's Python
/// tool) spends the same CPUs.
pub fn set_max_workers(n: usize) {
    let _ = WORKERS.set((Arc::new(Semaphore::new(n.max(1))), n.max(1)));
}

/// How many workers may run at once.
pub fn max_workers() -> usize {
    workers().1
}

fn workers() -> &'static (Arc<Semaphore>, usize) {
    WORKERS.get_or_init(|| (Arc::new(Semaphore::new(DEFAULT_WORKERS)), DEFAULT_WORKERS))
}

/// What one program may use.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    pub time: Duration,
    pub memory_bytes: usize,
    /// Longest `print` output kept; past it the program fails with `MemoryError`.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time: Duration::from_secs(5),
            memory_bytes: 256 << 20,
            output_bytes: 64 << 10,
        }
    }
}

/// What a program did: the value of its last expression (Python `repr`), what it printed, and
/// the error (a Python traceback) if it failed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub value: Option<String>,
    pub output: String,
    pub error: Option<String>,
    /// The last expression's value as JSON, when it is made of None, booleans, numbers,
    /// strings, lists, tuples and string-keyed dicts: how a host reads a program's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

impl Outcome {
    fn failed(error: String) -> Self {
        Outcome {
            error: Some(error),
            ..Default::default()
        }
    }

    /// The outcome as one text for a model to read.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.output.is_empty() {
            parts.push(self.output.trim_end().to_owned());
        }
        if let Some(v) = &self.value {
            parts.push(v.clone());
        }
        if let Some(e) = &self.error {
            parts.push(e.trim_end().to_owned());
        }
        if parts.is_empty() {
            "(no output)".into()
        } else {
            parts.join("\n")
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Job {
    code: String,
    limits: Limits,
}

/// Runs `code` in a worker process and returns what happened. Errors of the program are in
/// the outcome; only a failure to start the worker is an `Err`.
pub async fn run_python(code: &str, limits: &Limits) -> std::io::Result<Outcome> {
    let _turn = workers()
        .0
        .clone()
        .acquire_owned()
        .await
        .map_err(std::io::Error::other)?;
    let exe = std::env::var_os("EXPERIENT_SANDBOX_EXE")
        .map(std::path::PathBuf::from)
        .map_or_else(std::env::current_exe, Ok)?;
    let home = EmptyDir::new()?;
    let mut command = tokio::process::Command::new(exe);
    command
        .arg("sandbox")
        .env_clear()
        .current_dir(&home.0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (close_range/fcntl, setrlimit) on integers; it allocates nothing.
    unsafe {
        command.pre_exec(confine_child);
    }
    let mut child = command.spawn()?;
    let group = Group(child.id());
    let job = serde_json::to_vec(&Job {
        code: code.to_owned(),
        limits: limits.clone(),
    })?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let io = async {
        stdin.write_all(&job).await?;
        drop(stdin);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut out_r = (&mut stdout).take(limits.output_bytes as u64 * 2 + (1 << 20));
        let mut err_r = (&mut stderr).take(1 << 16);
        let (a, b) = tokio::join!(out_r.read_to_end(&mut out), err_r.read_to_end(&mut err));
        a?;
        b?;
        let status = child.wait().await?;
        std::io::Result::Ok((status, out, err))
    };
    let deadline = limits.time + Duration::from_secs(2);
    let (status, out, err) = match tokio::time::timeout(deadline, io).await {
        Ok(r) => {
            // Reaped: the group id may now be reused, so it must not be signalled any more.
            group.disarm();
            r?
        }
        Err(_) => {
            drop(group);
            return Ok(Outcome::failed(format!(
                "TimeoutError: the program ran past its {:.1} s limit",
                limits.time.as_secs_f64()
            )));
        }
    };
    if let Ok(outcome) = serde_json::from_slice::<Outcome>(&out) {
        return Ok(outcome);
    }
    let err = String::from_utf8_lossy(&err);
    Ok(Outcome::failed(if err.contains("memory allocation") {
        format!(
            "MemoryError: the program needed more than its {} MiB",
            limits.memory_bytes >> 20
        )
    } else if status.code().is_none() {
        // Killed by a signal: RLIMIT_CPU's SIGXCPU, or an abort on a failed allocation.
        "MemoryError or TimeoutError: the program was stopped for exceeding its limits".into()
    } else {
        format!("the sandbox failed ({status}): {}", err.trim())
    }))
}

/// The worker's process group, killed whole when dropped before the worker was reaped: at the
/// deadline, or when the request that ran the program goes away.
struct Group(Option<u32>);

impl Group {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: killpg on the group the child leads (process_group(0)); it has not been
            // reaped yet, so the id is still its own.
            unsafe {
                libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

/// A fresh, empty working directory for one worker, removed afterwards.
struct EmptyDir(std::path::PathBuf);

impl EmptyDir {
    fn new() -> std::io::Result<EmptyDir> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = std::env::temp_dir().join(format!(
            "experient-sandbox-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        Ok(EmptyDir(dir))
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs in the child between fork and exec: every descriptor past stdin, stdout and stderr is
/// marked close-on-exec (closing them outright would also close the pipe through which the
/// parent learns whether exec failed), and the limits that need no knowledge of the job are set.
fn confine_child() -> std::io::Result<()> {
    // SAFETY: plain system calls on integers, async-signal-safe.
    unsafe {
        const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
        let ranged = libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, CLOSE_RANGE_CLOEXEC);
        if ranged != 0 {
            for fd in 3..4096 {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        for (resource, value) in [
            (libc::RLIMIT_NOFILE, 16),
            (libc::RLIMIT_NPROC, 0),
            (libc::RLIMIT_FSIZE, 0),
        ] {
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The worker: reads one job on stdin, runs it, writes the outcome on stdout. Runs as
/// `experient sandbox` in a process of its own.
pub fn worker_main() -> i32 {
    let mut input = String::new();
    if std::io::stdin()
        .take(16 << 20)
        .read_to_string(&mut input)
        .is_err()
    {
        return 2;
    }
    let Ok(job) = serde_json::from_str::<Job>(&input) else {
        return 2;
    };
    limit_process(&job.limits);
    let outcome = run_here(&job.code, &job.limits);
    let mut stdout = std::io::stdout();
    let _ = serde_json::to_writer(&mut stdout, &outcome);
    let _ = stdout.flush();
    0
}

fn limit_process(limits: &Limits) {
    // The executable's own mappings are not data; what the interpreter allocates is. A
    // baseline covers the Rust runtime and the parsed program.
    let data = (limits.memory_bytes + (64 << 20)) as libc::rlim_t;
    let cpu = limits.time.as_secs() + 2;
    // SAFETY: setrlimit with valid pointers to initialised structs only lowers this process's
    // own limits.
    unsafe {
        libc::setrlimit(
            libc::RLIMIT_DATA,
            &libc::rlimit {
                rlim_cur: data,
                rlim_max: data,
            },
        );
        libc::setrlimit(
            libc::RLIMIT_CPU,
            &libc::rlimit {
                rlim_cur: cpu,
                rlim_max: cpu + 1,
            },
        );
    }
}

fn to_json(v: &monty_types::MontyObject) -> Option<serde_json::Value> {
    use monty_types::MontyObject as M;
    use serde_json::Value;
    Some(match v {
        M::None => Value::Null,
        M::Bool(b) => Value::Bool(*b),
        M::Int(i) => Value::from(*i),
        M::Float(f) => Value::from(*f),
        M::String(s) => Value::String(s.clone()),
        M::List(items) | M::Tuple(items) => {
            Value::Array(items.iter().map(to_json).collect::<Option<_>>()?)
        }
        M::Dict(pairs) => {
            let mut map = serde_json::Map::new();
            for (k, v) in pairs {
                let M::String(k) = k else { return None };
                map.insert(k.clone(), to_json(v)?);
            }
            Value::Object(map)
        }
        _ => return None,
    })
}

/// Runs a program in this process with monty's own limits (time, recursion, output).
fn run_here(code: &str, limits: &Limits) -> Outcome {
    use monty::MontyRun;
    use monty_types::{CompileOptions, MontyObject, PrintWriter, ResourceLimits, ResourceTracker};

    let runner = match MontyRun::new(
        code.to_owned(),
        "main.py",
        vec![],
        CompileOptions::default(),
    ) {
        Ok(r) => r,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let tracker = ResourceTracker::new(ResourceLimits {
        max_duration: Some(limits.time),
        ..ResourceLimits::default()
    });
    let mut output = String::new();
    let result = runner.run(
        vec![],
        tracker,
        PrintWriter::CollectString(&mut output, Some(limits.output_bytes)),
    );
    match result {
        Ok(MontyObject::None) => Outcome {
            output,
            ..Default::default()
        },
        Ok(v) => Outcome {
            value: Some(v.py_repr()),
            json: to_json(&v),
            output,
            error: None,
        },
        Err(e) => Outcome {
            output,
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}
