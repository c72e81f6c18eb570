//! `experient learn`: a Training-Free GRPO run from a task file or recorded traffic.

use std::path::PathBuf;

use super::models::{traffic, ModelArgs};
use crate::backend::fetch;
use crate::learn::dataset::{Dataset, Split};
use crate::learn::grpo::{self, LearnOptions, Progress, Run};

/// `experient learn`'s flags.
#[derive(clap::Args)]
pub struct LearnArgs {
    /// The library to learn into (created if missing).
    #[arg(long)]
    library: Option<String>,
    /// Task file: GSM8K-style JSONL or BBH JSON.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Learn from the library's recorded traffic that has feedback, instead of a task file
    /// (the verifier is then an LLM judge unless --verifier says otherwise).
    #[arg(long, conflicts_with_all = ["dataset", "resume"])]
    from_traffic: bool,
    /// Continue the run in this run directory where it stopped (all other options come from it).
    #[arg(long, conflicts_with_all = ["library", "dataset"])]
    resume: Option<PathBuf>,
    /// Model alias that makes the attempts.
    #[arg(long, default_value = fetch::DEFAULT_MODEL_ID)]
    model: String,
    /// Model alias that summarises, compares and edits the library (default: --model).
    #[arg(long)]
    learner_model: Option<String>,
    #[arg(long, default_value_t = 3)]
    epochs: u32,
    /// Tasks per step; the library is updated once per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Attempts per task (G).
    #[arg(long, default_value_t = 5)]
    group_size: u32,
    /// Sampling temperature of the attempts.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Token limit of an attempt.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    /// Token limit of a learner call.
    #[arg(long, default_value_t = 384)]
    learner_max_tokens: u32,
    /// Model calls in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// numeric, exact, regex:PATTERN ({answer} stands for the reference) or judge (default: what fits the data).
    #[arg(long)]
    verifier: Option<String>,
    /// Model alias of the LLM judge (default: the learner model).
    #[arg(long)]
    judge_model: Option<String>,
    /// What the model is told besides the question (default: what fits the data).
    #[arg(long)]
    instruction: Option<String>,
    /// Most lessons one group may yield.
    #[arg(long, default_value_t = 2)]
    max_lessons: usize,
    /// Extra attempts at a learner call whose reply does not parse.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Tag every learned experience with these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// Shuffle the data set with this seed before --offset and --limit (as `eval --seed` does).
    #[arg(long)]
    seed: Option<u64>,
    /// Tasks to skip first.
    #[arg(long, default_value_t = 0)]
    offset: usize,
    /// Tasks to learn from (after --offset).
    #[arg(long)]
    limit: Option<usize>,
    /// Evaluate this many held-out tasks (those after the learning split) after every step.
    #[arg(long, default_value_t = 0)]
    validation: usize,
    /// Seed of the order tasks are visited in each epoch.
    #[arg(long, default_value_t = 42)]
    order_seed: u64,
    #[command(flatten)]
    models: ModelArgs,
}

pub(super) fn run(a: LearnArgs) -> anyhow::Result<()> {
    let config = a.models.config()?;
    let run = match (&a.resume, &a.library, &a.dataset) {
        (Some(dir), _, _) => Run::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?,
        (None, Some(library), dataset) if dataset.is_some() || a.from_traffic => {
            let data = match dataset {
                Some(path) => Dataset::load(path, config.bounds.max_dataset_bytes)?,
                None => {
                    crate::learn::dataset::learnable_traffic(&traffic(&a.models, &config)?, library)
                        .map_err(|e| anyhow::anyhow!("{e}"))?
                }
            };
            let (train, validation) = data.split(&Split {
                seed: a.seed,
                offset: a.offset,
                limit: a.limit,
                held_out: a.validation,
            });
            let options = options(&a, library);
            let runs_dir = a.models.runs_dir();
            let gated = crate::experience::settings_on_disk(&a.models.experience_dir, library)
                .is_none_or(|s| s.gated());
            Run::create(
                &runs_dir,
                options,
                &data,
                (train, validation),
                gated,
                &config.bounds,
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?
        }
        _ => anyhow::bail!("give --library and --dataset (or --from-traffic), or --resume RUN_DIR"),
    };
    eprintln!(
        "experient: learning run {} in {}",
        run.info.id,
        run.dir.display()
    );
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    let summary = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
        let bar =
            super::bar("{msg:<34} [{bar:30}] {pos}/{len} attempts ({elapsed} elapsed, ETA {eta})");
        let drawn = bar.clone();
        let progress = Progress::watched(Box::new(move |p| {
            drawn.set_length(p.rollouts_total);
            drawn.set_position(p.rollouts_done);
            drawn.set_message(p.phase.clone());
        }));
        let summary = grpo::learn(&ctx, &router, &run, &progress).await;
        bar.finish_and_clear();
        let summary = summary.map_err(|e| {
            anyhow::anyhow!(
                "{e}\nthe run can be resumed: experient learn --resume {}",
                run.dir.display()
            )
        })?;
        ctx.store.flush();
        anyhow::Ok(summary)
    })?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!(
        "experient: library '{}' is at version {} with {} experiences; records and progress.svg in {}",
        summary.library,
        summary.version,
        summary.experiences,
        summary.dir.display()
    );
    let c = &summary.cost;
    eprintln!(
        "experient: it cost {} attempts, {} model calls, {} prompt and {} completion tokens, {:.1} s{}",
        c.rollouts,
        c.calls.model_calls,
        c.calls.prompt_tokens,
        c.calls.completion_tokens,
        c.wall_secs,
        c.calls
            .price
            .map(|p| format!(", {p:.4} at the configured price"))
            .unwrap_or_default()
    );
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// The run's options from the flags; traffic has no rule to check answers by, so its default
/// verifier is the judge.
fn options(a: &LearnArgs, library: &str) -> LearnOptions {
    LearnOptions {
        library: library.to_owned(),
        model: a.model.clone(),
        learner_model: a.learner_model.clone(),
        epochs: a.epochs,
        batch_size: a.batch_size,
        group_size: a.group_size,
        temperature: a.temperature,
        max_tokens: a.max_tokens,
        learner_max_tokens: a.learner_max_tokens,
        concurrency: a.concurrency,
        verifier: a
            .verifier
            .clone()
            .or_else(|| a.from_traffic.then(|| "judge".to_owned())),
        judge_model: a.judge_model.clone(),
        instruction: a.instruction.clone(),
        max_lessons: a.max_lessons,
        retries: a.retries,
        seed: a.order_seed,
        tags: a.tags.clone(),
        review: false,
    }
}
