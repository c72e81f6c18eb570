//! One library: its append-only log, the state replayed from it, and its index.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::backing::{Backing, DocEdit, Files, Log, Opened};
use super::canary::{Snapshot, Trials};
use super::index::Index;
use super::log::{Change, Op, Review, Version};
use super::proposals::{self, Decision, Edit, Origin, Proposal, Proposals, PROPOSALS_FILE};
use super::{Experience, Settings};
use crate::error::{Error, Result};

/// The append-only log of versions: the only truth about a library's content.
pub const LOG_FILE: &str = "log.jsonl";
/// The library's settings (injection, review), rewritten atomically.
pub const SETTINGS_FILE: &str = "library.json";
pub(super) const USAGE_FILE: &str = "usage.json";

/// Feedback on answers an experience was injected into: at or above 0.5 it helped, below it
/// harmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Votes {
    pub helpful: u64,
    pub harmful: u64,
}

impl Votes {
    pub(super) fn add(&mut self, other: Votes) {
        self.helpful += other.helpful;
        self.harmful += other.harmful;
    }
}

/// Votes per experience id, per library version that served it.
pub(super) type Credit = BTreeMap<String, BTreeMap<u64, Votes>>;

/// A version as the version list shows it: number, time, message and counts.
#[derive(Debug, Clone, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub at: DateTime<Utc>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gate: Option<serde_json::Value>,
    pub added: usize,
    pub updated: usize,
    pub deleted: usize,
}

impl From<&Version> for VersionSummary {
    fn from(v: &Version) -> Self {
        let count = |f: fn(&Op) -> bool| v.ops.iter().filter(|o| f(o)).count();
        VersionSummary {
            version: v.version,
            at: v.at,
            message: v.message.clone(),
            review: v.review.clone(),
            gate: v.gate.clone(),
            added: count(|o| matches!(o, Op::Add { .. } | Op::Restore { .. })),
            updated: count(|o| matches!(o, Op::Update { .. })),
            deleted: count(|o| matches!(o, Op::Delete { .. })),
        }
    }
}

/// One experience whose text or tags differ between two versions.
#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub id: String,
    pub before: Experience,
    pub after: Experience,
}

/// What changed between two versions: added, removed and changed experiences.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub from: u64,
    pub to: u64,
    pub added: Vec<Experience>,
    pub removed: Vec<Experience>,
    pub changed: Vec<Changed>,
}

/// Experiences keyed by the number in their id, so that listing is in creation order.
pub(super) type Experiences = BTreeMap<u64, Experience>;

pub(super) struct State {
    pub experiences: Experiences,
    pub versions: Vec<Version>,
    /// Next id number; it only grows, so ids are never reused.
    pub next_id: u64,
    /// The version that last set each experience's text: its credit counts from there.
    pub text_since: BTreeMap<u64, u64>,
}

/// Notes which experiences' texts `v` set.
fn note_texts(text_since: &mut BTreeMap<u64, u64>, v: &Version) {
    for op in &v.ops {
        let sets_text = match op {
            Op::Add { .. } | Op::Restore { .. } => true,
            Op::Update { text, .. } => text.is_some(),
            Op::Delete { .. } => false,
        };
        if let (true, Some(n)) = (sets_text, id_number(op.id())) {
            text_since.insert(n, v.version);
        }
    }
}

/// The number of an id in its one stored spelling, `E` and the number in plain decimal
/// (`E12`). Any other spelling (`E012`, `E+12`, `e12`) names no experience: parsing leniently
/// once let `E01` edit `E1` while the index, keyed by the raw string, kept the old text too.
pub fn id_number(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('E')?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    if canonical {
        digits.parse().ok()
    } else {
        None
    }
}

pub(super) fn apply(experiences: &mut Experiences, v: &Version) {
    for op in &v.ops {
        match op {
            Op::Add {
                id,
                text,
                tags,
                source,
                provenance,
            } => {
                if let Some(n) = id_number(id) {
                    experiences.insert(
                        n,
                        Experience {
                            id: id.clone(),
                            text: text.clone(),
                            tags: tags.clone(),
                            source: *source,
                            provenance: provenance.clone(),
                            created: v.at,
                            updated: v.at,
                        },
                    );
                }
            }
            Op::Update { id, text, tags } => {
                if let Some(e) = id_number(id).and_then(|n| experiences.get_mut(&n)) {
                    if let Some(t) = text {
                        e.text = t.clone();
                    }
                    if let Some(t) = tags {
                        e.tags = t.clone();
                    }
                    e.updated = v.at;
                }
            }
            Op::Delete { id } => {
                if let Some(n) = id_number(id) {
                    experiences.remove(&n);
                }
            }
            Op::Restore { experience } => {
                if let Some(n) = id_number(&experience.id) {
                    let mut e = experience.clone();
                    e.updated = v.at;
                    experiences.insert(n, e);
                }
            }
        }
    }
}

fn max_id(v: &Version) -> u64 {
    v.ops
        .iter()
        .filter_map(|o| id_number(o.id()))
        .max()
        .unwrap_or(0)
}

/// Experiences embedded per call when vectors are refreshed.
const VECTOR_BATCH: usize = 32;

/// How many candidates each side of a search of `k` contributes: enough that fusion, the
/// minimum similarity and diversity have something to choose from.
pub(super) fn candidate_pool(k: usize) -> usize {
    k.saturating_mul(4).clamp(32, 256)
}

/// One experience library: its content replayed from the log, its settings, proposals
/// and use counts. Every write appends a version to the log before memory changes.
pub struct Library {
    pub name: String,
    /// Where this replica keeps what it derives (index, vectors) and what is still its own
    /// (proposals, usage, credit, trials); with the file store, the log is here too.
    dir: PathBuf,
    /// Where the versions and settings are kept.
    log: Box<dyn Log>,
    /// Serialises writers. The log is opened for each write rather than held open, so that a
    /// thousand libraries do not hold a thousand file descriptors.
    writer: Mutex<()>,
    /// The largest `top_k` a setting may hold (`bounds.max_experiences`).
    max_top_k: usize,
    pub(super) state: RwLock<State>,
    settings: RwLock<Settings>,
    pub(super) index: Index,
    /// Sentence vectors of the experiences, made in the background by the store's refresher.
    pub(super) vectors: super::vectors::Vectors,
    /// Woken after every change, so that the refresher makes the new vectors.
    changed: std::sync::OnceLock<Arc<tokio::sync::Notify>>,
    usage: Mutex<Usage>,
    pub(super) credit: Mutex<Credit>,
    /// The live trial, with the candidate it serves (built when it starts or first serves).
    pub(super) trials: Mutex<(Trials, Option<Arc<Snapshot>>)>,
    /// Changes waiting for review. Its lock is taken before `writer` when both are held.
    proposals: Mutex<Proposals>,
}

#[derive(Default)]
struct Usage {
    counts: BTreeMap<String, u64>,
    /// Counted since the last save (what a shared store adds to its sums).
    added: BTreeMap<String, u64>,
    dirty: bool,
    last_flush: Option<std::time::Instant>,
}

impl Library {
    /// Creates a new library directory with an empty first version.
    pub fn create(dir: &Path, name: &str, max_top_k: usize) -> Result<Library> {
        let opened = Files.create(dir, name, max_top_k)?;
        // The creation was never acknowledged: if the new library cannot be opened, nothing of
        // it may stay behind, or the name would answer 404 to GET and 409 to POST.
        Library::load(dir, name, max_top_k, opened).inspect_err(|_| {
            let _ = Files.delete(dir, name);
        })
    }

    /// Opens a library directory, replaying its log.
    pub fn open(dir: &Path, name: &str, max_top_k: usize) -> Result<Library> {
        Library::load(dir, name, max_top_k, Files.open(dir, name, max_top_k)?)
    }

    /// A library from what its backing read: its state replayed from the versions, its index
    /// and what else it derives kept in `dir`.
    pub(super) fn load(
        dir: &Path,
        name: &str,
        max_top_k: usize,
        opened: Opened,
    ) -> Result<Library> {
        #[cfg(test)]
        if tests::FAIL_NEXT_OPEN.with(|f| f.replace(false)) {
            return Err(Error::internal("opening failed (test failpoint)"));
        }
        let Opened {
            versions,
            settings,
            log,
        } = opened;
        let mut experiences = Experiences::new();
        let mut next_id = 1;
        let mut text_since = BTreeMap::new();
        for v in &versions {
            apply(&mut experiences, v);
            note_texts(&mut text_since, v);
            next_id = next_id.max(max_id(v) + 1);
        }
        let proposals = match log.load_doc(PROPOSALS_FILE)? {
            Some(text) => {
                let mut p = Proposals::parse(&text)?;
                p.reconcile(&versions);
                p
            }
            None => Proposals::load(dir, &versions)?,
        };
        let usage = match log.load_uses()? {
            Some(shared) => shared,
            None => match std::fs::read(dir.join(USAGE_FILE)) {
                Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
                Err(_) => BTreeMap::new(),
            },
        };
        let version = versions.last().map(|v| v.version).unwrap_or(0);
        let index = Index::open(&dir.join(".index"), experiences.values(), version)?;
        Ok(Library {
            name: name.to_owned(),
            dir: dir.to_owned(),
            log,
            writer: Mutex::new(()),
            max_top_k,
            state: RwLock::new(State {
                experiences,
                versions,
                next_id,
                text_since,
            }),
            settings: RwLock::new(settings),
            index,
            vectors: super::vectors::Vectors::open(
                Some(dir.join(super::vectors::FILE)),
                super::vectors::DEFAULT_EXACT_UP_TO,
            ),
            changed: std::sync::OnceLock::new(),
            usage: Mutex::new(Usage {
                counts: usage,
                ..Default::default()
            }),
            proposals: Mutex::new(proposals),
            credit: Mutex::new(read_or_default(&dir.join(super::serving::CREDIT_FILE))),
            trials: Mutex::new((
                read_or_default(&dir.join(super::serving::CANARY_FILE)),
                None,
            )),
        })
    }

    /// The newest committed version (0 for a new library).
    pub fn version(&self) -> u64 {
        let s = self.state.read();
        s.versions.last().map(|v| v.version).unwrap_or(0)
    }

    /// Experiences in the newest version.
    pub fn len(&self) -> usize {
        self.state.read().experiences.len()
    }

    /// Whether the newest version holds no experience.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of the settings, so no lock is held while a caller reads them.
    pub fn settings(&self) -> Settings {
        self.settings.read().clone()
    }

    /// Stores new settings; a `top_k` over the server's bound is refused, not stored.
    pub fn set_settings(&self, s: Settings) -> Result<()> {
        s.check(self.max_top_k)?;
        let _writer = self.writer.lock();
        self.log.save_settings(&s)?;
        *self.settings.write() = s;
        Ok(())
    }

    /// Applies what other writers committed since this replica's newest version, and their
    /// settings; true when anything changed.
    pub fn catch_up(&self) -> Result<bool> {
        let _writer = self.writer.lock();
        let moved = self.catch_up_locked()?;
        let settings = self.log.newer_settings()?;
        if let Some(s) = &settings {
            *self.settings.write() = s.clone();
        }
        Ok(moved || settings.is_some())
    }

    /// [`Library::catch_up`]'s versions, with the writer lock held.
    fn catch_up_locked(&self) -> Result<bool> {
        let newer = self.log.after(self.version())?;
        for v in &newer {
            self.publish_next(v)?;
        }
        Ok(!newer.is_empty())
    }

    /// Publishes another writer's version, which must be the next one.
    fn publish_next(&self, v: &Version) -> Result<()> {
        if v.version != self.version() + 1 {
            return Err(Error::internal(format!(
                "library '{}': version {} follows {}",
                self.name,
                v.version,
                self.version()
            )));
        }
        self.publish(v);
        Ok(())
    }

    /// Which creation of the name this library is, and the settings revision it holds.
    pub(super) fn head(&self) -> (i64, u64, i64) {
        (
            self.log.generation(),
            self.version(),
            self.log.settings_rev(),
        )
    }

    /// The experience with this id in the newest version.
    pub fn get(&self, id: &str) -> Option<Experience> {
        let n = id_number(id)?;
        self.state.read().experiences.get(&n).cloned()
    }

    /// Up to `limit` experiences, in id order, optionally only those tagged `tag`.
    pub fn list(&self, tag: Option<&str>, limit: usize) -> Vec<Experience> {
        let s = self.state.read();
        s.experiences
            .values()
            .filter(|e| tag.is_none_or(|t| e.tags.iter().any(|x| x == t)))
            .take(limit)
            .cloned()
            .collect()
    }

    /// Every experience of the newest version, in id order.
    pub fn all(&self) -> Vec<Experience> {
        self.state.read().experiences.values().cloned().collect()
    }

    /// Every version, oldest first.
    pub fn versions(&self) -> Vec<VersionSummary> {
        let s = self.state.read();
        s.versions.iter().map(VersionSummary::from).collect()
    }

    /// Version `v` as it was logged, with its operations.
    pub fn version_record(&self, v: u64) -> Option<Version> {
        let s = self.state.read();
        s.versions.iter().find(|x| x.version == v).cloned()
    }

    /// The experiences as they were right after version `v`.
    pub fn state_at(&self, v: u64) -> Result<Vec<Experience>> {
        Ok(self.experiences_at(v)?.into_values().collect())
    }

    pub(super) fn experiences_at(&self, v: u64) -> Result<Experiences> {
        let s = self.state.read();
        if !s.versions.iter().any(|x| x.version == v) {
            return Err(Error::not_found(
                format!("library '{}' has no version {v}", self.name),
                "version",
            ));
        }
        let mut e = Experiences::new();
        for x in s.versions.iter().take_while(|x| x.version <= v) {
            apply(&mut e, x);
        }
        Ok(e)
    }

    /// What changed from version `from` to version `to` (either order).
    pub fn diff(&self, from: u64, to: u64) -> Result<Diff> {
        let a = self.experiences_at(from)?;
        let b = self.experiences_at(to)?;
        let added = b
            .iter()
            .filter(|(k, _)| !a.contains_key(k))
            .map(|(_, e)| e.clone())
            .collect();
        let removed = a
            .iter()
            .filter(|(k, _)| !b.contains_key(k))
            .map(|(_, e)| e.clone())
            .collect();
        let changed = a
            .iter()
            .filter_map(|(k, before)| {
                let after = b.get(k)?;
                (before.text != after.text || before.tags != after.tags).then(|| Changed {
                    id: before.id.clone(),
                    before: before.clone(),
                    after: after.clone(),
                })
            })
            .collect();
        Ok(Diff {
            from,
            to,
            added,
            removed,
            changed,
        })
    }

    /// The changes that turn the current state into the state of version `v`.
    pub fn rollback_changes(&self, v: u64) -> Result<Vec<Change>> {
        let target = self.experiences_at(v)?;
        let s = self.state.read();
        let mut changes = Vec::new();
        for (k, e) in &s.experiences {
            match target.get(k) {
                None => changes.push(Change::Delete { id: e.id.clone() }),
                Some(t) if t.text != e.text || t.tags != e.tags => changes.push(Change::Update {
                    id: e.id.clone(),
                    text: Some(t.text.clone()),
                    tags: Some(t.tags.clone()),
                }),
                Some(_) => {}
            }
        }
        for (k, t) in &target {
            if !s.experiences.contains_key(k) {
                changes.push(Change::Restore(t.clone()));
            }
        }
        Ok(changes)
    }

    /// Writes one new version made of `changes`, all or nothing, and returns it once it is on
    /// disk. Validation happens before anything is written, so a bad change leaves the
    /// library exactly as it was.
    pub fn commit(&self, message: &str, changes: Vec<Change>) -> Result<Version> {
        self.commit_reviewed(message, changes, None, None)
    }

    /// [`Library::commit`] for a version a learning gate let through, with its decision.
    pub fn commit_gated(
        &self,
        message: &str,
        changes: Vec<Change>,
        gate: serde_json::Value,
    ) -> Result<Version> {
        self.commit_reviewed(message, changes, None, Some(gate))
    }

    /// [`Library::commit`] for a version that carries reviewed proposals or a gate's decision.
    fn commit_reviewed(
        &self,
        message: &str,
        changes: Vec<Change>,
        review: Option<Review>,
        gate: Option<serde_json::Value>,
    ) -> Result<Version> {
        let writer = self.writer.lock();
        // Other replicas wait while this commit is open; it first applies what they committed
        // before it, so the version is built on the newest state (an update of what another
        // replica deleted is refused then).
        let mut commit = self.log.begin()?;
        for v in commit.after(self.version())? {
            self.publish_next(&v)?;
        }
        let (version, ops) = self.ops(changes)?;
        let record = Version {
            version,
            at: Utc::now(),
            message: message.to_owned(),
            ops,
            review,
            gate,
        };
        commit.append(&record)?;
        self.publish(&record);
        drop(writer);
        Ok(record)
    }

    /// The next version's number and its ops: ids given to additions, and every id that an
    /// update or deletion names checked to exist (and not to be deleted earlier in the same
    /// version). Called with the writer lock held, so nothing changes in between.
    pub(super) fn ops(&self, changes: Vec<Change>) -> Result<(u64, Vec<Op>)> {
        let s = self.state.read();
        let mut next_id = s.next_id;
        let mut ops = Vec::with_capacity(changes.len());
        let mut deleted = std::collections::HashSet::new();
        let missing = |id: &str| {
            Error::not_found(
                format!("library '{}' has no experience '{id}'", self.name),
                "id",
            )
        };
        for c in changes {
            let exists = |id: &str| {
                id_number(id).is_some_and(|n| s.experiences.contains_key(&n))
                    && !deleted.contains(id)
            };
            ops.push(match c {
                Change::Add {
                    text,
                    tags,
                    source,
                    provenance,
                } => {
                    let id = format!("E{next_id}");
                    next_id += 1;
                    Op::Add {
                        id,
                        text,
                        tags,
                        source,
                        provenance,
                    }
                }
                Change::Update { id, .. } | Change::Delete { id } if !exists(&id) => {
                    return Err(missing(&id));
                }
                Change::Update { id, text, tags } => Op::Update { id, text, tags },
                Change::Delete { id } => {
                    deleted.insert(id.clone());
                    Op::Delete { id }
                }
                Change::Restore(e) => Op::Restore { experience: e },
            });
        }
        let version = s.versions.last().map(|v| v.version + 1).unwrap_or(0);
        Ok((version, ops))
    }

    /// Makes a version on disk visible. The index goes first and the in-memory state second: a
    /// search that sees the new version number then also sees the new index, so the search
    /// cache (keyed by version) can never hold results older than its key.
    fn publish(&self, record: &Version) {
        let touched: Vec<Experience> = {
            let s = self.state.read();
            let mut scratch: Experiences = record
                .ops
                .iter()
                .filter_map(|o| id_number(o.id()))
                .filter_map(|n| s.experiences.get(&n).map(|e| (n, e.clone())))
                .collect();
            apply(&mut scratch, record);
            scratch.into_values().collect()
        };
        let removed: Vec<&str> = record.ops.iter().map(Op::id).collect();
        // The log is the truth; an index failure only means the index is rebuilt next time.
        if let Err(e) = self.index.apply(&removed, &touched, record.version) {
            tracing::error!(library = %self.name, error = %e, "index update failed; it will be rebuilt on restart");
        }
        let mut s = self.state.write();
        apply(&mut s.experiences, record);
        s.next_id = s.next_id.max(max_id(record) + 1);
        note_texts(&mut s.text_since, record);
        s.versions.push(record.clone());
        drop(s);
        self.vectors.forget(&removed);
        self.vectors.mark_stale();
        if let Some(n) = self.changed.get() {
            n.notify_one();
        }
    }

    /// Its vectors: how many, of which model, searched how.
    pub fn vector_status(&self) -> super::vectors::Status {
        self.vectors.status()
    }

    /// Whether an approximate index of its vectors is being built.
    pub fn vectors_building(&self) -> bool {
        self.vectors.building()
    }

    /// Wakes `n` after every change of the library (the store's vector refresher).
    pub(super) fn notify_changes(&self, n: Arc<tokio::sync::Notify>) {
        let _ = self.changed.set(n);
    }

    /// Makes the vectors of experiences that have none (or one of an older text or model)
    /// and drops those of deleted ones, a batch at a time, as background work.
    pub(super) async fn refresh_vectors(&self, embedder: &dyn super::vectors::Embed) -> Result<()> {
        let work = {
            let s = self.state.read();
            let current = s
                .experiences
                .values()
                .map(|e| (e.id.as_str(), e.text.as_str()));
            self.vectors.work(&embedder.model(), current)
        };
        if !work.gone.is_empty() {
            self.vectors.update(&work.model, &work.gone, vec![]);
        }
        for batch in work.missing.chunks(VECTOR_BATCH) {
            let texts = batch.iter().map(|(_, _, t)| t.clone()).collect();
            let made = embedder.embed(texts, true).await?;
            let rows = batch
                .iter()
                .zip(made)
                .map(|((id, hash, _), v)| (id.clone(), *hash, v))
                .collect();
            self.vectors.update(&work.model, &[], rows);
        }
        self.vectors.settle();
        self.vectors.save(false)
    }

    /// The `k` experiences that best answer `q` (and its vector `qv`, when there is one),
    /// as `r` says to rank them, optionally only those tagged `tag`.
    pub(super) fn retrieve(
        &self,
        q: &str,
        qv: Option<&[f32]>,
        tag: Option<&str>,
        k: usize,
        r: &super::retrieve::Retrieval,
    ) -> Result<Vec<super::retrieve::Ranked>> {
        use super::retrieve::{rank, Candidates, Mode};
        let pool = candidate_pool(k);
        let lexical = match r.mode {
            Mode::Semantic => vec![],
            _ => self.index.search(q, tag, pool)?,
        };
        let has_tag = |id: &str| {
            tag.is_none_or(|t| self.get(id).is_some_and(|e| e.tags.iter().any(|x| x == t)))
        };
        let dense = match qv {
            Some(v) if r.mode.semantic() => self.vectors.nearest(v, pool, &has_tag),
            _ => vec![],
        };
        let vector = |id: &str| self.get(id).and_then(|e| self.vectors.get(id, &e.text));
        let c = Candidates {
            lexical,
            dense,
            query: qv,
            vector: &vector,
        };
        Ok(rank(c, r, k))
    }

    /// Counts that experiences were injected into a request. Counts are statistics, not
    /// history: they are flushed to `usage.json` at most every few seconds, not versioned.
    pub fn record_use(&self, ids: &[String]) {
        let mut u = self.usage.lock();
        for id in ids {
            *u.counts.entry(id.clone()).or_default() += 1;
            *u.added.entry(id.clone()).or_default() += 1;
        }
        u.dirty = true;
        if u.last_flush.is_none_or(|t| t.elapsed().as_secs() >= 2) {
            self.flush_usage_locked(&mut u);
        }
    }

    /// How many served requests had this experience injected.
    pub fn uses(&self, id: &str) -> u64 {
        self.usage.lock().counts.get(id).copied().unwrap_or(0)
    }

    /// Writes the use counts to disk (they are counted in memory and saved now and then).
    pub fn flush_usage(&self) {
        let mut u = self.usage.lock();
        self.flush_usage_locked(&mut u);
    }

    fn flush_usage_locked(&self, u: &mut Usage) {
        if !u.dirty {
            return;
        }
        match self.log.save_uses(&u.counts, &u.added) {
            Ok(shared) => {
                if let Some(sums) = shared {
                    u.counts = sums;
                }
                u.added.clear();
                u.dirty = false;
                u.last_flush = Some(std::time::Instant::now());
            }
            Err(e) => {
                tracing::warn!(library = %self.name, error = %e, "use counts not saved; trying again later")
            }
        }
    }

    /// Takes the use counts other replicas added (what this one has not saved yet kept on
    /// top).
    pub(super) fn refresh_uses(&self) -> Result<()> {
        let Some(mut sums) = self.log.load_uses()? else {
            return Ok(());
        };
        let mut u = self.usage.lock();
        for (id, n) in &u.added {
            *sums.entry(id.clone()).or_default() += n;
        }
        u.counts = sums;
        Ok(())
    }

    /// The proposals, locked (taken before the writer when both are held), with what other
    /// replicas changed read first.
    pub(super) fn proposals_lock(&self) -> parking_lot::MutexGuard<'_, Proposals> {
        let mut p = self.proposals.lock();
        match self.log.load_doc(PROPOSALS_FILE) {
            Ok(Some(text)) => self.replace_proposals(&mut p, &text),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(library = %self.name, error = %e, "proposals not reread; showing this replica's")
            }
        }
        p
    }

    /// The proposals, locked for a change that no other replica makes meanwhile: the edit
    /// saves them ([`DocEdit::save`]) or, dropped, leaves them as they were.
    fn edit_proposals(
        &self,
    ) -> Result<(
        parking_lot::MutexGuard<'_, Proposals>,
        Box<dyn DocEdit + '_>,
    )> {
        let mut p = self.proposals.lock();
        let mut doc = self.log.begin_doc(PROPOSALS_FILE)?;
        if let Some(text) = doc.current()? {
            self.replace_proposals(&mut p, &text);
        }
        Ok((p, doc))
    }

    /// Takes the stored proposals over the ones held, reconciled with the versions.
    fn replace_proposals(&self, p: &mut Proposals, text: &str) {
        match Proposals::parse(text) {
            Ok(mut fresh) => {
                fresh.reconcile(&self.state.read().versions);
                *p = fresh;
            }
            Err(e) => {
                tracing::error!(library = %self.name, error = %e, "stored proposals unreadable")
            }
        }
    }

    /// The library's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every version that touched experience `id`, oldest first, with the op it applied.
    pub fn history(&self, id: &str) -> Vec<(VersionSummary, Op)> {
        let s = self.state.read();
        s.versions
            .iter()
            .flat_map(|v| {
                v.ops
                    .iter()
                    .filter(|o| o.id() == id)
                    .map(move |o| (VersionSummary::from(v), o.clone()))
            })
            .collect()
    }

    /// Every kept proposal, pending and decided, oldest first.
    pub fn proposals(&self) -> Vec<Proposal> {
        self.proposals_lock().all().to_vec()
    }

    /// The proposal with this id.
    pub fn proposal(&self, id: &str) -> Option<Proposal> {
        self.proposals_lock().get(id).cloned()
    }

    /// Proposals waiting for review.
    pub fn pending_proposals(&self) -> usize {
        self.proposals_lock().pending()
    }

    /// Holds `changes` back as pending proposals (at most `max_pending` at a time), written
    /// to disk before they are returned. Updates and deletes must name an experience that
    /// exists now; whether it still does is checked again on approval.
    pub fn propose(
        &self,
        changes: Vec<Change>,
        origin: &Origin,
        max_pending: usize,
    ) -> Result<Vec<Proposal>> {
        for c in &changes {
            if let Change::Update { id, .. } | Change::Delete { id } = c {
                if self.get(id).is_none() {
                    return Err(Error::not_found(
                        format!("library '{}' has no experience '{id}'", self.name),
                        "id",
                    ));
                }
            }
        }
        let (mut p, doc) = self.edit_proposals()?;
        if p.pending() + changes.len() > max_pending {
            return Err(Error::Conflict(format!(
                "library '{}' holds {} pending proposals and may hold at most {max_pending} \
                 (store.max_proposals); approve or reject some first",
                self.name,
                p.pending()
            )));
        }
        let before = p.clone();
        let made = p.add(changes, origin);
        if let Err(e) = p.text().and_then(|t| doc.save(&t)) {
            *p = before;
            return Err(e);
        }
        Ok(made)
    }

    /// Commits the pending proposals `ids`, with the reviewer's edits, as one version that
    /// names them, then marks them approved (keeping at most `keep` decided ones).
    pub fn approve(
        &self,
        ids: &[String],
        edits: &BTreeMap<String, Edit>,
        reviewer: Option<String>,
        keep: usize,
    ) -> Result<Version> {
        self.approve_gated(ids, edits, reviewer, keep, None)
    }

    /// [`Library::approve`] with the decision that let the proposals through (a live trial's),
    /// recorded in the version.
    pub(super) fn approve_gated(
        &self,
        ids: &[String],
        edits: &BTreeMap<String, Edit>,
        reviewer: Option<String>,
        keep: usize,
        gate: Option<serde_json::Value>,
    ) -> Result<Version> {
        if ids.is_empty() {
            return Err(Error::invalid(
                "name at least one proposal to approve",
                "ids",
            ));
        }
        if let Some(twice) = ids
            .iter()
            .enumerate()
            .find(|(i, id)| ids[..*i].contains(id))
        {
            return Err(Error::invalid(format!("{} is named twice", twice.1), "ids"));
        }
        if let Some(stray) = edits.keys().find(|k| !ids.contains(k)) {
            return Err(Error::invalid(
                format!("an edit is given for {stray}, which is not being approved"),
                "edits",
            ));
        }
        let (mut p, doc) = self.edit_proposals()?;
        let decision = Decision {
            at: Utc::now(),
            reviewer: reviewer.clone(),
            edited: false,
            version: None,
            reason: None,
        };
        let mut changes = Vec::new();
        for id in ids {
            let one = p.pending_one(&self.name, id)?;
            changes.push(proposals::to_change(one, edits.get(id), &decision)?);
        }
        let edited: Vec<String> = ids
            .iter()
            .filter(|id| {
                edits
                    .get(*id)
                    .is_some_and(|e| e.text.is_some() || e.tags.is_some())
            })
            .cloned()
            .collect();
        let message = format!(
            "approved {}{}",
            ids.join(", "),
            reviewer
                .as_deref()
                .map(|r| format!(" (reviewed by {r})"))
                .unwrap_or_default()
        );
        let review = Review {
            reviewer,
            proposals: ids.to_vec(),
            edited: edited.clone(),
        };
        let v = self.commit_reviewed(&message, changes, Some(review), gate)?;
        p.decide(
            ids,
            proposals::Status::Approved,
            &Decision {
                version: Some(v.version),
                ..decision
            },
            &edited,
            keep,
        );
        // The version is on disk and names the proposals, so a failed save is repaired by
        // the reconciliation at the next read; the approval stands.
        if let Err(e) = p.text().and_then(|t| doc.save(&t)) {
            tracing::error!(library = %self.name, error = %e, "saving proposals after an approval failed; the log will reconcile them");
        }
        Ok(v)
    }

    /// Marks the pending proposals `ids` rejected (keeping at most `keep` decided ones); the
    /// library does not change.
    pub fn reject(
        &self,
        ids: &[String],
        reviewer: Option<String>,
        reason: Option<String>,
        keep: usize,
    ) -> Result<Vec<Proposal>> {
        if ids.is_empty() {
            return Err(Error::invalid(
                "name at least one proposal to reject",
                "ids",
            ));
        }
        let (mut p, doc) = self.edit_proposals()?;
        for id in ids {
            p.pending_one(&self.name, id)?;
        }
        let before = p.clone();
        let decision = Decision {
            at: Utc::now(),
            reviewer,
            edited: false,
            version: None,
            reason,
        };
        p.decide(ids, proposals::Status::Rejected, &decision, &[], keep);
        if let Err(e) = p.text().and_then(|t| doc.save(&t)) {
            *p = before;
            return Err(e);
        }
        Ok(ids.iter().filter_map(|id| p.get(id).cloned()).collect())
    }
}

/// A JSON file's value, or the default when it is missing or unreadable (counts and trial
/// records: statistics, not history; a damaged file starts them again, with a warning).
fn read_or_default<T: Default + serde::de::DeserializeOwned>(path: &Path) -> T {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "unreadable; starting it afresh");
            T::default()
        }),
        Err(_) => T::default(),
    }
}

pub(super) fn pretty<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v).map_err(Error::internal)?;
    b.push(b'\n');
    Ok(b)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::experience::{Provenance, Query, Source, Store};

    thread_local! {
        /// Makes the next `Library::open` on this thread fail, as a real failure after the
        /// creation's rename would (thread creation, a full disk).
        pub static FAIL_NEXT_OPEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    const MAX: usize = 256;

    fn add(text: &str) -> Change {
        Change::Add {
            text: text.into(),
            tags: vec!["t".into()],
            source: Source::Manual,
            provenance: Provenance::default(),
        }
    }

    /// A library with one version of every op kind: add, update, delete, restore.
    fn every_op(dir: &Path) -> Library {
        let lib = Library::create(&dir.join("lib"), "lib", MAX).unwrap();
        lib.commit(
            "adds",
            vec![add("Kilómetros: a ñ in the text."), add("Second.")],
        )
        .unwrap();
        lib.commit(
            "edit",
            vec![Change::Update {
                id: "E1".into(),
                text: Some("Edited: ü and 日本.".into()),
                tags: Some(vec!["u".into()]),
            }],
        )
        .unwrap();
        let second = lib.get("E2").unwrap();
        lib.commit("delete", vec![Change::Delete { id: "E2".into() }])
            .unwrap();
        lib.commit("restore", vec![Change::Restore(second)])
            .unwrap();
        lib
    }

    #[test]
    fn replay_of_every_op_kind_gives_the_state_back() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let lib = every_op(dir.path());
            (lib.all(), lib.version())
        };
        let lib = Library::open(&dir.path().join("lib"), "lib", MAX).unwrap();
        assert_eq!((lib.all(), lib.version()), before);
        assert_eq!(lib.get("E1").unwrap().text, "Edited: ü and 日本.");
        assert_eq!(lib.get("E2").unwrap().text, "Second.");
        assert_eq!(lib.version(), 4);
    }

    /// A version is checked whole before anything is written: an op that names a missing id,
    /// or one deleted earlier in the same version, refuses all of it and leaves log and
    /// state as they were.
    #[test]
    fn a_bad_op_refuses_the_whole_version() {
        let dir = tempfile::tempdir().unwrap();
        let lib = every_op(dir.path());
        let log = std::fs::read(dir.path().join("lib").join(LOG_FILE)).unwrap();
        let before = (lib.all(), lib.version());
        let after_delete = vec![
            add("Would be E3."),
            Change::Delete { id: "E1".into() },
            Change::Update {
                id: "E1".into(),
                text: Some("Too late.".into()),
                tags: None,
            },
        ];
        let missing = vec![add("Would be E3."), Change::Delete { id: "E9".into() }];
        for changes in [after_delete, missing] {
            assert!(matches!(
                lib.commit("bad", changes),
                Err(Error::NotFound { .. })
            ));
            assert_eq!((lib.all(), lib.version()), before);
            let now = std::fs::read(dir.path().join("lib").join(LOG_FILE)).unwrap();
            assert_eq!(now, log);
        }
        let v = lib.commit("good", vec![add("Third.")]).unwrap();
        assert_eq!(v.ops[0].id(), "E3");
    }

    #[test]
    fn a_torn_last_line_is_cut_at_every_byte_offset() {
        let dir = tempfile::tempdir().unwrap();
        let lib_dir = dir.path().join("lib");
        let expected = {
            let lib = every_op(dir.path());
            lib.all()
        };
        let log = std::fs::read(lib_dir.join(LOG_FILE)).unwrap();
        // One more version whose text holds multi-byte characters, then cut it at every byte,
        // the offsets inside each character included.
        let extra = {
            let lib = Library::open(&lib_dir, "lib", MAX).unwrap();
            lib.commit("more", vec![add("Ünïcödé — 日本語 🙂.")])
                .unwrap();
            std::fs::read(lib_dir.join(LOG_FILE)).unwrap()[log.len()..].to_vec()
        };
        assert!(std::str::from_utf8(&extra).unwrap().contains('🙂'));
        for cut in 1..extra.len() {
            let mut torn = log.clone();
            torn.extend_from_slice(&extra[..cut]);
            std::fs::write(lib_dir.join(LOG_FILE), &torn).unwrap();
            let lib = Library::open(&lib_dir, "lib", MAX)
                .unwrap_or_else(|e| panic!("cut at {cut} of {}: {e}", extra.len()));
            assert_eq!(lib.all(), expected, "cut at {cut}");
            // Repaired on disk to the last whole version.
            assert_eq!(std::fs::read(lib_dir.join(LOG_FILE)).unwrap(), log);
        }
    }

    #[test]
    fn damage_before_the_last_line_refuses_the_library_and_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let lib_dir = dir.path().join("lib");
        drop(every_op(dir.path()));
        let log = std::fs::read(lib_dir.join(LOG_FILE)).unwrap();
        let mut damaged = log.clone();
        let second_line = log.iter().position(|&b| b == b'\n').unwrap() + 1;
        damaged[second_line + 3] = 0xff;
        std::fs::write(lib_dir.join(LOG_FILE), &damaged).unwrap();
        let err = Library::open(&lib_dir, "lib", MAX)
            .err()
            .expect("damage must refuse");
        assert!(err.to_string().contains("line 2 is damaged"), "{err}");
        assert_eq!(std::fs::read(lib_dir.join(LOG_FILE)).unwrap(), damaged);
    }

    #[test]
    fn a_damaged_library_is_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path(), Default::default()).unwrap();
            store.create("good").unwrap();
            store.create("bad").unwrap();
            store.add("bad", "One.", vec![]).unwrap();
            store.add("bad", "Two.", vec![]).unwrap();
        }
        let log = dir.path().join("bad").join(LOG_FILE);
        let mut bytes = std::fs::read(&log).unwrap();
        bytes[5] = b'#';
        std::fs::write(&log, &bytes).unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        assert!(matches!(store.library("bad"), Err(Error::Unavailable(_))));
        assert!(store.damaged().contains_key("bad"));
        assert!(matches!(store.create("bad"), Err(Error::Conflict(_))));
        store.add("good", "Still works.", vec![]).unwrap();
        assert_eq!(
            std::fs::read(&log).unwrap(),
            bytes,
            "the damaged log is left as it was"
        );
    }

    #[test]
    fn only_the_stored_spelling_of_an_id_names_it() {
        for (id, n) in [("E1", Some(1)), ("E0", Some(0)), ("E12", Some(12))] {
            assert_eq!(id_number(id), n, "{id}");
        }
        for id in ["E01", "E+2", "e1", "E", "E-1", "E 1", "E1 ", "1", "E١"] {
            assert_eq!(id_number(id), None, "{id}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        store.create("l").unwrap();
        store.add("l", "First text.", vec![]).unwrap();
        store.add("l", "Second text.", vec![]).unwrap();
        assert!(matches!(
            store.edit("l", "E01", Some("Changed.".into()), None),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            store.remove("l", "E+2"),
            Err(Error::NotFound { .. })
        ));
        let hits = store.search("l", &Query::text("first", 10)).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].experience.text, "First text.");
        assert_eq!(store.library("l").unwrap().len(), 2);
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        FAIL_NEXT_OPEN.with(|f| f.set(true));
        assert!(store.create("x").is_err());
        assert!(!dir.path().join("x").exists());
        assert!(matches!(store.library("x"), Err(Error::NotFound { .. })));
        store.create("x").unwrap();
    }

    #[test]
    fn top_k_over_the_bound_is_refused_when_written_and_clamped_when_read() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::create(&dir.path().join("l"), "l", 16).unwrap();
        let huge = Settings {
            top_k: 100_000_000_000_000,
            ..Settings::default()
        };
        assert!(matches!(
            lib.set_settings(huge.clone()),
            Err(Error::InvalidRequest { .. })
        ));
        std::fs::write(
            dir.path().join("l").join(SETTINGS_FILE),
            serde_json::to_vec(&huge).unwrap(),
        )
        .unwrap();
        let lib = Library::open(&dir.path().join("l"), "l", 16).unwrap();
        assert_eq!(lib.settings().top_k, 16);
    }

    fn threads() -> usize {
        std::fs::read_dir("/proc/self/task").unwrap().count()
    }

    #[test]
    fn a_thousand_libraries_hold_no_threads_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Default::default()).unwrap();
        let before = threads();
        for i in 0..1000 {
            let name = format!("lib{i}");
            store.create(&name).unwrap();
            if i % 10 == 0 {
                store.add(&name, "Some lesson to index.", vec![]).unwrap();
            }
        }
        // Other tests run beside this one and start threads of their own; a thousand open
        // index writers would have added about six thousand.
        let grown = threads().saturating_sub(before);
        assert!(grown < 64, "{grown} threads more after 1000 libraries");
        assert_eq!(
            store
                .search("lib990", &Query::text("lesson", 5))
                .unwrap()
                .len(),
            1
        );
        drop(store);
        let store = Store::open(dir.path(), Default::default()).unwrap();
        assert_eq!(store.names().len(), 1000);
        assert!(threads().saturating_sub(before) < 64);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Whatever bytes a log holds, replay says which line is damaged or what it holds; it
        /// never panics.
        #[test]
        fn replay_of_any_bytes_is_an_answer(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = super::super::backing::replay(&bytes);
        }

        /// A sound log cut anywhere replays to the versions wholly before the cut.
        #[test]
        fn a_log_cut_anywhere_replays_to_a_prefix(texts in proptest::collection::vec("\\PC{1,30}", 1..6), cut in 0usize..4096) {
            let mut log = Vec::new();
            let mut ends = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                let v = Version {
                    version: i as u64,
                    at: Utc::now(),
                    message: t.clone(),
                    ops: vec![Op::Add { id: format!("E{}", i + 1), text: t.clone(), tags: vec![], source: Source::Manual, provenance: Provenance::default() }],
                    review: None,
                    gate: None,
                };
                log.extend_from_slice(serde_json::to_string(&v).unwrap().as_bytes());
                log.push(b'\n');
                ends.push(log.len());
            }
            let cut = cut % (log.len() + 1);
            let r = super::super::backing::replay(&log[..cut]).expect("a cut log is torn, not damaged");
            let whole = ends.iter().filter(|&&e| e <= cut).count();
            proptest::prop_assert_eq!(r.versions.len(), whole);
            proptest::prop_assert_eq!(r.good_len, if whole == 0 { 0 } else { ends[whole - 1] });
        }
    }
}
