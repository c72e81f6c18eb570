//! `POST /v1/completions`: legacy text completions, as lm-evaluation-harness and older clients
//! send them. The model continues the prompt as it is, with no chat template; on an upstream
//! the request goes to its own `/completions`.

use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::JsonBody;
use super::pipeline::{self, Generation, Names, Wire};
use super::wire::{self, Stop, StreamOptions, WireUsage, SYSTEM_FINGERPRINT};
use super::AppState;
use crate::backend::{ChatRequest, Completion, Event as Model, Sampling, TokenLogprob, Usage};
use crate::error::{Error, Result};
use crate::methods::{Applied, Event};

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
    /// Checks what only this endpoint has, and the shared sampling fields with the checks
    /// every endpoint uses.
    fn validate(self, limits: &wire::RequestLimits, max_prompts: usize) -> Result<Validated> {
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
        if prompts.len() > max_prompts {
            return Err(Error::invalid(
                format!("prompt may hold at most {max_prompts} prompts"),
                "prompt",
            ));
        }
        let mut sampling = wire::SamplingFields {
            max_tokens: self.max_tokens.map(|m| (m, "max_tokens")),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stop: self.stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
        }
        .validate(limits)?;
        sampling.max_tokens = sampling.max_tokens.or(Some(DEFAULT_MAX_TOKENS));
        sampling.logprobs = self.logprobs;
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
            sampling,
        })
    }
}

/// Legacy completions' names for the fields checked past the edge; no method applies here.
static NAMES: Names = Names {
    unsupported: super::options::chat_field,
    format: "response_format",
    tools: "tools",
    methods: false,
};

/// `POST /v1/completions`: the prompt is continued as it is, with no chat template.
#[utoipa::path(post, path = "/v1/completions", tag = "openai", request_body = CompletionRequest, responses((status = 200, description = "a text_completion, or with stream an SSE stream of them", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such model", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "at capacity", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "loading", body = crate::api::openapi::ErrorEnvelope)))]
pub async fn completions(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response> {
    let v = req.validate(&state.limits, state.bounds.max_prompts)?;
    let n = v.sampling.n as usize;
    let echoes = v
        .prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(if v.echo { p.clone() } else { String::new() }, n))
        .collect();
    let out = CompletionWire::new(v.model.clone(), echoes, v.include_usage);
    // The prompts run one after another as the stream goes on; the first starts at once, so
    // that what fails before any token (overload, a bad request) is the HTTP status. Starting
    // them all at once would hold every prompt's slots while the first is still unread, and a
    // list longer than the model's slots would wait on itself.
    let requests = v
        .prompts
        .into_iter()
        .map(|prompt| ChatRequest {
            raw_prompt: Some(prompt),
            sampling: v.sampling.clone(),
            user: v.user.clone(),
            ..Default::default()
        })
        .collect();
    let g = Generation {
        model: v.model,
        options: Default::default(),
        requests,
        stream: v.stream,
        tokens_field: "max_tokens",
        names: &NAMES,
        api: "completions",
    };
    pipeline::generate(&state, &caller, g, out).await
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

/// Legacy completions' translation out: one `text_completion`, or a stream of them (a chunk
/// per delta, the echoed prompt first when asked for, one finish per choice, the usage chunk
/// when asked for, errors as the envelope, and `[DONE]`).
struct CompletionWire {
    id: String,
    created: u64,
    model: String,
    /// Per choice: its prompt when echoed, else empty.
    echoes: Vec<String>,
    include_usage: bool,
    finished: Vec<bool>,
    /// Log probabilities waiting for the choice's next delta.
    pending: Vec<Vec<TokenLogprob>>,
}

impl CompletionWire {
    fn new(model: String, echoes: Vec<String>, include_usage: bool) -> Self {
        let n = echoes.len();
        CompletionWire {
            id: format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
            created: wire::now_secs(),
            model,
            echoes,
            include_usage,
            finished: vec![false; n],
            pending: vec![Vec::new(); n],
        }
    }

    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id, "object": "text_completion", "created": self.created,
            "model": self.model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
        })
    }

    fn chunk(&self, index: usize, text: &str, logprobs: Value, finish: Option<&str>) -> Bytes {
        let choice =
            json!([{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]);
        pipeline::frame(&self.object(choice).to_string())
    }
}

impl Wire for CompletionWire {
    fn id(&self) -> &str {
        &self.id
    }

    fn open(&mut self, _: &Applied, out: &mut Vec<Bytes>) {
        for (i, e) in self
            .echoes
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty())
        {
            out.push(self.chunk(i, e, Value::Null, None));
        }
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        match event {
            Event::Model(Model::Logprobs { index, tokens }) => {
                if let Some(p) = self.pending.get_mut(index as usize) {
                    p.extend(tokens)
                }
            }
            Event::Model(Model::Delta { index, text }) => {
                let lp = self.pending.get_mut(index as usize).map(std::mem::take);
                let lp = lp.filter(|p| !p.is_empty());
                let lp = lp.as_deref().map_or(Value::Null, legacy_logprobs);
                out.push(self.chunk(index as usize, &text, lp, None));
            }
            Event::Model(Model::Finish { index, reason }) => {
                let i = index as usize;
                if self.finished.get(i) == Some(&false) {
                    self.finished[i] = true;
                    out.push(self.chunk(i, "", Value::Null, Some(reason.as_str())));
                }
            }
            _ => {}
        }
    }

    fn close(&mut self, usage: Usage, applied: &Applied, out: &mut Vec<Bytes>) {
        for i in (0..self.finished.len()).filter(|&i| !self.finished[i]) {
            out.push(self.chunk(i, "", Value::Null, Some("stop")));
        }
        if self.include_usage {
            let mut c = self.object(json!([]));
            c["usage"] = json!(WireUsage::from(usage));
            c["experient"] = json!(applied);
            out.push(pipeline::frame(&c.to_string()));
        }
        out.push(Bytes::from_static(pipeline::DONE));
    }

    fn fail(&mut self, error: &Error, out: &mut Vec<Bytes>) {
        out.push(pipeline::frame(&error.envelope().to_string()));
        out.push(Bytes::from_static(pipeline::DONE));
    }

    /// Every choice's text after its echoed prompt.
    fn whole(&mut self, done: Completion, applied: &Applied) -> Result<Value> {
        let choices: Vec<Value> = done
            .choices
            .iter()
            .zip(&self.echoes)
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
        let mut body = self.object(json!(choices));
        body["usage"] = json!(WireUsage::from(done.usage));
        body["experient"] = json!(applied);
        Ok(body)
    }
}
