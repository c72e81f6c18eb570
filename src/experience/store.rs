//! The experience directory: its libraries, the process lock, and the search cache.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use serde::Serialize;

use super::backing::{Backing, Files, Postgres};
use super::canary::{Audience, CanaryArm, Snapshot};
use super::library::Library;
use super::log::Change;
use super::proposals::{Edit, Origin, Proposal};
use super::retrieve::{Mode, Ranked, Retrieval, RetrievalOverride};
use super::vectors::Embed;
use super::{
    validate_library_name, validate_tags, validate_text, Experience, Inject, Provenance, Source,
};
use crate::error::{Error, Result};

/// Bounds and cache sizes of a store, from the configuration.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Longest experience text accepted, in characters.
    pub max_text_chars: usize,
    /// Bytes of search results kept in the cache (keys and ids weighed, `bounds.search_cache_bytes`).
    pub cache_bytes: u64,
    /// The largest `top_k` a library may be set to (`bounds.max_experiences`).
    pub max_top_k: usize,
    /// Bytes of pinned versions' experiences and indexes kept in memory
    /// (`bounds.snapshot_cache_bytes`).
    pub snapshot_bytes: u64,
    /// Most pending proposals a library holds, and most decided ones it keeps for the record
    /// (`bounds.max_proposals`).
    pub max_proposals: usize,
    /// Experiences up to which a library's vectors are searched exactly; an HNSW graph
    /// answers past it (`store.exact_search_up_to`).
    pub exact_search_up_to: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_text_chars: 2000,
            cache_bytes: crate::config::Bounds::default().search_cache_bytes,
            max_top_k: crate::config::Bounds::default().max_experiences,
            snapshot_bytes: crate::config::Bounds::default().snapshot_cache_bytes,
            max_proposals: crate::config::Bounds::default().max_proposals,
            exact_search_up_to: super::vectors::DEFAULT_EXACT_UP_TO,
        }
    }
}

/// What served a request's experiences: the version, and the trial arm when a live trial
/// chose it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Served {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanaryArm>,
}

/// What feedback on a served answer is credited to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attribution {
    pub experiences: Vec<String>,
    pub version: u64,
    pub canary: Option<CanaryArm>,
}

/// One search result: the experience and the evidence it was ranked by.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    #[serde(flatten)]
    pub experience: Experience,
    /// What it was ranked by: BM25 (lexical), cosine similarity (semantic) or the similarity
    /// plus the weighted relative BM25 score (hybrid); absent when listing without a query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// Its BM25 score, when the words matched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lexical: Option<f32>,
    /// Its cosine similarity to the query, when both have vectors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub similarity: Option<f32>,
}

impl SearchHit {
    fn listed(experience: Experience) -> SearchHit {
        SearchHit {
            experience,
            score: None,
            lexical: None,
            similarity: None,
        }
    }
}

/// A ranked search of one library.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub text: &'a str,
    /// The text's vector, when the embedding model made one.
    pub vector: Option<&'a [f32]>,
    pub tag: Option<&'a str>,
    pub limit: usize,
    /// The request's overrides of the library's retrieval settings.
    pub retrieval: RetrievalOverride,
}

impl<'a> Query<'a> {
    /// A search for `text` by the library's own settings.
    pub fn text(text: &'a str, limit: usize) -> Query<'a> {
        Query {
            text,
            vector: None,
            tag: None,
            limit,
            retrieval: RetrievalOverride::default(),
        }
    }
}

/// What a request asks of its library's prior.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select {
    /// The library's `inject` setting.
    Library,
    All,
    TopK(usize),
}

impl Select {
    /// How many experiences a library of `size` (with `settings`) is searched for, or `None`
    /// when it is injected whole.
    pub fn top(self, settings: &super::Settings, size: usize) -> Option<usize> {
        match (self, settings.inject) {
            (Select::All, _) | (Select::Library, Inject::All) => None,
            (Select::TopK(k), _) => Some(k),
            (Select::Library, Inject::TopK) => Some(settings.top_k),
            (Select::Library, Inject::Auto) if size <= settings.retrieval.whole_up_to => None,
            (Select::Library, Inject::Auto) => Some(settings.top_k),
        }
    }
}

/// The experiences a request gets, in the order they go into its prompt: the stable part
/// first (pinned, or the whole library), then the ones retrieved for this request.
#[derive(Debug, Clone, Default)]
pub struct Chosen {
    pub experiences: Vec<Experience>,
    /// How many of `experiences` are the stable part.
    pub stable: usize,
    /// How the per-request part was retrieved, when there is one.
    pub retrieval: Option<Mode>,
    /// Experiences left out to keep the prior within its share of the context window.
    pub over_budget: usize,
    pub served: Served,
}

/// A search's cache key: the SHA-256 of (library, version, query, tag, limit). A digest, not
/// the text, so that an entry weighs the same whatever the query's length; 240 distinct
/// 3.8 MB messages once grew the process by 1.2 GiB when the cache kept whole queries.
type CacheKey = [u8; 32];

/// Queries longer than this (in bytes) are searched but not cached: a long query is a whole
/// pasted message, seldom asked twice.
const MAX_CACHED_QUERY_BYTES: usize = 1024;

/// The digest of everything a search's result depends on: the library's version and its
/// vectors' generation (vectors are made after the write that needs them), the query and
/// whether it had a vector, the tag, the limit and the retrieval settings.
fn cache_key(library: &Library, q: &Query<'_>, r: &Retrieval) -> CacheKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        library.name.as_bytes(),
        q.text.as_bytes(),
        q.tag.unwrap_or("").as_bytes(),
        r.mode.as_str().as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for n in [
        library.version(),
        library.vectors.generation(),
        q.limit as u64,
        u64::from(q.tag.is_some()),
        u64::from(q.vector.is_some()),
        r.min_score.to_bits(),
        r.diversity.to_bits(),
        r.lexical_weight.to_bits(),
    ] {
        h.update(n.to_le_bytes());
    }
    h.finalize().into()
}

/// What one cached result weighs, in bytes (moka's weigher is u32).
fn weigh(_key: &CacheKey, hits: &Arc<Vec<Ranked>>) -> u32 {
    let bytes = 64 + hits.iter().map(|r| r.id.len() + 48).sum::<usize>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Every library under one directory, loaded when the store opens, with the search cache.
/// One process holds a directory at a time (a lock file), so two writers never interleave.
pub struct Store {
    pub(super) dir: PathBuf,
    pub(super) options: StoreOptions,
    /// Where the libraries' versions and settings are kept: files, or rows every replica
    /// shares.
    pub(super) backing: Arc<dyn Backing>,
    pub(super) libraries: RwLock<BTreeMap<String, Arc<Library>>>,
    /// Held while a library is brought up to date from other replicas, so that two
    /// notifications never open one library (and its index) twice.
    pub(super) following: parking_lot::Mutex<()>,
    /// Libraries that could not be opened (a log damaged mid-file), with the reason. They are
    /// refused alone, with 503, so that one bad library never keeps the others from serving;
    /// their files are left exactly as they are for a person to repair.
    damaged: BTreeMap<String, String>,
    /// Search results by the digest of (library, version, query, tag, limit), bounded by bytes.
    /// The version in the key is what invalidates: after a write, no later search can hit an
    /// entry made before it.
    cache: moka::sync::Cache<CacheKey, Arc<Vec<Ranked>>>,
    /// Past versions that requests pinned, built in memory, by (library, version); bounded
    /// by bytes.
    snapshots: moka::sync::Cache<(String, u64), Arc<Snapshot>>,
    /// The embedding model, once it is loaded; until then retrieval is lexical.
    embedder: std::sync::OnceLock<Arc<dyn Embed>>,
    /// Woken by every library change, for the vector refresher.
    pub(super) changed: Arc<tokio::sync::Notify>,
    _lock: File,
}

/// Takes the directory's lock file: one process per directory.
pub fn lock_dir(dir: &Path) -> Result<File> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::internal(format!(
            "cannot create experience directory {}: {e}",
            dir.display()
        ))
    })?;
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Unavailable(format!(
            "the experience directory {} is in use by another experient process; \
             stop it or go through its HTTP API (/v1/libraries)",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

/// Wires a library opened or created by the store to its vector refresher.
pub(super) fn adopt(lib: &Library, options: &StoreOptions, changed: &Arc<tokio::sync::Notify>) {
    lib.vectors.set_exact_up_to(options.exact_search_up_to);
    lib.notify_changes(changed.clone());
}

/// The mode a search really ran: hybrid and semantic fall back to words without a vector.
fn effective_mode(mode: Mode, vector: bool) -> Mode {
    if vector {
        mode
    } else {
        Mode::Lexical
    }
}

/// A rough count of an experience's tokens in the prior: a token is taken as 3 bytes (which
/// over-counts English for the usual tokenizers, so the cap errs small), plus the line's id.
fn estimated_tokens(e: &Experience) -> usize {
    e.text.len().div_ceil(3) + 4
}

/// Keeps the longest front of `chosen` within `budget` estimated tokens; returns how many
/// were left out.
fn keep_within(chosen: &mut Vec<Experience>, budget: usize) -> usize {
    let mut used = 0;
    let fits = chosen
        .iter()
        .take_while(|e| {
            used += estimated_tokens(e);
            used <= budget
        })
        .count();
    let cut = chosen.len() - fits;
    chosen.truncate(fits);
    cut
}

impl Store {
    /// Opens (creating if needed) an experience directory and every library in it. A second
    /// process on the same directory is refused: two writers appending to one log would
    /// interleave versions.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store> {
        Store::open_with(dir, options, Arc::new(Files))
    }

    /// Opens the libraries kept in PostgreSQL, which other replicas share; `dir` is this
    /// replica's own, for what it derives from them (indexes, vectors).
    pub fn open_shared(dir: &Path, options: StoreOptions, db: crate::db::Db) -> Result<Store> {
        Store::open_with(dir, options, Arc::new(Postgres::new(db)))
    }

    fn open_with(dir: &Path, options: StoreOptions, backing: Arc<dyn Backing>) -> Result<Store> {
        let lock = lock_dir(dir)?;
        let mut libraries = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        let changed = Arc::new(tokio::sync::Notify::new());
        for name in backing.names(dir)? {
            let opened = backing.open(&dir.join(&name), &name, options.max_top_k);
            match opened.and_then(|o| Library::load(&dir.join(&name), &name, options.max_top_k, o))
            {
                Ok(lib) => {
                    adopt(&lib, &options, &changed);
                    libraries.insert(name, Arc::new(lib));
                }
                Err(e) => {
                    tracing::error!(library = %name, error = %e, "library refused: it cannot be loaded");
                    eprintln!("experient: library '{name}' is refused until repaired: {e}");
                    damaged.insert(name, e.to_string());
                }
            }
        }
        let cache = moka::sync::Cache::builder()
            .max_capacity(options.cache_bytes)
            .weigher(weigh)
            .build();
        let snapshots = moka::sync::Cache::builder()
            .max_capacity(options.snapshot_bytes)
            .weigher(|_: &(String, u64), s: &Arc<Snapshot>| s.weight())
            .build();
        Ok(Store {
            dir: dir.to_owned(),
            snapshots,
            options,
            backing,
            libraries: RwLock::new(libraries),
            following: parking_lot::Mutex::new(()),
            damaged,
            cache,
            embedder: std::sync::OnceLock::new(),
            changed,
            _lock: lock,
        })
    }

    /// The experience directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bounds the store was opened with.
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Names of the libraries on disk, sorted.
    pub fn names(&self) -> Vec<String> {
        self.libraries.read().keys().cloned().collect()
    }

    /// The libraries that could not be loaded, with the reason each was refused.
    pub fn damaged(&self) -> &BTreeMap<String, String> {
        &self.damaged
    }

    /// The library `name`; 404 if it does not exist.
    pub fn library(&self, name: &str) -> Result<Arc<Library>> {
        validate_library_name(name)?;
        if let Some(reason) = self.damaged.get(name) {
            return Err(Error::Unavailable(format!(
                "library '{name}' is damaged and refused until it is repaired by hand and the \
                 server restarted: {reason}"
            )));
        }
        if let Some(lib) = self.libraries.read().get(name) {
            return Ok(lib.clone());
        }
        // Another replica may have created it a moment ago.
        if self.shared() {
            self.sync(name)?;
        }
        self.libraries
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("no library named '{name}'"), "library"))
    }

    /// Creates an empty library; 409 if it exists.
    pub fn create(&self, name: &str) -> Result<Arc<Library>> {
        validate_library_name(name)?;
        let mut libs = self.libraries.write();
        if libs.contains_key(name) || self.damaged.contains_key(name) {
            return Err(Error::Conflict(format!("library '{name}' already exists")));
        }
        let dir = self.dir.join(name);
        let max = self.options.max_top_k;
        let opened = self.backing.create(&dir, name, max)?;
        // The creation was never acknowledged: if the new library cannot be opened, nothing of
        // it may stay behind, or the name would answer 404 to GET and 409 to POST.
        let lib = Library::load(&dir, name, max, opened)
            .inspect_err(|_| {
                let _ = self.backing.delete(&dir, name);
            })
            .map(Arc::new)?;
        adopt(&lib, &self.options, &self.changed);
        libs.insert(name.to_owned(), lib.clone());
        Ok(lib)
    }

    /// Deletes a library, everywhere it is kept.
    pub fn delete(&self, name: &str) -> Result<()> {
        let lib = self.library(name)?;
        let mut libs = self.libraries.write();
        self.backing.delete(lib.dir(), name)?;
        libs.remove(name);
        Ok(())
    }

    fn check(&self, text: Option<&str>, tags: Option<&[String]>) -> Result<()> {
        if let Some(t) = text {
            validate_text(t, self.options.max_text_chars)?;
        }
        if let Some(t) = tags {
            validate_tags(t)?;
        }
        Ok(())
    }

    /// Adds one experience as a new version, and indexes it.
    pub fn add(&self, library: &str, text: &str, tags: Vec<String>) -> Result<Experience> {
        let lib = self.library(library)?;
        let v = lib.commit("added by hand", vec![self.add_change(text, tags)?])?;
        let id = v.ops[0].id().to_owned();
        lib.get(&id)
            .ok_or_else(|| Error::internal("added experience vanished"))
    }

    /// A person's new experience, checked, as a change to commit or propose.
    pub fn add_change(&self, text: &str, tags: Vec<String>) -> Result<Change> {
        self.check(Some(text), Some(&tags))?;
        Ok(Change::Add {
            text: text.trim().to_owned(),
            tags,
            source: Source::Manual,
            provenance: Provenance {
                note: Some("added by hand".into()),
                ..Default::default()
            },
        })
    }

    /// Changes an experience's text or tags as a new version.
    pub fn edit(
        &self,
        library: &str,
        id: &str,
        text: Option<String>,
        tags: Option<Vec<String>>,
    ) -> Result<Experience> {
        let change = self.edit_change(id, text, tags)?;
        let lib = self.library(library)?;
        lib.commit(&format!("edited {id}"), vec![change])?;
        lib.get(id)
            .ok_or_else(|| Error::internal("edited experience vanished"))
    }

    /// A person's edit, checked, as a change to commit or propose.
    pub fn edit_change(
        &self,
        id: &str,
        text: Option<String>,
        tags: Option<Vec<String>>,
    ) -> Result<Change> {
        self.check(text.as_deref(), tags.as_deref())?;
        if text.is_none() && tags.is_none() {
            return Err(Error::invalid("give text or tags to change", None));
        }
        Ok(Change::Update {
            id: id.to_owned(),
            text: text.map(|t| t.trim().to_owned()),
            tags,
        })
    }

    /// Deletes an experience as a new version (its history stays in the log).
    pub fn remove(&self, library: &str, id: &str) -> Result<()> {
        let lib = self.library(library)?;
        lib.commit(
            &format!("deleted {id}"),
            vec![Change::Delete { id: id.to_owned() }],
        )?;
        Ok(())
    }

    /// Makes the content of `version` the newest version again (history is kept, not rewritten).
    pub fn rollback(&self, library: &str, version: u64) -> Result<super::Version> {
        let lib = self.library(library)?;
        let changes = lib.rollback_changes(version)?;
        lib.commit(&format!("rollback to version {version}"), changes)
    }

    /// Adds many experiences as one version (imports, learning steps).
    pub fn commit(
        &self,
        library: &str,
        message: &str,
        changes: Vec<Change>,
    ) -> Result<super::Version> {
        self.check_changes(&changes)?;
        self.library(library)?.commit(message, changes)
    }

    fn check_changes(&self, changes: &[Change]) -> Result<()> {
        for c in changes {
            match c {
                Change::Add { text, tags, .. } => self.check(Some(text), Some(tags))?,
                Change::Update { text, tags, .. } => {
                    self.check(text.as_deref(), tags.as_deref())?
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Commits a learning step's changes that a gate let through, with its decision.
    pub fn commit_gated(
        &self,
        library: &str,
        message: &str,
        changes: Vec<Change>,
        gate: serde_json::Value,
    ) -> Result<super::Version> {
        self.check_changes(&changes)?;
        self.library(library)?.commit_gated(message, changes, gate)
    }

    /// Holds `changes` for review instead of committing them (see [`super::proposals`]).
    pub fn propose(
        &self,
        library: &str,
        changes: Vec<Change>,
        origin: &Origin,
    ) -> Result<Vec<Proposal>> {
        self.check_changes(&changes)?;
        self.library(library)?
            .propose(changes, origin, self.options.max_proposals)
    }

    /// The write an API call asked to have reviewed, as a proposal.
    pub fn propose_one(&self, library: &str, change: Change) -> Result<Proposal> {
        let message = match &change {
            Change::Add { .. } => "added by hand".to_owned(),
            Change::Update { id, .. } => format!("edited {id}"),
            Change::Delete { id } => format!("deleted {id}"),
            Change::Restore(e) => format!("restored {}", e.id),
        };
        let origin = Origin {
            kind: "api".into(),
            message,
            ..Default::default()
        };
        self.propose(library, vec![change], &origin)?
            .pop()
            .ok_or_else(|| Error::invalid("a restore cannot be proposed", None))
    }

    /// Commits the pending proposals `ids` as one version, with the reviewer's edits.
    pub fn approve(
        &self,
        library: &str,
        ids: &[String],
        edits: &BTreeMap<String, Edit>,
        reviewer: Option<String>,
    ) -> Result<super::Version> {
        for e in edits.values() {
            self.check(e.text.as_deref(), e.tags.as_deref())?;
        }
        self.library(library)?
            .approve(ids, edits, reviewer, self.options.max_proposals)
    }

    /// Rejects pending proposals; the library's content does not change.
    pub fn reject(
        &self,
        library: &str,
        ids: &[String],
        reviewer: Option<String>,
        reason: Option<String>,
    ) -> Result<Vec<Proposal>> {
        self.library(library)?
            .reject(ids, reviewer, reason, self.options.max_proposals)
    }

    /// The library in id order, filtered by tag.
    pub fn list(&self, library: &str, tag: Option<&str>, limit: usize) -> Result<Vec<SearchHit>> {
        let lib = self.library(library)?;
        Ok(lib
            .list(tag, limit)
            .into_iter()
            .map(SearchHit::listed)
            .collect())
    }

    /// The best matches for a query, as the library's retrieval settings (and the query's
    /// overrides) rank them; an empty query lists the library.
    pub fn search(&self, library: &str, q: &Query<'_>) -> Result<Vec<SearchHit>> {
        let lib = self.library(library)?;
        let text = q.text.trim();
        if text.is_empty() {
            return self.list(library, q.tag, q.limit);
        }
        let q = Query { text, ..*q };
        let r = lib.settings().retrieval.with(&q.retrieval);
        let ranked = self.ranked(&lib, &q, &r)?;
        Ok(ranked
            .iter()
            .filter_map(|h| {
                lib.get(&h.id).map(|experience| SearchHit {
                    experience,
                    score: Some(h.score),
                    lexical: h.lexical,
                    similarity: h.similarity,
                })
            })
            .collect())
    }

    /// The ranking of `q` in `lib`, from the cache when it was asked before.
    fn ranked(&self, lib: &Library, q: &Query<'_>, r: &Retrieval) -> Result<Arc<Vec<Ranked>>> {
        let run = || {
            lib.retrieve(q.text, q.vector, q.tag, q.limit, r)
                .map(Arc::new)
        };
        if q.text.len() > MAX_CACHED_QUERY_BYTES {
            return run();
        }
        let key = cache_key(lib, q, r);
        if let Some(hit) = self.cache.get(&key) {
            return Ok(hit);
        }
        let ranked = run()?;
        self.cache.insert(key, ranked.clone());
        Ok(ranked)
    }

    /// The experiences a request gets from `library`, leaving out those the library's
    /// `skip_harmful` keeps out and keeping the prior within `budget` tokens (estimated), and
    /// what served them: a pinned version, a running trial's arm, or the live version.
    pub fn choose(
        &self,
        library: &str,
        q: &Query<'_>,
        select: Select,
        budget: Option<usize>,
        pin: Option<u64>,
        who: &Audience,
    ) -> Result<Chosen> {
        let lib = self.library(library)?;
        let live = lib.version();
        let (canary, snapshot) = match pin {
            Some(v) if v != live => (None, Some(self.pinned(&lib, v)?)),
            Some(_) => (None, None),
            None => lib.serving(who, self.options.max_proposals),
        };
        let settings = lib.settings();
        let r = settings.retrieval.with(&q.retrieval);
        let size = snapshot
            .as_ref()
            .map_or_else(|| lib.len(), |s| s.experiences.len());
        let top = select.top(&settings, size);
        let find = |id: &str| match &snapshot {
            Some(s) => s.experiences.iter().find(|e| e.id == id).cloned(),
            None => lib.get(id),
        };
        let usable = |e: &Experience| !lib.skips(e);
        let mut stable: Vec<Experience> = settings
            .pinned
            .iter()
            .filter_map(|id| find(id))
            .filter(usable)
            .collect();
        let is_pinned = |e: &Experience| settings.pinned.contains(&e.id);
        let mut retrieved = Vec::new();
        match top {
            None => {
                let all = snapshot
                    .as_ref()
                    .map_or_else(|| lib.all(), |s| s.experiences.clone());
                stable.extend(all.into_iter().filter(|e| !is_pinned(e) && usable(e)));
            }
            Some(k) => {
                // Enough candidates that skipping harmful and pinned ones still leaves `k`.
                let wanted = k.saturating_mul(2).min(k + 64) + stable.len();
                let found = match &snapshot {
                    Some(s) => s.retrieve(q.text, q.vector, wanted, &r, &lib.vectors)?,
                    None => {
                        let hits = self.search(
                            library,
                            &Query {
                                limit: wanted,
                                ..*q
                            },
                        )?;
                        hits.into_iter().map(|h| h.experience).collect()
                    }
                };
                retrieved = found
                    .into_iter()
                    .filter(|e| !is_pinned(e) && usable(e))
                    .take(k)
                    .collect();
            }
        }
        let mut chosen = Chosen {
            stable: stable.len(),
            retrieval: top.map(|_| effective_mode(r.mode, q.vector.is_some())),
            ..Default::default()
        };
        chosen.experiences = stable;
        chosen.experiences.extend(retrieved);
        if let Some(b) = budget {
            chosen.over_budget = keep_within(&mut chosen.experiences, b);
            chosen.stable = chosen.stable.min(chosen.experiences.len());
        }
        let version = match (pin, &canary) {
            (Some(v), _) => v,
            (None, Some(c)) if c.arm == super::canary::Arm::Candidate => {
                lib.trials_candidate_version().unwrap_or(live)
            }
            _ => live,
        };
        chosen.served = Served { version, canary };
        Ok(chosen)
    }

    /// Starts making vectors with `embedder`: now for every library, then after each change.
    /// Retrieval is lexical until it is called (no embedding model, or it is still loading).
    pub fn start_embedding(self: &Arc<Self>, embedder: Arc<dyn Embed>) {
        if self.embedder.set(embedder).is_err() {
            return;
        }
        let store = Arc::downgrade(self);
        let changed = self.changed.clone();
        tokio::spawn(async move {
            loop {
                let Some(s) = store.upgrade() else { return };
                s.refresh_all().await;
                drop(s);
                changed.notified().await;
            }
        });
    }

    /// Brings every library's vectors up to date that a change left behind.
    async fn refresh_all(&self) {
        let Some(e) = self.embedder.get().cloned() else {
            return;
        };
        let libs: Vec<Arc<Library>> = self.libraries.read().values().cloned().collect();
        for lib in libs {
            if !lib.vectors.take_stale() {
                continue;
            }
            if let Err(err) = lib.refresh_vectors(e.as_ref()).await {
                tracing::warn!(library = %lib.name, error = %err, "vectors not made; retrying after the next change");
                lib.vectors.mark_stale();
            }
        }
    }

    /// Whether the embedding model is there to make vectors.
    pub fn embeds(&self) -> bool {
        self.embedder.get().is_some()
    }

    /// The vector of a query, cut to what the model takes; `None` when there is no embedding
    /// model or it failed (retrieval is then lexical; the failure is logged).
    pub async fn embed_query(&self, text: &str) -> Option<Vec<f32>> {
        let e = self.embedder.get()?;
        match e.embed(vec![text.to_owned()], false).await {
            Ok(mut v) => v.pop(),
            Err(err) => {
                tracing::warn!(error = %err, "the query was not embedded; retrieving by words");
                None
            }
        }
    }

    /// For each of `texts`, the closest experience of `library` (or earlier text of `texts`,
    /// named `#i`) at or above the library's `retrieval.duplicate_at`, with its similarity.
    /// Empty when there is no embedding model.
    pub async fn near_duplicates(
        &self,
        library: &str,
        texts: &[String],
    ) -> Result<Vec<Option<(String, f32)>>> {
        let lib = self.library(library)?;
        let Some(e) = self.embedder.get() else {
            return Ok(vec![None; texts.len()]);
        };
        let at = lib.settings().retrieval.duplicate_at as f32;
        let vs = e.embed(texts.to_vec(), false).await?;
        let mut out = Vec::with_capacity(texts.len());
        for (i, v) in vs.iter().enumerate() {
            let mut best = lib
                .vectors
                .nearest(v, 1, &|_| true)
                .into_iter()
                .next()
                .filter(|(_, s)| *s >= at);
            for (j, w) in vs[..i].iter().enumerate() {
                let s = super::vectors::dot(v, w);
                if s >= at && best.as_ref().is_none_or(|b| s > b.1) {
                    best = Some((format!("#{j}"), s));
                }
            }
            out.push(best);
        }
        Ok(out)
    }

    /// Version `v` of `lib`, built in memory once and kept while the cache has room.
    fn pinned(&self, lib: &Library, v: u64) -> Result<Arc<Snapshot>> {
        let key = (lib.name.clone(), v);
        if let Some(s) = self.snapshots.get(&key) {
            return Ok(s);
        }
        let experiences = lib.state_at(v).map_err(|e| match e {
            Error::NotFound { message, .. } => Error::NotFound {
                message,
                param: Some("experient.version".into()),
            },
            other => other,
        })?;
        let s = Arc::new(Snapshot::new(experiences)?);
        self.snapshots.insert(key, s.clone());
        Ok(s)
    }

    /// Counts feedback on a served answer: credit or blame for each experience in it, and a
    /// vote for the trial arm that served it (which may decide the trial).
    pub fn attribute(&self, library: &str, served: &Attribution, score: f64) -> Result<()> {
        let lib = self.library(library)?;
        lib.add_credit(&served.experiences, served.version, score >= 0.5)?;
        if let Some(tag) = &served.canary {
            lib.observe(tag, score, self.options.max_proposals)?;
        }
        Ok(())
    }

    /// Saves every library's use counts, before shutdown.
    pub fn flush(&self) {
        for lib in self.libraries.read().values() {
            lib.flush_usage();
            if let Err(e) = lib.vectors.save(true) {
                tracing::warn!(library = %lib.name, error = %e, "vectors not saved; they are made again next start");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_search_cache_is_bounded_by_bytes_and_keeps_no_query_text() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            dir.path(),
            StoreOptions {
                cache_bytes: 64 << 10,
                ..Default::default()
            },
        )
        .unwrap();
        store.create("l").unwrap();
        store
            .add("l", "Units: convert every quantity first.", vec![])
            .unwrap();
        // Long distinct queries: searched, not cached.
        for i in 0..50 {
            let q = format!("{i} units {}", "padding ".repeat(100_000));
            assert_eq!(store.search("l", &Query::text(&q, 3)).unwrap().len(), 1);
        }
        store.cache.run_pending_tasks();
        assert_eq!(store.cache.entry_count(), 0);
        // Many short ones: cached, and the cache stays within its bytes.
        for i in 0..5000 {
            let q = format!("units {i}");
            assert_eq!(store.search("l", &Query::text(&q, 3)).unwrap().len(), 1);
        }
        store.cache.run_pending_tasks();
        assert!(store.cache.entry_count() > 0);
        assert!(
            store.cache.weighted_size() <= 64 << 10,
            "{}",
            store.cache.weighted_size()
        );
        // A repeated query is served from the cache, and a write invalidates it.
        let before = store.search("l", &Query::text("units 4999", 3)).unwrap();
        store
            .add("l", "Units again: a second lesson.", vec![])
            .unwrap();
        let after = store.search("l", &Query::text("units 4999", 3)).unwrap();
        assert_eq!((before.len(), after.len()), (1, 2));
    }

    /// A stand-in for the embedding model in these tests: words hashed into 64 dimensions, so
    /// that texts sharing words are alike. (The real model is exercised end to end.)
    struct Words;

    #[async_trait::async_trait]
    impl Embed for Words {
        fn model(&self) -> String {
            "words".into()
        }
        async fn embed(&self, texts: Vec<String>, _: bool) -> Result<Vec<Vec<f32>>> {
            Ok(texts
                .iter()
                .map(|t| {
                    let mut v = vec![0f32; 64];
                    for w in t.to_lowercase().split(|c: char| !c.is_alphanumeric()) {
                        if !w.is_empty() {
                            v[super::super::vectors::text_hash(w) as usize % 64] += 1.0;
                        }
                    }
                    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
                    v.iter().map(|x| x / n).collect()
                })
                .collect())
        }
    }

    /// A store with one library, "l", whose vectors the [`Words`] stand-in makes.
    fn embedding_store() -> (tempfile::TempDir, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        store.start_embedding(Arc::new(Words));
        store.create("l").unwrap();
        (dir, store)
    }

    async fn embedded(store: &Store, n: usize) {
        for _ in 0..200 {
            if store.library("l").unwrap().vector_status().count == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("vectors never reached {n}");
    }

    #[tokio::test]
    async fn vectors_follow_the_library_and_the_prior_puts_pins_first_within_its_budget() {
        let (dir, store) = embedding_store();
        let mut ids = Vec::new();
        for i in 0..12 {
            let text = format!("Lesson {i}: topic{i} matters {}", "word ".repeat(i));
            ids.push(store.add("l", &text, vec![]).unwrap().id);
        }
        embedded(&store, 12).await;
        let lib = store.library("l").unwrap();
        let mut settings = lib.settings();
        settings.pinned = vec![ids[11].clone()];
        lib.set_settings(settings).unwrap();

        let qv = Words
            .embed(vec!["topic3".into()], false)
            .await
            .unwrap()
            .pop();
        let q = Query {
            vector: qv.as_deref(),
            ..Query::text("topic3", 0)
        };
        let who = Audience::default();
        // Twelve is past `whole_up_to`: the pin, then `top_k` (4) retrieved, the match first.
        let c = store
            .choose("l", &q, Select::Library, None, None, &who)
            .unwrap();
        let got: Vec<&str> = c.experiences.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(
            (got[0], got[1], c.stable),
            (ids[11].as_str(), ids[3].as_str(), 1)
        );
        assert!(
            got.len() <= 5 && c.retrieval == Some(Mode::Hybrid),
            "{got:?}"
        );
        // A budget the pin alone overflows: nothing is injected, and that is said.
        let small = store
            .choose("l", &q, Select::Library, Some(5), None, &who)
            .unwrap();
        assert!(small.experiences.is_empty() && small.over_budget == got.len());
        // "all": the whole library, pinned first, then in id order: one stable prefix.
        let all = store
            .choose("l", &q, Select::All, None, None, &who)
            .unwrap();
        assert_eq!(all.stable, 12);
        assert_eq!(all.experiences[0].id, ids[11]);
        assert_eq!(all.experiences[1].id, ids[0]);

        // A deleted experience loses its vector; the rest survive a restart without a model.
        store.remove("l", &ids[0]).unwrap();
        embedded(&store, 11).await;
        store.flush();
        drop((lib, store));
        let again = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let status = again.library("l").unwrap().vector_status();
        assert_eq!((status.count, status.model.as_deref()), (11, Some("words")));
    }

    #[tokio::test]
    async fn near_duplicates_are_found_in_the_library_and_among_the_new() {
        let (_dir, store) = embedding_store();
        let e = store
            .add("l", "Units: convert all quantities first.", vec![])
            .unwrap();
        embedded(&store, 1).await;
        let texts = [
            "units: convert ALL quantities first".to_owned(),
            "Dates: count days per month.".to_owned(),
            "dates count days per month".to_owned(),
        ];
        let near = store.near_duplicates("l", &texts).await.unwrap();
        assert_eq!(near[0].as_ref().unwrap().0, e.id);
        assert!(near[1].is_none());
        assert_eq!(near[2].as_ref().unwrap().0, "#1");
    }
}
