//! `plan:MODEL`: code-driven planning over HTTP. The request names a task family
//! (`experient.env`) and the instances to solve; the user's message describes the task in
//! their own words. The model writes and refines a program on training instances of the
//! family (or a kept program of the family is reused), the program plays the requested
//! instances, and the reply carries the program, with every instance's actions and score in
//! `experient.trace`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{Applied, Context, Event, Output};
use crate::backend::{ChatRequest, Event as Model, FinishReason, Role, Usage};
use crate::error::{Error, Result};
use crate::planning::cache::ProgramCache;
use crate::planning::grasp::Grasp;
use crate::planning::ipp::{self, PlanReport, Spec, TRAIN_SEED_BASE};
use crate::planning::{Family, Instance};
use crate::router::{Method, Route};

/// The planning fields of the `experient` request object, typed where the request is read
/// (`api::wire`); the counts are checked against the bounds here, where the bounds are known.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// The task family: a MiniGrid id or a GRASP setting.
    pub env: Option<String>,
    /// What to solve (default: seeds 0..5).
    pub instances: Option<Instances>,
    /// Training instances (default: the configured count, from [`TRAIN_SEED_BASE`]).
    pub train: Option<Seeds>,
    pub rounds: Option<u32>,
    /// Also ask the model for each instance's actions directly, for comparison.
    pub direct: bool,
    /// Write a new program even if the family has a kept one.
    pub refresh: bool,
}

/// Instances named by seed: a count (seeds from a base) or the seeds themselves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Seeds {
    Count(u64),
    List(Vec<u64>),
}

impl TryFrom<Value> for Seeds {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Seeds, String> {
        const SHAPE: &str = "a count or a list of seeds (non-negative integers)";
        match v {
            Value::Number(n) => n
                .as_u64()
                .map(Seeds::Count)
                .ok_or(format!("must be {SHAPE}")),
            Value::Array(items) => items
                .iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<u64>>>()
                .map(Seeds::List)
                .ok_or(format!("must be {SHAPE}")),
            _ => Err(format!("must be {SHAPE}")),
        }
    }
}

impl Seeds {
    /// The seeds, `1..=max` of them; a count starts at `base`.
    fn resolve(&self, base: u64, param: &'static str, max: usize) -> Result<Vec<u64>> {
        let seeds: Vec<u64> = match self {
            Seeds::Count(k) => (base..base.saturating_add((*k).min(max as u64 + 1))).collect(),
            Seeds::List(list) => list.clone(),
        };
        if !(1..=max).contains(&seeds.len()) {
            return Err(Error::invalid(
                format!("{param} must name from 1 to {max} instances (bounds.max_plan_instances)"),
                param,
            ));
        }
        Ok(seeds)
    }
}

/// What a plan request solves: instances by seed, or (GRASP) grids the client drew.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Instances {
    Seeds(Seeds),
    /// Each grid as its rows of text (`{"grid": ["row", ...]}` on the wire).
    Grids(Vec<Vec<String>>),
}

impl TryFrom<Value> for Instances {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Instances, String> {
        match &v {
            Value::Array(items) if items.first().is_some_and(Value::is_object) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.get("grid")
                        .and_then(|g| serde_json::from_value(g.clone()).ok())
                        .ok_or(format!(
                            "item {i} is not a GRASP instance, {{\"grid\": [\"row\", ...]}}"
                        ))
                })
                .collect::<std::result::Result<_, _>>()
                .map(Instances::Grids),
            _ => Seeds::try_from(v).map(Instances::Seeds),
        }
    }
}

fn instances(family: &Family, given: Option<&Instances>, max: usize) -> Result<Vec<Instance>> {
    const PARAM: &str = "experient.instances";
    let grids = match given {
        None => return Ok((0..5).map(|s| family.instance(s)).collect()),
        Some(Instances::Seeds(seeds)) => {
            return Ok(seeds
                .resolve(0, PARAM, max)?
                .into_iter()
                .map(|s| family.instance(s))
                .collect())
        }
        Some(Instances::Grids(grids)) => grids,
    };
    let Family::Grasp(settings) = family else {
        return Err(Error::invalid(
            "grids are given for GRASP families only; name MiniGrid instances by seed",
            PARAM,
        ));
    };
    if grids.len() > max {
        return Err(Error::invalid(format!("at most {max} instances"), PARAM));
    }
    grids
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let grid = Grasp::from_rows(*settings, rows.clone())
                .map_err(|e| Error::invalid_param(e, format!("{PARAM}[{i}].grid")))?;
            Ok(Instance::Grasp {
                id: format!("instance {i}"),
                grid,
            })
        })
        .collect()
}

/// Writes (or reuses) a program for the family and plays the requested instances with it.
pub async fn run(
    ctx: &Context,
    route: Route,
    request: ChatRequest,
    opts: &PlanOptions,
) -> Result<Output> {
    if request.sampling.n > 1 {
        return Err(Error::invalid(
            "the plan method gives one answer; n must be 1",
            "n",
        ));
    }
    let settings = ctx.settings.plan.clone();
    let env = opts.env.as_deref().ok_or_else(|| {
        Error::invalid(
            format!(
                "the plan method needs experient.env, the task family: {}",
                Family::known()
            ),
            "experient.env",
        )
    })?;
    let family = Family::parse(env).ok_or_else(|| {
        Error::invalid(
            format!("unknown environment '{env}'; known: {}", Family::known()),
            "experient.env",
        )
    })?;
    let max = ctx.bounds.max_plan_instances;
    let eval = instances(&family, opts.instances.as_ref(), max)?;
    let train = match &opts.train {
        Some(seeds) => seeds
            .resolve(TRAIN_SEED_BASE, "experient.train", max)?
            .into_iter()
            .map(|s| family.instance(s))
            .collect(),
        None => ipp::training_instances(family, settings.train),
    };
    // The user's words describe the task; a system prompt applies to every model call.
    let text = |role: Role| {
        request
            .messages
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.content.trim())
            .filter(|c| !c.is_empty())
            .collect::<Vec<_>>()
            .join("\n")
    };
    let spec = Spec {
        system: text(Role::System),
        task: text(Role::User),
        direct: opts.direct,
        ..Spec::new(
            family,
            &settings,
            train,
            eval,
            opts.rounds,
            request.sampling.clone(),
        )
    };
    spec.check(
        &ctx.bounds,
        ["experient.train", "experient.instances", "experient.rounds"],
    )?;
    let refresh = opts.refresh;
    let ctx = ctx.clone();
    let backend = route.backend.clone();
    let model = route.model.clone();
    let events = async_stream::stream! {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress: ipp::OnStage = Arc::new(move |v| {
            let _ = tx.send(v);
        });
        let cache = ProgramCache::beside(ctx.store.dir());
        let work = ipp::run_cached(backend.as_ref(), &ctx.prompts, &cache, &model, spec, refresh, progress);
        tokio::pin!(work);
        let report = loop {
            tokio::select! {
                Some(p) = rx.recv() => yield Ok(Event::Progress(json!({"plan": p}))),
                done = &mut work => break done,
            }
        };
        while let Ok(p) = rx.try_recv() {
            yield Ok(Event::Progress(json!({"plan": p})));
        }
        let report = match report {
            Ok(r) => r,
            Err(e) => { yield Err(e); return; }
        };
        let family = report.family.clone();
        metrics::counter!("experient_plan_runs_total", "family" => family.clone(), "reused" => report.reused.to_string())
            .increment(1);
        metrics::counter!("experient_plan_rounds_total", "family" => family.clone())
            .increment(report.rounds.len() as u64);
        metrics::counter!("experient_plan_instances_total", "family" => family)
            .increment(report.refined_program.summary.instances as u64);
        let usage = total_usage(&report);
        yield Ok(Event::Model(Model::Delta { index: 0, text: answer_text(&report) }));
        yield Ok(Event::Model(Model::Finish { index: 0, reason: FinishReason::Stop }));
        yield Ok(Event::Trace(serde_json::to_value(&report).unwrap_or_default()));
        yield Ok(Event::Model(Model::Usage(usage)));
    };
    Ok(Output {
        events: Box::pin(events),
        applied: Applied {
            method: Method::Plan,
            model: route.model,
            library: None,
            experiences: None,
            trace: None,
        },
    })
}

fn total_usage(r: &PlanReport) -> Usage {
    Usage {
        prompt_tokens: r.usage.prompt_tokens + r.direct_usage.prompt_tokens,
        completion_tokens: r.usage.completion_tokens + r.direct_usage.completion_tokens,
    }
}

/// The reply's text: what was solved, how well, and the program.
fn answer_text(r: &PlanReport) -> String {
    let s = &r.refined_program.summary;
    let origin = if r.reused {
        "a kept program, reused without calling the model".to_string()
    } else {
        format!(
            "round {} of {}, after {} model calls",
            r.best_round.unwrap_or(0),
            r.rounds.len().saturating_sub(1),
            r.model_calls
        )
    };
    format!(
        "{family}: the program ({origin}) solved {ok} of {n} instances, mean reward {reward:.3}.\n\n```python\n{code}\n```",
        family = r.family,
        ok = (s.success_rate * s.instances as f64).round(),
        n = s.instances,
        reward = s.mean_reward,
        code = r.program,
    )
}
