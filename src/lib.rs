//! experient: an OpenAI-compatible server that makes a local model better at inference time.
//!
//! See ARCHITECTURE.md for the map. The flow of a request mirrors the modules:
//! `api` -> `router` -> `methods` -> `backend`, with `experience`, `learn` and `sandbox` beside
//! them.

pub mod api;
pub mod backend;
pub mod cli;
pub mod config;
pub mod db;
pub mod error;
pub mod experience;
pub(crate) mod learn;
pub(crate) mod methods;
pub mod planning;
pub mod prompts;
pub(crate) mod response_store;
pub(crate) mod retry;
pub mod router;
pub mod sandbox;
pub mod server;
pub(crate) mod web;

#[cfg(test)]
mod proptests;

pub use error::{Error, Result};
