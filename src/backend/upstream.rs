//! A model served by another OpenAI-compatible server, through `async-openai`.
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

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::middleware::{HttpRequestFactory, ReqwestService};
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;

use super::{Admission, Backend, ChatRequest, Event, EventStream, FinishReason, Usage};
use crate::config::UpstreamModelConfig;
use crate::error::{Error, Result};

pub struct UpstreamBackend {
    id: String,
    model: String,
    base_url: String,
    client: async_openai::Client<OpenAIConfig>,
    first_byte: Duration,
    total: Duration,
    max_retries: u32,
    admission: Admission,
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
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct Delta {
    content: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ChunkUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// Whether an error before the first token is worth another try (here, or at the next model of
/// a fallback chain).
pub fn retryable(e: &Error) -> bool {
    match e {
        Error::Unavailable(_) | Error::Timeout(_) | Error::Overloaded { .. } => true,
        Error::Upstream { status, .. } => *status == 429 || *status >= 500,
        _ => false,
    }
}

impl UpstreamBackend {
    pub fn new(c: &UpstreamModelConfig) -> anyhow::Result<Self> {
        let key = match &c.api_key_env {
            Some(var) => std::env::var(var)
                .map_err(|_| anyhow::anyhow!("the environment variable {var} is not set"))?,
            None => String::new(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs_f64(c.connect_timeout_secs))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(c.max_concurrent.min(1024))
            .build()?;
        let client = async_openai::Client::with_config(
            OpenAIConfig::new()
                .with_api_base(c.base_url.trim_end_matches('/'))
                .with_api_key(key),
        )
        .with_http_service(Service(ReqwestService::new(http)));
        Ok(UpstreamBackend {
            id: c.id.clone(),
            model: c.model.clone().unwrap_or_else(|| c.id.clone()),
            base_url: c.base_url.clone(),
            client,
            first_byte: Duration::from_secs_f64(c.first_byte_timeout_secs),
            total: Duration::from_secs_f64(c.total_timeout_secs),
            max_retries: c.max_retries,
            admission: Admission::new(&c.id, c.max_concurrent, c.queue),
        })
    }

    fn body(&self, r: &ChatRequest) -> serde_json::Value {
        let s = &r.sampling;
        let messages: Vec<_> = r
            .messages
            .iter()
            .map(|m| json!({"role": m.role.as_str(), "content": m.content}))
            .collect();
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let o = body.as_object_mut().expect("object");
        if let Some(v) = s.max_tokens {
            o.insert("max_tokens".into(), json!(v));
        }
        if let Some(v) = s.temperature {
            o.insert("temperature".into(), json!(v));
        }
        if let Some(v) = s.top_p {
            o.insert("top_p".into(), json!(v));
        }
        if s.n > 1 {
            o.insert("n".into(), json!(s.n));
        }
        if !s.stop.is_empty() {
            o.insert("stop".into(), json!(s.stop));
        }
        if let Some(v) = s.presence_penalty {
            o.insert("presence_penalty".into(), json!(v));
        }
        if let Some(v) = s.frequency_penalty {
            o.insert("frequency_penalty".into(), json!(v));
        }
        if !s.logit_bias.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> = s
                .logit_bias
                .iter()
                .map(|(t, b)| (t.to_string(), json!(b)))
                .collect();
            o.insert("logit_bias".into(), serde_json::Value::Object(map));
        }
        if let Some(v) = s.seed {
            o.insert("seed".into(), json!(v));
        }
        body
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

    /// One attempt: opens the stream and waits for its first chunk.
    async fn open(
        &self,
        body: &serde_json::Value,
    ) -> Result<(
        Pin<Box<dyn Stream<Item = Result<Chunk, OpenAIError>> + Send>>,
        Chunk,
    )> {
        let attempt = async {
            let mut s = self
                .client
                .chat()
                .create_stream_byot::<_, Chunk>(body.clone())
                .await?;
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

fn backoff(attempt: u32, e: &Error) -> Duration {
    let exp = Duration::from_millis(200) * 2u32.saturating_pow(attempt);
    let hinted = match e {
        Error::Overloaded {
            retry_after_secs, ..
        } => Duration::from_secs(*retry_after_secs),
        _ => Duration::ZERO,
    };
    exp.max(hinted).min(Duration::from_secs(30))
}

#[async_trait::async_trait]
impl Backend for UpstreamBackend {
    fn ready(&self) -> bool {
        true
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        let n = request.sampling.n.max(1);
        let permit = self.admission.admit(1).await?;
        let body = self.body(&request);
        let deadline = Instant::now() + self.total;
        let mut attempt = 0;
        let (mut upstream, first) = loop {
            match self.open(&body).await {
                Ok(v) => break v,
                Err(e) if retryable(&e) && attempt < self.max_retries => {
                    let wait = backoff(attempt, &e);
                    if Instant::now() + wait >= deadline {
                        return Err(e);
                    }
                    tracing::warn!(model = %self.id, attempt, error = %e, wait_ms = wait.as_millis() as u64, "upstream failed before the first token; retrying");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let prompt_chars: usize = request.messages.iter().map(|m| m.content.len()).sum();
        let id = self.id.clone();
        let total = self.total;
        let convert_later = move |e: OpenAIError| Error::Upstream {
            status: 502,
            message: format!("the upstream for '{id}' failed mid-stream: {e}"),
            kind: Some("upstream_error".into()),
            param: None,
            code: None,
        };
        Ok(async_stream::stream! {
            let _permit = permit;
            let mut finished = vec![false; n as usize];
            let mut usage: Option<Usage> = None;
            let mut deltas = 0u64;
            let mut next = Some(Ok(first));
            loop {
                let item = match next.take() {
                    Some(i) => Some(i),
                    None => match tokio::time::timeout_at(deadline, upstream.next()).await {
                        Ok(i) => i,
                        Err(_) => {
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
                        yield Err(convert_later(e));
                        return;
                    }
                };
                if let Some(e) = chunk.error {
                    yield Err(Error::Upstream {
                        status: 502,
                        message: e["message"].as_str().map(str::to_owned).unwrap_or_else(|| e.to_string()),
                        kind: e["type"].as_str().map(str::to_owned),
                        param: None,
                        code: None,
                    });
                    return;
                }
                for c in chunk.choices {
                    if c.index >= n || finished[c.index as usize] {
                        continue;
                    }
                    if let Some(text) = c.delta.and_then(|d| d.content).filter(|t| !t.is_empty()) {
                        deltas += 1;
                        yield Ok(Event::Delta { index: c.index, text });
                    }
                    if let Some(r) = c.finish_reason {
                        finished[c.index as usize] = true;
                        yield Ok(Event::Finish { index: c.index, reason: FinishReason::from_backend(&r) });
                    }
                }
                if let Some(u) = chunk.usage {
                    usage = Some(Usage { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens });
                }
            }
            for (i, done) in finished.iter().enumerate() {
                if !done {
                    yield Ok(Event::Finish { index: i as u32, reason: FinishReason::Stop });
                }
            }
            // Some servers never report usage; an estimate (about four characters a prompt
            // token, one token a streamed delta) beats a missing chunk a client waits for.
            yield Ok(Event::Usage(usage.unwrap_or(Usage {
                prompt_tokens: (prompt_chars as u64).div_ceil(4),
                completion_tokens: deltas,
            })));
        }
        .boxed())
    }
}
