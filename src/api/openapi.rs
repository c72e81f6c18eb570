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
    // Every other path comes from the router (`api::api_routes`); this one is routed as a
    // catch-all that OpenAPI cannot spell.
    paths(super::get_model),
    components(schemas(ErrorEnvelope)),
    modifiers(&BearerKeys),
    security(("bearer" = []), ()),
)]
pub(super) struct ApiDoc;

/// The document, built once from the routes.
pub fn spec() -> &'static serde_json::Value {
    static SPEC: std::sync::OnceLock<serde_json::Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let (_, doc) = super::api_routes().split_for_parts();
        serde_json::to_value(doc).unwrap_or_default()
    })
}

#[utoipa::path(get, path = "/openapi.json", tag = "server", responses((status = 200, description = "this document", body = Object)))]
pub(super) async fn document() -> Json<serde_json::Value> {
    Json(spec().clone())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_lists_what_the_router_routes() {
        let doc = super::spec();
        let paths = doc["paths"].as_object().unwrap();
        for (path, method) in [
            ("/v1/chat/completions", "post"),
            ("/v1/models/{id}", "get"),
            ("/v1/libraries/{name}/canary", "delete"),
            ("/v1/jobs/{id}/chart.svg", "get"),
            ("/openapi.json", "get"),
        ] {
            assert!(paths[path].get(method).is_some(), "{method} {path}");
        }
        assert!(!paths.keys().any(|p| p.starts_with("/ui")));
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
