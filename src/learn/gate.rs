//! The gate: whether a learned candidate may go live, decided from its measured gain over its
//! parent.
//!
//! A candidate (the parent library with a learning step's changes) is compared with its parent
//! on tasks the run did not learn from. It passes when the lower bound of the paired
//! difference's confidence interval is above the library's `gate.min_gain`: an improvement
//! that the tasks show, not one that noise could make. Everything else is held, with the
//! measurement attached, so a person can still look and decide. Learning is never trusted to
//! improve a library: the field's replications lost up to 22 points to memories that went in
//! unmeasured.

use serde::{Deserialize, Serialize};

use super::compare::Comparison;

/// What happened to a candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It measured better than its parent and went live.
    Promoted,
    /// It did not, or could not be measured: held as proposals, never live.
    Held,
    /// Measured, then held for a person (`promote: review`, or a run that asked for review).
    Review,
}

/// The gate's decision on one candidate, as the version, the proposals, the step's record and
/// the job carry it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub outcome: Outcome,
    /// Why, in words a curator reads.
    pub reason: String,
    /// The version the candidate was measured against.
    pub parent: u64,
    pub min_gain: f64,
    /// How the run chose the tasks it measured on, when it held them out itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// The measurement; absent when there were no tasks to measure on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comparison: Option<Comparison>,
}

impl Decision {
    /// The decision from a measurement: promoted when the gain's lower bound passes
    /// `min_gain`, unless a person is to review it anyway.
    pub fn from_comparison(
        c: Comparison,
        parent: u64,
        min_gain: f64,
        review: bool,
        split: Option<String>,
    ) -> Decision {
        let low = c.paired.difference_ci[0];
        let level = (c.paired.confidence * 100.0).round();
        let measured = format!(
            "accuracy {:.3} -> {:.3} on {} held-out tasks; difference {:+.3}, {level}% interval [{:+.3}, {:+.3}], p = {:.3}",
            c.paired.baseline.mean,
            c.paired.candidate.mean,
            c.paired.n,
            c.paired.difference,
            c.paired.difference_ci[0],
            c.paired.difference_ci[1],
            c.paired.p_value,
        );
        let passed = c.paired.n > 0 && low > min_gain;
        let (outcome, reason) = match (passed, review) {
            (_, true) => (Outcome::Review, format!("held for review; {measured}")),
            (true, false) => (
                Outcome::Promoted,
                format!("the gain's lower bound {low:+.3} is above {min_gain}: {measured}"),
            ),
            (false, false) => (
                Outcome::Held,
                format!(
                    "held: the gain's lower bound {low:+.3} is not above {min_gain}: {measured}"
                ),
            ),
        };
        Decision {
            outcome,
            reason,
            parent,
            min_gain,
            split,
            comparison: Some(c),
        }
    }

    /// A candidate that could not be measured: held, saying why.
    pub fn unmeasured(parent: u64, min_gain: f64, split: Option<String>) -> Decision {
        Decision {
            outcome: Outcome::Held,
            reason: "held: the run has no tasks it did not learn from, so its gain cannot be \
                     measured; give validation tasks (or more tasks) to let the gate decide"
                .into(),
            parent,
            min_gain,
            split,
            comparison: None,
        }
    }

    /// Whether the candidate goes live.
    pub fn promoted(&self) -> bool {
        self.outcome == Outcome::Promoted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learn::eval::Cost;
    use crate::learn::stats::paired;

    fn comparison(base: &[f64], cand: &[f64]) -> Comparison {
        Comparison {
            dataset: "d".into(),
            model: "m".into(),
            samples: 1,
            baseline_label: "version 1".into(),
            candidate_label: "candidate".into(),
            paired: paired(base, cand, 0.95),
            disagreements: vec![],
            cost: Cost::default(),
        }
    }

    #[test]
    fn a_decision_reads_back_as_it_was_written() {
        let d = Decision::from_comparison(comparison(&[0.0; 4], &[1.0; 4]), 3, 0.0, false, None);
        let back: Decision = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn only_a_gain_the_tasks_show_goes_live() {
        let better = comparison(&[0.0; 12], &[1.0; 12]);
        let d = Decision::from_comparison(better.clone(), 3, 0.0, false, None);
        assert!(d.promoted(), "{d:?}");
        // Asked for review, even a clear gain waits for a person.
        let d = Decision::from_comparison(better, 3, 0.0, true, None);
        assert_eq!(d.outcome, Outcome::Review);
        // A gain inside the noise is held.
        let noisy = comparison(
            &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0],
            &[1.0, 1.0, 0.0, 0.0, 1.0, 1.0],
        );
        let d = Decision::from_comparison(noisy, 3, 0.0, false, None);
        assert_eq!(d.outcome, Outcome::Held, "{d:?}");
        assert!(d.reason.starts_with("held"), "{}", d.reason);
        // A clear gain below the asked-for minimum is held.
        let small = comparison(&[0.0; 12], &[0.25; 12]);
        assert!(!Decision::from_comparison(small, 3, 0.3, false, None).promoted());
        assert!(!Decision::unmeasured(3, 0.0, None).promoted());
    }
}
