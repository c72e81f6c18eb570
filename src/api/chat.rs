//! `POST /v1/chat/completions`, non-streaming and streaming.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{json, Value};

use super::error::JsonBody;
use super::options;
use super::pipeline::{self, Generation, Names, Wire};
use super::wire::{self, ChatCompletionRequest, WireUsage, SYSTEM_FINGERPRINT};
use super::AppState;
use crate::backend::{self, Completion, Event as Model, FinishReason, Usage};
use crate::error::Error;
use crate::methods::{Applied, Event};

/// Chat's names for the fields checked past the edge.
pub(super) static NAMES: Names = Names {
    unsupported: options::chat_field,
    format: "response_format",
    tools: "tools",
    methods: true,
};

/// `POST /v1/chat/completions`: validate, then the pipeline; answered whole or as SSE.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai", request_body = ChatCompletionRequest, responses((status = 200, description = "a chat.completion, or with stream an SSE stream of chat.completion.chunk", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 413, description = "body too large", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "at capacity", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "loading", body = crate::api::openapi::ErrorEnvelope), (status = 504, description = "past request_timeout_secs", body = crate::api::openapi::ErrorEnvelope)))]
pub async fn chat_completions(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    JsonBody(req): JsonBody<ChatCompletionRequest>,
) -> Result<Response, Error> {
    let v = req.validate(&state.limits)?;
    let head = Head {
        id: wire::completion_id(),
        model: v.model.clone(),
    };
    let out = ChatWire::new(head, v.chat.sampling.n as usize, v.include_usage);
    let g = Generation {
        model: v.model,
        options: v.options,
        requests: vec![v.chat],
        stream: v.stream,
        tokens_field: v.tokens_field,
        names: &NAMES,
        api: "chat.completions",
    };
    pipeline::generate(&state, &caller, g, out).await
}

fn tool_call_json(c: &backend::ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// A whole choice: a message whose content is `null` when it only made calls, as OpenAI sends
/// it, and the log probabilities when they were asked for.
fn choice_json(i: usize, c: &backend::Choice) -> Value {
    let content = if c.text.is_empty() && !c.tool_calls.is_empty() {
        Value::Null
    } else {
        c.text.clone().into()
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !c.tool_calls.is_empty() {
        message["tool_calls"] = c.tool_calls.iter().map(tool_call_json).collect();
    }
    json!({
        "index": i,
        "message": message,
        "logprobs": c.logprobs.as_deref().map_or(Value::Null, logprobs_json),
        "finish_reason": c.finish_reason.as_str(),
    })
}

/// Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}`.
pub(super) fn logprobs_json(tokens: &[backend::TokenLogprob]) -> Value {
    json!({"content": tokens, "refusal": null})
}

/// What every chunk of a stream repeats: the completion's id (the one feedback names) and the
/// model as the client named it.
struct Head {
    id: String,
    model: String,
}

/// Writes the chunks of one stream. Nearly every chunk differs from the others only inside
/// `choices`; those are written from a fixed head and tail around the choice, built once,
/// instead of through a `Value` each time (the same JSON, at a fraction of the allocations).
/// The head and tail carry the event's `data: ` and blank line too.
struct Framer {
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    head: String,
    tail: String,
}

impl Framer {
    fn new(head: Head, include_usage: bool) -> Self {
        let mut f = Framer {
            id: head.id,
            model: head.model,
            created: wire::now_secs(),
            include_usage,
            head: String::new(),
            tail: String::new(),
        };
        let c = f.value(json!([])).to_string();
        let at = c
            .rfind("\"choices\":[")
            .map_or(0, |i| i + "\"choices\":[".len());
        f.head = format!("data: {}", &c[..at]);
        f.tail = format!("{}\n\n", &c[at..]);
        f
    }

    /// A whole chunk as a value, `usage` null when the client asked for usage.
    fn value(&self, choices: Value) -> Value {
        let mut c = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The SSE event of a chunk with one choice, the choice given as its JSON text.
    fn one(&self, choice: std::fmt::Arguments) -> Bytes {
        Bytes::from(format!("{}{choice}{}", self.head, self.tail))
    }

    fn role(&self, index: usize) -> Bytes {
        self.one(format_args!(
            "{{\"index\":{index},\"delta\":{{\"role\":\"assistant\",\"content\":\"\"}},\"logprobs\":null,\"finish_reason\":null}}"
        ))
    }

    fn delta(&self, index: u32, text: &str, logprobs: Option<Vec<backend::TokenLogprob>>) -> Bytes {
        let text = serde_json::to_string(text).unwrap_or_default();
        let lp = logprobs.map_or_else(|| "null".to_owned(), |t| logprobs_json(&t).to_string());
        self.one(format_args!(
            "{{\"index\":{index},\"delta\":{{\"content\":{text}}},\"logprobs\":{lp},\"finish_reason\":null}}"
        ))
    }

    fn finish(&self, index: usize, reason: FinishReason) -> Bytes {
        self.one(format_args!(
            "{{\"index\":{index},\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"{}\"}}",
            reason.as_str()
        ))
    }

    /// A call as OpenAI streams it: its id, type and name first, with empty arguments, then the
    /// arguments; `k` counts the choice's calls.
    fn tool_call(&self, index: u32, k: usize, call: &backend::ToolCall) -> [Bytes; 2] {
        let head = json!({"index": k, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}});
        let args = json!({"index": k, "function": {"arguments": call.arguments}});
        [head, args].map(|piece| {
            let choice = json!({"index": index, "delta": {"tool_calls": [piece]}, "logprobs": null, "finish_reason": null});
            self.one(format_args!("{choice}"))
        })
    }

    /// Progress rides on a chunk with an empty delta, so clients that only read
    /// `choices[0].delta.content` see nothing and never miss a choice.
    fn progress(&self, p: Value) -> Bytes {
        let mut c =
            self.value(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": null}]));
        c["experient"] = p;
        pipeline::frame(&c.to_string())
    }

    /// The usage chunk: no choices, then the usage and what experient applied.
    fn usage(&self, usage: Usage, applied: &Applied) -> Bytes {
        let usage = serde_json::to_string(&WireUsage::from(usage)).unwrap_or_default();
        let applied = serde_json::to_string(applied).unwrap_or_default();
        Bytes::from(format!(
            "{}],\"usage\":{usage},\"experient\":{applied}}}\n\n",
            self.head
        ))
    }
}

/// What a stream has told each choice so far.
struct Choices {
    finished: Vec<bool>,
    /// Calls streamed so far, per choice: the next call's `index`.
    calls: Vec<usize>,
    /// Log probabilities waiting for the choice's next delta.
    logprobs: Vec<Option<Vec<backend::TokenLogprob>>>,
}

impl Choices {
    fn new(n: usize) -> Self {
        Choices {
            finished: vec![false; n],
            calls: vec![0; n],
            logprobs: vec![None; n],
        }
    }

    /// The frames one event becomes, pushed onto `out`; a finish is sent once per choice.
    fn on(&mut self, ev: Event, f: &Framer, out: &mut Vec<Bytes>) {
        let i = |index: u32| index as usize;
        match ev {
            Event::Model(Model::Delta { index, text }) => {
                let lp = self.logprobs.get_mut(i(index)).and_then(Option::take);
                out.push(f.delta(index, &text, lp));
            }
            Event::Model(Model::Logprobs { index, tokens }) => {
                if let Some(l) = self.logprobs.get_mut(i(index)) {
                    l.get_or_insert_with(Vec::new).extend(tokens);
                }
            }
            Event::Model(Model::Finish { index, reason }) => {
                if let Some(l) = self.logprobs.get_mut(i(index)) {
                    *l = None;
                }
                if let Some(done) = self.finished.get_mut(i(index)) {
                    if !std::mem::replace(done, true) {
                        out.push(f.finish(i(index), reason));
                    }
                }
            }
            Event::Model(Model::ToolCall { index, call }) => {
                if let Some(k) = self.calls.get_mut(i(index)) {
                    out.extend(f.tool_call(index, *k, &call));
                    *k += 1;
                }
            }
            Event::Progress(p) => out.push(f.progress(p)),
            // The pipeline keeps these; they are never passed to a wire.
            Event::Trace(_) | Event::Model(Model::Usage(_)) => {}
        }
    }

    /// A finish for every choice the method left open.
    fn close(&self, f: &Framer, out: &mut Vec<Bytes>) {
        let open = self.finished.iter().enumerate().filter(|(_, done)| !**done);
        out.extend(open.map(|(i, _)| f.finish(i, FinishReason::Stop)));
    }
}

/// Chat's translation out: a `chat.completion`, or the SSE events of an OpenAI chunk stream
/// (one id and one `created` throughout, the role in each choice's first delta, exactly one
/// finish_reason per choice, the usage chunk (`choices: []`) when asked for, an error event in
/// the OpenAI envelope if generation fails, and `[DONE]` last in every case).
struct ChatWire {
    framer: Framer,
    choices: Choices,
}

impl ChatWire {
    fn new(head: Head, n: usize, include_usage: bool) -> Self {
        ChatWire {
            framer: Framer::new(head, include_usage),
            choices: Choices::new(n),
        }
    }
}

impl Wire for ChatWire {
    fn id(&self) -> &str {
        &self.framer.id
    }

    fn open(&mut self, _: &Applied, out: &mut Vec<Bytes>) {
        out.extend((0..self.choices.finished.len()).map(|i| self.framer.role(i)));
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        self.choices.on(event, &self.framer, out);
    }

    fn close(&mut self, usage: Usage, applied: &Applied, out: &mut Vec<Bytes>) {
        self.choices.close(&self.framer, out);
        if self.framer.include_usage {
            out.push(self.framer.usage(usage, applied));
        }
        out.push(Bytes::from_static(pipeline::DONE));
    }

    fn fail(&mut self, error: &Error, out: &mut Vec<Bytes>) {
        out.push(pipeline::frame(&error.envelope().to_string()));
        out.push(Bytes::from_static(pipeline::DONE));
    }

    fn whole(&mut self, done: Completion, applied: &Applied) -> crate::Result<Value> {
        let choices: Vec<Value> = done
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| choice_json(i, c))
            .collect();
        Ok(json!({
            "id": self.framer.id,
            "object": "chat.completion",
            "created": wire::now_secs(),
            "model": self.framer.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
            "usage": WireUsage::from(done.usage),
            "experient": applied,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Event;
    use crate::methods;
    use futures::{Stream, StreamExt};
    use pipeline::{KEEP_ALIVE, KEEP_ALIVE_EVERY};
    use std::time::Duration;

    /// Chat's stream through the pipeline's SSE writer.
    fn chunks(
        events: methods::Events,
        head: Head,
        n: usize,
        include_usage: bool,
        applied: Applied,
        every: Duration,
    ) -> impl Stream<Item = Bytes> + Send {
        let out = ChatWire::new(head, n, include_usage);
        pipeline::sse(events, out, applied, &NAMES, every)
    }
    use crate::router::Method;

    fn head(model: &str) -> Head {
        Head {
            id: wire::completion_id(),
            model: model.into(),
        }
    }

    fn applied() -> Applied {
        Applied {
            trace: None,
            method: Method::Direct,
            model: "m".into(),
            library: None,
            experiences: None,
            version: None,
            retrieval: None,
            canary: None,
        }
    }

    /// The payload of one SSE event, checked to be exactly one `data:` event.
    fn payload(frame: &Bytes) -> String {
        let f = std::str::from_utf8(frame).unwrap();
        let p = f
            .strip_prefix("data: ")
            .unwrap()
            .strip_suffix("\n\n")
            .unwrap();
        assert!(!p.contains('\n'), "{f:?} is one event");
        p.to_owned()
    }

    async fn run(events: Vec<crate::Result<Event>>, include_usage: bool) -> Vec<Value> {
        let s = methods::model_events(futures::stream::iter(events).boxed());
        chunks(s, head("m"), 1, include_usage, applied(), KEEP_ALIVE_EVERY)
            .map(|f| {
                let d = payload(&f);
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

    /// A stream that stays quiet gets the comment, and nothing else changes in it.
    #[tokio::test]
    async fn a_quiet_stream_gets_keep_alive_comments() {
        let events = methods::model_events(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok(Event::Delta {
                    index: 0,
                    text: "late".into(),
                })
            })
            .boxed(),
        );
        let every = Duration::from_millis(50);
        let out: Vec<Bytes> = chunks(events, head("m"), 1, false, applied(), every)
            .collect()
            .await;
        let comments = out.iter().filter(|f| f.as_ref() == KEEP_ALIVE).count();
        assert!(comments >= 1, "{out:?}");
        let events: Vec<String> = out
            .iter()
            .filter(|f| f.as_ref() != KEEP_ALIVE)
            .map(payload)
            .collect();
        assert!(events[1].contains("\"content\":\"late\""), "{events:?}");
        assert_eq!(events.last().unwrap(), "[DONE]");
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
        let s = methods::model_events(futures::stream::iter(events).boxed());
        let out: Vec<String> = chunks(s, head("m\"x"), 2, true, applied(), KEEP_ALIVE_EVERY)
            .map(|f| payload(&f))
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
