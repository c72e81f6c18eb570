//! `POST /v1/chat/completions`, non-streaming and streaming.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderName, HeaderValue};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde_json::{json, Value};

use super::error::JsonBody;
use super::wire::{self, ChatCompletionRequest, WireUsage, SYSTEM_FINGERPRINT};
use super::AppState;
use crate::backend::{self, Event, FinishReason, Usage};
use crate::error::Error;
use crate::methods::{self, Applied, Selection};

pub async fn chat_completions(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, Error> {
    let v = req.validate(&state.limits)?;
    let route = state.router.resolve(
        &v.model,
        v.options.method.as_deref(),
        v.options.library.as_deref(),
    )?;
    let selection = match &v.options.experiences {
        None => None,
        Some(Value::String(s)) if s == "all" => Some(Selection::All),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|k| k >= 1) => {
            Some(Selection::TopK(n.as_u64().unwrap_or(1) as usize))
        }
        Some(_) => {
            return Err(Error::invalid(
                "experient.experiences must be \"all\" or a positive number",
                "experient.experiences",
            ))
        }
    };
    let full_history = match v.options.workspace.as_deref() {
        None | Some("markovian") => false,
        Some("full") => true,
        Some(_) => {
            return Err(Error::invalid(
                "experient.workspace must be \"markovian\" or \"full\"",
                "experient.workspace",
            ))
        }
    };
    let opts = methods::Options {
        selection,
        max_rounds: v.options.max_rounds,
        full_history,
        plan: methods::plan::PlanOptions {
            env: v.options.env.clone(),
            instances: v.options.instances.clone(),
            train: v.options.train.clone(),
            rounds: v.options.rounds,
            direct: v.options.direct,
            refresh: v.options.refresh,
        },
    };
    let n = v.chat.sampling.n as usize;
    let model_label = route.model.clone();
    let ctx = methods::Context {
        store: state.store.clone(),
        prompts: state.prompts.clone(),
        settings: state.methods.clone(),
    };
    let output = methods::run(&ctx, route, v.chat, &opts).await?;
    let applied_header = applied_header(&output.applied);

    if !v.stream {
        let done = tokio::time::timeout(state.request_timeout, backend::collect(output.events, n))
            .await
            .map_err(|_| {
                Error::Timeout(format!(
                    "generation did not finish within {} s",
                    state.request_timeout.as_secs()
                ))
            })??;
        count_tokens(&model_label, done.usage);
        let mut applied = output.applied;
        applied.trace = done.trace;
        let body = json!({
            "id": wire::completion_id(),
            "object": "chat.completion",
            "created": wire::now_secs(),
            "model": v.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": done.choices.iter().enumerate().map(|(i, c)| {
                let mut message = json!({"role": "assistant", "content": c.text, "refusal": null});
                if !c.tool_calls.is_empty() {
                    message["tool_calls"] = json!(c.tool_calls.iter().map(tool_call_json).collect::<Vec<_>>());
                }
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": c.finish_reason.as_str(),
                })
            }).collect::<Vec<_>>(),
            "usage": WireUsage::from(done.usage),
            "experient": applied,
        });
        let mut resp = axum::Json(body).into_response();
        insert_header(&mut resp, applied_header);
        return Ok(resp);
    }

    let sse = chunks(
        output.events,
        v.model,
        n,
        v.include_usage,
        output.applied,
        model_label,
    )
    .map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    let resp = Sse::new(sse)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    let mut resp = coalesce(resp);
    insert_header(&mut resp, applied_header);
    Ok(resp)
}

/// The body with every run of frames that are ready together joined into one frame.
///
/// axum writes each SSE event as its own chunked-encoding frame, and hyper flushes at most 16
/// queued frames in one write: an upstream answer that arrives whole (a short answer, or a burst
/// after a stall) left as 20 frames cost two `writev`s and per-frame encoding, where the client
/// gets the same bytes from one. Joining only what is ready never holds a frame back waiting
/// for the next, so a token still reaches the client the moment it is produced.
fn coalesce(resp: Response) -> Response {
    let (parts, body) = resp.into_parts();
    let frames = body
        .into_data_stream()
        .ready_chunks(64)
        .flat_map(|batch| futures::stream::iter(join_frames(batch)));
    Response::from_parts(parts, axum::body::Body::from_stream(frames))
}

/// Consecutive successful frames as one; an error keeps its place after what came before it.
fn join_frames(
    batch: Vec<Result<axum::body::Bytes, axum::Error>>,
) -> Vec<Result<axum::body::Bytes, axum::Error>> {
    if batch.len() < 2 {
        return batch;
    }
    let mut out = Vec::new();
    let mut joined = bytes::BytesMut::new();
    for frame in batch {
        match frame {
            Ok(b) => joined.extend_from_slice(&b),
            Err(e) => {
                if !joined.is_empty() {
                    out.push(Ok(joined.split().freeze()));
                }
                out.push(Err(e));
            }
        }
    }
    if !joined.is_empty() {
        out.push(Ok(joined.freeze()));
    }
    out
}

fn tool_call_json(c: &backend::ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

fn count_tokens(model: &str, u: Usage) {
    metrics::counter!("experient_prompt_tokens_total", "model" => model.to_owned())
        .increment(u.prompt_tokens);
    metrics::counter!("experient_completion_tokens_total", "model" => model.to_owned())
        .increment(u.completion_tokens);
}

/// The experiences a library contributed, as a header, so that streaming clients learn them
/// before the first chunk.
fn applied_header(applied: &Applied) -> Option<HeaderValue> {
    let ids = applied.experiences.as_ref()?;
    HeaderValue::from_str(&ids.join(",")).ok()
}

fn insert_header(resp: &mut Response, v: Option<HeaderValue>) {
    if let Some(v) = v {
        resp.headers_mut()
            .insert(HeaderName::from_static("x-experient-experiences"), v);
    }
}

/// Turns backend events into the `data:` payloads of an OpenAI chunk stream: one id and one
/// `created` throughout, the role in each choice's first delta, exactly one finish_reason per
/// choice, the usage chunk (`choices: []`) when asked for, an error event in the OpenAI envelope
/// if generation fails, and `[DONE]` last in every case.
fn chunks(
    mut events: backend::EventStream,
    model: String,
    n: usize,
    include_usage: bool,
    mut applied: Applied,
    model_label: String,
) -> impl Stream<Item = String> {
    let id = wire::completion_id();
    let created = wire::now_secs();
    async_stream::stream! {
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut c = json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
            });
            if include_usage {
                c["usage"] = usage.unwrap_or(Value::Null);
            }
            c.to_string()
        };
        // Nearly every chunk of a stream differs from the others only inside `choices`; those
        // are written from a fixed head and tail around the choice, built once, instead of
        // through a `Value` each time (the same JSON, at a fraction of the allocations).
        let (head, tail) = {
            let c = chunk(json!([]), None);
            let at = c.rfind("\"choices\":[").map_or(0, |i| i + "\"choices\":[".len());
            (c[..at].to_owned(), c[at..].to_owned())
        };
        let one = |choice: &str| format!("{head}{choice}{tail}");
        let finish = |index: usize, reason: FinishReason| {
            one(&format!(
                "{{\"index\":{index},\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}",
                reason.as_str()
            ))
        };
        for i in 0..n {
            yield one(&format!(
                "{{\"index\":{i},\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}"
            ));
        }
        let mut finished = vec![false; n];
        let mut usage = Usage::default();
        let mut failed = None;
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Delta { index, text }) => {
                    let text = serde_json::to_string(&text).unwrap_or_default();
                    yield one(&format!(
                        "{{\"index\":{index},\"delta\":{{\"content\":{text}}},\"logprobs\":null,\"finish_reason\":null}}"
                    ));
                }
                Ok(Event::Finish { index, reason }) => {
                    if let Some(f) = finished.get_mut(index as usize) {
                        if !*f {
                            *f = true;
                            yield finish(index as usize, reason);
                        }
                    }
                }
                Ok(Event::ToolCall { index, call }) => {
                    let mut c = tool_call_json(&call);
                    c["index"] = json!(0);
                    yield chunk(json!([{"index": index, "delta": {"tool_calls": [c]}, "logprobs": null, "finish_reason": null}]), None);
                }
                Ok(Event::Progress(p)) => {
                    // Progress rides on a chunk with an empty delta, so clients that only read
                    // `choices[0].delta.content` see nothing and never miss a choice.
                    let mut c: Value = serde_json::from_str(&chunk(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": null}]), None)).unwrap_or_default();
                    c["experient"] = p;
                    yield c.to_string();
                }
                Ok(Event::Trace(t)) => applied.trace = Some(t),
                Ok(Event::Usage(u)) => usage = u,
                Err(e) => { failed = Some(e); break; }
            }
        }
        if let Some(e) = failed {
            yield e.envelope().to_string();
        } else {
            count_tokens(&model_label, usage);
            for (i, f) in finished.iter().enumerate() {
                if !f {
                    yield finish(i, FinishReason::Stop);
                }
            }
            if include_usage {
                // The usage chunk: no choices, then the usage and what experient applied.
                let usage = serde_json::to_string(&WireUsage::from(usage)).unwrap_or_default();
                let applied = serde_json::to_string(&applied).unwrap_or_default();
                yield format!("{head}],\"usage\":{usage},\"experient\":{applied}}}");
            }
        }
        yield "[DONE]".to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::methods::Method;

    fn applied() -> Applied {
        Applied {
            trace: None,
            method: Method::Direct,
            model: "m".into(),
            library: None,
            experiences: None,
        }
    }

    async fn run(events: Vec<crate::Result<Event>>, include_usage: bool) -> Vec<Value> {
        let s = futures::stream::iter(events).boxed();
        chunks(s, "m".into(), 1, include_usage, applied(), "m".into())
            .map(|d| {
                if d == "[DONE]" {
                    json!("[DONE]")
                } else {
                    serde_json::from_str(&d).unwrap()
                }
            })
            .collect()
            .await
    }

    #[tokio::test]
    async fn an_error_after_the_stream_started_is_an_envelope_then_done() {
        let out = run(
            vec![
                Ok(Event::Delta {
                    index: 0,
                    text: "Hel".into(),
                }),
                Err(Error::Internal("the model fell over".into())),
            ],
            true,
        )
        .await;
        assert_eq!(out[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(out[1]["choices"][0]["delta"]["content"], "Hel");
        assert_eq!(out[2]["error"]["message"], "the model fell over");
        assert_eq!(out[2]["error"]["type"], "server_error");
        assert!(out[2]["error"].get("param").is_some() && out[2]["error"].get("code").is_some());
        assert_eq!(out[3], "[DONE]");
        assert_eq!(out.len(), 4);
    }

    #[tokio::test]
    async fn a_missing_finish_is_supplied_once() {
        let out = run(
            vec![
                Ok(Event::Delta {
                    index: 0,
                    text: "Hi".into(),
                }),
                Ok(Event::Usage(Usage {
                    prompt_tokens: 3,
                    completion_tokens: 1,
                })),
            ],
            false,
        )
        .await;
        let finishes: Vec<&Value> = out
            .iter()
            .filter_map(|c| c.get("choices")?.get(0)?.get("finish_reason"))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&json!("stop")]);
        assert_eq!(out.last().unwrap(), "[DONE]");
    }

    #[test]
    fn ready_frames_are_joined_in_order_around_an_error() {
        let b = |s: &'static str| Ok(axum::body::Bytes::from_static(s.as_bytes()));
        let out = join_frames(vec![
            b("data: 1\n\n"),
            b("data: 2\n\n"),
            Err(axum::Error::new("cut")),
            b("data: 3\n\n"),
        ]);
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].as_ref().unwrap(), "data: 1\n\ndata: 2\n\n");
        assert!(out[1].is_err());
        assert_eq!(out[2].as_ref().unwrap(), "data: 3\n\n");
        let one = join_frames(vec![b("data: x\n\n")]);
        assert_eq!(one[0].as_ref().unwrap(), "data: x\n\n");
    }

    /// The chunks are written by hand around preformatted pieces; each one must be exactly what
    /// serde_json would have written for the same value (escapes, field order, no stray
    /// whitespace), or strict clients and byte-comparing tests drift apart.
    #[tokio::test]
    async fn hand_written_chunks_are_canonical_json() {
        let events = vec![
            Ok(Event::Delta {
                index: 0,
                text: "He said \"hi\"\n\u{1}\u{e9}\\".into(),
            }),
            Ok(Event::Delta {
                index: 1,
                text: "x".into(),
            }),
            Ok(Event::Finish {
                index: 0,
                reason: FinishReason::Length,
            }),
            Ok(Event::Usage(Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
            })),
        ];
        let s = futures::stream::iter(events).boxed();
        let out: Vec<String> = chunks(s, "m\"x".into(), 2, true, applied(), "m".into())
            .collect()
            .await;
        assert_eq!(out.last().unwrap(), "[DONE]");
        for c in &out[..out.len() - 1] {
            let v: Value = serde_json::from_str(c).unwrap();
            assert_eq!(&v.to_string(), c);
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "m\"x");
        }
        let parsed: Vec<Value> = out[..out.len() - 1]
            .iter()
            .map(|c| serde_json::from_str(c).unwrap())
            .collect();
        assert!(parsed.iter().all(|v| v["id"] == parsed[0]["id"]));
        assert_eq!(
            parsed[2]["choices"][0]["delta"]["content"],
            "He said \"hi\"\n\u{1}\u{e9}\\"
        );
        let finishes: Vec<(u64, &str)> = parsed
            .iter()
            .filter_map(|v| {
                let c = v["choices"].get(0)?;
                Some((c["index"].as_u64()?, c["finish_reason"].as_str()?))
            })
            .collect();
        assert_eq!(finishes, vec![(0, "length"), (1, "stop")]);
        let last = parsed.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 5);
        assert!(last.get("experient").is_some());
    }
}
