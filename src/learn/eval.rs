//! `experient eval`: accuracy on a task set, with and without an experience library.
//!
//! Each task is answered `samples` times; a task's score is the mean over its samples (mean@k)
//! and the accuracy is the mean over tasks, with a 95% confidence interval from the spread of
//! task scores (normal approximation). Requests go through the same methods as the server's,
//! so what is measured is what clients get.

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

/// How an answer is scored: by the data set's rule, or by the LLM judge against the reference.
#[derive(Clone, Copy)]
pub enum Grader<'a> {
    Rule(&'a super::verify::Verifier),
    Judge(&'a super::verify::Judge),
}

impl Grader<'_> {
    /// The answer's score, 0 to 1.
    pub async fn score(&self, question: &str, output: &str, reference: &str) -> crate::Result<f64> {
        match self {
            Grader::Rule(v) => Ok(v.score(output, reference)),
            Grader::Judge(j) => Ok(j.grade(question, output, reference).await?.0),
        }
    }
}

/// What answering a set of tasks cost: model calls, tokens and time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Cost {
    pub model_calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub wall_secs: f64,
}

impl Cost {
    /// Both costs together (wall time added: the arms run one after another).
    pub fn plus(self, other: Cost) -> Cost {
        Cost {
            model_calls: self.model_calls + other.model_calls,
            prompt_tokens: self.prompt_tokens + other.prompt_tokens,
            completion_tokens: self.completion_tokens + other.completion_tokens,
            wall_secs: self.wall_secs + other.wall_secs,
        }
    }
}

/// Every task's score (mean over its samples), in task order, what it cost, and how many
/// experiences the route injected.
pub struct TaskScores {
    pub scores: Vec<f64>,
    pub cost: Cost,
    pub experiences: usize,
}

/// Answers every task `samples` times through `route` in the learning lane and scores each
/// answer with `grader`.
pub async fn task_scores(
    ctx: &Context,
    route: &Route,
    ds: &Dataset,
    opts: &EvalOptions,
    grader: Grader<'_>,
    on_tick: OnTick<'_>,
) -> anyhow::Result<TaskScores> {
    let started = std::time::Instant::now();
    let used = std::sync::atomic::AtomicUsize::new(0);
    let mut work = Vec::new();
    for (t, task) in ds.tasks.iter().enumerate() {
        for _ in 0..opts.samples {
            let (route, used) = (route.clone(), &used);
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
                let text = &done.choices[0].text;
                let score = grader.score(&task.question, text, &task.answer).await?;
                on_tick(Tick::Answer);
                Ok::<_, crate::Error>((t, score, done.usage))
            });
        }
    }
    let results: Vec<(usize, f64, crate::backend::Usage)> = futures::stream::iter(work)
        .buffer_unordered(opts.concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut per_task = vec![(0.0, 0u32); ds.tasks.len()];
    let mut cost = Cost::default();
    for (t, s, usage) in results {
        per_task[t].0 += s;
        per_task[t].1 += 1;
        cost.model_calls += 1;
        cost.prompt_tokens += usage.prompt_tokens;
        cost.completion_tokens += usage.completion_tokens;
    }
    cost.wall_secs = started.elapsed().as_secs_f64();
    Ok(TaskScores {
        scores: per_task
            .iter()
            .map(|(s, n)| s / f64::from((*n).max(1)))
            .collect(),
        cost,
        experiences: used.into_inner(),
    })
}

/// Runs one arm: every task `samples` times through `route`, scored by the data set's rule.
pub async fn run_arm(
    ctx: &Context,
    route: &Route,
    ds: &Dataset,
    opts: &EvalOptions,
    on_tick: OnTick<'_>,
) -> anyhow::Result<Arm> {
    let done = task_scores(ctx, route, ds, opts, Grader::Rule(&ds.verifier), on_tick).await?;
    let (mean, half) = mean_ci(&done.scores);
    Ok(Arm {
        library: route.library.clone(),
        tasks: done.scores.len(),
        samples: opts.samples,
        accuracy: mean,
        ci95: [(mean - half).max(0.0), (mean + half).min(1.0)],
        experiences: done.experiences,
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
