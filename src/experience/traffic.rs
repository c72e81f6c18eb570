//! Recorded traffic and the feedback people give on it: the raw material for learning a
//! library from what it actually serves.
//!
//! Each library that records (its `record` setting, or `[traffic] record_all`) gets a folder in
//! `.traffic/` inside the experience directory, where no library name can be: `records.jsonl`
//! holds one served completion per line (its response id, model, messages, answer, the
//! experiences used and the time) and `feedback.jsonl` the feedback on them. Both are
//! append-only journals, each bounded: when one passes half of `max_bytes` it becomes
//! `*.old.jsonl` (the previous old one is dropped), so a library's traffic never takes more than
//! `max_bytes` on disk, and lines older than `max_age_days` are not read. A torn last line (a
//! crash mid-write) is skipped. This is user data: docs/learning.md says how to turn recording off and
//! purge it (`DELETE /v1/libraries/{name}/traffic`).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `[traffic]` in the configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficConfig {
    /// Record every completion served with a library, whatever the library's own setting.
    pub record_all: bool,
    /// Most bytes one library's records and feedback may take on disk together.
    pub max_bytes: u64,
    /// Records and feedback older than this are dropped, in days.
    pub max_age_days: u64,
    /// Most feedback one key may give in a minute; past it, 429.
    pub feedback_per_minute: u32,
}

impl Default for TrafficConfig {
    fn default() -> Self {
        TrafficConfig {
            record_all: false,
            max_bytes: 64 << 20,
            max_age_days: 30,
            feedback_per_minute: 30,
        }
    }
}

/// One served completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// The id the client saw (`chatcmpl-...` or `resp_...`).
    pub id: String,
    pub created: DateTime<Utc>,
    pub library: String,
    pub model: String,
    /// `chat.completions` or `responses`.
    pub api: String,
    /// The conversation as the client sent it: `{"role", "content"}` objects.
    pub messages: Vec<serde_json::Value>,
    /// The first choice's text (or its tool calls, as JSON).
    pub answer: String,
    /// The experiences injected.
    pub experiences: Vec<String>,
    /// The key that asked (its digest's tag); only that key, or an admin, gives feedback on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The library version that served the experiences (absent in records made before
    /// versions were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The live trial and arm that served it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<super::canary::CanaryArm>,
}

/// What the traffic index keeps of a record: enough to check who may rate it and to credit
/// the feedback, without reading the journal.
#[derive(Debug, Clone)]
struct Kept {
    library: String,
    owner: Option<String>,
    attribution: Option<super::Attribution>,
    /// Whether it has feedback already: only the first counts towards credit and trials, so
    /// that rating one answer again and again moves neither.
    rated: bool,
}

impl Kept {
    fn of(r: &Record) -> Kept {
        Kept {
            library: r.library.clone(),
            owner: r.owner.clone(),
            attribution: r.version.map(|version| super::Attribution {
                experiences: r.experiences.clone(),
                version,
                canary: r.canary.clone(),
            }),
            rated: false,
        }
    }
}

/// A library's kept traffic, as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct Dump {
    pub records: Vec<Record>,
    pub feedback: Vec<Feedback>,
    pub last_auto: Option<DateTime<Utc>>,
}

/// What a person said about one served completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Feedback {
    pub id: String,
    pub object: String,
    /// The completion it is about.
    pub response_id: String,
    pub library: String,
    pub created: DateTime<Utc>,
    /// 0 (wrong) to 1 (right); a label "good" is 1 and "bad" is 0.
    pub score: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// The right answer, when the person gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<String>,
    /// The key that gave it (its digest's tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Who gives feedback: the key's owner tag, and whether it is an admin's (which may rate any
/// completion).
#[derive(Debug, Clone, Default)]
pub struct Rater {
    pub owner: Option<String>,
    pub admin: bool,
}

impl Rater {
    /// One who may rate every completion (an admin key, or the CLI).
    pub fn admin() -> Rater {
        Rater {
            owner: None,
            admin: true,
        }
    }
}

/// Served completions and the feedback on them, per library, bounded and on disk.
pub struct Traffic {
    dir: PathBuf,
    config: TrafficConfig,
    /// Response id -> (library, owner), for the records kept; feedback names only the
    /// response.
    index: Mutex<HashMap<String, Kept>>,
    /// Appends to one library's journals are serialised.
    writing: Mutex<()>,
    /// Set when records and feedback are rows in the database replicas share.
    db: Option<crate::db::Db>,
}

const RECORDS: &str = "records";
const FEEDBACK: &str = "feedback";

impl Traffic {
    /// Opens (creating) the traffic folder and indexes the records it holds.
    pub fn open(dir: &Path, config: TrafficConfig) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let t = Traffic {
            dir: dir.to_owned(),
            config,
            index: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
            db: None,
        };
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if super::validate_library_name(&name).is_err() {
                continue;
            }
            let mut index = t.index.lock();
            for r in t.read::<Record>(&name, RECORDS)? {
                index.insert(r.id.clone(), Kept::of(&r));
            }
            for f in t.read::<Feedback>(&name, FEEDBACK)? {
                if let Some(k) = index.get_mut(&f.response_id) {
                    k.rated = true;
                }
            }
        }
        Ok(t)
    }

    /// Records and feedback kept in the shared database, with the same bounds.
    pub fn shared(db: crate::db::Db, config: TrafficConfig) -> Self {
        Traffic {
            dir: PathBuf::new(),
            config,
            index: Mutex::new(HashMap::new()),
            writing: Mutex::new(()),
            db: Some(db),
        }
    }

    /// The settings the log was opened with (what the auto-learning scheduler reads).
    pub fn config(&self) -> &TrafficConfig {
        &self.config
    }

    fn journal(&self, library: &str, kind: &str, old: bool) -> PathBuf {
        let suffix = if old { ".old.jsonl" } else { ".jsonl" };
        self.dir.join(library).join(format!("{kind}{suffix}"))
    }

    /// Appends one line, rotating first when the journal has passed its half of the bound.
    fn append(&self, library: &str, kind: &str, value: &impl Serialize) -> Result<()> {
        let mut line = serde_json::to_vec(value).map_err(Error::internal)?;
        line.push(b'\n');
        let _guard = self.writing.lock();
        std::fs::create_dir_all(self.dir.join(library))?;
        let path = self.journal(library, kind, false);
        let size = std::fs::metadata(&path).map_or(0, |m| m.len());
        // Records and feedback share the library's bound: a quarter each for current and old.
        if size + line.len() as u64 > self.config.max_bytes / 4 {
            if kind == RECORDS {
                // The old journal is about to be dropped: its records leave the index.
                let dropped = self.read_file::<Record>(&self.journal(library, kind, true));
                let kept: std::collections::HashSet<String> = self
                    .read_file::<Record>(&path)
                    .into_iter()
                    .map(|r| r.id)
                    .collect();
                let mut index = self.index.lock();
                for r in dropped.into_iter().filter(|r| !kept.contains(&r.id)) {
                    index.remove(&r.id);
                }
            }
            std::fs::rename(&path, self.journal(library, kind, true)).or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(&line)?;
        f.sync_data()?;
        Ok(())
    }

    fn read_file<T: serde::de::DeserializeOwned>(&self, path: &Path) -> Vec<T> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return vec![];
        };
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A journal's entries, oldest first (the old file, then the current one).
    fn read<T: serde::de::DeserializeOwned>(&self, library: &str, kind: &str) -> Result<Vec<T>> {
        let mut out = self.read_file(&self.journal(library, kind, true));
        out.extend(self.read_file(&self.journal(library, kind, false)));
        Ok(out)
    }

    fn fresh(&self, t: DateTime<Utc>) -> bool {
        let age = chrono::Duration::days(self.config.max_age_days.min(36_500) as i64);
        t >= Utc::now() - age
    }

    /// Keeps a served completion.
    pub fn record(&self, r: &Record) -> Result<()> {
        if let Some(db) = &self.db {
            return shared::record(db, &self.config, r);
        }
        self.append(&r.library, RECORDS, r)?;
        self.index.lock().insert(r.id.clone(), Kept::of(r));
        Ok(())
    }

    /// The kept records of a library, oldest first.
    pub fn records(&self, library: &str) -> Result<Vec<Record>> {
        if let Some(db) = &self.db {
            return shared::records(db, &self.config, library);
        }
        Ok(self
            .read::<Record>(library, RECORDS)?
            .into_iter()
            .filter(|r| self.fresh(r.created))
            .collect())
    }

    /// The library of a recorded completion that `rater` may rate: its own, or any for an
    /// admin. Another key's completion is not found, as one that was never recorded.
    pub fn library_of(&self, response_id: &str, rater: &Rater) -> Result<String> {
        self.kept(response_id)?
            .filter(|k| rater.admin || (rater.owner.is_some() && k.owner == rater.owner))
            .map(|k| k.library.clone())
            .ok_or_else(|| Error::NotFound {
                message: format!(
                    "no recorded completion '{response_id}': only completions served with a recording library are kept"
                ),
                param: Some("id".into()),
            })
    }

    /// What is kept of a record for rating it.
    fn kept(&self, response_id: &str) -> Result<Option<Kept>> {
        match &self.db {
            Some(db) => Ok(shared::record_of(db, response_id)?.map(|(r, rated)| Kept {
                rated,
                ..Kept::of(&r)
            })),
            None => Ok(self.index.lock().get(response_id).cloned()),
        }
    }

    /// Stores feedback on a recorded completion; `NotFound` when no record has that id, or
    /// when another key asked for it. Returns what the feedback is credited to, when it is the
    /// completion's first.
    pub fn add_feedback(
        &self,
        response_id: &str,
        rater: &Rater,
        score: f64,
        label: Option<String>,
        comment: Option<String>,
        expected: Option<String>,
    ) -> Result<(Feedback, Option<super::Attribution>)> {
        let library = self.library_of(response_id, rater)?;
        let fb = Feedback {
            id: format!("fb_{}", uuid::Uuid::new_v4().simple()),
            object: "feedback".into(),
            response_id: response_id.to_owned(),
            library: library.clone(),
            created: Utc::now(),
            score,
            label,
            comment,
            expected,
            owner: rater.owner.clone(),
        };
        if let Some(db) = &self.db {
            let first = shared::add_feedback(db, &self.config, &fb)?;
            let attribution = self.kept(response_id)?.and_then(|k| k.attribution);
            return Ok((fb, attribution.filter(|_| first)));
        }
        self.append(&library, FEEDBACK, &fb)?;
        let first = self.index.lock().get_mut(response_id).and_then(|k| {
            let first = !std::mem::replace(&mut k.rated, true);
            k.attribution.clone().filter(|_| first)
        });
        Ok((fb, first))
    }

    /// Feedback, oldest first: of one library or all, since a time.
    pub fn feedback(
        &self,
        library: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<Feedback>> {
        if let Some(db) = &self.db {
            return shared::feedback(db, &self.config, library, since);
        }
        let libraries: Vec<String> = match library {
            Some(l) => vec![l.to_owned()],
            None => {
                let mut v: Vec<String> = self
                    .index
                    .lock()
                    .values()
                    .map(|k| k.library.clone())
                    .collect();
                v.sort();
                v.dedup();
                v
            }
        };
        let mut out = Vec::new();
        for l in libraries {
            out.extend(
                self.read::<Feedback>(&l, FEEDBACK)?
                    .into_iter()
                    .filter(|f| self.fresh(f.created))
                    .filter(|f| since.is_none_or(|s| f.created > s)),
            );
        }
        out.sort_by_key(|f| f.created);
        Ok(out)
    }

    /// Each record that has feedback, with its latest feedback, oldest first.
    pub fn scored(&self, library: &str) -> Result<Vec<(Record, Feedback)>> {
        let mut latest: HashMap<String, Feedback> = HashMap::new();
        for f in self.feedback(Some(library), None)? {
            latest.insert(f.response_id.clone(), f);
        }
        Ok(self
            .records(library)?
            .into_iter()
            .filter_map(|r| latest.remove(&r.id).map(|f| (r, f)))
            .collect())
    }

    /// When the last automatic learning job from this library's traffic started.
    pub fn last_auto(&self, library: &str) -> Option<DateTime<Utc>> {
        if let Some(db) = &self.db {
            return shared::last_auto(db, library).ok().flatten();
        }
        let text = std::fs::read_to_string(self.dir.join(library).join("auto.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["started"]
            .as_str()?
            .parse()
            .ok()
    }

    /// Records when automatic learning last started for `library`: only feedback that came
    /// after it counts towards the next automatic job, across restarts too.
    pub fn set_last_auto(&self, library: &str, t: DateTime<Utc>) -> Result<()> {
        if let Some(db) = &self.db {
            return shared::set_last_auto(db, library, t);
        }
        let dir = self.dir.join(library);
        std::fs::create_dir_all(&dir)?;
        let body = serde_json::json!({"started": t.to_rfc3339()}).to_string();
        super::write_atomic(&dir.join("auto.json"), body.as_bytes())
    }

    /// The model most of a library's recorded completions were served by.
    pub fn usual_model(&self, library: &str) -> Result<Option<String>> {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for r in self.records(library)? {
            *counts.entry(r.model).or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .max_by_key(|(m, n)| (*n, m.clone()))
            .map(|(m, _)| m))
    }

    /// The libraries that have records or feedback kept.
    pub fn libraries(&self) -> Result<Vec<String>> {
        if let Some(db) = &self.db {
            return shared::libraries(db);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if super::validate_library_name(&name).is_ok() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Everything kept for a library: its records, its feedback and when automatic learning
    /// last started (for copying a store).
    pub fn dump(&self, library: &str) -> Result<Dump> {
        Ok(Dump {
            records: self.records(library)?,
            feedback: self.feedback(Some(library), None)?,
            last_auto: self.last_auto(library),
        })
    }

    /// Keeps a dump as it was: the same ids, times and feedback.
    pub fn restore(&self, library: &str, dump: &Dump) -> Result<()> {
        for r in &dump.records {
            self.record(r)?;
        }
        for f in &dump.feedback {
            match &self.db {
                Some(db) => {
                    shared::add_feedback(db, &self.config, f)?;
                }
                None => {
                    self.append(library, FEEDBACK, f)?;
                    if let Some(k) = self.index.lock().get_mut(&f.response_id) {
                        k.rated = true;
                    }
                }
            }
        }
        if let Some(t) = dump.last_auto {
            self.set_last_auto(library, t)?;
        }
        Ok(())
    }

    /// Removes everything kept for a library.
    pub fn purge(&self, library: &str) -> Result<()> {
        if let Some(db) = &self.db {
            return shared::purge(db, library);
        }
        let _guard = self.writing.lock();
        self.index.lock().retain(|_, k| k.library != library);
        match std::fs::remove_dir_all(self.dir.join(library)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The same journals as rows, shared by every replica. The bounds are the files': a library's
/// records and its feedback each keep the newest half of `max_bytes`, and nothing older than
/// `max_age_days` is read (or kept, once the next write prunes it).
mod shared {
    use chrono::{DateTime, Utc};

    use super::{Feedback, Record, TrafficConfig};
    use crate::db::{block, failed, Db};
    use crate::error::{Error, Result};

    fn days(c: &TrafficConfig) -> i32 {
        c.max_age_days.min(36_500) as i32
    }

    fn parse<T: serde::de::DeserializeOwned>(rows: Vec<String>) -> Vec<T> {
        rows.iter()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect()
    }

    /// Drops a library's rows of `table` past the byte or age bound, newest kept first.
    async fn prune(db: &Db, table: &str, c: &TrafficConfig, library: &str) -> sqlx::Result<()> {
        // `table` is one of two constants, never input.
        let sql = format!(
            "DELETE FROM {table} WHERE id IN ( \
               SELECT id FROM (SELECT id, created, \
                 sum(bytes) OVER (ORDER BY created DESC, id DESC) AS total \
                 FROM {table} WHERE library = $1) r \
               WHERE r.total > $2 OR r.created < now() - make_interval(days => $3))"
        );
        sqlx::query(&sql)
            .bind(library)
            .bind((c.max_bytes / 2).min(i64::MAX as u64) as i64)
            .bind(days(c))
            .execute(db.pool())
            .await
            .map(|_| ())
    }

    pub fn record(db: &Db, c: &TrafficConfig, r: &Record) -> Result<()> {
        let text = serde_json::to_string(r).map_err(Error::internal)?;
        block(async {
            sqlx::query(
                "INSERT INTO traffic_records (id, library, created, bytes, record) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
            )
            .bind(&r.id)
            .bind(&r.library)
            .bind(r.created)
            .bind(text.len() as i64)
            .bind(&text)
            .execute(db.pool())
            .await?;
            prune(db, "traffic_records", c, &r.library).await
        })
        .map_err(failed)
    }

    pub fn records(db: &Db, c: &TrafficConfig, library: &str) -> Result<Vec<Record>> {
        let rows = block(
            sqlx::query_scalar(
                "SELECT record FROM traffic_records WHERE library = $1 \
                 AND created >= now() - make_interval(days => $2) ORDER BY created, id",
            )
            .bind(library)
            .bind(days(c))
            .fetch_all(db.pool()),
        )
        .map_err(failed)?;
        Ok(parse(rows))
    }

    /// A record and whether it has feedback.
    pub fn record_of(db: &Db, id: &str) -> Result<Option<(Record, bool)>> {
        let row: Option<(String, bool)> = block(
            sqlx::query_as("SELECT record, rated FROM traffic_records WHERE id = $1")
                .bind(id)
                .fetch_optional(db.pool()),
        )
        .map_err(failed)?;
        Ok(row.and_then(|(r, rated)| serde_json::from_str(&r).ok().map(|r| (r, rated))))
    }

    /// Keeps the feedback; true when it is the record's first (marked in the same
    /// transaction, so that two replicas never both count one answer's first rating).
    pub fn add_feedback(db: &Db, c: &TrafficConfig, fb: &Feedback) -> Result<bool> {
        let text = serde_json::to_string(fb).map_err(Error::internal)?;
        block(async {
            let mut tx = db.pool().begin().await?;
            sqlx::query(
                "INSERT INTO traffic_feedback (id, library, created, bytes, record) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&fb.id)
            .bind(&fb.library)
            .bind(fb.created)
            .bind(text.len() as i64)
            .bind(&text)
            .execute(&mut *tx)
            .await?;
            let first =
                sqlx::query("UPDATE traffic_records SET rated = true WHERE id = $1 AND NOT rated")
                    .bind(&fb.response_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected()
                    > 0;
            tx.commit().await?;
            prune(db, "traffic_feedback", c, &fb.library).await?;
            Ok(first)
        })
        .map_err(failed)
    }

    pub fn feedback(
        db: &Db,
        c: &TrafficConfig,
        library: Option<&str>,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<Feedback>> {
        let rows = block(
            sqlx::query_scalar(
                "SELECT record FROM traffic_feedback \
                 WHERE ($1::text IS NULL OR library = $1) \
                 AND created >= now() - make_interval(days => $2) \
                 AND ($3::timestamptz IS NULL OR created > $3) ORDER BY created, id",
            )
            .bind(library)
            .bind(days(c))
            .bind(since)
            .fetch_all(db.pool()),
        )
        .map_err(failed)?;
        Ok(parse(rows))
    }

    pub fn last_auto(db: &Db, library: &str) -> Result<Option<DateTime<Utc>>> {
        block(
            sqlx::query_scalar("SELECT started FROM traffic_auto WHERE library = $1")
                .bind(library)
                .fetch_optional(db.pool()),
        )
        .map_err(failed)
    }

    pub fn set_last_auto(db: &Db, library: &str, t: DateTime<Utc>) -> Result<()> {
        block(
            sqlx::query(
                "INSERT INTO traffic_auto (library, started) VALUES ($1, $2) \
                 ON CONFLICT (library) DO UPDATE SET started = $2",
            )
            .bind(library)
            .bind(t)
            .execute(db.pool()),
        )
        .map(|_| ())
        .map_err(failed)
    }

    pub fn libraries(db: &Db) -> Result<Vec<String>> {
        block(
            sqlx::query_scalar(
                "SELECT library FROM traffic_records UNION SELECT library FROM traffic_feedback \
                 ORDER BY 1",
            )
            .fetch_all(db.pool()),
        )
        .map_err(failed)
    }

    pub fn purge(db: &Db, library: &str) -> Result<()> {
        block(async {
            let mut tx = db.pool().begin().await?;
            for table in ["traffic_records", "traffic_feedback", "traffic_auto"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE library = $1"))
                    .bind(library)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })
        .map_err(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str, library: &str) -> Record {
        Record {
            id: id.into(),
            created: Utc::now(),
            library: library.into(),
            model: "m".into(),
            api: "chat.completions".into(),
            messages: vec![json!({"role": "user", "content": "2+2?"})],
            answer: "4".into(),
            experiences: vec!["E1".into()],
            owner: Some("a".into()),
            version: Some(1),
            canary: None,
        }
    }

    #[test]
    fn feedback_finds_its_record_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = Traffic::open(dir.path(), TrafficConfig::default()).unwrap();
        t.record(&record("chatcmpl-1", "math")).unwrap();
        t.record(&record("chatcmpl-2", "math")).unwrap();
        assert!(matches!(
            t.add_feedback("chatcmpl-9", &Rater::admin(), 1.0, None, None, None),
            Err(Error::NotFound { .. })
        ));
        t.add_feedback(
            "chatcmpl-1",
            &Rater::admin(),
            0.0,
            Some("bad".into()),
            None,
            None,
        )
        .unwrap();
        t.add_feedback(
            "chatcmpl-1",
            &Rater::admin(),
            1.0,
            None,
            None,
            Some("4".into()),
        )
        .unwrap();
        // The latest feedback on each record counts; records without any are left out.
        let scored = t.scored("math").unwrap();
        assert_eq!(scored.len(), 1);
        assert_eq!(
            (scored[0].0.id.as_str(), scored[0].1.score),
            ("chatcmpl-1", 1.0)
        );
        // A torn last line is skipped, and the index is rebuilt from the files.
        let path = dir.path().join("math/records.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"{\"id\": \"chatcm").unwrap();
        let again = Traffic::open(dir.path(), TrafficConfig::default()).unwrap();
        assert_eq!(again.records("math").unwrap().len(), 2);
        assert!(again
            .add_feedback("chatcmpl-2", &Rater::admin(), 0.5, None, None, None)
            .is_ok());
        assert_eq!(again.feedback(None, None).unwrap().len(), 3);
        again.purge("math").unwrap();
        assert!(again.records("math").unwrap().is_empty());
        assert!(again
            .add_feedback("chatcmpl-2", &Rater::admin(), 0.5, None, None, None)
            .is_err());
    }

    #[test]
    fn the_journals_stay_within_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let config = TrafficConfig {
            max_bytes: 4_000,
            ..Default::default()
        };
        let t = Traffic::open(dir.path(), config).unwrap();
        for i in 0..100 {
            t.record(&record(&format!("chatcmpl-{i}"), "math")).unwrap();
        }
        let size: u64 = std::fs::read_dir(dir.path().join("math"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert!(size <= 2_000, "records take at most half the bound: {size}");
        // The newest are kept, and only kept records take feedback.
        let kept = t.records("math").unwrap();
        assert_eq!(kept.last().unwrap().id, "chatcmpl-99");
        assert!(t
            .add_feedback("chatcmpl-0", &Rater::admin(), 1.0, None, None, None)
            .is_err());
        assert!(t
            .add_feedback("chatcmpl-99", &Rater::admin(), 1.0, None, None, None)
            .is_ok());
    }

    #[test]
    fn only_the_key_that_asked_or_an_admin_rates_a_completion() {
        let dir = tempfile::tempdir().unwrap();
        let t = Traffic::open(dir.path(), TrafficConfig::default()).unwrap();
        t.record(&record("chatcmpl-1", "math")).unwrap();
        let key = |o: &str| Rater {
            owner: Some(o.into()),
            admin: false,
        };
        let nobody = Rater::default();
        for other in [key("b"), nobody] {
            assert!(matches!(
                t.add_feedback("chatcmpl-1", &other, 1.0, None, None, None),
                Err(Error::NotFound { .. })
            ));
        }
        let fb = t
            .add_feedback("chatcmpl-1", &key("a"), 1.0, None, None, None)
            .unwrap();
        assert_eq!(fb.0.owner.as_deref(), Some("a"));
        assert!(fb.1.is_some(), "the first rating credits the experiences");
        assert!(t
            .add_feedback("chatcmpl-1", &Rater::admin(), 0.0, None, None, None)
            .is_ok());
        // Reopened, the owners come back from the journal.
        let again = Traffic::open(dir.path(), TrafficConfig::default()).unwrap();
        assert!(again
            .add_feedback("chatcmpl-1", &key("b"), 1.0, None, None, None)
            .is_err());
    }
}
