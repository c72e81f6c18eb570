//! A model served by another OpenAI-compatible server, through `async-openai`'s configuration
//! (base URL, key and headers) and its middleware HTTP service.
//!
//! The answer's SSE body is read here, in the request's own task, rather than through
//! `Chat::create_stream`: that spawns a task per stream that parses events with a nom-based
//! parser and hands each one over a channel; that task was about a sixth of the proxy's CPU
//! samples under load, and reading here cut CPU per request by about a sixth
//! (`cargo bench --bench proxy_overhead`, perf).
//!
//! Requests always go upstream as streams, so that text is passed on as it arrives and a
//! non-streaming client is served by the same path (`Backend::complete` collects). Chunks are
//! read leniently (servers differ in what they put in them) and normalised into [`Event`]s:
//! finish reasons are mapped onto OpenAI's set, every choice gets exactly one finish, and a
//! usage event is always produced, estimated when the upstream sends none.
//!
//! Failures before the first token (connect errors, timeouts, 429 and 5xx) are retried with
//! exponential backoff that honours `Retry-After`; the caller (a fallback chain) sees only the
//! last one. Upstream 4xx are final and keep the upstream's status and message. A failure after
//! the first token ends the stream with an error. Dropping the stream drops the connection,
//! which cancels the upstream request.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::config::{Config, OpenAIConfig};
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tower::ServiceExt;

use super::{Admission, Backend, ChatRequest, Event, EventStream, FinishReason, Usage};
use crate::config::{UpstreamGrammars, UpstreamModelConfig};
use crate::error::{Error, Result};

/// A model served by another OpenAI-compatible server, reached with async-openai's config.
pub struct UpstreamBackend {
    id: String,
    model: String,
    base_url: String,
    /// `{base_url}/chat/completions`, as async-openai's config builds it, parsed once: reqwest
    /// would parse a string again for every request, which showed in the profile.
    url: reqwest::Url,
    /// `{base_url}/completions`, for legacy text completions.
    completions_url: reqwest::Url,
    /// The config's headers (the key's `Authorization`) are the client's defaults.
    http: reqwest::Client,
    service: Service,
    first_byte: Duration,
    total: Duration,
    max_retries: u32,
    admission: Admission,
    price: Option<crate::config::Price>,
    /// How the methods' grammars are sent, if at all.
    grammars: crate::config::UpstreamGrammars,
}

/// An upstream's answer with an error status, read before async-openai sees it, because its own
/// error type drops the headers (`Retry-After`).
#[derive(Debug)]
struct HttpFailure {
    status: u16,
    retry_after: Option<Duration>,
    message: String,
    kind: Option<String>,
    param: Option<String>,
    code: Option<String>,
}

impl std::fmt::Display for HttpFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "upstream answered {}: {}", self.status, self.message)
    }
}

impl std::error::Error for HttpFailure {}

/// The HTTP layer under async-openai: plain reqwest, no retries, error statuses turned into
/// [`HttpFailure`]s that keep what the retry logic needs.
#[derive(Clone)]
struct Service(ReqwestService);

impl tower::Service<HttpRequestFactory> for Service {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<reqwest::Response, OpenAIError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let fut = self.0.call(request);
        Box::pin(async move {
            let response = fut.await?;
            if response.status().is_success() {
                return Ok(response);
            }
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64);
            let body = response.bytes().await.unwrap_or_default();
            let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let e = &envelope["error"];
            let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
            Err(OpenAIError::Boxed(Box::new(HttpFailure {
                status,
                retry_after,
                message: text(&e["message"])
                    .or_else(|| text(e))
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned()),
                kind: text(&e["type"]),
                param: text(&e["param"]),
                code: text(&e["code"]).or_else(|| e["code"].as_i64().map(|c| c.to_string())),
            })))
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Chunk {
    choices: Vec<ChunkChoice>,
    usage: Option<ChunkUsage>,
    error: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChunkChoice {
    index: u32,
    delta: Option<Delta>,
    /// A legacy completion's text.
    text: Option<String>,
    finish_reason: Option<String>,
    logprobs: Option<serde_json::Value>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta {
    content: Option<String>,
    tool_calls: Option<Vec<DeltaCall>>,
}

/// A piece of a streamed tool call, as servers send it: OpenAI puts the id, type and name in a
/// call's first piece and argument fragments in the rest; others repeat fields or leave some out.
#[derive(Deserialize, Default)]
#[serde(default)]
struct DeltaCall {
    index: Option<u32>,
    id: Option<String>,
    function: Option<DeltaFunction>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DeltaFunction {
    name: Option<String>,
    arguments: Option<serde_json::Value>,
}

/// A choice's calls, put together from their pieces. The quirks of real servers are
/// normalised here, so that the client always sees OpenAI's shape:
/// - llama-cpp-python's server repeats the name (and id) in every piece, which the official
///   SDK's stream helpers would concatenate: the first is kept, repeats are dropped;
/// - a piece without `index` continues the last call, unless it brings a new id;
/// - a call without an id gets one; arguments sent as a JSON object rather than text are
///   written as text; a call with no arguments gets `{}`;
/// - a choice that made calls finishes with `tool_calls`, whatever reason the server gave.
#[derive(Default)]
struct CallAssembly {
    calls: Vec<(Option<u32>, super::ToolCall)>,
}

impl CallAssembly {
    fn push(&mut self, piece: DeltaCall) {
        let f = piece.function.unwrap_or_default();
        let existing = match (piece.index, &piece.id) {
            (Some(k), _) => self.calls.iter().position(|(i, _)| *i == Some(k)),
            (None, Some(id)) => self.calls.iter().position(|(_, c)| &c.id == id),
            (None, None) => self.calls.len().checked_sub(1),
        };
        let at = match existing {
            Some(at) => at,
            None => {
                self.calls.push((
                    piece.index,
                    super::ToolCall {
                        id: piece.id.clone().unwrap_or_else(super::tools::call_id),
                        name: String::new(),
                        arguments: String::new(),
                    },
                ));
                self.calls.len() - 1
            }
        };
        let call = &mut self.calls[at].1;
        if call.name.is_empty() {
            if let Some(n) = f.name {
                call.name = n;
            }
        }
        match f.arguments {
            Some(serde_json::Value::String(a)) => call.arguments.push_str(&a),
            Some(serde_json::Value::Null) | None => {}
            Some(other) => call.arguments.push_str(&other.to_string()),
        }
    }

    fn take(&mut self) -> Vec<super::ToolCall> {
        let mut calls: Vec<_> = std::mem::take(&mut self.calls);
        calls.sort_by_key(|(i, _)| *i);
        calls
            .into_iter()
            .map(|(_, mut c)| {
                if c.arguments.trim().is_empty() {
                    c.arguments = "{}".into();
                }
                c
            })
            .collect()
    }
}

/// A chunk's log probabilities: chat's `{"content": [...]}`, or a legacy completion's
/// `{"tokens", "token_logprobs", "top_logprobs"}`.
fn read_logprobs(v: &serde_json::Value) -> Vec<super::TokenLogprob> {
    use super::{TokenLogprob, TopLogprob};
    let bytes = |v: &serde_json::Value| -> Option<Vec<u8>> {
        v.as_array().map(|b| {
            b.iter()
                .filter_map(|x| x.as_u64().map(|x| x as u8))
                .collect()
        })
    };
    if let Some(content) = v.get("content").and_then(|c| c.as_array()) {
        return content
            .iter()
            .map(|t| TokenLogprob {
                token: t["token"].as_str().unwrap_or_default().to_owned(),
                logprob: t["logprob"].as_f64().unwrap_or_default() as f32,
                bytes: bytes(&t["bytes"]),
                top_logprobs: t["top_logprobs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| TopLogprob {
                        token: a["token"].as_str().unwrap_or_default().to_owned(),
                        logprob: a["logprob"].as_f64().unwrap_or_default() as f32,
                        bytes: bytes(&a["bytes"]),
                    })
                    .collect(),
            })
            .collect();
    }
    let tokens = v["tokens"].as_array().cloned().unwrap_or_default();
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let token = t.as_str().unwrap_or_default().to_owned();
            TokenLogprob {
                bytes: Some(token.as_bytes().to_vec()),
                logprob: v["token_logprobs"][i].as_f64().unwrap_or_default() as f32,
                top_logprobs: v["top_logprobs"][i]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, lp)| TopLogprob {
                        bytes: Some(k.as_bytes().to_vec()),
                        token: k.clone(),
                        logprob: lp.as_f64().unwrap_or_default() as f32,
                    })
                    .collect(),
                token,
            }
        })
        .collect()
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChunkUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// The request as it goes upstream: the fields every OpenAI-compatible server reads, from the
/// request's own values without building a JSON tree first.
#[derive(Serialize)]
struct UpstreamBody<'a> {
    model: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    messages: Vec<UpstreamMessage<'a>>,
    /// A legacy completion's prompt (sent to `/completions`).
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt: Option<&'a str>,
    stream: bool,
    stream_options: StreamOptions,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f32>,
    #[serde(skip_serializing_if = "LogitBias::is_empty")]
    logit_bias: LogitBias<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<serde_json::Value>,
    /// vLLM's structured outputs: a method's grammar (`grammars = "vllm"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    structured_outputs: Option<serde_json::Value>,
    /// The same for vLLM before 0.10.2 (`grammars = "vllm-guided"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    guided_grammar: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    /// Chat: `true` with `top_logprobs`; a legacy completion: the number of alternatives.
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_logprobs: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

/// A message as it goes upstream. An assistant turn that only made calls is sent with content
/// `""` rather than `null`, which some servers refuse.
#[derive(Serialize)]
struct UpstreamMessage<'a> {
    role: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

fn tool_json(t: &super::ToolSpec) -> serde_json::Value {
    let mut f = serde_json::json!({"name": t.name});
    if !t.description.is_empty() {
        f["description"] = t.description.clone().into();
    }
    if !t.parameters.is_null() {
        f["parameters"] = t.parameters.clone();
    }
    if let Some(s) = t.strict {
        f["strict"] = s.into();
    }
    serde_json::json!({"type": "function", "function": f})
}

fn tool_choice_json(r: &ChatRequest) -> Option<serde_json::Value> {
    use super::ToolChoice;
    if r.tools.is_empty() {
        return None;
    }
    Some(match &r.tool_choice {
        ToolChoice::Auto => return None,
        ToolChoice::None => "none".into(),
        ToolChoice::Required => "required".into(),
        ToolChoice::Function(n) => serde_json::json!({"type": "function", "function": {"name": n}}),
    })
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The output format as OpenAI's `response_format`; plain text is left out, as clients do.
fn response_format(f: &super::OutputFormat) -> Option<serde_json::Value> {
    use super::OutputFormat;
    match f {
        // A method's grammar goes in vLLM's own field, where the upstream takes it at all.
        OutputFormat::Text | OutputFormat::Grammar(_) => None,
        OutputFormat::JsonObject => Some(serde_json::json!({"type": "json_object"})),
        OutputFormat::JsonSchema {
            name,
            schema,
            strict,
        } => {
            let mut js = serde_json::json!({"name": name, "schema": schema});
            if let Some(s) = strict {
                js["strict"] = serde_json::json!(s);
            }
            Some(serde_json::json!({"type": "json_schema", "json_schema": js}))
        }
    }
}

/// Token ids and biases, as OpenAI's map from the id as a string to the bias.
struct LogitBias<'a>(&'a [(u32, f32)]);

impl LogitBias<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for LogitBias<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(t, b)| (t.to_string(), b)))
    }
}

/// Splits an SSE body into its events' data, as the WHATWG event-stream format reads: lines end
/// in LF, CR or CRLF; `data` fields join with LF; comments and other fields are skipped; a blank
/// line ends an event, and one without data is no event.
///
/// Written out rather than taken from `eventsource-stream` (which async-openai uses): that
/// crate's nom parser was about 5% of the proxy's CPU samples under load in its own code
/// alone, and an upstream's answer needs nothing of SSE but the data of each event.
#[derive(Default)]
struct SseReader {
    buf: BytesMut,
    data: Vec<u8>,
    has_data: bool,
    /// The event's `event` field is `keepalive`: some servers send such events, and they carry
    /// no chunk.
    keepalive: bool,
}

impl SseReader {
    fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The data of the next complete event in what has been pushed so far.
    fn next_event(&mut self) -> Option<Vec<u8>> {
        loop {
            let end = memchr::memchr2(b'\n', b'\r', &self.buf)?;
            // A CR at the end of what has arrived may be the first half of a CRLF.
            let crlf = self.buf[end] == b'\r' && self.buf.get(end + 1) == Some(&b'\n');
            if self.buf[end] == b'\r' && end + 1 == self.buf.len() {
                return None;
            }
            let line = self.buf.split_to(end + if crlf { 2 } else { 1 });
            let line = &line[..end];
            if line.is_empty() {
                let keepalive = std::mem::take(&mut self.keepalive);
                if std::mem::take(&mut self.has_data) && !keepalive {
                    return Some(std::mem::take(&mut self.data));
                }
                self.data.clear();
                continue;
            }
            let (field, value) = match memchr::memchr(b':', line) {
                Some(0) => continue,
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (line, &line[..0]),
            };
            match field {
                b"data" => {
                    if std::mem::replace(&mut self.has_data, true) {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                }
                b"event" => self.keepalive = value == b"keepalive",
                _ => {}
            }
        }
    }
}

/// An upstream answer's chunks, read from its body.
type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, OpenAIError>> + Send>>;

/// The chunks of an SSE body, up to `[DONE]` or the body's end.
fn chunks(response: reqwest::Response) -> ChunkStream {
    async_stream::stream! {
        let mut body = response.bytes_stream();
        let mut reader = SseReader::default();
        loop {
            while let Some(data) = reader.next_event() {
                if data == b"[DONE]" {
                    return;
                }
                yield serde_json::from_slice::<Chunk>(&data).map_err(|e| {
                    OpenAIError::JSONDeserialize(e, String::from_utf8_lossy(&data).into_owned())
                });
            }
            match body.next().await {
                Some(Ok(bytes)) => reader.push(&bytes),
                Some(Err(e)) => {
                    yield Err(OpenAIError::Reqwest(e));
                    return;
                }
                None => return,
            }
        }
    }
    .boxed()
}

/// Whether an error before the first token is worth another try (here, or at the next model of
/// a fallback chain).
pub fn retryable(e: &Error) -> bool {
    crate::retry::transient(e)
}

impl UpstreamBackend {
    /// A client for the configured upstream (no request is made yet).
    pub fn new(c: &UpstreamModelConfig) -> anyhow::Result<Self> {
        let key = match &c.api_key_env {
            Some(var) => std::env::var(var)
                .map_err(|_| anyhow::anyhow!("the environment variable {var} is not set"))?,
            None => String::new(),
        };
        let config = OpenAIConfig::new()
            .with_api_base(c.base_url.trim_end_matches('/'))
            .with_api_key(key);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(c.connect_timeout_secs))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(c.max_concurrent.min(1024))
            .default_headers(config.headers())
            .build()?;
        Ok(UpstreamBackend {
            id: c.id.clone(),
            model: c.model.clone().unwrap_or_else(|| c.id.clone()),
            base_url: c.base_url.clone(),
            url: reqwest::Url::parse(&config.url("/chat/completions"))?,
            completions_url: reqwest::Url::parse(&config.url("/completions"))?,
            service: Service(ReqwestService::new(http.clone())),
            http,
            first_byte: Duration::from_secs_f64(c.first_byte_timeout_secs),
            total: Duration::from_secs_f64(c.total_timeout_secs),
            max_retries: c.max_retries,
            price: c.price,
            grammars: c.grammars,
            admission: Admission::with_background(
                &c.id,
                c.max_concurrent,
                c.queue,
                crate::config::background_slots(c.background_slots, c.max_concurrent),
            ),
        })
    }

    /// The upstream request's JSON, serialised once for every attempt.
    fn body(&self, r: &ChatRequest) -> Bytes {
        let s = &r.sampling;
        let legacy = r.raw_prompt.is_some();
        let body = UpstreamBody {
            model: &self.model,
            messages: r
                .messages
                .iter()
                .map(|m| UpstreamMessage {
                    role: m.role.as_str(),
                    content: &m.content,
                    tool_calls: m
                        .tool_calls
                        .iter()
                        .map(|c| serde_json::json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                        .collect(),
                    tool_call_id: m.tool_call_id.as_deref(),
                })
                .collect(),
            prompt: r.raw_prompt.as_deref(),
            stream: true,
            stream_options: StreamOptions {
                include_usage: true,
            },
            max_tokens: s.max_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            n: (s.n > 1).then_some(s.n),
            stop: &s.stop,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logit_bias: LogitBias(&s.logit_bias),
            seed: s.seed,
            response_format: response_format(&s.format),
            structured_outputs: match (&s.format, self.grammars) {
                (super::OutputFormat::Grammar(g), UpstreamGrammars::Vllm) => {
                    Some(serde_json::json!({ "grammar": g }))
                }
                _ => None,
            },
            guided_grammar: match (&s.format, self.grammars) {
                (super::OutputFormat::Grammar(g), UpstreamGrammars::VllmGuided) => Some(g),
                _ => None,
            },
            tools: r.tools.iter().map(tool_json).collect(),
            tool_choice: tool_choice_json(r),
            parallel_tool_calls: r.parallel_tool_calls.filter(|_| !r.tools.is_empty()),
            logprobs: match (s.logprobs, legacy) {
                (None, _) => None,
                (Some(k), true) => Some(k.into()),
                (Some(_), false) => Some(true.into()),
            },
            top_logprobs: s.logprobs.filter(|&k| k > 0 && !legacy),
            user: r.user.as_deref(),
        };
        // Serialising borrowed strings and numbers cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    fn convert(&self, e: OpenAIError, deadline_hit: bool) -> Error {
        if deadline_hit {
            return Error::Timeout(format!(
                "the upstream for '{}' sent nothing within {:.1} s",
                self.id,
                self.first_byte.as_secs_f64()
            ));
        }
        match e {
            OpenAIError::Boxed(b) => match b.downcast::<HttpFailure>() {
                Ok(f) => match f.status {
                    429 => Error::Overloaded {
                        message: format!(
                            "the upstream for '{}' is rate limited: {}",
                            self.id, f.message
                        ),
                        retry_after_secs: f.retry_after.map_or(1, |d| d.as_secs().max(1)),
                    },
                    s if s >= 500 => Error::Upstream {
                        status: 502,
                        message: format!(
                            "the upstream for '{}' failed ({s}): {}",
                            self.id, f.message
                        ),
                        kind: Some("upstream_error".into()),
                        param: None,
                        code: Some(s.to_string()),
                    },
                    s => Error::Upstream {
                        status: s,
                        message: f.message,
                        kind: f.kind,
                        param: f.param,
                        code: f.code,
                    },
                },
                Err(other) => Error::Unavailable(format!("upstream for '{}': {other}", self.id)),
            },
            OpenAIError::Reqwest(e) if e.is_timeout() => Error::Timeout(format!(
                "the upstream for '{}' at {} timed out: {e}",
                self.id, self.base_url
            )),
            OpenAIError::Reqwest(e) => Error::Unavailable(format!(
                "the upstream for '{}' at {} cannot be reached: {e}",
                self.id, self.base_url
            )),
            other => Error::Upstream {
                status: 502,
                message: format!(
                    "the upstream for '{}' sent something unreadable: {other}",
                    self.id
                ),
                kind: Some("upstream_error".into()),
                param: None,
                code: None,
            },
        }
    }

    /// One attempt: sends the request and waits for the answer's first chunk.
    async fn open(&self, body: &Bytes, legacy: bool) -> Result<(ChunkStream, Chunk)> {
        let attempt = async {
            let url = if legacy {
                &self.completions_url
            } else {
                &self.url
            };
            let (http, url, body) = (self.http.clone(), url.clone(), body.clone());
            let request = HttpRequestFactory::new(move || {
                let request = http
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
                    .build();
                async move { request.map_err(OpenAIError::Reqwest) }
            });
            let response = self.service.clone().oneshot(request).await?;
            let mut s = chunks(response);
            match s.next().await {
                Some(Ok(first)) => Ok((s, first)),
                Some(Err(e)) => Err(e),
                None => Err(OpenAIError::StreamError(Box::new(
                    async_openai::error::StreamError::EventStream(
                        "the upstream closed the stream without sending anything".into(),
                    ),
                ))),
            }
        };
        match tokio::time::timeout(self.first_byte, attempt).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.convert(e, false)),
            Err(_) => Err(self.convert(OpenAIError::InvalidArgument(String::new()), true)),
        }
    }
}

/// What an upstream stream has told each choice so far, and how its chunks become events:
/// tool calls are assembled from their pieces and sent whole before their choice's finish,
/// every choice gets exactly one finish, and the usage comes last.
struct Translate {
    finished: Vec<bool>,
    calls: Vec<CallAssembly>,
    usage: Option<Usage>,
    deltas: u64,
}

impl Translate {
    fn new(n: u32) -> Self {
        Translate {
            finished: vec![false; n as usize],
            calls: (0..n).map(|_| CallAssembly::default()).collect(),
            usage: None,
            deltas: 0,
        }
    }

    /// The events of one chunk, pushed onto `out`; an error the upstream sent inside the
    /// stream ends it.
    fn chunk(&mut self, chunk: Chunk, out: &mut Vec<Event>) -> Result<()> {
        if let Some(e) = chunk.error {
            return Err(Error::Upstream {
                status: 502,
                message: e["message"]
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| e.to_string()),
                kind: e["type"].as_str().map(str::to_owned),
                param: None,
                code: None,
            });
        }
        for c in chunk.choices {
            self.choice(c, out);
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
            });
        }
        Ok(())
    }

    /// One choice's piece of a chunk; choices past `n` or already finished are dropped.
    fn choice(&mut self, c: ChunkChoice, out: &mut Vec<Event>) {
        let i = c.index as usize;
        if self.finished.get(i) != Some(&false) {
            return;
        }
        let (content, pieces) = match c.delta {
            Some(d) => (d.content, d.tool_calls.unwrap_or_default()),
            None => (None, vec![]),
        };
        for piece in pieces {
            self.calls[i].push(piece);
        }
        if let Some(text) = content.or(c.text).filter(|t| !t.is_empty()) {
            self.deltas += 1;
            if let Some(l) = c.logprobs.as_ref().filter(|l| !l.is_null()) {
                let tokens = read_logprobs(l);
                out.push(Event::Logprobs {
                    index: c.index,
                    tokens,
                });
            }
            out.push(Event::Delta {
                index: c.index,
                text,
            });
        }
        if let Some(r) = c.finish_reason {
            self.finish(i, FinishReason::from_backend(&r), out);
        }
    }

    /// A choice's assembled calls, then its finish: `tool_calls` whenever it made any (some
    /// servers say `stop`), except `length`: a call cut by the token limit says so, as OpenAI
    /// returns it.
    fn finish(&mut self, i: usize, reason: FinishReason, out: &mut Vec<Event>) {
        self.finished[i] = true;
        let index = i as u32;
        let made = self.calls[i].take();
        let reason = if made.is_empty() || reason == FinishReason::Length {
            reason
        } else {
            FinishReason::ToolCalls
        };
        out.extend(made.into_iter().map(|call| Event::ToolCall { index, call }));
        out.push(Event::Finish { index, reason });
    }

    /// The end of the stream: a finish for every choice left open, and the usage. Some servers
    /// never report usage; an estimate (about four characters a prompt token, one token a
    /// streamed delta) beats a missing chunk a client waits for.
    fn close(mut self, prompt_chars: usize, out: &mut Vec<Event>) {
        for i in 0..self.finished.len() {
            if !self.finished[i] {
                self.finish(i, FinishReason::Stop, out);
            }
        }
        out.push(Event::Usage(self.usage.unwrap_or(Usage {
            prompt_tokens: (prompt_chars as u64).div_ceil(4),
            completion_tokens: self.deltas,
        })));
    }
}

#[async_trait::async_trait]
impl Backend for UpstreamBackend {
    fn ready(&self) -> bool {
        true
    }

    fn price(&self) -> Option<crate::config::Price> {
        self.price
    }

    /// Only where the configuration says the upstream takes the methods' grammars.
    fn constrains(&self) -> bool {
        self.grammars != UpstreamGrammars::None
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        let n = request.sampling.n.max(1);
        let permit = self.admission.admit(1, request.priority).await?;
        let body = self.body(&request);
        let deadline = Instant::now() + self.total;
        let policy = crate::retry::Policy {
            retries: self.max_retries as usize,
            first: Duration::from_millis(200),
            max: Duration::from_secs(30),
            deadline: Some(deadline.into_std()),
        };
        let raw = request.raw_prompt.is_some();
        let (mut upstream, first) =
            crate::retry::retry(&self.id, policy, || self.open(&body, raw)).await?;
        let prompt_chars: usize = request
            .messages
            .iter()
            .map(|m| m.content.len())
            .sum::<usize>()
            + request.raw_prompt.as_ref().map_or(0, String::len);
        let id = self.id.clone();
        let total = self.total;
        Ok(async_stream::stream! {
            let _permit = permit;
            let mut state = Translate::new(n);
            let mut out = Vec::new();
            let mut next = Some(Ok(first));
            // One timer for the whole stream, registered once: a timeout around each read
            // would register and cancel a timer for every chunk.
            let mut expiry = std::pin::pin!(tokio::time::sleep_until(deadline));
            loop {
                let item = match next.take() {
                    Some(i) => Some(i),
                    None => tokio::select! {
                        biased;
                        i = upstream.next() => i,
                        _ = &mut expiry => {
                            yield Err(Error::Timeout(format!(
                                "the generation ran past the {:.0} s limit for this model",
                                total.as_secs_f64()
                            )));
                            return;
                        }
                    },
                };
                let chunk = match item {
                    None => break,
                    Some(Ok(c)) => c,
                    Some(Err(e)) => {
                        yield Err(Error::Upstream {
                            status: 502,
                            message: format!("the upstream for '{id}' failed mid-stream: {e}"),
                            kind: Some("upstream_error".into()),
                            param: None,
                            code: None,
                        });
                        return;
                    }
                };
                let read = state.chunk(chunk, &mut out);
                for ev in out.drain(..) {
                    yield Ok(ev);
                }
                if let Err(e) = read {
                    yield Err(e);
                    return;
                }
            }
            state.close(prompt_chars, &mut out);
            for ev in out.drain(..) {
                yield Ok(ev);
            }
        }
        .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event's data, with the body pushed in pieces of `step` bytes.
    fn events(body: &str, step: usize) -> Vec<String> {
        let mut r = SseReader::default();
        let mut out = Vec::new();
        for piece in body.as_bytes().chunks(step) {
            r.push(piece);
            while let Some(d) = r.next_event() {
                out.push(String::from_utf8(d).unwrap());
            }
        }
        out
    }

    #[test]
    fn sse_events_are_read_whatever_the_reads_split() {
        let body = concat!(
            ": a comment\n",
            "data: {\"a\":1}\n\n",
            "event: keepalive\ndata: {}\n\n",
            "id: 7\r\nretry: 10\r\ndata:{\"b\":2}\r\n\r\n",
            "data: one\rdata: two\r\r",
            "event: only\n\n",
            "data\n\n",
            "data: [DONE]\n\n",
            "data: unfinished",
        );
        let want = vec!["{\"a\":1}", "{\"b\":2}", "one\ntwo", "", "[DONE]"];
        for step in [1, 2, 3, 7, body.len()] {
            assert_eq!(events(body, step), want, "pushed {step} bytes at a time");
        }
    }

    #[test]
    fn a_cr_at_the_end_of_a_read_waits_for_a_possible_lf() {
        let mut r = SseReader::default();
        r.push(b"data: x\r");
        assert_eq!(r.next_event(), None);
        r.push(b"\n\r\n");
        assert_eq!(r.next_event().as_deref(), Some(&b"x"[..]));
        assert_eq!(r.next_event(), None);
    }

    fn piece(v: serde_json::Value) -> DeltaCall {
        serde_json::from_value(v).unwrap()
    }

    /// The pieces as llama-cpp-python's server streams them (id and name repeated in every
    /// piece), as OpenAI does (id and name once), and from a server that leaves out the index
    /// and ids: each assembles into the same calls.
    #[test]
    fn streamed_calls_assemble_whatever_the_server_repeats_or_omits() {
        use serde_json::json;
        let shapes = [
            vec![
                json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": "}}),
                json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": "\"Oslo\"}"}}),
                json!({"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": ""}}),
            ],
            vec![
                json!({"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}),
                json!({"index": 0, "function": {"arguments": "{\"city\": "}}),
                json!({"index": 0, "function": {"arguments": "\"Oslo\"}"}}),
                json!({"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time"}}),
            ],
            vec![
                json!({"id": "call_a", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}),
                json!({"id": "call_b", "function": {"name": "get_time", "arguments": null}}),
            ],
        ];
        for shape in shapes {
            let mut a = CallAssembly::default();
            for p in shape {
                a.push(piece(p));
            }
            let calls = a.take();
            let got: Vec<(&str, &str, serde_json::Value)> = calls
                .iter()
                .map(|c| {
                    (
                        c.id.as_str(),
                        c.name.as_str(),
                        serde_json::from_str(&c.arguments).unwrap(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                vec![
                    ("call_a", "get_weather", json!({"city": "Oslo"})),
                    ("call_b", "get_time", json!({}))
                ]
            );
        }
        // No id at all: one is made up, in OpenAI's form.
        let mut a = CallAssembly::default();
        a.push(piece(json!({"function": {"name": "f", "arguments": "{}"}})));
        assert!(a.take()[0].id.starts_with("call_"));
    }

    #[test]
    fn log_probabilities_are_read_from_chat_and_legacy_chunks() {
        use serde_json::json;
        let chat = read_logprobs(
            &json!({"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]}]}]}),
        );
        assert_eq!((chat[0].token.as_str(), chat[0].logprob), ("Hi", -0.5));
        assert_eq!(chat[0].bytes.as_deref(), Some(&b"Hi"[..]));
        assert_eq!(chat[0].top_logprobs.len(), 1);
        let legacy = read_logprobs(
            &json!({"tokens": [" a", " b"], "token_logprobs": [-1.0, -2.0], "top_logprobs": [{" a": -1.0}, {" b": -2.0, " c": -3.0}], "text_offset": [0, 2]}),
        );
        assert_eq!(legacy.len(), 2);
        assert_eq!((legacy[1].token.as_str(), legacy[1].logprob), (" b", -2.0));
        assert_eq!(legacy[1].top_logprobs.len(), 2);
    }

    #[test]
    fn a_method_s_grammar_goes_upstream_only_where_the_configuration_says() {
        let grammar = crate::learn::verify::JUDGE_GRAMMAR;
        let r = ChatRequest {
            sampling: crate::backend::Sampling {
                format: crate::backend::OutputFormat::Grammar(grammar.into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let body = |grammars: &str| {
            let config: UpstreamModelConfig = toml::from_str(&format!(
                "id = \"u\"\nbase_url = \"http://127.0.0.1:9/v1\"\n{grammars}"
            ))
            .unwrap();
            let b = UpstreamBackend::new(&config).unwrap();
            let json: serde_json::Value = serde_json::from_slice(&b.body(&r)).unwrap();
            (b.constrains(), json)
        };
        let (constrains, plain) = body("");
        assert!(!constrains);
        assert!(plain.get("structured_outputs").is_none() && plain.get("guided_grammar").is_none());
        assert!(plain.get("response_format").is_none());
        let (constrains, vllm) = body("grammars = \"vllm\"");
        assert!(constrains);
        assert_eq!(
            vllm["structured_outputs"],
            serde_json::json!({"grammar": grammar})
        );
        let (constrains, old) = body("grammars = \"vllm-guided\"");
        assert!(constrains);
        assert_eq!(old["guided_grammar"], grammar);
        assert!(old.get("structured_outputs").is_none());
    }

    #[test]
    fn the_upstream_body_carries_what_was_asked() {
        let config: UpstreamModelConfig = toml::from_str(
            "id = \"alias\"\nmodel = \"real/model\"\nbase_url = \"http://127.0.0.1:9/v1/\"",
        )
        .unwrap();
        let b = UpstreamBackend::new(&config).unwrap();
        assert_eq!(b.url.as_str(), "http://127.0.0.1:9/v1/chat/completions");
        let mut r = ChatRequest {
            messages: vec![crate::backend::Message::new(
                crate::backend::Role::User,
                "hi \"there\"",
            )],
            ..Default::default()
        };
        let plain: serde_json::Value = serde_json::from_slice(&b.body(&r)).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({
                "model": "real/model",
                "messages": [{"role": "user", "content": "hi \"there\""}],
                "stream": true,
                "stream_options": {"include_usage": true},
            })
        );
        r.sampling = crate::backend::Sampling {
            max_tokens: Some(5),
            temperature: Some(0.7),
            top_p: Some(0.5),
            n: 2,
            stop: vec!["\n".into()],
            presence_penalty: Some(1.0),
            frequency_penalty: Some(-1.0),
            logit_bias: vec![(42, -100.0)],
            seed: Some(3),
            logprobs: None,
            format: crate::backend::OutputFormat::JsonSchema {
                name: "answer".into(),
                schema: serde_json::json!({"type": "object"}),
                strict: Some(true),
            },
        };
        let full: serde_json::Value = serde_json::from_slice(&b.body(&r)).unwrap();
        assert_eq!(
            full["response_format"],
            serde_json::json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(full["max_tokens"], 5);
        assert_eq!(full["temperature"], 0.7);
        assert_eq!(full["top_p"], 0.5);
        assert_eq!(full["n"], 2);
        assert_eq!(full["stop"], serde_json::json!(["\n"]));
        assert_eq!(full["presence_penalty"], 1.0);
        assert_eq!(full["frequency_penalty"], -1.0);
        assert_eq!(full["logit_bias"], serde_json::json!({"42": -100.0}));
        assert_eq!(full["seed"], 3);

        // Tools, the choice, and a history with a call and its result.
        let mut call = crate::backend::Message::new(crate::backend::Role::Assistant, "");
        call.tool_calls = vec![crate::backend::ToolCall {
            id: "call_1".into(),
            name: "f".into(),
            arguments: "{}".into(),
        }];
        let mut result = crate::backend::Message::new(crate::backend::Role::Tool, "42");
        result.tool_call_id = Some("call_1".into());
        let r = ChatRequest {
            messages: vec![call, result],
            tools: vec![crate::backend::ToolSpec {
                name: "f".into(),
                description: String::new(),
                parameters: serde_json::json!({"type": "object"}),
                strict: Some(true),
            }],
            tool_choice: crate::backend::ToolChoice::Function("f".into()),
            parallel_tool_calls: Some(false),
            sampling: crate::backend::Sampling {
                logprobs: Some(2),
                ..Default::default()
            },
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_slice(&b.body(&r)).unwrap();
        assert_eq!(
            v["messages"],
            serde_json::json!([
                {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "42", "tool_call_id": "call_1"},
            ])
        );
        assert_eq!(
            v["tools"],
            serde_json::json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": true}}])
        );
        assert_eq!(
            v["tool_choice"],
            serde_json::json!({"type": "function", "function": {"name": "f"}})
        );
        assert_eq!(v["parallel_tool_calls"], false);
        assert_eq!(
            (v["logprobs"].clone(), v["top_logprobs"].clone()),
            (serde_json::json!(true), serde_json::json!(2))
        );
    }
}
