//! experient: an OpenAI-compatible server that makes a local model better at inference time.
//!
//! See ARCHITECTURE.md for the map. The flow of a request mirrors the modules:
//! `api` -> `router` -> `methods` -> `backend`, with `experience`, `learn` and `sandbox` beside
//! them.

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod error;
pub mod experience;
pub mod learn;
pub mod methods;
pub mod planning;
pub mod prompts;
pub mod response_store;
pub mod retry;
pub mod router;
pub mod sandbox;
pub mod server;
pub mod web;

#[cfg(test)]
mod proptests;

pub use error::{Error, Result};
