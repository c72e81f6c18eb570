//! `experient eval`: accuracy on a task set, with and without a library.

use std::path::PathBuf;

use super::models::{traffic, ModelArgs};
use crate::backend::fetch;
use crate::config::Config;
use crate::learn::dataset::{Dataset, Split};
use crate::learn::eval;
use crate::learn::verify::Scoring;

/// `experient eval`'s flags.
#[derive(clap::Args)]
pub struct EvalArgs {
    /// Task file: GSM8K-style JSONL (question, answer) or BBH JSON (examples: input, target).
    #[arg(long, required_unless_present = "from_traffic")]
    dataset: Option<PathBuf>,
    /// Evaluate on the library's recorded traffic instead: the completions whose feedback gave
    /// the right answer (`expected`), scored against it. Needs --library.
    #[arg(long, conflicts_with = "dataset", requires = "library")]
    from_traffic: bool,
    /// How answers are scored: numeric, exact or regex:PATTERN ({answer} stands for the
    /// reference); default: what fits the data.
    #[arg(long)]
    verifier: Option<String>,
    /// Model alias, as in the config (default: the embedded model).
    #[arg(long, default_value = fetch::DEFAULT_MODEL_ID)]
    model: String,
    /// Also evaluate with this library injected, and report both.
    #[arg(long)]
    library: Option<String>,
    /// Answers per task; accuracy is mean@k.
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// Tasks to evaluate (after --offset).
    #[arg(long)]
    limit: Option<usize>,
    /// Tasks to skip first, to keep the evaluation split disjoint from a learning split.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Shuffle the tasks with this seed before --offset and --limit.
    #[arg(long)]
    seed: Option<u64>,
    /// Sampling temperature (default: 0, or 0.7 when --samples > 1).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also draw the accuracies, with their confidence intervals, as an SVG picture here.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[command(flatten)]
    models: ModelArgs,
}

pub(super) fn run(a: EvalArgs) -> anyhow::Result<()> {
    let config = a.models.config()?;
    let ds = data_set(&a, &config)?;
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
        let opts = eval::EvalOptions {
            samples: a.samples.max(1),
            temperature: a
                .temperature
                .unwrap_or(if a.samples > 1 { 0.7 } else { 0.0 }),
            max_tokens: a.max_tokens,
            concurrency: a.concurrency,
        };
        let bar =
            super::bar("{msg:<24} [{bar:30}] {pos}/{len} answers ({elapsed} elapsed, ETA {eta})");
        let on_tick = |tick: eval::Tick<'_>| match tick {
            eval::Tick::Arm { label, answers } => {
                bar.reset();
                bar.set_length(answers);
                bar.set_message(label.to_owned());
            }
            eval::Tick::Answer => bar.inc(1),
            eval::Tick::ArmDone => bar.finish_and_clear(),
        };
        eval::evaluate(
            &ctx,
            &router,
            &a.model,
            a.library.as_deref(),
            &ds,
            &opts,
            &on_tick,
        )
        .await
    })?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.out {
        std::fs::write(p, &json)?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, crate::learn::plot::eval_chart(&report))?;
    }
    println!("{json}");
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// The tasks to score: a task file, or the library's traffic whose feedback gives the right
/// answer; `--verifier` replaces the file's rule, and the flags pick the slice.
fn data_set(a: &EvalArgs, config: &Config) -> anyhow::Result<Dataset> {
    let mut ds = match (&a.dataset, &a.library) {
        (Some(path), _) => Dataset::load(path, config.bounds.max_dataset_bytes)?,
        (None, Some(library)) if a.from_traffic => {
            let scored: Vec<_> = traffic(&a.models, config)?
                .scored(library)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_iter()
                .filter(|(_, f)| f.expected.is_some())
                .collect();
            if scored.is_empty() {
                anyhow::bail!("library '{library}' has no feedback that gives the right answer (expected) to score against");
            }
            crate::learn::dataset::from_traffic(library, &scored)
        }
        _ => anyhow::bail!("give --dataset, or --library with --from-traffic"),
    };
    if let Some(v) = &a.verifier {
        ds.verifier = match Scoring::parse(v).map_err(|e| anyhow::anyhow!("--verifier: {e}"))? {
            Scoring::Rule(rule) => rule,
            Scoring::Judge => {
                anyhow::bail!("--verifier: eval scores by rule: numeric, exact or regex:PATTERN")
            }
        };
    }
    Ok(ds.select(&Split {
        seed: a.seed,
        offset: a.offset,
        limit: a.limit,
        held_out: 0,
    }))
}
