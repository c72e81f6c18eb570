//! The OpenAI surface agents and structured-output clients use, beyond plain chat: tool calls
//! (forced, automatic, streamed, multi-turn, with a library prior), schema-valid JSON, log
//! probabilities, the Responses API and legacy completions. Every test runs twice: on the
//! embedded model, and through a second experient process that has the first as its upstream,
//! so both backends answer the same requests over real HTTP. Responses are parsed with
//! async-openai's own types, which fail on any field out of OpenAI's shape.

use crate::common;

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::common::{sse_data, Server, MODEL};
use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use async_openai::types::completions::CreateCompletionResponse;
use async_openai::types::responses::{OutputItem, Response, ResponseStreamEvent, Status};
use serde_json::{json, Value};

/// The embedded model's server, and a second server whose model "up" is the first one.
fn servers() -> [(&'static Server, &'static str); 2] {
    static FRONT: OnceLock<Server> = OnceLock::new();
    let local = common::shared();
    let front = FRONT.get_or_init(|| {
        common::start(
            Some(&format!(
                "[[models]]\nkind = \"upstream\"\nid = \"up\"\nbase_url = \"{}/v1\"\nmodel = \"{MODEL}\"\n",
                local.base
            )),
            &[],
        )
    });
    [(local, MODEL), (front, "up")]
}

async fn post(server: &Server, path: &str, body: &Value) -> (u16, Value) {
    crate::common::call("POST", &server.url(path), Some(body)).await
}

/// The SSE events of a streamed request, as (event name, data) pairs.
async fn events(server: &Server, path: &str, body: &Value) -> Vec<(Option<String>, String)> {
    let text = common::post_text(&server.url(path), body).await;
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .map(str::to_owned);
            (name, sse_data(&format!("{e}\n\n")).join("\n"))
        })
        .collect()
}

fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "minLength": 1, "maxLength": 30},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": false,
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather now in a city.", "parameters": weather_schema()}},
        {"type": "function", "function": {"name": "get_time", "description": "The local time in a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"], "additionalProperties": false}}},
    ])
}

fn ask_weather(model: &str, tool_choice: Value) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris right now?"}],
        "tools": tools(),
        "tool_choice": tool_choice,
        "temperature": 0,
        "max_tokens": 80,
    })
}

fn valid(schema: &Value, doc: &Value) -> bool {
    jsonschema::is_valid(schema, doc)
}

/// An ordinary (non-strict) schema, as LangChain sends a plain dict tool, decodes as compact
/// JSON of the named keys; a forced call cut by max_tokens is still a call, finishing with
/// "length", as OpenAI returns one. On both backends (the upstream's is the local server).
#[tokio::test]
async fn ordinary_schemas_give_calls_and_a_cut_call_is_still_a_call() {
    let plain = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "required": ["city", "days"], "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"}}}}}]);
    for (server, model) in servers() {
        for (max_tokens, finish) in [(60, "tool_calls"), (12, "length")] {
            let body = json!({"model": model, "temperature": 0, "max_tokens": max_tokens,
                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                "tools": plain, "tool_choice": "required"});
            let (s, v) = post(server, "/v1/chat/completions", &body).await;
            assert_eq!(s, 200, "{model}: {v}");
            let c = &v["choices"][0];
            assert_eq!(c["finish_reason"], finish, "{model}: {v}");
            let call = &c["message"]["tool_calls"][0]["function"];
            assert_eq!(call["name"], "get_weather", "{model}: {v}");
            let args = call["arguments"].as_str().unwrap();
            assert!(
                !args.contains(": ") && !args.contains('\n'),
                "compact: {args}"
            );
            if finish == "tool_calls" {
                let a: Value = serde_json::from_str(args).unwrap();
                let mut keys: Vec<&String> = a.as_object().unwrap().keys().collect();
                keys.sort();
                assert_eq!(keys, ["city", "days"], "only the named keys: {args}");
                assert!(a["days"].is_i64(), "{args}");
            } else {
                assert!(serde_json::from_str::<Value>(args).is_err(), "cut: {args}");
            }
        }
        // Streamed through the Responses API, the cut call's item closes as incomplete.
        let body = json!({"model": model, "temperature": 0, "max_output_tokens": 12,
            "input": "What is the weather in Paris?", "stream": true,
            "tools": [{"type": "function", "name": "get_weather",
                "parameters": plain[0]["function"]["parameters"]}], "tool_choice": "required"});
        let text = crate::common::post_text(&format!("{}/v1/responses", server.base), &body).await;
        let events: Vec<Value> = crate::common::sse_data(&text)
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let done: Vec<&Value> = events
            .iter()
            .filter(|e| e["type"] == "response.output_item.done")
            .collect();
        assert_eq!(done.len(), 1, "{model}: {text}");
        assert_eq!(done[0]["item"]["type"], "function_call", "{model}: {text}");
        assert_eq!(done[0]["item"]["status"], "incomplete", "{model}: {text}");
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.incomplete", "{model}: {text}");
        let seq: Vec<u64> = events
            .iter()
            .map(|e| e["sequence_number"].as_u64().unwrap())
            .collect();
        assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "{seq:?}");
    }
}

#[tokio::test]
async fn forced_tool_calls_are_well_formed_calls_with_valid_arguments() {
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for (server, model) in servers() {
        for choice in [named.clone(), json!("required")] {
            let (status, body) = post(
                server,
                "/v1/chat/completions",
                &ask_weather(model, choice.clone()),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let r: CreateChatCompletionResponse =
                serde_json::from_value(body.clone()).expect("OpenAI's shape");
            let c = &r.choices[0];
            assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
            assert!(body["choices"][0]["message"]["content"].is_null(), "{body}");
            let calls = &body["choices"][0]["message"]["tool_calls"];
            assert_eq!(calls.as_array().unwrap().len(), 1, "{body}");
            let call = &calls[0];
            assert_eq!(call["type"], "function");
            assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            match call["function"]["name"].as_str().unwrap() {
                "get_weather" => assert!(valid(&weather_schema(), &args), "{args}"),
                "get_time" => assert!(choice == "required" && args["city"].is_string(), "{args}"),
                other => panic!("unknown function {other}"),
            }
            assert!(c.message.tool_calls.is_some());
        }
    }
}

#[tokio::test]
async fn automatic_tool_choice_gives_text_or_valid_calls_and_none_gives_text() {
    for (server, model) in servers() {
        let (status, body) = post(
            server,
            "/v1/chat/completions",
            &ask_weather(model, json!("auto")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let _: CreateChatCompletionResponse =
            serde_json::from_value(body.clone()).expect("OpenAI's shape");
        let choice = &body["choices"][0];
        match choice["finish_reason"].as_str().unwrap() {
            "tool_calls" => {
                for call in choice["message"]["tool_calls"].as_array().unwrap() {
                    let name = call["function"]["name"].as_str().unwrap();
                    assert!(["get_weather", "get_time"].contains(&name));
                    serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap())
                        .unwrap();
                }
            }
            _ => assert!(
                !choice["message"]["content"].as_str().unwrap().is_empty(),
                "{body}"
            ),
        }
        let (status, body) = post(
            server,
            "/v1/chat/completions",
            &ask_weather(model, json!("none")),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body["choices"][0]["message"].get("tool_calls").is_none(),
            "{body}"
        );
        assert_ne!(body["choices"][0]["finish_reason"], "tool_calls");
    }
}

#[tokio::test]
async fn streamed_tool_calls_reassemble_into_the_unstreamed_call() {
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    for (server, model) in servers() {
        let (_, whole) = post(
            server,
            "/v1/chat/completions",
            &ask_weather(model, named.clone()),
        )
        .await;
        let mut body = ask_weather(model, named.clone());
        body["stream"] = json!(true);
        let evs = events(server, "/v1/chat/completions", &body).await;
        assert_eq!(evs.last().unwrap().1, "[DONE]");
        // Per call index: id, type and name once, in the first piece; then argument fragments.
        let mut calls: BTreeMap<u64, (String, String, String, usize)> = BTreeMap::new();
        let mut finish = None;
        for (_, data) in &evs[..evs.len() - 1] {
            let chunk: CreateChatCompletionStreamResponse =
                serde_json::from_str(data).expect("chunk shape");
            let v: Value = serde_json::from_str(data).unwrap();
            for c in &chunk.choices {
                if c.finish_reason.is_some() {
                    finish = Some(v["choices"][0]["finish_reason"].clone());
                }
            }
            for piece in v["choices"][0]["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let k = piece["index"].as_u64().unwrap();
                let first = !calls.contains_key(&k);
                let e = calls.entry(k).or_default();
                assert_eq!(
                    piece.get("id").is_some(),
                    first,
                    "id only in the first piece: {piece}"
                );
                assert_eq!(
                    piece["function"].get("name").is_some(),
                    first,
                    "name only in the first piece: {piece}"
                );
                if first {
                    assert_eq!(piece["type"], "function");
                    e.0 = piece["id"].as_str().unwrap().to_owned();
                    e.1 = piece["function"]["name"].as_str().unwrap().to_owned();
                }
                e.2.push_str(piece["function"]["arguments"].as_str().unwrap_or(""));
                e.3 += 1;
            }
        }
        assert_eq!(finish, Some(json!("tool_calls")));
        assert_eq!(calls.len(), 1, "{evs:?}");
        let (_, name, args, _) = &calls[&0];
        let want = &whole["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(name, want["name"].as_str().unwrap());
        assert_eq!(
            args,
            want["arguments"].as_str().unwrap(),
            "greedy: the same call streamed or not"
        );
    }
}

#[tokio::test]
async fn a_multi_turn_tool_conversation_continues_after_the_result() {
    for (server, model) in servers() {
        let (_, first) = post(
            server,
            "/v1/chat/completions",
            &ask_weather(model, json!("required")),
        )
        .await;
        let call = first["choices"][0]["message"]["tool_calls"][0].clone();
        for content in [Value::Null, json!(""), json!("Let me check.")] {
            let body = json!({
                "model": model,
                "temperature": 0,
                "max_tokens": 30,
                "tools": tools(),
                "messages": [
                    {"role": "user", "content": "What is the weather in Paris right now?"},
                    {"role": "assistant", "content": content, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": call["id"], "content": "{\"sky\": \"sunny\", \"temperature\": 21}"},
                    {"role": "user", "content": "So, is it sunny? Answer in a short sentence."},
                ],
                "tool_choice": "none",
            });
            let (status, body) = post(server, "/v1/chat/completions", &body).await;
            assert_eq!(status, 200, "{body}");
            let r: CreateChatCompletionResponse = serde_json::from_value(body.clone()).unwrap();
            assert!(
                !r.choices[0]
                    .message
                    .content
                    .as_deref()
                    .unwrap_or("")
                    .is_empty(),
                "{body}"
            );
        }
    }
}

#[tokio::test]
async fn tools_compose_with_a_library_prior() {
    let (local, _) = servers()[0];
    let lib = json!({"name": "weather-tools"});
    let (s, _) = post(local, "/v1/libraries", &lib).await;
    assert!(s == 200 || s == 201 || s == 409, "{s}");
    let exp = json!({"text": "Cities: pass the city name exactly as the user wrote it."});
    post(local, "/v1/libraries/weather-tools/experiences", &exp).await;
    for (server, model) in servers() {
        let body = ask_weather(
            &format!("{model}@weather-tools"),
            json!({"type": "function", "function": {"name": "get_weather"}}),
        );
        let (status, body) = post(server, "/v1/chat/completions", &body).await;
        if server.base != local.base {
            // The front server has no such library: priors are the serving server's own.
            assert_eq!(status, 404, "{body}");
            continue;
        }
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["experient"]["library"], "weather-tools");
        assert!(
            !body["experient"]["experiences"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{body}"
        );
        let args: Value = serde_json::from_str(
            body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert!(valid(&weather_schema(), &args), "{args}");
    }
}

#[tokio::test]
async fn json_schema_output_validates_against_its_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["name", "legs", "tags"],
        "additionalProperties": false,
    });
    for (server, model) in servers() {
        let body = json!({
            "model": model, "temperature": 0, "max_tokens": 120,
            "messages": [{"role": "user", "content": "Describe a cat as JSON."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "animal", "strict": true, "schema": schema}},
        });
        let (status, body) = post(server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{body}");
        let doc: Value =
            serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap())
                .unwrap();
        assert!(valid(&schema, &doc), "{doc}");
    }
}

#[tokio::test]
async fn logprobs_have_openai_shape_streamed_or_not() {
    let mut results = Vec::new();
    for (server, model) in servers() {
        let body = json!({
            "model": model, "temperature": 0, "max_tokens": 8, "logprobs": true, "top_logprobs": 3,
            "messages": [{"role": "user", "content": "Say hello."}],
        });
        let (status, v) = post(server, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let r: CreateChatCompletionResponse =
            serde_json::from_value(v.clone()).expect("OpenAI's shape");
        let content = r.choices[0]
            .logprobs
            .as_ref()
            .unwrap()
            .content
            .clone()
            .unwrap();
        assert!(!content.is_empty());
        let text: String = content.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(
            Some(text),
            r.choices[0].message.content,
            "the tokens spell the content"
        );
        for t in &content {
            assert!(t.logprob <= 0.0 && t.logprob.is_finite(), "{t:?}");
            assert_eq!(t.top_logprobs.len(), 3);
            // Greedy: the chosen token is the most likely one, alternatives in order.
            assert!(
                (t.top_logprobs[0].logprob - t.logprob).abs() < 1e-4,
                "{t:?}"
            );
            assert!(t
                .top_logprobs
                .windows(2)
                .all(|w| w[0].logprob >= w[1].logprob));
        }
        // Streamed: each content chunk carries its tokens' log probabilities.
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let evs = events(server, "/v1/chat/completions", &sbody).await;
        let mut streamed = Vec::new();
        for (_, d) in &evs[..evs.len() - 1] {
            let chunk: CreateChatCompletionStreamResponse = serde_json::from_str(d).unwrap();
            for c in chunk.choices {
                if c.delta.content.as_deref().is_some_and(|t| !t.is_empty()) {
                    streamed.extend(c.logprobs.unwrap().content.unwrap());
                }
            }
        }
        assert_eq!(streamed.len(), content.len());
        results.push(content);
    }
    // Through the upstream, the same numbers.
    assert_eq!(results[0].len(), results[1].len());
    for (a, b) in results[0].iter().zip(&results[1]) {
        assert_eq!(a.token, b.token);
        assert!((a.logprob - b.logprob).abs() < 1e-4);
    }
}

#[tokio::test]
async fn the_responses_api_answers_streams_calls_and_continues() {
    for (server, model) in servers() {
        let client = server.client();
        // Plain.
        let r: Response = client
            .responses()
            .create_byot(json!({"model": model, "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 12, "temperature": 0}))
            .await
            .unwrap();
        assert!(
            matches!(r.status, Status::Completed | Status::Incomplete),
            "{r:?}"
        );
        let text = r.output_text().unwrap_or_default();
        assert!(!text.is_empty(), "{r:?}");
        let usage = r.usage.clone().unwrap();
        assert!(usage.input_tokens > 0 && usage.output_tokens > 0);
        assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);
        // GET returns it; DELETE removes it.
        let got: Response = client.responses().retrieve_byot(&r.id).await.unwrap();
        assert_eq!(got.id, r.id);
        assert_eq!(got.output_text(), r.output_text());
        // Its input items are kept with it.
        let items = reqwest::get(server.url(&format!("/v1/responses/{}/input_items", r.id)))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap();
        assert_eq!(items["data"][0]["role"], "user", "{items}");
        assert_eq!(items["data"][0]["content"], "Say hello.");
        // With store false, nothing is kept.
        let (s, unstored) = post(
            server,
            "/v1/responses",
            &json!({"model": model, "input": "x", "store": false, "max_output_tokens": 2}),
        )
        .await;
        assert_eq!(s, 200);
        let url = server.url(&format!(
            "/v1/responses/{}",
            unstored["id"].as_str().unwrap()
        ));
        assert_eq!(reqwest::get(url).await.unwrap().status(), 404);
        let deleted = client.responses().delete(&r.id).await.unwrap();
        assert!(deleted.deleted);
        let gone = reqwest::get(server.url(&format!("/v1/responses/{}", r.id)))
            .await
            .unwrap();
        assert_eq!(gone.status(), 404);

        // Streamed: the full event sequence, numbered, spelling the same text as unstreamed.
        let body = json!({"model": model, "input": "Say hello.", "instructions": "Be brief.", "max_output_tokens": 12, "temperature": 0, "stream": true});
        let evs = events(server, "/v1/responses", &body).await;
        let mut kinds = Vec::new();
        let mut deltas = String::new();
        for (i, (name, data)) in evs.iter().enumerate() {
            let ev: ResponseStreamEvent =
                serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}"));
            let v: Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["sequence_number"], i, "{data}");
            assert_eq!(name.as_deref(), v["type"].as_str());
            if let ResponseStreamEvent::ResponseOutputTextDelta(d) = &ev {
                deltas.push_str(&d.delta);
            }
            kinds.push(v["type"].as_str().unwrap().to_owned());
        }
        let want = [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ];
        assert_eq!(&kinds[..4], want, "{kinds:?}");
        let tail = [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ];
        assert_eq!(&kinds[kinds.len() - 4..kinds.len() - 1], tail, "{kinds:?}");
        assert!(
            kinds.last().unwrap().starts_with("response.completed")
                || kinds.last().unwrap() == "response.incomplete"
        );
        assert_eq!(deltas, text);

        // A forced function call, then its output sent back with previous_response_id.
        let tool = json!({"type": "function", "name": "get_weather", "description": "The weather now in a city.", "parameters": weather_schema()});
        let first: Response = client
            .responses()
            .create_byot(json!({"model": model, "input": "What is the weather in Paris?", "tools": [tool], "tool_choice": {"type": "function", "name": "get_weather"}, "temperature": 0, "max_output_tokens": 60}))
            .await
            .unwrap();
        let call = first
            .output
            .iter()
            .find_map(|o| match o {
                OutputItem::FunctionCall(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{first:?}"));
        assert_eq!(call.name, "get_weather");
        assert!(valid(
            &weather_schema(),
            &serde_json::from_str(&call.arguments).unwrap()
        ));
        // Streamed, the call comes as its own events.
        let sbody = json!({"model": model, "input": "What is the weather in Paris?", "tools": [tool], "tool_choice": "required", "temperature": 0, "max_output_tokens": 60, "stream": true});
        let evs = events(server, "/v1/responses", &sbody).await;
        let kinds: Vec<String> = evs.iter().map(|(n, _)| n.clone().unwrap()).collect();
        for k in [
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
        ] {
            assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
        }

        let second: Response = client
            .responses()
            .create_byot(json!({
                "model": model, "previous_response_id": first.id, "temperature": 0, "max_output_tokens": 20,
                "tools": [tool],
                "input": [{"type": "function_call_output", "call_id": call.call_id, "output": "{\"sky\": \"sunny\"}"}],
            }))
            .await
            .unwrap();
        assert_eq!(
            second.previous_response_id.as_deref(),
            Some(first.id.as_str())
        );
        assert!(
            second.output_text().is_some_and(|t| !t.is_empty()),
            "{second:?}"
        );
        // The continuation saw the whole earlier turn: its prompt is longer than the first's.
        assert!(second.usage.unwrap().input_tokens > first.usage.unwrap().input_tokens);
        let (s, v) = post(server, "/v1/responses", &json!({"model": model, "input": "x", "previous_response_id": "resp_00000000000000000000000000000000"})).await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (404, Some("previous_response_id")),
            "{v}"
        );
    }
}

#[tokio::test]
async fn legacy_completions_plain_streamed_echoed_and_listed() {
    let mut plain_texts = Vec::new();
    for (server, model) in servers() {
        let body = json!({"model": model, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
        let (status, v) = post(server, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let r: CreateCompletionResponse =
            serde_json::from_value(v.clone()).expect("OpenAI's shape");
        assert_eq!(v["object"], "text_completion");
        let text = r.choices[0].text.clone();
        // The continuation keeps the space it starts with.
        assert!(text.starts_with(' '), "{text:?}");
        assert!(r.usage.unwrap().completion_tokens <= 6);
        plain_texts.push(text.clone());

        // Streamed: the same text, then [DONE].
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let evs = events(server, "/v1/completions", &sbody).await;
        assert_eq!(evs.last().unwrap().1, "[DONE]");
        let streamed: String = evs[..evs.len() - 1]
            .iter()
            .map(|(_, d)| {
                let c: CreateCompletionResponse = serde_json::from_str(d).unwrap();
                c.choices.iter().map(|c| c.text.clone()).collect::<String>()
            })
            .collect();
        assert_eq!(streamed, text);

        // A list longer than the model's 8 generation slots runs prompt after prompt.
        let prompts: Vec<String> = (0..10).map(|i| format!("{i} plus {i} is")).collect();
        let body = json!({"model": model, "prompt": prompts, "max_tokens": 2, "temperature": 0});
        let (status, v) = post(server, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let idx: Vec<u64> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(idx, (0..10).collect::<Vec<u64>>());
        let too_many: Vec<&str> = vec!["x"; 65];
        let (s, e) = post(
            server,
            "/v1/completions",
            &json!({"model": model, "prompt": too_many}),
        )
        .await;
        assert_eq!(
            (s, e["error"]["param"].as_str()),
            (400, Some("prompt")),
            "{e}"
        );

        // echo, a list of prompts with n, and logprobs.
        let body = json!({"model": model, "prompt": ["One, two,", "A, B,"], "n": 2, "max_tokens": 3, "temperature": 0, "echo": true});
        let (status, v) = post(server, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4);
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            let prompt = if i < 2 { "One, two," } else { "A, B," };
            assert!(c["text"].as_str().unwrap().starts_with(prompt), "{c}");
        }
        let body = json!({"model": model, "prompt": "One, two,", "max_tokens": 3, "temperature": 0, "logprobs": 2});
        let (status, v) = post(server, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        let lp = &v["choices"][0]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(tokens.len(), lp["token_logprobs"].as_array().unwrap().len());
        assert_eq!(tokens.len(), lp["top_logprobs"].as_array().unwrap().len());
        assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2, "{lp}");
        let joined: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(joined, v["choices"][0]["text"].as_str().unwrap());

        let (s, e) = post(
            server,
            "/v1/completions",
            &json!({"model": model, "prompt": "a", "suffix": "b"}),
        )
        .await;
        assert_eq!((s, e["error"]["param"].as_str()), (400, Some("suffix")));
    }
    assert_eq!(
        plain_texts[0], plain_texts[1],
        "the upstream continues the prompt the same way"
    );
}

/// What openai-agents sends for `Agent(tools=..., output_type=...)`: tools the model may call
/// and a structured answer. The reply is a call of an offered tool with arguments valid for it,
/// or the answer held to the schema; on both backends (the upstream's is the local server).
#[tokio::test]
async fn an_output_type_beside_tools_is_a_call_or_the_answer() {
    let answer = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}, "sunny": {"type": "boolean"}}, "required": ["city", "sunny"]});
    for (server, model) in servers() {
        for question in [
            "What is the weather in Paris right now?",
            "Say whether Paris is sunny.",
        ] {
            let body = json!({
                "model": model, "temperature": 0, "max_tokens": 60,
                "messages": [{"role": "user", "content": question}],
                "tools": tools(), "tool_choice": "auto",
                "response_format": {"type": "json_schema", "json_schema": {"name": "report", "schema": answer}},
            });
            let (s, v) = post(server, "/v1/chat/completions", &body).await;
            assert_eq!(s, 200, "{model}: {v}");
            let choice = &v["choices"][0];
            match choice["finish_reason"].as_str() {
                Some("tool_calls") => {
                    let call = &choice["message"]["tool_calls"][0]["function"];
                    assert!(
                        ["get_weather", "get_time"].contains(&call["name"].as_str().unwrap()),
                        "{v}"
                    );
                    let args: Value =
                        serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
                    assert!(args["city"].is_string(), "{v}");
                }
                Some("stop") => {
                    let content = choice["message"]["content"].as_str().unwrap();
                    let a: Value =
                        serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {v}"));
                    assert!(a["city"].is_string() && a["sunny"].is_boolean(), "{v}");
                    let keys: Vec<&String> = a.as_object().unwrap().keys().collect();
                    assert_eq!(keys.len(), 2, "only the schema's keys: {v}");
                }
                other => panic!("{model}: finish {other:?}: {v}"),
            }
        }
    }
}

#[tokio::test]
async fn no_field_is_silently_dropped() {
    for (server, model) in servers() {
        for (extra, param) in [
            (json!({"tool_choice": "required"}), "tool_choice"),
            (
                json!({"tools": tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "tool_choice",
            ),
            (json!({"top_logprobs": 2}), "top_logprobs"),
            (
                json!({"logprobs": true, "top_logprobs": 21}),
                "top_logprobs",
            ),
            (json!({"frobnicate": true}), "frobnicate"),
            (json!({"store": true}), "store"),
            (json!({"reasoning_effort": "high"}), "reasoning_effort"),
        ] {
            let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let (s, v) = post(server, "/v1/chat/completions", &body).await;
            assert_eq!(
                (s, v["error"]["param"].as_str()),
                (400, Some(param)),
                "{extra}: {v}"
            );
            assert!(v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        let (s, v) = post(
            server,
            "/v1/responses",
            &json!({"model": model, "input": "hi", "background": true}),
        )
        .await;
        assert_eq!(
            (s, v["error"]["param"].as_str()),
            (400, Some("background")),
            "{v}"
        );
    }
}
