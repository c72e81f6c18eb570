//! A fallback chain: an alias served by its own backend first and, when that fails before its
//! first token with an error worth retrying elsewhere (unreachable, timed out, overloaded,
//! 5xx), by the next model in the chain. Errors that would fail anywhere (a bad request)
//! return at once; once a backend has produced its first event the chain is committed to it.

use std::sync::Arc;

use super::{upstream::retryable, Backend, ChatRequest, EventStream};
use crate::error::{Error, Result};

/// A backend made of others, tried in order until one starts answering.
pub struct Chain {
    links: Vec<(String, Arc<dyn Backend>)>,
}

impl Chain {
    /// A chain of (alias, backend), first tried first.
    pub fn new(links: Vec<(String, Arc<dyn Backend>)>) -> Self {
        assert!(!links.is_empty(), "a chain has at least its own model");
        Chain { links }
    }
}

#[async_trait::async_trait]
impl Backend for Chain {
    fn ready(&self) -> bool {
        self.links.iter().any(|(_, b)| b.ready())
    }

    /// The first link's price: what a call costs when nothing fails over.
    fn price(&self) -> Option<crate::config::Price> {
        self.links.first().and_then(|(_, b)| b.price())
    }

    /// Only when every link does: a request may land on any of them.
    fn constrains(&self) -> bool {
        self.links.iter().all(|(_, b)| b.constrains())
    }

    /// The smallest of the links' known context lengths: a request may land on any of them.
    fn context_length(&self) -> Option<u32> {
        self.links
            .iter()
            .filter_map(|(_, b)| b.context_length())
            .min()
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        let mut last: Option<Error> = None;
        for (alias, backend) in &self.links {
            if !backend.ready() {
                continue;
            }
            match backend.stream(request.clone()).await {
                Ok(s) => {
                    if last.is_some() {
                        metrics::counter!(
                            "experient_fallbacks_total",
                            "model" => self.links[0].0.clone(),
                            "to" => alias.clone()
                        )
                        .increment(1);
                    }
                    return Ok(s);
                }
                Err(e) if retryable(&e) => {
                    tracing::warn!(model = %alias, error = %e, "model failed; trying the next in its fallback chain");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            Error::Unavailable("no model of the fallback chain is ready".into())
        }))
    }
}
