//! Methods: what happens between a validated request and the backend.
//!
//! A method receives a [`Route`] and a [`ChatRequest`] and returns events; it may call the
//! backend several times, rewrite prompts or consult the experience store, but it never knows
//! which backend it talks to, and it never sees HTTP.

pub mod direct;
pub mod prior;

use std::sync::Arc;

use serde::Serialize;

use crate::backend::{ChatRequest, EventStream};
use crate::error::{Error, Result};
use crate::experience::Store;
use crate::prompts::Prompts;
use crate::router::Route;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The request goes to the model as it is (with a library's prior, when one is named).
    Direct,
    IterResearch,
    Plan,
}

impl Method {
    pub const ALL: [Method; 3] = [Method::Direct, Method::IterResearch, Method::Plan];

    pub fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::IterResearch => "iterresearch",
            Method::Plan => "plan",
        }
    }

    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// What every method may use besides its backend.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<Store>,
    pub prompts: Arc<Prompts>,
}

/// How many experiences a request asks for, overriding the library's setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    All,
    TopK(usize),
}

/// What a method applied, reported to the client in the `experient` response object.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub method: Method,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiences: Option<Vec<String>>,
}

pub struct Output {
    pub events: EventStream,
    pub applied: Applied,
}

pub async fn run(
    ctx: &Context,
    route: Route,
    request: ChatRequest,
    selection: Option<Selection>,
) -> Result<Output> {
    match route.method {
        Method::Direct => direct::run(ctx, route, request, selection).await,
        m @ (Method::IterResearch | Method::Plan) => Err(Error::invalid(
            format!(
                "the method '{}' is not available in this build yet",
                m.name()
            ),
            "model",
        )),
    }
}
