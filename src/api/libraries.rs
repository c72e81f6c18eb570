//! `/v1/libraries/...`: curating experience libraries over HTTP.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::JsonBody;
use super::AppState;
use crate::error::{Error, Result};
use crate::experience::retrieve::{Mode, RetrievalOverride};
use crate::experience::{self, Experience, Library, Settings, Store};

/// The experience-library admin routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_libraries, create_library))
        .routes(routes!(get_library, patch_library, delete_library))
        .routes(routes!(list_experiences, add_experience))
        .routes(routes!(get_experience, patch_experience, delete_experience))
        .routes(routes!(provenance))
        .routes(routes!(list_versions))
        .routes(routes!(get_version))
        .routes(routes!(diff))
        .routes(routes!(rollback))
        .routes(routes!(export))
        .routes(routes!(import))
}

/// Store operations fsync and commit the index, so they run off the async threads.
pub(super) async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T> + Send + 'static,
) -> Result<T> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Error::internal(format!("store task failed: {e}")))?
}

pub(super) fn library_object(lib: &Library) -> Value {
    let last = lib.versions().pop();
    json!({
        "object": "library",
        "name": lib.name,
        "version": lib.version(),
        "experiences": lib.len(),
        "updated_at": last.map(|v| v.at),
        "pending_proposals": lib.pending_proposals(),
        "canary": lib.running_canary().as_ref().map(super::canary::canary_object),
        "settings": lib.settings(),
        "vectors": lib.vector_status(),
    })
}

/// An experience as the API shows it, with its use count.
pub fn experience_object(lib: &Library, e: &Experience) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or_default();
    v["object"] = json!("experience");
    v["uses"] = json!(lib.uses(&e.id));
    let credit = lib.credit(&e.id);
    v["helpful"] = json!(credit.helpful);
    v["harmful"] = json!(credit.harmful);
    v["credit"] = json!(credit.current);
    v
}

fn list(data: Vec<Value>) -> Json<Value> {
    Json(json!({"object": "list", "data": data}))
}

#[utoipa::path(get, path = "/v1/libraries", tag = "libraries", responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list_libraries(State(s): State<AppState>) -> Result<Json<Value>> {
    let healthy = s
        .store
        .names()
        .into_iter()
        .filter_map(|n| s.store.library(&n).ok())
        .map(|l| library_object(&l));
    // A damaged library is listed, so that it is not mistaken for a free name.
    let damaged = s.store.damaged().iter().map(|(name, reason)| {
        json!({"object": "library", "name": name, "status": "damaged", "error": reason})
    });
    Ok(list(healthy.chain(damaged).collect()))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateLibrary {
    name: String,
    #[serde(default)]
    settings: Option<Settings>,
}

#[utoipa::path(post, path = "/v1/libraries", tag = "libraries", request_body = CreateLibrary, responses((status = 201, description = "created", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 409, description = "exists", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn create_library(
    State(s): State<AppState>,
    JsonBody(body): JsonBody<CreateLibrary>,
) -> Result<Response> {
    if let Some(settings) = &body.settings {
        settings.check(s.store.options().max_top_k)?;
    }
    let lib = blocking(&s.store, move |st| {
        let lib = st.create(&body.name)?;
        if let Some(settings) = body.settings {
            lib.set_settings(settings)?;
        }
        Ok(lib)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(library_object(&lib))).into_response())
}

#[utoipa::path(get, path = "/v1/libraries/{name}", tag = "libraries", params(("name" = String, Path, description = "the library")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_library(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    Ok(Json(library_object(&lib)))
}

#[utoipa::path(patch, path = "/v1/libraries/{name}", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body = Settings, responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn patch_library(
    State(s): State<AppState>,
    Path(name): Path<String>,
    JsonBody(settings): JsonBody<Settings>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let l2 = lib.clone();
    blocking(&s.store, move |_| l2.set_settings(settings)).await?;
    Ok(Json(library_object(&lib)))
}

#[utoipa::path(delete, path = "/v1/libraries/{name}", tag = "libraries", params(("name" = String, Path, description = "the library")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn delete_library(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    let n = name.clone();
    blocking(&s.store, move |st| st.delete(&n)).await?;
    // Its recorded traffic and feedback go with it: user data outlives nothing it served.
    let (traffic, n) = (s.traffic.clone(), name.clone());
    tokio::task::spawn_blocking(move || traffic.purge(&n))
        .await
        .map_err(crate::error::Error::internal)??;
    Ok(Json(
        json!({"id": name, "object": "library.deleted", "deleted": true}),
    ))
}

#[derive(Deserialize)]
pub(super) struct ListParams {
    q: Option<String>,
    tag: Option<String>,
    limit: Option<String>,
    mode: Option<String>,
    min_score: Option<String>,
    diversity: Option<String>,
    lexical_weight: Option<String>,
}

impl ListParams {
    /// The search's overrides of the library's retrieval settings, each checked by name.
    fn retrieval(&self) -> Result<RetrievalOverride> {
        let mode = match self.mode.as_deref() {
            None => None,
            Some("hybrid") => Some(Mode::Hybrid),
            Some("lexical") => Some(Mode::Lexical),
            Some("semantic") => Some(Mode::Semantic),
            Some(_) => {
                return Err(Error::invalid(
                    "mode must be hybrid, lexical or semantic",
                    "mode",
                ))
            }
        };
        let number = |v: &Option<String>, name: &'static str| match v.as_deref() {
            None => Ok(None),
            Some(t) => t
                .parse::<f64>()
                .map(Some)
                .map_err(|_| Error::invalid(format!("{name} must be a number"), name)),
        };
        let o = RetrievalOverride {
            mode,
            min_score: number(&self.min_score, "min_score")?,
            diversity: number(&self.diversity, "diversity")?,
            lexical_weight: number(&self.lexical_weight, "lexical_weight")?,
        };
        o.check("")?;
        Ok(o)
    }
}

#[utoipa::path(get, path = "/v1/libraries/{name}/experiences", tag = "libraries", params(("name" = String, Path, description = "the library"), ("q" = Option<String>, Query, description = "search: BM25 and embeddings fused, as the library's retrieval settings say"), ("tag" = Option<String>, Query), ("limit" = Option<String>, Query, description = "1 to 10000"), ("mode" = Option<String>, Query, description = "hybrid, lexical or semantic"), ("min_score" = Option<String>, Query, description = "least cosine similarity, -1 to 1"), ("diversity" = Option<String>, Query, description = "0 to 1"), ("lexical_weight" = Option<String>, Query, description = "hybrid: what BM25 adds to the similarity, 0 to 1")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list_experiences(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<ListParams>,
) -> Result<Json<Value>> {
    let limit = match p.limit.as_deref() {
        None => 100,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=10_000).contains(&n) => n,
            _ => {
                return Err(Error::invalid(
                    "limit must be an integer from 1 to 10000",
                    "limit",
                ))
            }
        },
    };
    let retrieval = p.retrieval()?;
    let lib = s.store.library(&name)?;
    let store = s.store.clone();
    let text = p.q.unwrap_or_default();
    let mode = lib.settings().retrieval.with(&retrieval).mode;
    let vector = match mode.semantic() && !text.trim().is_empty() {
        true => store.embed_query(&text).await,
        false => None,
    };
    let hits = tokio::task::spawn_blocking(move || {
        let q = crate::experience::Query {
            text: &text,
            vector: vector.as_deref(),
            tag: p.tag.as_deref(),
            limit,
            retrieval,
        };
        store.search(&name, &q)
    })
    .await
    .map_err(Error::internal)??;
    let data = hits
        .into_iter()
        .map(|h| {
            let mut v = experience_object(&lib, &h.experience);
            for (field, value) in [
                ("score", h.score),
                ("lexical", h.lexical),
                ("similarity", h.similarity),
            ] {
                if let Some(x) = value {
                    v[field] = json!(x);
                }
            }
            v
        })
        .collect();
    Ok(list(data))
}

#[utoipa::path(get, path = "/v1/libraries/{name}/experiences/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path, description = "E1, E2, ...")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_experience(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let e = lib.get(&id).ok_or_else(|| {
        Error::not_found(format!("library '{name}' has no experience '{id}'"), "id")
    })?;
    Ok(Json(experience_object(&lib, &e)))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewExperience {
    text: String,
    #[serde(default)]
    tags: Vec<String>,
}

#[utoipa::path(post, path = "/v1/libraries/{name}/experiences", tag = "libraries", params(("name" = String, Path, description = "the library")), params(("review" = Option<bool>, Query, description = "hold as a proposal"), ("dedupe" = Option<bool>, Query, description = "refuse (409) a near-duplicate of an experience")), request_body = NewExperience, responses((status = 201, description = "added; near_duplicates lists the experiences it is close to", body = Object), (status = 409, description = "a near-duplicate, with dedupe=true", body = crate::api::openapi::ErrorEnvelope), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn add_experience(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(r): Query<AddParams>,
    JsonBody(body): JsonBody<NewExperience>,
) -> Result<Response> {
    let lib = s.store.library(&name)?;
    let review = flag(r.review.as_deref(), "review")?;
    let dedupe = flag(r.dedupe.as_deref(), "dedupe")?;
    let near = s
        .store
        .near_duplicates(&name, std::slice::from_ref(&body.text))
        .await?
        .pop()
        .flatten();
    if let (true, Some((id, similarity))) = (dedupe, &near) {
        return Err(Error::Conflict(format!(
            "library '{name}' already holds {id}, which says nearly the same (similarity \
             {similarity:.2}); edit it instead, or add without dedupe=true to keep both"
        )));
    }
    let flagged = json!(near
        .iter()
        .map(|(id, similarity)| json!({"id": id, "similarity": similarity}))
        .collect::<Vec<_>>());
    let (status, mut v) = if review {
        let p = blocking(&s.store, move |st| {
            st.propose_one(&name, st.add_change(&body.text, body.tags)?)
        })
        .await?;
        (StatusCode::ACCEPTED, super::review::proposal_object(&p))
    } else {
        let e = blocking(&s.store, move |st| st.add(&name, &body.text, body.tags)).await?;
        (StatusCode::CREATED, experience_object(&lib, &e))
    };
    if near.is_some() {
        v["near_duplicates"] = flagged;
    }
    Ok((status, Json(v)).into_response())
}

/// A manual add's switches: `review` holds it as a proposal; `dedupe` refuses it when the
/// library already holds an experience that says nearly the same (otherwise such an add is
/// kept and flagged in `near_duplicates`).
#[derive(Deserialize)]
pub(super) struct AddParams {
    review: Option<String>,
    dedupe: Option<String>,
}

/// A `true`/`false` query switch, refused by name when it is anything else.
fn flag(v: Option<&str>, name: &'static str) -> Result<bool> {
    match v {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(Error::invalid(
            format!("{name} must be true or false, got '{other}'"),
            name,
        )),
    }
}

/// `?review=true` on a write: hold it as a pending proposal instead of committing it.
#[derive(Deserialize)]
pub(super) struct ReviewParam {
    review: Option<String>,
}

impl ReviewParam {
    fn wanted(&self) -> Result<bool> {
        flag(self.review.as_deref(), "review")
    }
}

/// A write held for review: 202, with the proposal it became.
async fn proposed(
    s: &AppState,
    name: String,
    change: impl FnOnce(&Store) -> Result<experience::Change> + Send + 'static,
) -> Result<Response> {
    let p = blocking(&s.store, move |st| st.propose_one(&name, change(st)?)).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(super::review::proposal_object(&p)),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct EditExperience {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
}

#[utoipa::path(patch, path = "/v1/libraries/{name}/experiences/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), request_body = EditExperience, responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn patch_experience(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(r): Query<ReviewParam>,
    JsonBody(body): JsonBody<EditExperience>,
) -> Result<Response> {
    let lib = s.store.library(&name)?;
    if r.wanted()? {
        return proposed(&s, name, move |st| {
            st.edit_change(&id, body.text, body.tags)
        })
        .await;
    }
    let e = blocking(&s.store, move |st| {
        st.edit(&name, &id, body.text, body.tags)
    })
    .await?;
    Ok(Json(experience_object(&lib, &e)).into_response())
}

#[utoipa::path(delete, path = "/v1/libraries/{name}/experiences/{id}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn delete_experience(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    Query(r): Query<ReviewParam>,
) -> Result<Response> {
    if r.wanted()? {
        return proposed(&s, name, move |_| Ok(experience::Change::Delete { id })).await;
    }
    let i = id.clone();
    blocking(&s.store, move |st| st.remove(&name, &i)).await?;
    Ok(Json(json!({"id": id, "object": "experience.deleted", "deleted": true})).into_response())
}

#[utoipa::path(get, path = "/v1/libraries/{name}/versions", tag = "libraries", params(("name" = String, Path, description = "the library")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list_versions(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let data = lib
        .versions()
        .into_iter()
        .map(|v| {
            let mut o = serde_json::to_value(v).unwrap_or_default();
            o["object"] = json!("library.version");
            o
        })
        .collect();
    Ok(list(data))
}

fn parse_version(v: &str, param: &'static str) -> Result<u64> {
    v.parse().map_err(|_| {
        Error::invalid(
            format!("{param} must be a version number, got '{v}'"),
            param,
        )
    })
}

#[utoipa::path(get, path = "/v1/libraries/{name}/versions/{version}", tag = "libraries", params(("name" = String, Path, description = "the library"), ("version" = String, Path)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn get_version(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let v = parse_version(&version, "version")?;
    let record = lib.version_record(v).ok_or_else(|| {
        Error::not_found(format!("library '{name}' has no version {v}"), "version")
    })?;
    let experiences = lib.state_at(v)?;
    Ok(Json(json!({
        "object": "library.version",
        "version": record.version,
        "at": record.at,
        "message": record.message,
        "ops": record.ops,
        "review": record.review,
        "gate": record.gate,
        "experiences": experiences,
    })))
}

#[derive(Deserialize)]
pub(super) struct DiffParams {
    from: Option<String>,
    to: Option<String>,
}

#[utoipa::path(get, path = "/v1/libraries/{name}/diff", tag = "libraries", params(("name" = String, Path, description = "the library"), ("from" = Option<String>, Query), ("to" = Option<String>, Query)), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn diff(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<DiffParams>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let from = parse_version(p.from.as_deref().unwrap_or("0"), "from")?;
    let to = match p.to.as_deref() {
        Some(t) => parse_version(t, "to")?,
        None => lib.version(),
    };
    let d = lib.diff(from, to)?;
    let mut v = serde_json::to_value(d).map_err(Error::internal)?;
    v["object"] = json!("library.diff");
    Ok(Json(v))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct Rollback {
    version: u64,
}

#[utoipa::path(post, path = "/v1/libraries/{name}/rollback", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body = Rollback, responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn rollback(
    State(s): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Rollback>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let v = blocking(&s.store, move |st| st.rollback(&name, body.version)).await?;
    let mut o =
        serde_json::to_value(crate::experience::VersionSummary::from(&v)).unwrap_or_default();
    o["object"] = json!("library.version");
    o["library"] = library_object(&lib);
    Ok(Json(o))
}

#[derive(Deserialize)]
pub(super) struct FormatParam {
    format: Option<String>,
}

#[utoipa::path(get, path = "/v1/libraries/{name}/export", tag = "libraries", params(("name" = String, Path, description = "the library"), ("format" = Option<String>, Query, description = "experient or grpo")), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn export(
    State(s): State<AppState>,
    Path(name): Path<String>,
    Query(p): Query<FormatParam>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    match p.format.as_deref().unwrap_or("experient") {
        "experient" => Ok(Json(experience::export(&lib))),
        "grpo" => Ok(Json(experience::export_grpo(&lib))),
        other => Err(Error::invalid(
            format!("unknown export format '{other}'; use 'experient' or 'grpo'"),
            "format",
        )),
    }
}

#[utoipa::path(post, path = "/v1/libraries/{name}/import", tag = "libraries", params(("name" = String, Path, description = "the library")), request_body(content = Object, description = "an experient export, or {\"G0\": \"text\", ...}"), responses((status = 200, description = "the object", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn import(
    State(s): State<AppState>,
    Path(name): Path<String>,
    JsonBody(body): JsonBody<Value>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let changes = experience::parse_import(&body)?;
    let count = changes.len();
    let v = blocking(&s.store, move |st| {
        st.commit(&name, &format!("imported {count} experiences"), changes)
    })
    .await?;
    let ids: Vec<&str> = v.ops.iter().map(|o| o.id()).collect();
    Ok(Json(
        json!({"object": "library.import", "version": v.version, "imported": ids, "library": library_object(&lib)}),
    ))
}

#[utoipa::path(get, path = "/v1/libraries/{name}/experiences/{id}/provenance", tag = "libraries", params(("name" = String, Path, description = "the library"), ("id" = String, Path, description = "E1, E2, ...")), responses((status = 200, description = "where the experience came from, every version that touched it, and the evidence it was learned from", body = Object), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such library or item", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "damaged library", body = crate::api::openapi::ErrorEnvelope)))]
/// Why an experience exists: how it entered the library (by hand, imported, learned: then
/// the run's evidence), every later version that changed it with the review that let each
/// in, and how often it was injected. Deleted experiences keep their history.
pub(super) async fn provenance(
    State(s): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>> {
    let lib = s.store.library(&name)?;
    let runs_dir = s.jobs.runs_dir().to_owned();
    tokio::task::spawn_blocking(move || provenance_of(&lib, &id, &runs_dir))
        .await
        .map_err(Error::internal)?
        .map(Json)
}

fn provenance_of(lib: &Library, id: &str, runs_dir: &std::path::Path) -> Result<Value> {
    let history = lib.history(id);
    if history.is_empty() {
        return Err(Error::not_found(
            format!(
                "library '{}' has no experience '{id}', now or ever",
                lib.name
            ),
            "id",
        ));
    }
    let current = lib.get(id);
    // How it entered: the first add (or a restore after it was lost to a rollback).
    let (source, prov) = history
        .iter()
        .find_map(|(_, op)| match op {
            experience::Op::Add {
                source, provenance, ..
            } => Some((*source, provenance.clone())),
            experience::Op::Restore { experience } => {
                Some((experience.source, experience.provenance.clone()))
            }
            _ => None,
        })
        .unwrap_or((experience::Source::Manual, Default::default()));
    let versions: Vec<Value> = history
        .iter()
        .map(|(v, op)| history_entry(lib, v, op))
        .collect();
    let learned = match (&prov.run, prov.step) {
        (Some(run), Some(step)) => {
            let first_text = history.iter().find_map(|(_, op)| match op {
                experience::Op::Add { text, .. } => Some(text.clone()),
                _ => None,
            });
            let proposed_text = versions
                .first()
                .and_then(|v| v["proposal"]["change"]["text"].as_str().map(str::to_owned));
            let text = proposed_text.or(first_text);
            crate::learn::evidence::step_evidence(runs_dir, run, step, text.as_deref(), None)
        }
        _ => None,
    };
    Ok(json!({
        "object": "experience.provenance",
        "library": lib.name,
        "id": id,
        "experience": current.as_ref().map(|e| experience_object(lib, e)),
        "deleted": current.is_none(),
        "source": source,
        "provenance": prov,
        "uses": lib.uses(id),
        "credit": lib.credit_by_version(id),
        "versions": versions,
        "learned": learned,
        "run_records_missing": prov.run.is_some() && learned.is_none(),
    }))
}

/// One version in an experience's history, with the proposal it came through when it was
/// reviewed (an approved version's ops are in the order of its proposals).
fn history_entry(lib: &Library, v: &experience::VersionSummary, op: &experience::Op) -> Value {
    let proposal = v.review.as_ref().and_then(|r| {
        let record = lib.version_record(v.version)?;
        let at = record.ops.iter().position(|o| o == op)?;
        lib.proposal(r.proposals.get(at)?)
    });
    json!({
        "version": v.version,
        "at": v.at,
        "message": v.message,
        "op": op,
        "review": v.review,
        "proposal": proposal.map(|p| super::review::proposal_object(&p)),
    })
}
