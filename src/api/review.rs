//! `/v1/libraries/{name}/proposals/...`: changes held for review, with the evidence behind
//! each, and the reviewer's approve / edit / reject (see `experience::proposals`).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::parse_json;
use super::libraries::{blocking, library_object};
use super::AppState;
use crate::error::{Error, Result};
use crate::experience::proposals::{Edit, Proposal, Proposed, Status};
use crate::experience::{Library, VersionSummary};

/// Review of proposed changes: list, read, approve, reject.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(approve_many))
        .routes(routes!(reject_many))
        .routes(routes!(get_one))
        .routes(routes!(approve_one))
        .routes(routes!(reject_one))
}

pub(super) fn proposal_object(p: &Proposal) -> Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    v["object"] = json!("library.proposal");
    v
}

/// A proposal as a reviewer sees it: with the experience it would change as it is now, and
/// for learned ones the run's evidence (`full`: with every attempt's output).
fn reviewed(lib: &Library, p: &Proposal, runs_dir: &std::path::Path, full: bool) -> Value {
    let mut v = proposal_object(p);
    let (target, text) = match &p.change {
        Proposed::Add { text, .. } => (None, Some(text.as_str())),
        Proposed::Update { id, text, .. } => (Some(id.as_str()), text.as_deref()),
        Proposed::Delete { id } => (Some(id.as_str()), None),
    };
    if let Some(id) = target {
        v["current"] = json!(lib
            .get(id)
            .map(|e| super::libraries::experience_object(lib, &e)));
    }
    if let (Some(run), Some(step)) = (&p.origin.run, p.origin.step) {
        let mut e = crate::learn::evidence::step_evidence(runs_dir, run, step, text, target);
        if !full {
            // The list stays small: attempts' outputs are for the one proposal being read.
            for g in e
                .iter_mut()
                .flat_map(|e| e["groups"].as_array_mut().into_iter().flatten())
            {
                if let Some(o) = g.as_object_mut() {
                    o.remove("attempts");
                    o.remove("operations_reply");
                }
            }
        }
        v["evidence"] = json!(e);
    }
    v
}

#[derive(Deserialize)]
pub(super) struct ListParams {
    status: Option<String>,
}

#[utoipa::path(get, path = "/v1/libraries/{name}/proposals", tag = "libraries", params(("name" = String, Path, description = "the library"), ("status" = Option<String>, Query, description = "pending (default), approved, rejected or all")), responses((status = 200, description = "the proposals, newest last, with their evidence", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<ListParams>,
) -> Result<Json<Value>> {
    let wanted = match q.status.as_deref().unwrap_or("pending") {
        "all" => None,
        "pending" => Some(Status::Pending),
        "approved" => Some(Status::Approved),
        "rejected" => Some(Status::Rejected),
        other => {
            return Err(Error::invalid(
                format!("status must be pending, approved, rejected or all, got '{other}'"),
                "status",
            ))
        }
    };
    let lib = s.store.library(&name)?;
    let runs_dir = s.jobs.runs_dir().to_owned();
    let data = tokio::task::spawn_blocking(move || {
        lib.proposals()
            .iter()
            .filter(|p| wanted.is_none_or(|w| p.status == w))
            .map(|p| reviewed(&lib, p, &runs_dir, false))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(Error::internal)?;
    Ok(Json(json!({"object": "list", "data": data})))
}

#[utoipa::path(get, path = "/v1/libraries/{name}/proposals/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path, description = "P1, P2, ...")), responses((status = 200, description = "the proposal with its full evidence", body = Object), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or proposal", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_one(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let p = lib.proposal(&id).ok_or_else(|| {
        Error::not_found(format!("library '{name}' has no proposal '{id}'"), "id")
    })?;
    let runs_dir = s.jobs.runs_dir().to_owned();
    tokio::task::spawn_blocking(move || Json(reviewed(&lib, &p, &runs_dir, true)))
        .await
        .map_err(Error::internal)
}

/// The body of an approval; all of it is optional.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApproveBody {
    /// The proposals to approve together (only on `/proposals/approve`).
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    reviewer: Option<String>,
    /// Replacement text or tags by proposal id (`/proposals/approve`).
    #[serde(default)]
    edits: BTreeMap<String, Edit>,
    /// Replacement text or tags (`/proposals/{id}/approve`).
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RejectBody {
    #[serde(default)]
    ids: Vec<String>,
    #[serde(default)]
    reviewer: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// An optional JSON body: none at all is the default.
fn optional<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse_json(body)
    }
}

fn check_reviewer(r: &Option<String>) -> Result<()> {
    if r.as_ref().is_some_and(|r| r.chars().count() > 200) {
        return Err(Error::invalid(
            "reviewer is longer than 200 characters",
            "reviewer",
        ));
    }
    Ok(())
}

async fn approve(
    s: &AppState,
    name: String,
    ids: Vec<String>,
    edits: BTreeMap<String, Edit>,
    reviewer: Option<String>,
) -> Result<Json<Value>> {
    check_reviewer(&reviewer)?;
    let lib = s.store.library(&name)?;
    let v = blocking(&s.store, move |st| {
        st.approve(&name, &ids, &edits, reviewer)
    })
    .await?;
    let mut o = serde_json::to_value(VersionSummary::from(&v)).unwrap_or_default();
    o["object"] = json!("library.version");
    o["ops"] = json!(v.ops);
    o["library"] = library_object(&lib);
    Ok(Json(o))
}

#[utoipa::path(post, path = "/v1/libraries/{name}/proposals/approve", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body(content = Object, description = "{\"ids\": [\"P1\", ...], \"reviewer\"?, \"edits\"?: {\"P1\": {\"text\"?, \"tags\"?}}}"), responses((status = 200, description = "the one version that commits them", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library, proposal or experience", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "already decided", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn approve_many(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: ApproveBody = optional(&body)?;
    if b.text.is_some() || b.tags.is_some() {
        return Err(Error::invalid(
            "give edits by proposal id in 'edits' when approving several",
            "text",
        ));
    }
    approve(&s, name, b.ids, b.edits, b.reviewer).await
}

#[utoipa::path(post, path = "/v1/libraries/{name}/proposals/{id}/approve", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), request_body(content = Object, description = "optional: {\"reviewer\"?, \"text\"?, \"tags\"?}"), responses((status = 200, description = "the version that commits it", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library, proposal or experience", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "already decided", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn approve_one(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: ApproveBody = optional(&body)?;
    if !b.ids.is_empty() || !b.edits.is_empty() {
        return Err(Error::invalid(
            "this route approves the proposal in its path; use text and tags to edit it",
            "ids",
        ));
    }
    let mut edits = BTreeMap::new();
    if b.text.is_some() || b.tags.is_some() {
        edits.insert(
            id.clone(),
            Edit {
                text: b.text,
                tags: b.tags,
            },
        );
    }
    approve(&s, name, vec![id], edits, b.reviewer).await
}

async fn reject(
    s: &AppState,
    name: String,
    ids: Vec<String>,
    b: RejectBody,
) -> Result<Json<Value>> {
    check_reviewer(&b.reviewer)?;
    if b.reason.as_ref().is_some_and(|r| r.chars().count() > 2000) {
        return Err(Error::invalid(
            "reason is longer than 2000 characters",
            "reason",
        ));
    }
    let done = blocking(&s.store, move |st| {
        st.reject(&name, &ids, b.reviewer, b.reason)
    })
    .await?;
    let data: Vec<Value> = done.iter().map(proposal_object).collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

#[utoipa::path(post, path = "/v1/libraries/{name}/proposals/reject", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body(content = Object, description = "{\"ids\": [\"P1\", ...], \"reviewer\"?, \"reason\"?}"), responses((status = 200, description = "the rejected proposals", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or proposal", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "already decided", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn reject_many(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>> {
    let mut b: RejectBody = optional(&body)?;
    let ids = std::mem::take(&mut b.ids);
    reject(&s, name, ids, b).await
}

#[utoipa::path(post, path = "/v1/libraries/{name}/proposals/{id}/reject", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), request_body(content = Object, description = "optional: {\"reviewer\"?, \"reason\"?}"), responses((status = 200, description = "the rejected proposal", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or proposal", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "already decided", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn reject_one(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>> {
    let b: RejectBody = optional(&body)?;
    if !b.ids.is_empty() {
        return Err(Error::invalid(
            "this route rejects the proposal in its path",
            "ids",
        ));
    }
    reject(&s, name, vec![id], b).await
}
