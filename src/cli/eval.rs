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
    /// Compare two versions of --library task by task instead: this one (a version number,
    /// or "none" for no library) ...
    #[arg(long, requires_all = ["library", "candidate"])]
    baseline: Option<String>,
    /// ... against this one; prints each one's accuracy, the paired difference with its
    /// interval and p-value, the tasks they disagree on, and what it cost.
    #[arg(long, requires = "baseline")]
    candidate: Option<String>,
    /// Confidence of the intervals of a paired comparison.
    #[arg(long, default_value_t = 0.95)]
    confidence: f64,
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
    let opts = eval::EvalOptions {
        samples: a.samples.max(1),
        temperature: a
            .temperature
            .unwrap_or(if a.samples > 1 { 0.7 } else { 0.0 }),
        max_tokens: a.max_tokens,
        concurrency: a.concurrency,
    };
    let bar = super::bar("{msg:<24} [{bar:30}] {pos}/{len} answers ({elapsed} elapsed, ETA {eta})");
    let on_tick = |tick: eval::Tick<'_>| match tick {
        eval::Tick::Arm { label, answers } => {
            bar.reset();
            bar.set_length(answers);
            bar.set_message(label.to_owned());
        }
        eval::Tick::Answer => bar.inc(1),
        eval::Tick::ArmDone => bar.finish_and_clear(),
    };
    if let (Some(base), Some(cand)) = (&a.baseline, &a.candidate) {
        let report = runtime.block_on(async {
            let (router, ctx) = a.models.load(&config, &model_cache).await?;
            paired(&a, &router, &ctx, (base, cand), &ds, opts, &on_tick).await
        })?;
        let json = serde_json::to_string_pretty(&report)?;
        write_out(&a, &json, || {
            crate::learn::plot::eval_chart(&paired_arms(&report))
        })?;
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        return Ok(());
    }
    let report = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
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
    write_out(&a, &json, || crate::learn::plot::eval_chart(&report))?;
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// Prints the report, and writes it (`--out`) and its chart (`--plot`) where asked.
fn write_out(a: &EvalArgs, json: &str, chart: impl FnOnce() -> String) -> anyhow::Result<()> {
    if let Some(p) = &a.out {
        std::fs::write(p, json)?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, chart())?;
    }
    println!("{json}");
    Ok(())
}

/// `--baseline V --candidate V`: two versions of the library compared task by task, scored by
/// the data set's rule (or `--verifier`), as the server's evaluations are.
async fn paired(
    a: &EvalArgs,
    router: &crate::router::Router,
    ctx: &crate::methods::Context,
    (base, cand): (&str, &str),
    ds: &Dataset,
    options: eval::EvalOptions,
    on_tick: eval::OnTick<'_>,
) -> anyhow::Result<crate::learn::compare::Comparison> {
    use crate::learn::compare;
    let library = a.library.as_deref().unwrap_or_default();
    let lib = ctx
        .store
        .library(library)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let side = |v: &str| -> anyhow::Result<compare::Side> {
        if v == "none" {
            return Ok(compare::Side::none());
        }
        let n: u64 = v
            .parse()
            .map_err(|_| anyhow::anyhow!("a version is a number or \"none\", got '{v}'"))?;
        compare::Side::version(&lib, n).map_err(|e| anyhow::anyhow!("{e}"))
    };
    let (baseline, candidate) = (side(base)?, side(cand)?);
    let route = router
        .resolve(&a.model, Some(crate::router::Method::Direct.name()), None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let plan = compare::Plan {
        route: &route,
        settings: lib.settings(),
        options,
        grader: eval::Grader::Rule(&ds.verifier),
        confidence: a.confidence,
    };
    compare::compare(ctx, &plan, &baseline, &candidate, ds, on_tick)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// A paired comparison as the two arms the accuracy chart draws.
fn paired_arms(c: &crate::learn::compare::Comparison) -> eval::EvalReport {
    let arm = |label: &str, acc: &crate::learn::stats::Accuracy| eval::Arm {
        library: Some(label.to_owned()),
        tasks: c.paired.n,
        samples: c.samples,
        accuracy: acc.mean,
        ci95: acc.ci,
        experiences: 0,
    };
    eval::EvalReport {
        dataset: c.dataset.clone(),
        model: c.model.clone(),
        arms: vec![
            arm(&c.baseline_label, &c.paired.baseline),
            arm(&c.candidate_label, &c.paired.candidate),
        ],
    }
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
