use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use experient::backend::fetch;
use experient::config::Config;
use experient::server::{self, ServeOptions};

/// The proxy path allocates many small JSON values per streamed chunk; mimalloc serves them
/// markedly faster than glibc's malloc under concurrency.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// experient: an OpenAI-compatible server that makes a local model better at inference time.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the OpenAI-compatible HTTP server.
    Serve(ServeArgs),
    /// Accuracy on a task set (GSM8K JSONL or BBH JSON), with and without a library.
    Eval(EvalArgs),
    /// Learn an experience library with Training-Free GRPO from tasks with known answers.
    Learn(Box<LearnArgs>),
    /// Code-driven planning: the model writes a program for a task family, refines it on
    /// training instances, and is compared with asking for each instance's actions directly.
    Plan(PlanArgs),
    /// Curate experience libraries: list, search, add, edit, rm, export, import, versions, rollback.
    Experience(experient::cli::ExperienceArgs),
    /// Download the embedded default model into the cache, prepare its Q8_0 rewrite, and print
    /// the path of the original.
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

/// Flags shared by every command that runs models.
#[derive(clap::Args)]
struct ModelArgs {
    /// TOML configuration file (models, limits). Without one, the embedded default model is used.
    #[arg(long, env = "EXPERIENT_CONFIG")]
    config: Option<PathBuf>,
    /// Directory holding the experience libraries.
    #[arg(long, env = "EXPERIENT_EXPERIENCE_DIR", default_value = "experience")]
    experience_dir: PathBuf,
    /// Where downloaded models are cached (default: $XDG_CACHE_HOME/experient or ~/.cache/experient).
    #[arg(long, env = "EXPERIENT_MODEL_CACHE")]
    model_cache: Option<PathBuf>,
    /// Where learning runs keep their records (default: .runs inside the experience directory).
    #[arg(long, env = "EXPERIENT_RUNS_DIR")]
    runs_dir: Option<PathBuf>,
    /// Directory of prompt templates that override the built-in ones, file by file.
    #[arg(long, env = "EXPERIENT_PROMPTS_DIR")]
    prompts_dir: Option<PathBuf>,
}

impl ModelArgs {
    fn runs_dir(&self) -> PathBuf {
        self.runs_dir
            .clone()
            .unwrap_or_else(|| self.experience_dir.join(".runs"))
    }

    /// The backends of the configuration, loaded, and the context methods run in.
    async fn load(
        &self,
        config: &Config,
        model_cache: &std::path::Path,
    ) -> anyhow::Result<(experient::router::Router, experient::methods::Context)> {
        use std::sync::Arc;
        server::check_cpu()?;
        let (router, locals) = server::backends(config, model_cache).await?;
        for b in &locals {
            b.load().await?;
        }
        let store = experient::experience::Store::open(
            &self.experience_dir,
            experient::experience::StoreOptions {
                max_top_k: config.bounds.max_experiences,
                max_proposals: config.bounds.max_proposals,
                ..Default::default()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let ctx = experient::methods::Context {
            store: Arc::new(store),
            prompts: Arc::new(experient::prompts::Prompts::load(
                self.prompts_dir.as_deref(),
            )?),
            settings: Arc::new(config.methods.clone()),
            bounds: Arc::new(config.bounds.clone()),
        };
        Ok((router, ctx))
    }
    fn config(&self) -> anyhow::Result<Config> {
        match &self.config {
            Some(p) => Config::load(p),
            None => Ok(Config::default()),
        }
    }

    /// The model cache, with the environment mistral.rs needs pointed into it. mistral.rs asks
    /// hf-hub for a cache directory even for local files, and hf-hub panics when there is no
    /// home directory (a user with no passwd entry and no HOME would never load a model).
    /// Called before any thread exists, so setting the environment is sound.
    fn model_cache(&self) -> PathBuf {
        let cache = self
            .model_cache
            .clone()
            .unwrap_or_else(fetch::default_cache_dir);
        if std::env::var_os("HF_HOME").is_none() {
            std::env::set_var("HF_HOME", cache.join("hf"));
        }
        if std::env::var_os("HOME").is_none() {
            std::env::set_var("HOME", &cache);
        }
        cache
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (printed at startup).
    #[arg(long, env = "EXPERIENT_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Listen on a non-loopback address even though no API keys are configured: anyone who can
    /// reach the port can then use and administer the server (refused without this flag).
    #[arg(long, env = "EXPERIENT_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    #[command(flatten)]
    models: ModelArgs,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EXPERIENT_LOG")
                .unwrap_or_else(|_| "experient=info,mistralrs_core=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => run_serve(a),
        Command::Experience(a) => experient::cli::run(a),
        Command::Eval(a) => run_eval(a),
        Command::Learn(a) => run_learn(*a),
        Command::Plan(a) => run_plan(a),
        Command::FetchModel { model_cache } => {
            let cache = model_cache.unwrap_or_else(fetch::default_cache_dir);
            fetch::ensure_default_model(&cache).map(|p| println!("{}", p.display()))
        }
        Command::Health { url } => health(&url),
        Command::Sandbox => std::process::exit(experient::sandbox::worker_main()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("experient: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args)]
struct EvalArgs {
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

#[derive(clap::Args)]
struct LearnArgs {
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

fn run_learn(a: LearnArgs) -> anyhow::Result<()> {
    use experient::learn::dataset::Dataset;
    use experient::learn::grpo::{self, LearnOptions, Progress, Run};

    let config = a.models.config()?;
    let runs_dir = a.models.runs_dir();
    let run = match (&a.resume, &a.library, &a.dataset) {
        (Some(dir), _, _) => Run::open(dir).map_err(|e| anyhow::anyhow!("{e}"))?,
        (None, Some(library), dataset) if dataset.is_some() || a.from_traffic => {
            let mut data = match dataset {
                Some(path) => Dataset::load(path, config.bounds.max_dataset_bytes)?,
                None => {
                    let scored = traffic(&a.models, &config)?
                        .scored(library)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    if scored.is_empty() {
                        anyhow::bail!("library '{library}' has no recorded completions with feedback to learn from");
                    }
                    experient::learn::dataset::from_traffic(library, &scored)
                }
            };
            if let Some(seed) = a.seed {
                data.shuffle(seed);
            }
            let rest: Vec<_> = data.tasks.iter().skip(a.offset).cloned().collect();
            let n = a.limit.unwrap_or(rest.len()).min(rest.len());
            let options = LearnOptions {
                library: library.clone(),
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
            };
            Run::create(
                &runs_dir,
                options,
                &data,
                rest[..n].to_vec(),
                rest[n..].iter().take(a.validation).cloned().collect(),
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
        let progress = Progress::with_bar();
        let summary = grpo::learn(&ctx, &router, &run, &progress)
            .await
            .map_err(|e| {
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
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

#[derive(clap::Args)]
struct PlanArgs {
    /// Task family: a MiniGrid id (MiniGrid-Empty-5x5-v0, MiniGrid-DoorKey-5x5-v0,
    /// MiniGrid-Unlock-v0, MiniGrid-FourRooms-v0, MiniGrid-LavaCrossingS9N1-v0, ...) or
    /// grasp[-diag][-carryN][-costX][-sizeN].
    #[arg(long, env = "EXPERIENT_PLAN_ENV")]
    env: String,
    /// Evaluation episodes (seeds 0..N), never shown to the model.
    #[arg(long, default_value_t = 10)]
    episodes: usize,
    /// Model alias, as in the config (default: the embedded model).
    #[arg(long, default_value = fetch::DEFAULT_MODEL_ID)]
    model: String,
    /// Refinement rounds after the first program (default: the config's, 3).
    #[arg(long)]
    rounds: Option<u32>,
    /// Training instances (seeds from 10000) the program is refined on (default: the config's, 5).
    #[arg(long)]
    train: Option<usize>,
    /// Token limit of one model call (default: the config's, 512).
    #[arg(long)]
    max_tokens: Option<u32>,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Extra words about the task, added to every prompt.
    #[arg(long, default_value = "")]
    task: String,
    /// Skip the direct-elicitation baseline.
    #[arg(long)]
    no_direct: bool,
    /// Write a new program even if the family has a kept one in the cache.
    #[arg(long)]
    refresh: bool,
    /// Play this hand-written program instead of asking the model for one (the cache is left
    /// alone): a ceiling, or a check of your own policy.
    #[arg(long, conflicts_with = "refresh")]
    program: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    models: ModelArgs,
}

fn run_plan(a: PlanArgs) -> anyhow::Result<()> {
    use experient::planning::{cache::ProgramCache, ipp, Family};
    use std::sync::Arc;

    let config = a.models.config()?;
    let family = Family::parse(&a.env)
        .ok_or_else(|| anyhow::anyhow!("unknown --env '{}'; known: {}", a.env, Family::known()))?;
    let b = &config.bounds;
    let settings = config.methods.plan.clone();
    let train = a.train.unwrap_or(settings.train);
    let rounds = a.rounds.unwrap_or(settings.rounds);
    for (flag, v) in [("--episodes", a.episodes), ("--train", train)] {
        anyhow::ensure!(
            (1..=b.max_plan_instances).contains(&v),
            "{flag} must be from 1 to {} (bounds.max_plan_instances)",
            b.max_plan_instances
        );
    }
    anyhow::ensure!(
        rounds <= b.max_plan_rounds,
        "--rounds must be at most {} (bounds.max_plan_rounds)",
        b.max_plan_rounds
    );
    let train = train as u64;
    let base = experient::methods::plan::TRAIN_SEED_BASE;
    let spec = ipp::Spec {
        family,
        system: String::new(),
        task: a.task.clone(),
        train: (base..base + train).map(|s| family.instance(s)).collect(),
        eval: (0..a.episodes as u64).map(|s| family.instance(s)).collect(),
        rounds,
        feedback: settings.feedback,
        sampling: experient::backend::Sampling {
            max_tokens: Some(a.max_tokens.unwrap_or(settings.max_tokens)),
            temperature: Some(a.temperature),
            n: 1,
            ..Default::default()
        },
        limits: experient::sandbox::Limits {
            time: std::time::Duration::from_secs(settings.program_time_secs),
            memory_bytes: settings.program_memory_mib << 20,
            ..Default::default()
        },
        direct: !a.no_direct,
        reuse: None,
    };
    let given = match &a.program {
        Some(p) => Some(ipp::Cached {
            family: family.name(),
            program: std::fs::read_to_string(p)
                .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))?,
            model: "hand-written".into(),
            train: Default::default(),
            model_calls: 0,
            usage: Default::default(),
            instances_served: 0,
            created: String::new(),
        }),
        None => None,
    };
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
        let backend = router
            .backend(&a.model)
            .ok_or_else(|| anyhow::anyhow!("no model '{}' in the configuration", a.model))?
            .clone();
        let cache = ProgramCache::beside(&a.models.experience_dir);
        let progress: ipp::Progress = Arc::new(|v| match v["stage"].as_str() {
            Some("program" | "refine") => eprintln!(
                "experient: round {}: training success {:.2}, mean reward {:.3}, errors {}",
                v["round"],
                v["train"]["success_rate"].as_f64().unwrap_or(0.0),
                v["train"]["mean_reward"].as_f64().unwrap_or(0.0),
                v["train"]["errors"]
            ),
            Some(stage) => eprintln!("experient: {stage}"),
            None => {}
        });
        let report = match given {
            Some(program) => {
                let spec = ipp::Spec {
                    reuse: Some(program),
                    ..spec
                };
                ipp::run(backend.as_ref(), &ctx.prompts, &spec, progress).await
            }
            None => {
                let prompts = &ctx.prompts;
                ipp::run_cached(
                    backend.as_ref(),
                    prompts,
                    &cache,
                    &a.model,
                    spec,
                    a.refresh,
                    progress,
                )
                .await
            }
        };
        report.map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.out {
        std::fs::write(p, &json)?;
    }
    println!("{json}");
    eprintln!(
        "\n{}, model {}, {} evaluation episodes{}",
        report.family,
        a.model,
        a.episodes,
        match (&a.program, report.reused) {
            (Some(p), _) => format!(", program {}", p.display()),
            (None, true) => ", kept program reused".into(),
            (None, false) => String::new(),
        }
    );
    eprintln!(
        "arm             | success | mean reward | model calls / instance | tokens / instance"
    );
    let arms = [
        ("direct", report.direct.as_ref()),
        ("first program", report.first_program.as_ref()),
        ("refined program", Some(&report.refined_program)),
    ];
    for (name, arm) in arms {
        if let Some(arm) = arm {
            eprintln!(
                "{name:<15} | {:>7.2} | {:>11.3} | {:>22.3} | {:>17.1}",
                arm.summary.success_rate,
                arm.summary.mean_reward,
                arm.model_calls_per_instance,
                arm.tokens_per_instance
            );
        }
    }
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    use experient::learn::{dataset::Dataset, eval};

    let config = a.models.config()?;
    let mut ds = match (&a.dataset, &a.library) {
        (Some(path), _) => Dataset::load(path, config.bounds.max_dataset_bytes)?,
        (None, Some(library)) if a.from_traffic => {
            let scored: Vec<_> = traffic(&a.models, &config)?
                .scored(library)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_iter()
                .filter(|(_, f)| f.expected.is_some())
                .collect();
            if scored.is_empty() {
                anyhow::bail!("library '{library}' has no feedback that gives the right answer (expected) to score against");
            }
            experient::learn::dataset::from_traffic(library, &scored)
        }
        _ => anyhow::bail!("give --dataset, or --library with --from-traffic"),
    };
    if let Some(seed) = a.seed {
        ds.shuffle(seed);
    }
    if let Some(v) = &a.verifier {
        use experient::learn::verify::Verifier;
        ds.verifier = match v.as_str() {
            "numeric" => Verifier::Numeric,
            "exact" => Verifier::Exact,
            r if r.starts_with("regex:") => {
                let p = &r["regex:".len()..];
                regex::Regex::new(&p.replace("{answer}", "x"))
                    .map_err(|e| anyhow::anyhow!("--verifier: the regex is invalid: {e}"))?;
                Verifier::Regex(p.to_owned())
            }
            other => {
                anyhow::bail!("--verifier: use numeric, exact or regex:PATTERN, not '{other}'")
            }
        };
    }
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
        let opts = eval::EvalOptions {
            samples: a.samples.max(1),
            limit: a.limit,
            offset: a.offset,
            temperature: a
                .temperature
                .unwrap_or(if a.samples > 1 { 0.7 } else { 0.0 }),
            max_tokens: a.max_tokens,
            concurrency: a.concurrency,
        };
        eval::evaluate(&ctx, &router, &a.model, a.library.as_deref(), &ds, &opts).await
    })?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.out {
        std::fs::write(p, &json)?;
    }
    if let Some(p) = &a.plot {
        std::fs::write(p, experient::learn::plot::eval_chart(&report))?;
    }
    println!("{json}");
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// The recorded traffic of the experience directory, for the CLI (which runs while no server
/// holds the directory).
fn traffic(
    models: &ModelArgs,
    config: &experient::config::Config,
) -> anyhow::Result<experient::experience::traffic::Traffic> {
    experient::experience::traffic::Traffic::open(
        &models.experience_dir.join(".traffic"),
        config.traffic.clone(),
    )
    .map_err(|e| anyhow::anyhow!("recorded traffic: {e}"))
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let config = a.models.config()?;
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(server::serve(ServeOptions {
        addr: a.addr,
        allow_unauthenticated: a.allow_unauthenticated,
        config,
        runs_dir: a.models.runs_dir(),
        prompts_dir: a.models.prompts_dir.clone(),
        experience_dir: a.models.experience_dir,
        model_cache,
    }))?;
    // Don't wait for blocking tasks (a generation still running) past the grace period.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

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
