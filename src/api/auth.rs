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
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AppState;
use crate::error::Error;

/// The inbound API keys, kept as SHA-256 digests so that comparing them takes constant time.
#[derive(Default, Clone)]
pub struct Keys {
    users: Vec<[u8; 32]>,
    admins: Vec<[u8; 32]>,
    /// User keys limited to some libraries (`[[auth.scoped_keys]]`), with those libraries.
    scoped: Vec<([u8; 32], Arc<Vec<String>>)>,
}

/// Who sent a request, as the auth middleware found it; handlers take it from the request's
/// extensions. Everything a request stores carries `owner`, and only that owner (or an admin)
/// reads, continues, deletes or gives feedback on it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// The key's SHA-256, hex, the first 16 bytes; `None` on a server with no keys, where
    /// every client is the same (admin) principal.
    pub owner: Option<String>,
    /// Admin keys (and every client of a keyless server) see and change everything.
    pub admin: bool,
    /// The libraries this key may inject, search and give feedback on; `None` is all.
    pub libraries: Option<Arc<Vec<String>>>,
}

impl Caller {
    /// The caller of a server with no keys: one principal that may do everything.
    pub fn open() -> Caller {
        Caller {
            owner: None,
            admin: true,
            libraries: None,
        }
    }

    /// Whether this caller may read or change a thing stored by `owner`.
    pub fn owns(&self, owner: Option<&str>) -> bool {
        self.admin || (self.owner.is_some() && owner == self.owner.as_deref())
    }

    /// Refuses a library outside this key's scope (403, naming where it was asked for).
    pub fn may_use(&self, library: Option<&str>) -> Result<(), Error> {
        match (library, &self.libraries) {
            (Some(l), Some(allowed)) if !allowed.iter().any(|a| a == l) => Err(Error::Forbidden(
                format!("this API key may not use the library '{l}'"),
            )),
            _ => Ok(()),
        }
    }
}

/// Requests in flight per user key (`auth.max_requests_per_key`), so that one key cannot hold
/// every generation slot: eight streams of a billion tokens each once left every other client
/// waiting. Admin keys are not limited, nor is a server without keys (one principal).
pub struct KeySlots {
    per_key: usize,
    slots: moka::sync::Cache<String, Arc<tokio::sync::Semaphore>>,
}

/// A key's hold on one of its request slots, given back when dropped (with the request, or
/// with its stream).
pub struct KeySlot {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl KeySlots {
    /// At most `per_key` requests in flight per user key.
    pub fn new(per_key: usize) -> KeySlots {
        KeySlots {
            per_key: per_key.max(1),
            slots: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(std::time::Duration::from_secs(600))
                .build(),
        }
    }

    /// A slot for `caller`'s request, or 429 when its key has all of them in flight.
    pub fn take(&self, caller: &Caller) -> Result<KeySlot, Error> {
        let Some(owner) = caller.owner.as_ref().filter(|_| !caller.admin) else {
            return Ok(KeySlot { _permit: None });
        };
        let per_key = self.per_key;
        let sem = self.slots.get_with(owner.clone(), || {
            Arc::new(tokio::sync::Semaphore::new(per_key))
        });
        sem.try_acquire_owned()
            .map(|p| KeySlot { _permit: Some(p) })
            .map_err(|_| Error::Overloaded {
                message: format!(
                    "this API key has {per_key} requests in flight, the most one key may \
                     (auth.max_requests_per_key); wait for one to finish"
                ),
                retry_after_secs: 1,
            })
    }
}

/// The owner tag a stored thing carries: the first 16 bytes of the key's digest, in hex.
fn owner_of(d: &[u8; 32]) -> String {
    hex::encode(&d[..16])
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

enum Who {
    Nobody,
    User(Option<Arc<Vec<String>>>),
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
            scoped: Vec::new(),
        }
    }

    /// Adds user keys that may use only the libraries listed with each.
    pub fn with_scoped<'a>(
        mut self,
        scoped: impl IntoIterator<Item = (&'a str, Vec<String>)>,
    ) -> Keys {
        for (key, libraries) in scoped {
            if !key.trim().is_empty() {
                self.scoped.push((digest(key.trim()), Arc::new(libraries)));
            }
        }
        self
    }

    /// Whether any key is configured (without one, the server listens only on loopback).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty() || !self.admins.is_empty() || !self.scoped.is_empty()
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
        let mut scope = None;
        for (k, libraries) in &self.scoped {
            if bool::from(k.ct_eq(&d)) {
                scope = Some(libraries.clone());
            }
        }
        if bool::from(admin) {
            Who::Admin
        } else if scope.is_some() {
            Who::User(scope)
        } else if bool::from(user) {
            Who::User(None)
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
/// and the UI's files stay public. The caller it finds travels on as a request extension.
pub async fn check(State(s): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The UI's files hold no data (it asks for the key and sends it with each API call).
    let public = matches!(path, "/health" | "/openapi.json")
        || (path == "/metrics" && s.public_metrics)
        || super::ui::is_asset(path);
    if !s.keys.enabled() || public {
        req.extensions_mut().insert(Caller::open());
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
    let Some(key) = presented else {
        return Error::Unauthorized(
            "missing API key: send it as 'Authorization: Bearer KEY'".into(),
        )
        .into_response();
    };
    let owner = Some(owner_of(&digest(key)));
    let caller = match (s.keys.identify(key), is_admin_route(req.method(), path)) {
        (Who::Nobody, _) => {
            return Error::Unauthorized("invalid API key".into()).into_response();
        }
        (Who::User(_), true) => {
            return Error::Forbidden(
                "this route needs an admin key (libraries and jobs are administered with admin keys)"
                    .into(),
            )
            .into_response();
        }
        (Who::User(libraries), false) => Caller {
            owner,
            admin: false,
            libraries,
        },
        (Who::Admin, _) => Caller {
            owner,
            admin: true,
            libraries: None,
        },
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}
