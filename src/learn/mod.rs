//! Training-Free GRPO: learning experience libraries from scored groups of rollouts.
//!
//! So far this holds the verifiers that score a rollout against a known answer; the learning
//! loop builds on them.

pub mod verify;
