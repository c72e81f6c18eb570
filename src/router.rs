//! From the model name a client sends to what runs: a method, a backend and maybe a library.
//!
//! The name is `[METHOD:]MODEL[@LIBRARY]`, so that unmodified OpenAI clients can choose all
//! three; the `experient` request object can say the same explicitly and wins over the name.

use std::sync::Arc;

use indexmap::IndexMap;
use serde::Serialize;

use crate::backend::Backend;
use crate::error::{Error, Result};

/// How a request is served: the methods in `crate::methods` each implement one of these.
/// It lives here, with [`Route`], so that resolving a name needs nothing from the methods
/// themselves (they depend on the router, never the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// The request goes to the model as it is (with a library's prior, when one is named).
    Direct,
    IterResearch,
    Plan,
}

impl Method {
    /// Every method, in the order error messages list them.
    pub const ALL: [Method; 3] = [Method::Direct, Method::IterResearch, Method::Plan];

    /// The name clients write, in the model name or `experient.method`.
    pub fn name(self) -> &'static str {
        match self {
            Method::Direct => "direct",
            Method::IterResearch => "iterresearch",
            Method::Plan => "plan",
        }
    }

    /// The method called `s`, if there is one.
    pub fn parse(s: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// What a request resolved to.
#[derive(Clone)]
pub struct Route {
    pub method: Method,
    /// The model alias as configured (not the name the client sent).
    pub model: String,
    pub backend: Arc<dyn Backend>,
    pub library: Option<String>,
}

/// The configured models by alias, in configuration order.
#[derive(Default, Clone)]
pub struct Router {
    models: IndexMap<String, Arc<dyn Backend>>,
}

/// The parts of a model name, before anything is looked up.
#[derive(Debug, PartialEq, Eq)]
pub struct ModelName<'a> {
    pub method: Option<&'a str>,
    pub model: &'a str,
    pub library: Option<&'a str>,
}

/// Splits a model name. A prefix before `:` counts as a method only if it names one, so model
/// ids that contain colons (`llama3:8b`) still work.
pub fn parse_model_name(name: &str) -> ModelName<'_> {
    let (rest, library) = match name.rsplit_once('@') {
        Some((m, l)) if !m.is_empty() => (m, Some(l)),
        _ => (name, None),
    };
    let (method, model) = match rest.split_once(':') {
        Some((m, rest)) if Method::parse(m).is_some() => (Some(m), rest),
        _ => (None, rest),
    };
    ModelName {
        method,
        model,
        library,
    }
}

impl Router {
    /// Serves `backend` under `alias`.
    pub fn add(&mut self, alias: impl Into<String>, backend: Arc<dyn Backend>) {
        self.models.insert(alias.into(), backend);
    }

    /// Every alias and its backend, for `/v1/models`.
    pub fn models(&self) -> impl Iterator<Item = (&String, &Arc<dyn Backend>)> {
        self.models.iter()
    }

    /// Whether every backend can serve (what `/health` reports).
    pub fn all_ready(&self) -> bool {
        self.models.values().all(|b| b.ready())
    }

    /// The backend of a configured alias.
    pub fn backend(&self, alias: &str) -> Option<&Arc<dyn Backend>> {
        self.models.get(alias)
    }

    /// Resolves a request's model name and its explicit method/library overrides.
    pub fn resolve(
        &self,
        name: &str,
        method: Option<&str>,
        library: Option<&str>,
    ) -> Result<Route> {
        let parsed = parse_model_name(name);
        let backend = self
            .models
            .get(parsed.model)
            .ok_or_else(|| Error::NotFound {
                message: format!(
                    "the model '{}' does not exist; available: {}",
                    parsed.model,
                    self.models.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
                param: Some("model".into()),
            })?;
        let method_name = method.or(parsed.method);
        let method = match method_name {
            None => Method::Direct,
            Some(m) => Method::parse(m).ok_or_else(|| {
                Error::invalid(
                    format!(
                        "unknown method '{m}'; known methods: {}",
                        Method::ALL.map(|m| m.name()).join(", ")
                    ),
                    if method.is_some() {
                        "experient.method"
                    } else {
                        "model"
                    },
                )
            })?,
        };
        let library = library.or(parsed.library).map(str::to_owned);
        if let Some(l) = &library {
            crate::experience::validate_library_name(l).map_err(|e| match e {
                Error::InvalidRequest { message, .. } => Error::invalid(message, "model"),
                other => other,
            })?;
        }
        Ok(Route {
            method,
            model: parsed.model.to_owned(),
            backend: backend.clone(),
            library,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_forms() {
        let p = parse_model_name;
        assert_eq!(
            p("smollm2-135m"),
            ModelName {
                method: None,
                model: "smollm2-135m",
                library: None
            }
        );
        assert_eq!(
            p("smollm2-135m@gsm8k"),
            ModelName {
                method: None,
                model: "smollm2-135m",
                library: Some("gsm8k")
            }
        );
        assert_eq!(
            p("iterresearch:smollm2-135m"),
            ModelName {
                method: Some("iterresearch"),
                model: "smollm2-135m",
                library: None
            }
        );
        assert_eq!(
            p("plan:smollm2-135m@lib"),
            ModelName {
                method: Some("plan"),
                model: "smollm2-135m",
                library: Some("lib")
            }
        );
        // A colon that does not start a known method belongs to the model id.
        assert_eq!(
            p("llama3:8b"),
            ModelName {
                method: None,
                model: "llama3:8b",
                library: None
            }
        );
    }
}
