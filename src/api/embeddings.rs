//! `POST /v1/embeddings` in OpenAI's shape, on the in-process embedding model
//! (`backend::embed`). Inputs are a string, a list of strings, a list of token ids or a list of
//! such lists; vectors come back as floats or, with `encoding_format: "base64"` (the openai
//! SDK's and LangChain's default), as the little-endian float32 bytes in base64.

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::Json;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::JsonBody;
use super::AppState;
use crate::backend::embed::{Embedder, Input, UpstreamEmbedder};
use crate::config::EmbeddingsConfig;
use crate::error::{Error, Result};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create))
}

/// The embedding model as the server holds it: configured, then loaded (or failed) in the
/// background after start-up, like the chat model.
pub struct Embeddings {
    pub config: EmbeddingsConfig,
    /// Set when the model is another server's (`[embeddings] base_url`).
    upstream: Option<UpstreamEmbedder>,
    /// Set when start-up begins loading the model (an in-process server never does).
    loading: std::sync::atomic::AtomicBool,
    model: OnceLock<std::result::Result<Arc<Embedder>, String>>,
}

impl Embeddings {
    pub fn new(config: EmbeddingsConfig) -> anyhow::Result<Embeddings> {
        let upstream = match &config.base_url {
            Some(base) => Some(UpstreamEmbedder::new(
                &config.settings(),
                base,
                config.model.as_deref().unwrap_or(&config.id),
                config
                    .api_key_env
                    .as_ref()
                    .and_then(|v| std::env::var(v).ok()),
                std::time::Duration::from_secs_f64(config.timeout_secs),
            )?),
            None => None,
        };
        Ok(Embeddings {
            config,
            upstream,
            loading: Default::default(),
            model: OnceLock::new(),
        })
    }

    /// Whether a model is to be loaded here (not off, not another server's).
    pub fn local(&self) -> bool {
        self.config.enabled && self.upstream.is_none()
    }

    /// Marks the model as being loaded: `/health` waits for it from now on.
    pub fn start_loading(&self) {
        self.loading
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a load has begun and not ended (it may end in failure, which `/health` does
    /// not wait on: chat is served without embeddings).
    pub fn loading(&self) -> bool {
        self.loading.load(std::sync::atomic::Ordering::SeqCst) && self.model.get().is_none()
    }

    /// Records the outcome of loading; a failure is kept as the reason every request gets.
    pub fn set(&self, loaded: anyhow::Result<Arc<Embedder>>) {
        let _ = self.model.set(loaded.map_err(|e| format!("{e:#}")));
    }

    /// The model, or why there is none (off, loading, failed).
    fn model(&self) -> Result<&Arc<Embedder>> {
        if !self.config.enabled {
            return Err(Error::not_found(
                "this server has no embedding model ([embeddings] enabled = false)",
                "model",
            ));
        }
        match self.model.get() {
            None if self.loading() => Err(Error::Unavailable(
                "the embedding model is still loading".into(),
            )),
            None => Err(Error::Unavailable(
                "the embedding model is not loaded in this server".into(),
            )),
            Some(Err(why)) => Err(Error::Unavailable(format!(
                "the embedding model failed to load: {why}"
            ))),
            Some(Ok(m)) => Ok(m),
        }
    }
}

/// The same model makes the vectors that experiences are retrieved by: in-process once it
/// has loaded, or the upstream's.
#[async_trait::async_trait]
impl crate::experience::vectors::Embed for Embeddings {
    fn model(&self) -> String {
        self.config.id.clone()
    }

    async fn embed(&self, texts: Vec<String>, background: bool) -> Result<Vec<Vec<f32>>> {
        let vectors = match &self.upstream {
            Some(u) => {
                // An upstream refuses what is too long rather than cutting it; experiences are
                // short, and a question's end says what it asks.
                let cut: Vec<&str> = texts
                    .iter()
                    .map(|t| crate::experience::vectors::tail(t, 2000))
                    .collect();
                let answer = u.embed(json!({"model": "", "input": cut})).await?;
                upstream_vectors(&answer, texts.len())?
            }
            None => {
                let priority = match background {
                    true => crate::backend::Priority::Background,
                    false => crate::backend::Priority::Interactive,
                };
                self.model()?.embed_texts(texts, priority).await?
            }
        };
        Ok(vectors.into_iter().map(unit).collect())
    }
}

/// The vectors of an upstream's answer, in input order.
fn upstream_vectors(answer: &Value, n: usize) -> Result<Vec<Vec<f32>>> {
    let bad = || Error::internal("the embedding upstream's answer holds no vectors");
    let mut out = vec![Vec::new(); n];
    for item in answer["data"].as_array().ok_or_else(bad)? {
        let i = item["index"].as_u64().ok_or_else(bad)? as usize;
        let v: Vec<f32> = item["embedding"]
            .as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|x| x.as_f64().unwrap_or(0.0) as f32)
            .collect();
        *out.get_mut(i).ok_or_else(bad)? = v;
    }
    if out.iter().any(Vec::is_empty) {
        return Err(bad());
    }
    Ok(out)
}

/// `v` scaled to length 1 (not every model's vectors are), so that a dot product is a cosine.
fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// A request to `/v1/embeddings`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    pub model: String,
    /// A string, a list of strings, a list of token ids, or a list of lists of token ids.
    #[schema(value_type = Object)]
    pub input: Value,
    #[serde(default)]
    pub encoding_format: Option<String>,
    #[serde(default)]
    pub dimensions: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
}

/// The inputs of `input`, checked for shape and count; the field path of a bad one is named.
fn inputs(input: Value, max: usize) -> Result<Vec<Input>> {
    let items = match input {
        Value::String(s) => vec![Input::Text(s)],
        Value::Array(a) if a.is_empty() => {
            return Err(Error::invalid("input must not be empty", "input"))
        }
        Value::Array(a) if a.iter().all(Value::is_number) => {
            vec![Input::Tokens(token_ids(&a, "input")?)]
        }
        Value::Array(a) => a
            .into_iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(Input::Text(s)),
                Value::Array(t) if !t.is_empty() => {
                    Ok(Input::Tokens(token_ids(&t, &format!("input[{i}]"))?))
                }
                _ => Err(Error::invalid_param(
                    "each input must be a string or a non-empty list of token ids",
                    format!("input[{i}]"),
                )),
            })
            .collect::<Result<_>>()?,
        _ => {
            return Err(Error::invalid(
                "input must be a string, a list of strings, or token ids",
                "input",
            ))
        }
    };
    if items.len() > max {
        return Err(Error::invalid(
            format!(
                "input holds {} items; at most {max} are taken ([embeddings] max_inputs)",
                items.len()
            ),
            "input",
        ));
    }
    if let Some(i) = items.iter().position(|x| *x == Input::Text(String::new())) {
        return Err(Error::invalid_param(
            "an input must not be empty",
            format!("input[{i}]"),
        ));
    }
    Ok(items)
}

fn token_ids(a: &[Value], field: &str) -> Result<Vec<u32>> {
    a.iter()
        .map(|v| {
            v.as_u64()
                .and_then(|t| u32::try_from(t).ok())
                .ok_or_else(|| {
                    Error::invalid_param("token ids must be non-negative integers", field)
                })
        })
        .collect()
}

/// `POST /v1/embeddings`.
#[utoipa::path(post, path = "/v1/embeddings", tag = "openai", request_body = EmbeddingRequest, responses((status = 200, description = "a list of embeddings", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such model", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "at capacity", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "loading", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn create(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<EmbeddingRequest>,
) -> Result<Json<Value>> {
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("encoding_format must be 'float' or 'base64', got '{other}'"),
                "encoding_format",
            ))
        }
    };
    let given = req.input.clone();
    let inputs = inputs(req.input, state.embeddings.config.max_inputs)?;
    if req.model != state.embeddings.config.id || !state.embeddings.config.enabled {
        return Err(Error::not_found(
            format!(
                "no embedding model '{}'; this server embeds with '{}'",
                req.model, state.embeddings.config.id
            ),
            "model",
        ));
    }
    if let Some(up) = &state.embeddings.upstream {
        // Checked here for shape and count; lengths and dimensions are the upstream's to judge.
        let mut body = json!({"model": up.id(), "input": given});
        for (k, v) in [
            ("encoding_format", req.encoding_format.map(Value::from)),
            ("dimensions", req.dimensions.map(Value::from)),
            ("user", req.user.map(Value::from)),
        ] {
            if let Some(v) = v {
                body[k] = v;
            }
        }
        return Ok(Json(up.embed(body).await?));
    }
    let model = state.embeddings.model()?;
    if let Some(d) = req.dimensions {
        if d != model.dimensions() as i64 {
            return Err(Error::invalid(
                format!(
                    "{} makes {}-dimensional vectors and cannot shorten them; leave dimensions out",
                    model.id(),
                    model.dimensions()
                ),
                "dimensions",
            ));
        }
    }
    // `user` is OpenAI's end-user tag for abuse monitoring: it goes in the log.
    tracing::debug!(user = ?req.user, inputs = inputs.len(), "embedding");
    let done = model.embed(inputs).await?.map_err(|bad| {
        let i = bad.index;
        Error::invalid_param(format!("input {i} {}", bad.why), format!("input[{i}]"))
    })?;
    let id = model.id().to_owned();
    metrics::counter!("experient_embedding_inputs_total", "model" => id.clone())
        .increment(done.vectors.len() as u64);
    metrics::counter!("experient_embedding_tokens_total", "model" => id)
        .increment(done.tokens as u64);
    let data: Vec<Value> = done
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| json!({"object": "embedding", "index": i, "embedding": encode(v, base64)}))
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": model.id(),
        "usage": {"prompt_tokens": done.tokens, "total_tokens": done.tokens},
    })))
}

/// A vector as floats, or as its little-endian float32 bytes in base64.
fn encode(v: &[f32], base64: bool) -> Value {
    if base64 {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_shape_is_read_and_a_bad_one_is_named() {
        assert_eq!(inputs(json!("hi"), 4).unwrap(), [Input::Text("hi".into())]);
        assert_eq!(
            inputs(json!(["a", [1, 2]]), 4).unwrap(),
            [Input::Text("a".into()), Input::Tokens(vec![1, 2])]
        );
        assert_eq!(
            inputs(json!([5, 6]), 4).unwrap(),
            [Input::Tokens(vec![5, 6])]
        );
        let param = |v: Value| match inputs(v, 2).unwrap_err() {
            Error::InvalidRequest { param, .. } => param.unwrap(),
            e => panic!("{e:?}"),
        };
        assert_eq!(param(json!([])), "input");
        assert_eq!(param(json!(["a", 3.5])), "input[1]");
        assert_eq!(param(json!(["a", [-1]])), "input[1]");
        assert_eq!(param(json!(["a", "b", "c"])), "input");
        assert_eq!(param(json!(["a", ""])), "input[1]");
        assert_eq!(param(json!({"text": "a"})), "input");
    }

    #[test]
    fn base64_is_the_float32_bytes_little_endian() {
        let v = [1.0f32, -0.5];
        let Value::String(s) = encode(&v, true) else {
            panic!()
        };
        let bytes = base64::engine::general_purpose::STANDARD.decode(s).unwrap();
        assert_eq!(bytes, [0, 0, 128, 63, 0, 0, 0, 191]);
        assert_eq!(encode(&v, false), json!([1.0, -0.5]));
    }
}
