//! `plan:MODEL`: code-driven planning over HTTP. The request names a task family
//! (`experient.env`) and the instances to solve; the user's message describes the task in
//! their own words. The model writes and refines a program on training instances of the
//! family (or a kept program of the family is reused), the program plays the requested
//! instances, and the reply carries the program, with every instance's actions and score in
//! `experient.trace`.

use std::sync::Arc;

use serde_json::{json, Value};

use super::{Applied, Context, Method, Output};
use crate::backend::{ChatRequest, Event, FinishReason, Role, Sampling, Usage};
use crate::error::{Error, Result};
use crate::planning::cache::ProgramCache;
use crate::planning::grasp::Grasp;
use crate::planning::ipp::{self, Report, Spec};
use crate::planning::{Family, Instance};
use crate::router::Route;
use crate::sandbox::Limits;

/// Seeds of generated training instances start here, away from the small seeds clients
/// usually evaluate on.
pub const TRAIN_SEED_BASE: u64 = 10_000;

/// The planning fields of the `experient` request object.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// The task family: a MiniGrid id or a GRASP setting.
    pub env: Option<String>,
    /// What to solve: a count (seeds 0..n), a list of seeds, or (GRASP) a list of grids.
    pub instances: Option<Value>,
    /// Training instances: a count or a list of seeds.
    pub train: Option<Value>,
    pub rounds: Option<u32>,
    /// Also ask the model for each instance's actions directly, for comparison.
    pub direct: bool,
    /// Write a new program even if the family has a kept one.
    pub refresh: bool,
}

fn seeds(v: &Value, base: u64, param: &'static str, max: usize) -> Result<Vec<u64>> {
    match v {
        Value::Number(n) => match n.as_u64() {
            Some(k) if (1..=max as u64).contains(&k) => Ok((base..base + k).collect()),
            _ => Err(Error::invalid(
                format!("{param} must be between 1 and {max}"),
                param,
            )),
        },
        Value::Array(items) if !items.is_empty() && items.len() <= max => items
            .iter()
            .map(|s| {
                s.as_u64().ok_or_else(|| {
                    Error::invalid(
                        format!("{param} must hold seeds (non-negative integers)"),
                        param,
                    )
                })
            })
            .collect(),
        _ => Err(Error::invalid(
            format!("{param} must be a number or a list of 1 to {max} seeds"),
            param,
        )),
    }
}

fn instances(family: &Family, v: Option<&Value>, max: usize) -> Result<Vec<Instance>> {
    const PARAM: &str = "experient.instances";
    let v = v.cloned().unwrap_or(json!(5));
    if let (Family::Grasp(settings), Value::Array(items)) = (family, &v) {
        if items.first().is_some_and(Value::is_object) {
            if items.len() > max {
                return Err(Error::invalid(format!("at most {max} instances"), PARAM));
            }
            return items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let rows: Vec<String> = item
                        .get("grid")
                        .and_then(|g| serde_json::from_value(g.clone()).ok())
                        .ok_or_else(|| {
                            Error::invalid_param(
                                "a GRASP instance is {\"grid\": [\"row\", ...]}",
                                format!("{PARAM}[{i}].grid"),
                            )
                        })?;
                    let grid = Grasp::from_rows(*settings, rows)
                        .map_err(|e| Error::invalid_param(e, format!("{PARAM}[{i}].grid")))?;
                    Ok(Instance::Grasp {
                        id: format!("instance {i}"),
                        grid,
                    })
                })
                .collect();
        }
    }
    Ok(seeds(&v, 0, PARAM, max)?
        .into_iter()
        .map(|s| family.instance(s))
        .collect())
}

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
    let rounds = opts.rounds.unwrap_or(settings.rounds);
    let (max, max_rounds) = (ctx.bounds.max_plan_instances, ctx.bounds.max_plan_rounds);
    if rounds > max_rounds {
        return Err(Error::invalid(
            format!("experient.rounds must be at most {max_rounds}"),
            "experient.rounds",
        ));
    }
    let eval = instances(&family, opts.instances.as_ref(), max)?;
    let train_seeds = match &opts.train {
        Some(v) => seeds(v, TRAIN_SEED_BASE, "experient.train", max)?,
        None => (TRAIN_SEED_BASE..TRAIN_SEED_BASE + settings.train as u64).collect(),
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
    let (system, task) = (text(Role::System), text(Role::User));
    let spec = Spec {
        family,
        system,
        task,
        train: train_seeds
            .into_iter()
            .map(|s| family.instance(s))
            .collect(),
        eval,
        rounds,
        feedback: settings.feedback,
        sampling: Sampling {
            max_tokens: Some(request.sampling.max_tokens.unwrap_or(settings.max_tokens)),
            n: 1,
            ..request.sampling.clone()
        },
        limits: Limits {
            time: std::time::Duration::from_secs(settings.program_time_secs),
            memory_bytes: settings.program_memory_mib << 20,
            ..Limits::default()
        },
        direct: opts.direct,
        reuse: None,
    };
    let refresh = opts.refresh;
    let ctx = ctx.clone();
    let backend = route.backend.clone();
    let model = route.model.clone();
    let events = async_stream::stream! {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress: ipp::Progress = Arc::new(move |v| {
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
        yield Ok(Event::Delta { index: 0, text: answer_text(&report) });
        yield Ok(Event::Finish { index: 0, reason: FinishReason::Stop });
        yield Ok(Event::Trace(serde_json::to_value(&report).unwrap_or_default()));
        yield Ok(Event::Usage(usage));
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

fn total_usage(r: &Report) -> Usage {
    Usage {
        prompt_tokens: r.usage.prompt_tokens + r.direct_usage.prompt_tokens,
        completion_tokens: r.usage.completion_tokens + r.direct_usage.completion_tokens,
    }
}

/// The reply's text: what was solved, how well, and the program.
fn answer_text(r: &Report) -> String {
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
