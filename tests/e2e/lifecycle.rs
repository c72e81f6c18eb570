//! Server behaviour over time: cancellation, overload, deadlines and shutdown. Each test runs
//! its own server, so that gauges and queues are not shared with other tests.

use crate::common;

use std::time::Duration;

use crate::common::{metric, start, Server, MODEL};
use futures::StreamExt;
use serde_json::{json, Value};

/// Token ids of SmolLM2's end-of-text and end-of-turn tokens; biasing them away makes the
/// model generate until `max_tokens`.
fn long_generation(stream: bool) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}],
           "max_tokens": 4000, "logit_bias": {"0": -100, "2": -100}, "stream": stream})
}

async fn post(server: &Server, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn wait_for_idle(server: &Server, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let n = metric(server, "experient_inflight_sequences", "").await;
        if n == 0.0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {n} sequences still generating"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_generation() {
    let server = start(None, &[]);
    // Streaming: read a few chunks of a long generation, then drop the connection.
    let resp = post(&server, &long_generation(true)).await;
    let mut body = resp.bytes_stream();
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    assert_eq!(
        metric(&server, "experient_inflight_sequences", "").await,
        1.0
    );
    drop(body);
    wait_for_idle(&server, "after a streaming client left").await;

    // Non-streaming: the client gives up after a moment.
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .timeout(Duration::from_millis(1500))
        .json(&long_generation(false))
        .send()
        .await;
    assert!(
        r.is_err(),
        "the request was meant to time out on the client"
    );
    wait_for_idle(&server, "after a non-streaming client left").await;

    // The model still serves normally afterwards.
    let r = post(
        &server,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn overload_gets_429_with_retry_after() {
    let server = start(
        Some(
            "[[models]]\nkind = \"local\"\nid = \"smollm2-135m\"\nmax_concurrent = 1\nqueue = 0\n",
        ),
        &[],
    );
    let busy = post(&server, &long_generation(true)).await;
    assert_eq!(busy.status(), 200);
    let mut busy = busy.bytes_stream();
    busy.next().await.unwrap().unwrap();
    let r = post(
        &server,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "rate_limit_error");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    drop(busy);
    wait_for_idle(&server, "after the busy client left").await;
    let r = post(
        &server,
        &json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(
        r.status(),
        200,
        "capacity is back once the first request is gone"
    );
}

#[tokio::test]
async fn non_streaming_work_is_bounded_by_the_timeout() {
    let server = start(Some("[server]\nrequest_timeout_secs = 1\n"), &[]);
    let r = post(&server, &long_generation(false)).await;
    assert_eq!(r.status(), 504);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout");
    wait_for_idle(&server, "after the deadline").await;
}

#[tokio::test]
async fn sigterm_finishes_in_flight_work_then_exits() {
    let server = start(Some("[server]\nshutdown_grace_secs = 30\n"), &[]);
    let req = json!({"model": MODEL, "messages": [{"role": "user", "content": "Tell a story."}],
                     "max_tokens": 40, "logit_bias": {"0": -100, "2": -100}});
    let url = server.url("/v1/chat/completions");
    let inflight = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .json(&req)
            .send()
            .await
            .unwrap()
    });
    // Let the request reach the engine, then ask the server to stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while metric(&server, "experient_inflight_sequences", "").await < 1.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.signal(libc::SIGTERM);
    let r = inflight.await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "in-flight work finishes during the grace period"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 40);
    // Then the process goes away and stops accepting connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::http_status(&server.url("/health")).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "server still answering after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A model that cannot load would leave a server answering 503 forever; it stops instead,
/// saying which model and why, with a failing exit status.
#[test]
fn a_model_that_cannot_load_stops_the_server_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    // A file that exists, so the config is accepted, but holds no model.
    let gguf = dir.path().join("model.gguf");
    std::fs::write(&gguf, "this is not a GGUF file").unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[[models]]\nkind = \"local\"\nid = \"broken\"\ngguf = \"{}\"\n",
            gguf.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_experient"))
        .args(["serve", "--addr", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--experience-dir")
        .arg(dir.path().join("experience"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the server kept running with a model that cannot load");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("loading model 'broken' from") && stderr.contains("failed"),
        "{stderr}"
    );
}
