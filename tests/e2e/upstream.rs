//! experient in front of other OpenAI-compatible servers. Every upstream here is a second real
//! experient process serving the embedded model on loopback, so both sides speak real HTTP:
//! chat and streaming through the proxy, upstream errors passed on, an upstream killed before
//! a request and in the middle of a stream, a slow upstream hitting the first-byte timeout,
//! fallback to another upstream, and upstream API keys.

use crate::common;

use std::time::Duration;

use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures::StreamExt;
use serde_json::{json, Value};

use crate::common::{sse_data, Server, MODEL};

fn request(model: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Name three colours.")
            .build()
            .unwrap()
            .into()])
        .max_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap()
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Setup {
    front: Server,
    /// The upstream everything healthy goes to.
    up: Server,
    /// An upstream the tests kill.
    doomed: Option<Server>,
    /// An upstream with one generation slot and an API key.
    slow: Server,
}

fn setup() -> Setup {
    let up = common::start(None, &[]);
    let doomed = common::start(None, &[]);
    let slow = common::start(
        Some("[[models]]\nkind = \"local\"\nid = \"smollm2-135m\"\nmax_concurrent = 1\n"),
        &[("EXPERIENT_API_KEYS", "upstream-secret")],
    );
    let dead = dead_port();
    let config = format!(
        r#"
[[models]]
kind = "upstream"
id = "up"
base_url = "{up}/v1"
model = "{MODEL}"

[[models]]
kind = "upstream"
id = "broken"
base_url = "{up}/v1"
model = "no-such-model"

[[models]]
kind = "upstream"
id = "doomed"
base_url = "{doomed}/v1"
model = "{MODEL}"
max_retries = 1

[[models]]
kind = "upstream"
id = "dead"
base_url = "http://127.0.0.1:{dead}/v1"
max_retries = 2
fallback = ["up"]

[[models]]
kind = "upstream"
id = "slow"
base_url = "{slow}/v1"
model = "{MODEL}"
api_key_env = "SLOW_KEY"
first_byte_timeout_secs = 1.5
max_retries = 0

[[models]]
kind = "upstream"
id = "nokey"
base_url = "{slow}/v1"
model = "{MODEL}"
"#,
        up = up.base,
        doomed = doomed.base,
        slow = slow.base,
    );
    let front = common::start(Some(&config), &[("SLOW_KEY", "upstream-secret")]);
    Setup {
        front,
        up,
        doomed: Some(doomed),
        slow,
    }
}

async fn post(server: &Server, body: Value) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn experient_in_front_of_upstreams() {
    let mut s = setup();

    // The proxy lists its aliases.
    let models = s.front.client().models().list().await.unwrap();
    let ids: Vec<&str> = models.data.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "up",
            "broken",
            "doomed",
            "dead",
            "slow",
            "nokey",
            "all-minilm-l6-v2"
        ]
    );

    // Through the proxy, greedy text is what the upstream itself says.
    let direct =
        s.up.client()
            .chat()
            .create(request(MODEL, 12))
            .await
            .unwrap();
    let proxied = s
        .front
        .client()
        .chat()
        .create(request("up", 12))
        .await
        .unwrap();
    assert_eq!(
        proxied.choices[0].message.content, direct.choices[0].message.content,
        "{proxied:?}"
    );
    assert_eq!(proxied.model, "up");
    let (du, pu) = (direct.usage.unwrap(), proxied.usage.unwrap());
    assert_eq!(
        (pu.prompt_tokens, pu.completion_tokens),
        (du.prompt_tokens, du.completion_tokens)
    );

    // response_format goes upstream, where the second experient holds decoding to the schema;
    // the proxied answer is the upstream's own.
    let rf = json!({"type": "json_schema", "json_schema": {"name": "pick", "schema": {
        "type": "object",
        "properties": {"colour": {"type": "string", "maxLength": 20}},
        "required": ["colour"],
        "additionalProperties": false,
    }}});
    let body = |model: &str| {
        json!({"model": model, "max_tokens": 60, "temperature": 0, "response_format": rf,
               "messages": [{"role": "user", "content": "Name a colour as JSON."}]})
    };
    let (status, via) = post(&s.front, body("up")).await;
    assert_eq!(status, 200, "{via}");
    let (_, own) = post(&s.up, body(MODEL)).await;
    let content = |t: &str| {
        let v: Value = serde_json::from_str(t).unwrap();
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(content(&via), content(&own));
    let doc: Value = serde_json::from_str(&content(&via)).expect("JSON through the proxy");
    assert!(
        doc["colour"].is_string() && doc.as_object().unwrap().len() == 1,
        "{doc}"
    );

    // Streaming: chunk by chunk, one id, a finish reason from OpenAI's set, then usage.
    let mut req = request("up", 12);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    // The crate's `byot` feature (enabled in Cargo.toml; tests/plan.rs sends raw bodies)
    // leaves setting `stream` to the caller.
    req.stream = Some(true);
    let mut stream = s.front.client().chat().create_stream(req).await.unwrap();
    let (mut text, mut ids, mut finish, mut usage) = (String::new(), vec![], None, None);
    let mut seen = vec![];
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        seen.push(format!("{chunk:?}"));
        ids.push(chunk.id.clone());
        for c in &chunk.choices {
            text.push_str(c.delta.content.as_deref().unwrap_or(""));
            if c.finish_reason.is_some() {
                finish = c.finish_reason;
            }
        }
        if chunk.usage.is_some() {
            usage = chunk.usage;
        }
    }
    assert_eq!(Some(text), direct.choices[0].message.content, "{seen:#?}");
    assert!(ids.len() > 3 && ids.iter().all(|i| *i == ids[0]));
    assert!(finish.is_some());
    assert_eq!(usage.unwrap().completion_tokens, du.completion_tokens);

    // A client that goes away cancels the upstream's generation too.
    let response = reqwest::Client::new()
        .post(s.front.url("/v1/chat/completions"))
        .json(
            &json!({"model": "up", "max_tokens": 400, "temperature": 0, "stream": true,
               "messages": [{"role": "user", "content": "Write a long story about a ship."}]}),
        )
        .send()
        .await
        .unwrap();
    let mut bytes = response.bytes_stream();
    for _ in 0..3 {
        bytes.next().await.unwrap().unwrap();
    }
    assert_eq!(
        common::metric(&s.up, "experient_inflight_sequences", "").await,
        1.0
    );
    drop(bytes);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while common::metric(&s.up, "experient_inflight_sequences", "").await != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream kept generating for a client that left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Methods apply in front of an upstream: a library's prior goes along.
    let lib = reqwest::Client::new()
        .post(s.front.url("/v1/libraries"))
        .json(&json!({"name": "colours"}))
        .send()
        .await
        .unwrap();
    assert_eq!(lib.status(), 201);
    reqwest::Client::new()
        .post(s.front.url("/v1/libraries/colours/experiences"))
        .json(&json!({"text": "Lists: answer with a short comma-separated list."}))
        .send()
        .await
        .unwrap();
    let (status, body) = post(
        &s.front,
        json!({"model": "up@colours", "max_tokens": 4, "temperature": 0,
               "messages": [{"role": "user", "content": "Name three colours."}]}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["experient"]["experiences"], json!(["E1"]));

    // An upstream 4xx reaches the client with the upstream's status and message.
    let (status, body) = post(
        &s.front,
        json!({"model": "broken", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 404, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{e}"
    );
    for k in ["message", "type", "param", "code"] {
        assert!(e["error"].get(k).is_some(), "{e}");
    }

    // Upstream API keys: the configured one is sent; without it the upstream's 401 comes back.
    let ok = s.front.client().chat().create(request("slow", 2)).await;
    assert!(ok.is_ok(), "{ok:?}");
    let (status, body) = post(
        &s.front,
        json!({"model": "nokey", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 401, "{body}");

    // Fallback: nothing listens behind "dead", so after its retries "up" answers.
    let fell = s
        .front
        .client()
        .chat()
        .create(request("dead", 12))
        .await
        .unwrap();
    assert_eq!(
        fell.choices[0].message.content,
        direct.choices[0].message.content
    );
    assert!(common::metric(&s.front, "experient_fallbacks_total", "dead").await >= 1.0);

    // A slow upstream: its one slot is busy, so nothing comes within the first-byte timeout.
    let hog = {
        let slow = s.slow.base.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{slow}/v1/chat/completions"))
                .bearer_auth("upstream-secret")
                .json(&json!({"model": MODEL, "max_tokens": 400, "temperature": 0,
                       "messages": [{"role": "user", "content": "Write a long story."}]}))
                .send()
                .await
                .unwrap()
                .text()
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = std::time::Instant::now();
    let (status, body) = post(
        &s.front,
        json!({"model": "slow", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert!(t.elapsed() < Duration::from_secs(10));
    hog.abort();

    // Killed in the middle of a stream: the client gets an error event, then [DONE].
    let response = reqwest::Client::new()
        .post(s.front.url("/v1/chat/completions"))
        .json(
            &json!({"model": "doomed", "max_tokens": 300, "temperature": 0, "stream": true,
               "messages": [{"role": "user", "content": "Write a long story about a ship."}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = String::new();
    let mut bytes = response.bytes_stream();
    while !body.contains("\"content\"") {
        body.push_str(&String::from_utf8_lossy(
            &bytes.next().await.unwrap().unwrap(),
        ));
    }
    let doomed = s.doomed.take().unwrap();
    let pid = doomed.pid;
    drop(doomed.kill(libc::SIGKILL));
    while let Some(b) = bytes.next().await {
        body.push_str(&String::from_utf8_lossy(&b.unwrap()));
    }
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let err: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        err["error"]["message"].is_string(),
        "{body} (upstream pid {pid})"
    );
    assert!(!body.contains("\"finish_reason\":\"stop\""), "{body}");

    // Killed before a request: after its retries, 503 in the envelope.
    let (status, body) = post(
        &s.front,
        json!({"model": "doomed", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(status, 503, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert!(e["error"]["message"]
        .as_str()
        .unwrap()
        .contains("cannot be reached"));

    // The proxy is unharmed.
    assert_eq!(common::http_status(&s.front.url("/health")).unwrap(), 200);
}

#[test]
fn config_errors_name_the_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[models]]\nkind = \"upstream\"\nid = \"a\"\nbase_url = \"not a url\"\n", "models[0].base_url"),
        ("[[models]]\nkind = \"upstream\"\nid = \"a\"\nbase_url = \"http://x/v1\"\nfallback = [\"b\"]\n", "models[0].fallback[0]"),
        ("[[models]]\nkind = \"upstream\"\nid = \"a\"\nbase_url = \"http://x/v1\"\napi_key_env = \"EXPERIENT_TEST_UNSET_KEY\"\n", "models[0].api_key_env"),
        ("[[models]]\nkind = \"upstream\"\nid = \"a\"\nbase_url = \"http://x/v1\"\ntotal_timeout_secs = 0\n", "models[0].total_timeout_secs"),
        ("[[models]]\nkind = \"upstream\"\nid = \"a\"\nbase_url = \"http://x/v1\"\nretries = 3\n", "unknown field `retries`"),
    ];
    for (i, (config, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_experient"))
            .args(["serve", "--addr", "127.0.0.1:0", "--config"])
            .arg(&path)
            .arg("--experience-dir")
            .arg(dir.path().join("exp"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(path.to_str().unwrap()) && err.contains(want),
            "case {i}: {err}"
        );
    }
}
