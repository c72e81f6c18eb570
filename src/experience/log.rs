//! The log's own types and the one way files are written: what a version records (its ops, and
//! the review or gate decision behind it), a change as callers ask for it, and atomic writes.
//! Both the library (which replays and appends the log) and the proposals (which become
//! versions when approved) depend on this module, and neither on the other's internals.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Experience, Provenance, Source};
use crate::error::{Error, Result};

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
    /// The experience the operation is about.
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
    /// Set when the version carries reviewed proposals: which ones, and who approved them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<Review>,
    /// Set when a learning gate let the version go live: its decision and the measurement
    /// behind it, as learning recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<serde_json::Value>,
}

/// What an approved version records of its review: which proposals it carries and who
/// decided, so that the log alone says why the version exists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reviewer: Option<String>,
    pub proposals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edited: Vec<String>,
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

/// fsyncs a directory, so that a rename or a new file in it survives a power cut.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}
