//! Training-Free GRPO: learning experience libraries from scored groups of rollouts, and
//! measuring what they do.
//!
//! `grpo` is the learning loop; `ops` reads and merges the library operations the learner
//! model proposes; `verify` scores rollouts; `eval` measures accuracy with and without a
//! library, and `stats` compares two versions task by task; `jobs` runs learning in the server;
//! `plot` draws the results.

pub mod compare;
pub mod dataset;
pub mod eval;
pub mod evaluations;
pub mod evidence;
pub mod gate;
pub mod grpo;
pub mod jobs;
pub mod ops;
pub mod plot;
pub mod stats;
pub mod verify;
