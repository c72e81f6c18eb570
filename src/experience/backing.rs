//! Where a library's truth is kept: its versions and its settings. Two implementations of
//! one seam: [`Files`], a directory per library with an append-only `log.jsonl` (the embedded
//! default; one process owns the directory), and [`Postgres`], rows that every replica shares.
//!
//! Everything else about a library (its search index, its vectors) is derived from the
//! versions and kept in the library's local directory on each replica, tagged by version; a
//! replica that sees another's version applies it the way it applies its own.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};

use chrono::Utc;

use super::library::{pretty, LOG_FILE, SETTINGS_FILE, USAGE_FILE};
use super::log::{sync_dir, write_atomic, Version};
use super::{validate_library_name, Settings};
use crate::db::{self, block, Db};
use crate::error::{Error, Result};

/// One commit in progress: while it is held no other writer, in this process or another,
/// commits to the library, so the versions it reports are all there are and the next number
/// is free. Dropped without [`Commit::append`], nothing is written.
pub trait Commit {
    /// Versions newer than `version` that other writers made, oldest first.
    fn after(&mut self, version: u64) -> Result<Vec<Version>>;
    /// Writes `v` durably and ends the commit.
    fn append(self: Box<Self>, v: &Version) -> Result<()>;
}

/// One read-modify-write of a library's document (its proposals): while held, no other
/// writer changes the document. Dropped without [`DocEdit::save`], nothing changes.
pub trait DocEdit {
    /// The document as stored, when another writer may have changed it since it was read.
    fn current(&mut self) -> Result<Option<String>>;
    fn save(self: Box<Self>, body: &str) -> Result<()>;
}

/// One library's versions and settings where they are kept.
pub trait Log: Send + Sync {
    /// Stores the use counts: `totals` where only this process counts, or adds `added` (what
    /// this process counted since its last save) to the shared sums and returns them.
    fn save_uses(
        &self,
        totals: &BTreeMap<String, u64>,
        added: &BTreeMap<String, u64>,
    ) -> Result<Option<BTreeMap<String, u64>>>;
    /// The shared use counts (`None` where only this process counts: its own are current).
    fn load_uses(&self) -> Result<Option<BTreeMap<String, u64>>>;
    /// The document `name` as stored elsewhere, when others may change it (`None` for files,
    /// which only this process writes: what it holds is current).
    fn load_doc(&self, name: &str) -> Result<Option<String>>;
    /// Starts a read-modify-write of the document `name`.
    fn begin_doc(&self, name: &str) -> Result<Box<dyn DocEdit + '_>>;
    /// Starts a commit, waiting (in order of arrival) for other writers' to end.
    fn begin(&self) -> Result<Box<dyn Commit + '_>>;
    /// Versions newer than `version` that other writers made, oldest first.
    fn after(&self, version: u64) -> Result<Vec<Version>>;
    fn save_settings(&self, s: &Settings) -> Result<()>;
    /// The settings, when another writer changed them since this log last read or wrote them.
    fn newer_settings(&self) -> Result<Option<Settings>>;
    /// Which creation of the library's name this is: a library deleted and created again
    /// under the same name is another one.
    fn generation(&self) -> i64;
    /// The settings revision this log last read or wrote (0 where nobody else writes).
    fn settings_rev(&self) -> i64;
}

/// A library as it is read: every version, its settings, and its log for what comes next.
pub struct Opened {
    pub versions: Vec<Version>,
    pub settings: Settings,
    pub log: Box<dyn Log>,
}

/// A whole library as it is kept: settings, every version, and its proposals' document.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub settings: Settings,
    pub versions: Vec<Version>,
    pub proposals: Option<String>,
    /// Use counts per experience.
    pub uses: BTreeMap<String, u64>,
}

const PROPOSALS: &str = super::proposals::PROPOSALS_FILE;

/// A library's place in the shared store, for a replica to compare with what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub name: String,
    pub generation: i64,
    pub version: u64,
    pub settings_rev: i64,
}

/// Where the libraries are kept. `dir` is always the library's local directory (or, for
/// [`Backing::names`], the store's), which holds what a replica derives.
pub trait Backing: Send + Sync {
    fn names(&self, store_dir: &Path) -> Result<Vec<String>>;
    fn open(&self, dir: &Path, name: &str, max_top_k: usize) -> Result<Opened>;
    /// Creates an empty library (version 0, default settings); 409 if the name is taken.
    fn create(&self, dir: &Path, name: &str, max_top_k: usize) -> Result<Opened>;
    fn delete(&self, dir: &Path, name: &str) -> Result<()>;
    /// A whole library, read without deriving anything (for copying a store).
    fn export(&self, dir: &Path, name: &str) -> Result<Exported>;
    /// Writes a whole library at once, every version as it was; 409 if the name is taken.
    fn import(&self, dir: &Path, name: &str, library: &Exported) -> Result<()>;
    /// Whether other processes write the same libraries.
    fn shared(&self) -> bool;
    /// The heads of every library, or of the one named; nothing for a store one process owns.
    fn heads(&self, name: Option<&str>) -> Result<Vec<Head>>;
}

/// The first version of every library.
fn created() -> Version {
    Version {
        version: 0,
        at: Utc::now(),
        message: "created".into(),
        ops: vec![],
        review: None,
        gate: None,
    }
}

/// A library's settings; a `top_k` above the bound (written by hand or under an older bound)
/// is clamped, with a warning, rather than trusted.
pub(super) fn clamp_settings(mut settings: Settings, name: &str, max_top_k: usize) -> Settings {
    if settings.top_k > max_top_k || settings.top_k == 0 {
        let clamped = settings.top_k.clamp(1, max_top_k);
        tracing::warn!(
            library = name,
            top_k = settings.top_k,
            clamped,
            "library top_k is outside the server's bounds; using the bound"
        );
        settings.top_k = clamped;
    }
    settings
}

/// Libraries as directories, one process owning them all.
pub struct Files;

struct FileLog {
    dir: std::path::PathBuf,
    name: String,
}

impl Backing for Files {
    fn names(&self, store_dir: &Path) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(store_dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".creating-") {
                // A creation cut off by a crash; it was never acknowledged.
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            if validate_library_name(&name).is_ok() && entry.path().join(LOG_FILE).is_file() {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// Replays the log. A torn last line (a write cut off by a crash, never acknowledged) is
    /// cut away; damage anywhere else is an error, never silently skipped.
    fn open(&self, dir: &Path, name: &str, max_top_k: usize) -> Result<Opened> {
        let log_path = dir.join(LOG_FILE);
        let bytes = std::fs::read(&log_path)
            .map_err(|e| Error::internal(format!("cannot read {}: {e}", log_path.display())))?;
        let replay = replay(&bytes).map_err(|lineno| {
            Error::internal(format!(
                "{} line {lineno} is damaged; fix or remove it by hand",
                log_path.display()
            ))
        })?;
        if replay.good_len < bytes.len() {
            tracing::warn!(library = name, "dropping a torn last log line");
            let file = OpenOptions::new().write(true).open(&log_path)?;
            file.set_len(replay.good_len as u64)?;
            file.sync_all()?;
        }
        if replay.versions.is_empty() {
            return Err(Error::internal(format!(
                "{} holds no versions",
                log_path.display()
            )));
        }
        let path = dir.join(SETTINGS_FILE);
        let settings: Settings = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Settings::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Opened {
            versions: replay.versions,
            settings: clamp_settings(settings, name, max_top_k),
            log: Box::new(FileLog {
                dir: dir.to_owned(),
                name: name.to_owned(),
            }),
        })
    }

    fn create(&self, dir: &Path, name: &str, _max_top_k: usize) -> Result<Opened> {
        let first = created();
        let new = Exported {
            settings: Settings::default(),
            versions: vec![first.clone()],
            proposals: None,
            uses: BTreeMap::new(),
        };
        self.import(dir, name, &new)?;
        Ok(Opened {
            versions: vec![first],
            settings: Settings::default(),
            log: Box::new(FileLog {
                dir: dir.to_owned(),
                name: name.to_owned(),
            }),
        })
    }

    /// Renames the directory away first (atomic), then removes it.
    fn delete(&self, dir: &Path, name: &str) -> Result<()> {
        let parent = dir
            .parent()
            .ok_or_else(|| Error::internal("library has no parent"))?;
        let trash = parent.join(format!(".deleted-{name}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::rename(dir, &trash)?;
        sync_dir(parent)?;
        let _ = std::fs::remove_dir_all(&trash);
        Ok(())
    }

    fn export(&self, dir: &Path, name: &str) -> Result<Exported> {
        let o = self.open(dir, name, usize::MAX)?;
        let proposals = match std::fs::read_to_string(dir.join(PROPOSALS)) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let uses = match std::fs::read(dir.join(USAGE_FILE)) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        Ok(Exported {
            settings: o.settings,
            versions: o.versions,
            proposals,
            uses,
        })
    }

    /// Builds the library in a hidden directory and renames it, so that a crash never leaves
    /// half a library.
    fn import(&self, dir: &Path, name: &str, library: &Exported) -> Result<()> {
        if dir.exists() {
            return Err(Error::Conflict(format!("library '{name}' already exists")));
        }
        let parent = dir
            .parent()
            .ok_or_else(|| Error::internal("library has no parent"))?;
        let tmp = parent.join(format!(".creating-{name}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        write_atomic(&tmp.join(SETTINGS_FILE), &pretty(&library.settings)?)?;
        if let Some(p) = &library.proposals {
            write_atomic(&tmp.join(PROPOSALS), p.as_bytes())?;
        }
        if !library.uses.is_empty() {
            write_atomic(&tmp.join(USAGE_FILE), &pretty(&library.uses)?)?;
        }
        let mut log = String::new();
        for v in &library.versions {
            log.push_str(&serde_json::to_string(v).map_err(Error::internal)?);
            log.push('\n');
        }
        write_atomic(&tmp.join(LOG_FILE), log.as_bytes())?;
        std::fs::rename(&tmp, dir)?;
        sync_dir(parent)
    }

    fn shared(&self) -> bool {
        false
    }

    fn heads(&self, _name: Option<&str>) -> Result<Vec<Head>> {
        Ok(vec![])
    }
}

/// The process owns the directory and the library's writer lock is held: nothing to wait for.
impl Commit for &FileLog {
    fn after(&mut self, _version: u64) -> Result<Vec<Version>> {
        Ok(vec![])
    }

    /// Appends the version to the log and syncs it; on failure the file is cut back to where
    /// it was, so it stays parseable and holds only acknowledged versions.
    fn append(self: Box<Self>, record: &Version) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(Error::internal)?;
        line.push('\n');
        let mut log = OpenOptions::new()
            .append(true)
            .open(self.dir.join(LOG_FILE))
            .map_err(|e| Error::internal(format!("opening library '{}': {e}", self.name)))?;
        let before = log.metadata()?.len();
        if let Err(e) = log
            .write_all(line.as_bytes())
            .and_then(|()| log.sync_data())
        {
            let _ = log.set_len(before);
            return Err(Error::internal(format!(
                "writing library '{}': {e}",
                self.name
            )));
        }
        Ok(())
    }
}

/// A document in the library's directory, rewritten atomically.
struct FileDoc<'a> {
    path: std::path::PathBuf,
    _log: &'a FileLog,
}

impl DocEdit for FileDoc<'_> {
    fn current(&mut self) -> Result<Option<String>> {
        Ok(None)
    }

    fn save(self: Box<Self>, body: &str) -> Result<()> {
        write_atomic(&self.path, body.as_bytes())
    }
}

impl Log for FileLog {
    fn begin(&self) -> Result<Box<dyn Commit + '_>> {
        Ok(Box::new(self))
    }

    fn load_doc(&self, _name: &str) -> Result<Option<String>> {
        Ok(None)
    }

    fn save_uses(
        &self,
        totals: &BTreeMap<String, u64>,
        _added: &BTreeMap<String, u64>,
    ) -> Result<Option<BTreeMap<String, u64>>> {
        write_atomic(&self.dir.join(USAGE_FILE), &pretty(totals)?)?;
        Ok(None)
    }

    fn load_uses(&self) -> Result<Option<BTreeMap<String, u64>>> {
        Ok(None)
    }

    fn begin_doc(&self, name: &str) -> Result<Box<dyn DocEdit + '_>> {
        Ok(Box::new(FileDoc {
            path: self.dir.join(name),
            _log: self,
        }))
    }

    fn after(&self, _version: u64) -> Result<Vec<Version>> {
        Ok(vec![])
    }

    fn save_settings(&self, s: &Settings) -> Result<()> {
        write_atomic(&self.dir.join(SETTINGS_FILE), &pretty(s)?)
    }

    fn newer_settings(&self) -> Result<Option<Settings>> {
        Ok(None)
    }

    fn generation(&self) -> i64 {
        0
    }

    fn settings_rev(&self) -> i64 {
        0
    }
}

/// What a log's bytes replay to: its versions, and how many bytes of it are sound.
pub(super) struct Replay {
    pub versions: Vec<Version>,
    pub good_len: usize,
}

/// Replays a log from its bytes. Lines are found as bytes, not text, so that a torn last line
/// is recognised whatever it was cut in the middle of (a multi-byte character included).
/// Only the last line may be unreadable or unfinished, since only the last write can have been
/// cut off; any other bad line is damage, reported by its 1-based number.
pub(super) fn replay(bytes: &[u8]) -> std::result::Result<Replay, usize> {
    let mut versions = Vec::new();
    let mut good_len = 0;
    let mut rest = bytes;
    let mut lineno = 0;
    while !rest.is_empty() {
        lineno += 1;
        let (line, complete, next) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], true, &rest[i + 1..]),
            None => (rest, false, &rest[rest.len()..]),
        };
        match serde_json::from_slice::<Version>(line) {
            Ok(v) if complete => {
                good_len += line.len() + 1;
                versions.push(v);
            }
            _ if next.is_empty() => break,
            _ => return Err(lineno),
        }
        rest = next;
    }
    Ok(Replay { versions, good_len })
}

/// Libraries as rows in PostgreSQL, shared by every replica; each replica keeps only what it
/// derives in its local directory.
pub struct Postgres {
    db: Db,
}

impl Postgres {
    pub fn new(db: Db) -> Self {
        Postgres { db }
    }
}

/// The local directory of a library as this replica derives it: emptied when it was derived
/// from another creation of the name (an index tagged with the same version number would
/// otherwise pass for current).
fn prepare_local(dir: &Path, generation: i64) -> Result<()> {
    let marker = dir.join(".generation");
    let current = std::fs::read_to_string(&marker)
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok());
    if current != Some(generation) {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        write_atomic(&marker, generation.to_string().as_bytes())?;
    }
    Ok(())
}

fn parse_version(record: &str, name: &str) -> Result<Version> {
    serde_json::from_str(record).map_err(|e| {
        Error::internal(format!(
            "library '{name}': a stored version is damaged: {e}"
        ))
    })
}

fn parse_settings(text: &str, name: &str, max_top_k: usize) -> Result<Settings> {
    let s = serde_json::from_str(text)
        .map_err(|e| Error::internal(format!("library '{name}': stored settings: {e}")))?;
    Ok(clamp_settings(s, name, max_top_k))
}

impl Postgres {
    /// One transaction: the library row, every version, its proposals and counts, announced
    /// once; the new library's generation.
    fn insert(&self, name: &str, library: &Exported) -> Result<i64> {
        let settings = serde_json::to_string(&library.settings).map_err(Error::internal)?;
        let records = library
            .versions
            .iter()
            .map(|v| serde_json::to_string(v).map(|r| (v.version as i64, r)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(Error::internal)?;
        let pool = self.db.pool();
        let done = block(async {
            let mut tx = pool.begin().await?;
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO libraries (name, settings) VALUES ($1, $2) RETURNING id",
            )
            .bind(name)
            .bind(&settings)
            .fetch_one(&mut *tx)
            .await?;
            for (version, record) in &records {
                sqlx::query("INSERT INTO versions (library, version, record) VALUES ($1, $2, $3)")
                    .bind(id)
                    .bind(version)
                    .bind(record)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(p) = &library.proposals {
                sqlx::query(
                    "INSERT INTO library_documents (library, name, body) VALUES ($1, $2, $3)",
                )
                .bind(id)
                .bind(PROPOSALS)
                .bind(p)
                .execute(&mut *tx)
                .await?;
            }
            let ids: Vec<&str> = library.uses.keys().map(String::as_str).collect();
            let counts: Vec<i64> = library
                .uses
                .values()
                .map(|&n| n.min(i64::MAX as u64) as i64)
                .collect();
            sqlx::query(
                "INSERT INTO experience_uses (library, experience, uses) \
                 SELECT $1, e, n FROM unnest($2::text[], $3::bigint[]) AS t (e, n)",
            )
            .bind(id)
            .bind(&ids)
            .bind(&counts)
            .execute(&mut *tx)
            .await?;
            notify(&mut tx, name).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(id)
        });
        match done {
            Ok(id) => Ok(id),
            Err(e) if db::taken(&e) => {
                Err(Error::Conflict(format!("library '{name}' already exists")))
            }
            Err(e) => Err(db::failed(e)),
        }
    }

    /// A library's generation, settings (as stored) and revision, and every version.
    fn read(&self, name: &str) -> Result<(i64, String, i64, Vec<Version>)> {
        let pool = self.db.pool();
        let (row, records) = block(async {
            let row: Option<(i64, String, i64)> =
                sqlx::query_as("SELECT id, settings, settings_rev FROM libraries WHERE name = $1")
                    .bind(name)
                    .fetch_optional(pool)
                    .await?;
            let Some(row) = row else {
                return Ok((None, vec![]));
            };
            let records: Vec<String> = sqlx::query_scalar(
                "SELECT record FROM versions WHERE library = $1 ORDER BY version",
            )
            .bind(row.0)
            .fetch_all(pool)
            .await?;
            Ok::<_, sqlx::Error>((Some(row), records))
        })
        .map_err(db::failed)?;
        let (generation, settings, rev) =
            row.ok_or_else(|| Error::not_found(format!("no library named '{name}'"), "library"))?;
        let versions = records
            .iter()
            .map(|r| parse_version(r, name))
            .collect::<Result<Vec<_>>>()?;
        Ok((generation, settings, rev, versions))
    }
}

impl Backing for Postgres {
    fn names(&self, _store_dir: &Path) -> Result<Vec<String>> {
        block(
            sqlx::query_scalar::<_, String>("SELECT name FROM libraries ORDER BY name")
                .fetch_all(self.db.pool()),
        )
        .map_err(db::failed)
    }

    fn open(&self, dir: &Path, name: &str, max_top_k: usize) -> Result<Opened> {
        let (generation, settings, rev, versions) = self.read(name)?;
        prepare_local(dir, generation)?;
        Ok(Opened {
            versions,
            settings: parse_settings(&settings, name, max_top_k)?,
            log: Box::new(PgLog {
                db: self.db.clone(),
                name: name.to_owned(),
                generation,
                settings_rev: AtomicI64::new(rev),
                max_top_k,
            }),
        })
    }

    fn export(&self, _dir: &Path, name: &str) -> Result<Exported> {
        let (generation, settings, _, versions) = self.read(name)?;
        let pool = self.db.pool();
        let (proposals, uses) = block(async {
            let proposals = document(pool, generation, PROPOSALS).await?;
            let uses: Vec<(String, i64)> =
                sqlx::query_as("SELECT experience, uses FROM experience_uses WHERE library = $1")
                    .bind(generation)
                    .fetch_all(pool)
                    .await?;
            Ok::<_, sqlx::Error>((proposals, uses))
        })
        .map_err(db::failed)?;
        Ok(Exported {
            settings: parse_settings(&settings, name, usize::MAX)?,
            versions,
            proposals,
            uses: uses
                .into_iter()
                .map(|(e, n)| (e, n.max(0) as u64))
                .collect(),
        })
    }

    fn import(&self, _dir: &Path, name: &str, library: &Exported) -> Result<()> {
        self.insert(name, library).map(|_| ())
    }

    fn create(&self, dir: &Path, name: &str, max_top_k: usize) -> Result<Opened> {
        let first = created();
        let settings = Settings::default();
        let generation = self.insert(
            name,
            &Exported {
                settings: settings.clone(),
                versions: vec![first.clone()],
                proposals: None,
                uses: BTreeMap::new(),
            },
        )?;
        prepare_local(dir, generation)?;
        Ok(Opened {
            versions: vec![first],
            settings,
            log: Box::new(PgLog {
                db: self.db.clone(),
                name: name.to_owned(),
                generation,
                settings_rev: AtomicI64::new(0),
                max_top_k,
            }),
        })
    }

    fn delete(&self, dir: &Path, name: &str) -> Result<()> {
        let pool = self.db.pool();
        block(async {
            let mut tx = pool.begin().await?;
            sqlx::query("DELETE FROM libraries WHERE name = $1")
                .bind(name)
                .execute(&mut *tx)
                .await?;
            notify(&mut tx, name).await?;
            tx.commit().await
        })
        .map_err(db::failed)?;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    fn shared(&self) -> bool {
        true
    }

    fn heads(&self, name: Option<&str>) -> Result<Vec<Head>> {
        let rows: Vec<(String, i64, i64, i64)> = block(
            sqlx::query_as(
                "SELECT l.name, l.id, l.settings_rev, max(v.version) \
                 FROM libraries l JOIN versions v ON v.library = l.id \
                 WHERE $1::text IS NULL OR l.name = $1 GROUP BY l.id",
            )
            .bind(name)
            .fetch_all(self.db.pool()),
        )
        .map_err(db::failed)?;
        Ok(rows
            .into_iter()
            .map(|(name, generation, settings_rev, version)| Head {
                name,
                generation,
                version: version as u64,
                settings_rev,
            })
            .collect())
    }
}

/// The versions of library `generation` after `version`, as stored.
async fn versions_after<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    generation: i64,
    version: u64,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT record FROM versions WHERE library = $1 AND version > $2 ORDER BY version",
    )
    .bind(generation)
    .bind(version as i64)
    .fetch_all(ex)
    .await
}

/// The library's document `name`, if it has one.
async fn document<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    generation: i64,
    name: &str,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar("SELECT body FROM library_documents WHERE library = $1 AND name = $2")
        .bind(generation)
        .bind(name)
        .fetch_optional(ex)
        .await
}

/// A transaction holding the advisory lock `key` until it ends.
async fn locked(
    pool: &sqlx::PgPool,
    key: i64,
) -> sqlx::Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// Tells every replica, when the transaction commits, that `name` changed.
async fn notify(tx: &mut sqlx::PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(db::CHANNEL)
        .bind(name)
        .execute(tx)
        .await
        .map(|_| ())
}

/// A commit in PostgreSQL: the transaction that holds the library's lock.
struct PgCommit<'a> {
    log: &'a PgLog,
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
}

impl Commit for PgCommit<'_> {
    fn after(&mut self, version: u64) -> Result<Vec<Version>> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| Error::internal("commit ended"))?;
        let records =
            block(versions_after(&mut **tx, self.log.generation, version)).map_err(db::failed)?;
        records
            .iter()
            .map(|r| parse_version(r, &self.log.name))
            .collect()
    }

    /// Inserts the version's row and announces it; the key (library, version) would refuse a
    /// second writer of the same number, which the lock already keeps out.
    fn append(mut self: Box<Self>, v: &Version) -> Result<()> {
        let record = serde_json::to_string(v).map_err(Error::internal)?;
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| Error::internal("commit ended"))?;
        let done = block(async {
            sqlx::query("INSERT INTO versions (library, version, record) VALUES ($1, $2, $3)")
                .bind(self.log.generation)
                .bind(v.version as i64)
                .bind(&record)
                .execute(&mut *tx)
                .await?;
            notify(&mut tx, &self.log.name).await?;
            tx.commit().await
        });
        match done {
            Ok(()) => Ok(()),
            // The library row is gone: the foreign key refuses the version.
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23503") => {
                Err(self.log.gone())
            }
            Err(e) => Err(db::failed(e)),
        }
    }
}

/// Ends an unfinished commit at once, so that its lock is not held until the connection is
/// next used.
impl Drop for PgCommit<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = block(tx.rollback());
        }
    }
}

/// A document's read-modify-write in PostgreSQL: the transaction holding its lock.
struct PgDoc<'a> {
    log: &'a PgLog,
    name: String,
    tx: Option<sqlx::Transaction<'static, sqlx::Postgres>>,
}

impl DocEdit for PgDoc<'_> {
    fn current(&mut self) -> Result<Option<String>> {
        let tx = self
            .tx
            .as_mut()
            .ok_or_else(|| Error::internal("edit ended"))?;
        block(document(&mut **tx, self.log.generation, &self.name)).map_err(db::failed)
    }

    fn save(mut self: Box<Self>, body: &str) -> Result<()> {
        let mut tx = self
            .tx
            .take()
            .ok_or_else(|| Error::internal("edit ended"))?;
        block(async {
            sqlx::query(
                "INSERT INTO library_documents (library, name, body) VALUES ($1, $2, $3) \
                 ON CONFLICT (library, name) DO UPDATE SET body = $3",
            )
            .bind(self.log.generation)
            .bind(&self.name)
            .bind(body)
            .execute(&mut *tx)
            .await?;
            notify(&mut tx, &self.log.name).await?;
            tx.commit().await
        })
        .map_err(db::failed)
    }
}

impl Drop for PgDoc<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = block(tx.rollback());
        }
    }
}

struct PgLog {
    db: Db,
    name: String,
    generation: i64,
    /// The settings revision this replica last read or wrote.
    settings_rev: AtomicI64,
    max_top_k: usize,
}

impl PgLog {
    fn gone(&self) -> Error {
        Error::not_found(format!("library '{}' was deleted", self.name), "library")
    }
}

impl Log for PgLog {
    /// A transaction holding the library's advisory lock: PostgreSQL queues its waiters in
    /// order, so replicas committing at once take turns rather than racing (a writer that lost
    /// races to a replica already up to date could lose them all).
    fn begin(&self) -> Result<Box<dyn Commit + '_>> {
        let tx =
            block(locked(self.db.pool(), self.generation.wrapping_mul(2))).map_err(db::failed)?;
        Ok(Box::new(PgCommit {
            log: self,
            tx: Some(tx),
        }))
    }

    /// One statement adds every count; then the sums are read back.
    fn save_uses(
        &self,
        _totals: &BTreeMap<String, u64>,
        added: &BTreeMap<String, u64>,
    ) -> Result<Option<BTreeMap<String, u64>>> {
        let ids: Vec<&str> = added.keys().map(String::as_str).collect();
        let counts: Vec<i64> = added
            .values()
            .map(|&n| n.min(i64::MAX as u64) as i64)
            .collect();
        block(
            sqlx::query(
                "INSERT INTO experience_uses (library, experience, uses) \
                 SELECT $1, e, n FROM unnest($2::text[], $3::bigint[]) AS t (e, n) \
                 ON CONFLICT (library, experience) \
                 DO UPDATE SET uses = experience_uses.uses + EXCLUDED.uses",
            )
            .bind(self.generation)
            .bind(&ids)
            .bind(&counts)
            .execute(self.db.pool()),
        )
        .map_err(db::failed)?;
        self.load_uses()
    }

    fn load_uses(&self) -> Result<Option<BTreeMap<String, u64>>> {
        let rows: Vec<(String, i64)> = block(
            sqlx::query_as("SELECT experience, uses FROM experience_uses WHERE library = $1")
                .bind(self.generation)
                .fetch_all(self.db.pool()),
        )
        .map_err(db::failed)?;
        Ok(Some(
            rows.into_iter()
                .map(|(e, n)| (e, n.max(0) as u64))
                .collect(),
        ))
    }

    fn load_doc(&self, name: &str) -> Result<Option<String>> {
        block(document(self.db.pool(), self.generation, name)).map_err(db::failed)
    }

    /// A transaction holding the library's document lock (another key than its commit
    /// lock: an approval holds this one while it commits).
    fn begin_doc(&self, name: &str) -> Result<Box<dyn DocEdit + '_>> {
        let tx = block(locked(
            self.db.pool(),
            self.generation.wrapping_mul(2).wrapping_add(1),
        ))
        .map_err(db::failed)?;
        Ok(Box::new(PgDoc {
            log: self,
            name: name.to_owned(),
            tx: Some(tx),
        }))
    }

    fn after(&self, version: u64) -> Result<Vec<Version>> {
        let records =
            block(versions_after(self.db.pool(), self.generation, version)).map_err(db::failed)?;
        records
            .iter()
            .map(|r| parse_version(r, &self.name))
            .collect()
    }

    fn save_settings(&self, s: &Settings) -> Result<()> {
        let text = serde_json::to_string(s).map_err(Error::internal)?;
        let pool = self.db.pool();
        let rev: Option<i64> = block(async {
            let mut tx = pool.begin().await?;
            let rev = sqlx::query_scalar(
                "UPDATE libraries SET settings = $2, settings_rev = settings_rev + 1 \
                 WHERE id = $1 RETURNING settings_rev",
            )
            .bind(self.generation)
            .bind(&text)
            .fetch_optional(&mut *tx)
            .await?;
            notify(&mut tx, &self.name).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(rev)
        })
        .map_err(db::failed)?;
        let rev = rev.ok_or_else(|| self.gone())?;
        self.settings_rev.fetch_max(rev, Ordering::SeqCst);
        Ok(())
    }

    fn newer_settings(&self) -> Result<Option<Settings>> {
        let row: Option<(String, i64)> = block(
            sqlx::query_as("SELECT settings, settings_rev FROM libraries WHERE id = $1")
                .bind(self.generation)
                .fetch_optional(self.db.pool()),
        )
        .map_err(db::failed)?;
        let (text, rev) = row.ok_or_else(|| self.gone())?;
        if rev <= self.settings_rev.load(Ordering::SeqCst) {
            return Ok(None);
        }
        self.settings_rev.fetch_max(rev, Ordering::SeqCst);
        parse_settings(&text, &self.name, self.max_top_k).map(Some)
    }

    fn generation(&self) -> i64 {
        self.generation
    }

    fn settings_rev(&self) -> i64 {
        self.settings_rev.load(Ordering::SeqCst)
    }
}
