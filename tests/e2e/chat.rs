//! The OpenAI chat surface against a real server on the real default model, driven by the
//! `async-openai` client where it can express the request and by raw HTTP where the wire
//! format itself is under test.

use crate::common;

use std::collections::{HashMap, HashSet};

use crate::common::{shared, sse_data, MODEL};
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs, FinishReason, StopConfiguration,
};
use futures::StreamExt;
use serde_json::{json, Value};

fn user(text: &str) -> ChatCompletionRequestMessage {
    ChatCompletionRequestUserMessage::from(text).into()
}

fn request(prompt: &str, max_tokens: u32) -> CreateChatCompletionRequest {
    CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(vec![user(prompt)])
        .max_completion_tokens(max_tokens)
        .temperature(0.0)
        .build()
        .unwrap()
}

async fn post(path: &str, body: Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(shared().url(path))
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// A raw chat completion: its status and body.
async fn chat(body: Value) -> (u16, Value) {
    crate::common::call("POST", &shared().url("/v1/chat/completions"), Some(&body)).await
}

fn api_error(e: OpenAIError) -> (u16, async_openai::error::ApiError) {
    match e {
        OpenAIError::ApiError(r) => (r.status_code.as_u16(), r.api_error),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn lists_models() {
    let models = shared().client().models().list().await.unwrap();
    assert_eq!(models.object, "list");
    assert!(models.data.iter().any(|m| m.id == MODEL), "{models:?}");
    let one = shared().client().models().retrieve(MODEL).await.unwrap();
    assert_eq!(one.id, MODEL);
    let (status, err) = api_error(
        shared()
            .client()
            .models()
            .retrieve("nope")
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 404);
    assert_eq!(err.param.as_deref(), Some("model"));
}

#[tokio::test]
async fn health_and_metrics() {
    let h = reqwest::get(shared().url("/health")).await.unwrap();
    assert_eq!(h.status(), 200);
    let _ = shared()
        .client()
        .chat()
        .create(request("Hi", 2))
        .await
        .unwrap();
    let text = common::get_text(&shared().url("/metrics")).await;
    for name in [
        "experient_http_requests_total",
        "experient_http_request_duration_seconds_bucket",
        "experient_prompt_tokens_total",
        "experient_completion_tokens_total",
        "experient_http_inflight_requests",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
    assert!(
        text.contains(r#"route="/v1/chat/completions",status="200""#),
        "{text}"
    );
}

#[tokio::test]
async fn completes_a_chat() {
    let before = common::http_status(&shared().url("/health")).unwrap();
    assert_eq!(before, 200);
    let req = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .messages(vec![
            ChatCompletionRequestSystemMessage::from("You are terse.").into(),
            user("What is the capital of France?"),
        ])
        .max_completion_tokens(8u32)
        .build()
        .unwrap();
    let resp = shared().client().chat().create(req).await.unwrap();
    assert!(resp.id.starts_with("chatcmpl-"), "{}", resp.id);
    assert_eq!(resp.object, "chat.completion");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - resp.created as i64).abs() < 120,
        "created in seconds"
    );
    assert_eq!(resp.model, MODEL);
    assert_eq!(resp.choices.len(), 1);
    let c = &resp.choices[0];
    assert!(!c.message.content.as_deref().unwrap_or("").is_empty());
    assert!(matches!(
        c.finish_reason,
        Some(FinishReason::Stop | FinishReason::Length)
    ));
    let u = resp.usage.unwrap();
    assert!(u.prompt_tokens > 5 && u.completion_tokens >= 1 && u.completion_tokens <= 8);
    assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
}

#[tokio::test]
async fn content_as_text_parts_and_experient_object() {
    let resp = post(
        "/v1/chat/completions",
        json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": " hello"}]}],
            "max_tokens": 3,
        }),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    // A field the server does not know is refused, as OpenAI refuses one, never dropped.
    let unknown = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "some_unknown_field": {"ignored": true}}),
    )
    .await;
    assert_eq!(unknown.status(), 400);
    let e: Value = unknown.json().await.unwrap();
    assert_eq!(e["error"]["param"], "some_unknown_field", "{e}");
    assert_eq!(body["experient"]["method"], "direct");
    assert_eq!(body["experient"]["model"], MODEL);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
}

#[tokio::test]
async fn n_gives_independent_choices() {
    let mut req = request("Name a colour.", 6);
    req.n = Some(2);
    let resp = shared().client().chat().create(req).await.unwrap();
    let idx: Vec<u32> = resp.choices.iter().map(|c| c.index).collect();
    assert_eq!(idx, vec![0, 1]);
    // Greedy: both choices are the same text.
    assert_eq!(
        resp.choices[0].message.content,
        resp.choices[1].message.content
    );
    let u = resp.usage.unwrap();
    assert!(u.completion_tokens >= 2, "usage counts both choices: {u:?}");
}

#[tokio::test]
async fn streams_with_the_openai_chunk_protocol() {
    let mut req = request("Count to five.", 12);
    req.n = Some(2);
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        include_obfuscation: None,
    });
    // The crate's `byot` feature (enabled in Cargo.toml; tests/plan.rs sends raw bodies)
    // leaves setting `stream` to the caller.
    req.stream = Some(true);
    let mut stream = shared().client().chat().create_stream(req).await.unwrap();
    let mut ids = HashSet::new();
    let mut created = HashSet::new();
    let mut first_delta_role: HashMap<u32, bool> = HashMap::new();
    let mut finishes: HashMap<u32, usize> = HashMap::new();
    let mut text: HashMap<u32, String> = HashMap::new();
    let mut usage_chunks = 0;
    let mut saw_after_usage = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.id.starts_with("chatcmpl-"));
        assert_eq!(chunk.object, "chat.completion.chunk");
        ids.insert(chunk.id.clone());
        created.insert(chunk.created);
        if usage_chunks > 0 {
            saw_after_usage = true;
        }
        if let Some(u) = chunk.usage {
            assert!(chunk.choices.is_empty(), "the usage chunk has no choices");
            assert_eq!(u.total_tokens, u.prompt_tokens + u.completion_tokens);
            assert!(u.completion_tokens >= 2);
            usage_chunks += 1;
        }
        for c in chunk.choices {
            first_delta_role
                .entry(c.index)
                .or_insert(c.delta.role.is_some());
            if let Some(t) = c.delta.content {
                text.entry(c.index).or_default().push_str(&t);
            }
            if c.finish_reason.is_some() {
                *finishes.entry(c.index).or_default() += 1;
            }
        }
    }
    assert_eq!(ids.len(), 1, "one id on every chunk");
    assert_eq!(created.len(), 1);
    assert_eq!(first_delta_role, HashMap::from([(0, true), (1, true)]));
    assert_eq!(
        finishes,
        HashMap::from([(0, 1), (1, 1)]),
        "exactly one finish_reason per choice"
    );
    assert_eq!(usage_chunks, 1);
    assert!(!saw_after_usage, "the usage chunk is the last one");
    assert!(!text[&0].is_empty());
}

#[tokio::test]
async fn stream_wire_format() {
    let resp = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
               "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let body = resp.text().await.unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0);
    for c in rest {
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null before the last chunk: {c}"
        );
        for ch in c["choices"].as_array().unwrap() {
            let f = &ch["finish_reason"];
            assert!(f.is_null() || ["stop", "length"].contains(&f.as_str().unwrap()));
        }
    }
    // Without include_usage there is no usage field and no usage chunk.
    let body = post(
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": true}),
    )
    .await
    .text()
    .await
    .unwrap();
    let data = sse_data(&body);
    assert_eq!(data.last().unwrap(), "[DONE]");
    for d in &data[..data.len() - 1] {
        let c: Value = serde_json::from_str(d).unwrap();
        assert!(c.get("usage").is_none(), "{c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn stop_sequences_cut_the_output() {
    let prompt = "List the days of the week, comma separated.";
    let full = shared()
        .client()
        .chat()
        .create(request(prompt, 24))
        .await
        .unwrap();
    let full = full.choices[0].message.content.clone().unwrap();
    // Stop at a piece of text the greedy run is known to produce, past its start.
    let words: Vec<&str> = full.split_whitespace().collect();
    assert!(words.len() >= 3, "need a few words to cut: {full:?}");
    let stop = words[2].to_string();
    let mut req = request(prompt, 24);
    req.stop = Some(StopConfiguration::String(stop.clone()));
    let cut = shared().client().chat().create(req).await.unwrap();
    let text = cut.choices[0].message.content.clone().unwrap();
    assert_eq!(cut.choices[0].finish_reason, Some(FinishReason::Stop));
    assert!(
        !text.contains(&stop),
        "stop sequence {stop:?} must not appear in {text:?}"
    );
    assert!(
        full.starts_with(text.trim_end()),
        "{text:?} is a prefix of {full:?}"
    );
    assert!(text.len() < full.len());
}

#[tokio::test]
async fn temperature_zero_repeats_and_sampling_varies() {
    let prompt = "Write one short sentence about the sea.";
    let mut greedy = HashSet::new();
    for _ in 0..3 {
        let r = shared()
            .client()
            .chat()
            .create(request(prompt, 12))
            .await
            .unwrap();
        greedy.insert(r.choices[0].message.content.clone().unwrap());
    }
    assert_eq!(
        greedy.len(),
        1,
        "temperature 0 is deterministic: {greedy:?}"
    );
    let mut sampled = HashSet::new();
    for _ in 0..4 {
        let mut req = request(prompt, 12);
        req.temperature = Some(1.0);
        let r = shared().client().chat().create(req).await.unwrap();
        sampled.insert(r.choices[0].message.content.clone().unwrap());
    }
    assert!(sampled.len() >= 2, "temperature 1 samples: {sampled:?}");
}

#[tokio::test]
async fn bad_requests_get_the_envelope() {
    let client = shared().client();
    let cases: Vec<(CreateChatCompletionRequest, u16, Option<&str>)> = vec![
        (
            {
                let mut r = request("x", 2);
                r.messages.clear();
                r
            },
            400,
            Some("messages"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.temperature = Some(3.0);
                r
            },
            400,
            Some("temperature"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.top_p = Some(1.5);
                r
            },
            400,
            Some("top_p"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.n = Some(0);
                r
            },
            400,
            Some("n"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.n = Some(100);
                r
            },
            400,
            Some("n"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.max_completion_tokens = Some(0);
                r
            },
            400,
            Some("max_completion_tokens"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.top_logprobs = Some(2);
                r
            },
            400,
            Some("top_logprobs"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.model = "no-such-model".into();
                r
            },
            404,
            Some("model"),
        ),
        (
            {
                let mut r = request("x", 2);
                r.model = format!("bogus:{MODEL}");
                r
            },
            404,
            Some("model"),
        ),
    ];
    for (req, status, param) in cases {
        let (s, err) = api_error(client.chat().create(req.clone()).await.unwrap_err());
        assert_eq!(s, status, "{req:?} -> {err:?}");
        assert_eq!(err.param.as_deref(), param, "{err:?}");
        assert!(!err.message.is_empty());
        assert!(err.r#type.is_some());
    }
}

#[tokio::test]
async fn raw_bad_requests_get_the_envelope() {
    let client = reqwest::Client::new();
    let url = shared().url("/v1/chat/completions");
    let check = |status: u16, param: Option<&'static str>| {
        move |(s, body): (u16, Value)| {
            assert_eq!(s, status, "{body}");
            let e = &body["error"];
            assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{body}"
            );
            assert!(
                e.get("type").is_some() && e.get("param").is_some() && e.get("code").is_some(),
                "{body}"
            );
            assert_eq!(e["param"].as_str(), param, "{body}");
        }
    };
    let send = |body: String| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    check(400, None)(send("{not json".into()).await);
    check(400, Some("messages[0].role"))(
        send(json!({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).to_string())
            .await,
    );
    check(400, Some("messages"))(
        send(json!({"model": MODEL, "messages": "hello"}).to_string()).await,
    );
    check(400, Some("model"))(
        send(json!({"messages": [{"role": "user", "content": "x"}]}).to_string()).await,
    );
    check(400, Some("tools[0].function.name"))(
        send(
            json!({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                    "tools": [{"type": "function", "function": {"name": "not a name!"}}]})
            .to_string(),
        )
        .await,
    );
    check(400, Some("messages[0].content[0].type"))(
        send(json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string())
        .await,
    );
    // An oversized body gets its 413 envelope, not a broken pipe: the server reads the rest
    // before answering. Several times, since a server that answered early would lose this race
    // only sometimes; the same connection is reused, so it stays usable afterwards too.
    let huge =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(5 << 20)}]})
            .to_string();
    for _ in 0..5 {
        let r = client
            .post(&url)
            .header("content-type", "application/json")
            .body(huge.clone())
            .send()
            .await
            .unwrap();
        check(413, None)((r.status().as_u16(), r.json::<Value>().await.unwrap()));
    }
    // Unknown routes and methods are enveloped too.
    let r = client.get(shared().url("/v1/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // The server is still healthy after all of that.
    assert_eq!(common::http_status(&shared().url("/health")).unwrap(), 200);
}

#[tokio::test]
async fn concurrent_requests_all_complete() {
    let client = shared().client();
    let tasks: Vec<_> = (0..4)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .chat()
                    .create(request(&format!("Say the number {i}."), 6))
                    .await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert_eq!(r.choices.len(), 1);
    }
}

#[tokio::test]
async fn concurrent_work_does_not_change_greedy_output() {
    let prompt = "Write one short sentence about the sea.";
    let alone = shared()
        .client()
        .chat()
        .create(request(prompt, 16))
        .await
        .unwrap();
    let others: Vec<_> = [
        "Tell me a long story about dragons and knights in a castle.",
        "Hi",
    ]
    .into_iter()
    .map(|p| {
        let client = shared().client();
        let mut req = request(p, 24);
        req.temperature = Some(1.0);
        tokio::spawn(async move { client.chat().create(req).await })
    })
    .collect();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let busy = shared()
        .client()
        .chat()
        .create(request(prompt, 16))
        .await
        .unwrap();
    for o in others {
        o.await.unwrap().unwrap();
    }
    assert_eq!(
        alone.choices[0].message.content, busy.choices[0].message.content,
        "a greedy answer must not depend on what else the server is generating"
    );
}

/// mistral.rs sends no final chunk when a sequence's last token decodes to no text; every
/// request must still finish with a reason and usage. Short sampled requests hit that case
/// about once in seventy, so this would most likely fail without the workaround.
#[tokio::test]
async fn every_sampled_request_finishes_with_usage() {
    let http = reqwest::Client::new();
    let prompts = ["Hi", "Say hello.", "Name a colour.", "x", "Count to five."];
    let results = futures::stream::iter(0..120)
        .map(|i| {
            let http = http.clone();
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": prompts[i % prompts.len()]}],
                              "max_tokens": 1 + i % 4, "temperature": 1.5});
            async move {
                let r = http.post(shared().url("/v1/chat/completions")).json(&body).send().await.unwrap();
                (r.status().as_u16(), r.json::<Value>().await.unwrap())
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    for (status, body) in results {
        assert_eq!(status, 200, "{body}");
        assert!(["stop", "length"].contains(&body["choices"][0]["finish_reason"].as_str().unwrap()));
        assert!(
            body["usage"]["prompt_tokens"].as_u64().unwrap() > 0,
            "{body}"
        );
    }
}

#[tokio::test]
async fn logit_bias_changes_greedy_output() {
    let ask = |bias: Value| async move {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 6,
            "temperature": 0,
            "logit_bias": bias,
        });
        let (_, v) = chat(body).await;
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let plain = ask(json!({})).await;
    // +100 on one token makes it the greedy choice at every step.
    let forced = ask(json!({"30": 100})).await;
    assert_ne!(forced, plain);
    assert_eq!(
        ask(json!({"30": 100})).await,
        forced,
        "greedy with a bias is still deterministic"
    );
    let unit = forced.chars().next().unwrap();
    assert!(
        forced.chars().all(|c| c == unit),
        "one token repeated: {forced:?}"
    );
    // An id past the vocabulary names no token and changes nothing.
    assert_eq!(ask(json!({"9999999": -100})).await, plain);
}

#[tokio::test]
async fn response_format_holds_the_output_to_json() {
    let ask = |rf: Value, model: &str| {
        let body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Name a colour and a count as JSON."}],
            "max_tokens": 120,
            "temperature": 0,
            "response_format": rf,
        });
        chat(body)
    };
    let schema = json!({
        "type": "object",
        "properties": {
            "colour": {"type": "string", "maxLength": 20},
            "count": {"type": "integer", "minimum": 0, "maximum": 1000},
        },
        "required": ["colour", "count"],
        "additionalProperties": false,
    });
    let (s, v) = ask(
        json!({"type": "json_schema", "json_schema": {"name": "pick", "strict": true, "schema": schema}}),
        MODEL,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let doc: Value = serde_json::from_str(content).expect("the content is JSON");
    // Valid against the schema: exactly the two keys, of their types and ranges.
    let obj = doc.as_object().unwrap();
    assert_eq!(obj.len(), 2, "{doc}");
    assert!(
        obj["colour"]
            .as_str()
            .is_some_and(|c| c.chars().count() <= 20),
        "{doc}"
    );
    assert!(obj["count"].as_u64().is_some_and(|n| n <= 1000), "{doc}");
    // A whole document ends the choice as "stop", not at max_tokens.
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() < 120);

    let (s, v) = ask(json!({"type": "json_object"}), MODEL).await;
    assert_eq!(s, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).unwrap().is_object(),
        "{content}"
    );

    for (rf, model, param) in [
        (
            json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}),
            MODEL.to_owned(),
            "response_format",
        ),
        (
            json!({"type": "xml"}),
            MODEL.to_owned(),
            "response_format.type",
        ),
        (
            json!({"type": "json_schema"}),
            MODEL.to_owned(),
            "response_format.json_schema",
        ),
        (
            json!({"type": "json_object"}),
            format!("iterresearch:{MODEL}"),
            "response_format",
        ),
    ] {
        let (s, v) = ask(rf.clone(), &model).await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{rf}: {v}"
        );
    }
}
