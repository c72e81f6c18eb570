//! Learning over HTTP: `POST /v1/libraries/{name}/learn` starts a Training-Free GRPO run as a
//! job; `/v1/jobs/{id}` shows its progress and result, and `DELETE` cancels it.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::{parse_json, JsonBody};
use super::AppState;
use crate::error::{Error, Result};
use crate::learn::dataset::{Dataset, Split, Task};
use crate::learn::grpo::{LearnOptions, Run};

/// Learning jobs: start one on a library, read, cancel, chart.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(start))
        .routes(routes!(list))
        .routes(routes!(get_job, cancel))
        .routes(routes!(chart))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TaskBody {
    question: String,
    answer: String,
}

/// The fields of a learn request that say what to learn from; everything else in the body is
/// a [`LearnOptions`] field.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Source {
    tasks: Option<Vec<TaskBody>>,
    /// A task file on the server (GSM8K JSONL or BBH JSON); admins only, like every job route.
    dataset: Option<String>,
    validation: Option<Vec<TaskBody>>,
    /// Shuffle the data set with this seed before `offset` and `limit`.
    split_seed: Option<u64>,
    offset: usize,
    limit: Option<usize>,
    /// Held-out tasks after the learning split, evaluated after every step.
    validation_size: usize,
    /// The id of an earlier run of this library to continue.
    resume: Option<String>,
    /// "traffic": learn from the library's recorded completions that have feedback.
    source: Option<String>,
}

const SOURCE_FIELDS: [&str; 9] = [
    "source",
    "tasks",
    "dataset",
    "validation",
    "split_seed",
    "offset",
    "limit",
    "validation_size",
    "resume",
];

fn tasks(list: Vec<TaskBody>) -> Vec<Task> {
    list.into_iter()
        .map(|t| Task {
            question: t.question,
            answer: t.answer,
            origin: None,
        })
        .collect()
}

#[utoipa::path(post, path = "/v1/libraries/{name}/learn", tag = "jobs", params(("name" = String, Path, description = "the library")), request_body(content = Object, description = "tasks or dataset, and the learning options"), responses((status = 202, description = "started", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "already learning", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn start(
    State(s): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Response> {
    let Value::Object(mut fields) = body else {
        return Err(Error::invalid("the body must be a JSON object", None));
    };
    let src = source(&mut fields)?;
    let from_traffic = src.is_traffic()?;
    let options = options(&s, &name, fields, from_traffic)?;
    let run = match &src.resume {
        Some(id) => resume(&s, &name, id).await?,
        None => new_run(&s, &name, src, from_traffic, options).await?,
    };
    let job = s.jobs.start(s.method_context(), s.router.clone(), run)?;
    Ok((StatusCode::ACCEPTED, Json(job.view())).into_response())
}

/// The tasks a request names: inline, a task file on the server, or the library's scored
/// traffic; exactly one of them.
pub(super) async fn dataset(
    s: &AppState,
    library: &str,
    inline: Option<Vec<TaskBody>>,
    file: Option<&str>,
    from_traffic: bool,
) -> Result<Dataset> {
    match (inline, file) {
        _ if from_traffic => traffic_data(s, library).await,
        (Some(t), None) => Ok(Dataset::from_tasks("inline", tasks(t))),
        (None, Some(path)) => {
            let path = std::path::PathBuf::from(path);
            let max = s.bounds.max_dataset_bytes;
            tokio::task::spawn_blocking(move || Dataset::load(&path, max))
                .await
                .map_err(Error::internal)?
                .map_err(|e| Error::invalid(format!("{e:#}"), "dataset"))
        }
        _ => Err(Error::invalid(
            "give either 'tasks' (a list of {question, answer}) or 'dataset' (a task file on the server)",
            "tasks",
        )),
    }
}

/// Takes the fields that say what to learn from out of the body.
fn source(fields: &mut serde_json::Map<String, Value>) -> Result<Source> {
    let mut source_fields = serde_json::Map::new();
    for k in SOURCE_FIELDS {
        if let Some(v) = fields.remove(k) {
            source_fields.insert(k.to_owned(), v);
        }
    }
    parse_json(&serde_json::to_vec(&source_fields).map_err(Error::internal)?)
}

impl Source {
    fn is_traffic(&self) -> Result<bool> {
        match self.source.as_deref() {
            None | Some("tasks") => Ok(false),
            Some("traffic") => Ok(true),
            Some(other) => Err(Error::invalid(
                format!("source must be \"traffic\" (or left out, with tasks or a dataset), got \"{other}\""),
                "source",
            )),
        }
    }
}

/// The rest of the body as learning options for the library in the path, checked against the
/// bounds; models the server does not know are refused now rather than failing the job later.
fn options(
    s: &AppState,
    name: &str,
    mut fields: serde_json::Map<String, Value>,
    from_traffic: bool,
) -> Result<LearnOptions> {
    if let Some(l) = fields.get("library") {
        if l.as_str() != Some(name) {
            return Err(Error::invalid(
                "'library' in the body differs from the library in the path",
                "library",
            ));
        }
    }
    fields.insert("library".into(), json!(name));
    if from_traffic && !fields.contains_key("verifier") {
        // Traffic has no rule to check answers by; a judge compares them with the reference.
        fields.insert("verifier".into(), json!("judge"));
    }
    let options: LearnOptions = parse_json(&serde_json::to_vec(&fields).map_err(Error::internal)?)?;
    options.check(&s.bounds)?;
    for (param, name) in [
        ("model", Some(&options.model)),
        ("learner_model", options.learner_model.as_ref()),
        ("judge_model", options.judge_model.as_ref()),
    ] {
        if let Some(name) = name {
            s.router.resolve(name, None, None).map_err(|e| match e {
                Error::NotFound { message, .. } => Error::NotFound {
                    message,
                    param: Some(param.to_owned()),
                },
                other => other,
            })?;
        }
    }
    Ok(options)
}

/// `resume`: an earlier run of this library, opened from its directory.
async fn resume(s: &AppState, name: &str, id: &str) -> Result<Run> {
    if id.contains(['/', '\\']) || id.starts_with('.') {
        return Err(Error::invalid("invalid run id", "resume"));
    }
    let dir = s.jobs.runs_dir().join(id);
    if !dir.join("run.json").is_file() {
        return Err(Error::not_found(
            format!("no run '{id}' to resume"),
            "resume",
        ));
    }
    let run = tokio::task::spawn_blocking(move || Run::open(&dir))
        .await
        .map_err(Error::internal)??;
    if run.info.options.library != name {
        return Err(Error::invalid(
            format!(
                "run '{id}' belongs to library '{}'",
                run.info.options.library
            ),
            "resume",
        ));
    }
    Ok(run)
}

/// A new run directory: the data set (inline tasks, a file on the server or the library's
/// traffic) split into learning and validation tasks.
async fn new_run(
    s: &AppState,
    name: &str,
    src: Source,
    from_traffic: bool,
    options: LearnOptions,
) -> Result<Run> {
    let data = dataset(s, name, src.tasks, src.dataset.as_deref(), from_traffic).await?;
    let (train, held_out) = data.split(&Split {
        seed: src.split_seed,
        offset: src.offset,
        limit: src.limit,
        held_out: src.validation_size,
    });
    let validation = match src.validation {
        Some(v) => tasks(v),
        None => held_out,
    };
    let (runs_dir, bounds) = (s.jobs.runs_dir().to_owned(), s.bounds.clone());
    let gated = gated(s, name);
    tokio::task::spawn_blocking(move || {
        Run::create(
            &runs_dir,
            options,
            &data,
            (train, validation),
            gated,
            &bounds,
        )
    })
    .await
    .map_err(Error::internal)?
}

/// The library's scored traffic as a data set; a 400 when there is none to learn from.
async fn traffic_data(s: &AppState, library: &str) -> Result<Dataset> {
    let (traffic, l) = (s.traffic.clone(), library.to_owned());
    tokio::task::spawn_blocking(move || crate::learn::dataset::learnable_traffic(&traffic, &l))
        .await
        .map_err(Error::internal)?
}

/// Whether learning on `library` goes through the gate: unless its `promote` is `always` (a
/// library that does not exist yet is created with the default, `gain`).
fn gated(s: &AppState, library: &str) -> bool {
    s.store
        .library(library)
        .map_or(true, |l| l.settings().gated())
}

/// Continuous learning: when `library` has `auto_learn` and at least `after` pieces of feedback
/// arrived since its last automatic job, and it is not learning now, a job from its traffic
/// starts, at the learning lane's priority like every job. Failures are logged; the feedback
/// that triggered it was kept either way.
pub(super) async fn auto_learn(s: &AppState, library: &str) {
    let Ok(lib) = s.store.library(library) else {
        return;
    };
    let Some(auto) = lib.settings().auto_learn else {
        return;
    };
    if s.jobs.learning(library) {
        return;
    }
    let since = s.traffic.last_auto(library);
    let new = s
        .traffic
        .feedback(Some(library), since)
        .map_or(0, |f| f.len());
    if new < auto.after {
        return;
    }
    if let Err(e) = start_auto(s, library, auto.model).await {
        tracing::warn!(library, error = %e, "automatic learning from traffic did not start");
    }
}

async fn start_auto(s: &AppState, library: &str, model: Option<String>) -> Result<()> {
    let data = traffic_data(s, library).await?;
    let model = match model {
        Some(m) => m,
        None => s.traffic.usual_model(library)?.ok_or_else(|| {
            Error::invalid("no recorded traffic names a model", "auto_learn.model")
        })?,
    };
    let options: LearnOptions = serde_json::from_value(
        json!({"library": library, "model": model, "verifier": "judge", "review": true}),
    )
    .map_err(Error::internal)?;
    options.check(&s.bounds)?;
    s.router.resolve(&options.model, None, None)?;
    let (runs_dir, bounds) = (s.jobs.runs_dir().to_owned(), s.bounds.clone());
    let train = data.tasks.clone();
    let run = tokio::task::spawn_blocking(move || {
        // Held for review whatever the gate says, but measured, so the reviewer sees how the
        // proposals did against the live library.
        Run::create(&runs_dir, options, &data, (train, vec![]), true, &bounds)
    })
    .await
    .map_err(Error::internal)??;
    let job = s.jobs.start(s.method_context(), s.router.clone(), run)?;
    s.traffic.set_last_auto(library, chrono::Utc::now())?;
    tracing::info!(library, job = %job.id, "started learning from traffic");
    Ok(())
}

#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list(State(s): State<AppState>) -> Json<Value> {
    let data: Vec<Value> = s.jobs.list().iter().map(|j| j.view()).collect();
    Json(json!({"object": "list", "data": data}))
}

#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_job(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(s.jobs.get(&id)?.view()))
}

#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn cancel(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>> {
    Ok(Json(s.jobs.cancel(&id)?.view()))
}

#[utoipa::path(get, path = "/v1/jobs/{id}/chart.svg", tag = "jobs", params(("id" = String, Path)), responses((status = 200, description = "the run's chart so far (mean reward and validation accuracy per step), as SVG", content_type = "image/svg+xml", body = String), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such job", body = crate::api::openapi::ErrorEnvelope)))]
/// The chart `learn` draws, drawn from the run's records as they stand, so a running job
/// shows the steps it has finished.
pub(super) async fn chart(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let job = s.jobs.get(&id)?;
    let store = s.store.clone();
    let svg = tokio::task::spawn_blocking(move || -> Result<String> {
        let run = Run::open(&job.run_dir)?;
        let lib = store.library(&job.library).ok();
        let summary = crate::learn::grpo::RunSummary::of(&run, &job.library, lib.as_deref());
        Ok(crate::learn::plot::run_chart(&summary))
    })
    .await
    .map_err(Error::internal)??;
    Ok(([(axum::http::header::CONTENT_TYPE, "image/svg+xml")], svg).into_response())
}
