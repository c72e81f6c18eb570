//! `experient eval`: accuracy on a task set, with and without an experience library.
//!
//! Each task is answered `samples` times; a task's score is the mean over its samples (mean@k)
//! and the accuracy is the mean over tasks, with a 95% confidence interval from the spread of
//! task scores (normal approximation). Requests go through the same methods as the server's,
//! so what is measured is what clients get.

use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use super::dataset::Dataset;
use crate::backend::{ChatRequest, Message, Role, Sampling};
use crate::methods::{self, Context};
use crate::router::Method;
use crate::router::Route;

/// What [`evaluate`] reports as it goes, for the caller to show (the CLI draws a bar).
pub enum Tick<'a> {
    /// An arm starts: its label and how many answers it will collect.
    Arm { label: &'a str, answers: u64 },
    /// One more answer is in.
    Answer,
    /// The arm is done.
    ArmDone,
}

/// Receives [`Tick`]s; `&|_| {}` shows nothing.
pub type OnTick<'a> = &'a (dyn Fn(Tick<'_>) + Sync);

/// How every task of the (already split, see `Dataset::split`) data set is answered.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub samples: u32,
    pub temperature: f32,
    pub max_tokens: u32,
    pub concurrency: usize,
}

/// One evaluated arm: with or without the library.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    pub library: Option<String>,
    pub tasks: usize,
    pub samples: u32,
    pub accuracy: f64,
    pub ci95: [f64; 2],
    pub experiences: usize,
}

/// `experient eval`'s report: every arm on one data set.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub dataset: String,
    pub model: String,
    pub arms: Vec<Arm>,
}

fn prompt(ds: &Dataset, question: &str) -> Vec<Message> {
    vec![
        Message::new(Role::System, ds.instruction.clone()),
        Message::new(Role::User, question.to_owned()),
    ]
}

/// Runs one arm: every task `samples` times through `route`.
pub async fn run_arm(
    ctx: &Context,
    route: &Route,
    ds: &Dataset,
    opts: &EvalOptions,
    on_tick: OnTick<'_>,
) -> anyhow::Result<Arm> {
    let tasks: Vec<_> = ds.tasks.iter().collect();
    let used = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut work = Vec::new();
    for (t, task) in tasks.iter().enumerate() {
        for _ in 0..opts.samples {
            let route = route.clone();
            let used = used.clone();
            work.push(async move {
                let request = ChatRequest {
                    priority: crate::backend::Priority::Background,
                    messages: prompt(ds, &task.question),
                    sampling: Sampling {
                        max_tokens: Some(opts.max_tokens),
                        temperature: Some(opts.temperature),
                        n: 1,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                let out = methods::run(ctx, route, request, &methods::Options::default()).await?;
                if let Some(e) = &out.applied.experiences {
                    used.store(e.len(), std::sync::atomic::Ordering::Relaxed);
                }
                let done = methods::collect(out.events, 1).await?.completion;
                on_tick(Tick::Answer);
                Ok::<_, crate::Error>((t, ds.verifier.score(&done.choices[0].text, &task.answer)))
            });
        }
    }
    let results: Vec<(usize, f64)> = futures::stream::iter(work)
        .buffer_unordered(opts.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut per_task = vec![(0.0, 0u32); tasks.len()];
    for (t, s) in results {
        per_task[t].0 += s;
        per_task[t].1 += 1;
    }
    let scores: Vec<f64> = per_task
        .iter()
        .map(|(s, n)| s / f64::from((*n).max(1)))
        .collect();
    let (mean, half) = mean_ci(&scores);
    Ok(Arm {
        library: route.library.clone(),
        tasks: scores.len(),
        samples: opts.samples,
        accuracy: mean,
        ci95: [(mean - half).max(0.0), (mean + half).min(1.0)],
        experiences: used.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Mean and the half-width of its 95% confidence interval.
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// Evaluates `model` on `ds` without a library and, when one is named, with it.
pub async fn evaluate(
    ctx: &Context,
    router: &crate::router::Router,
    model: &str,
    library: Option<&str>,
    ds: &Dataset,
    opts: &EvalOptions,
    on_tick: OnTick<'_>,
) -> anyhow::Result<EvalReport> {
    let b = &ctx.bounds;
    if !(1..=b.max_concurrency).contains(&opts.concurrency) {
        anyhow::bail!(
            "concurrency must be from 1 to {} (bounds.max_concurrency)",
            b.max_concurrency
        );
    }
    if opts.samples == 0 || opts.samples > b.max_group_size {
        anyhow::bail!(
            "samples must be from 1 to {} (bounds.max_group_size)",
            b.max_group_size
        );
    }
    let base = router
        .resolve(model, Some(Method::Direct.name()), None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut routes = vec![base.clone()];
    if let Some(l) = library {
        ctx.store.library(l).map_err(|e| anyhow::anyhow!("{e}"))?;
        routes.push(Route {
            library: Some(l.to_owned()),
            ..base
        });
    }
    let answers = (ds.tasks.len() as u64) * u64::from(opts.samples);
    let mut arms = Vec::new();
    for route in &routes {
        let label = match &route.library {
            Some(l) => format!("with library {l}"),
            None => "without a library".into(),
        };
        on_tick(Tick::Arm {
            label: &label,
            answers,
        });
        let arm = run_arm(ctx, route, ds, opts, on_tick).await?;
        on_tick(Tick::ArmDone);
        arms.push(arm);
    }
    Ok(EvalReport {
        dataset: ds.name.clone(),
        model: model.to_owned(),
        arms,
    })
}

#[cfg(test)]
mod tests {
    use super::mean_ci;

    #[test]
    fn confidence_interval_of_task_scores() {
        let (m, h) = mean_ci(&[1.0, 0.0, 1.0, 0.0]);
        assert_eq!(m, 0.5);
        assert!((h - 1.96 * (1.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_ci(&[]), (0.0, 0.0));
        assert_eq!(mean_ci(&[0.7]), (0.7, 0.0));
    }
}
