//! The experience directory: its libraries, the process lock, and the search cache.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use serde::Serialize;

use super::canary::{Audience, CanaryArm, Snapshot};
use super::library::{Library, LOG_FILE};
use super::log::Change;
use super::proposals::{Edit, Origin, Proposal};
use super::{validate_library_name, validate_tags, validate_text, Experience, Provenance, Source};
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_text_chars: 2000,
            cache_bytes: crate::config::Bounds::default().search_cache_bytes,
            max_top_k: crate::config::Bounds::default().max_experiences,
            snapshot_bytes: crate::config::Bounds::default().snapshot_cache_bytes,
            max_proposals: crate::config::Bounds::default().max_proposals,
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

/// One search result: the experience and its BM25 score.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    #[serde(flatten)]
    pub experience: Experience,
    /// BM25 relevance; absent when listing without a query.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

/// A search's cache key: the SHA-256 of (library, version, query, tag, limit). A digest, not
/// the text, so that an entry weighs the same whatever the query's length; 240 distinct
/// 3.8 MB messages once grew the process by 1.2 GiB when the cache kept whole queries.
type CacheKey = [u8; 32];

/// Queries longer than this (in bytes) are searched but not cached: a long query is a whole
/// pasted message, seldom asked twice.
const MAX_CACHED_QUERY_BYTES: usize = 1024;

fn cache_key(library: &str, version: u64, q: &str, tag: Option<&str>, limit: usize) -> CacheKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [
        library.as_bytes(),
        q.as_bytes(),
        tag.unwrap_or("").as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(version.to_le_bytes());
    h.update([u8::from(tag.is_some())]);
    h.update((limit as u64).to_le_bytes());
    h.finalize().into()
}

/// What one cached result weighs, in bytes (moka's weigher is u32).
fn weigh(_key: &CacheKey, ids: &Arc<Vec<(String, f32)>>) -> u32 {
    let bytes = 64 + ids.iter().map(|(id, _)| id.len() + 32).sum::<usize>();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

/// Every library under one directory, loaded when the store opens, with the search cache.
/// One process holds a directory at a time (a lock file), so two writers never interleave.
pub struct Store {
    dir: PathBuf,
    options: StoreOptions,
    libraries: RwLock<BTreeMap<String, Arc<Library>>>,
    /// Libraries that could not be opened (a log damaged mid-file), with the reason. They are
    /// refused alone, with 503, so that one bad library never keeps the others from serving;
    /// their files are left exactly as they are for a person to repair.
    damaged: BTreeMap<String, String>,
    /// Search results by the digest of (library, version, query, tag, limit), bounded by bytes.
    /// The version in the key is what invalidates: after a write, no later search can hit an
    /// entry made before it.
    cache: moka::sync::Cache<CacheKey, Arc<Vec<(String, f32)>>>,
    /// Past versions that requests pinned, built in memory, by (library, version); bounded
    /// by bytes.
    snapshots: moka::sync::Cache<(String, u64), Arc<Snapshot>>,
    _lock: File,
}

impl Store {
    /// Opens (creating if needed) an experience directory and every library in it. A second
    /// process on the same directory is refused: two writers appending to one log would
    /// interleave versions.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::internal(format!(
                "cannot create experience directory {}: {e}",
                dir.display()
            ))
        })?;
        let lock_path = dir.join(".lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Unavailable(format!(
                    "the experience directory {} is in use by another experient process; \
                     stop it or go through its HTTP API (/v1/libraries)",
                    dir.display()
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let mut libraries = BTreeMap::new();
        let mut damaged = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".creating-") {
                // A creation cut off by a crash; it was never acknowledged.
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            if validate_library_name(&name).is_err() || !entry.path().join(LOG_FILE).is_file() {
                continue;
            }
            match Library::open(&entry.path(), &name, options.max_top_k) {
                Ok(lib) => {
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
            libraries: RwLock::new(libraries),
            damaged,
            cache,
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
        let lib = Arc::new(Library::create(
            &self.dir.join(name),
            name,
            self.options.max_top_k,
        )?);
        libs.insert(name.to_owned(), lib.clone());
        Ok(lib)
    }

    /// Deletes a library: its directory is renamed away first (atomic), then removed.
    pub fn delete(&self, name: &str) -> Result<()> {
        let lib = self.library(name)?;
        let mut libs = self.libraries.write();
        let trash = self
            .dir
            .join(format!(".deleted-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(lib.dir(), &trash)?;
        super::log::sync_dir(&self.dir)?;
        libs.remove(name);
        let _ = std::fs::remove_dir_all(&trash);
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

    /// Ranked search when `q` is given, otherwise the library in id order; both filtered by tag.
    pub fn search(
        &self,
        library: &str,
        q: Option<&str>,
        tag: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SearchHit>> {
        let lib = self.library(library)?;
        let q = q.map(str::trim).filter(|q| !q.is_empty());
        let Some(q) = q else {
            return Ok(lib
                .list(tag, limit)
                .into_iter()
                .map(|experience| SearchHit {
                    experience,
                    score: None,
                })
                .collect());
        };
        let ids = if q.len() > MAX_CACHED_QUERY_BYTES {
            Arc::new(lib.search_ids(q, tag, limit)?)
        } else {
            let key = cache_key(library, lib.version(), q, tag, limit);
            match self.cache.get(&key) {
                Some(ids) => ids,
                None => {
                    let ids = Arc::new(lib.search_ids(q, tag, limit)?);
                    self.cache.insert(key, ids.clone());
                    ids
                }
            }
        };
        Ok(ids
            .iter()
            .filter_map(|(id, score)| {
                lib.get(id).map(|experience| SearchHit {
                    experience,
                    score: Some(*score),
                })
            })
            .collect())
    }

    /// The experiences a request gets from `library` (all of them, or the `top` best matches
    /// for `query`), leaving out those the library's `skip_harmful` keeps out, and what
    /// served them: a pinned version, a running trial's arm, or the live version.
    pub fn choose(
        &self,
        library: &str,
        query: &str,
        top: Option<usize>,
        pin: Option<u64>,
        who: &Audience,
    ) -> Result<(Vec<Experience>, Served)> {
        let lib = self.library(library)?;
        let live = lib.version();
        let (canary, snapshot) = match pin {
            Some(v) if v != live => (None, Some(self.pinned(&lib, v)?)),
            Some(_) => (None, None),
            None => lib.serving(who, self.options.max_proposals),
        };
        // Enough candidates that skipping a few harmful ones still leaves `top`.
        let wanted = top.map(|k| k.saturating_mul(2).min(k + 64));
        let found = match (&snapshot, wanted) {
            (Some(s), Some(k)) => s.search(query, k)?,
            (Some(s), None) => s.experiences.clone(),
            (None, Some(k)) => self
                .search(library, Some(query), None, k)?
                .into_iter()
                .map(|h| h.experience)
                .collect(),
            (None, None) => lib.all(),
        };
        let mut chosen: Vec<Experience> = found.into_iter().filter(|e| !lib.skips(e)).collect();
        if let Some(k) = top {
            chosen.truncate(k);
        }
        let version = match (pin, &canary) {
            (Some(v), _) => v,
            (None, Some(c)) if c.arm == super::canary::Arm::Candidate => {
                lib.trials_candidate_version().unwrap_or(live)
            }
            _ => live,
        };
        Ok((chosen, Served { version, canary }))
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
            assert_eq!(store.search("l", Some(&q), None, 3).unwrap().len(), 1);
        }
        store.cache.run_pending_tasks();
        assert_eq!(store.cache.entry_count(), 0);
        // Many short ones: cached, and the cache stays within its bytes.
        for i in 0..5000 {
            let q = format!("units {i}");
            assert_eq!(store.search("l", Some(&q), None, 3).unwrap().len(), 1);
        }
        store.cache.run_pending_tasks();
        assert!(store.cache.entry_count() > 0);
        assert!(
            store.cache.weighted_size() <= 64 << 10,
            "{}",
            store.cache.weighted_size()
        );
        // A repeated query is served from the cache, and a write invalidates it.
        let before = store.search("l", Some("units 4999"), None, 3).unwrap();
        store
            .add("l", "Units again: a second lesson.", vec![])
            .unwrap();
        let after = store.search("l", Some("units 4999"), None, 3).unwrap();
        assert_eq!((before.len(), after.len()), (1, 2));
    }
}
