//! `plan:MODEL`: code-driven planning over HTTP. The request names a task family
//! (`experient.env`) and the instances to solve; the user's message describes the task in
//! their own words. The model writes and refines a program on training instances of the
//! family (or a kept program of the family is reused), the program plays the requested
//! instances, and the reply carries the program, with every instance's actions and score in
//! `experient.trace`.

use std::sync::Arc;

use serde_json::json;

use super::{Applied, Context, Event, Output};
use crate::backend::{ChatRequest, Event as Model, FinishReason, Role, Usage};
use crate::error::{Error, Result};
use crate::planning::cache::ProgramCache;
use crate::planning::ipp::{self, PlanReport, Spec};
use crate::planning::{Family, Instance};
use crate::router::{Method, Route};

/// What a plan request solves, typed and checked against the bounds where the request is read
/// (`api`), so that the method gets instances rather than the client's shapes.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// The task family: a MiniGrid level or a GRASP setting (none: the request named none).
    pub family: Option<Family>,
    /// What to solve (default: seeds 0..5).
    pub eval: Option<Vec<Instance>>,
    /// Training instances (default: the configured count, from [`ipp::TRAIN_SEED_BASE`]).
    pub train: Option<Vec<Instance>>,
    /// Refinement rounds after the first program (default: the configured count).
    pub rounds: Option<u32>,
    /// Also ask the model for each instance's actions directly, for comparison.
    pub direct: bool,
    /// Write a new program even if the family has a kept one.
    pub refresh: bool,
    /// Whose program cache this request reads and writes: `None` is the server's shared one
    /// (admin keys, a keyless server); a user key gets its own, and reads the shared one only
    /// where it has none, so that no user key replaces what every other client is served.
    pub cache_owner: Option<String>,
}

/// Writes (or reuses) a program for the family and plays the requested instances with it.
pub async fn run(
    ctx: &Context,
    route: Route,
    request: ChatRequest,
    opts: &PlanOptions,
) -> Result<Output> {
    let spec = spec(&ctx.settings, &request, opts)?;
    let refresh = opts.refresh;
    let cache_owner = opts.cache_owner.clone();
    let ctx = ctx.clone();
    let backend = route.backend.clone();
    let model = route.model.clone();
    let events = async_stream::stream! {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let progress: ipp::OnStage = Arc::new(move |v| {
            let _ = tx.send(v);
        });
        let cache = match &cache_owner {
            None => ProgramCache::beside(ctx.store.dir()),
            Some(owner) => ProgramCache::of_key(ctx.store.dir(), owner),
        };
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
        count(&report);
        let usage = total_usage(&report);
        yield Ok(Event::Model(Model::Delta { index: 0, text: answer_text(&report) }));
        yield Ok(Event::Model(Model::Finish { index: 0, reason: FinishReason::Stop }));
        yield Ok(Event::Trace(serde_json::to_value(&report).unwrap_or_default()));
        yield Ok(Event::Model(Model::Usage(usage)));
    };
    Ok(Output {
        events: Box::pin(events),
        applied: Applied {
            version: None,
            retrieval: None,
            canary: None,
            method: Method::Plan,
            model: route.model,
            library: None,
            experiences: None,
            trace: None,
        },
    })
}

/// The run a request asks for: the user's words describe the task, a system prompt applies
/// to every model call, and the instances default to the family's first five and its
/// configured training seeds.
fn spec(
    methods: &crate::config::MethodsConfig,
    request: &ChatRequest,
    opts: &PlanOptions,
) -> Result<Spec> {
    let family = opts
        .family
        .ok_or_else(|| Error::invalid("the plan method needs a task family", None))?;
    let eval = opts
        .eval
        .clone()
        .unwrap_or_else(|| (0..5).map(|s| family.instance(s)).collect());
    let train = opts
        .train
        .clone()
        .unwrap_or_else(|| ipp::training_instances(family, methods.plan.train));
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
    Ok(Spec {
        system: text(Role::System),
        task: text(Role::User),
        direct: opts.direct,
        ..Spec::new(
            family,
            methods,
            train,
            eval,
            opts.rounds,
            request.sampling.clone(),
        )
    })
}

/// Runs, rounds and instances played, per family, for `/metrics`.
fn count(report: &PlanReport) {
    let family = report.family.clone();
    let reused = report.reused.to_string();
    metrics::counter!("experient_plan_runs_total", "family" => family.clone(), "reused" => reused)
        .increment(1);
    metrics::counter!("experient_plan_rounds_total", "family" => family.clone())
        .increment(report.rounds.len() as u64);
    metrics::counter!("experient_plan_instances_total", "family" => family)
        .increment(report.refined_program.summary.instances as u64);
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
