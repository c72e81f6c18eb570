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
//!     cargo bench --bench proxy_overhead -- --pace-ms 20  # tokens 20 ms apart, as a model streams
//!     cargo bench --bench proxy_overhead -- --litellm "$(bench/litellm.sh)"  # LiteLLM as a peer
//!
//! With `--litellm PATH`, LiteLLM's proxy (the `litellm` command of `litellm[proxy]` from PyPI;
//! `bench/litellm.sh` installs it) serves the same responder as a fourth path, one worker
//! process, logging off, and each line ends with experient's added latency and CPU per request
//! as a ratio to LiteLLM's.
//!
//! By default the responder sends the whole answer at once and every stream sends its next
//! request the moment the last one ends, so "64 streams" is as many requests a second as the
//! machine can serve and the figures measure saturation: the added latency is queueing behind
//! the proxy's CPU time. With `--pace-ms` the responder streams like a model (the first token at
//! once, the others that many milliseconds apart), so 64 streams are 64 answers in flight at a
//! realistic rate; each token carries the time the responder wrote it, and the load generator
//! reports the time to the first token and each token's delivery delay (written to read), the
//! latencies a streaming client sees.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::post;
use futures::StreamExt;

static TOKENS: OnceLock<usize> = OnceLock::new();
static PACE: OnceLock<Duration> = OnceLock::new();
/// The clock the paced responder stamps tokens with and the load generator reads them by (both
/// run in this process).
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn pace() -> Option<Duration> {
    PACE.get().copied()
}

fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn tokens() -> usize {
    *TOKENS.get().unwrap_or(&16)
}

async fn respond(axum::Json(body): axum::Json<serde_json::Value>) -> axum::response::Response {
    let model = body["model"].as_str().unwrap_or("fast").to_owned();
    if let Some(pace) = pace() {
        return respond_paced(model, pace);
    }
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        serde_json::json!({
            "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let mut out = String::new();
    let mut push = |v: serde_json::Value| out.push_str(&event(&v));
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

/// One event, `data: {chunk}` and its blank line.
fn event(v: &serde_json::Value) -> String {
    format!("data: {v}\n\n")
}

/// The answer as a model streams it: the role, the first token at once, each further token
/// `pace` later, every token's text the time it was written (`t<ns>`), then the finish, usage and
/// `[DONE]`.
fn respond_paced(model: String, pace: Duration) -> axum::response::Response {
    let chunk = move |delta: serde_json::Value, finish: serde_json::Value| {
        serde_json::json!({
            "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let body = async_stream::stream! {
        yield Ok::<_, std::convert::Infallible>(event(&chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            serde_json::Value::Null,
        )));
        for i in 0..tokens() {
            if i > 0 {
                tokio::time::sleep(pace).await;
            }
            let text = format!("t{} ", now_ns());
            yield Ok(event(&chunk(serde_json::json!({"content": text}), serde_json::Value::Null)));
        }
        let mut end = event(&chunk(serde_json::json!({}), serde_json::json!("stop")));
        end.push_str(&event(&serde_json::json!({
            "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0,
            "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens(), "total_tokens": 8 + tokens()},
        })));
        end.push_str("data: [DONE]\n\n");
        yield Ok(end);
    };
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
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

/// What one path's requests measured: each whole request, and with `--pace-ms` each request's
/// time to its first token and each token's delay from being written to being read.
#[derive(Default)]
struct Sample {
    whole: Vec<Duration>,
    first_token: Vec<Duration>,
    token: Vec<Duration>,
}

impl Sample {
    fn extend(&mut self, other: Sample) {
        self.whole.extend(other.whole);
        self.first_token.extend(other.first_token);
        self.token.extend(other.token);
    }

    fn sort(&mut self) {
        self.whole.sort();
        self.first_token.sort();
        self.token.sort();
    }
}

/// The responder's stamps (`"content":"t<ns>`) in the complete lines at the front of `buf`,
/// which keeps the unfinished rest for the next read.
fn stamps(buf: &mut Vec<u8>, mut found: impl FnMut(u64)) {
    const MARK: &[u8] = b"\"content\":\"t";
    let Some(end) = buf.iter().rposition(|&b| b == b'\n') else {
        return;
    };
    let mut rest = &buf[..end];
    while let Some(at) = rest.windows(MARK.len()).position(|w| w == MARK) {
        rest = &rest[at + MARK.len()..];
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if let Some(t) = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
        {
            found(t);
        }
    }
    buf.drain(..=end);
}

async fn load(url: &str, concurrency: usize, total: usize) -> Sample {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let body = serde_json::json!({
        "model": "fast", "stream": true, "max_tokens": tokens(),
        "messages": [{"role": "user", "content": "hello"}],
    });
    let per = total.div_ceil(concurrency);
    let workers = (0..concurrency).map(|i| {
        let (client, body, url) = (client.clone(), body.clone(), url.to_owned());
        tokio::spawn(async move {
            // Paced streams start spread over one answer's length, so that requests and tokens
            // arrive spread out as from independent clients, not all in the same millisecond.
            if let Some(p) = pace() {
                let answer = p * (tokens() as u32).saturating_sub(1);
                tokio::time::sleep(answer * i as u32 / concurrency as u32).await;
            }
            let mut sample = Sample::default();
            let mut buf = Vec::new();
            for _ in 0..per {
                let t = Instant::now();
                let r = client.post(&url).json(&body).send().await.unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                let mut s = r.bytes_stream();
                let mut n = 0;
                let mut seen = 0;
                buf.clear();
                while let Some(b) = s.next().await {
                    let b = b.unwrap();
                    n += b.len();
                    if pace().is_some() {
                        buf.extend_from_slice(&b);
                        let now = now_ns();
                        stamps(&mut buf, |sent| {
                            if seen == 0 {
                                sample.first_token.push(t.elapsed());
                            }
                            seen += 1;
                            sample
                                .token
                                .push(Duration::from_nanos(now.saturating_sub(sent)));
                        });
                    }
                }
                assert!(n > 0);
                if pace().is_some() {
                    assert_eq!(seen, tokens(), "every token arrives, stamped");
                }
                sample.whole.push(t.elapsed());
            }
            sample
        })
    });
    let mut all = Sample::default();
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
    sample: Sample,
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
    if let Some(ms) = value("--pace-ms") {
        let ms: f64 = ms
            .parse()
            .expect("--pace-ms takes a number of milliseconds");
        PACE.set(Duration::from_secs_f64(ms / 1e3)).unwrap();
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
        // As every real server does: without it Nagle's algorithm holds each paced token back
        // until the client acknowledges the last one.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|t| {
            let _ = t.set_nodelay(true);
        });
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
    let mut litellm = value("--litellm").map(|exe| {
        let (mut child, addr) = spawn_litellm(exe, &upstream.to_string(), dir.path(), proxy_cpu);
        rt.block_on(wait_ready(&format!("{addr}/health/liveliness"), &mut child));
        (child, addr)
    });

    println!(
        "layout: {}; {} tokens an answer, {}",
        match proxy_cpu {
            Some(c) => format!(
                "split (each proxy on CPU {c}, load generator and responder on the other {c})"
            ),
            None => format!("shared (every process on all {cpus} CPUs)"),
        },
        tokens(),
        match pace() {
            Some(p) => format!("paced {:.1} ms apart", p.as_secs_f64() * 1e3),
            None => "all at once (saturation)".into(),
        }
    );
    let peer = if litellm.is_some() {
        " | LiteLLM adds the same, CPU/req (us) | ratios"
    } else {
        ""
    };
    match pace() {
        None => println!(
            "streams | direct p50 / p99 (ms) | floor adds p50 / p99 (ms), CPU/req (us) | experient adds p50 / p99 (ms), CPU/req (us){peer}"
        ),
        Some(_) => println!(
            "streams | direct first token, token delay p50 / p99 (ms) | floor adds the same, CPU/req (us) | experient adds the same, CPU/req (us){peer}"
        ),
    }
    for concurrency in [1usize, 16, 64] {
        let path = |url: String, pid: Option<u32>| Path {
            url,
            pid,
            sample: Sample::default(),
            cpu: Duration::ZERO,
        };
        let mut paths = vec![
            path(format!("http://{upstream}/v1/chat/completions"), None),
            path(
                format!("{floor_addr}/v1/chat/completions"),
                Some(floor.id()),
            ),
            path(
                format!("{experient_addr}/v1/chat/completions"),
                Some(experient.id()),
            ),
        ];
        if let Some((child, addr)) = &litellm {
            paths.push(path(
                format!("{addr}/v1/chat/completions"),
                Some(child.id()),
            ));
        }
        // Interleaved rounds, so that a noisy spell on the machine lands on every path alike.
        // Paced answers take tokens x pace each, so those rounds are far fewer requests.
        let (rounds, per_round) = match (pace(), concurrency) {
            (None, 1) => (4, 1000),
            (None, c) => (4, c * 100),
            (Some(_), c) => (4, (c * 4).max(25)),
        };
        rt.block_on(async {
            // Warm every path (connection pools, allocators) before measuring.
            for p in &paths {
                load(&p.url, concurrency, concurrency * 4).await;
            }
            for _ in 0..rounds {
                for p in &mut paths {
                    let before = p.pid.and_then(cpu_time);
                    p.sample.extend(load(&p.url, concurrency, per_round).await);
                    if let (Some(b), Some(a)) = (before, p.pid.and_then(cpu_time)) {
                        p.cpu += a - b;
                    }
                }
            }
        });
        for p in &mut paths {
            p.sample.sort();
        }
        let ms = |x: Duration| x.as_secs_f64() * 1e3;
        let q = |v: &[Duration], at: f64| ms(percentile(v, at));
        let [direct, proxies @ ..] = &paths[..] else {
            unreachable!("the direct path is always first")
        };
        let mut line = format!("{concurrency:>7}");
        let measures: &[fn(&Sample) -> &[Duration]] = match pace() {
            None => &[|s| &s.whole],
            Some(_) => &[|s| &s.first_token, |s| &s.token],
        };
        for m in measures {
            let v = m(&direct.sample);
            line += &format!(" | {:>7.3} / {:>7.3}", q(v, 0.5), q(v, 0.99));
        }
        for p in proxies {
            line += " |";
            for m in measures {
                let (d, v) = (m(&direct.sample), m(&p.sample));
                line += &format!(
                    " {:>7.3} / {:>7.3},",
                    q(v, 0.5) - q(d, 0.5),
                    q(v, 0.99) - q(d, 0.99)
                );
            }
            line += &format!(
                " {:>4.0}",
                p.cpu.as_secs_f64() * 1e6 / p.sample.whole.len() as f64
            );
        }
        if let [_, _, exp, lite] = &paths[..] {
            let added = |p: &Path| q(&p.sample.whole, 0.5) - q(&direct.sample.whole, 0.5);
            let cpu = |p: &Path| p.cpu.as_secs_f64() / p.sample.whole.len() as f64;
            line += &format!(
                " | experient/LiteLLM: added p50 {:.3}x, CPU/req {:.3}x",
                added(exp) / added(lite),
                cpu(exp) / cpu(lite)
            );
        }
        println!("{line}");
    }
    let litellm = litellm.as_mut().map(|(child, _)| child);
    for child in [Some(&mut experient), Some(&mut floor), litellm]
        .into_iter()
        .flatten()
    {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Starts LiteLLM's proxy in front of the responder: one worker, no logging, as light as it
/// is configured to go; returns the process and its base URL.
fn spawn_litellm(
    exe: &str,
    upstream: &str,
    dir: &std::path::Path,
    cpu: Option<usize>,
) -> (Child, String) {
    let config = dir.join("litellm.yaml");
    std::fs::write(
        &config,
        format!(
            "model_list:\n  - model_name: fast\n    litellm_params:\n      model: openai/fast\n      \
             api_base: http://{upstream}/v1\n      api_key: sk-none\n\
             litellm_settings:\n  set_verbose: false\n  telemetry: false\n"
        ),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let mut cmd = Command::new(exe);
    cmd.args(["--config"])
        .arg(&config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--num_workers", "1"])
        .env("LITELLM_LOG", "ERROR")
        // The bench sends no key to any path (experient runs without keys on loopback too).
        .env(
            "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY",
            "true",
        )
        .env("LITELLM_MODE", "PRODUCTION")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(cpu) = cpu {
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only calls sched_setaffinity, which is async-signal-safe.
        unsafe { cmd.pre_exec(move || pin(&[cpu])) };
    }
    (cmd.spawn().unwrap(), format!("http://127.0.0.1:{port}"))
}

/// Polls `url` until it answers 200 (LiteLLM takes seconds to import and start); panics if
/// `child` exits first.
async fn wait_ready(url: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("LiteLLM exited before serving ({status}); run it by hand to see why");
        }
        if let Ok(r) = reqwest::get(url).await {
            if r.status().is_success() {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("{url} never answered");
}
