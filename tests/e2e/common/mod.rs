//! Starting real `experient` processes for the tests, and clients that talk to them.
#![allow(dead_code)]

pub mod lcg;
pub mod learning;
pub mod postgres;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use async_openai::config::OpenAIConfig;
use async_openai::Client;

pub const MODEL: &str = "smollm2-135m";

/// A server process. It is killed when the value is dropped (each holds its models: the
/// suite's servers, left running until the test binary exits, would fill the machine's
/// memory), and dies with the test process (PR_SET_PDEATHSIG), so a failed or interrupted
/// test run never leaves servers behind.
pub struct Server {
    pub base: String,
    pub pid: u32,
    pub dir: tempfile::TempDir,
}

impl Server {
    pub fn client(&self) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(format!("{}/v1", self.base))
                .with_api_key("unused"),
        )
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Kills the process and waits until it no longer answers, keeping its directory.
    pub fn kill(mut self, sig: i32) -> tempfile::TempDir {
        self.signal(sig);
        let deadline = Instant::now() + Duration::from_secs(30);
        while http_status(&self.url("/health")).is_ok() {
            assert!(Instant::now() < deadline, "server did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The port is closed; also wait for the process itself to be gone.
        while unsafe { libc::kill(self.pid as i32, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Gone and reaped: its pid may name another process now, which drop must not kill.
        self.pid = 0;
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"))
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.pid as i32, sig);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.pid != 0 {
            self.signal(libc::SIGKILL);
        }
    }
}

/// The server shared by the tests of one test binary: default model, no config.
pub fn shared() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| start(None, &[]))
}

/// Starts a server with an optional config file body and extra environment variables, waits
/// until `/health` says the model is loaded, and returns it.
pub fn start(config: Option<&str>, env: &[(&str, &str)]) -> Server {
    start_in(tempfile::tempdir().expect("tempdir"), config, env)
}

/// Like [`start`], in a given directory: its `experience/` subdirectory is the store, so a
/// second server started in the same directory sees what the first one wrote.
pub fn start_in(dir: tempfile::TempDir, config: Option<&str>, env: &[(&str, &str)]) -> Server {
    start_limited(dir, config, env, None)
}

/// Like [`start_in`], with the process's open-file limit (soft and hard) set to `nofile`.
pub fn start_limited(
    dir: tempfile::TempDir,
    config: Option<&str>,
    env: &[(&str, &str)],
    nofile: Option<u64>,
) -> Server {
    let mut args = vec![
        "serve".to_string(),
        "--addr".into(),
        "127.0.0.1:0".into(),
        "--experience-dir".into(),
        dir.path().join("experience").display().to_string(),
    ];
    if let Some(c) = config {
        let p = dir.path().join("config.toml");
        std::fs::write(&p, c).unwrap();
        args.push("--config".into());
        args.push(p.display().to_string());
    }
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The child is spawned from a thread that lives as long as the test process, because
    // PDEATHSIG fires when the spawning *thread* exits.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_experient"));
        cmd.args(&args)
            .envs(env)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if let Some(n) = nofile {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn experient");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(rest) = l.strip_prefix("experient: listening on ") {
                        break Some(rest.trim().to_string());
                    }
                }
                _ => break None,
            }
        };
        tx.send((base, child.id())).unwrap();
        // Keep draining stdout so the child never blocks on a full pipe.
        for _ in lines {}
        let _ = child.wait();
        loop {
            std::thread::park();
        }
    });
    let (base, pid) = rx.recv().unwrap();
    let base = base.expect("server exited before listening");
    wait_healthy(&base);
    Server { base, pid, dir }
}

fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while http_status(&format!("{base}/health")).ok() != Some(200) {
        assert!(Instant::now() < deadline, "server never became healthy");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A blocking GET on a plain socket that returns the status code: the helpers above run
/// outside any async runtime and must not start one.
pub fn http_status(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0))
}

/// Reads a Prometheus gauge or counter value (summed over label sets that match `filter`).
pub async fn metric(server: &Server, name: &str, filter: &str) -> f64 {
    let text = ::reqwest::get(server.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `experient ARGS --experience-dir DIR` with `env`, asserts that it succeeded, and returns
/// the JSON it printed.
pub fn cli_json(args: &[&str], dir: &std::path::Path, env: &[(&str, &str)]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_experient"))
        .args(args)
        .arg("--experience-dir")
        .arg(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "experient {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Sends `method url` with `body` as JSON and returns the status and the body: its JSON, or
/// its text as a JSON string when it is not JSON, or null when it is empty.
pub async fn call(
    method: &str,
    url: &str,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut req = ::reqwest::Client::new().request(method.parse().unwrap(), url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = match text.as_str() {
        "" => serde_json::Value::Null,
        t => serde_json::from_str(t).unwrap_or(serde_json::Value::String(text)),
    };
    (status, body)
}

/// POSTs `body` as JSON and returns the response body as text (a stream, read to its end).
#[allow(dead_code)]
/// The body of `GET url` as text.
pub async fn get_text(url: &str) -> String {
    ::reqwest::get(url).await.unwrap().text().await.unwrap()
}

pub async fn post_text(url: &str, body: &serde_json::Value) -> String {
    ::reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Parses an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            let data: Vec<&str> = ev
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// Posts a chat request as a stream (with the usage chunk) and returns its chunks, after
/// checking that the stream ends with `[DONE]`.
#[allow(dead_code)]
pub async fn stream_chunks(server: &Server, mut body: serde_json::Value) -> Vec<serde_json::Value> {
    body["stream"] = serde_json::json!(true);
    body["stream_options"] = serde_json::json!({"include_usage": true});
    let text = post_text(&server.url("/v1/chat/completions"), &body).await;
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}
