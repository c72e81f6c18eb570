//! What a library serves beyond its newest version: credit per experience from feedback, and
//! live trials of a candidate against the live version.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::Utc;

use super::canary::{Arm, Audience, Canary, CanaryArm, CanarySpec, Snapshot, Status, Verdict};
use super::library::{apply, pretty, Library, Votes};
use super::log::{write_atomic, Version};
use super::proposals;
use super::Experience;
use crate::error::{Error, Result};

/// Helpful and harmful votes per experience and version, from feedback on served answers.
pub(super) const CREDIT_FILE: &str = "credit.json";
/// The running live trial and the last ended ones.
pub(super) const CANARY_FILE: &str = "canary.json";

/// An experience's votes: all of them, and those since its text was last set (what retrieval
/// and the learner judge it by, so that a rewritten lesson starts clean).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Credit {
    pub helpful: u64,
    pub harmful: u64,
    /// The votes on its current text.
    pub current: Votes,
}

impl Library {
    /// Credits (`helpful`) or blames each of `ids`, as served by `version`.
    pub fn add_credit(&self, ids: &[String], version: u64, helpful: bool) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut c = self.credit.lock();
        for id in ids {
            let v = c.entry(id.clone()).or_default().entry(version).or_default();
            if helpful {
                v.helpful += 1;
            } else {
                v.harmful += 1;
            }
        }
        write_atomic(&self.dir().join(CREDIT_FILE), &pretty(&*c)?)
    }

    /// The votes on experience `id`.
    pub fn credit(&self, id: &str) -> Credit {
        let since = super::library::id_number(id)
            .and_then(|n| self.state.read().text_since.get(&n).copied())
            .unwrap_or(0);
        let c = self.credit.lock();
        let mut out = Credit::default();
        for (version, votes) in c.get(id).into_iter().flatten() {
            out.helpful += votes.helpful;
            out.harmful += votes.harmful;
            if *version >= since {
                out.current.add(*votes);
            }
        }
        out
    }

    /// The votes on experience `id`, per version that served it.
    pub fn credit_by_version(&self, id: &str) -> BTreeMap<u64, Votes> {
        self.credit.lock().get(id).cloned().unwrap_or_default()
    }

    /// Whether the library's `skip_harmful` setting keeps `e` out of prompts.
    pub fn skips(&self, e: &Experience) -> bool {
        let Some(rule) = self.settings().skip_harmful else {
            return false;
        };
        let v = self.credit(&e.id).current;
        let n = v.helpful + v.harmful;
        n >= rule.min_votes && v.harmful as f64 / n as f64 > rule.ratio
    }

    /// The running trial, as it stands (no file is read or written).
    pub fn running_canary(&self) -> Option<Canary> {
        self.trials.lock().0.current.clone()
    }

    /// The running trial and the ended ones, as the API shows them (a running trial past its
    /// deadline is settled first).
    pub fn trials(&self, keep: usize) -> super::canary::Trials {
        self.settle_expired(keep);
        self.trials.lock().0.clone()
    }

    /// The version a running trial's candidate is, when it is a committed version (a
    /// candidate made of proposals has none yet: it reports the live version it builds on).
    pub fn trials_candidate_version(&self) -> Option<u64> {
        let t = self.trials.lock();
        let c = t.0.current.as_ref()?;
        Some(c.candidate.version.unwrap_or(c.base))
    }

    /// Starts a live trial of `spec`'s candidate against the live version.
    pub fn start_canary(
        &self,
        spec: &CanarySpec,
        by: Option<String>,
        keep: usize,
    ) -> Result<Canary> {
        spec.check()?;
        self.settle_expired(keep);
        let mut t = self.trials.lock();
        if let Some(c) = &t.0.current {
            return Err(Error::Conflict(format!(
                "library '{}' is already running trial {}; stop it first",
                self.name, c.id
            )));
        }
        let base = self.version();
        if spec.version == Some(base) {
            return Err(Error::invalid(
                format!("version {base} is the live version; try another one against it"),
                "version",
            ));
        }
        let canary = Canary::new(spec, base, by);
        let snapshot = Arc::new(self.candidate(&canary)?);
        t.0.current = Some(canary.clone());
        if let Err(e) = self.save_trials(&t.0) {
            t.0.current = None;
            return Err(e);
        }
        t.1 = Some(snapshot);
        tracing::info!(library = %self.name, canary = %canary.id, share = canary.share, "live trial started");
        Ok(canary)
    }

    /// Stops the running trial; the live version stays.
    pub fn stop_canary(&self, by: Option<String>) -> Result<Canary> {
        let mut t = self.trials.lock();
        let reason = format!(
            "stopped{}; the live version stays",
            by.map(|b| format!(" by {b}")).unwrap_or_default()
        );
        let ended = t.0.close(Status::Stopped, reason).ok_or_else(|| {
            Error::not_found(
                format!("library '{}' is running no trial", self.name),
                "name",
            )
        })?;
        t.1 = None;
        self.save_trials(&t.0)?;
        Ok(ended)
    }

    /// What a request from `who` is served: the live version, or a running trial's candidate
    /// with the arm it is on.
    pub fn serving(
        &self,
        who: &Audience,
        keep: usize,
    ) -> (Option<CanaryArm>, Option<Arc<Snapshot>>) {
        self.settle_expired(keep);
        let mut t = self.trials.lock();
        let Some(c) = t.0.current.clone() else {
            return (None, None);
        };
        if c.base != self.version() {
            self.supersede(&mut t);
            return (None, None);
        }
        // A request with nothing to be sticky by (learning's own calls, a bare completion)
        // stays out of the trial: it is served the live version and counts for neither arm.
        let Some(arm) = c.arm_for(who) else {
            return (None, None);
        };
        let tag = Some(CanaryArm {
            id: c.id.clone(),
            arm,
        });
        if arm == Arm::Control {
            return (tag, None);
        }
        if t.1.is_none() {
            match self.candidate(&c) {
                Ok(s) => t.1 = Some(Arc::new(s)),
                Err(e) => {
                    tracing::warn!(library = %self.name, error = %e, "the trial's candidate cannot be built; ending it");
                    self.supersede(&mut t);
                    return (None, None);
                }
            }
        }
        (tag, t.1.clone())
    }

    /// Counts feedback on an answer a trial served, and acts on the verdict a look reaches:
    /// the candidate goes live, or the trial ends with the live version kept.
    pub fn observe(&self, tag: &CanaryArm, score: f64, keep: usize) -> Result<()> {
        let mut t = self.trials.lock();
        let Some(c) = t.0.current.as_mut().filter(|c| c.id == tag.id) else {
            return Ok(());
        };
        let verdict = c.observe(tag.arm, score);
        if c.base != self.version() {
            self.supersede(&mut t);
            return Ok(());
        }
        match verdict {
            Some(v) => self.decide(&mut t, v, keep),
            None => self.save_trials(&t.0),
        }
    }

    fn settle_expired(&self, keep: usize) {
        let mut t = self.trials.lock();
        let verdict = t.0.current.as_ref().and_then(|c| c.expired(Utc::now()));
        if let Some(v) = verdict {
            if let Err(e) = self.decide(&mut t, v, keep) {
                tracing::error!(library = %self.name, error = %e, "settling an expired trial failed");
            }
        }
    }

    fn supersede(&self, t: &mut (super::canary::Trials, Option<Arc<Snapshot>>)) {
        let reason = format!(
            "superseded: the live version changed to {} while the trial ran, so the comparison no longer holds",
            self.version()
        );
        t.0.close(Status::Superseded, reason);
        t.1 = None;
        if let Err(e) = self.save_trials(&t.0) {
            tracing::error!(library = %self.name, error = %e, "saving the trial record failed");
        }
    }

    /// Carries out a verdict: promotion commits the candidate as the next live version with
    /// the trial's figures; a rollback rejects a candidate made of proposals (a version
    /// candidate just stops being served). Either way the decision is logged and kept.
    fn decide(
        &self,
        t: &mut (super::canary::Trials, Option<Arc<Snapshot>>),
        verdict: Verdict,
        keep: usize,
    ) -> Result<()> {
        let Some(c) = t.0.current.clone() else {
            return Ok(());
        };
        let reviewer = Some(format!("live trial {}", c.id));
        let (status, reason, promoted_as) = match verdict {
            Verdict::Promote(reason) => {
                let mut record = c.clone();
                record.end(Status::Promoted, reason.clone());
                let gate = serde_json::json!({"canary": record});
                let v = match c.candidate.version {
                    Some(v) => self.commit_gated(
                        &format!("live trial {}: version {v} promoted", c.id),
                        self.rollback_changes(v)?,
                        gate,
                    )?,
                    None => self.approve_gated(
                        &c.candidate.proposals,
                        &BTreeMap::new(),
                        reviewer,
                        keep,
                        Some(gate),
                    )?,
                };
                (Status::Promoted, reason, Some(v.version))
            }
            Verdict::RollBack(reason) => {
                if c.candidate.version.is_none() {
                    self.reject(&c.candidate.proposals, reviewer, Some(reason.clone()), keep)?;
                }
                (Status::RolledBack, reason, None)
            }
        };
        tracing::info!(library = %self.name, canary = %c.id, ?status, reason = %reason, "live trial decided");
        t.0.close(status, reason);
        if let (Some(v), Some(ended)) = (promoted_as, t.0.past.first_mut()) {
            ended.promoted_as = Some(v);
        }
        t.1 = None;
        self.save_trials(&t.0)
    }

    /// The experiences a trial's candidate serves.
    fn candidate(&self, c: &Canary) -> Result<Snapshot> {
        let experiences: Vec<Experience> = match c.candidate.version {
            Some(v) => self.experiences_at(v)?.into_values().collect(),
            None => {
                let changes = self.proposal_changes(&c.candidate.proposals)?;
                let (version, ops) = self.ops(changes)?;
                let mut now = self.state.read().experiences.clone();
                let scratch = Version {
                    version,
                    at: Utc::now(),
                    message: String::new(),
                    ops,
                    review: None,
                    gate: None,
                };
                apply(&mut now, &scratch);
                now.into_values().collect()
            }
        };
        Snapshot::new(experiences)
    }

    /// The changes pending proposals `ids` would make, each checked to be pending.
    fn proposal_changes(&self, ids: &[String]) -> Result<Vec<super::Change>> {
        let p = self.proposals_lock();
        let decision = proposals::Decision {
            at: Utc::now(),
            reviewer: None,
            edited: false,
            version: None,
            reason: None,
        };
        ids.iter()
            .map(|id| {
                p.pending_one(&self.name, id)
                    .map_err(|e| rename(e, "proposals"))
                    .and_then(|one| proposals::to_change(one, None, &decision))
            })
            .collect()
    }

    fn save_trials(&self, t: &super::canary::Trials) -> Result<()> {
        write_atomic(&self.dir().join(CANARY_FILE), &pretty(t)?)
    }
}

fn rename(e: Error, param: &str) -> Error {
    match e {
        Error::NotFound { message, .. } => Error::NotFound {
            message,
            param: Some(param.into()),
        },
        Error::InvalidRequest { message, .. } => Error::InvalidRequest {
            message,
            param: Some(param.into()),
        },
        other => other,
    }
}
