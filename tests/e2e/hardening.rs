//! The attacks of the hardening review, replayed against the real server: each of these once
//! aborted the process, starved it, or reached what it should not.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{start, start_in, start_limited, Server, MODEL};
use serde_json::{json, Value};

async fn call(server: &Server, method: &str, path: &str, body: Value) -> (u16, Value) {
    crate::common::call(method, &server.url(path), Some(&body)).await
}

fn param(v: &Value) -> &str {
    v["error"]["param"].as_str().unwrap_or_default()
}

fn chat_body(model: &str, experient: Value) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Say yes."}],
        "max_tokens": 1,
        "temperature": 0,
        "experient": experient,
    })
}

#[tokio::test]
async fn counts_past_the_bounds_are_refused_and_the_server_lives() {
    let server = start(None, &[]);
    let (s, _) = call(&server, "POST", "/v1/libraries", json!({"name": "lib"})).await;
    assert_eq!(s, 201);
    let huge = json!(100_000_000_000_000u64);
    let (s, v) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        chat_body(&format!("{MODEL}@lib"), json!({"experiences": huge})),
    )
    .await;
    assert_eq!((s, param(&v)), (400, "experient.experiences"), "{v}");
    let (s, v) = call(
        &server,
        "PATCH",
        "/v1/libraries/lib",
        json!({"inject": "top_k", "top_k": huge}),
    )
    .await;
    assert_eq!((s, param(&v)), (400, "top_k"), "{v}");
    let (s, v) = call(
        &server,
        "POST",
        "/v1/libraries",
        json!({"name": "other", "settings": {"inject": "top_k", "top_k": huge}}),
    )
    .await;
    assert_eq!((s, param(&v)), (400, "top_k"), "{v}");
    assert_eq!(
        call(&server, "GET", "/v1/libraries/other", json!(null))
            .await
            .0,
        404
    );

    let tasks = json!([{"question": "1+1?", "answer": "2"}]);
    for (field, value) in [
        ("group_size", json!(1_000_000_000)),
        ("epochs", json!(1_000_000_000)),
        ("concurrency", json!(500)),
        ("retries", json!(1_000_000)),
        ("batch_size", json!(1_000_000_000)),
        ("max_lessons", json!(1_000_000)),
    ] {
        let mut body = json!({"tasks": tasks});
        body[field] = value;
        let (s, v) = call(&server, "POST", "/v1/libraries/lib/learn", body).await;
        assert_eq!((s, param(&v)), (400, field), "{v}");
    }
    // A task file that never ends is refused before a byte is read, not read until memory
    // runs out (or, once, to the 256 MiB bound).
    let t = Instant::now();
    let (s, v) = call(
        &server,
        "POST",
        "/v1/libraries/lib/learn",
        json!({"dataset": "/dev/zero"}),
    )
    .await;
    assert_eq!((s, param(&v)), (400, "dataset"), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a regular file"),
        "{v}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // Within the bounds, the same library serves.
    let (s, v) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        chat_body(&format!("{MODEL}@lib"), json!({"experiences": 256})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(common::http_status(&server.url("/health")).unwrap(), 200);
}

fn write_library(root: &Path, name: &str, log: &[u8], settings: Option<Value>) {
    let dir = root.join("experience").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("log.jsonl"), log).unwrap();
    if let Some(s) = settings {
        std::fs::write(dir.join("library.json"), s.to_string()).unwrap();
    }
}

fn version_line(version: u64, ops: Value) -> String {
    json!({"version": version, "at": "2026-01-01T00:00:00Z", "message": "m", "ops": ops})
        .to_string()
        + "\n"
}

#[tokio::test]
async fn damaged_or_oversized_libraries_on_disk_do_not_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let add = |id: &str, text: &str| json!([{"op": "add", "id": id, "text": text, "tags": [], "source": "manual"}]);
    // A torn last line that ends inside a multi-byte character: once "stream did not contain
    // valid UTF-8" and no server.
    let mut torn = version_line(0, json!([])) + &version_line(1, add("E1", "Kept lesson."));
    let cut = version_line(2, add("E2", "Ünïcödé lesson"));
    let at = cut.find('Ü').unwrap() + 1;
    let mut torn_bytes = torn.clone().into_bytes();
    torn_bytes.extend_from_slice(&cut.as_bytes()[..at]);
    write_library(dir.path(), "torn", &torn_bytes, None);
    // Damage in the middle: refused alone, left as it is.
    torn = version_line(0, json!([])) + "{not json\n" + &version_line(2, add("E1", "x"));
    write_library(dir.path(), "broken", torn.as_bytes(), None);
    // A top_k written by hand past the bound: clamped, not trusted.
    write_library(
        dir.path(),
        "wide",
        (version_line(0, json!([])) + &version_line(1, add("E1", "Say yes when asked.")))
            .as_bytes(),
        Some(json!({"inject": "top_k", "top_k": 100_000_000_000_000u64})),
    );
    let server = start_in(dir, None, &[]);

    let (s, v) = call(
        &server,
        "GET",
        "/v1/libraries/torn/experiences",
        json!(null),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    let (s, v) = call(&server, "GET", "/v1/libraries/broken", json!(null)).await;
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("damaged"),
        "{v}"
    );
    let (_, list) = call(&server, "GET", "/v1/libraries", json!(null)).await;
    let broken = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "broken");
    assert_eq!(broken.unwrap()["status"], "damaged");
    assert_eq!(
        call(&server, "POST", "/v1/libraries", json!({"name": "broken"}))
            .await
            .0,
        409
    );
    let (s, v) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        chat_body(&format!("{MODEL}@wide"), json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["experient"]["experiences"], json!(["E1"]));
}

#[tokio::test]
async fn only_the_stored_spelling_of_an_id_is_found() {
    let server = start(None, &[]);
    call(&server, "POST", "/v1/libraries", json!({"name": "ids"})).await;
    for text in ["First lesson.", "Second lesson."] {
        let (s, _) = call(
            &server,
            "POST",
            "/v1/libraries/ids/experiences",
            json!({"text": text}),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (s, v) = call(
        &server,
        "PATCH",
        "/v1/libraries/ids/experiences/E01",
        json!({"text": "Changed."}),
    )
    .await;
    assert_eq!((s, param(&v)), (404, "id"), "{v}");
    let (s, _) = call(
        &server,
        "DELETE",
        "/v1/libraries/ids/experiences/E+2",
        json!(null),
    )
    .await;
    assert_eq!(s, 404);
    let (s, _) = call(
        &server,
        "GET",
        "/v1/libraries/ids/experiences/E01",
        json!(null),
    )
    .await;
    assert_eq!(s, 404);
    let (_, hits) = call(
        &server,
        "GET",
        "/v1/libraries/ids/experiences?q=lesson",
        json!(null),
    )
    .await;
    let texts: Vec<&str> = hits["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 2, "{hits}");
    assert!(texts.contains(&"First lesson.") && texts.contains(&"Second lesson."));
}

/// Reads until the server closes the socket or `within` passes; true when it closed.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn idle_and_slow_clients_cannot_starve_the_others() {
    let config =
        "[server]\nheader_read_timeout_secs = 2\nidle_timeout_secs = 3\nmax_connections = 200\n";
    let server = start_limited(tempfile::tempdir().unwrap(), Some(config), &[], Some(700));
    let host = server.base.trim_start_matches("http://").to_owned();
    // More idle sockets than the connection cap, and slow clients that send a header byte at
    // a time: once 283 such sockets under this limit made /health and writes time out.
    let mut idle: Vec<TcpStream> = (0..500)
        .map(|_| TcpStream::connect(&host).unwrap())
        .collect();
    let mut slow: Vec<TcpStream> = (0..40)
        .map(|_| {
            let mut s = TcpStream::connect(&host).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let t = Instant::now();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let health = http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let created = http
        .post(server.url("/v1/libraries"))
        .json(&json!({"name": "w"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status().as_u16(), 201);
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
    // The server closed the dawdlers, slow or silent.
    for s in slow.iter_mut().take(5) {
        let _ = s.write_all(b"X-Slow: 1\r\n");
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "a slow client was kept"
        );
    }
    for s in idle.iter_mut().take(5) {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "an idle client was kept"
        );
    }
    // A client that keeps its connection busy is not cut off: one request at a time on one
    // kept-alive connection, for longer than the idle timeout.
    let mut s = TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..5 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .starts_with("HTTP/1.1 200"));
        std::thread::sleep(Duration::from_millis(800));
    }
}

/// Runs `experient serve` as a deployment would and returns what it printed before it listened
/// or exited, and whether it listened.
fn serve_once(args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_experient"))
        .arg("serve")
        .args(args)
        .arg("--experience-dir")
        .arg(dir.path().join("experience"))
        .env_remove("EXPERIENT_API_KEYS")
        .env_remove("EXPERIENT_ADMIN_KEYS")
        .env_remove("EXPERIENT_ALLOW_UNAUTHENTICATED")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    while !out.contains("listening on") && stdout.read(&mut byte).unwrap_or(0) == 1 {
        out.push(byte[0] as char);
    }
    let listened = out.contains("listening on");
    let _ = child.kill();
    let _ = child.wait();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (listened, out + &err)
}

#[test]
fn listening_beyond_loopback_needs_keys_or_an_explicit_yes() {
    let (listened, out) = serve_once(&["--addr", "0.0.0.0:0"], &[]);
    assert!(!listened);
    assert!(
        out.contains("refusing to listen") && out.contains("--allow-unauthenticated"),
        "{out}"
    );
    let (listened, out) = serve_once(&["--addr", "0.0.0.0:0", "--allow-unauthenticated"], &[]);
    assert!(listened && out.contains("WARNING"), "{out}");
    let (listened, out) = serve_once(&["--addr", "0.0.0.0:0"], &[("EXPERIENT_ADMIN_KEYS", "k")]);
    assert!(listened, "{out}");
    let (listened, _) = serve_once(&["--addr", "127.0.0.1:0"], &[]);
    assert!(listened);
}

#[tokio::test]
async fn a_learning_job_steps_aside_for_a_client() {
    let server = start(None, &[]);
    call(&server, "POST", "/v1/libraries", json!({"name": "busy"})).await;
    let tasks: Vec<Value> = (1..=8)
        .map(|i| json!({"question": format!("Write a long story about the number {i}."), "answer": format!("{i}")}))
        .collect();
    let (s, job) = call(
        &server,
        "POST",
        "/v1/libraries/busy/learn",
        json!({"tasks": tasks, "epochs": 1, "group_size": 4, "concurrency": 4, "max_tokens": 256}),
    )
    .await;
    assert_eq!(s, 202, "{job}");
    // Wait until a learning rollout is being decoded.
    let t = Instant::now();
    while common::metric(&server, "experient_inflight_sequences", "").await < 1.0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job never started decoding"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let preemptions = "experient_background_preemptions_total";
    let before = common::metric(&server, preemptions, "").await;
    let (s, v) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        chat_body(MODEL, json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(
        common::metric(&server, preemptions, "").await > before,
        "the rollout in the engine was not cancelled for the client"
    );
    let id = job["id"].as_str().unwrap();
    let (_, state) = call(&server, "GET", &format!("/v1/jobs/{id}"), json!(null)).await;
    assert_eq!(
        state["status"], "running",
        "the job goes on after stepping aside"
    );
    call(&server, "DELETE", &format!("/v1/jobs/{id}"), json!(null)).await;
}
