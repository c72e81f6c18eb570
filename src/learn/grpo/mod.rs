//! The Training-Free GRPO learning loop.
//!
//! A run walks its tasks in batches, `epochs` times. Per batch (a *step*): every task is tried
//! `group_size` times with the library as it is; each attempt is scored; groups whose scores are
//! all equal teach nothing and are skipped; for each other group the learner model summarises
//! every attempt, names what separated winners from losers (the semantic advantage), and
//! proposes operations on the library; one consolidation call per step merges the proposals,
//! and the result is committed as one new library version.
//!
//! Everything a step produced is written to the run directory before the step counts as done,
//! and the version's message names the run and step, so a crashed run resumes at the first
//! step that has neither a `result.json` nor a committed version. Model output is never
//! trusted: replies that do not parse are retried, then skipped with the reason recorded, and
//! every proposal is checked against the library before the commit, which is all or nothing.

mod options;
mod progress;
mod records;
mod run;

pub use options::LearnOptions;
pub use progress::Progress;
pub use records::{
    Consolidation, GroupRecord, LearnerReplies, Rollout, RunSummary, StepResult, Validation,
};
pub use run::{Run, RunInfo};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use super::dataset::Dataset;
use super::ops::{self, Proposal};
use super::verify::{Judge, Scoring, Verifier};
use crate::backend::{
    Backend, ChatRequest, FinishReason, Message, OutputFormat, Priority, Role, Sampling,
};
use crate::error::{Error, Result};
use crate::experience::proposals::Origin;
use crate::experience::{Change, Experience};
use crate::methods::{prior, Context};
use crate::router::{Route, Router};
use records::{Ask, Duplicate};
use run::{io, write_json};

struct Learner<'a> {
    ctx: &'a Context,
    run: &'a Run,
    rollout: Route,
    learner: Arc<dyn Backend>,
    scoring: Scoring,
    judge: Option<Judge>,
    rule: Verifier,
    progress: &'a Progress,
    /// Counts every model call the run makes, for its cost.
    meter: Arc<crate::backend::Meter>,
    /// The learner's replies decode under their grammars (`methods.constrain`, on a backend
    /// that can hold them).
    constrained: bool,
    /// How this step's learner replies read; taken into its result when it ends.
    replies: std::sync::Mutex<LearnerReplies>,
}

/// Runs (or resumes) `run` to its end and returns what it did. Dropping the future stops the
/// run between model calls; the library keeps the last committed step.
pub async fn learn(
    ctx: &Context,
    router: &Router,
    run: &Run,
    progress: &Progress,
) -> Result<RunSummary> {
    let o = &run.info.options;
    let l = Learner::new(ctx, router, run, progress)?;
    progress.steps.store(run.info.steps, Ordering::Relaxed);
    progress.rollouts_total.store(
        (run.info.tasks as u64) * u64::from(o.group_size) * u64::from(o.epochs),
        Ordering::Relaxed,
    );
    progress.changed();
    if !run.validation.is_empty() && !run.dir.join("baseline.json").is_file() {
        progress.phase(0, "validating the starting library");
        let v = l.validate().await?;
        write_json(&run.dir.join("baseline.json"), &v)?;
    }
    for step in 1..=run.info.steps {
        let done = run.step_dir(step).join("result.json");
        if done.is_file() {
            progress.rollouts_done.fetch_add(
                (run.batch(step).1.len() as u64) * u64::from(o.group_size),
                Ordering::Relaxed,
            );
            progress.changed();
            continue;
        }
        let (before, started) = (l.meter.read(), std::time::Instant::now());
        let mut result = l.step(step).await?;
        result.cost = Some(records::LearningCost {
            rollouts: result.rollouts as u64,
            calls: l.meter.read().since(&before),
            wall_secs: started.elapsed().as_secs_f64(),
        });
        write_json(&done, &result)?;
        tracing::info!(
            run = %run.info.id, step, reward = result.mean_reward, mixed = result.mixed_groups,
            version = ?result.version, "learning step done"
        );
    }
    summarize(ctx, run)
}

/// The run's summary, written beside its steps with the progress chart.
fn summarize(ctx: &Context, run: &Run) -> Result<RunSummary> {
    let o = &run.info.options;
    let lib = ctx.store.library(&o.library)?;
    let summary = RunSummary::of(run, &o.library, Some(&lib));
    write_json(&run.dir.join("summary.json"), &summary)?;
    std::fs::write(
        run.dir.join("progress.svg"),
        super::plot::run_chart(&summary),
    )
    .map_err(|e| io("writing progress.svg", e))?;
    Ok(summary)
}

impl RunSummary {
    /// What `run` has done so far, with `library` as it stands (when it can be opened).
    pub fn of(run: &Run, library: &str, lib: Option<&crate::experience::Library>) -> RunSummary {
        let steps = run.results();
        let cost = steps
            .iter()
            .filter_map(|r| r.cost)
            .fold(Default::default(), records::LearningCost::plus);
        RunSummary {
            run: run.info.id.clone(),
            dir: run.dir.clone(),
            library: library.to_owned(),
            steps,
            baseline_validation: run.baseline(),
            version: lib.map(|l| l.version()).unwrap_or(0),
            experiences: lib.map(|l| l.len()).unwrap_or(0),
            cost,
        }
    }
}

fn rename_param(e: Error, param: &str) -> Error {
    match e {
        Error::NotFound { message, .. } => Error::NotFound {
            message,
            param: Some(param.to_owned()),
        },
        other => other,
    }
}

/// The groups worth comparing: tasks with at least two finished attempts whose rewards differ.
fn mixed_groups<'a>(ok: impl Iterator<Item = &'a Rollout>) -> Vec<(usize, Vec<&'a Rollout>)> {
    let mut groups: BTreeMap<usize, Vec<&Rollout>> = BTreeMap::new();
    for r in ok {
        groups.entry(r.task).or_default().push(r);
    }
    groups
        .into_iter()
        .filter(|(_, g)| g.len() >= 2 && g.iter().any(|r| r.reward != g[0].reward))
        .collect()
}

impl<'a> Learner<'a> {
    /// The models and the scoring a run needs, resolved before its first step; the library
    /// is created if it does not exist yet.
    fn new(
        ctx: &'a Context,
        router: &Router,
        run: &'a Run,
        progress: &'a Progress,
    ) -> Result<Self> {
        let o = &run.info.options;
        // A resumed run's options come from its directory, which may have been edited by hand.
        o.check(&ctx.bounds)?;
        let meter = Arc::new(crate::backend::Meter::default());
        let counted = |b: Arc<dyn Backend>| crate::backend::Counting::wrap(b, meter.clone());
        let mut rollout =
            router.resolve(&o.model, Some(crate::router::Method::Direct.name()), None)?;
        rollout.backend = counted(rollout.backend);
        let learner = counted(
            router
                .resolve(o.learner(), None, None)
                .map_err(|e| rename_param(e, "learner_model"))?
                .backend,
        );
        let scoring = Scoring::parse(o.verifier.as_deref().unwrap_or(&run.info.default_verifier))?;
        let rule = match Scoring::parse(&run.info.default_verifier)? {
            Scoring::Rule(v) => v,
            Scoring::Judge => Verifier::Exact,
        };
        let judge = match scoring {
            Scoring::Judge => Some(Judge {
                backend: counted(
                    router
                        .resolve(o.judge_model.as_deref().unwrap_or(o.learner()), None, None)
                        .map_err(|e| rename_param(e, "judge_model"))?
                        .backend,
                ),
                prompts: ctx.prompts.clone(),
                retries: o.retries,
                max_tokens: 128,
                constrain: ctx.settings.constrain,
            }),
            Scoring::Rule(_) => None,
        };
        if ctx.store.library(&o.library).is_err() {
            ctx.store.create(&o.library)?;
        }
        let constrained = ctx.settings.constrain && learner.constrains();
        Ok(Learner {
            ctx,
            run,
            rollout,
            learner,
            constrained,
            replies: Default::default(),
            scoring,
            judge,
            rule,
            progress,
            meter,
        })
    }
}

impl Learner<'_> {
    fn options(&self) -> &LearnOptions {
        &self.run.info.options
    }

    async fn step(&self, step: u64) -> Result<StepResult> {
        let o = self.options();
        let dir = self.run.step_dir(step);
        std::fs::create_dir_all(&dir).map_err(|e| io(&dir.display().to_string(), e))?;
        let lib = self.ctx.store.library(&o.library)?;
        let (epoch, batch) = self.run.batch(step);
        let mut result = StepResult::empty(step, epoch, batch, lib.len());
        let message = self.run.message(step);
        if self.already_done(&lib, &message, &mut result) {
            return Ok(result);
        }

        let snapshot = lib.all();
        self.progress.phase(step, "attempts");
        let rollouts = self.rollouts(&result.tasks).await?;
        write_lines(&dir.join("rollouts.jsonl"), &rollouts)?;
        let ok = || rollouts.iter().filter(|r| r.error.is_none());
        result.rollouts = rollouts.len();
        result.failed_rollouts = rollouts.len() - ok().count();
        result.mean_reward = mean(ok().map(|r| r.reward));

        self.progress.phase(step, "comparing attempts");
        let mixed = mixed_groups(ok());
        result.skipped_groups = result.tasks.len() - mixed.len();
        let work: Vec<_> = mixed
            .into_iter()
            .map(|(task, group)| self.group(task, group, &snapshot))
            .collect();
        let records: Vec<GroupRecord> = bounded(work, o.concurrency.div_ceil(2)).await?;
        write_json(&dir.join("groups.json"), &records)?;
        result.mixed_groups = records.len();

        let proposals: Vec<Proposal> = records
            .iter()
            .flat_map(|g| g.proposals.iter().cloned())
            .collect();
        if !proposals.is_empty() {
            self.progress.phase(step, "consolidating");
            let c = self.consolidate(proposals, &snapshot).await?;
            write_json(&dir.join("consolidation.json"), &c)?;
            let changes = self.changes(step, &records, &c);
            if !changes.is_empty() {
                self.settle(step, &message, &snapshot, changes, &mut result)
                    .await?;
                result.library_size = lib.len();
            }
        }
        if !self.run.validation.is_empty() {
            self.progress.phase(step, "validating");
            result.validation = Some(self.validate().await?);
        }
        result.replies = LearnerReplies {
            constrained: self.constrained,
            ..std::mem::take(&mut *self.replies.lock().expect("the tally is never poisoned"))
        };
        Ok(result)
    }

    /// A crash between the commit and result.json: the step is done, only its record is
    /// missing. It is rebuilt from the library's log instead of learning the step twice.
    fn already_done(
        &self,
        lib: &crate::experience::Library,
        message: &str,
        result: &mut StepResult,
    ) -> bool {
        result.proposed = lib
            .proposals()
            .into_iter()
            .filter(|p| p.origin.message == message)
            .map(|p| p.id)
            .collect();
        result.version = lib
            .versions()
            .into_iter()
            .find(|v| v.message == message)
            .map(|v| v.version);
        result.version.is_some() || !result.proposed.is_empty()
    }

    /// The consolidated operations as changes to the library; traffic tasks cite what they
    /// came from: every group that proposed something.
    fn changes(&self, step: u64, records: &[GroupRecord], c: &Consolidation) -> Vec<Change> {
        let sources: Vec<String> = records
            .iter()
            .filter(|g| !g.proposals.is_empty())
            .filter_map(|g| self.run.tasks[g.task].origin.clone())
            .flat_map(|o| o.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .collect();
        let o = self.options();
        ops::to_changes(&c.result, &self.run.info.id, step, &o.tags, &sources)
    }

    /// Commits a step's changes as one version (with the gate's decision, when a gate let
    /// them through) and records which ids each kind of op touched.
    async fn commit(
        &self,
        message: &str,
        changes: Vec<Change>,
        gate: Option<serde_json::Value>,
        result: &mut StepResult,
    ) -> Result<()> {
        let store = self.ctx.store.clone();
        let (library, message) = (self.options().library.clone(), message.to_owned());
        let v = tokio::task::spawn_blocking(move || match gate {
            Some(g) => store.commit_gated(&library, &message, changes, g),
            None => store.commit(&library, &message, changes),
        })
        .await
        .map_err(Error::internal)??;
        result.version = Some(v.version);
        for op in &v.ops {
            let list = match op {
                crate::experience::Op::Add { .. } => &mut result.added,
                crate::experience::Op::Update { .. } => &mut result.updated,
                crate::experience::Op::Delete { .. } => &mut result.deleted,
                crate::experience::Op::Restore { .. } => continue,
            };
            list.push(op.id().to_owned());
        }
        Ok(())
    }

    /// What becomes of a step's changes: committed at once (`promote: always`, no review), or
    /// measured against the parent by the gate, then committed with its decision when they
    /// gained, and otherwise (or when a person is to review them) held as proposals that carry
    /// the measurement.
    async fn settle(
        &self,
        step: u64,
        message: &str,
        parent: &[Experience],
        changes: Vec<Change>,
        result: &mut StepResult,
    ) -> Result<()> {
        let lib = self.ctx.store.library(&self.options().library)?;
        let settings = lib.settings();
        let review = settings.review || self.options().review;
        if !settings.gated() && !review {
            return self.commit(message, changes, None, result).await;
        }
        self.progress.phase(step, "measuring the candidate");
        let review = review || settings.promote == crate::experience::Promote::Review;
        let decision = self
            .measure(lib.version(), parent, &changes, &settings, review)
            .await?;
        tracing::info!(run = %self.run.info.id, step, outcome = ?decision.outcome, reason = %decision.reason, "gate");
        result.gate = Some(decision.clone());
        let gate = serde_json::to_value(&decision).map_err(Error::internal)?;
        if decision.promoted() {
            self.commit(message, changes, Some(gate), result).await
        } else {
            result.proposed = self.propose(step, message, changes, Some(gate)).await?;
            Ok(())
        }
    }

    /// The gate's measurement of `parent` with `changes` against `parent` alone, on the
    /// run's held-out tasks, scored as the run scores its attempts.
    async fn measure(
        &self,
        version: u64,
        parent: &[Experience],
        changes: &[Change],
        settings: &crate::experience::Settings,
        review: bool,
    ) -> Result<super::gate::Decision> {
        let (min_gain, split) = (settings.gate.min_gain, self.run.info.gate_split.clone());
        if self.run.validation.is_empty() {
            return Ok(super::gate::Decision::unmeasured(version, min_gain, split));
        }
        let o = self.options();
        let ds = Dataset {
            name: "gate".into(),
            tasks: self.run.validation.clone(),
            verifier: self.rule.clone(),
            instruction: self.run.info.instruction.clone(),
        };
        let baseline = super::compare::Side {
            label: format!("version {version}"),
            experiences: Some(parent.to_vec()),
        };
        let candidate = super::compare::with_changes(parent, changes, "candidate")?;
        let plan = super::compare::Plan {
            route: &self.rollout,
            settings: settings.clone(),
            options: super::eval::EvalOptions {
                samples: 1,
                temperature: 0.0,
                max_tokens: o.max_tokens,
                concurrency: o.concurrency,
            },
            grader: self.grader(),
            confidence: settings.gate.confidence,
        };
        let c =
            super::compare::compare(self.ctx, &plan, &baseline, &candidate, &ds, &|_| {}).await?;
        Ok(super::gate::Decision::from_comparison(
            c, version, min_gain, review, split,
        ))
    }

    /// How the run's answers are scored: its rule, or its judge.
    fn grader(&self) -> super::eval::Grader<'_> {
        match &self.judge {
            Some(j) => super::eval::Grader::Judge(j),
            None => super::eval::Grader::Rule(match &self.scoring {
                Scoring::Rule(v) => v,
                Scoring::Judge => &self.rule,
            }),
        }
    }

    /// Holds a step's changes as proposals (for review, or because the gate held them),
    /// with the gate's decision when there is one, and returns the proposals' ids.
    async fn propose(
        &self,
        step: u64,
        message: &str,
        changes: Vec<Change>,
        gate: Option<serde_json::Value>,
    ) -> Result<Vec<String>> {
        let origin = Origin {
            kind: "learned".into(),
            run: Some(self.run.info.id.clone()),
            step: Some(step),
            sources: vec![],
            message: message.to_owned(),
            gate,
        };
        let (store, library) = (self.ctx.store.clone(), self.options().library.clone());
        let made = tokio::task::spawn_blocking(move || store.propose(&library, changes, &origin))
            .await
            .map_err(Error::internal)??;
        Ok(made.into_iter().map(|p| p.id).collect())
    }

    /// `group_size` attempts at every task of the batch, scored. An attempt that fails after
    /// the retries is kept with its error and left out of its group.
    async fn rollouts(&self, batch: &[usize]) -> Result<Vec<Rollout>> {
        let o = self.options();
        let mut work = Vec::new();
        for &task in batch {
            for attempt in 0..o.group_size {
                work.push(async move {
                    let r = self.rollout(task, attempt).await;
                    self.progress.rollout_done();
                    r
                });
            }
        }
        let out = bounded(work, o.concurrency).await?;
        Ok(out)
    }

    async fn rollout(&self, task: usize, attempt: u32) -> Result<Rollout> {
        let o = self.options();
        let t = &self.run.tasks[task];
        let mut request = ChatRequest {
            priority: Priority::Background,
            messages: vec![
                Message::new(Role::System, self.run.info.instruction.clone()),
                Message::new(Role::User, t.question.clone()),
            ],
            sampling: Sampling {
                max_tokens: Some(o.max_tokens),
                temperature: Some(o.temperature),
                n: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        // The same selection as at inference, so the prior learned against is the prior
        // served; learning does not count as use.
        let opts = crate::methods::Options {
            context_length: self.rollout.backend.context_length(),
            ..Default::default()
        };
        let chosen = prior::choose(self.ctx, &o.library, &request, &opts).await?;
        if !chosen.experiences.is_empty() {
            let prior = prior::render(self.ctx, &chosen.experiences)?;
            prior::apply_prior(&mut request, &prior);
        }
        let policy = crate::retry::Policy {
            retries: o.retries as usize,
            first: std::time::Duration::from_millis(500),
            max: std::time::Duration::from_secs(10),
            deadline: None,
        };
        let backend = &self.rollout.backend;
        let error = match crate::retry::retry("learning attempt", policy, || {
            backend.complete(request.clone())
        })
        .await
        {
            Ok(c) => {
                let output = c
                    .choices
                    .into_iter()
                    .next()
                    .map(|c| c.text)
                    .unwrap_or_default();
                let (reward, critique) = match (&self.scoring, &self.judge) {
                    (Scoring::Judge, Some(j)) => {
                        let (r, why) = j.grade(&t.question, &output, &t.answer).await?;
                        (r, Some(why))
                    }
                    (Scoring::Rule(v), _) => (v.score(&output, &t.answer), None),
                    (Scoring::Judge, None) => {
                        unreachable!("a judge is built for judge scoring")
                    }
                };
                return Ok(Rollout {
                    task,
                    attempt,
                    output,
                    reward,
                    critique,
                    error: None,
                });
            }
            // Overload and timeouts that outlasted the retries leave the attempt out; anything
            // else would fail every attempt and fails the step.
            Err(e) if crate::retry::transient(&e) => Some(e.to_string()),
            Err(e) => return Err(e),
        };
        tracing::warn!(task, attempt, error = ?error, "attempt failed after retries; left out");
        Ok(Rollout {
            task,
            attempt,
            output: String::new(),
            reward: 0.0,
            critique: None,
            error,
        })
    }

    /// One learner call; retried (sampling, since a greedy retry would say the same again)
    /// until `parse` accepts the reply. `Err(reason)` once the retries are spent. Where the
    /// learner can be constrained, the reply is decoded under `grammar` (the form `parse`
    /// reads), so that a reply is lost only to the token limit.
    ///
    /// With `whole_lines`, a reply cut off by `learner_max_tokens` loses its last line before
    /// parsing: a half-written operation ("ADD: Short", the start of a copied format example)
    /// would otherwise parse as a complete one and reach the library.
    async fn ask<T>(
        &self,
        kind: Ask,
        user: String,
        grammar: Option<String>,
        parse: impl Fn(&str) -> std::result::Result<T, String>,
    ) -> Result<Asked<T>> {
        let o = self.options();
        let whole_lines = kind != Ask::Summary;
        let format = match grammar {
            Some(g) if self.constrained => OutputFormat::Grammar(g),
            _ => OutputFormat::Text,
        };
        let system = self.ctx.prompts.render(
            "learner_system.j2",
            minijinja::context! { instruction => self.run.info.instruction },
        )?;
        let mut last = Asked {
            parsed: Err("no reply".to_owned()),
            reply: String::new(),
            cut: false,
        };
        for attempt in 0..=o.retries {
            let out = self
                .learner
                .complete(ChatRequest {
                    priority: Priority::Background,
                    messages: vec![
                        Message::new(Role::System, system.clone()),
                        Message::new(Role::User, user.clone()),
                    ],
                    sampling: Sampling {
                        max_tokens: Some(o.learner_max_tokens),
                        temperature: Some(if attempt == 0 { 0.0 } else { 0.7 }),
                        n: 1,
                        format: format.clone(),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .await?;
            let (reply, cut) = out
                .choices
                .into_iter()
                .next()
                .map(|c| (c.text, c.finish_reason == FinishReason::Length))
                .unwrap_or_default();
            let parsed = parse(if whole_lines && cut {
                whole_lines_of(&reply)
            } else {
                &reply
            });
            self.replies
                .lock()
                .expect("the tally is never poisoned")
                .count(kind, parsed.is_ok());
            match parsed {
                Ok(v) => {
                    return Ok(Asked {
                        parsed: Ok(v),
                        reply,
                        cut,
                    })
                }
                Err(why) => {
                    tracing::debug!(attempt, reason = %why, "learner reply did not parse");
                    last = Asked {
                        parsed: Err(format!("{why} (after {} attempts)", attempt + 1)),
                        reply,
                        cut,
                    };
                }
            }
        }
        Ok(last)
    }

    async fn group(
        &self,
        task: usize,
        group: Vec<&Rollout>,
        snapshot: &[Experience],
    ) -> Result<GroupRecord> {
        let o = self.options();
        let t = &self.run.tasks[task];
        let mut record = GroupRecord {
            task,
            question: t.question.clone(),
            answer: t.answer.clone(),
            rewards: group.iter().map(|r| r.reward).collect(),
            summaries: vec![],
            advantage_reply: None,
            lessons: None,
            update_reply: None,
            advantage_cut: false,
            update_cut: false,
            proposals: vec![],
            rejected: vec![],
            skipped: None,
        };
        record.summaries = self.summaries(t, &group).await?;

        let attempts: Vec<_> = group
            .iter()
            .zip(&record.summaries)
            .map(|(r, s)| minijinja::context! { reward => r.reward, summary => s })
            .collect();
        let prompt = self.ctx.prompts.render(
            "group_advantage.j2",
            minijinja::context! {
                question => t.question, answer => t.answer, attempts => attempts,
                max_experiences => o.max_lessons,
            },
        )?;
        let max_chars = self.ctx.store.options().max_text_chars;
        let grammar = ops::lessons_grammar(o.max_lessons, max_chars);
        let asked = self
            .ask(Ask::Comparison, prompt, Some(grammar), ops::parse_lessons)
            .await?;
        record.advantage_reply = Some(asked.reply);
        record.advantage_cut = asked.cut;
        let lessons = match asked.parsed {
            Ok(l) => l,
            Err(why) => {
                tracing::warn!(task, reason = %why, "group advantage skipped");
                record.skipped = Some(format!("comparison: {why}"));
                return Ok(record);
            }
        };
        record.lessons = Some(lessons.clone());

        let lib = self.ctx.store.library(&self.options().library)?;
        let prompt = self.ctx.prompts.render(
            "group_update.j2",
            minijinja::context! {
                experiences => exp_ctx(snapshot, &lib),
                lessons => lessons,
            },
        )?;
        let ids = snapshot.iter().map(|e| e.id.as_str());
        let grammar = ops::operations_grammar(ids, o.max_lessons, max_chars);
        let asked = self
            .ask(Ask::Operations, prompt, Some(grammar), ops::parse)
            .await?;
        record.update_reply = Some(asked.reply);
        record.update_cut = asked.cut;
        match asked.parsed {
            Ok(p) => {
                let (ok, rejected) =
                    ops::check(p, snapshot, self.ctx.store.options().max_text_chars);
                record.proposals = ok;
                record.rejected = rejected;
            }
            Err(why) => {
                tracing::warn!(task, reason = %why, "group operations skipped");
                record.skipped = Some(format!("operations: {why}"));
            }
        }
        Ok(record)
    }

    /// Each attempt of a group in a few words, with its reward and critique in view; two at a
    /// time. An unusable summary still lets the comparison see the attempt itself.
    async fn summaries(&self, t: &super::dataset::Task, group: &[&Rollout]) -> Result<Vec<String>> {
        let work: Vec<_> = group
            .iter()
            .map(|r| async move {
                let prompt = self.ctx.prompts.render(
                    "rollout_summary.j2",
                    minijinja::context! {
                        question => t.question, answer => t.answer, attempt => r.output,
                        reward => r.reward, critique => r.critique,
                    },
                )?;
                let summary = self
                    .ask(Ask::Summary, prompt, None, non_empty)
                    .await?
                    .parsed;
                Ok::<_, Error>(summary.unwrap_or_else(|_| {
                    format!("(no summary; the attempt read:) {}", reply_or(&r.output))
                }))
            })
            .collect();
        bounded(work, 2).await
    }

    async fn consolidate(
        &self,
        proposals: Vec<Proposal>,
        snapshot: &[Experience],
    ) -> Result<Consolidation> {
        let by_id: Vec<_> = snapshot
            .iter()
            .map(|e| {
                minijinja::context! {
                    id => e.id, text => e.text,
                    proposals => proposals.iter()
                        .filter(|p| p.id.as_deref() == Some(e.id.as_str()))
                        .map(Proposal::line).collect::<Vec<_>>(),
                }
            })
            .collect();
        let adds: Vec<String> = proposals
            .iter()
            .filter(|p| p.op == ops::Kind::Add)
            .filter_map(|p| p.text.clone())
            .collect();
        let prompt = self.ctx.prompts.render(
            "batch_consolidate.j2",
            minijinja::context! { experiences => by_id, adds => adds },
        )?;
        let max = self.ctx.store.options().max_text_chars;
        // The merge has at most as many changes as were proposed.
        let ids = snapshot.iter().map(|e| e.id.as_str());
        let grammar = ops::operations_grammar(ids, proposals.len(), max);
        let asked = self
            .ask(Ask::Consolidation, prompt, Some(grammar), ops::parse)
            .await?;
        let mut c = Consolidation {
            proposals: proposals.clone(),
            reply: Some(asked.reply),
            reply_cut: asked.cut,
            rejected: vec![],
            fallback: None,
            duplicates: vec![],
            result: vec![],
        };
        let merged = match asked.parsed {
            Ok(p) => {
                let (ok, rejected) = ops::check(p, snapshot, max);
                c.rejected = rejected;
                if ok.is_empty() {
                    c.fallback = Some("the merged list held no applicable change".into());
                    proposals
                } else {
                    ok
                }
            }
            Err(why) => {
                tracing::warn!(reason = %why, "consolidation reply unusable; merging by rule");
                c.fallback = Some(why);
                proposals
            }
        };
        // The rules hold whatever the model wrote.
        c.result = ops::merge(merged, snapshot);
        c.duplicates = self.drop_duplicates(&mut c.result).await;
        Ok(c)
    }

    /// Leaves out the ADDs whose embedding is within the library's `retrieval.duplicate_at`
    /// of an experience or of an earlier ADD of this step: the lesson is already there, and a
    /// second copy would only crowd the prior. Without an embedding model (or when it fails)
    /// nothing is left out.
    async fn drop_duplicates(&self, result: &mut Vec<Proposal>) -> Vec<Duplicate> {
        let adds: Vec<(usize, String)> = result
            .iter()
            .enumerate()
            .filter(|(_, p)| p.op == ops::Kind::Add)
            .filter_map(|(i, p)| p.text.clone().map(|t| (i, t)))
            .collect();
        if adds.is_empty() {
            return vec![];
        }
        let texts: Vec<String> = adds.iter().map(|(_, t)| t.clone()).collect();
        let near = match self
            .ctx
            .store
            .near_duplicates(&self.options().library, &texts)
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "duplicates not checked");
                return vec![];
            }
        };
        let mut dropped = Vec::new();
        let mut out = Vec::new();
        for ((i, text), n) in adds.iter().zip(near) {
            let Some((of, similarity)) = n else { continue };
            let of = match of.strip_prefix('#').and_then(|j| j.parse::<usize>().ok()) {
                Some(j) => texts[j].clone(),
                None => of,
            };
            dropped.push(*i);
            out.push(Duplicate {
                text: text.clone(),
                of,
                similarity,
            });
        }
        let mut i = 0;
        result.retain(|_| {
            i += 1;
            !dropped.contains(&(i - 1))
        });
        out
    }

    async fn validate(&self) -> Result<Validation> {
        let o = self.options();
        let ds = Dataset {
            name: "validation".into(),
            tasks: self.run.validation.clone(),
            verifier: self.rule.clone(),
            instruction: self.run.info.instruction.clone(),
        };
        let route = Route {
            library: Some(o.library.clone()),
            ..self.rollout.clone()
        };
        let arm = super::eval::run_arm(
            self.ctx,
            &route,
            &ds,
            &super::eval::EvalOptions {
                samples: 1,
                temperature: 0.0,
                max_tokens: o.max_tokens,
                concurrency: o.concurrency,
            },
            &|_| {},
        )
        .await
        .map_err(|e| Error::internal(format!("validation: {e:#}")))?;
        Ok(Validation {
            accuracy: arm.accuracy,
            ci95: arm.ci95,
            tasks: arm.tasks,
        })
    }
}

/// The lessons as the learner sees them, each with the feedback on its current text (how
/// often answers it went into were rated helpful or harmful), so it can fix or drop a lesson
/// that users' feedback blames.
fn exp_ctx(snapshot: &[Experience], lib: &crate::experience::Library) -> Vec<minijinja::Value> {
    snapshot
        .iter()
        .map(|e| {
            let votes = lib.credit(&e.id).current;
            minijinja::context! {
                id => e.id,
                text => e.text,
                helpful => votes.helpful,
                harmful => votes.harmful,
            }
        })
        .collect()
}

/// One learner reply: what was read from it, the reply as written, and whether it was cut off
/// by `learner_max_tokens` (then its last line was not read).
struct Asked<T> {
    parsed: std::result::Result<T, String>,
    reply: String,
    cut: bool,
}

/// The lines of a cut-off reply that were finished: all but the last.
fn whole_lines_of(reply: &str) -> &str {
    reply.rsplit_once('\n').map_or("", |(whole, _)| whole)
}

fn non_empty(reply: &str) -> std::result::Result<String, String> {
    let t = ops::strip_thinking(reply);
    if t.trim().is_empty() {
        Err("empty reply".into())
    } else {
        Ok(t)
    }
}

fn reply_or(s: &str) -> &str {
    if s.trim().is_empty() {
        "(nothing)"
    } else {
        s
    }
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// Runs `work` with at most `n` futures in flight, in order; the first error wins. (The
/// futures are built in a loop rather than by a closure so that the spawned job stays `Send`.)
async fn bounded<T>(
    work: Vec<impl std::future::Future<Output = Result<T>>>,
    n: usize,
) -> Result<Vec<T>> {
    futures::stream::iter(work)
        .buffered(n.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

fn write_lines(path: &Path, items: &[impl Serialize]) -> Result<()> {
    let mut text = String::new();
    for i in items {
        text.push_str(&serde_json::to_string(i).map_err(Error::internal)?);
        text.push('\n');
    }
    crate::experience::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_off_reply_keeps_only_its_finished_lines() {
        // The CI failure this guards: "ADD: Short" (a format example cut mid-line) became a lesson.
        let reply = "ADD: Inside out: evaluate the innermost brackets first.\nADD: Short";
        assert_eq!(
            ops::parse(whole_lines_of(reply)).unwrap(),
            vec![Proposal::add(
                "Inside out: evaluate the innermost brackets first."
            )]
        );
        assert!(ops::parse(whole_lines_of("ADD: Short")).is_err());
    }
}
