//! What experient adds in upstream mode, measured against calling the upstream directly in the
//! same run, with a bare byte-forwarding proxy on the same HTTP stack as a floor.
//!
//! The upstream is a minimal OpenAI-compatible responder in this file that streams a fixed
//! answer at once, so the proxy's cost is not hidden behind a model's. experient runs as its
//! real binary with an upstream config pointing at it. The floor is this bench binary run again
//! as a separate process (`--floor-proxy`): axum in, reqwest out, the upstream's bytes passed
//! through untouched, so it shows what the HTTP stack alone costs on the machine at hand. A load
//! generator (reqwest) keeps 1, 16 and 64 streams in flight, each request reading the whole SSE
//! body, in interleaved rounds against the responder, the floor and experient, and reports the
//! latency percentiles, the latency each proxy adds, and the CPU time each proxy process spent
//! per request (from procfs).
//!
//!     cargo bench --bench proxy_overhead                  # all processes share every CPU
//!     cargo bench --bench proxy_overhead -- --split       # each proxy gets the last CPU alone
//!     cargo bench --bench proxy_overhead -- --tokens 64   # a longer answer (default 16)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::post;
use futures::StreamExt;

static TOKENS: OnceLock<usize> = OnceLock::new();

fn tokens() -> usize {
    *TOKENS.get().unwrap_or(&16)
}

async fn respond(axum::Json(body): axum::Json<serde_json::Value>) -> axum::response::Response {
    let model = body["model"].as_str().unwrap_or("fast").to_owned();
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        serde_json::json!({
            "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut out = String::new();
    let mut push = |v: serde_json::Value| {
        out.push_str("data: ");
        out.push_str(&v.to_string());
        out.push_str("\n\n");
    };
    push(chunk(
        serde_json::json!({"role": "assistant", "content": ""}),
        serde_json::Value::Null,
    ));
    for _ in 0..tokens() {
        push(chunk(
            serde_json::json!({"content": "tok "}),
            serde_json::Value::Null,
        ));
    }
    push(chunk(serde_json::json!({}), serde_json::json!("stop")));
    push(serde_json::json!({
        "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens(), "total_tokens": 8 + tokens()},
    }));
    out.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], out).into_response()
}

/// The floor: forwards the request body to the upstream and streams its answer back as bytes,
/// with nothing parsed, checked or rewritten.
async fn floor_proxy(upstream: String) {
    #[derive(Clone)]
    struct Floor {
        client: reqwest::Client,
        url: String,
    }
    async fn forward(
        axum::extract::State(f): axum::extract::State<Floor>,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        let r = f
            .client
            .post(&f.url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("the responder is up");
        (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(r.bytes_stream()),
        )
            .into_response()
    }
    use axum::serve::ListenerExt;
    let floor = Floor {
        client: reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1024)
            .build()
            .unwrap(),
        url: upstream,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    println!(
        "floor: listening on http://{}",
        listener.local_addr().unwrap()
    );
    let listener = listener.tap_io(|t| {
        let _ = t.set_nodelay(true);
    });
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(forward))
        .with_state(floor);
    axum::serve(listener, app).await.unwrap();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn load(url: &str, concurrency: usize, total: usize) -> Vec<Duration> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let body = serde_json::json!({
        "model": "fast", "stream": true, "max_tokens": tokens(),
        "messages": [{"role": "user", "content": "hello"}],
    });
    let per = total / concurrency;
    let workers = (0..concurrency).map(|_| {
        let (client, body, url) = (client.clone(), body.clone(), url.to_owned());
        tokio::spawn(async move {
            let mut times = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = client.post(&url).json(&body).send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                let mut s = r.bytes_stream();
                let mut n = 0;
                while let Some(b) = s.next().await {
                    n += b.unwrap().len();
                }
                assert!(n > 0);
                times.push(t.elapsed());
            }
            times
        })
    });
    let mut all = Vec::new();
    for w in futures::future::join_all(workers).await {
        all.extend(w.unwrap());
    }
    all
}

/// CPU time (user + system) a process has used so far, from `/proc/PID/stat`; None where there
/// is no procfs.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Restricts the calling thread (and what it later spawns or executes) to the given CPUs.
fn pin(cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET and sched_setaffinity only read and
    // write the set passed to them.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts a proxy process, on `cpu` alone if given, and waits for the line that gives its
/// address.
fn spawn(mut cmd: Command, cpu: Option<usize>, prefix: &str) -> (Child, String) {
    cmd.stdout(Stdio::piped());
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls sched_setaffinity, which is async-signal-safe.
        unsafe { cmd.pre_exec(move || pin(&[cpu])) };
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let l = lines.next().expect("the proxy exited").unwrap();
        if let Some(rest) = l.strip_prefix(prefix) {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

struct Path {
    url: String,
    pid: Option<u32>,
    times: Vec<Duration>,
    cpu: Duration,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(n) = value("--tokens") {
        TOKENS
            .set(n.parse().expect("--tokens takes a number"))
            .unwrap();
    }
    if let Some(upstream) = value("--floor-proxy") {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(floor_proxy(upstream.clone()));
        return;
    }
    // `--split`: each proxy gets the last CPU to itself and the load generator and responder
    // the others, in every measurement, as when a proxy runs on its own host or cores. Without
    // it all processes share every CPU.
    let split = args.iter().any(|a| a == "--split");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if split && cpus < 2 {
        eprintln!("--split needs at least 2 CPUs");
        std::process::exit(2);
    }
    let proxy_cpu = split.then_some(cpus - 1);
    if split {
        pin(&(0..cpus - 1).collect::<Vec<_>>()).expect("pinning the load generator");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let upstream = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/v1/chat/completions", post(respond));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    });

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nkind = \"upstream\"\nid = \"fast\"\nbase_url = \"http://{upstream}/v1\"\nmax_concurrent = 1024\n"
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_experient"));
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--experience-dir")
        .arg(dir.path().join("exp"))
        .env("EXPERIENT_LOG", "warn");
    let (mut experient, experient_addr) = spawn(cmd, proxy_cpu, "experient: listening on ");
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg("--floor-proxy")
        .arg(format!("http://{upstream}/v1/chat/completions"));
    let (mut floor, floor_addr) = spawn(cmd, proxy_cpu, "floor: listening on ");

    println!(
        "layout: {}; {} tokens an answer",
        match proxy_cpu {
            Some(c) => format!(
                "split (each proxy on CPU {c}, load generator and responder on the other {c})"
            ),
            None => format!("shared (every process on all {cpus} CPUs)"),
        },
        tokens()
    );
    println!(
        "streams | direct p50 / p99 (ms) | floor adds p50 / p99 (ms), CPU/req (us) | experient adds p50 / p99 (ms), CPU/req (us)"
    );
    for concurrency in [1usize, 16, 64] {
        let mut paths = [
            Path {
                url: format!("http://{upstream}/v1/chat/completions"),
                pid: None,
                times: Vec::new(),
                cpu: Duration::ZERO,
            },
            Path {
                url: format!("{floor_addr}/v1/chat/completions"),
                pid: Some(floor.id()),
                times: Vec::new(),
                cpu: Duration::ZERO,
            },
            Path {
                url: format!("{experient_addr}/v1/chat/completions"),
                pid: Some(experient.id()),
                times: Vec::new(),
                cpu: Duration::ZERO,
            },
        ];
        // Interleaved rounds, so that a noisy spell on the machine lands on every path alike.
        let (rounds, per_round) = if concurrency == 1 {
            (4, 1000)
        } else {
            (4, concurrency * 100)
        };
        rt.block_on(async {
            // Warm every path (connection pools, allocators) before measuring.
            for p in &paths {
                load(&p.url, concurrency, concurrency * 4).await;
            }
            for _ in 0..rounds {
                for p in &mut paths {
                    let before = p.pid.and_then(cpu_time);
                    p.times.extend(load(&p.url, concurrency, per_round).await);
                    if let (Some(b), Some(a)) = (before, p.pid.and_then(cpu_time)) {
                        p.cpu += a - b;
                    }
                }
            }
        });
        for p in &mut paths {
            p.times.sort();
        }
        let ms = |x: Duration| x.as_secs_f64() * 1e3;
        let q = |p: &Path, at: f64| ms(percentile(&p.times, at));
        let [direct, proxies @ ..] = &paths;
        let mut line = format!(
            "{concurrency:>7} | {:>8.3} / {:>8.3}",
            q(direct, 0.5),
            q(direct, 0.99)
        );
        for p in proxies {
            line += &format!(
                " | {:>7.3} / {:>7.3}, {:>4.0}",
                q(p, 0.5) - q(direct, 0.5),
                q(p, 0.99) - q(direct, 0.99),
                p.cpu.as_secs_f64() * 1e6 / p.times.len() as f64,
            );
        }
        println!("{line}");
    }
    for child in [&mut experient, &mut floor] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
