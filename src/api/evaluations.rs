//! Evaluations over HTTP: `POST /v1/libraries/{name}/evaluations` compares two versions of a
//! library (or one and none) on the same tasks in the background, and
//! `GET .../evaluations/{id}` reports each version's accuracy, their paired difference with its
//! interval and p-value, the tasks they disagree on, and what it cost.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::JsonBody;
use super::jobs::TaskBody;
use super::AppState;
use crate::error::{Error, Result};
use crate::learn::compare::{self, Side};
use crate::learn::dataset::Split;
use crate::learn::eval::{EvalOptions, Grader};
use crate::learn::verify::{Judge, Scoring};
use crate::router::Method;

/// The evaluation routes, under the library they measure.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(read, cancel))
}

/// A version of the library, or no library at all.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum VersionRef {
    Version(u64),
    /// `"none"`: no library.
    Named(Named),
}

/// The one version that has a name.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Named {
    None,
}

/// What to compare, on what, and how.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvaluationRequest {
    pub baseline: VersionRef,
    pub candidate: VersionRef,
    /// Inline tasks, `{question, answer}`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    tasks: Option<Vec<TaskBody>>,
    /// A task file on the server (GSM8K JSONL or BBH JSON).
    #[serde(default)]
    dataset: Option<String>,
    /// "traffic": the library's recorded completions with feedback.
    #[serde(default)]
    source: Option<String>,
    /// Shuffle the tasks with this seed before `offset` and `limit`.
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
    /// The model (default: the first one served).
    #[serde(default)]
    model: Option<String>,
    /// numeric, exact, regex:PATTERN or judge (default: what fits the tasks).
    #[serde(default)]
    verifier: Option<String>,
    /// Answers per task (k); a task's score is mean@k.
    #[serde(default)]
    samples: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    concurrency: Option<usize>,
    /// Of every interval reported (default 0.95).
    #[serde(default)]
    confidence: Option<f64>,
}

impl EvaluationRequest {
    /// The answering options, checked against the bounds.
    fn options(&self, bounds: &crate::config::Bounds) -> Result<EvalOptions> {
        let samples = self.samples.unwrap_or(1);
        if samples == 0 || samples > bounds.max_group_size {
            return Err(Error::invalid(
                format!("samples must be from 1 to {}", bounds.max_group_size),
                "samples",
            ));
        }
        let concurrency = self.concurrency.unwrap_or(2);
        if concurrency == 0 || concurrency > bounds.max_concurrency {
            return Err(Error::invalid(
                format!("concurrency must be from 1 to {}", bounds.max_concurrency),
                "concurrency",
            ));
        }
        let temperature = self
            .temperature
            .unwrap_or(if samples > 1 { 0.7 } else { 0.0 });
        if !(0.0..=2.0).contains(&temperature) {
            return Err(Error::invalid(
                "temperature must be from 0 to 2",
                "temperature",
            ));
        }
        let max_tokens = self.max_tokens.unwrap_or(256);
        if max_tokens == 0 || max_tokens > 32_768 {
            return Err(Error::invalid(
                "max_tokens must be from 1 to 32768",
                "max_tokens",
            ));
        }
        if self.confidence.is_some_and(|c| !(0.5..=0.999).contains(&c)) {
            return Err(Error::invalid(
                "confidence must be from 0.5 to 0.999",
                "confidence",
            ));
        }
        Ok(EvalOptions {
            samples,
            temperature,
            max_tokens,
            concurrency,
        })
    }
}

/// One side, from the library as it is now.
fn side(lib: &crate::experience::Library, v: VersionRef, param: &'static str) -> Result<Side> {
    match v {
        VersionRef::Named(Named::None) => Ok(Side::none()),
        VersionRef::Version(n) if n <= lib.version() => Side::version(lib, n),
        VersionRef::Version(n) => Err(Error::invalid(
            format!(
                "library '{}' has no version {n} (its newest is {})",
                lib.name,
                lib.version()
            ),
            param,
        )),
    }
}

#[utoipa::path(post, path = "/v1/libraries/{name}/evaluations", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body = EvaluationRequest, responses((status = 202, description = "started", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "as many running as allowed", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn create(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<EvaluationRequest>,
) -> Result<Response> {
    let lib = s.store.library(&name)?;
    let opts = req.options(&s.bounds)?;
    let baseline = side(&lib, req.baseline, "baseline")?;
    let candidate = side(&lib, req.candidate, "candidate")?;
    let from_traffic = match req.source.as_deref() {
        None => false,
        Some("traffic") => true,
        Some(other) => {
            return Err(Error::invalid(
                format!("source must be \"traffic\", got \"{other}\""),
                "source",
            ))
        }
    };
    let mut data =
        super::jobs::dataset(&s, &name, req.tasks, req.dataset.as_deref(), from_traffic).await?;
    let (tasks, _) = data.split(&Split {
        seed: req.seed,
        offset: req.offset,
        limit: req.limit,
        held_out: 0,
    });
    if tasks.is_empty() || tasks.len() > s.bounds.max_tasks {
        return Err(Error::invalid(
            format!("an evaluation needs 1 to {} tasks", s.bounds.max_tasks),
            "tasks",
        ));
    }
    data.tasks = tasks;
    let model = match &req.model {
        Some(m) => m.clone(),
        None => s
            .router
            .models()
            .next()
            .map(|(id, _)| id.to_owned())
            .ok_or_else(|| Error::internal("no model is served"))?,
    };
    let route = s
        .router
        .resolve(&model, Some(Method::Direct.name()), None)?;
    let scoring = Scoring::parse(req.verifier.as_deref().unwrap_or(&data.verifier.name()))?;
    let judge = match scoring {
        Scoring::Judge => Some(Judge {
            backend: route.backend.clone(),
            prompts: s.prompts.clone(),
            retries: 2,
            max_tokens: 128,
            constrain: s.methods.constrain,
        }),
        Scoring::Rule(ref v) => {
            data.verifier = v.clone();
            None
        }
    };
    let request = json!({
        "baseline": req.baseline, "candidate": req.candidate, "model": model,
        "verifier": req.verifier, "samples": opts.samples, "temperature": opts.temperature,
        "max_tokens": opts.max_tokens, "seed": req.seed, "offset": req.offset, "limit": req.limit,
        "tasks": data.tasks.len(), "dataset": data.name, "confidence": req.confidence.unwrap_or(0.95),
    });
    let settings = lib.settings();
    let confidence = req.confidence.unwrap_or(0.95);
    let ctx = s.method_context();
    let eval = s
        .evaluations
        .start(&name, caller.owner, request, move |e| async move {
            let grader = match &judge {
                Some(j) => Grader::Judge(j),
                None => Grader::Rule(&data.verifier),
            };
            let plan = compare::Plan {
                route: &route,
                settings,
                options: opts,
                grader,
                confidence,
            };
            compare::compare(&ctx, &plan, &baseline, &candidate, &data, &|t| e.tick(t)).await
        })?;
    Ok((StatusCode::ACCEPTED, Json(eval.view())).into_response())
}

#[utoipa::path(get, path = "/v1/libraries/{name}/evaluations", tag = "libraries", params(("name" = String, Path, description = "the library")), responses((status = 200, description = "the library's evaluations, newest first", body = Object), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    s.store.library(&name)?;
    Ok(Json(
        json!({"object": "list", "data": s.evaluations.list(&name)}),
    ))
}

#[utoipa::path(get, path = "/v1/libraries/{name}/evaluations/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), responses((status = 200, description = "the evaluation, with its report when done", body = Object), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such evaluation", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn read(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let evaluations = s.evaluations.clone();
    let view = tokio::task::spawn_blocking(move || evaluations.view(&name, &id))
        .await
        .map_err(Error::internal)??;
    Ok(Json(view))
}

#[utoipa::path(delete, path = "/v1/libraries/{name}/evaluations/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), responses((status = 200, description = "cancelled", body = Object), (status = 404, description = "not running", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn cancel(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    if !s.evaluations.cancel(&name, &id) {
        return Err(Error::not_found(
            format!("no running evaluation '{id}' of library '{name}'"),
            "id",
        ));
    }
    Ok(Json(s.evaluations.view(&name, &id)?))
}
