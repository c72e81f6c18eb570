//! Training-Free GRPO: learning experience libraries from scored groups of rollouts, and
//! measuring what they do.
//!
//! `grpo` is the learning loop; `ops` reads and merges the library operations the learner
//! model proposes; `verify` scores rollouts; `eval` measures accuracy with and without a
//! library; `jobs` runs learning in the server; `plot` draws the results.

pub mod dataset;
pub mod eval;
pub mod evidence;
pub mod grpo;
pub mod jobs;
pub mod ops;
pub mod plot;
pub mod verify;
