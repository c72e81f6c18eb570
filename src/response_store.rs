//! Stored Responses API objects, so that `previous_response_id` can continue a conversation
//! and `GET`/`DELETE /v1/responses/{id}` find it.
//!
//! One JSON file per response in a directory (by default `.responses/` inside the experience
//! directory, where no library name can be), written as every stored file is
//! (`experience::write_atomic`: a temporary file, synced, renamed), so that a crash leaves the
//! old state or the new, never half a file. What is kept is bounded by count,
//! total size and age (`[responses]`); the oldest go first. Each record holds the response as
//! the client saw it and the whole conversation up to it, so that a continuation needs one read
//! and keeps every function-call item of every earlier turn.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde_json::Value;

use crate::error::{Error, Result};

/// What `[responses]` bounds.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResponsesConfig {
    /// Most responses kept; past it the oldest is removed.
    pub max_stored: usize,
    /// Most bytes all kept responses may take together.
    pub max_total_bytes: u64,
    /// Responses older than this are removed, in days.
    pub max_age_days: u64,
    /// Most bytes one stored response (its conversation included) may take; a turn that would
    /// store more is refused before it runs.
    pub max_record_bytes: u64,
}

impl Default for ResponsesConfig {
    fn default() -> Self {
        ResponsesConfig {
            max_stored: 10_000,
            max_total_bytes: 1 << 30,
            max_age_days: 30,
            max_record_bytes: 16 << 20,
        }
    }
}

/// Stored responses for `previous_response_id`: one file each, bounded by count, total bytes
/// and age; the oldest go first.
pub struct ResponseStore {
    dir: PathBuf,
    config: ResponsesConfig,
    /// Set when responses are kept in PostgreSQL, shared by every replica, instead of files.
    db: Option<crate::db::Db>,
    /// Kept responses by age: (written, in ns since the epoch; id) -> size in bytes.
    index: Mutex<BTreeMap<(u64, String), u64>>,
}

/// Only ids this server makes name files: `resp_` and 32 hex digits.
pub fn valid_id(id: &str) -> bool {
    id.strip_prefix("resp_")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Nanoseconds since the epoch: fine enough that responses written in one second keep their
/// order.
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl ResponseStore {
    /// Opens (creating) the directory and indexes what it holds; temporary files of writes cut
    /// off by a crash are removed.
    pub fn open(dir: &Path, config: ResponsesConfig) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut index = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json").filter(|id| valid_id(id)) else {
                // A write cut off by a crash leaves write_atomic's temporary file.
                if name.starts_with('.') && name.contains(".tmp-") {
                    let _ = std::fs::remove_file(entry.path());
                }
                continue;
            };
            let meta = entry.metadata()?;
            let created = meta.modified().map_or(0, nanos);
            index.insert((created, id.to_owned()), meta.len());
        }
        let store = ResponseStore {
            dir: dir.to_owned(),
            config,
            db: None,
            index: Mutex::new(index),
        };
        store.prune(None)?;
        Ok(store)
    }

    /// Keeps responses in the shared database, with the same bounds.
    pub fn shared(db: crate::db::Db, config: ResponsesConfig) -> Result<Self> {
        let store = ResponseStore {
            dir: PathBuf::new(),
            config,
            db: Some(db),
            index: Mutex::new(BTreeMap::new()),
        };
        store.prune(None)?;
        Ok(store)
    }

    /// The most bytes one record may take (`responses.max_record_bytes`).
    pub fn max_record_bytes(&self) -> u64 {
        self.config.max_record_bytes
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Keeps a record, then removes the oldest until the bounds hold again.
    pub fn put(&self, id: &str, record: &Value) -> Result<()> {
        if !valid_id(id) {
            return Err(Error::Internal(format!("not a response id: {id}")));
        }
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Internal(e.to_string()))?;
        if bytes.len() as u64 > self.config.max_record_bytes {
            return Err(Error::invalid(
                format!(
                    "the response and its conversation are {} bytes, more than a stored \
                     response may hold ({}); send store: false",
                    bytes.len(),
                    self.config.max_record_bytes
                ),
                "store",
            ));
        }
        if let Some(db) = &self.db {
            let text = String::from_utf8(bytes).map_err(Error::internal)?;
            shared::put(db, id, &text)?;
            return self.prune(Some(id));
        }
        crate::experience::write_atomic(&self.path(id), &bytes)?;
        self.index.lock().insert(
            (nanos(SystemTime::now()), id.to_owned()),
            bytes.len() as u64,
        );
        self.prune(Some(id))
    }

    /// Removes what is past the age, count or size bound, oldest first; never `keep`, the
    /// record just written.
    fn prune(&self, keep: Option<&str>) -> Result<()> {
        if let Some(db) = &self.db {
            return shared::prune(db, &self.config, keep);
        }
        let age = Duration::from_secs(self.config.max_age_days.saturating_mul(86_400));
        let oldest_allowed = nanos(SystemTime::now()).saturating_sub(age.as_nanos() as u64);
        let mut index = self.index.lock();
        let mut total: u64 = index.values().sum();
        let mut gone = Vec::new();
        for ((created, id), size) in index.iter() {
            let over = index.len() - gone.len() > self.config.max_stored
                || total > self.config.max_total_bytes
                || *created < oldest_allowed;
            if !over {
                break;
            }
            if Some(id.as_str()) == keep {
                continue;
            }
            total -= size;
            gone.push((*created, id.clone()));
        }
        for key in gone {
            index.remove(&key);
            match std::fs::remove_file(self.path(&key.1)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The record of `id`, if it is kept and not past its age.
    pub fn get(&self, id: &str) -> Result<Option<Value>> {
        if !valid_id(id) {
            return Ok(None);
        }
        if let Some(db) = &self.db {
            return match shared::get(db, id, self.config.max_age_days)? {
                Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                    Error::Internal(format!("stored response {id} is unreadable: {e}"))
                }),
                None => Ok(None),
            };
        }
        self.prune(None)?;
        match std::fs::read(self.path(id)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Internal(format!("stored response {id} is unreadable: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every kept record: its id, when it was written, and its JSON text (for copying a store).
    pub fn dump(&self) -> Result<Vec<(String, chrono::DateTime<chrono::Utc>, String)>> {
        if let Some(db) = &self.db {
            return shared::dump(db);
        }
        let kept: Vec<(u64, String)> = self.index.lock().keys().cloned().collect();
        let mut out = Vec::new();
        for (at, id) in kept {
            match std::fs::read_to_string(self.path(&id)) {
                Ok(text) => out.push((id, chrono::DateTime::from_timestamp_nanos(at as i64), text)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Keeps a record as it was, with the time it was first written (for copying a store).
    pub fn restore(&self, id: &str, at: chrono::DateTime<chrono::Utc>, text: &str) -> Result<()> {
        if !valid_id(id) {
            return Err(Error::Internal(format!("not a response id: {id}")));
        }
        if let Some(db) = &self.db {
            return shared::restore(db, id, at, text);
        }
        crate::experience::write_atomic(&self.path(id), text.as_bytes())?;
        std::fs::File::options()
            .write(true)
            .open(self.path(id))?
            .set_modified(at.into())?;
        let nanos = at.timestamp_nanos_opt().unwrap_or(0).max(0) as u64;
        self.index
            .lock()
            .insert((nanos, id.to_owned()), text.len() as u64);
        Ok(())
    }

    /// Removes `id`; false when it was not kept.
    pub fn delete(&self, id: &str) -> Result<bool> {
        if !valid_id(id) {
            return Ok(false);
        }
        if let Some(db) = &self.db {
            return shared::delete(db, id);
        }
        self.index.lock().retain(|(_, k), _| k != id);
        match std::fs::remove_file(self.path(id)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

/// The same records as rows of `responses`, shared by every replica.
mod shared {
    use chrono::{DateTime, Utc};

    use crate::db::{block, failed, Db};
    use crate::error::Result;

    use super::ResponsesConfig;

    pub fn put(db: &Db, id: &str, record: &str) -> Result<()> {
        block(
            sqlx::query("INSERT INTO responses (id, record, bytes) VALUES ($1, $2, $3)")
                .bind(id)
                .bind(record)
                .bind(record.len() as i64)
                .execute(db.pool()),
        )
        .map(|_| ())
        .map_err(failed)
    }

    /// A record younger than the age bound.
    pub fn get(db: &Db, id: &str, max_age_days: u64) -> Result<Option<String>> {
        block(
            sqlx::query_scalar(
                "SELECT record FROM responses WHERE id = $1 \
                 AND created_at > now() - make_interval(days => $2)",
            )
            .bind(id)
            .bind(max_age_days.min(i32::MAX as u64) as i32)
            .fetch_optional(db.pool()),
        )
        .map_err(failed)
    }

    pub fn dump(db: &Db) -> Result<Vec<(String, DateTime<Utc>, String)>> {
        block(
            sqlx::query_as("SELECT id, created_at, record FROM responses ORDER BY created_at, id")
                .fetch_all(db.pool()),
        )
        .map_err(failed)
    }

    pub fn restore(db: &Db, id: &str, at: DateTime<Utc>, record: &str) -> Result<()> {
        block(
            sqlx::query(
                "INSERT INTO responses (id, record, bytes, created_at) VALUES ($1, $2, $3, $4)",
            )
            .bind(id)
            .bind(record)
            .bind(record.len() as i64)
            .bind(at)
            .execute(db.pool()),
        )
        .map(|_| ())
        .map_err(failed)
    }

    pub fn delete(db: &Db, id: &str) -> Result<bool> {
        block(
            sqlx::query("DELETE FROM responses WHERE id = $1")
                .bind(id)
                .execute(db.pool()),
        )
        .map(|r| r.rows_affected() > 0)
        .map_err(failed)
    }

    /// Removes what is past the age, count or size bound, newest kept first, never `keep`.
    /// The running totals come from one pass over the age index.
    pub fn prune(db: &Db, c: &ResponsesConfig, keep: Option<&str>) -> Result<()> {
        block(
            sqlx::query(
                "DELETE FROM responses WHERE id IN ( \
                   SELECT id FROM ( \
                     SELECT id, created_at, \
                       row_number() OVER w AS n, sum(bytes) OVER w AS total \
                     FROM responses WINDOW w AS (ORDER BY created_at DESC, id DESC) \
                   ) r \
                   WHERE (r.n > $1 OR r.total > $2 \
                          OR r.created_at < now() - make_interval(days => $3)) \
                     AND r.id IS DISTINCT FROM $4)",
            )
            .bind(c.max_stored.min(i64::MAX as usize) as i64)
            .bind(c.max_total_bytes.min(i64::MAX as u64) as i64)
            .bind(c.max_age_days.min(i32::MAX as u64) as i32)
            .bind(keep)
            .execute(db.pool()),
        )
        .map(|_| ())
        .map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(i: u32) -> String {
        format!("resp_{i:032x}")
    }

    #[test]
    fn records_are_kept_found_deleted_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let config = ResponsesConfig {
            max_stored: 3,
            ..Default::default()
        };
        let store = ResponseStore::open(dir.path(), config.clone()).unwrap();
        for i in 0..5 {
            store.put(&id(i), &json!({"n": i})).unwrap();
        }
        // Only the newest three are kept.
        let kept: Vec<bool> = (0..5)
            .map(|i| store.get(&id(i)).unwrap().is_some())
            .collect();
        assert_eq!(kept, [false, false, true, true, true]);
        assert_eq!(store.get(&id(4)).unwrap(), Some(json!({"n": 4})));
        assert!(store.delete(&id(4)).unwrap());
        assert!(!store.delete(&id(4)).unwrap());
        assert_eq!(store.get(&id(4)).unwrap(), None);
        // Ids that name no response, or a path, find nothing.
        for bad in ["../x", "resp_zz", "resp_", &format!("{}/", id(3))] {
            assert_eq!(store.get(bad).unwrap(), None);
            assert!(store.put(bad, &json!({})).is_err());
        }
        // Reopened, the index is rebuilt from the files and a torn temporary file is removed.
        let torn = dir.path().join(format!(".{}.json.tmp-7", id(9)));
        std::fs::write(&torn, b"{").unwrap();
        let again = ResponseStore::open(dir.path(), config).unwrap();
        assert_eq!(again.get(&id(3)).unwrap(), Some(json!({"n": 3})));
        assert!(!torn.exists());
    }

    #[test]
    fn the_size_bound_removes_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ResponseStore::open(
            dir.path(),
            ResponsesConfig {
                max_total_bytes: 100,
                ..Default::default()
            },
        )
        .unwrap();
        let big = json!({"text": "x".repeat(60)});
        store.put(&id(1), &big).unwrap();
        store.put(&id(2), &big).unwrap();
        assert!(store.get(&id(1)).unwrap().is_none());
        assert!(store.get(&id(2)).unwrap().is_some(), "the newest is kept");
    }
}
