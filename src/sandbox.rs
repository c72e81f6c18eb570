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

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let exe = std::env::var_os("EXPERIENT_SANDBOX_EXE")
        .map(std::path::PathBuf::from)
        .map_or_else(std::env::current_exe, Ok)?;
    let mut child = tokio::process::Command::new(exe)
        .arg("sandbox")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
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
        Ok(r) => r?,
        Err(_) => {
            return Ok(Outcome::failed(format!(
                "TimeoutError: the program ran past its {:.1} s limit",
                limits.time.as_secs_f64()
            )))
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
