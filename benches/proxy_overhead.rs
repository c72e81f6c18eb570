//! What experient adds in upstream mode, measured against calling the upstream directly in the
//! same run.
//!
//! The upstream is a minimal OpenAI-compatible responder in this file that streams a fixed
//! answer at once, so the proxy's cost is not hidden behind a model's. experient runs as its
//! real binary with an upstream config pointing at it. A load generator (reqwest) keeps 1, 16 and
//! 64 streams in flight, each request reading the whole SSE body, first straight at the
//! responder and then through experient, and reports the latency percentiles of both and
//! their difference.
//!
//!     cargo bench --bench proxy_overhead

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use axum::routing::post;
use futures::StreamExt;

const TOKENS: usize = 16;

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
    for _ in 0..TOKENS {
        push(chunk(
            serde_json::json!({"content": "tok "}),
            serde_json::Value::Null,
        ));
    }
    push(chunk(serde_json::json!({}), serde_json::json!("stop")));
    push(serde_json::json!({
        "id": "chatcmpl-fast", "object": "chat.completion.chunk", "created": 0, "model": model,
        "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": TOKENS, "total_tokens": 8 + TOKENS},
    }));
    out.push_str("data: [DONE]\n\n");
    ([("content-type", "text/event-stream")], out).into_response()
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
        "model": "fast", "stream": true, "max_tokens": TOKENS,
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
    all.sort();
    all
}

fn main() {
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_experient"))
        .args(["serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--experience-dir")
        .arg(dir.path().join("exp"))
        .env("EXPERIENT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let proxy = loop {
        let l = lines.next().expect("experient exited").unwrap();
        if let Some(rest) = l.strip_prefix("experient: listening on ") {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let direct_url = format!("http://{upstream}/v1/chat/completions");
    let proxy_url = format!("{proxy}/v1/chat/completions");
    println!(
        "streams | direct p50 / p99 (ms) | via experient p50 / p99 (ms) | added p50 / p99 (ms)"
    );
    for concurrency in [1usize, 16, 64] {
        let total = if concurrency == 1 { 2000 } else { 64 * 80 };
        rt.block_on(async {
            // Warm both paths (connection pools, allocator) before measuring.
            load(&direct_url, concurrency, concurrency * 4).await;
            load(&proxy_url, concurrency, concurrency * 4).await;
            let d = load(&direct_url, concurrency, total).await;
            let p = load(&proxy_url, concurrency, total).await;
            let ms = |x: Duration| x.as_secs_f64() * 1e3;
            let (d50, d99, p50, p99) = (
                percentile(&d, 0.5),
                percentile(&d, 0.99),
                percentile(&p, 0.5),
                percentile(&p, 0.99),
            );
            println!(
                "{concurrency:>7} | {:>8.3} / {:>8.3} | {:>8.3} / {:>8.3} | {:>7.3} / {:>7.3}",
                ms(d50),
                ms(d99),
                ms(p50),
                ms(p99),
                ms(p50) - ms(d50),
                ms(p99) - ms(d99),
            );
        });
    }
    let _ = child.kill();
    let _ = child.wait();
}
