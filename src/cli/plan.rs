//! `experient plan`: code-driven planning on a task family, compared with direct elicitation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::models::ModelArgs;
use crate::backend::fetch;
use crate::planning::{cache::ProgramCache, ipp, Family};

/// `experient plan`'s flags.
#[derive(clap::Args)]
pub struct PlanArgs {
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

pub(super) fn run(a: PlanArgs) -> anyhow::Result<()> {
    let config = a.models.config()?;
    let family = Family::parse(&a.env)
        .ok_or_else(|| anyhow::anyhow!("unknown --env '{}'; known: {}", a.env, Family::known()))?;
    let spec = spec(&a, family, &config.methods);
    spec.check(&config.bounds, ["--train", "--episodes", "--rounds"])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let given = a
        .program
        .as_deref()
        .map(|p| hand_written(p, family))
        .transpose()?;
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    let report = runtime.block_on(async {
        let (router, ctx) = a.models.load(&config, &model_cache).await?;
        let backend = router
            .backend(&a.model)
            .ok_or_else(|| anyhow::anyhow!("no model '{}' in the configuration", a.model))?
            .clone();
        let (bar, progress) = stage_bar(&spec);
        let report = match given {
            Some(program) => {
                let spec = ipp::Spec {
                    reuse: Some(program),
                    ..spec
                };
                ipp::run(backend.as_ref(), &ctx.prompts, &spec, progress).await
            }
            None => {
                let cache = ProgramCache::beside(&a.models.experience_dir);
                let (model, refresh) = (&a.model, a.refresh);
                ipp::run_cached(
                    backend.as_ref(),
                    &ctx.prompts,
                    &cache,
                    model,
                    spec,
                    refresh,
                    progress,
                )
                .await
            }
        };
        bar.finish_and_clear();
        report.map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    let json = serde_json::to_string_pretty(&report)?;
    if let Some(p) = &a.out {
        std::fs::write(p, &json)?;
    }
    println!("{json}");
    print_table(&a, &report);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

/// The run the flags ask for, the config filling in what they leave out.
fn spec(a: &PlanArgs, family: Family, methods: &crate::config::MethodsConfig) -> ipp::Spec {
    ipp::Spec {
        task: a.task.clone(),
        direct: !a.no_direct,
        ..ipp::Spec::new(
            family,
            methods,
            ipp::training_instances(family, a.train.unwrap_or(methods.plan.train)),
            (0..a.episodes as u64).map(|s| family.instance(s)).collect(),
            a.rounds,
            crate::backend::Sampling {
                max_tokens: a.max_tokens,
                temperature: Some(a.temperature),
                ..Default::default()
            },
        )
    }
}

/// `--program`: a program of the user's own, played as a kept one would be.
fn hand_written(path: &Path, family: Family) -> anyhow::Result<ipp::Cached> {
    Ok(ipp::Cached {
        family: family.name(),
        program: std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?,
        model: "hand-written".into(),
        train: Default::default(),
        model_calls: 0,
        usage: Default::default(),
        instances_served: 0,
        created: String::new(),
    })
}

/// A bar with one step per stage (pseudocode, first program, each refinement, evaluation,
/// direct) and the callback that moves it, printing each round's training figures above it.
fn stage_bar(spec: &ipp::Spec) -> (indicatif::ProgressBar, ipp::OnStage) {
    let rounds = u64::from(spec.rounds);
    let bar = super::bar("{msg:<40} [{bar:30}] {pos}/{len} stages ({elapsed} elapsed, ETA {eta})");
    bar.set_length(3 + rounds + u64::from(spec.direct));
    bar.set_message("writing pseudocode");
    let drawn = bar.clone();
    let progress: ipp::OnStage = Arc::new(move |v| {
        let round = v["round"].as_u64().unwrap_or(0);
        let (done, next) = match v["stage"].as_str() {
            Some("pseudocode") => (1, "writing the program".to_owned()),
            Some("program" | "refine") => {
                drawn.println(format!(
                    "experient: round {round}: training success {:.2}, mean reward {:.3}, errors {}",
                    v["train"]["success_rate"].as_f64().unwrap_or(0.0),
                    v["train"]["mean_reward"].as_f64().unwrap_or(0.0),
                    v["train"]["errors"]
                ));
                (2 + round, format!("refinement {}", round + 1))
            }
            Some("evaluate") => (2 + rounds, "playing the evaluation episodes".to_owned()),
            Some("direct") => (3 + rounds, "asking for actions directly".to_owned()),
            _ => return,
        };
        drawn.set_position(done);
        drawn.set_message(next);
    });
    (bar, progress)
}

/// The arms side by side on stderr, after the JSON report on stdout.
fn print_table(a: &PlanArgs, report: &ipp::PlanReport) {
    let program = match (&a.program, report.reused) {
        (Some(p), _) => format!(", program {}", p.display()),
        (None, true) => ", kept program reused".into(),
        (None, false) => String::new(),
    };
    eprintln!(
        "\n{}, model {}, {} evaluation episodes{program}",
        report.family, a.model, a.episodes
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
}
