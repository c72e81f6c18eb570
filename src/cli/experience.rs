//! `experient experience ...`: the store's operations from the command line, printing JSON.
//!
//! The CLI opens the experience directory itself, so it is refused while a server holds the
//! same directory; then the HTTP API is the way in.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::json;

use crate::experience::{self, Store, StoreOptions};

/// `experient experience ...`: the directory and the operation.
#[derive(clap::Args)]
pub struct ExperienceArgs {
    /// Directory holding the experience libraries.
    #[arg(
        long,
        env = "EXPERIENT_EXPERIENCE_DIR",
        default_value = "experience",
        global = true
    )]
    pub experience_dir: PathBuf,
    #[command(subcommand)]
    pub command: ExperienceCommand,
}

/// The store operations the CLI offers.
#[derive(Subcommand)]
pub enum ExperienceCommand {
    /// List the libraries.
    Libraries,
    /// Create an empty library.
    Create { library: String },
    /// List a library's experiences.
    List {
        library: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Full-text search (BM25) in a library.
    Search {
        library: String,
        query: String,
        #[arg(long)]
        tag: Option<String>,
        #[arg(long, default_value_t = 10)]
        limit: usize,
    },
    /// Add an experience ("Name: description.").
    Add {
        library: String,
        text: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Hold it as a proposal for review instead of committing it.
        #[arg(long)]
        review: bool,
    },
    /// Change an experience's text or tags.
    Edit {
        library: String,
        id: String,
        #[arg(long)]
        text: Option<String>,
        /// Replaces all tags; give it several times for several tags.
        #[arg(long = "tag")]
        tags: Option<Vec<String>>,
        /// Hold it as a proposal for review instead of committing it.
        #[arg(long)]
        review: bool,
    },
    /// Delete an experience.
    Rm {
        library: String,
        id: String,
        /// Hold it as a proposal for review instead of committing it.
        #[arg(long)]
        review: bool,
    },
    /// Print the library as JSON (experient's format, or the GRPO reference's flat format).
    Export {
        library: String,
        #[arg(long, default_value = "experient", value_parser = ["experient", "grpo"])]
        format: String,
    },
    /// Add the experiences of a JSON file (either format) as one new version.
    Import {
        library: String,
        file: PathBuf,
        /// Create the library first if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// List a library's versions.
    Versions { library: String },
    /// Show what changed between two versions.
    Diff {
        library: String,
        from: u64,
        to: Option<u64>,
    },
    /// Make a new version equal to an old one.
    Rollback { library: String, version: u64 },
    /// List the changes waiting for review (libraries with `review` on).
    Proposals {
        library: String,
        #[arg(long, default_value = "pending", value_parser = ["pending", "approved", "rejected", "all"])]
        status: String,
    },
    /// Approve proposals; all of them are committed together as one version.
    Approve {
        library: String,
        #[arg(required = true)]
        ids: Vec<String>,
        /// Recorded with the decision.
        #[arg(long)]
        reviewer: Option<String>,
        /// Replace the proposed text (only when approving one proposal).
        #[arg(long)]
        text: Option<String>,
    },
    /// Reject proposals; the library does not change.
    Reject {
        library: String,
        #[arg(required = true)]
        ids: Vec<String>,
        #[arg(long)]
        reviewer: Option<String>,
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Runs one store operation and prints its result as JSON.
pub fn run(args: ExperienceArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.experience_dir, StoreOptions::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let out = run_on(&store, args.command).map_err(|e| anyhow::anyhow!("{e}"))?;
    store.flush();
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

fn run_on(store: &Store, command: ExperienceCommand) -> crate::Result<serde_json::Value> {
    use ExperienceCommand::*;
    Ok(match command {
        Libraries => json!(store
            .names()
            .iter()
            .filter_map(|n| store.library(n).ok())
            .map(|l| json!({"name": l.name, "version": l.version(), "experiences": l.len()}))
            .collect::<Vec<_>>()),
        Create { library } => {
            let l = store.create(&library)?;
            json!({"name": l.name, "version": l.version()})
        }
        List {
            library,
            tag,
            limit,
        } => to_json(&store.list(&library, tag.as_deref(), limit)?),
        Search {
            library,
            query,
            tag,
            limit,
        } => {
            // The CLI loads no embedding model: it searches by words (the server searches
            // by meaning too).
            let q = crate::experience::Query {
                tag: tag.as_deref(),
                retrieval: crate::experience::retrieve::RetrievalOverride {
                    mode: Some(crate::experience::retrieve::Mode::Lexical),
                    ..Default::default()
                },
                ..crate::experience::Query::text(&query, limit)
            };
            to_json(&store.search(&library, &q)?)
        }
        Add {
            library,
            text,
            tags,
            review,
        } => {
            if review {
                to_json(&store.propose_one(&library, store.add_change(&text, tags)?)?)
            } else {
                to_json(&store.add(&library, &text, tags)?)
            }
        }
        Edit {
            library,
            id,
            text,
            tags,
            review,
        } => {
            if review {
                to_json(&store.propose_one(&library, store.edit_change(&id, text, tags)?)?)
            } else {
                to_json(&store.edit(&library, &id, text, tags)?)
            }
        }
        Rm {
            library,
            id,
            review,
        } => {
            if review {
                to_json(&store.propose_one(&library, experience::Change::Delete { id })?)
            } else {
                store.remove(&library, &id)?;
                json!({"id": id, "deleted": true})
            }
        }
        Export { library, format } => {
            let l = store.library(&library)?;
            if format == "grpo" {
                experience::export_grpo(&l)
            } else {
                experience::export(&l)
            }
        }
        Import {
            library,
            file,
            create,
        } => import(store, &library, &file, create)?,
        Versions { library } => to_json(&store.library(&library)?.versions()),
        Diff { library, from, to } => {
            let l = store.library(&library)?;
            let to = to.unwrap_or_else(|| l.version());
            to_json(&l.diff(from, to)?)
        }
        Rollback { library, version } => {
            let v = store.rollback(&library, version)?;
            to_json(&experience::VersionSummary::from(&v))
        }
        Proposals { library, status } => {
            let all = store.library(&library)?.proposals();
            to_json(
                &all.into_iter()
                    .filter(|p| status == "all" || to_json(&p.status) == json!(status))
                    .collect::<Vec<_>>(),
            )
        }
        Approve {
            library,
            ids,
            reviewer,
            text,
        } => to_json(&approve(store, &library, &ids, reviewer, text)?),
        Reject {
            library,
            ids,
            reviewer,
            reason,
        } => to_json(&store.reject(&library, &ids, reviewer, reason)?),
    })
}

/// `import`: a file in any format `experience export` writes, committed as one version.
fn import(
    store: &Store,
    library: &str,
    file: &std::path::Path,
    create: bool,
) -> crate::Result<serde_json::Value> {
    let text = std::fs::read_to_string(file)?;
    let body = crate::api::error::parse_json::<serde_json::Value>(text.as_bytes())?;
    let changes = experience::parse_import(&body)?;
    if create && store.library(library).is_err() {
        store.create(library)?;
    }
    let n = changes.len();
    let why = format!("imported {n} experiences from {}", file.display());
    let v = store.commit(library, &why, changes)?;
    Ok(json!({"version": v.version, "imported": v.ops.iter().map(|o| o.id()).collect::<Vec<_>>()}))
}

/// `approve`: the proposals committed together, `--text` replacing the one proposal's text.
fn approve(
    store: &Store,
    library: &str,
    ids: &[String],
    reviewer: Option<String>,
    text: Option<String>,
) -> crate::Result<experience::VersionSummary> {
    let mut edits = std::collections::BTreeMap::new();
    if let Some(text) = text {
        let [id] = ids else {
            return Err(crate::Error::invalid(
                "--text edits one proposal; approve the others separately",
                "text",
            ));
        };
        let edit = experience::proposals::Edit {
            text: Some(text),
            tags: None,
        };
        edits.insert(id.clone(), edit);
    }
    let v = store.approve(library, ids, &edits, reviewer)?;
    Ok(experience::VersionSummary::from(&v))
}

fn to_json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap_or_default()
}
