//! Training-Free GRPO: learning experience libraries from scored groups of rollouts, and
//! measuring what they do.
//!
//! So far: task sets, the verifiers that score a rollout against a known answer, and the
//! evaluation that compares accuracy with and without a library. The learning loop builds on
//! them.

pub mod dataset;
pub mod eval;
pub mod verify;
