//! Live trials over HTTP: `POST /v1/libraries/{name}/canary` serves a candidate (a version, or
//! pending proposals on top of the live version) to a share of the library's traffic,
//! `GET` shows the running trial with its counts and the ended ones with their decisions, and
//! `DELETE` stops the running one. Feedback on the answers decides it (see
//! `experience::canary`).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::JsonBody;
use super::libraries::blocking;
use super::AppState;
use crate::error::Result;
use crate::experience::canary::{Canary, CanarySpec};

/// The live-trial routes, under the library they try.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(start, read, stop))
}

/// A trial as the API shows it: its record, with each arm's mean feedback.
pub fn canary_object(c: &Canary) -> Value {
    let mut v = serde_json::to_value(c).unwrap_or_default();
    v["object"] = json!("library.canary");
    v["control"]["mean"] = json!(c.control.mean());
    v["trial"]["mean"] = json!(c.trial.mean());
    v
}

#[utoipa::path(post, path = "/v1/libraries/{name}/canary", tag = "libraries", params(("name" = String, Path)), request_body = Object, responses((status = 201, description = "the trial, running", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library, version or pending proposal", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "a trial is already running", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn start(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    JsonBody(spec): JsonBody<CanarySpec>,
) -> Result<Response> {
    let keep = s.store.options().max_proposals;
    let c = blocking(&s.store, move |st| {
        st.library(&name)?
            .start_canary(&spec, caller.owner.clone(), keep)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(canary_object(&c))).into_response())
}

#[utoipa::path(get, path = "/v1/libraries/{name}/canary", tag = "libraries", params(("name" = String, Path)), responses((status = 200, description = "the running trial (or null) and the ended ones, newest first", body = Object), (status = 404, description = "no such library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn read(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    let keep = s.store.options().max_proposals;
    let t = blocking(&s.store, move |st| Ok(st.library(&name)?.trials(keep))).await?;
    Ok(Json(json!({
        "object": "library.canaries",
        "current": t.current.as_ref().map(canary_object),
        "past": t.past.iter().map(canary_object).collect::<Vec<_>>(),
    })))
}

#[utoipa::path(delete, path = "/v1/libraries/{name}/canary", tag = "libraries", params(("name" = String, Path)), responses((status = 200, description = "the trial, stopped; the live version stays", body = Object), (status = 404, description = "no such library, or no trial running", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn stop(
    State(s): State<AppState>,
    Path(name): Path<String>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
) -> Result<Json<Value>> {
    let c = blocking(&s.store, move |st| {
        st.library(&name)?.stop_canary(caller.owner.clone())
    })
    .await?;
    Ok(Json(canary_object(&c)))
}
