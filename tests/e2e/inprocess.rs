//! The server in-process (`server::run`) on a scripted backend: wire format, stream framing,
//! envelopes, auth and routing, through the real HTTP stack and a real OpenAI client, with no
//! model to load. Each test starts its own server in milliseconds.

use std::sync::Arc;

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use experient::backend::scripted::{Script, Scripted};
use experient::backend::Role;
use experient::config::Config;
use experient::experience::{Store, StoreOptions};
use futures::StreamExt;
use serde_json::{json, Value};

pub(crate) struct Server {
    pub(crate) base: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
    pub(crate) dir: tempfile::TempDir,
}

impl Server {
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn client(&self, key: &str) -> Client<OpenAIConfig> {
        Client::with_config(
            OpenAIConfig::new()
                .with_api_base(self.url("/v1"))
                .with_api_key(key),
        )
    }

    /// Signals shutdown and waits for `run` to return.
    pub(crate) async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.done.await.unwrap().unwrap();
    }
}

/// `server::run` on an ephemeral port with `backend` as model "m", the given keys, and a
/// store holding library "math" with two experiences.
async fn serve(backend: Arc<Scripted>, users: &[&str], admins: &[&str]) -> Server {
    let keys = experient::api::auth::Keys::new(users.iter().copied(), admins.iter().copied());
    serve_with(backend, keys, Config::default()).await
}

/// Like [`serve`], with the keys and the configuration given.
pub(crate) async fn serve_with(
    backend: Arc<Scripted>,
    keys: experient::api::auth::Keys,
    config: Config,
) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let experience_dir = dir.path().join("experience");
    let store = Store::open(&experience_dir, StoreOptions::default()).unwrap();
    store.create("math").unwrap();
    store
        .add(
            "math",
            "Units: convert every quantity to one unit first.",
            vec![],
        )
        .unwrap();
    store
        .add(
            "math",
            "Percentages: a discount of p% leaves (100-p)%.",
            vec![],
        )
        .unwrap();
    let mut router = experient::router::Router::default();
    router.add("m", backend);
    let state = experient::server::state(experient::server::Parts {
        config: config.clone(),
        router,
        store: Arc::new(store),
        keys,
        prompts: experient::prompts::Prompts::builtin(),
        experience_dir: experience_dir.clone(),
        runs_dir: experience_dir.join(".runs"),
        db: None,
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        experient::server::run(listener, state, &config.server, async {
            let _ = rx.await;
        })
        .await
    });
    Server {
        base,
        stop: Some(tx),
        done,
        dir,
    }
}

pub(crate) async fn raw(
    method: &str,
    url: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = reqwest::Client::new().request(method.parse().unwrap(), url);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    if let Some(b) = body {
        r = r
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = r.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
        headers,
    )
}

/// A JSON POST without a key: the status and the body.
async fn post(url: &str, body: &Value) -> (u16, Value) {
    let (status, v, _) = raw("POST", url, None, Some(&body.to_string())).await;
    (status, v)
}

/// An OpenAI error envelope with every field present.
pub(crate) fn envelope(v: &Value) -> &Value {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    for k in ["type", "param", "code"] {
        assert!(e.get(k).is_some(), "{k} missing in {v}");
    }
    e
}

#[tokio::test]
async fn a_chat_completion_comes_back_in_openai_shape() {
    let s = serve(Scripted::echo(), &[], &[]).await;
    let req = CreateChatCompletionRequestArgs::default()
        .model("m")
        .messages(vec![ChatCompletionRequestUserMessage::from(
            "one two three",
        )
        .into()])
        .n(2u8)
        .build()
        .unwrap();
    let r = s.client("k").chat().create(req).await.unwrap();
    assert!(r.id.starts_with("chatcmpl-"), "{}", r.id);
    assert_eq!(r.model, "m");
    assert_eq!(r.choices.len(), 2);
    for (i, c) in r.choices.iter().enumerate() {
        assert_eq!(c.index, i as u32);
        assert_eq!(c.message.content.as_deref(), Some("one two three"));
    }
    let usage = r.usage.unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (3, 6));
    assert_eq!(usage.total_tokens, 9);
    s.stop().await;
}

#[tokio::test]
async fn a_stream_follows_the_chunk_protocol() {
    let s = serve(Scripted::echo(), &[], &[]).await;
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
                      "max_tokens": 2, "messages": [{"role": "user", "content": "alpha beta gamma"}]});
    let resp = reqwest::Client::new()
        .post(s.url("/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .map(|e| &e[6..])
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "alpha beta", "cut at max_tokens");
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    // The usage chunk is last, with no choices.
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], 2);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["usage"].is_null()));

    // The same stream through async-openai's own types.
    let req = CreateChatCompletionRequestArgs::default()
        .model("m")
        .messages(vec![ChatCompletionRequestUserMessage::from("x y").into()])
        .stream(true)
        .build()
        .unwrap();
    let mut stream = s.client("k").chat().create_stream(req).await.unwrap();
    let mut got = String::new();
    while let Some(chunk) = stream.next().await {
        for c in chunk.unwrap().choices {
            got.push_str(c.delta.content.as_deref().unwrap_or_default());
        }
    }
    assert_eq!(got, "x y");
    s.stop().await;
}

#[tokio::test]
async fn every_error_is_the_envelope_with_its_status() {
    let s = serve(Scripted::echo(), &[], &[]).await;
    let chat = s.url("/v1/chat/completions");
    let (st, v, _) = raw("GET", &s.url("/v1/nothing"), None, None).await;
    assert_eq!(st, 404);
    envelope(&v);
    let (st, v, _) = raw("DELETE", &chat, None, None).await;
    assert_eq!(st, 405);
    envelope(&v);
    let (st, v, _) = raw("POST", &chat, None, Some("{not json")).await;
    assert_eq!(st, 400);
    assert!(envelope(&v)["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let (st, v, _) = raw(
        "POST",
        &chat,
        None,
        Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"frobnicate":1}"#),
    )
    .await;
    assert_eq!(st, 400);
    let e = envelope(&v);
    assert!(e["message"].as_str().unwrap().contains("frobnicate"), "{v}");
    let (st, v, _) = raw(
        "POST",
        &chat,
        None,
        Some(r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(envelope(&v)["param"], "model");
    let (st, v, _) = raw(
        "POST",
        &chat,
        None,
        Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":9}"#),
    )
    .await;
    assert_eq!(st, 400);
    assert_eq!(envelope(&v)["param"], "temperature");
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(Config::default().server.max_body_bytes + 1)
    );
    let (st, v, _) = raw("POST", &chat, None, Some(&big)).await;
    assert_eq!(st, 413);
    envelope(&v);
    s.stop().await;
}

#[tokio::test]
async fn a_refused_backend_becomes_429_with_retry_after() {
    let backend = Scripted::new(|_| Script {
        refuse: Some(experient::Error::Overloaded {
            message: "the model is busy".into(),
            retry_after_secs: 7,
        }),
        ..Script::words("unused")
    });
    let s = serve(backend, &[], &[]).await;
    let (st, v, headers) = raw(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(st, 429, "{v}");
    assert_eq!(headers["retry-after"], "7");
    assert!(envelope(&v)["message"].as_str().unwrap().contains("busy"));
    s.stop().await;
}

/// A backend that cannot hold the model to a schema names the field by the crate's (chat's)
/// name; every endpoint tells its client the field it sent, whole or streamed.
#[tokio::test]
async fn a_backend_refusal_names_the_field_the_client_sent() {
    let backend = Scripted::new(|_| Script {
        refuse: Some(experient::Error::invalid(
            "the schema cannot be compiled: too deep",
            "response_format",
        )),
        ..Script::words("unused")
    });
    let s = serve(backend, &[], &[]).await;
    let schema = json!({"type": "object"});
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
            "response_format",
        ),
        (
            "/v1/responses",
            json!({"model": "m", "input": "hi",
                   "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}),
            "text.format",
        ),
    ];
    for (path, body, param) in cases {
        for stream in [false, true] {
            let mut body = body.clone();
            body["stream"] = json!(stream);
            let (st, v) = post(&s.url(path), &body).await;
            assert_eq!(st, 400, "{path} {body}: {v}");
            assert_eq!(envelope(&v)["param"], param, "{path} {body}: {v}");
        }
    }
    s.stop().await;
}

/// Clients send an earlier turn's reasoning back under either name; it is taken, never shown to
/// the model again, and refused on a message that cannot carry it.
#[tokio::test]
async fn reasoning_in_history_is_taken_under_both_names() {
    let backend = Scripted::echo();
    let s = serve(backend.clone(), &[], &[]).await;
    for field in ["reasoning_content", "reasoning"] {
        let body = json!({"model": "m", "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello", field: "The user greets me."},
            {"role": "user", "content": "bye"},
        ]});
        let (st, v) = post(&s.url("/v1/chat/completions"), &body).await;
        assert_eq!(st, 200, "{field}: {v}");
        let seen = backend.received().pop().unwrap();
        assert!(
            seen.messages.iter().all(|m| !m.content.contains("greets")),
            "{seen:?}"
        );
        let bad =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi", field: "x"}]});
        let (st, v) = post(&s.url("/v1/chat/completions"), &bad).await;
        assert_eq!(st, 400, "{v}");
        assert_eq!(envelope(&v)["param"], format!("messages[0].{field}"), "{v}");
    }
    s.stop().await;
}

#[tokio::test]
async fn keys_guard_every_route_but_health_and_the_ui() {
    let s = serve(Scripted::echo(), &["user-key"], &["admin-key"]).await;
    let chat_body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let chat = s.url("/v1/chat/completions");
    let (st, v, _) = raw("POST", &chat, None, Some(chat_body)).await;
    assert_eq!(st, 401);
    envelope(&v);
    let (st, _, _) = raw("POST", &chat, Some("wrong"), Some(chat_body)).await;
    assert_eq!(st, 401);
    let (st, _, _) = raw("POST", &chat, Some("user-key"), Some(chat_body)).await;
    assert_eq!(st, 200);
    let libs = s.url("/v1/libraries");
    let (st, v, _) = raw("GET", &libs, Some("user-key"), None).await;
    assert_eq!(st, 403);
    envelope(&v);
    let (st, v, _) = raw("GET", &libs, Some("admin-key"), None).await;
    assert_eq!(st, 200);
    assert_eq!(v["data"][0]["name"], "math");
    let (st, _, _) = raw("GET", &s.url("/health"), None, None).await;
    assert_eq!(st, 200);
    let (st, _, headers) = raw("GET", &s.url("/ui"), None, None).await;
    assert_eq!(st, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    s.stop().await;
}

#[tokio::test]
async fn a_library_in_the_model_name_reaches_the_backend_as_a_prior() {
    let backend = Scripted::echo();
    let s = serve(backend.clone(), &[], &[]).await;
    let req = CreateChatCompletionRequestArgs::default()
        .model("m@math")
        .messages(vec![
            ChatCompletionRequestSystemMessage::from("Be brief.").into(),
            ChatCompletionRequestUserMessage::from("A shirt is 25% off. Price?").into(),
        ])
        .build()
        .unwrap();
    let r = s.client("k").chat().create(req).await.unwrap();
    assert_eq!(r.model, "m@math");
    let (_, v, _) = raw(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(r#"{"model":"m@math","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(v["experient"]["library"], "math");
    assert_eq!(v["experient"]["experiences"], json!(["E1", "E2"]));
    let seen = backend.received();
    assert_eq!(seen.len(), 2);
    let system: Vec<&str> = seen[0]
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    let all = system.join("\n");
    assert!(all.contains("Be brief."), "{all}");
    assert!(all.contains("Units: convert every quantity"), "{all}");
    assert!(all.contains("Percentages: a discount"), "{all}");
    // An unknown library is a 404 naming it; the backend is not called.
    let (st, v, _) = raw(
        "POST",
        &s.url("/v1/chat/completions"),
        None,
        Some(r#"{"model":"m@nope","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(st, 404, "{v}");
    envelope(&v);
    assert_eq!(backend.received().len(), 2);
    s.stop().await;
}

#[tokio::test]
async fn shutdown_lets_a_request_in_flight_finish() {
    let backend = Scripted::new(|_| Script {
        delay: std::time::Duration::from_millis(100),
        ..Script::words("slow but sure")
    });
    let s = serve(backend, &[], &[]).await;
    let url = s.url("/v1/chat/completions");
    let inflight = tokio::spawn(async move {
        raw(
            "POST",
            &url,
            None,
            Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let base = s.base.clone();
    s.stop().await;
    let (st, v, _) = inflight.await.unwrap();
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "slow but sure");
    // And the listener is gone.
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
}

#[tokio::test]
async fn iterresearch_gets_the_prior_as_direct_requests_do_and_counts_its_use() {
    let backend = Scripted::new(|_| Script::words("Report: done.\nAnswer: 42"));
    let s = serve(backend.clone(), &[], &["admin"]).await;
    let (st, v, _) = raw(
        "POST",
        &s.url("/v1/chat/completions"),
        Some("admin"),
        Some(r#"{"model":"iterresearch:m@math","messages":[{"role":"system","content":"Be exact."},{"role":"user","content":"What is six times seven?"}]}"#),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["experient"]["method"], "iterresearch");
    assert_eq!(v["experient"]["experiences"], json!(["E1", "E2"]));
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("42"),
        "{v}"
    );
    // Every round's system message holds the client's system prompt and the prior.
    let round = &backend.received()[0];
    let system = &round.messages[0];
    assert_eq!(system.role, Role::System);
    assert!(system.content.contains("Be exact."), "{}", system.content);
    assert!(
        system.content.contains("Units: convert every quantity"),
        "{}",
        system.content
    );
    // Injections are counted, as for the direct method (off the request's path, so soon
    // after rather than at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_, e1, _) = raw(
            "GET",
            &s.url("/v1/libraries/math/experiences/E1"),
            Some("admin"),
            None,
        )
        .await;
        if e1["uses"] == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "use never counted: {e1}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.stop().await;
}

/// The Responses object echoes what the client sent (OpenAI's SDKs read these fields back),
/// unstreamed, streamed and stored; `safety_identifier` reaches the backend as the end-user id.
#[tokio::test]
async fn a_response_echoes_its_request_fields_in_every_form() {
    use async_openai::types::responses::Response;
    let backend = Scripted::echo();
    let s = serve(backend.clone(), &[], &[]).await;
    let body = json!({"model": "m", "input": "red green", "instructions": "Be brief.",
                      "prompt_cache_key": "tenant-7", "safety_identifier": "user-42",
                      "metadata": {"ticket": "T-1"}, "max_output_tokens": 16});
    let r: Response = s
        .client("k")
        .responses()
        .create_byot(body.clone())
        .await
        .unwrap();
    assert_eq!(r.prompt_cache_key.as_deref(), Some("tenant-7"));
    assert_eq!(r.safety_identifier.as_deref(), Some("user-42"));
    assert_eq!(serde_json::to_value(&r.instructions).unwrap(), "Be brief.");
    assert_eq!(r.metadata.as_ref().unwrap()["ticket"], "T-1");
    assert_eq!(r.output_text().as_deref(), Some("red green"));
    assert_eq!(backend.received()[0].user.as_deref(), Some("user-42"));
    // Stored: GET returns the same echo.
    let got: Response = s
        .client("k")
        .responses()
        .retrieve_byot(&r.id)
        .await
        .unwrap();
    assert_eq!(got.prompt_cache_key.as_deref(), Some("tenant-7"));
    assert_eq!(got.safety_identifier.as_deref(), Some("user-42"));
    // Streamed: the created and completed events carry it too.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = crate::common::post_text(&s.url("/v1/responses"), &streamed).await;
    let events: Vec<Value> = crate::common::sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    for kind in ["response.created", "response.completed"] {
        let e = events
            .iter()
            .find(|e| e["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} in {text}"));
        assert_eq!(e["response"]["prompt_cache_key"], "tenant-7", "{e}");
        assert_eq!(e["response"]["safety_identifier"], "user-42", "{e}");
        assert_eq!(e["response"]["metadata"]["ticket"], "T-1", "{e}");
    }
    s.stop().await;
}

/// A response cut by max_output_tokens is incomplete, and so is the item the tokens ran out
/// in, whole and streamed (the final response object of the stream says so too).
#[tokio::test]
async fn a_cut_response_and_its_last_item_are_incomplete() {
    let s = serve(Scripted::echo(), &[], &[]).await;
    let body = json!({"model": "m", "input": "one two three four", "max_output_tokens": 2});
    let (st, whole) = post(&s.url("/v1/responses"), &body).await;
    assert_eq!(st, 200, "{whole}");
    assert_eq!(whole["status"], "incomplete", "{whole}");
    assert_eq!(whole["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(whole["output"][0]["status"], "incomplete", "{whole}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let text = crate::common::post_text(&s.url("/v1/responses"), &streamed).await;
    let events: Vec<Value> = crate::common::sse_data(&text)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let last = events.last().unwrap();
    assert_eq!(last["type"], "response.incomplete", "{text}");
    assert_eq!(
        last["response"]["output"][0]["status"], "incomplete",
        "{last}"
    );
    let done = events
        .iter()
        .find(|e| e["type"] == "response.output_item.done")
        .unwrap();
    assert_eq!(done["item"]["status"], "incomplete", "{done}");
    s.stop().await;
}

/// What a method cannot honour, and an option of another method, are refused before any model
/// call, naming the field as the client's API spells it.
#[tokio::test]
async fn what_a_method_cannot_honour_is_refused_naming_the_field() {
    let backend = Scripted::echo();
    let s = serve(backend.clone(), &[], &[]).await;
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let grasp = json!({"env": "grasp"});
    let cases = [
        (
            "iterresearch:m",
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (
            "iterresearch:m",
            json!({"tools": tools, "tool_choice": "required"}),
            "tool_choice",
        ),
        ("iterresearch:m", json!({"logprobs": true}), "logprobs"),
        ("iterresearch:m", json!({"n": 2}), "n"),
        // What a research loop cannot go on from.
        (
            "iterresearch:m",
            json!({"messages": [{"role": "system", "content": "Be brief."}]}),
            "messages",
        ),
        (
            "iterresearch:m",
            json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
            ]}),
            "messages[1].tool_calls",
        ),
        (
            "iterresearch:m",
            json!({"tools": [tools[0], {"type": "function", "function": {"name": "python"}}]}),
            "tools[1]",
        ),
        (
            "iterresearch:m",
            json!({"experient": {"max_rounds": 0}}),
            "experient.max_rounds",
        ),
        (
            "iterresearch:m",
            json!({"experient": {"max_rounds": 65}}),
            "experient.max_rounds",
        ),
        (
            "plan:m",
            json!({"tools": tools, "experient": grasp}),
            "tools",
        ),
        ("plan:m", json!({"n": 3, "experient": grasp}), "n"),
        (
            "plan:m",
            json!({"experient": {"env": "grasp", "workspace": "full"}}),
            "experient.workspace",
        ),
        ("m", json!({"experient": {"env": "grasp"}}), "experient.env"),
        (
            "m",
            json!({"experient": {"max_rounds": 3}}),
            "experient.max_rounds",
        ),
        (
            "m",
            json!({"experient": {"refresh": true}}),
            "experient.refresh",
        ),
        // The plan method's own options.
        ("plan:m", json!({}), "experient.env"),
        (
            "plan:m",
            json!({"experient": {"env": "MiniGrid-Maze-v9"}}),
            "experient.env",
        ),
        (
            "plan:m",
            json!({"experient": {"env": "grasp", "rounds": 99}}),
            "experient.rounds",
        ),
        (
            "plan:m",
            json!({"experient": {"env": "grasp", "instances": 0}}),
            "experient.instances",
        ),
        (
            "plan:m",
            json!({"experient": {"env": "grasp", "train": [-1]}}),
            "experient.train",
        ),
        (
            "plan:m",
            json!({"experient": {"env": "MiniGrid-Empty-5x5-v0", "instances": [{"grid": ["A.E"]}]}}),
            "experient.instances",
        ),
        (
            "plan:m",
            json!({"experient": {"env": "grasp", "instances": [{"grid": ["A.E", "..X"]}]}}),
            "experient.instances[0].grid",
        ),
    ];
    for (model, extra, param) in cases {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (st, v, _) = raw(
            "POST",
            &s.url("/v1/chat/completions"),
            None,
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(envelope(&v)["param"], param, "{body}: {v}");
    }
    // The Responses API names the output format by its own field.
    let (st, v, _) = raw(
        "POST",
        &s.url("/v1/responses"),
        None,
        Some(r#"{"model":"iterresearch:m","input":"hi","text":{"format":{"type":"json_object"}}}"#),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(envelope(&v)["param"], "text.format", "{v}");
    // and a conversation's problems as its input's.
    let unanswered = json!({"model": "iterresearch:m", "input": [
        {"role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    ]});
    let (st, v, _) = raw(
        "POST",
        &s.url("/v1/responses"),
        None,
        Some(&unanswered.to_string()),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(envelope(&v)["param"], "input", "{v}");
    assert!(backend.received().is_empty(), "no model call was made");
    s.stop().await;
}

/// A learning job whose learner replies are cut off by `learner_max_tokens` commits only the
/// finished lines: the scripted learner ends every operations reply with a half-written `ADD`
/// and finishes with `length`, as the model does when it runs out of tokens. Rollouts
/// alternate right and wrong, so every group is mixed and reaches the learner.
#[tokio::test]
async fn a_learning_job_commits_only_the_finished_lines_of_cut_off_replies() {
    use experient::backend::FinishReason;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const LESSON: &str = "Inside out: Evaluate the innermost brackets first.";
    let attempts = AtomicUsize::new(0);
    let backend = Scripted::new(move |r| {
        let user = r.messages.last().map(|m| m.content.as_str()).unwrap_or("");
        let cut = |text: &str| {
            let mut s = Script::words(text);
            s.finish = FinishReason::Length;
            s
        };
        if user.contains("Summarise the attempt") {
            Script::words("1. It answered at once.\nOutcome: a guess.")
        } else if user.contains("Compare the right attempts") {
            Script::words(LESSON)
        } else if user.contains("Decide what to do") || user.contains("Merge their proposals") {
            cut(&format!("ADD: {LESSON}\nADD: Half written: Evaluate"))
        } else {
            let right = attempts.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
            Script::words(if right { "True" } else { "False" })
        }
    });
    let s = serve(backend.clone(), &[], &[]).await;
    let (st, v) = crate::common::call(
        "POST",
        &s.url("/v1/libraries"),
        Some(&json!({"name": "b", "settings": {"promote": "always"}})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let tasks: Vec<Value> = (0..4)
        .map(|i| json!({"question": format!("not ( True ) and ( {i} > 9 ) is"), "answer": "True"}))
        .collect();
    let (st, job) = crate::common::call(
        "POST",
        &s.url("/v1/libraries/b/learn"),
        Some(&json!({
            "model": "m", "tasks": tasks, "epochs": 1, "batch_size": 2, "group_size": 4,
            "max_tokens": 4, "learner_max_tokens": 12, "verifier": "exact", "concurrency": 1,
        })),
    )
    .await;
    assert_eq!(st, 202, "{job}");
    let url = s.url(&format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let job = loop {
        let (_, j) = crate::common::call("GET", &url, None).await;
        if j["status"] != "running" {
            break j;
        }
        assert!(std::time::Instant::now() < deadline, "{j}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(job["status"], "succeeded", "{job}");
    let steps = job["result"]["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2, "{job}");
    assert!(steps.iter().all(|s| s["mixed_groups"] == 2), "{job}");
    // Only the finished line reached the library, and the cut is recorded.
    let (_, lib) = crate::common::call("GET", &s.url("/v1/libraries/b/experiences"), None).await;
    let texts: Vec<&str> = lib["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [LESSON], "{lib}");
    let run_dir = std::path::PathBuf::from(job["run_dir"].as_str().unwrap());
    let groups: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join(format!(
            "step-{:04}/groups.json",
            steps[0]["step"].as_u64().unwrap()
        )))
        .unwrap(),
    )
    .unwrap();
    assert!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["update_cut"] == true),
        "{groups}"
    );
    s.stop().await;
}

/// Learning from traffic needs traffic: a library with no scored completions, or a source the
/// server does not know, is a 400 naming `source`, and no job starts and the library is as it
/// was.
#[tokio::test]
async fn a_learning_job_from_no_traffic_is_refused_naming_the_source() {
    let s = serve(Scripted::new(|_| Script::words("4")), &[], &[]).await;
    let (_, before) = crate::common::call("GET", &s.url("/v1/libraries/math"), None).await;
    let learn = s.url("/v1/libraries/math/learn");
    for (source, says) in [
        ("traffic", "no recorded completions with feedback"),
        ("logs", "source must be \"traffic\""),
    ] {
        let body = json!({"model": "m", "source": source}).to_string();
        let (st, v, _) = raw("POST", &learn, None, Some(&body)).await;
        assert_eq!(st, 400, "{v}");
        let e = envelope(&v);
        assert_eq!(e["param"], "source", "{v}");
        assert!(e["message"].as_str().unwrap().contains(says), "{v}");
    }
    let (_, jobs) = crate::common::call("GET", &s.url("/v1/jobs"), None).await;
    assert_eq!(jobs["data"], json!([]), "{jobs}");
    let (_, after) = crate::common::call("GET", &s.url("/v1/libraries/math"), None).await;
    assert_eq!(after, before);
    s.stop().await;
}
