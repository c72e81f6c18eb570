//! `experient store migrate --to postgres|files`: copies a whole store (every library with all
//! its versions and settings, stored responses, recorded traffic and feedback) from the
//! experience directory into the database or back, then reads everything back from the
//! target and compares it with the source. Run it with no server on either side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Subcommand, ValueEnum};
use serde_json::json;

use crate::db::{DatabaseConfig, Db};
use crate::experience::backing::{Backing, Files, Postgres};
use crate::experience::traffic::Traffic;
use crate::response_store::ResponseStore;

/// `experient store ...`.
#[derive(clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Copy the whole store between the experience directory and PostgreSQL, and verify it.
    Migrate {
        /// Where the store goes: `postgres` (from the directory) or `files` (from the
        /// database into the directory).
        #[arg(long)]
        to: Target,
        /// The experience directory (the source, or the target).
        #[arg(long, env = "EXPERIENT_EXPERIENCE_DIR", default_value = "experience")]
        experience_dir: PathBuf,
        /// The database (the target, or the source).
        #[arg(long, env = "EXPERIENT_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Target {
    Postgres,
    Files,
}

/// One side of a copy: where libraries, responses and traffic are kept.
struct Side {
    backing: Arc<dyn Backing>,
    responses: ResponseStore,
    traffic: Traffic,
}

impl Side {
    fn files(dir: &Path, c: &crate::config::Config) -> anyhow::Result<Side> {
        Ok(Side {
            backing: Arc::new(Files),
            responses: ResponseStore::open(&dir.join(".responses"), c.responses.clone())?,
            traffic: Traffic::open(&dir.join(".traffic"), c.traffic.clone())?,
        })
    }

    fn postgres(db: Db, c: &crate::config::Config) -> anyhow::Result<Side> {
        Ok(Side {
            backing: Arc::new(Postgres::new(db.clone())),
            responses: ResponseStore::shared(db.clone(), c.responses.clone())?,
            traffic: Traffic::shared(db, c.traffic.clone()),
        })
    }
}

pub(super) fn run(a: StoreArgs) -> anyhow::Result<()> {
    let StoreCommand::Migrate {
        to,
        experience_dir,
        database_url,
    } = a.command;
    let runtime = tokio::runtime::Runtime::new()?;
    let summary = runtime.block_on(async move {
        let db = Db::connect(&DatabaseConfig {
            url: Some(database_url),
            ..Default::default()
        })
        .await?;
        tokio::task::spawn_blocking(move || migrate(to, &experience_dir, db)).await?
    })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

fn migrate(to: Target, dir: &Path, db: Db) -> anyhow::Result<serde_json::Value> {
    // The directory's lock: no server may be using it meanwhile.
    let _lock = crate::experience::lock_dir(dir)?;
    let config = crate::config::Config::default();
    let files = Side::files(dir, &config)?;
    let postgres = Side::postgres(db, &config)?;
    let (from, into) = match to {
        Target::Postgres => (&files, &postgres),
        Target::Files => (&postgres, &files),
    };
    let names = from.backing.names(dir)?;
    let bar = indicatif::ProgressBar::new(names.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} libraries")?,
    );
    bar.set_message("copying");
    let mut versions = 0;
    for name in &names {
        let lib_dir = dir.join(name);
        let library = from.backing.export(&lib_dir, name)?;
        into.backing.import(&lib_dir, name, &library)?;
        anyhow::ensure!(
            into.backing.export(&lib_dir, name)? == library,
            "library '{name}' reads back differently from the target"
        );
        if to == Target::Postgres {
            // The directory becomes this replica's own: what it holds beside the log
            // (proposals, use counts, credit, trials) stays with it.
            let generation = into.backing.heads(Some(name))?[0].generation;
            crate::experience::write_atomic(
                &lib_dir.join(".generation"),
                generation.to_string().as_bytes(),
            )?;
        }
        versions += library.versions.len();
        bar.inc(1);
    }
    bar.finish_and_clear();
    let responses = copy_responses(from, into)?;
    let (records, feedback) = copy_traffic(from, into)?;
    Ok(json!({
        "to": match to { Target::Postgres => "postgres", Target::Files => "files" },
        "libraries": names.len(),
        "versions": versions,
        "responses": responses,
        "traffic_records": records,
        "feedback": feedback,
        "verified": true,
    }))
}

fn copy_responses(from: &Side, into: &Side) -> anyhow::Result<usize> {
    let all = from.responses.dump()?;
    for (id, at, text) in &all {
        into.responses.restore(id, *at, text)?;
    }
    let back: std::collections::BTreeSet<(String, String)> = into
        .responses
        .dump()?
        .into_iter()
        .map(|(id, _, text)| (id, text))
        .collect();
    for (id, _, text) in &all {
        anyhow::ensure!(
            back.contains(&(id.clone(), text.clone())),
            "stored response {id} reads back differently from the target"
        );
    }
    Ok(all.len())
}

fn copy_traffic(from: &Side, into: &Side) -> anyhow::Result<(usize, usize)> {
    let (mut records, mut feedback) = (0, 0);
    for library in from.traffic.libraries()? {
        let dump = sorted(from.traffic.dump(&library)?);
        into.traffic.restore(&library, &dump)?;
        anyhow::ensure!(
            sorted(into.traffic.dump(&library)?) == dump,
            "the traffic of '{library}' reads back differently from the target"
        );
        records += dump.records.len();
        feedback += dump.feedback.len();
    }
    Ok((records, feedback))
}

/// A dump in one order whichever store it came from (each lists by time; equal times may
/// come in either order).
fn sorted(mut d: crate::experience::traffic::Dump) -> crate::experience::traffic::Dump {
    d.records
        .sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    d.feedback
        .sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
    d
}
