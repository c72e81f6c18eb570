//! HTTP: routes, wire types, errors, metrics. The only module that knows HTTP exists.

pub mod auth;
pub(crate) mod canary;
pub(crate) mod chat;
pub(crate) mod completions;
pub mod edge;
pub(crate) mod embeddings;
pub(crate) mod error;
mod evaluations;
pub(crate) mod feedback;
pub(crate) mod jobs;
pub(crate) mod libraries;
pub(crate) mod listen;
pub(crate) mod metrics;
pub(crate) mod openapi;
pub(crate) mod options;
mod pipeline;
pub(crate) mod responses;
pub(crate) mod review;
pub(crate) mod ui;
pub(crate) mod wire;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use serde_json::json;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::error::Error;
use crate::experience::Store;
use crate::router::Router;

/// The state every handler reads, behind one `Arc`: axum clones it for each request (the auth
/// middleware's copy and each extractor's), and one reference count is cheaper than a dozen.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Wraps the shared parts in the one `Arc` that axum clones per request.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl Shared {
    /// What the methods may use, from the server's state.
    pub(crate) fn method_context(&self) -> crate::methods::Context {
        crate::methods::Context {
            store: self.store.clone(),
            prompts: self.prompts.clone(),
            settings: self.methods.clone(),
            bounds: self.bounds.clone(),
        }
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Everything the handlers share: backends, store, jobs, settings and bounds.
pub struct Shared {
    pub router: Arc<Router>,
    pub limits: wire::RequestLimits,
    pub request_timeout: Duration,
    /// The longest a streamed answer may run (`server.stream_timeout_secs`).
    pub stream_timeout: Duration,
    pub started: u64,
    pub shutting_down: Arc<AtomicBool>,
    pub metrics: metrics::Metrics,
    pub store: Arc<Store>,
    pub prompts: Arc<crate::prompts::Prompts>,
    pub keys: auth::Keys,
    /// Serve `/metrics` without a key even when keys are configured.
    pub public_metrics: bool,
    pub jobs: crate::learn::jobs::Jobs,
    /// Comparisons of library versions running or done (`/v1/libraries/{name}/evaluations`).
    pub evaluations: Arc<crate::learn::evaluations::Evaluations>,
    pub methods: Arc<crate::config::MethodsConfig>,
    pub bounds: Arc<crate::config::Bounds>,
    /// Responses API objects kept for `previous_response_id` and `GET /v1/responses/{id}`.
    pub responses: Arc<crate::response_store::ResponseStore>,
    /// Recorded completions and the feedback on them.
    pub traffic: Arc<crate::experience::traffic::Traffic>,
    /// Requests in flight per user key (`auth.max_requests_per_key`).
    pub key_slots: auth::KeySlots,
    /// Feedback given per key this minute (`traffic.feedback_per_minute`).
    pub feedback_rate: feedback::FeedbackRate,
    /// The embedding model behind `/v1/embeddings`, loaded after start-up.
    pub embeddings: Arc<embeddings::Embeddings>,
}

/// Settings that shape the router itself rather than a handler.
pub struct AppSettings {
    pub max_body_bytes: usize,
    /// The Host check, the body's media type and its deadline ([`edge`]).
    pub edge: edge::Edge,
}

/// Every documented route, declared once: each handler's `utoipa::path` attribute gives both
/// its axum route and its entry in `/openapi.json`, so the two cannot drift apart.
pub(crate) fn api_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(chat::chat_completions))
        .routes(routes!(completions::completions))
        .merge(embeddings::routes())
        .merge(responses::routes())
        .merge(feedback::routes())
        .routes(routes!(list_models))
        .routes(routes!(health))
        .routes(routes!(metrics::render))
        .routes(routes!(openapi::document))
        .merge(libraries::routes())
        .merge(review::routes())
        .merge(jobs::routes())
        .merge(evaluations::routes())
        .merge(canary::routes())
}

/// Every route, with the layers (auth, limits, panics, metrics) in the order they apply.
pub fn app(state: AppState, settings: &AppSettings) -> axum::Router {
    let edge = Arc::new(settings.edge.clone());
    let (api, _) = api_routes().split_for_parts();
    api
        // Model ids hold slashes, so this route is a catch-all that OpenAPI cannot spell; the
        // document names it as `/v1/models/{id}` (`openapi::ApiDoc`).
        .route("/v1/models/{*id}", get(get_model))
        // The curation UI's page and files, which are not API.
        .merge(ui::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(settings.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(
            edge.clone(),
            edge::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            settings.max_body_bytes,
            discard_oversized,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::check,
        ))
        .layer(axum::middleware::from_fn_with_state(edge, edge::check_host))
        .layer(axum::middleware::from_fn(metrics::track))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            |_: Box<dyn std::any::Any + Send>| {
                Error::Internal("the server hit an internal error handling this request".into())
                    .into_response()
            },
        ))
        .with_state(state)
}

/// A streamed answer's events until `limit` has passed since it started, then a timeout error
/// (which each endpoint frames as its in-stream error) and the end; the caller's key slot is
/// held as long as the stream runs. Dropping what is left
/// cancels the generation and frees its slot: `request_timeout_secs` bounds only answers
/// that are not streamed, and a stream asking for billions of tokens once ran for hours.
pub(crate) fn stream_deadline(
    events: crate::methods::Events,
    limit: Duration,
    slot: auth::KeySlot,
) -> crate::methods::Events {
    use futures::StreamExt;
    async_stream::stream! {
        // The key's request slot is held until the stream ends.
        let _slot = slot;
        let deadline = tokio::time::sleep(limit);
        tokio::pin!(deadline);
        let mut events = events;
        loop {
            tokio::select! {
                next = events.next() => match next {
                    Some(ev) => yield ev,
                    None => return,
                },
                () = &mut deadline => {
                    yield Err(Error::Timeout(format!(
                        "the stream ran past its {} s limit (server.stream_timeout_secs)",
                        limit.as_secs()
                    )));
                    return;
                }
            }
        }
    }
    .boxed()
}

/// Bodies declared larger than this are not read at all before the 413.
const DISCARD_AT_MOST: u64 = 64 << 20;

/// A client sending a body past the limit is still writing when its 413 is ready; if the server
/// answers and closes then, the client's next write fails with a broken pipe (or the reset
/// throws away the answer) and it never learns why. Reading the rest and throwing it away, up to
/// a bound in bytes and time, lets the envelope arrive, as nginx's lingering close does.
async fn discard_oversized(
    State(max): State<usize>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use futures::StreamExt;
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > max as u64 => {
            if len <= DISCARD_AT_MOST {
                let mut body = req.into_body().into_data_stream();
                let discard = async { while let Some(Ok(_)) = body.next().await {} };
                let _ = tokio::time::timeout(Duration::from_secs(10), discard).await;
            }
            Error::PayloadTooLarge(format!(
                "the request body ({len} bytes) is larger than this server accepts ({max} bytes)"
            ))
            .into_response()
        }
        _ => next.run(req).await,
    }
}

#[utoipa::path(get, path = "/health", tag = "server", responses((status = 200, description = "ready", body = Object), (status = 503, description = "loading or stopping", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn health(State(s): State<AppState>) -> Response {
    if s.shutting_down.load(Ordering::SeqCst) {
        return Error::Unavailable("the server is shutting down".into()).into_response();
    }
    if !s.router.all_ready() {
        return Error::Unavailable("the model is still loading".into()).into_response();
    }
    if s.embeddings.loading() {
        return Error::Unavailable("the embedding model is still loading".into()).into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

fn model_object(id: &str, created: u64) -> serde_json::Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "experient"})
}

#[utoipa::path(get, path = "/v1/models", tag = "openai", responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list_models(State(s): State<AppState>) -> Json<serde_json::Value> {
    let mut data: Vec<_> = s
        .router
        .models()
        .map(|(id, _)| model_object(id, s.started))
        .collect();
    // The embedding model last, so that a client taking the first model gets a chat model.
    if s.embeddings.config.enabled {
        data.push(model_object(&s.embeddings.config.id, s.started));
    }
    Json(json!({"object": "list", "data": data}))
}

#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai", params(("id" = String, Path)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_model(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, Error> {
    let parsed = crate::router::parse_model_name(&id);
    let embedding = s.embeddings.config.enabled && id == s.embeddings.config.id;
    if embedding || s.router.backend(parsed.model).is_some() {
        Ok(Json(model_object(&id, s.started)).into_response())
    } else {
        Err(Error::not_found(
            format!("the model '{id}' does not exist"),
            "model",
        ))
    }
}

async fn not_found(uri: axum::http::Uri) -> Error {
    Error::not_found(format!("no route for {}", uri.path()), None)
}

async fn method_not_allowed() -> Response {
    let e = Error::invalid("this method is not allowed on this route", None);
    (
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        Json(e.envelope()),
    )
        .into_response()
}
