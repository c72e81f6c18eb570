//! `/ui`: the curation UI, a single page compiled into the binary (no Node toolchain, no
//! CDN, no external fonts: deployments may be offline). It talks only to the JSON API, with
//! the admin key a person types once per browser session, so it can do nothing the API
//! would not let that key do.

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

/// Scripts and styles come from this server only; nothing inline runs, and no page may
/// frame the UI (clickjacking an admin).
const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
                   connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The curation UI's page and files, under `/ui`.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route(
            "/ui",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/ui/icon.svg",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
}

/// Whether a path is one of the UI's own files, which need no key.
pub fn is_asset(path: &str) -> bool {
    matches!(
        path,
        "/ui" | "/ui/" | "/ui/app.js" | "/ui/app.css" | "/ui/icon.svg"
    )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    // The files change with the binary; revalidating keeps an upgraded server's UI current.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Experiences and model outputs are text a model or a user wrote; the UI must never
    /// parse them as HTML.
    #[test]
    fn the_script_never_writes_html() {
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!SCRIPT.contains(sink), "app.js uses {sink}");
        }
    }

    /// Inline styles and scripts would be refused by the CSP, silently breaking the page.
    #[test]
    fn nothing_inline_needs_the_csp_relaxed() {
        assert!(!SCRIPT.contains("style:") && !SCRIPT.contains("\"style\""));
        assert!(!INDEX.contains("<script>") && !INDEX.contains("style="));
        assert!(
            !INDEX.contains("onclick") && !INDEX.contains("http://") && !INDEX.contains("https://")
        );
        assert!(!STYLE.contains("@import") && !STYLE.contains("url(http"));
    }

    #[test]
    fn every_asset_route_is_public_and_nothing_else() {
        for p in ["/ui", "/ui/", "/ui/app.js", "/ui/app.css", "/ui/icon.svg"] {
            assert!(is_asset(p), "{p}");
        }
        for p in [
            "/ui/../v1/libraries",
            "/uix",
            "/v1/libraries",
            "/ui/app.js/x",
        ] {
            assert!(!is_asset(p), "{p}");
        }
    }
}
