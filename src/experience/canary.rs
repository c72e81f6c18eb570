//! Live trials (canaries) and what serves a request: the live version, a pinned version, or a
//! canary's candidate.
//!
//! A canary serves a candidate (a committed version other than the live one, or the live
//! version with pending proposals applied) to a share of a library's traffic, sticky per key or
//! per conversation, and counts the feedback each arm gets. A group-sequential test decides:
//! at looks after `min_samples`, `2 * min_samples`, `4 * min_samples`, ... feedback per arm, the
//! difference of mean scores is tested at `alpha / 2^(k+1)` on look `k`, so that all looks
//! together spend at most `alpha = 1 - confidence` however long the trial runs. A lower bound
//! above zero promotes the candidate; an upper bound below zero, or the deadline, rolls it back.
//! Nothing is trusted on no evidence: a candidate that shows no gain by the deadline is not live.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use statrs::distribution::{ContinuousCDF, StudentsT};

use super::index::Index;
use super::Experience;
use crate::error::{Error, Result};

/// Which requests stay on the same arm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sticky {
    /// Every request of one key (the default; a server without keys falls back to the
    /// conversation).
    #[default]
    Key,
    /// Every turn of one conversation (its `user` field, or its first user message).
    Conversation,
}

/// The two sides of a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    /// The live version.
    Control,
    /// What is on trial.
    Candidate,
}

/// What a served answer records of the trial it took part in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanaryArm {
    pub id: String,
    pub arm: Arm,
}

/// Who a request comes from, for sticky assignment.
#[derive(Debug, Clone, Default)]
pub struct Audience {
    /// The key's owner tag.
    pub key: Option<String>,
    /// A tag of the conversation: the same on every turn of it.
    pub conversation: Option<String>,
}

/// What a trial serves on its candidate arm.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// A committed version other than the live one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Pending proposals (for example a candidate the gate held), applied to the live version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub proposals: Vec<String>,
}

/// How a trial ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    /// The candidate measured better and went live.
    Promoted,
    /// It measured worse, or showed no gain by the deadline: the live version stays.
    RolledBack,
    /// A person stopped it.
    Stopped,
    /// The live version changed under it, so its control arm no longer was what it measured.
    Superseded,
}

/// Feedback counted on one arm: enough for its mean and variance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub n: u64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Tally {
    fn add(&mut self, score: f64) {
        self.n += 1;
        self.sum += score;
        self.sum_sq += score * score;
    }

    /// The mean score (0 with no feedback).
    pub fn mean(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.sum / self.n as f64
        }
    }

    fn variance(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        ((self.sum_sq - self.sum * self.sum / n) / (n - 1.0)).max(0.0)
    }
}

/// What a caller asks for when starting a trial.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySpec {
    #[serde(default)]
    pub version: Option<u64>,
    #[serde(default)]
    pub proposals: Vec<String>,
    /// The share of traffic the candidate gets, above 0 and at most 0.5.
    pub share: f64,
    #[serde(default)]
    pub sticky: Sticky,
    /// Feedback each arm needs before the first look.
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Hours until a trial that has not decided is rolled back.
    #[serde(default = "default_hours")]
    pub hours: f64,
    #[serde(default = "default_confidence")]
    pub confidence: f64,
}

fn default_min_samples() -> u64 {
    30
}

fn default_hours() -> f64 {
    24.0 * 7.0
}

fn default_confidence() -> f64 {
    0.95
}

impl CanarySpec {
    /// Refuses a spec no trial could run with, naming the field.
    pub fn check(&self) -> Result<()> {
        match (self.version, self.proposals.is_empty()) {
            (Some(_), false) => {
                return Err(Error::invalid(
                    "give a version or proposals to try, not both",
                    "proposals",
                ))
            }
            (None, true) => {
                return Err(Error::invalid(
                    "name the candidate: a version, or the pending proposals to try",
                    "version",
                ))
            }
            _ => {}
        }
        if self.proposals.len() > 1000 {
            return Err(Error::invalid(
                "at most 1000 proposals may be tried at once",
                "proposals",
            ));
        }
        if !(self.share > 0.0 && self.share <= 0.5) {
            return Err(Error::invalid(
                "share must be above 0 and at most 0.5",
                "share",
            ));
        }
        if !(1..=1_000_000).contains(&self.min_samples) {
            return Err(Error::invalid(
                "min_samples must be from 1 to 1000000",
                "min_samples",
            ));
        }
        if !(self.hours > 0.0 && self.hours <= 24.0 * 365.0) {
            return Err(Error::invalid(
                "hours must be above 0 and at most a year (8760)",
                "hours",
            ));
        }
        if !(0.5..=0.999).contains(&self.confidence) {
            return Err(Error::invalid(
                "confidence must be from 0.5 to 0.999",
                "confidence",
            ));
        }
        Ok(())
    }
}

/// One trial, running or ended, as `canary.json` keeps it and the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Canary {
    pub id: String,
    pub candidate: Candidate,
    /// The live version when the trial started: what the control arm serves.
    pub base: u64,
    pub share: f64,
    pub sticky: Sticky,
    pub min_samples: u64,
    pub confidence: f64,
    pub started: DateTime<Utc>,
    pub deadline: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    pub control: Tally,
    pub trial: Tally,
    /// Looks taken so far, and the per-arm count of the next one.
    pub looks: u32,
    pub next_look: u64,
    pub status: Status,
    /// Why it ended, in words a curator reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<DateTime<Utc>>,
    /// The version a promotion committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_as: Option<u64>,
    /// The last look's interval for the difference (candidate minus control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<[f64; 2]>,
}

/// What a look decided.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Promote(String),
    RollBack(String),
}

impl Canary {
    /// A new trial of `spec` against the live version `base`.
    pub fn new(spec: &CanarySpec, base: u64, started_by: Option<String>) -> Canary {
        let started = Utc::now();
        let hours = chrono::Duration::milliseconds((spec.hours * 3_600_000.0) as i64);
        Canary {
            id: format!("canary_{}", uuid::Uuid::new_v4().simple()),
            candidate: Candidate {
                version: spec.version,
                proposals: spec.proposals.clone(),
            },
            base,
            share: spec.share,
            sticky: spec.sticky,
            min_samples: spec.min_samples,
            confidence: spec.confidence,
            started,
            deadline: started + hours,
            started_by,
            control: Tally::default(),
            trial: Tally::default(),
            looks: 0,
            next_look: spec.min_samples,
            status: Status::Running,
            decision: None,
            ended: None,
            promoted_as: None,
            interval: None,
        }
    }

    /// The arm a request from `who` is on: the same for every request of one key (or one
    /// conversation), from a digest of the trial's id and that tag, so no table is kept;
    /// `None` (not in the trial) when the request has neither.
    pub fn arm_for(&self, who: &Audience) -> Option<Arm> {
        use sha2::{Digest, Sha256};
        let tag = match self.sticky {
            Sticky::Key => who.key.as_ref().or(who.conversation.as_ref()),
            Sticky::Conversation => who.conversation.as_ref().or(who.key.as_ref()),
        };
        let tag = tag?;
        let d = Sha256::new()
            .chain_update(self.id.as_bytes())
            .chain_update([0])
            .chain_update(tag.as_bytes())
            .finalize();
        let x = u64::from_le_bytes(d[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
        Some(if x < self.share {
            Arm::Candidate
        } else {
            Arm::Control
        })
    }

    /// Counts one piece of feedback on `arm` and takes a look when both arms have reached
    /// the next look's count.
    pub fn observe(&mut self, arm: Arm, score: f64) -> Option<Verdict> {
        match arm {
            Arm::Control => self.control.add(score),
            Arm::Candidate => self.trial.add(score),
        }
        if self.control.n.min(self.trial.n) < self.next_look {
            return None;
        }
        let alpha = (1.0 - self.confidence) / 2f64.powi(self.looks as i32 + 1);
        self.looks += 1;
        self.next_look = self.next_look.saturating_mul(2);
        let [low, high] = welch_interval(&self.trial, &self.control, alpha);
        self.interval = Some([low, high]);
        let what = format!(
            "mean feedback {:.3} (candidate, n = {}) against {:.3} (live, n = {}); look {} at \
             {:.4} significance, difference interval [{low:+.3}, {high:+.3}]",
            self.trial.mean(),
            self.trial.n,
            self.control.mean(),
            self.control.n,
            self.looks,
            alpha,
        );
        if low > 0.0 {
            Some(Verdict::Promote(format!("promoted: {what}")))
        } else if high < 0.0 {
            Some(Verdict::RollBack(format!("rolled back: {what}")))
        } else {
            None
        }
    }

    /// A rollback once the deadline has passed without a decision.
    pub fn expired(&self, now: DateTime<Utc>) -> Option<Verdict> {
        (self.status == Status::Running && now >= self.deadline).then(|| {
            Verdict::RollBack(format!(
                "rolled back: no measured gain by the deadline ({} feedback on the candidate, {} on the live version)",
                self.trial.n, self.control.n
            ))
        })
    }

    /// Marks the trial ended.
    pub fn end(&mut self, status: Status, decision: String) {
        self.status = status;
        self.decision = Some(decision);
        self.ended = Some(Utc::now());
    }
}

/// The two-sided `1 - alpha` Welch interval for `a`'s mean minus `b`'s.
fn welch_interval(a: &Tally, b: &Tally, alpha: f64) -> [f64; 2] {
    let d = a.mean() - b.mean();
    let (va, vb) = (a.variance() / a.n as f64, b.variance() / b.n as f64);
    let se = (va + vb).sqrt();
    if se == 0.0 || !se.is_finite() {
        return [d, d];
    }
    let df_den = va * va / (a.n as f64 - 1.0).max(1.0) + vb * vb / (b.n as f64 - 1.0).max(1.0);
    let df = ((va + vb).powi(2) / df_den).max(1.0);
    let t = StudentsT::new(0.0, 1.0, df)
        .map(|s| s.inverse_cdf(1.0 - alpha / 2.0))
        .unwrap_or(f64::INFINITY);
    [d - t * se, d + t * se]
}

/// A library's trials: the one running, and the last ended ones for the record.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Trials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<Canary>,
    #[serde(default)]
    pub past: Vec<Canary>,
}

/// How many ended trials a library keeps on record.
pub const KEEP_PAST: usize = 20;

impl Trials {
    /// Ends the running trial and files it with the past ones.
    pub fn close(&mut self, status: Status, decision: String) -> Option<Canary> {
        let mut c = self.current.take()?;
        c.end(status, decision);
        self.past.insert(0, c.clone());
        self.past.truncate(KEEP_PAST);
        Some(c)
    }
}

/// A set of experiences served in place of the live version (a pinned version or a trial's
/// candidate), with its own in-memory index for top-k choice.
pub struct Snapshot {
    pub experiences: Vec<Experience>,
    index: Index,
}

impl Snapshot {
    /// Indexes `experiences` in memory.
    pub fn new(experiences: Vec<Experience>) -> Result<Snapshot> {
        let index = Index::in_memory(experiences.iter())?;
        Ok(Snapshot { experiences, index })
    }

    /// The `k` best matches for `q` (and its vector `qv`), best first, ranked as `r` says.
    /// Vectors come from the library's own, for the experiences whose text is the same in
    /// both; the others are found by their words alone.
    pub fn retrieve(
        &self,
        q: &str,
        qv: Option<&[f32]>,
        k: usize,
        r: &super::retrieve::Retrieval,
        vectors: &super::vectors::Vectors,
    ) -> Result<Vec<Experience>> {
        use super::retrieve::{rank, Candidates, Mode};
        let pool = super::library::candidate_pool(k);
        let lexical = match r.mode {
            Mode::Semantic => vec![],
            _ => self.index.search(q, None, pool)?,
        };
        let find = |id: &str| self.experiences.iter().find(|e| e.id == id);
        let vector = |id: &str| find(id).and_then(|e| vectors.get(id, &e.text));
        let dense = match qv {
            Some(qv) if r.mode.semantic() => {
                let mut d: Vec<(String, f32)> = self
                    .experiences
                    .iter()
                    .filter_map(|e| {
                        let v = vectors.get(&e.id, &e.text)?;
                        Some((e.id.clone(), super::vectors::dot(qv, &v)))
                    })
                    .collect();
                d.sort_by(|a, b| b.1.total_cmp(&a.1));
                d.truncate(pool);
                d
            }
            _ => vec![],
        };
        let c = Candidates {
            lexical,
            dense,
            query: qv,
            vector: &vector,
        };
        Ok(rank(c, r, k)
            .into_iter()
            .filter_map(|h| find(&h.id).cloned())
            .collect())
    }

    /// About how much memory it takes: its texts, with a fixed cost per experience.
    pub fn weight(&self) -> u32 {
        let bytes: usize = self
            .experiences
            .iter()
            .map(|e| 256 + 3 * e.text.len())
            .sum();
        u32::try_from(64 * 1024 + bytes).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> CanarySpec {
        CanarySpec {
            version: Some(1),
            proposals: vec![],
            share: 0.2,
            sticky: Sticky::Key,
            min_samples: 20,
            hours: 1.0,
            confidence: 0.95,
        }
    }

    #[test]
    fn assignment_is_sticky_and_near_the_share() {
        let c = Canary::new(&spec(), 0, None);
        let who = |i: usize| Audience {
            key: Some(format!("key{i}")),
            conversation: None,
        };
        let on = (0..5000)
            .filter(|i| c.arm_for(&who(*i)) == Some(Arm::Candidate))
            .count();
        assert!((800..1200).contains(&on), "{on} of 5000 on the candidate");
        for i in 0..50 {
            assert_eq!(c.arm_for(&who(i)), c.arm_for(&who(i)));
        }
        // Nobody to stick to: the live version.
        assert_eq!(c.arm_for(&Audience::default()), None);
    }

    #[test]
    fn a_clearly_worse_candidate_is_rolled_back_at_a_look_and_a_better_one_promoted() {
        let mut c = Canary::new(&spec(), 0, None);
        let mut verdict = None;
        for i in 0..200 {
            verdict = verdict
                .or(c.observe(Arm::Control, if i % 5 == 0 { 0.0 } else { 1.0 }))
                .or(c.observe(Arm::Candidate, if i % 5 == 0 { 1.0 } else { 0.0 }));
            if verdict.is_some() {
                break;
            }
        }
        assert!(
            matches!(&verdict, Some(Verdict::RollBack(r)) if r.contains("look 1")),
            "{verdict:?}"
        );
        let mut c = Canary::new(&spec(), 0, None);
        let mut verdict = None;
        for i in 0..200 {
            verdict = verdict
                .or(c.observe(Arm::Control, if i % 2 == 0 { 0.0 } else { 1.0 }))
                .or(c.observe(Arm::Candidate, if i % 10 == 0 { 0.0 } else { 1.0 }));
        }
        assert!(matches!(verdict, Some(Verdict::Promote(_))), "{verdict:?}");
    }

    #[test]
    fn noise_decides_nothing_and_the_deadline_rolls_back() {
        let mut c = Canary::new(&spec(), 0, None);
        for i in 0..400 {
            let s = if i % 2 == 0 { 0.0 } else { 1.0 };
            assert_eq!(c.observe(Arm::Control, s), None);
            assert_eq!(c.observe(Arm::Candidate, 1.0 - s), None);
        }
        assert!(c.looks >= 4);
        assert!(c.expired(Utc::now()).is_none());
        assert!(matches!(
            c.expired(c.deadline),
            Some(Verdict::RollBack(r)) if r.contains("deadline")
        ));
    }

    #[test]
    fn specs_are_checked_by_field() {
        let mut s = spec();
        s.share = 0.9;
        assert!(s.check().unwrap_err().to_string().contains("share"));
        let mut s = spec();
        s.proposals = vec!["P1".into()];
        assert!(s.check().is_err());
        let mut s = spec();
        s.version = None;
        assert!(s.check().is_err());
        assert!(spec().check().is_ok());
    }
}
