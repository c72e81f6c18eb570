//! Experience libraries: named sets of short experiences that Training-Free GRPO learns and
//! people curate.
//!
//! Each library is a directory under the experience directory holding an append-only log
//! (`log.jsonl`, one version per line) and its settings (`library.json`). The log is the truth:
//! the current state and every past version are replays of it, and the full-text index
//! (`.index/`) is derived from it and rebuilt whenever it is missing or behind. A write is
//! acknowledged only after its log line is fsynced, so a crash can lose at most a write that was
//! never acknowledged, and that one only as a torn last line, which loading repairs.

pub mod backing;
pub mod canary;
mod index;
mod library;
mod log;
pub(crate) mod proposals;
mod replicas;
pub mod retrieve;
mod serving;
mod store;
pub(crate) mod traffic;
pub mod vectors;

pub use library::{Diff, Library, VersionSummary, Votes};
pub use log::{write_atomic, Change, Op, Version};
pub use serving::Credit;
pub use store::{
    lock_dir, Attribution, Chosen, Query, SearchHit, Select, Served, Store, StoreOptions,
};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where an experience came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Learned,
    Manual,
    Imported,
}

/// Why an experience exists: which learning run and step made it, or who added it by hand.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// What the learning step learned from, when it was recorded traffic: the served
    /// completions (`chatcmpl-...`, `resp_...`) and the feedback (`fb_...`) on them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
}

/// One short lesson, as libraries keep it: an id, its text and tags.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Experience {
    /// Stable across edits and never reused within a library, even after a delete.
    pub id: String,
    /// "Name: description."
    pub text: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub source: Source,
    #[serde(default)]
    pub provenance: Provenance,
    pub created: DateTime<Utc>,
    pub updated: DateTime<Utc>,
}

/// Per-library settings, in `library.json`, editable by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// How many experiences a request gets: all of them, the `top_k` most relevant to the
    /// conversation, or (`auto`, the default) all while the library is small and the most
    /// relevant past that.
    #[serde(default)]
    pub inject: Inject,
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// How experiences are ranked and how much of the prompt the prior may take.
    #[serde(default)]
    pub retrieval: retrieve::Retrieval,
    /// Experiences every request gets first, in this order, whatever it asks: the stable
    /// part of the prior, which stays one cached prefix from request to request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pinned: Vec<String>,
    /// Keep every completion served with this library, so feedback can be given on it and
    /// learned from (`.traffic/`; user data, see docs/learning.md).
    #[serde(default)]
    pub record: bool,
    /// Learn from traffic by itself once this much new feedback has arrived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_learn: Option<AutoLearn>,
    /// Hold what learning proposes as pending proposals for a person to approve or reject,
    /// instead of committing it straight away.
    #[serde(default)]
    pub review: bool,
    /// What lets a learned version go live: its measured gain over its parent (the default),
    /// a person's review, or nothing (`always`).
    #[serde(default)]
    pub promote: Promote,
    /// The gain the gate asks for, and at what confidence.
    #[serde(default)]
    pub gate: Gate,
    /// Keep out of prompts an experience whose feedback has been mostly harmful since its
    /// text was last set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_harmful: Option<SkipHarmful>,
}

/// When feedback keeps an experience out of prompts: once it has `min_votes` votes on its
/// current text and more than `ratio` of them are harmful.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipHarmful {
    pub ratio: f64,
    #[serde(default = "default_min_votes")]
    pub min_votes: u64,
}

fn default_min_votes() -> u64 {
    5
}

/// What lets a version learned by a run (CLI, job or `auto_learn`) go live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Promote {
    /// Measured against its parent on tasks it did not learn from; live only when the paired
    /// difference's lower confidence bound is above `gate.min_gain`, otherwise held as
    /// proposals with the evaluation attached.
    #[default]
    Gain,
    /// Live as soon as it is learned (what every version did before the gate).
    Always,
    /// Measured as under `gain`, then held for a person, who sees the evaluation.
    Review,
}

/// The gate's thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Gate {
    /// The least gain (accuracy, 0 to 1) the difference's lower bound must pass.
    pub min_gain: f64,
    /// The confidence of that bound.
    pub confidence: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            min_gain: 0.0,
            confidence: 0.95,
        }
    }
}

/// Continuous learning from feedback: a job (`"source": "traffic"`) starts once `after` new
/// pieces of feedback have arrived since the last one, at most one at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoLearn {
    pub after: usize,
    /// The model to learn with; the model most of the recorded traffic used when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Small, as the peers found best (ReasoningBank injects one, ACE's retriever five): each
/// lesson past the few that apply is noise a small model follows.
fn default_top_k() -> usize {
    4
}

impl Settings {
    /// Whether learning on the library goes through the gate: every `promote` but `always`.
    pub fn gated(&self) -> bool {
        self.promote != Promote::Always
    }

    /// Refuses settings a request could not be served with: `top_k` sizes the search of every
    /// request to the library.
    pub fn check(&self, max_top_k: usize) -> Result<()> {
        if self.top_k == 0 || self.top_k > max_top_k {
            return Err(Error::InvalidRequest {
                message: format!("top_k must be from 1 to {max_top_k}, got {}", self.top_k),
                param: Some("top_k".into()),
            });
        }
        self.retrieval.check("retrieval.")?;
        if self.pinned.len() > max_top_k {
            return Err(Error::invalid(
                format!("pinned may name at most {max_top_k} experiences"),
                "pinned",
            ));
        }
        if !(0.0..1.0).contains(&self.gate.min_gain) {
            return Err(Error::invalid(
                "gate.min_gain must be from 0 to below 1",
                "gate.min_gain",
            ));
        }
        if !(0.5..=0.999).contains(&self.gate.confidence) {
            return Err(Error::invalid(
                "gate.confidence must be from 0.5 to 0.999",
                "gate.confidence",
            ));
        }
        if let Some(h) = &self.skip_harmful {
            if !(0.0..1.0).contains(&h.ratio) {
                return Err(Error::invalid(
                    "skip_harmful.ratio must be from 0 to below 1",
                    "skip_harmful.ratio",
                ));
            }
            if h.min_votes == 0 {
                return Err(Error::invalid(
                    "skip_harmful.min_votes must be at least 1",
                    "skip_harmful.min_votes",
                ));
            }
        }
        if let Some(a) = &self.auto_learn {
            if a.after == 0 || a.after > 100_000 {
                return Err(Error::InvalidRequest {
                    message: "auto_learn.after must be from 1 to 100000".into(),
                    param: Some("auto_learn.after".into()),
                });
            }
        }
        Ok(())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            inject: Inject::default(),
            top_k: default_top_k(),
            retrieval: retrieve::Retrieval::default(),
            pinned: Vec::new(),
            record: false,
            auto_learn: None,
            review: false,
            promote: Promote::default(),
            gate: Gate::default(),
            skip_harmful: None,
        }
    }
}

/// How many of a library's experiences go into a prompt.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Inject {
    /// The whole library while it holds at most `retrieval.whole_up_to` experiences (one
    /// stable, cacheable prior), the `top_k` most relevant past that.
    #[default]
    Auto,
    All,
    TopK,
}

/// A library's settings as its directory under `experience_dir` holds them, read without
/// opening the store (the CLI decides before it loads anything); `None` when there is no such
/// library or its settings cannot be read.
pub fn settings_on_disk(experience_dir: &std::path::Path, name: &str) -> Option<Settings> {
    validate_library_name(name).ok()?;
    let text =
        std::fs::read_to_string(experience_dir.join(name).join(library::SETTINGS_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Library names become directory names, so they are restricted to a safe alphabet.
pub fn validate_library_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!(
                "invalid library name '{name}': use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'"
            ),
            "name",
        ))
    }
}

/// Checks an experience's text and tags before anything is stored.
pub fn validate_text(text: &str, max_chars: usize) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::invalid("text must not be empty", "text"));
    }
    if text.chars().count() > max_chars {
        return Err(Error::invalid(
            format!("text is longer than the {max_chars} characters allowed"),
            "text",
        ));
    }
    Ok(())
}

/// Refuses empty, overlong or too many tags (400 naming `tags`).
/// The most tags one experience may carry.
pub const MAX_TAGS: usize = 32;

pub fn validate_tags(tags: &[String]) -> Result<()> {
    // Each tag is a term in the index and a line in the UI; a handful says what an
    // experience is about, and 200,000 of them were once accepted on one experience.
    if tags.len() > MAX_TAGS {
        return Err(Error::invalid(
            format!(
                "an experience has at most {MAX_TAGS} tags, got {}",
                tags.len()
            ),
            "tags",
        ));
    }
    for t in tags {
        if t.is_empty() || t.len() > 64 || t.chars().any(char::is_whitespace) {
            return Err(Error::invalid(
                format!("invalid tag '{t}': tags are 1 to 64 characters without spaces"),
                "tags",
            ));
        }
    }
    Ok(())
}

/// The library in experient's own format: everything needed to recreate it elsewhere.
pub fn export(lib: &Library) -> serde_json::Value {
    serde_json::json!({
        "object": "library.export",
        "format": "experient",
        "name": lib.name,
        "version": lib.version(),
        "settings": lib.settings(),
        "experiences": lib.all(),
    })
}

/// The library in the Training-Free GRPO reference format: a flat `{"G0": "text", ...}` object.
pub fn export_grpo(lib: &Library) -> serde_json::Value {
    let map: serde_json::Map<String, serde_json::Value> = lib
        .all()
        .into_iter()
        .enumerate()
        .map(|(i, e)| (format!("G{i}"), serde_json::Value::String(e.text)))
        .collect();
    serde_json::Value::Object(map)
}

/// Reads either format into changes that add every experience. Ids are always assigned anew
/// (ids are never reused within a library); the original id is kept in the provenance note.
pub fn parse_import(body: &serde_json::Value) -> Result<Vec<Change>> {
    let bad = |m: String| Error::invalid(m, None);
    let obj = body.as_object().ok_or_else(|| {
        bad("an import is a JSON object: experient's export or {\"G0\": \"text\", ...}".into())
    })?;
    if let Some(list) = obj.get("experiences") {
        let list = list
            .as_array()
            .ok_or_else(|| bad("'experiences' must be an array".into()))?;
        return list
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let text = e.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    Error::invalid_param(
                        "each experience needs a 'text' string",
                        format!("experiences[{i}].text"),
                    )
                })?;
                let tags: Vec<String> = match e.get("tags") {
                    None | Some(serde_json::Value::Null) => vec![],
                    Some(t) => serde_json::from_value(t.clone()).map_err(|_| {
                        Error::invalid_param(
                            "tags must be a list of strings",
                            format!("experiences[{i}].tags"),
                        )
                    })?,
                };
                let mut provenance: Provenance = e
                    .get("provenance")
                    .and_then(|p| serde_json::from_value(p.clone()).ok())
                    .unwrap_or_default();
                if let Some(id) = e.get("id").and_then(|x| x.as_str()) {
                    provenance.note = Some(format!("imported; was {id}"));
                }
                Ok(Change::Add {
                    text: text.trim().to_owned(),
                    tags,
                    source: Source::Imported,
                    provenance,
                })
            })
            .collect();
    }
    obj.iter()
        .map(|(k, v)| {
            let text = v.as_str().ok_or_else(|| {
                Error::invalid_param(
                    "in the flat format every value is the text of one experience",
                    k.clone(),
                )
            })?;
            Ok(Change::Add {
                text: text.trim().to_owned(),
                tags: vec![],
                source: Source::Imported,
                provenance: Provenance {
                    note: Some(format!("imported; was {k}")),
                    ..Default::default()
                },
            })
        })
        .collect()
}
