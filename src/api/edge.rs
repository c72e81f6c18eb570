//! What every request meets before its handler: the `Host` it names, the media type of its
//! body, and a deadline for that body to arrive.
//!
//! - **Host.** A server on loopback with no keys trusts whoever can reach it. A web page can
//!   reach it too, by DNS rebinding: its own name, re-resolved to 127.0.0.1, makes the browser
//!   send the page's requests here with the page's name as `Host`. Only IP literals,
//!   `localhost` and the names in `server.allowed_hosts` are answered.
//! - **Media type.** A page from another origin may send `text/plain` bodies without asking
//!   (a "simple" request, no preflight), and such bodies were read as JSON: a foreign page
//!   created a library that way. A body must be declared `application/json` (or `+json`),
//!   which a browser sends cross-origin only after a preflight, and no preflight is ever
//!   granted here (no CORS headers are sent).
//! - **Body deadline.** A body that stops arriving held its connection forever (hyper's idle
//!   handling waits for the request in flight). The whole body must arrive within
//!   `server.body_read_timeout_secs` of the headers; otherwise 408 and the connection closes.
//!   The body is buffered here, so every extractor after this reads it from memory.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::Error;

/// The edge's settings, from `[server]`.
#[derive(Debug, Clone)]
pub struct Edge {
    /// Names answered besides IP literals and `localhost`; `*` answers any.
    pub allowed_hosts: Vec<String>,
    /// How long a request's body may take to arrive.
    pub body_timeout: Duration,
    /// Largest body read (413 past it).
    pub max_body_bytes: usize,
}

/// Middleware: refuses a request whose `Host` is neither an IP literal, `localhost`, nor an
/// allowed name. `/health` answers any name: load balancers and orchestrators probe it under
/// names of their own, and it says nothing but whether the server is up.
pub async fn check_host(State(edge): State<Arc<Edge>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    match host_allowed(&edge.allowed_hosts, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn host_allowed(allowed: &[String], headers: &HeaderMap) -> Result<(), Error> {
    // HTTP/1.1 requires Host; a request without one (HTTP/1.0 tools) is no browser's.
    let Some(host) = headers.get(header::HOST) else {
        return Ok(());
    };
    let host = host.to_str().unwrap_or_default();
    let name = host_name(host);
    let ok = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(name));
    if ok {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "this server does not answer to the host name '{name}'; add it to server.allowed_hosts \
             if it is this server's own name"
        )))
    }
}

/// The name in a `Host` value, without its port and an IPv6 literal's brackets.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name)
}

/// Middleware: a request with a body must declare it JSON, and must send all of it within the
/// deadline; it is then handed on from memory.
pub async fn read_body(State(edge): State<Arc<Edge>>, req: Request, next: Next) -> Response {
    if !has_body(req.headers()) {
        return next.run(req).await;
    }
    if !is_json(req.headers()) {
        return Error::UnsupportedMediaType(
            "a request body must be JSON, sent with 'Content-Type: application/json'".into(),
        )
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, edge.max_body_bytes);
    match tokio::time::timeout(edge.body_timeout, read).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => {
            let too_large = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if too_large {
                Error::PayloadTooLarge("the request body is larger than this server accepts".into())
                    .into_response()
            } else {
                Error::invalid(format!("could not read the request body: {e}"), None)
                    .into_response()
            }
        }
        Err(_) => {
            let mut resp = Error::RequestTimeout(format!(
                "the request body did not arrive within {} s",
                edge.body_timeout.as_secs()
            ))
            .into_response();
            // The rest of the body may still come; this connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            resp
        }
    }
}

/// Whether a request declares a body: a length above zero, or a chunked one.
fn has_body(headers: &HeaderMap) -> bool {
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        Some(n) => n > 0,
        None => headers.contains_key(header::TRANSFER_ENCODING),
    }
}

/// `application/json` or any `application/*+json`, with or without parameters.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = v.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
        || essence
            .to_ascii_lowercase()
            .strip_prefix("application/")
            .is_some_and(|t| t.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn only_ip_literals_localhost_and_allowed_names_are_answered() {
        let allowed = vec!["experient.internal".to_owned()];
        for ok in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "10.0.0.5",
            "experient.internal:80",
        ] {
            assert!(
                host_allowed(&allowed, &headers(&[("host", ok)])).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
        ] {
            assert!(
                host_allowed(&allowed, &headers(&[("host", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(host_allowed(&["*".into()], &headers(&[("host", "any.name")])).is_ok());
    }

    #[test]
    fn bodies_must_be_declared_json() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/merge-patch+json",
        ] {
            assert!(is_json(&headers(&[("content-type", ok)])), "{ok}");
        }
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            assert!(!is_json(&headers(&[("content-type", bad)])), "{bad}");
        }
        assert!(!is_json(&HeaderMap::new()));
        assert!(has_body(&headers(&[("content-length", "12")])));
        assert!(!has_body(&headers(&[("content-length", "0")])));
        assert!(has_body(&headers(&[("transfer-encoding", "chunked")])));
        assert!(!has_body(&HeaderMap::new()));
    }
}
