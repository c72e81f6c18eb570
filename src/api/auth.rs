//! Inbound API keys. With no keys configured the server is open (and then it listens only on
//! loopback unless told otherwise, `server::check_exposure`). With keys, every route but
//! `/health` needs `Authorization: Bearer KEY` (`/metrics` too, unless `auth.public_metrics`),
//! and the admin routes (`/v1/libraries`, `/v1/jobs`) need an admin key.
//!
//! Keys are kept as SHA-256 digests and compared in constant time, so neither the comparison's
//! timing nor a key's length leaks through the check.

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::Error;

/// The inbound API keys, kept as SHA-256 digests so that comparing them takes constant time.
#[derive(Default, Clone)]
pub struct Keys {
    users: Vec<[u8; 32]>,
    admins: Vec<[u8; 32]>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

enum Who {
    Nobody,
    User,
    Admin,
}

impl Keys {
    /// The key set: `users` may call the OpenAI routes, `admins` the admin routes as well;
    /// blank keys are dropped. With none at all the server is open, so `serve` then listens
    /// only on loopback unless told otherwise.
    pub fn new<'a>(
        users: impl IntoIterator<Item = &'a str>,
        admins: impl IntoIterator<Item = &'a str>,
    ) -> Keys {
        let clean = |k: &&str| !k.trim().is_empty();
        Keys {
            users: users
                .into_iter()
                .filter(clean)
                .map(|k| digest(k.trim()))
                .collect(),
            admins: admins
                .into_iter()
                .filter(clean)
                .map(|k| digest(k.trim()))
                .collect(),
        }
    }

    /// Whether any key is configured (without one, the server listens only on loopback).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty() || !self.admins.is_empty()
    }

    fn identify(&self, presented: &str) -> Who {
        let d = digest(presented);
        // Every configured key is compared, whichever matches, so timing says nothing about
        // which (or whether) one did.
        let mut admin = subtle::Choice::from(0);
        for k in &self.admins {
            admin |= k.ct_eq(&d);
        }
        let mut user = subtle::Choice::from(0);
        for k in &self.users {
            user |= k.ct_eq(&d);
        }
        if bool::from(admin) {
            Who::Admin
        } else if bool::from(user) {
            Who::User
        } else {
            Who::Nobody
        }
    }
}

/// Libraries and jobs are administered; feedback may be given with a user key (applications
/// send it) but only read with an admin key (it holds what users asked).
fn is_admin_route(method: &axum::http::Method, path: &str) -> bool {
    ["/v1/libraries", "/v1/jobs"]
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
        || (path == "/v1/feedback" && method != axum::http::Method::POST)
}

/// Middleware: user keys for the OpenAI routes, admin keys for libraries and jobs; `/health`
/// and the UI's files stay public.
pub async fn check(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The UI's files hold no data (it asks for the key and sends it with each API call).
    let public = matches!(path, "/health" | "/openapi.json")
        || (path == "/metrics" && s.public_metrics)
        || super::ui::is_asset(path);
    if !s.keys.enabled() || public {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let who = match presented {
        None => {
            return Error::Unauthorized(
                "missing API key: send it as 'Authorization: Bearer KEY'".into(),
            )
            .into_response()
        }
        Some(k) => s.keys.identify(k),
    };
    match (who, is_admin_route(req.method(), path)) {
        (Who::Nobody, _) => Error::Unauthorized("invalid API key".into()).into_response(),
        (Who::User, true) => Error::Forbidden(
            "this route needs an admin key (libraries and jobs are administered with admin keys)"
                .into(),
        )
        .into_response(),
        _ => next.run(req).await,
    }
}
