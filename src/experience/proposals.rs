//! Changes held for a person's review: what a learning step (or an API write that asked for
//! review) wants to do to a library, kept as pending proposals instead of a new version until
//! someone approves, edits or rejects each one.
//!
//! Proposals live in `proposals.json` in the library's directory, rewritten whole and
//! atomically on every change (fsynced, like every other write). Approval is two writes: the
//! version first, naming the proposals it carries (`Version::review`), then this file. A crash
//! between the two leaves proposals marked pending whose version exists; opening the library
//! reconciles them from the log, so an approved change can never be applied twice.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::log::{write_atomic, Change, Version};
use super::{Provenance, Source};
use crate::error::{Error, Result};

/// Where a library's proposals are kept, beside its log.
pub const PROPOSALS_FILE: &str = "proposals.json";

/// Where a proposal stands in review.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Approved,
    Rejected,
}

/// The change a proposal would make, in the log's terms (an add has no id until approved).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Proposed {
    Add {
        text: String,
        #[serde(default)]
        tags: Vec<String>,
    },
    Update {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tags: Option<Vec<String>>,
    },
    Delete {
        id: String,
    },
}

/// Who or what proposed a change, and what it learned from.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// "learned" (a learning step) or "api" (a write that asked for review).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// What the change would have been committed as (e.g. "learn run R step 2/4").
    pub message: String,
    /// A learning gate's decision and measurement, when the gate held the change or measured
    /// it for review: what a reviewer sees next to the proposal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<serde_json::Value>,
}

/// A reviewer's decision on one proposal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<String>,
    /// Approved with the reviewer's own text or tags instead of the proposed ones.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub edited: bool,
    /// The version an approval committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A change waiting for (or past) review, with where it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    /// `P1`, `P2`, ...: never reused within a library.
    pub id: String,
    pub created: DateTime<Utc>,
    pub status: Status,
    pub change: Proposed,
    pub origin: Origin,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<Decision>,
}

/// A reviewer's replacement for a proposal's text or tags.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Edit {
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

impl Edit {
    fn is_empty(&self) -> bool {
        self.text.is_none() && self.tags.is_none()
    }
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub(super) struct Proposals {
    next_id: u64,
    list: Vec<Proposal>,
}

impl Proposals {
    /// Reads `proposals.json` (none yet is an empty set) and marks approved every pending
    /// proposal that a version of the log already carries.
    pub fn load(dir: &Path, versions: &[Version]) -> Result<Proposals> {
        let path = dir.join(PROPOSALS_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Proposals::default()),
            Err(e) => return Err(e.into()),
        };
        let mut p = Proposals::parse(&text)
            .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
        if p.reconcile(versions) {
            p.save(dir)?;
        }
        Ok(p)
    }

    /// Proposals as stored (`proposals.json`, or its row in the database).
    pub fn parse(text: &str) -> Result<Proposals> {
        serde_json::from_str(text).map_err(|e| Error::internal(format!("stored proposals: {e}")))
    }

    /// Their stored form.
    pub fn text(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(Error::internal)
    }

    /// Marks approved every pending proposal that one of `versions` carries (an approval whose
    /// proposals were not saved after its version was); true when any changed.
    pub fn reconcile(&mut self, versions: &[Version]) -> bool {
        let mut reconciled = false;
        for v in versions {
            let Some(r) = &v.review else { continue };
            for id in &r.proposals {
                if let Some(x) = self.list.iter_mut().find(|x| &x.id == id) {
                    if x.status == Status::Pending {
                        x.status = Status::Approved;
                        x.decision = Some(Decision {
                            at: v.at,
                            reviewer: r.reviewer.clone(),
                            edited: r.edited.contains(id),
                            version: Some(v.version),
                            reason: None,
                        });
                        reconciled = true;
                    }
                }
            }
        }
        reconciled
    }

    /// Writes the proposals atomically (a crash leaves the old file or the new one).
    pub fn save(&self, dir: &Path) -> Result<()> {
        write_atomic(&dir.join(PROPOSALS_FILE), self.text()?.as_bytes())
    }

    /// Proposals not yet decided.
    pub fn pending(&self) -> usize {
        self.list
            .iter()
            .filter(|p| p.status == Status::Pending)
            .count()
    }

    /// Every kept proposal, oldest first.
    pub fn all(&self) -> &[Proposal] {
        &self.list
    }

    /// The proposal with this id.
    pub fn get(&self, id: &str) -> Option<&Proposal> {
        self.list.iter().find(|p| p.id == id)
    }

    /// Adds proposals for `changes` (restores are never proposed: rollbacks are a person's
    /// own act) and returns them; the caller saves.
    pub fn add(&mut self, changes: Vec<Change>, origin: &Origin) -> Vec<Proposal> {
        let now = Utc::now();
        let mut made = Vec::new();
        for c in changes {
            let (change, origin) = match c {
                Change::Add {
                    text,
                    tags,
                    provenance,
                    ..
                } => (
                    Proposed::Add { text, tags },
                    Origin {
                        sources: provenance.sources,
                        ..origin.clone()
                    },
                ),
                Change::Update { id, text, tags } => {
                    (Proposed::Update { id, text, tags }, origin.clone())
                }
                Change::Delete { id } => (Proposed::Delete { id }, origin.clone()),
                Change::Restore(_) => continue,
            };
            self.next_id += 1;
            let p = Proposal {
                id: format!("P{}", self.next_id),
                created: now,
                status: Status::Pending,
                change,
                origin,
                decision: None,
            };
            made.push(p.clone());
            self.list.push(p);
        }
        made
    }

    /// The pending proposal `id`, or why it cannot be decided.
    pub fn pending_one(&self, library: &str, id: &str) -> Result<&Proposal> {
        let p = self.get(id).ok_or_else(|| {
            Error::not_found(format!("library '{library}' has no proposal '{id}'"), "id")
        })?;
        if p.status != Status::Pending {
            return Err(Error::Conflict(format!(
                "proposal '{id}' was already {}",
                if p.status == Status::Approved {
                    "approved"
                } else {
                    "rejected"
                }
            )));
        }
        Ok(p)
    }

    /// Marks proposals decided and keeps at most `keep` decided ones for the record, dropping
    /// the oldest (the versions approvals made stay in the log for good).
    pub fn decide(
        &mut self,
        ids: &[String],
        status: Status,
        decision: &Decision,
        edited: &[String],
        keep: usize,
    ) {
        for p in self.list.iter_mut().filter(|p| ids.contains(&p.id)) {
            p.status = status;
            p.decision = Some(Decision {
                edited: edited.contains(&p.id),
                ..decision.clone()
            });
        }
        let decided = self.list.len() - self.pending();
        let mut drop = decided.saturating_sub(keep);
        self.list.retain(|p| {
            if drop > 0 && p.status != Status::Pending {
                drop -= 1;
                false
            } else {
                true
            }
        });
    }
}

/// The change an approved proposal commits, with the reviewer's edit applied; an add's
/// provenance names the run it was learned in and the review that let it in.
pub(super) fn to_change(p: &Proposal, edit: Option<&Edit>, review: &Decision) -> Result<Change> {
    let edit = edit.filter(|e| !e.is_empty());
    let note = format!(
        "proposal {} approved{}{}",
        p.id,
        if edit.is_some() { " with edits" } else { "" },
        review
            .reviewer
            .as_deref()
            .map(|r| format!(" by {r}"))
            .unwrap_or_default()
    );
    Ok(match &p.change {
        Proposed::Add { text, tags } => Change::Add {
            text: edit
                .and_then(|e| e.text.clone())
                .unwrap_or_else(|| text.clone()),
            tags: edit
                .and_then(|e| e.tags.clone())
                .unwrap_or_else(|| tags.clone()),
            source: if p.origin.kind == "learned" {
                Source::Learned
            } else {
                Source::Manual
            },
            provenance: Provenance {
                run: p.origin.run.clone(),
                step: p.origin.step,
                note: Some(note),
                sources: p.origin.sources.clone(),
            },
        },
        Proposed::Update { id, text, tags } => Change::Update {
            id: id.clone(),
            text: edit.and_then(|e| e.text.clone()).or_else(|| text.clone()),
            tags: edit.and_then(|e| e.tags.clone()).or_else(|| tags.clone()),
        },
        Proposed::Delete { id } => {
            if edit.is_some() {
                return Err(Error::invalid(
                    format!("proposal {} deletes {id}; there is nothing to edit", p.id),
                    "text",
                ));
            }
            Change::Delete { id: id.clone() }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::experience::{Store, StoreOptions};

    fn store(dir: &Path, max_proposals: usize) -> Store {
        Store::open(
            dir,
            StoreOptions {
                max_proposals,
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn learned(text: &str) -> Change {
        Change::Add {
            text: text.into(),
            tags: vec!["t".into()],
            source: Source::Learned,
            provenance: Provenance {
                run: Some("r1".into()),
                step: Some(2),
                note: None,
                sources: vec!["fb_1".into()],
            },
        }
    }

    fn origin() -> Origin {
        Origin {
            kind: "learned".into(),
            run: Some("r1".into()),
            step: Some(2),
            sources: vec![],
            message: "learn run r1 step 2/2".into(),
            gate: None,
        }
    }

    #[test]
    fn proposals_wait_and_approval_commits_them_as_one_reviewed_version() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        s.create("lib").unwrap();
        let e1 = s.add("lib", "Old: an old rule.", vec![]).unwrap();
        let made = s
            .propose(
                "lib",
                vec![
                    learned("New: a learned rule."),
                    Change::Update {
                        id: e1.id.clone(),
                        text: Some("Old: a better rule.".into()),
                        tags: None,
                    },
                ],
                &origin(),
            )
            .unwrap();
        assert_eq!(made.len(), 2);
        assert_eq!(made[0].origin.sources, vec!["fb_1".to_string()]);
        let lib = s.library("lib").unwrap();
        assert_eq!(lib.len(), 1, "nothing goes live before approval");
        assert_eq!(lib.pending_proposals(), 2);

        let mut edits = BTreeMap::new();
        edits.insert(
            made[0].id.clone(),
            Edit {
                text: Some("New: an edited rule.".into()),
                tags: None,
            },
        );
        let ids: Vec<String> = made.iter().map(|p| p.id.clone()).collect();
        let v = s.approve("lib", &ids, &edits, Some("ada".into())).unwrap();
        assert_eq!(v.ops.len(), 2, "one version carries both");
        let review = v.review.clone().unwrap();
        assert_eq!(review.proposals, ids);
        assert_eq!(review.edited, vec![made[0].id.clone()]);
        assert_eq!(review.reviewer.as_deref(), Some("ada"));
        let added = lib.all().into_iter().find(|e| e.id != e1.id).unwrap();
        assert_eq!(added.text, "New: an edited rule.");
        assert_eq!(added.source, Source::Learned);
        assert_eq!(added.provenance.run.as_deref(), Some("r1"));
        assert!(added.provenance.note.as_deref().unwrap().contains("by ada"));
        assert_eq!(lib.get(&e1.id).unwrap().text, "Old: a better rule.");
        assert_eq!(lib.pending_proposals(), 0);

        // Decided once: a second decision is a conflict, an unknown id is not found.
        let again = s.approve("lib", &ids[..1], &BTreeMap::new(), None);
        assert!(matches!(again, Err(Error::Conflict(_))), "{again:?}");
        let none = s.reject("lib", &["P99".into()], None, None);
        assert!(matches!(none, Err(Error::NotFound { .. })), "{none:?}");

        // Everything survives a restart.
        drop(lib);
        drop(s);
        let s = store(dir.path(), 10);
        let p = s.library("lib").unwrap().proposals();
        assert!(p.iter().all(|p| p.status == Status::Approved));
        assert_eq!(p[0].decision.as_ref().unwrap().version, Some(v.version));
    }

    #[test]
    fn rejection_changes_nothing_and_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        s.create("lib").unwrap();
        let made = s.propose("lib", vec![learned("A: b.")], &origin()).unwrap();
        let v = s.library("lib").unwrap().version();
        let r = s
            .reject(
                "lib",
                &[made[0].id.clone()],
                Some("bo".into()),
                Some("vague".into()),
            )
            .unwrap();
        assert_eq!(r[0].status, Status::Rejected);
        assert_eq!(
            r[0].decision.as_ref().unwrap().reason.as_deref(),
            Some("vague")
        );
        let lib = s.library("lib").unwrap();
        assert_eq!((lib.version(), lib.len()), (v, 0));
    }

    #[test]
    fn pending_proposals_are_bounded_and_must_name_live_experiences() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 2);
        s.create("lib").unwrap();
        s.propose("lib", vec![learned("A: a."), learned("B: b.")], &origin())
            .unwrap();
        let over = s.propose("lib", vec![learned("C: c.")], &origin());
        assert!(matches!(over, Err(Error::Conflict(_))), "{over:?}");
        let ghost = s.propose("lib", vec![Change::Delete { id: "E9".into() }], &origin());
        assert!(matches!(ghost, Err(Error::NotFound { .. })), "{ghost:?}");
        let empty = s.propose("lib", vec![learned("  ")], &origin());
        assert!(
            matches!(empty, Err(Error::InvalidRequest { .. })),
            "{empty:?}"
        );
    }

    #[test]
    fn decided_proposals_kept_for_the_record_are_bounded_too() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 2);
        s.create("lib").unwrap();
        for i in 0..5 {
            let made = s
                .propose("lib", vec![learned(&format!("R{i}: r."))], &origin())
                .unwrap();
            s.reject("lib", &[made[0].id.clone()], None, None).unwrap();
        }
        let kept = s.library("lib").unwrap().proposals();
        let ids: Vec<&str> = kept.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["P4", "P5"], "the newest decided ones are kept");
    }

    #[test]
    fn an_approval_cut_off_before_the_proposals_file_is_reconciled_from_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        s.create("lib").unwrap();
        let made = s.propose("lib", vec![learned("A: a.")], &origin()).unwrap();
        let before = std::fs::read(dir.path().join("lib").join(PROPOSALS_FILE)).unwrap();
        let v = s
            .approve("lib", &[made[0].id.clone()], &BTreeMap::new(), None)
            .unwrap();
        drop(s);
        // As if the process died after the version was fsynced but before this file was.
        std::fs::write(dir.path().join("lib").join(PROPOSALS_FILE), before).unwrap();
        let s = store(dir.path(), 10);
        let lib = s.library("lib").unwrap();
        let p = lib.proposal(&made[0].id).unwrap();
        assert_eq!(p.status, Status::Approved);
        assert_eq!(p.decision.unwrap().version, Some(v.version));
        assert_eq!(lib.len(), 1, "applied once, not twice");
        let again = s.approve("lib", &[made[0].id.clone()], &BTreeMap::new(), None);
        assert!(matches!(again, Err(Error::Conflict(_))));
    }

    #[test]
    fn a_delete_cannot_be_edited_and_edits_must_name_approved_proposals() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 10);
        s.create("lib").unwrap();
        let e = s.add("lib", "A: a.", vec![]).unwrap();
        let made = s
            .propose("lib", vec![Change::Delete { id: e.id.clone() }], &origin())
            .unwrap();
        let mut edits = BTreeMap::new();
        edits.insert(
            made[0].id.clone(),
            Edit {
                text: Some("B: b.".into()),
                tags: None,
            },
        );
        let r = s.approve("lib", &[made[0].id.clone()], &edits, None);
        assert!(matches!(r, Err(Error::InvalidRequest { .. })), "{r:?}");
        let r = s.approve("lib", &[], &BTreeMap::new(), None);
        assert!(matches!(r, Err(Error::InvalidRequest { .. })), "{r:?}");
        let mut stray = BTreeMap::new();
        stray.insert("P7".to_string(), Edit::default());
        let r = s.approve("lib", &[made[0].id.clone()], &stray, None);
        assert!(matches!(r, Err(Error::InvalidRequest { .. })), "{r:?}");
        // Still pending after the refusals, and approvable as proposed.
        s.approve("lib", &[made[0].id.clone()], &BTreeMap::new(), None)
            .unwrap();
        assert!(s.library("lib").unwrap().is_empty());
    }
}
