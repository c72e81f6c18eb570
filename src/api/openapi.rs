//! `GET /openapi.json`: the routes as an OpenAPI 3.1 document, generated from the handlers'
//! `utoipa::path` attributes and the request types' own definitions, so that it cannot drift
//! from what the server parses. Fuzzers (schemathesis, `bench/fuzz_api.sh`) read it to find
//! inputs that make the server fail.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// The error envelope every failure is sent in.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub(super) struct ErrorEnvelope {
    error: ErrorDetail,
}

#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct ErrorDetail {
    message: String,
    #[schema(rename = "type")]
    kind: String,
    param: Option<String>,
    code: Option<String>,
}

struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "experient",
        description = "OpenAI-compatible server that makes a local model better at inference time"
    ),
    paths(
        super::chat::chat_completions,
        super::completions::completions,
        super::feedback::create,
        super::feedback::list,
        super::feedback::purge,
        super::responses::create,
        super::responses::retrieve,
        super::responses::delete,
        super::responses::input_items,
        super::list_models,
        super::get_model,
        super::health,
        super::metrics::render,
        super::libraries::list_libraries,
        super::libraries::create_library,
        super::libraries::get_library,
        super::libraries::patch_library,
        super::libraries::delete_library,
        super::libraries::list_experiences,
        super::libraries::add_experience,
        super::libraries::get_experience,
        super::libraries::patch_experience,
        super::libraries::delete_experience,
        super::libraries::provenance,
        super::review::list,
        super::review::get_one,
        super::review::approve_many,
        super::review::approve_one,
        super::review::reject_many,
        super::review::reject_one,
        super::libraries::list_versions,
        super::libraries::get_version,
        super::libraries::diff,
        super::libraries::rollback,
        super::libraries::export,
        super::libraries::import,
        super::jobs::start,
        super::jobs::list,
        super::jobs::get_job,
        super::jobs::cancel,
        super::jobs::chart,
        super::evaluations::create,
        super::evaluations::list,
        super::evaluations::read,
        super::evaluations::cancel,
        super::canary::start,
        super::canary::read,
        super::canary::stop,
        document,
    ),
    components(schemas(ErrorEnvelope)),
    modifiers(&BearerKeys),
    security(("bearer" = []), ()),
)]
struct ApiDoc;

/// The document, built once.
pub fn spec() -> &'static serde_json::Value {
    static SPEC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}

#[utoipa::path(get, path = "/openapi.json", tag = "server", responses((status = 200, description = "this document", body = Object)))]
pub(super) async fn document() -> Json<serde_json::Value> {
    Json(spec().clone())
}
