//! The `experient` binary's commands: clap's argument types, and what each command does with
//! them. `main.rs` only parses and dispatches here; the work itself lives in the library's
//! modules (`server`, `learn`, `planning`, `experience`), so the CLI and the HTTP API share it.

mod eval;
pub mod experience;
mod learn;
mod models;
mod plan;
mod serve;
mod store;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::fetch;

/// experient: an OpenAI-compatible server that makes a local model better at inference time.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the OpenAI-compatible HTTP server.
    Serve(serve::ServeArgs),
    /// Accuracy on a task set (GSM8K JSONL or BBH JSON), with and without a library.
    Eval(eval::EvalArgs),
    /// Learn an experience library with Training-Free GRPO from tasks with known answers.
    Learn(Box<learn::LearnArgs>),
    /// Code-driven planning: the model writes a program for a task family, refines it on
    /// training instances, and is compared with asking for each instance's actions directly.
    Plan(plan::PlanArgs),
    /// Curate experience libraries: list, search, add, edit, rm, export, import, versions, rollback.
    Experience(experience::ExperienceArgs),
    /// The store as a whole: `migrate --to postgres|files` copies every library, stored
    /// response and recorded completion between the experience directory and PostgreSQL.
    Store(store::StoreArgs),
    /// Download the embedded default models (chat and embedding) into the cache and print
    /// their paths.
    FetchModel {
        #[arg(long, env = "EXPERIENT_MODEL_CACHE")]
        model_cache: Option<PathBuf>,
    },
    /// Run one Python program from stdin in the sandbox (the server's worker process).
    #[command(hide = true)]
    Sandbox,
    /// Exit 0 if the server at URL answers /health with 200 (for container health checks,
    /// where no curl is installed).
    Health {
        #[arg(
            long,
            env = "EXPERIENT_HEALTH_URL",
            default_value = "http://127.0.0.1:8080/health"
        )]
        url: String,
    },
}

impl Cli {
    /// Runs the command.
    pub fn run(self) -> anyhow::Result<()> {
        match self.command {
            Command::Serve(a) => serve::run(a),
            Command::Experience(a) => experience::run(a),
            Command::Store(a) => store::run(a),
            Command::Eval(a) => eval::run(a),
            Command::Learn(a) => learn::run(*a),
            Command::Plan(a) => plan::run(a),
            Command::FetchModel { model_cache } => {
                let cache = model_cache.unwrap_or_else(fetch::default_cache_dir);
                println!("{}", fetch::ensure_default_model(&cache)?.display());
                println!("{}", fetch::ensure_embedding_model(&cache)?.display());
                Ok(())
            }
            Command::Health { url } => health(&url),
            Command::Sandbox => std::process::exit(crate::sandbox::worker_main()),
        }
    }
}

/// A spinner-free bar with ETA on stderr, in the style every long command shares.
fn bar(template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("static template")
            .progress_chars("=> "),
    );
    bar
}

/// Exits 0 if `url` answers 200: the container health check, where no curl is installed.
fn health(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs are supported: {url}"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    match &head[9..12] {
        b"200" => Ok(()),
        code => anyhow::bail!("{url} answered {}", String::from_utf8_lossy(code)),
    }
}
