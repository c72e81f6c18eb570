//! `POST /v1/completions`: legacy text completions, as lm-evaluation-harness and older clients
//! send them. The model continues the prompt as it is, with no chat template; on an upstream
//! the request goes to its own `/completions`.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::JsonBody;
use super::wire::{self, Stop, StreamOptions, WireUsage, SYSTEM_FINGERPRINT};
use super::AppState;
use crate::backend::{ChatRequest, Event as Model, Sampling, TokenLogprob, Usage};
use crate::error::{Error, Result};
use crate::methods;
use crate::methods::{Event, Events};
use crate::router::Method;

/// OpenAI's default `max_tokens` for this endpoint.
const DEFAULT_MAX_TOKENS: u32 = 16;
/// OpenAI's most `logprobs` alternatives for this endpoint.
const MAX_LOGPROBS: u8 = 5;

/// The legacy `POST /v1/completions` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionRequest {
    pub model: String,
    /// A string or a list of strings (token-id prompts are refused).
    pub prompt: Value,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// The number of alternatives to report per token (0 to 5).
    #[serde(default)]
    pub logprobs: Option<u8>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub best_of: Option<i64>,
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The prompts of a request: one string, or a list of them.
fn prompts(v: Value) -> Result<Vec<String>> {
    let bad = || {
        Error::invalid(
            "prompt must be a string or a list of strings (token-id prompts are not supported)",
            "prompt",
        )
    };
    match v {
        Value::String(s) => Ok(vec![s]),
        Value::Array(items) if !items.is_empty() => items
            .into_iter()
            .map(|i| match i {
                Value::String(s) => Ok(s),
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

struct Validated {
    model: String,
    prompts: Vec<String>,
    echo: bool,
    stream: bool,
    include_usage: bool,
    user: Option<String>,
    sampling: Sampling,
}

impl CompletionRequest {
    /// Checks what only this endpoint has, and the shared sampling fields through the chat
    /// request's own checks, so that both endpoints accept exactly the same values.
    fn validate(self, limits: &wire::RequestLimits) -> Result<Validated> {
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(Error::invalid(
                "suffix (fill in the middle) is not supported by this server",
                "suffix",
            ));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(Error::invalid(
                "best_of is not supported; use n and choose among the choices",
                "best_of",
            ));
        }
        if self.logprobs.is_some_and(|k| k > MAX_LOGPROBS) {
            return Err(Error::invalid(
                format!("logprobs must be from 0 to {MAX_LOGPROBS}"),
                "logprobs",
            ));
        }
        let echo = self.echo.unwrap_or(false);
        if echo && self.logprobs.is_some() {
            return Err(Error::invalid(
                "echo with logprobs would need the prompt's log probabilities, which this server does not compute",
                "echo",
            ));
        }
        let prompts = prompts(self.prompt)?;
        let chat = wire::ChatCompletionRequest::for_completion(
            self.model.clone(),
            self.max_tokens,
            self.temperature,
            self.top_p,
            self.n,
            self.stop,
            self.presence_penalty,
            self.frequency_penalty,
            self.logit_bias,
            self.seed,
        );
        let mut v = chat.validate(limits)?;
        v.chat.sampling.max_tokens = v.chat.sampling.max_tokens.or(Some(DEFAULT_MAX_TOKENS));
        v.chat.sampling.logprobs = self.logprobs;
        let stream = self.stream.unwrap_or(false);
        Ok(Validated {
            model: self.model,
            prompts,
            echo,
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
            user: self.user,
            sampling: v.chat.sampling,
        })
    }
}

/// `POST /v1/completions`: the prompt is continued as it is, with no chat template.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest, responses((status = 200, description = "a text_completion, or with stream an SSE stream of them", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such model", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "at capacity", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "loading", body = crate::api::openapi::ErrorEnvelope)))]
pub async fn completions(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response> {
    let v = req.validate(&state.limits)?;
    let route = state.router.resolve(&v.model, None, None)?;
    let slot = super::options::admit(&state, &caller, &route, v.sampling.max_tokens, "max_tokens")?;
    if route.method != Method::Direct || route.library.is_some() {
        return Err(Error::invalid(
            "legacy completions continue a prompt as it is; methods and libraries apply to /v1/chat/completions and /v1/responses",
            "model",
        ));
    }
    if v.prompts.len() > state.bounds.max_prompts {
        return Err(Error::invalid(
            format!(
                "prompt may hold at most {} prompts",
                state.bounds.max_prompts
            ),
            "prompt",
        ));
    }
    let n = v.sampling.n as usize;
    let ctx = super::chat::method_context(&state);
    let request = |prompt: &String| ChatRequest {
        raw_prompt: Some(prompt.clone()),
        sampling: v.sampling.clone(),
        user: v.user.clone(),
        ..Default::default()
    };
    // The first prompt starts now, so that what fails before any token (overload, a bad
    // request) is the HTTP status; the rest run one after another as the stream goes on.
    // Starting them all at once would hold every prompt's slots while the first is still
    // unread, and a list longer than the model's slots would wait on itself.
    let first = methods::run(
        &ctx,
        route.clone(),
        request(&v.prompts[0]),
        &Default::default(),
    )
    .await?;
    let rest: Vec<ChatRequest> = v.prompts[1..].iter().map(request).collect();
    let events = one_after_another(first.events, rest, n as u32, ctx, route);
    let total = n * v.prompts.len();
    let echoes: Vec<String> = (0..total)
        .map(|i| {
            if v.echo {
                v.prompts[i / n].clone()
            } else {
                String::new()
            }
        })
        .collect();
    if !v.stream {
        return whole(&state, events, v.model, echoes).await;
    }
    let events = super::stream_deadline(events, state.stream_timeout, slot);
    let frames = chunks(events, v.model, echoes, v.include_usage);
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(frames.map(Ok::<_, Infallible>)),
    )
        .into_response())
}

/// The answer in one `text_completion`, every choice's text after its echoed prompt.
async fn whole(
    state: &AppState,
    events: methods::Events,
    model: String,
    echoes: Vec<String>,
) -> Result<Response> {
    let collected = methods::collect(events, echoes.len());
    let done = tokio::time::timeout(state.request_timeout, collected)
        .await
        .map_err(|_| Error::Timeout("generation did not finish in time".into()))??
        .completion;
    let choices: Vec<Value> = done
        .choices
        .iter()
        .zip(&echoes)
        .enumerate()
        .map(|(i, (c, echo))| {
            json!({
                "text": format!("{echo}{}", c.text),
                "index": i,
                "logprobs": c.logprobs.as_deref().map_or(Value::Null, legacy_logprobs),
                "finish_reason": c.finish_reason.as_str(),
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "id": completion_id(),
        "object": "text_completion",
        "created": wire::now_secs(),
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": WireUsage::from(done.usage),
    }))
    .into_response())
}

fn completion_id() -> String {
    format!("cmpl-{}", uuid::Uuid::new_v4().simple())
}

/// An event of one prompt's generation with its choice moved up by `base`.
fn reindex(event: Model, base: u32) -> Model {
    match event {
        Model::Delta { index, text } => Model::Delta {
            index: index + base,
            text,
        },
        Model::Finish { index, reason } => Model::Finish {
            index: index + base,
            reason,
        },
        Model::Logprobs { index, tokens } => Model::Logprobs {
            index: index + base,
            tokens,
        },
        other => other,
    }
}

/// The prompts' generations in order, each one's `n` choices after the previous one's, with
/// one usage at the end: their sum. A later prompt's failure ends the stream with its error.
fn one_after_another(
    first: Events,
    rest: Vec<ChatRequest>,
    n: u32,
    ctx: methods::Context,
    route: crate::router::Route,
) -> Events {
    async_stream::stream! {
        let mut usage = Usage::default();
        let mut current = Some(first);
        let mut rest = rest.into_iter();
        let mut base = 0;
        while let Some(mut events) = current.take() {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(Event::Model(Model::Usage(u))) => {
                        usage.prompt_tokens += u.prompt_tokens;
                        usage.completion_tokens += u.completion_tokens;
                    }
                    Ok(Event::Model(e)) => yield Ok(Event::Model(reindex(e, base))),
                    Ok(other) => yield Ok(other),
                    Err(e) => { yield Err(e); return; }
                }
            }
            base += n;
            if let Some(request) = rest.next() {
                match methods::run(&ctx, route.clone(), request, &Default::default()).await {
                    Ok(out) => current = Some(out.events),
                    Err(e) => { yield Err(e); return; }
                }
            }
        }
        yield Ok(Event::Model(Model::Usage(usage)));
    }
    .boxed()
}

/// The legacy `logprobs` object: parallel lists of tokens, their log probabilities, the
/// alternatives as a map from token to log probability, and each token's offset in the text.
fn legacy_logprobs(tokens: &[TokenLogprob]) -> Value {
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tokens.len());
    for t in tokens {
        offsets.push(offset);
        offset += t.token.len();
    }
    json!({
        "tokens": tokens.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": tokens.iter().map(|t| {
            t.top_logprobs.iter().map(|a| (a.token.clone(), json!(a.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// The SSE stream: a `text_completion` chunk per delta (the echoed prompt first, when asked
/// for), one finish per choice, the usage chunk when asked for, errors as the envelope, and
/// `[DONE]`.
fn chunks(
    mut events: Events,
    model: String,
    echoes: Vec<String>,
    include_usage: bool,
) -> impl Stream<Item = Bytes> + Send {
    let id = completion_id();
    let created = wire::now_secs();
    async_stream::stream! {
        let chunk = |choices: Value| {
            let c = json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
            });
            Bytes::from(format!("data: {c}\n\n"))
        };
        let n = echoes.len();
        for (i, e) in echoes.iter().enumerate().filter(|(_, e)| !e.is_empty()) {
            yield chunk(json!([{"text": e, "index": i, "logprobs": null, "finish_reason": null}]));
        }
        let mut finished = vec![false; n];
        let mut pending: Vec<Vec<TokenLogprob>> = vec![Vec::new(); n];
        let mut usage = Usage::default();
        let mut failed = None;
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Model(Model::Logprobs { index, tokens })) => {
                    if let Some(p) = pending.get_mut(index as usize) { p.extend(tokens) }
                }
                Ok(Event::Model(Model::Delta { index, text })) => {
                    let lp = pending.get_mut(index as usize).map(std::mem::take).filter(|p| !p.is_empty());
                    let lp = lp.as_deref().map_or(Value::Null, legacy_logprobs);
                    yield chunk(json!([{"text": text, "index": index, "logprobs": lp, "finish_reason": null}]));
                }
                Ok(Event::Model(Model::Finish { index, reason })) => {
                    if let Some(f) = finished.get_mut(index as usize).filter(|f| !**f) {
                        *f = true;
                        yield chunk(json!([{"text": "", "index": index, "logprobs": null, "finish_reason": reason.as_str()}]));
                    }
                }
                Ok(Event::Model(Model::Usage(u))) => usage = u,
                Ok(_) => {}
                Err(e) => { failed = Some(e); break; }
            }
        }
        match failed {
            Some(e) => yield Bytes::from(format!("data: {}\n\n", e.envelope())),
            None => {
                for (i, f) in finished.iter().enumerate() {
                    if !f {
                        yield chunk(json!([{"text": "", "index": i, "logprobs": null, "finish_reason": "stop"}]));
                    }
                }
                if include_usage {
                    let c = json!({
                        "id": id, "object": "text_completion", "created": created, "model": model,
                        "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [],
                        "usage": WireUsage::from(usage),
                    });
                    yield Bytes::from(format!("data: {c}\n\n"));
                }
            }
        }
        yield Bytes::from_static(b"data: [DONE]\n\n");
    }
}
