//! Feedback on served completions: `POST /v1/feedback` (a user key will do: applications send
//! it), `GET /v1/feedback` (admin: it shows what users asked), and
//! `DELETE /v1/libraries/{name}/traffic`, which purges a library's records and feedback.
//!
//! Feedback names the response id the client saw (`chatcmpl-...` or `resp_...`, streamed or
//! not) of a completion that was recorded (the library's `record` setting). A library with
//! `auto_learn` starts a learning job from its traffic once enough new feedback has arrived.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use utoipa_axum::{router::OpenApiRouter, routes};

use super::error::JsonBody;
use super::AppState;
use crate::error::{Error, Result};

/// The feedback routes, under the completions they rate.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(purge))
}

/// What a person says about a served completion.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FeedbackBody {
    /// The response id the client saw.
    pub id: String,
    /// 0 (wrong) to 1 (right).
    #[serde(default)]
    pub score: Option<f64>,
    /// "good" (1) or "bad" (0), instead of a score.
    #[serde(default)]
    pub label: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    /// The right answer, when the person knows it: learning uses it as the reference.
    #[serde(default)]
    pub expected: Option<String>,
}

const MAX_COMMENT: usize = 4_000;
const MAX_EXPECTED: usize = 16_000;

impl FeedbackBody {
    fn score(&self) -> Result<f64> {
        match (self.score, self.label.as_deref()) {
            (Some(_), Some(_)) => Err(Error::invalid("give a score or a label, not both", "label")),
            (Some(s), None) if (0.0..=1.0).contains(&s) => Ok(s),
            (Some(s), None) => Err(Error::invalid(
                format!("score must be from 0 to 1, got {s}"),
                "score",
            )),
            (None, Some("good")) => Ok(1.0),
            (None, Some("bad")) => Ok(0.0),
            (None, Some(other)) => Err(Error::invalid(
                format!("label must be \"good\" or \"bad\", got \"{other}\""),
                "label",
            )),
            (None, None) => Err(Error::invalid(
                "feedback needs a score (0 to 1) or a label (\"good\" or \"bad\")",
                "score",
            )),
        }
    }
}

#[utoipa::path(post, path = "/v1/feedback", tag = "feedback", request_body = FeedbackBody, responses((status = 201, description = "kept", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no recorded completion with that id", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn create(
    State(s): State<AppState>,
    axum::Extension(caller): axum::Extension<super::auth::Caller>,
    JsonBody(body): JsonBody<FeedbackBody>,
) -> Result<Response> {
    let score = body.score()?;
    s.feedback_rate.take(caller.owner.as_deref())?;
    if body.comment.as_ref().is_some_and(|c| c.len() > MAX_COMMENT) {
        return Err(Error::invalid(
            format!("comment may hold at most {MAX_COMMENT} bytes"),
            "comment",
        ));
    }
    if body
        .expected
        .as_ref()
        .is_some_and(|c| c.len() > MAX_EXPECTED)
    {
        return Err(Error::invalid(
            format!("expected may hold at most {MAX_EXPECTED} bytes"),
            "expected",
        ));
    }
    let rater = crate::experience::traffic::Rater {
        owner: caller.owner.clone(),
        admin: caller.admin,
    };
    caller.may_use(Some(&s.traffic.library_of(&body.id, &rater)?))?;
    let traffic = s.traffic.clone();
    let store = s.store.clone();
    let fb = tokio::task::spawn_blocking(move || {
        let (fb, credited) = traffic.add_feedback(
            &body.id,
            &rater,
            score,
            body.label,
            body.comment,
            body.expected,
        )?;
        // The feedback is kept; crediting it is statistics, so a failure there is logged and
        // does not fail the request.
        if let Some(a) = credited {
            if let Err(e) = store.attribute(&fb.library, &a, score) {
                tracing::warn!(library = %fb.library, error = %e, "crediting feedback failed");
            }
        }
        Ok::<_, Error>(fb)
    })
    .await
    .map_err(Error::internal)??;
    super::jobs::auto_learn(&s, &fb.library).await;
    Ok((StatusCode::CREATED, Json(fb)).into_response())
}

/// Read as text, as the other list routes read theirs, so that a bad value gets the error
/// envelope from here rather than axum's plain-text rejection.
#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    library: Option<String>,
    /// RFC 3339 time or seconds since the epoch: only feedback after it.
    since: Option<String>,
    /// The newest this many (default 100, at most 1000).
    limit: Option<String>,
}

fn parse_since(s: &str) -> Result<DateTime<Utc>> {
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0)
            .ok_or_else(|| Error::invalid("since is out of range", "since"));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            Error::invalid(
                "since must be an RFC 3339 time or seconds since the epoch",
                "since",
            )
        })
}

#[utoipa::path(get, path = "/v1/feedback", tag = "feedback", params(("library" = Option<String>, Query), ("since" = Option<String>, Query), ("limit" = Option<usize>, Query)), responses((status = 200, description = "feedback, oldest first", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn list(
    State(s): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<serde_json::Value>> {
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|k| (1..=1000).contains(k))
            .ok_or_else(|| Error::invalid("limit must be a number from 1 to 1000", "limit"))?,
    };
    if let Some(l) = &q.library {
        crate::experience::validate_library_name(l)?;
    }
    let since = q.since.as_deref().map(parse_since).transpose()?;
    let traffic = s.traffic.clone();
    let all = tokio::task::spawn_blocking(move || traffic.feedback(q.library.as_deref(), since))
        .await
        .map_err(Error::internal)??;
    let data = &all[all.len().saturating_sub(limit)..];
    Ok(Json(json!({"object": "list", "data": data})))
}

#[utoipa::path(delete, path = "/v1/libraries/{name}/traffic", tag = "feedback", params(("name" = String, Path)), responses((status = 200, description = "purged", body = Object), (status = 403, description = "needs an admin key", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn purge(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>> {
    crate::experience::validate_library_name(&name)?;
    let traffic = s.traffic.clone();
    let n = name.clone();
    tokio::task::spawn_blocking(move || traffic.purge(&n))
        .await
        .map_err(Error::internal)??;
    Ok(Json(json!({"library": name, "purged": true})))
}

/// Feedback given per key in the current minute, so that one key cannot flood a library's
/// feedback (and with it the learning that feedback starts). Bounded: keys not seen for a
/// minute are forgotten, and at most [`RATE_KEYS`] are tracked.
pub struct FeedbackRate {
    per_minute: u32,
    counts: moka::sync::Cache<String, std::sync::Arc<std::sync::atomic::AtomicU32>>,
}

/// The most keys whose feedback rate is tracked at once.
const RATE_KEYS: u64 = 100_000;

impl FeedbackRate {
    /// A limit of `per_minute` feedback per key.
    pub fn new(per_minute: u32) -> FeedbackRate {
        FeedbackRate {
            per_minute,
            counts: moka::sync::Cache::builder()
                .max_capacity(RATE_KEYS)
                .time_to_live(std::time::Duration::from_secs(60))
                .build(),
        }
    }

    /// Counts one feedback of `owner` (the keyless server's clients count as one), or refuses
    /// it with 429 when the key has given its minute's worth.
    fn take(&self, owner: Option<&str>) -> Result<()> {
        use std::sync::atomic::Ordering;
        let count = self
            .counts
            .get_with(owner.unwrap_or("").to_owned(), Default::default);
        if count.fetch_add(1, Ordering::Relaxed) >= self.per_minute {
            return Err(Error::Overloaded {
                message: format!(
                    "this key has given {} feedback this minute, the most allowed; try again later",
                    self.per_minute
                ),
                retry_after_secs: 60,
            });
        }
        Ok(())
    }
}

/// What a served completion is recorded with, when its library records.
pub(super) struct Recording {
    pub traffic: std::sync::Arc<crate::experience::traffic::Traffic>,
    pub record: crate::experience::traffic::Record,
}

/// The library whose completions are recorded on this route, if any: the library's own
/// `record` setting, or `[traffic] record_all`.
pub(super) fn recording(
    state: &AppState,
    caller: &super::auth::Caller,
    route: &crate::router::Route,
    id: &str,
    api: &str,
    messages: &[crate::backend::Message],
) -> Option<Recording> {
    let library = route.library.as_ref()?;
    let on = state.traffic.config().record_all
        || state
            .store
            .library(library)
            .is_ok_and(|l| l.settings().record);
    on.then(|| Recording {
        traffic: state.traffic.clone(),
        record: crate::experience::traffic::Record {
            id: id.to_owned(),
            created: Utc::now(),
            library: library.clone(),
            model: route.model.clone(),
            api: api.to_owned(),
            messages: messages
                .iter()
                .map(|m| {
                    let mut v = json!({"role": m.role.as_str(), "content": m.content});
                    if !m.tool_calls.is_empty() {
                        v["tool_calls"] = json!(m.tool_calls);
                    }
                    v
                })
                .collect(),
            answer: String::new(),
            experiences: vec![],
            owner: caller.owner.clone(),
            version: None,
            canary: None,
        },
    })
}

impl Recording {
    /// Keeps the record with its answer and what served it; a failure is logged, since the
    /// client has its answer.
    pub fn keep(mut self, answer: String, applied: &crate::methods::Applied) {
        self.record.answer = answer;
        self.record.experiences = applied.experiences.clone().unwrap_or_default();
        self.record.version = applied.version;
        self.record.canary = applied.canary.clone();
        if let Err(e) = self.traffic.record(&self.record) {
            tracing::warn!(id = %self.record.id, error = %e, "could not record a completion");
        }
    }
}

/// A choice's answer as recorded: its text, or its calls as JSON when it made only calls.
pub(super) fn answer_text(text: &str, calls: &[crate::backend::ToolCall]) -> String {
    if text.is_empty() && !calls.is_empty() {
        json!(calls).to_string()
    } else {
        text.to_owned()
    }
}

/// Passes a stream through and, once it has ended without an error, records the first
/// choice's answer before the end reaches the client (so feedback can follow at once).
pub(super) fn record_stream(
    events: crate::methods::Events,
    rec: Option<Recording>,
    applied: crate::methods::Applied,
) -> crate::methods::Events {
    use crate::backend::Event as Model;
    use crate::methods::Event;
    use futures::StreamExt;
    let Some(rec) = rec else { return events };
    async_stream::stream! {
        let mut events = events;
        let (mut text, mut calls) = (String::new(), Vec::new());
        let mut failed = false;
        while let Some(ev) = events.next().await {
            match &ev {
                Ok(Event::Model(Model::Delta { index: 0, text: t })) => text.push_str(t),
                Ok(Event::Model(Model::ToolCall { index: 0, call })) => calls.push(call.clone()),
                Err(_) => failed = true,
                _ => {}
            }
            yield ev;
        }
        if !failed {
            let answer = answer_text(&text, &calls);
            let _ = tokio::task::spawn_blocking(move || rec.keep(answer, &applied)).await;
        }
    }
    .boxed()
}
