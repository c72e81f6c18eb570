//! Iterative programmatic planning: the model writes pseudocode, then a `solve(obs)` program;
//! the program plays the training instances in the sandbox; the worst results (tracebacks
//! first, then the lowest rewards) go back to the model with the code, for up to R rounds;
//! the best program is kept. Direct elicitation (the model names each instance's actions) runs
//! beside it on the same evaluation instances, so one report compares the two and what each
//! costs in model calls.

use std::sync::Arc;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Family, Instance, Played};
use crate::backend::{Backend, ChatRequest, Message, OutputFormat, Role, Sampling, Usage};
use crate::error::{Error, Result};
use crate::prompts::Prompts;
use crate::sandbox::{self, Limits};

/// What one planning run is asked to do.
pub struct Spec {
    pub family: Family,
    /// The client's system prompt, sent as the system message of every model call.
    pub system: String,
    /// The user's own words about the task, added to every prompt (may be empty).
    pub task: String,
    /// Instances the program is refined on.
    pub train: Vec<Instance>,
    /// Instances the final comparison is made on; never shown to the model as feedback.
    pub eval: Vec<Instance>,
    /// Refinement rounds after the first program.
    pub rounds: u32,
    /// How many of the worst training results each refinement sees.
    pub feedback: usize,
    pub sampling: Sampling,
    pub limits: Limits,
    /// Also ask the model for each evaluation instance's actions directly.
    pub direct: bool,
    /// A program from the cache: play it without asking the model for a new one.
    pub reuse: Option<Cached>,
    /// Decode programs and direct action lists under their grammars where the backend can
    /// (`methods.constrain`).
    pub constrain: bool,
}

/// Seeds of generated training instances start here, away from the small seeds clients
/// usually evaluate on.
pub const TRAIN_SEED_BASE: u64 = 10_000;

impl Spec {
    /// A run of `family` as the configuration sets it up: the sandbox limits and the feedback
    /// count from `methods.plan`, `rounds` and the token limit defaulting to theirs, grammars
    /// as `methods.constrain` says. The CLI and the `plan` method both start here, then say
    /// what is theirs (prompts, `direct`, reuse).
    pub fn new(
        family: Family,
        methods: &crate::config::MethodsConfig,
        train: Vec<Instance>,
        eval: Vec<Instance>,
        rounds: Option<u32>,
        sampling: Sampling,
    ) -> Spec {
        let settings = &methods.plan;
        Spec {
            family,
            system: String::new(),
            task: String::new(),
            train,
            eval,
            rounds: rounds.unwrap_or(settings.rounds),
            feedback: settings.feedback,
            sampling: Sampling {
                max_tokens: Some(sampling.max_tokens.unwrap_or(settings.max_tokens)),
                n: 1,
                ..sampling
            },
            limits: Limits {
                time: std::time::Duration::from_secs(settings.program_time_secs),
                memory_bytes: settings.program_memory_mib << 20,
                ..Limits::default()
            },
            direct: false,
            reuse: None,
            constrain: methods.constrain,
        }
    }

    /// Checks the counts against the configured bounds; `names` are what the caller calls the
    /// training instances, the evaluation instances and the rounds, for the message.
    pub fn check(&self, bounds: &crate::config::Bounds, names: [&str; 3]) -> Result<()> {
        let max = bounds.max_plan_instances;
        for (name, n) in [(names[0], self.train.len()), (names[1], self.eval.len())] {
            if !(1..=max).contains(&n) {
                return Err(Error::invalid_param(
                    format!("{name} must be from 1 to {max} (bounds.max_plan_instances)"),
                    name,
                ));
            }
        }
        if self.rounds > bounds.max_plan_rounds {
            return Err(Error::invalid_param(
                format!(
                    "{} must be at most {} (bounds.max_plan_rounds)",
                    names[2], bounds.max_plan_rounds
                ),
                names[2],
            ));
        }
        Ok(())
    }
}

/// The first `n` generated training instances of `family`.
pub fn training_instances(family: Family, n: usize) -> Vec<Instance> {
    (TRAIN_SEED_BASE..TRAIN_SEED_BASE + n as u64)
        .map(|s| family.instance(s))
        .collect()
}

/// A kept program, as the cache stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cached {
    pub family: String,
    pub program: String,
    pub model: String,
    pub train: Summary,
    /// Model calls and tokens it took to write and refine the program.
    pub model_calls: u32,
    pub usage: Usage,
    /// Instances it has been played on since it was written, this run's included.
    pub instances_served: u64,
    pub created: String,
}

/// How a program did on a set of instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub instances: usize,
    pub success_rate: f64,
    pub mean_reward: f64,
    /// Instances where the program raised, timed out or returned something else than actions.
    pub errors: usize,
}

impl Summary {
    fn of(runs: &[Episode]) -> Summary {
        let n = runs.len().max(1) as f64;
        Summary {
            instances: runs.len(),
            success_rate: runs.iter().filter(|r| r.played.success).count() as f64 / n,
            mean_reward: runs.iter().map(|r| r.played.reward).sum::<f64>() / n,
            errors: runs.iter().filter(|r| r.error.is_some()).count(),
        }
    }

    /// Better means more successes, then more reward, then fewer programs that failed to run.
    fn better_than(&self, other: &Summary) -> bool {
        let key = |s: &Summary| (s.success_rate, s.mean_reward, -(s.errors as f64));
        key(self) > key(other)
    }
}

/// One instance played by a program or by direct elicitation.
#[derive(Debug, Clone, Serialize)]
pub struct Episode {
    pub instance: String,
    /// The first actions (at most 64).
    pub actions: Vec<String>,
    pub played: Played,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Direct elicitation: the start of the model's reply the actions were read from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// One program the model wrote and how it did on the training instances.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    /// 0 is the first program (after the pseudocode), 1.. are refinements.
    pub round: u32,
    pub code: String,
    pub train: Summary,
    /// The training instances whose results were shown to the model to write this program.
    pub feedback: Vec<String>,
    pub usage: Usage,
    pub model_calls: u32,
}

/// One way of solving the evaluation instances.
#[derive(Debug, Clone, Serialize)]
pub struct Arm {
    pub summary: Summary,
    /// Model calls per evaluation instance; for programs, what writing them cost spread over
    /// every instance they were played on.
    pub model_calls_per_instance: f64,
    pub tokens_per_instance: f64,
    pub runs: Vec<Episode>,
}

/// What a planning run did and what each arm cost.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub family: String,
    pub reused: bool,
    pub pseudocode: Option<String>,
    pub rounds: Vec<Round>,
    /// The kept program (the best round's, or the reused one).
    pub program: String,
    pub best_round: Option<u32>,
    /// Model calls and tokens spent on the program in this run.
    pub model_calls: u32,
    pub usage: Usage,
    /// Tokens spent on direct elicitation.
    pub direct_usage: Usage,
    pub direct: Option<Arm>,
    pub first_program: Option<Arm>,
    pub refined_program: Arm,
}

/// Where progress goes (a streaming client, a progress bar); receives small JSON objects.
pub type OnStage = Arc<dyn Fn(Value) + Send + Sync>;

struct Asker<'a> {
    backend: &'a dyn Backend,
    system: &'a str,
    sampling: &'a Sampling,
    usage: Usage,
    calls: u32,
    /// Replies are decoded under the grammar each call names.
    constrained: bool,
}

impl Asker<'_> {
    /// One model call; its reply is held to `grammar` where the run is constrained.
    async fn ask(&mut self, mut messages: Vec<Message>, grammar: Option<String>) -> Result<String> {
        if !self.system.is_empty() {
            messages.insert(0, Message::new(Role::System, self.system));
        }
        let format = match grammar {
            Some(g) if self.constrained => OutputFormat::Grammar(g),
            _ => self.sampling.format.clone(),
        };
        let done = self
            .backend
            .complete(ChatRequest {
                messages,
                sampling: Sampling {
                    n: 1,
                    format,
                    ..self.sampling.clone()
                },
                priority: Default::default(),
                ..Default::default()
            })
            .await?;
        self.calls += 1;
        self.usage.prompt_tokens += done.usage.prompt_tokens;
        self.usage.completion_tokens += done.usage.completion_tokens;
        Ok(done
            .choices
            .into_iter()
            .next()
            .map(|c| c.text)
            .unwrap_or_default())
    }
}

impl<'a> Asker<'a> {
    fn new(backend: &'a dyn Backend, spec: &'a Spec) -> Asker<'a> {
        Asker {
            backend,
            system: &spec.system,
            sampling: &spec.sampling,
            usage: Usage::default(),
            calls: 0,
            constrained: spec.constrain && backend.constrains(),
        }
    }
}

/// The programs a run wrote: every round, and the one it keeps.
#[derive(Default)]
struct Written {
    pseudocode: Option<String>,
    rounds: Vec<Round>,
    program: String,
    best_round: Option<u32>,
    /// The first program, to measure what refinement added.
    first_code: Option<String>,
}

/// What the steps of one run share: the spec, the prompts and where progress goes.
struct Planner<'a> {
    prompts: &'a Prompts,
    spec: &'a Spec,
    rules: Value,
    progress: &'a OnStage,
}

impl Planner<'_> {
    /// The program grammar at this run's token limit.
    fn program_grammar(&self) -> String {
        program_grammar(self.spec.sampling.max_tokens.unwrap_or(512))
    }

    /// The rules of the task family with the task and `extra` added, for a prompt.
    fn context(&self, extra: Value) -> Value {
        let mut ctx = self.rules.clone();
        ctx["task"] = json!(self.spec.task);
        if let (Value::Object(c), Value::Object(e)) = (&mut ctx, extra) {
            c.extend(e);
        }
        ctx
    }

    /// Pseudocode first, then a program from it, then refinements from the worst training
    /// failures until every training instance succeeds or the rounds run out.
    async fn write(&self, asker: &mut Asker<'_>) -> Result<Written> {
        let spec = self.spec;
        let example = spec.train[0].observation().to_string();
        let ask_plan = self.prompts.render(
            "plan_pseudocode.j2",
            self.context(json!({ "example": example })),
        )?;
        let mut messages = vec![Message::new(Role::User, ask_plan)];
        let plan = asker.ask(messages.clone(), None).await?;
        (self.progress)(json!({"stage": "pseudocode", "text": plan}));
        messages.push(Message::new(Role::Assistant, plan.clone()));
        messages.push(Message::new(
            Role::User,
            self.prompts.render("plan_code.j2", &self.rules)?,
        ));
        let code = extract_code(&asker.ask(messages, Some(self.program_grammar())).await?);
        let runs = play_all(&code, &spec.train, &spec.limits).await;
        // The pseudocode call counts towards the first program.
        let first = Round {
            round: 0,
            code,
            train: Summary::of(&runs),
            feedback: vec![],
            usage: asker.usage,
            model_calls: asker.calls,
        };
        (self.progress)(json!({"stage": "program", "round": 0, "train": first.train}));
        let mut best = (0usize, first.train, runs);
        let mut rounds = vec![first];
        for r in 1..=spec.rounds {
            if best.1.success_rate >= 1.0 {
                break;
            }
            let (round, runs) = self.refine(asker, r, &rounds[best.0].code, &best.2).await?;
            (self.progress)(json!({"stage": "refine", "round": r, "train": round.train}));
            if round.train.better_than(&best.1) {
                best = (rounds.len(), round.train, runs);
            }
            rounds.push(round);
        }
        Ok(Written {
            pseudocode: Some(plan),
            program: rounds[best.0].code.clone(),
            best_round: Some(rounds[best.0].round),
            first_code: Some(rounds[0].code.clone()),
            rounds,
        })
    }

    /// One refinement: the model sees `code` and its worst training results and writes a
    /// new program, which is played on the training instances.
    async fn refine(
        &self,
        asker: &mut Asker<'_>,
        r: u32,
        code: &str,
        runs: &[Episode],
    ) -> Result<(Round, Vec<Episode>)> {
        let train = &self.spec.train;
        let worst = worst(runs, self.spec.feedback);
        let failures: Vec<Value> = worst
            .iter()
            .map(|&i| {
                json!({
                    "render": train[i].render(),
                    "obs": train[i].observation().to_string(),
                    "result": describe(&runs[i]),
                })
            })
            .collect();
        let keys: Vec<String> = match train[0].observation() {
            Value::Object(m) => m.keys().cloned().collect(),
            _ => vec![],
        };
        let prompt = self.prompts.render(
            "plan_refine.j2",
            self.context(json!({"code": code, "failures": failures, "keys": keys.join(", ")})),
        )?;
        let before = (asker.usage, asker.calls);
        let reply = asker
            .ask(
                vec![Message::new(Role::User, prompt)],
                Some(self.program_grammar()),
            )
            .await?;
        let code = extract_code(&reply);
        let runs = play_all(&code, train, &self.spec.limits).await;
        let round = Round {
            round: r,
            code,
            train: Summary::of(&runs),
            feedback: worst.iter().map(|&i| train[i].id()).collect(),
            usage: sub(asker.usage, before.0),
            model_calls: asker.calls - before.1,
        };
        Ok((round, runs))
    }

    /// The kept program (and the first one, when refinement changed it) on the evaluation
    /// instances, which the model never saw as feedback. A program's cost is spread over
    /// every instance it has been played on.
    async fn evaluate(&self, written: &Written, asker: &Asker<'_>) -> (Option<Arm>, Arm) {
        let spec = self.spec;
        let refined_runs = play_all(&written.program, &spec.eval, &spec.limits).await;
        let (calls, usage, served) = match &spec.reuse {
            Some(c) => (
                c.model_calls,
                c.usage,
                c.instances_served + spec.eval.len() as u64,
            ),
            None => (
                asker.calls,
                asker.usage,
                (spec.train.len() + spec.eval.len()) as u64,
            ),
        };
        let amortised = |runs: Vec<Episode>| Arm {
            summary: Summary::of(&runs),
            model_calls_per_instance: calls as f64 / served as f64,
            tokens_per_instance: usage.total() as f64 / served as f64,
            runs,
        };
        let first_program = match &written.first_code {
            Some(code) if *code != written.program => {
                Some(amortised(play_all(code, &spec.eval, &spec.limits).await))
            }
            Some(_) => Some(amortised(refined_runs.clone())),
            None => None,
        };
        (first_program, amortised(refined_runs))
    }

    /// The baseline: the model asked for each evaluation instance's actions directly.
    async fn direct(&self, asker: &mut Asker<'_>) -> Result<Arm> {
        let mut runs = Vec::new();
        for inst in &self.spec.eval {
            let prompt = self.prompts.render(
                "plan_direct.j2",
                self.context(json!({
                    "render": inst.render(),
                    "obs": inst.observation().to_string(),
                })),
            )?;
            let family = self.spec.family;
            let grammar = actions_grammar(&family.actions(), family.max_actions());
            let reply = asker
                .ask(vec![Message::new(Role::User, prompt)], Some(grammar))
                .await?;
            let actions = parse_actions(&reply);
            runs.push(Episode {
                instance: inst.id(),
                played: inst.play(&actions),
                actions: actions.into_iter().take(64).collect(),
                error: None,
                reply: Some(reply.chars().take(400).collect()),
            });
        }
        let n = self.spec.eval.len() as f64;
        Ok(Arm {
            summary: Summary::of(&runs),
            model_calls_per_instance: asker.calls as f64 / n,
            tokens_per_instance: asker.usage.total() as f64 / n,
            runs,
        })
    }
}

/// Writes, refines and evaluates a program as `spec` says (or plays `spec.reuse`).
pub async fn run(
    backend: &dyn Backend,
    prompts: &Prompts,
    spec: &Spec,
    progress: OnStage,
) -> Result<PlanReport> {
    if spec.train.is_empty() && spec.reuse.is_none() {
        return Err(Error::invalid(
            "planning needs at least one training instance",
            "experient",
        ));
    }
    if spec.eval.is_empty() {
        return Err(Error::invalid(
            "planning needs at least one evaluation instance",
            "experient",
        ));
    }
    let planner = Planner {
        prompts,
        spec,
        rules: spec.family.rules_context(),
        progress: &progress,
    };
    let mut asker = Asker::new(backend, spec);
    let written = match &spec.reuse {
        Some(cached) => Written {
            program: cached.program.clone(),
            ..Written::default()
        },
        None => planner.write(&mut asker).await?,
    };
    progress(json!({"stage": "evaluate"}));
    let (first_program, refined_program) = planner.evaluate(&written, &asker).await;
    let mut direct_asker = Asker::new(backend, spec);
    let direct = if spec.direct {
        progress(json!({"stage": "direct"}));
        Some(planner.direct(&mut direct_asker).await?)
    } else {
        None
    };
    Ok(PlanReport {
        family: spec.family.name(),
        reused: spec.reuse.is_some(),
        pseudocode: written.pseudocode,
        rounds: written.rounds,
        program: written.program,
        best_round: written.best_round,
        model_calls: asker.calls,
        usage: asker.usage,
        direct_usage: direct_asker.usage,
        direct,
        first_program,
        refined_program,
    })
}

/// [`run`] with the family's program cache: a kept program is reused unless `refresh`; a newly
/// written one is kept when it beats the kept one on its training instances.
pub async fn run_cached(
    backend: &dyn Backend,
    prompts: &Prompts,
    cache: &super::cache::ProgramCache,
    model: &str,
    mut spec: Spec,
    refresh: bool,
    progress: OnStage,
) -> Result<PlanReport> {
    let family = spec.family.name();
    if !refresh {
        spec.reuse = cache.get(&family);
    }
    let report = run(backend, prompts, &spec, progress).await?;
    let saved = if report.reused {
        cache.served(&family, spec.eval.len() as u64)
    } else {
        let best = report
            .rounds
            .iter()
            .find(|r| Some(r.round) == report.best_round)
            .map(|r| r.train)
            .unwrap_or_default();
        cache
            .offer(&Cached {
                family: family.clone(),
                program: report.program.clone(),
                model: model.to_owned(),
                train: best,
                model_calls: report.model_calls,
                usage: report.usage,
                instances_served: (spec.train.len() + spec.eval.len()) as u64,
                created: chrono::Utc::now().to_rfc3339(),
            })
            .map(|_| ())
    };
    if let Err(e) = saved {
        tracing::warn!(family, error = %e, "could not update the program cache");
    }
    Ok(report)
}

fn sub(a: Usage, b: Usage) -> Usage {
    Usage {
        prompt_tokens: a.prompt_tokens - b.prompt_tokens,
        completion_tokens: a.completion_tokens - b.completion_tokens,
    }
}

/// Indices of the `k` worst runs: failures to run first, then failures to succeed, lowest
/// reward first (the reference harness sorted these the wrong way round).
fn worst(runs: &[Episode], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..runs.len()).collect();
    idx.sort_by(|&a, &b| {
        let key = |r: &Episode| (r.error.is_none(), r.played.success);
        key(&runs[a])
            .cmp(&key(&runs[b]))
            .then(runs[a].played.reward.total_cmp(&runs[b].played.reward))
    });
    idx.truncate(k);
    idx
}

/// The result of one run in words, for the refinement prompt.
fn describe(run: &Episode) -> String {
    if let Some(e) = &run.error {
        return format!("The program failed:\n{e}");
    }
    let shown: Vec<&str> = run.actions.iter().take(40).map(String::as_str).collect();
    format!(
        "actions {:?}{}; reward {:.3}; {}",
        shown,
        if run.actions.len() > shown.len() {
            " ..."
        } else {
            ""
        },
        run.played.reward,
        if run.played.success {
            "succeeded"
        } else {
            "failed"
        },
    ) + &if run.played.note.is_empty() {
        String::new()
    } else {
        format!(": {}", run.played.note)
    }
}

/// The longest action list a direct reply may write under its grammar.
const MAX_DIRECT_ACTIONS: usize = 100;

/// A direct reply's form as a grammar (llguidance's Lark): a list of quoted actions of the
/// family, at most as many as count in an episode. Every reply held to it is read by
/// [`parse_actions`], and none names an action the game does not have.
pub fn actions_grammar(actions: &[&str], max: usize) -> String {
    let names: Vec<String> = actions
        .iter()
        .map(|a| serde_json::to_string(&format!("\"{a}\"")).expect("a string serialises"))
        .collect();
    let more = match max.clamp(1, MAX_DIRECT_ACTIONS) - 1 {
        0 => String::new(),
        n => format!(" (\",\" \" \"? action){{0,{n}}}"),
    };
    format!(
        "start: \"[\" action{more} \"]\" END?\naction: {}\nEND: /\\n[\\n ]{{0,8}}/\n",
        names.join(" | ")
    )
}

/// A program reply's form as a grammar: one ```python block and nothing else, whose code
/// ends within `max_tokens` tokens (llguidance's `max_tokens` on the code), so that the
/// block is always closed and a reply is never cut inside its program. The code holds no
/// backticks, which is what lets the fence end it.
pub fn program_grammar(max_tokens: u32) -> String {
    // The fences and the end of turn take a few tokens of the budget.
    let code = max_tokens.saturating_sub(8).max(8);
    format!(
        "start: \"```python\\n\" code \"```\" END?\ncode[max_tokens={code}]: CODE\n\
         CODE: /[^`]+/\nEND: /\\n[\\n ]{{0,8}}/\n"
    )
}

/// The program in a reply: the last ```python block, else the last fenced block, else the
/// whole reply.
pub fn extract_code(reply: &str) -> String {
    let blocks: Vec<&str> = reply.split("```").collect();
    // Odd-numbered pieces are inside fences.
    let inside: Vec<&str> = blocks.iter().skip(1).step_by(2).copied().collect();
    let pick = inside
        .iter()
        .rev()
        .find(|b| b.starts_with("python") && b.contains("def solve"))
        .or_else(|| inside.iter().rev().find(|b| b.contains("def solve")))
        .or(inside.last());
    match pick {
        Some(b) => {
            let b = b
                .strip_prefix("python")
                .or_else(|| b.strip_prefix("py"))
                .unwrap_or(b);
            b.trim_matches('\n').to_owned()
        }
        None => reply.trim().to_owned(),
    }
}

/// Actions from a direct reply: the strings of its last `[...]` list, else its words that
/// look like actions.
pub fn parse_actions(reply: &str) -> Vec<String> {
    let list = reply.rfind('[').and_then(|start| {
        reply[start..]
            .find(']')
            .map(|end| &reply[start + 1..start + end])
    });
    let quoted = |s: &str| -> Vec<String> {
        s.split(['"', '\''])
            .skip(1)
            .step_by(2)
            .map(|a| a.trim().to_owned())
            .filter(|a| !a.is_empty())
            .collect()
    };
    if let Some(l) = list {
        let got = quoted(l);
        if !got.is_empty() {
            return got;
        }
    }
    reply
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            super::minigrid::Action::parse(w).is_some_and(|_| w.len() > 2)
                || matches!(
                    w.to_ascii_uppercase().as_str(),
                    "UP" | "DOWN"
                        | "TAKE"
                        | "DROP"
                        | "UP_LEFT"
                        | "UP_RIGHT"
                        | "DOWN_LEFT"
                        | "DOWN_RIGHT"
                )
        })
        .map(str::to_owned)
        .collect()
}

async fn play_all(code: &str, instances: &[Instance], limits: &Limits) -> Vec<Episode> {
    // Futures made by an iterator, not a stream combinator, keep the future `Send` for every
    // lifetime (a closure in `StreamExt::map` would not be general enough).
    let runs: Vec<_> = instances
        .iter()
        .map(|inst| play_one(code, inst, limits))
        .collect();
    futures::stream::iter(runs).buffered(4).collect().await
}

/// Plays one instance with a program: `solve(obs)` in the sandbox, then the actions in the
/// environment.
pub async fn play_one(code: &str, inst: &Instance, limits: &Limits) -> Episode {
    let harness = format!(
        "{code}\n\n__obs = {}\nsolve(__obs)\n",
        py_literal(&inst.observation())
    );
    let failed = |error: String| Episode {
        instance: inst.id(),
        actions: vec![],
        played: inst.play(&[]),
        error: Some(error),
        reply: None,
    };
    let outcome = match sandbox::run_python(&harness, limits).await {
        Ok(o) => o,
        Err(e) => return failed(format!("the sandbox could not start: {e}")),
    };
    if let Some(e) = outcome.error {
        return failed(e);
    }
    let actions = match outcome.json {
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => s,
                other => other.to_string(),
            })
            .collect::<Vec<_>>(),
        _ => {
            return failed(format!(
                "solve(obs) must return a list of action strings; it returned {}",
                outcome.value.as_deref().unwrap_or("None")
            ))
        }
    };
    Episode {
        instance: inst.id(),
        played: inst.play(&actions),
        actions: actions.into_iter().take(64).collect(),
        error: None,
        reply: None,
    }
}

/// A JSON value as a Python literal.
fn py_literal(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => n.to_string(),
        Value::String(_) => v.to_string(),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(py_literal).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(m) => format!(
            "{{{}}}",
            m.iter()
                .map(|(k, v)| format!("{}: {}", Value::String(k.clone()), py_literal(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_takes_crashes_first_then_the_lowest_rewards() {
        let run = |reward: f64, success: bool, error: bool| Episode {
            instance: String::new(),
            actions: vec![],
            played: Played {
                reward,
                success,
                steps: 0,
                note: String::new(),
            },
            error: error.then(|| "Traceback".to_string()),
            reply: None,
        };
        let runs = [
            run(0.9, true, false),
            run(0.2, false, false),
            run(0.0, false, true),
            run(0.5, false, false),
            run(0.1, true, false),
        ];
        assert_eq!(worst(&runs, 3), vec![2, 1, 3]);
        assert_eq!(worst(&runs, 9), vec![2, 1, 3, 4, 0]);
    }

    #[test]
    fn code_and_actions_are_found_in_replies() {
        let reply = "Here:\n```python\ndef solve(obs):\n    return ['forward']\n```\nDone.";
        assert_eq!(
            extract_code(reply),
            "def solve(obs):\n    return ['forward']"
        );
        assert_eq!(
            extract_code("def solve(o): return []"),
            "def solve(o): return []"
        );
        assert_eq!(
            parse_actions("Sure! [\"forward\", 'left', \"forward\"]"),
            vec!["forward", "left", "forward"]
        );
        assert_eq!(parse_actions("Go RIGHT, then TAKE."), vec!["RIGHT", "TAKE"]);
        assert_eq!(
            py_literal(&json!({"a": [1, true, null, "x\"y"]})),
            r#"{"a": [1, True, None, "x\"y"]}"#
        );
    }

    #[test]
    fn a_direct_list_names_only_the_family_s_actions() {
        use crate::backend::grammar_check::accepts;
        let family = Family::parse("grasp").unwrap();
        let g = actions_grammar(&family.actions(), family.max_actions());
        let reply = r#"["UP", "TAKE","DOWN", "DROP"]"#;
        assert!(accepts(&g, reply));
        assert_eq!(parse_actions(reply), ["UP", "TAKE", "DOWN", "DROP"]);
        assert!(
            !accepts(&g, r#"["UP_LEFT"]"#),
            "no diagonals in plain grasp"
        );
        assert!(!accepts(&g, r#"["fly"]"#));
        assert!(!accepts(&g, "[]"));
        assert!(
            !accepts(&g, &format!("[{}]", vec![r#""UP""#; 21].join(", "))),
            "over max_actions"
        );
        let minigrid = Family::parse("MiniGrid-Empty-5x5-v0").unwrap();
        let g = actions_grammar(&minigrid.actions(), minigrid.max_actions());
        assert!(accepts(&g, r#"["forward", "right", "forward"]"#));
    }

    #[test]
    fn a_program_block_always_closes_within_its_token_limit() {
        use crate::backend::grammar_check::accepts;
        let g = program_grammar(40);
        let reply = "```python\ndef solve(obs):\n    return []\n```";
        assert!(accepts(&g, reply));
        assert_eq!(extract_code(reply), "def solve(obs):\n    return []");
        assert!(
            !accepts(&g, "Here is the program:\n```python\nx\n```"),
            "prose first"
        );
        // One byte is one token here: 32 tokens of code at most, then only the fence.
        let long = format!("```python\n{}\n```", "x".repeat(40));
        assert!(!accepts(&g, &long));
        let fits = format!("```python\n{}```", "x".repeat(32));
        assert!(accepts(&g, &fits));
    }
}
