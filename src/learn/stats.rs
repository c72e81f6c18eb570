//! The statistics of comparing two library versions on the same tasks.
//!
//! Each task has a score per version (mean@k over its samples). The versions are compared task
//! by task: the paired difference (candidate minus baseline) per task, its mean with a Student's
//! t interval, and the two-sided paired t-test's p-value. Pairing removes the spread between
//! easy and hard tasks, which on a small model dominates the spread of each accuracy alone.

use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

/// One version's accuracy: the mean of its task scores and the interval at the confidence
/// asked for.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub mean: f64,
    pub ci: [f64; 2],
}

/// Two versions compared on the same `n` tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub n: usize,
    /// The confidence of every interval here (0.95 unless asked otherwise).
    pub confidence: f64,
    pub baseline: Accuracy,
    pub candidate: Accuracy,
    /// Mean of candidate minus baseline, per task.
    pub difference: f64,
    pub difference_ci: [f64; 2],
    /// Two-sided paired t-test of "no difference"; 1 when every difference is zero.
    pub p_value: f64,
    /// Indices of the tasks on which the versions scored differently.
    pub disagree: Vec<usize>,
}

/// The mean of `xs` and its two-sided interval at `confidence`, from Student's t.
pub fn mean_interval(xs: &[f64], confidence: f64) -> (f64, [f64; 2]) {
    let n = xs.len();
    if n == 0 {
        return (0.0, [0.0, 0.0]);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, [mean, mean]);
    }
    let half = t_quantile(confidence, n - 1) * standard_error(xs, mean);
    (mean, [mean - half, mean + half])
}

fn standard_error(xs: &[f64], mean: f64) -> f64 {
    let n = xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (var / n).sqrt()
}

/// The t value that leaves `(1 - confidence) / 2` in each tail, with `df` degrees of freedom.
fn t_quantile(confidence: f64, df: usize) -> f64 {
    let p = 0.5 + confidence.clamp(0.5, 0.999_999) / 2.0;
    StudentsT::new(0.0, 1.0, df as f64)
        .map(|t| t.inverse_cdf(p))
        .unwrap_or(1.96)
}

/// Compares per-task scores of two versions on the same tasks (same order, same length).
pub fn paired(baseline: &[f64], candidate: &[f64], confidence: f64) -> Paired {
    assert_eq!(baseline.len(), candidate.len(), "paired scores per task");
    let clamp = |ci: [f64; 2]| [ci[0].max(0.0), ci[1].min(1.0)];
    let (b, b_ci) = mean_interval(baseline, confidence);
    let (c, c_ci) = mean_interval(candidate, confidence);
    let diffs: Vec<f64> = candidate.iter().zip(baseline).map(|(c, b)| c - b).collect();
    let (d, d_ci) = mean_interval(&diffs, confidence);
    let disagree = diffs
        .iter()
        .enumerate()
        .filter(|(_, d)| d.abs() > 1e-12)
        .map(|(i, _)| i)
        .collect();
    Paired {
        n: diffs.len(),
        confidence,
        baseline: Accuracy {
            mean: b,
            ci: clamp(b_ci),
        },
        candidate: Accuracy {
            mean: c,
            ci: clamp(c_ci),
        },
        difference: d,
        difference_ci: d_ci,
        p_value: p_value(&diffs, d),
        disagree,
    }
}

/// The two-sided paired t-test's p-value for differences `diffs` with mean `mean`.
fn p_value(diffs: &[f64], mean: f64) -> f64 {
    if diffs.len() < 2 {
        return 1.0;
    }
    let se = standard_error(diffs, mean);
    if se == 0.0 {
        // Every difference is the same: none at all is no evidence; a constant non-zero one
        // on every task is as strong as this test can say.
        return if mean.abs() < 1e-12 { 1.0 } else { 0.0 };
    }
    let t = mean / se;
    StudentsT::new(0.0, 1.0, (diffs.len() - 1) as f64)
        .map(|dist| 2.0 * (1.0 - dist.cdf(t.abs())))
        .unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_t_interval_is_wider_than_the_normal_one_for_few_tasks() {
        let xs = [1.0, 0.0, 1.0, 0.0];
        let (m, ci) = mean_interval(&xs, 0.95);
        assert_eq!(m, 0.5);
        // t(0.975, 3) = 3.182; the standard error is sqrt(1/3 / 4).
        let half = 3.182_446 * (1.0f64 / 3.0 / 4.0).sqrt();
        assert!((ci[1] - m - half).abs() < 1e-4, "{ci:?}");
        assert_eq!(mean_interval(&[], 0.95), (0.0, [0.0, 0.0]));
        assert_eq!(mean_interval(&[0.7], 0.95), (0.7, [0.7, 0.7]));
    }

    #[test]
    fn pairing_sees_a_gain_the_accuracies_alone_hide() {
        // Tasks of very different difficulty; the candidate is a little better on most.
        let base = [0.0, 0.2, 0.4, 0.6, 0.8, 0.0, 0.2, 0.4, 0.6, 0.8];
        let cand = [0.2, 0.4, 0.6, 0.6, 1.0, 0.2, 0.4, 0.4, 0.8, 1.0];
        let p = paired(&base, &cand, 0.95);
        assert_eq!(p.n, 10);
        assert!((p.difference - 0.16).abs() < 1e-12);
        assert!(p.difference_ci[0] > 0.0, "{p:?}");
        assert!(p.p_value < 0.01, "{p:?}");
        // The accuracies' own intervals overlap.
        assert!(p.baseline.ci[1] > p.candidate.ci[0], "{p:?}");
        assert_eq!(p.disagree, vec![0, 1, 2, 4, 5, 6, 8, 9]);
    }

    #[test]
    fn no_difference_is_no_evidence() {
        let same = [1.0, 0.0, 1.0];
        let p = paired(&same, &same, 0.95);
        assert_eq!((p.difference, p.p_value), (0.0, 1.0));
        assert!(p.disagree.is_empty());
        // A worse candidate has its whole interval below zero.
        let p = paired(&[1.0; 8], &[0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 0.95);
        assert!(p.difference_ci[1] < 0.0, "{p:?}");
    }
}
