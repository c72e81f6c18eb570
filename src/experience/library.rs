//! One library: its append-only log, the state replayed from it, and its index.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::index::Index;
use super::{Experience, Provenance, Settings, Source};
use crate::error::{Error, Result};

pub const LOG_FILE: &str = "log.jsonl";
pub const SETTINGS_FILE: &str = "library.json";
const USAGE_FILE: &str = "usage.json";

/// One change inside a version, as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Add {
        id: String,
        text: String,
        #[serde(default)]
        tags: Vec<String>,
        source: Source,
        #[serde(default)]
        provenance: Provenance,
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
    /// Brings back an experience as it was (a rollback past its deletion), keeping its id and
    /// creation time.
    Restore {
        experience: Experience,
    },
}

impl Op {
    pub fn id(&self) -> &str {
        match self {
            Op::Add { id, .. } | Op::Update { id, .. } | Op::Delete { id } => id,
            Op::Restore { experience } => &experience.id,
        }
    }
}

/// A change as a caller asks for it: adds have no id yet.
#[derive(Debug, Clone)]
pub enum Change {
    Add {
        text: String,
        tags: Vec<String>,
        source: Source,
        provenance: Provenance,
    },
    Update {
        id: String,
        text: Option<String>,
        tags: Option<Vec<String>>,
    },
    Delete {
        id: String,
    },
    Restore(Experience),
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub version: u64,
    pub at: DateTime<Utc>,
    pub message: String,
    pub ops: Vec<Op>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionSummary {
    pub version: u64,
    pub at: DateTime<Utc>,
    pub message: String,
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
            added: count(|o| matches!(o, Op::Add { .. } | Op::Restore { .. })),
            updated: count(|o| matches!(o, Op::Update { .. })),
            deleted: count(|o| matches!(o, Op::Delete { .. })),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Changed {
    pub id: String,
    pub before: Experience,
    pub after: Experience,
}

#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub from: u64,
    pub to: u64,
    pub added: Vec<Experience>,
    pub removed: Vec<Experience>,
    pub changed: Vec<Changed>,
}

/// Experiences keyed by the number in their id, so that listing is in creation order.
type Experiences = BTreeMap<u64, Experience>;

pub(super) struct State {
    pub experiences: Experiences,
    pub versions: Vec<Version>,
    /// Next id number; it only grows, so ids are never reused.
    pub next_id: u64,
}

pub fn id_number(id: &str) -> Option<u64> {
    id.strip_prefix('E')?.parse().ok()
}

fn apply(experiences: &mut Experiences, v: &Version) {
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

pub struct Library {
    pub name: String,
    dir: PathBuf,
    /// Serialises writers and owns the log's append handle.
    log: Mutex<File>,
    pub(super) state: RwLock<State>,
    settings: RwLock<Settings>,
    pub(super) index: Index,
    usage: Mutex<Usage>,
}

#[derive(Default)]
struct Usage {
    counts: BTreeMap<String, u64>,
    dirty: bool,
    last_flush: Option<std::time::Instant>,
}

impl Library {
    /// Creates a new library directory with an empty first version.
    pub fn create(dir: &Path, name: &str) -> Result<Library> {
        if dir.exists() {
            return Err(Error::Conflict(format!("library '{name}' already exists")));
        }
        let parent = dir
            .parent()
            .ok_or_else(|| Error::internal("library has no parent"))?;
        // Build in a hidden directory and rename, so that a crash never leaves half a library.
        let tmp = parent.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        write_atomic(&tmp.join(SETTINGS_FILE), &pretty(&Settings::default())?)?;
        let first = Version {
            version: 0,
            at: Utc::now(),
            message: "created".into(),
            ops: vec![],
        };
        let mut line = serde_json::to_string(&first).map_err(Error::internal)?;
        line.push('\n');
        write_atomic(&tmp.join(LOG_FILE), line.as_bytes())?;
        std::fs::rename(&tmp, dir)?;
        sync_dir(parent)?;
        Library::open(dir, name)
    }

    /// Opens a library, replaying its log. A torn last line (a write cut off by a crash, never
    /// acknowledged) is cut away; damage anywhere else is an error, never silently skipped.
    pub fn open(dir: &Path, name: &str) -> Result<Library> {
        let log_path = dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::internal(format!("cannot open {}: {e}", log_path.display())))?;
        let mut versions = Vec::new();
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&file);
            let mut line = String::new();
            let mut lineno = 0;
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 {
                    break;
                }
                lineno += 1;
                let complete = line.ends_with('\n');
                match serde_json::from_str::<Version>(line.trim_end()) {
                    Ok(v) if complete => {
                        good_len += n as u64;
                        versions.push(v);
                    }
                    _ => {
                        // Only the very end may be torn.
                        let mut rest = String::new();
                        reader.read_line(&mut rest)?;
                        if !rest.is_empty() {
                            return Err(Error::internal(format!(
                                "{} line {lineno} is damaged; fix or remove it by hand",
                                log_path.display()
                            )));
                        }
                        tracing::warn!(library = name, "dropping a torn last log line");
                        break;
                    }
                }
            }
        }
        if good_len < file.metadata()?.len() {
            file.set_len(good_len)?;
            file.sync_all()?;
        }
        file.seek(SeekFrom::End(0))?;
        if versions.is_empty() {
            return Err(Error::internal(format!(
                "{} holds no versions",
                log_path.display()
            )));
        }
        let mut experiences = Experiences::new();
        let mut next_id = 1;
        for v in &versions {
            apply(&mut experiences, v);
            next_id = next_id.max(max_id(v) + 1);
        }
        let settings = match std::fs::read(dir.join(SETTINGS_FILE)) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                Error::internal(format!("{}: {e}", dir.join(SETTINGS_FILE).display()))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings::default(),
            Err(e) => return Err(e.into()),
        };
        let usage = match std::fs::read(dir.join(USAGE_FILE)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let version = versions.last().map(|v| v.version).unwrap_or(0);
        let index = Index::open(&dir.join(".index"), experiences.values(), version)?;
        Ok(Library {
            name: name.to_owned(),
            dir: dir.to_owned(),
            log: Mutex::new(file),
            state: RwLock::new(State {
                experiences,
                versions,
                next_id,
            }),
            settings: RwLock::new(settings),
            index,
            usage: Mutex::new(Usage {
                counts: usage,
                ..Default::default()
            }),
        })
    }

    pub fn version(&self) -> u64 {
        let s = self.state.read().unwrap();
        s.versions.last().map(|v| v.version).unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.state.read().unwrap().experiences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn settings(&self) -> Settings {
        self.settings.read().unwrap().clone()
    }

    pub fn set_settings(&self, s: Settings) -> Result<()> {
        let _writer = self.log.lock().unwrap();
        write_atomic(&self.dir.join(SETTINGS_FILE), &pretty(&s)?)?;
        *self.settings.write().unwrap() = s;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<Experience> {
        let n = id_number(id)?;
        self.state.read().unwrap().experiences.get(&n).cloned()
    }

    pub fn list(&self, tag: Option<&str>, limit: usize) -> Vec<Experience> {
        let s = self.state.read().unwrap();
        s.experiences
            .values()
            .filter(|e| tag.is_none_or(|t| e.tags.iter().any(|x| x == t)))
            .take(limit)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<Experience> {
        self.state
            .read()
            .unwrap()
            .experiences
            .values()
            .cloned()
            .collect()
    }

    pub fn versions(&self) -> Vec<VersionSummary> {
        let s = self.state.read().unwrap();
        s.versions.iter().map(VersionSummary::from).collect()
    }

    pub fn version_record(&self, v: u64) -> Option<Version> {
        let s = self.state.read().unwrap();
        s.versions.iter().find(|x| x.version == v).cloned()
    }

    /// The experiences as they were right after version `v`.
    pub fn state_at(&self, v: u64) -> Result<Vec<Experience>> {
        Ok(self.experiences_at(v)?.into_values().collect())
    }

    fn experiences_at(&self, v: u64) -> Result<Experiences> {
        let s = self.state.read().unwrap();
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
        let s = self.state.read().unwrap();
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
        let mut log = self.log.lock().unwrap();
        let (version, ops) = {
            let s = self.state.read().unwrap();
            let mut next_id = s.next_id;
            let mut ops = Vec::with_capacity(changes.len());
            let mut deleted = std::collections::HashSet::new();
            for c in changes {
                let exists = |id: &str| {
                    id_number(id).is_some_and(|n| s.experiences.contains_key(&n))
                        && !deleted.contains(id)
                };
                let missing = |id: &str| {
                    Error::not_found(
                        format!("library '{}' has no experience '{id}'", self.name),
                        "id",
                    )
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
                    Change::Update { id, text, tags } => {
                        if !exists(&id) {
                            return Err(missing(&id));
                        }
                        Op::Update { id, text, tags }
                    }
                    Change::Delete { id } => {
                        if !exists(&id) {
                            return Err(missing(&id));
                        }
                        deleted.insert(id.clone());
                        Op::Delete { id }
                    }
                    Change::Restore(e) => Op::Restore { experience: e },
                });
            }
            let version = s.versions.last().map(|v| v.version + 1).unwrap_or(0);
            (version, ops)
        };
        let record = Version {
            version,
            at: Utc::now(),
            message: message.to_owned(),
            ops,
        };
        let mut line = serde_json::to_string(&record).map_err(Error::internal)?;
        line.push('\n');
        let before = log.metadata()?.len();
        if let Err(e) = log
            .write_all(line.as_bytes())
            .and_then(|()| log.sync_data())
        {
            // Leave the file as it was, so it stays parseable and holds only acknowledged
            // versions.
            let _ = log.set_len(before);
            return Err(Error::internal(format!(
                "writing library '{}': {e}",
                self.name
            )));
        }
        // The index goes first and the in-memory state second: a search that sees the new
        // version number then also sees the new index, so the search cache (keyed by version)
        // can never hold results older than its key.
        let touched: Vec<Experience> = {
            let s = self.state.read().unwrap();
            let mut scratch: Experiences = record
                .ops
                .iter()
                .filter_map(|o| id_number(o.id()))
                .filter_map(|n| s.experiences.get(&n).map(|e| (n, e.clone())))
                .collect();
            apply(&mut scratch, &record);
            scratch.into_values().collect()
        };
        let removed: Vec<&str> = record.ops.iter().map(Op::id).collect();
        // The log is the truth; an index failure only means the index is rebuilt next time.
        if let Err(e) = self.index.apply(&removed, &touched, version) {
            tracing::error!(library = %self.name, error = %e, "index update failed; it will be rebuilt on restart");
        }
        {
            let mut s = self.state.write().unwrap();
            apply(&mut s.experiences, &record);
            s.next_id = s.next_id.max(max_id(&record) + 1);
            s.versions.push(record.clone());
        }
        drop(log);
        Ok(record)
    }

    /// Counts that experiences were injected into a request. Counts are statistics, not
    /// history: they are flushed to `usage.json` at most every few seconds, not versioned.
    pub fn record_use(&self, ids: &[String]) {
        let mut u = self.usage.lock().unwrap();
        for id in ids {
            *u.counts.entry(id.clone()).or_default() += 1;
        }
        u.dirty = true;
        if u.last_flush.is_none_or(|t| t.elapsed().as_secs() >= 2) {
            self.flush_usage_locked(&mut u);
        }
    }

    pub fn uses(&self, id: &str) -> u64 {
        self.usage
            .lock()
            .unwrap()
            .counts
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    pub fn flush_usage(&self) {
        let mut u = self.usage.lock().unwrap();
        self.flush_usage_locked(&mut u);
    }

    fn flush_usage_locked(&self, u: &mut Usage) {
        if !u.dirty {
            return;
        }
        if let Ok(b) = pretty(&u.counts) {
            if write_atomic(&self.dir.join(USAGE_FILE), &b).is_ok() {
                u.dirty = false;
                u.last_flush = Some(std::time::Instant::now());
            }
        }
    }

    pub(super) fn search_ids(
        &self,
        q: &str,
        tag: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, f32)>> {
        self.index.search(q, tag, limit)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn pretty<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    let mut b = serde_json::to_vec_pretty(v).map_err(Error::internal)?;
    b.push(b'\n');
    Ok(b)
}

/// Temp file, fsync, rename, fsync of the directory: the file is either the old one or the
/// new one, never a mix, even across a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal("path has no parent"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|f| f.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}
