//! The integration tests, as one test binary: linking a binary against experient and mistral.rs
//! costs seconds each time the crate changes, so one binary is linked instead of nineteen, and
//! its tests share the harness's threads instead of running file by file. `tests/sandbox.rs`
//! stays a binary of its own, because it changes the process-wide sandbox worker cap.
//!
//! Each module is one area; run one with `cargo test --release --test e2e MODULE::`.

mod common;

mod attacks;
mod auth;
mod canary;
mod chat;
mod cpu_attention;
mod docker;
mod embeddings;
mod eval;
mod experience;
mod gate;
mod grammar;
mod hardening;
mod inprocess;
mod iterresearch;
mod learn;
mod lifecycle;
mod local_model;
mod minigrid;
mod plan;
mod protocol;
mod quantized_kernels;
mod replicas;
mod retrieval;
mod traffic;
mod ui;
mod upstream;
