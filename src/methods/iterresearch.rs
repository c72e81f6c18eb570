//! IterResearch: long-horizon tool use in a workspace rebuilt every round.
//!
//! Each round the model sees only the question, the report it has written so far and its last
//! action with that action's result (`prompts/iterresearch_round.j2`), never the growing
//! history, so the prompt stays the same size however many rounds a task takes. It answers
//! with an updated report and either one action or a final answer. Built-in tools run here;
//! a call of a client tool (the request's `tools`) is returned to the client as OpenAI
//! `tool_calls`, with the report as the assistant message's content, and when the client sends
//! the result back the workspace is rebuilt from the question, that report, the call and its
//! result: the server keeps no state, and a client with a long history still sends the model
//! a bounded prompt.
//!
//! `Workspace::Full` runs the same loop ReAct-style (every reply and result appended to the
//! conversation), as the baseline the method is measured against.

use std::sync::LazyLock;

use futures::StreamExt;
use regex::Regex;
use serde_json::{json, Value};

use super::{Applied, Context, Event, Options, Output, Unsupported};
use crate::backend::{
    ChatRequest, Event as Model, FinishReason, Message, OutputFormat, Role, Sampling, ToolCall,
    ToolSpec, Usage,
};
use crate::error::{Error, Result};
use crate::router::{Method, Route};

/// The most rounds a request may ask for (`api` refuses more; the configuration is held to it).
pub const MAX_ROUNDS_LIMIT: u32 = 64;
/// Longest tool result put into the workspace, in characters.
const MAX_OBSERVATION: usize = 4000;

/// A model's reply, read.
#[derive(Debug, Default, PartialEq)]
pub struct Reply {
    pub report: Option<String>,
    pub action: Option<(String, String)>,
    pub answer: Option<String>,
}

static ANSWER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?im)^[\s*#>-]*(?:final\s+answer|answer)\**\s*:\**\s*").unwrap());
static ACTION: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?im)^[\s*#>-]*action\**\s*:\**\s*(.+)$").unwrap());
static REPORT: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?im)^[\s*#>-]*report\**\s*:\**\s*").unwrap());
static CALL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^`?([A-Za-z_][A-Za-z0-9_]*)`?\s*(?::\s*(.*)|\((.*)\)\s*)$").unwrap()
});

/// Reads a round's reply: `Report: ...`, then `Action: tool: argument` (or `tool(argument)`,
/// or a JSON object with `name` and `arguments`) or `Final answer: ...`; whichever of action
/// and answer comes first counts.
pub fn parse_reply(text: &str) -> Reply {
    let answer_at = ANSWER.find(text);
    let action_at = ACTION.captures(text);
    let report = REPORT.find(text).map(|m| {
        let end = [
            answer_at.map(|a| a.start()),
            action_at.as_ref().map(|c| c.get(0).unwrap().start()),
        ]
        .into_iter()
        .flatten()
        .filter(|&e| e >= m.end())
        .min()
        .unwrap_or(text.len());
        text[m.end()..end].trim().to_owned()
    });
    let action = action_at.as_ref().and_then(|c| {
        let line = c[1].trim();
        if let Ok(v) = serde_json::from_str::<Value>(line) {
            let name = v.get("name")?.as_str()?.to_owned();
            let args = v.get("arguments").cloned().unwrap_or(json!({}));
            return Some((name, args.to_string()));
        }
        let m = CALL.captures(line)?;
        if &m[1] == "python" {
            // A program may span lines: it runs to the end of the reply.
            let start =
                c.get(1).unwrap().start() + line.find("python").unwrap_or(0) + "python".len();
            return Some(("python".to_owned(), program(&text[start..])));
        }
        let arg = m.get(2).or(m.get(3)).map_or("", |a| a.as_str());
        Some((m[1].to_owned(), arg.trim().trim_matches('"').to_owned()))
    });
    let answer = answer_at.map(|m| text[m.end()..].trim().to_owned());
    let action_first = match (&action_at, answer_at) {
        (Some(c), Some(a)) => c.get(0).unwrap().start() < a.start(),
        (Some(_), None) => true,
        _ => false,
    };
    Reply {
        report: report.filter(|r| !r.is_empty()),
        action: if action_first { action } else { None },
        answer: if action_first {
            None
        } else {
            answer.filter(|a| !a.is_empty())
        },
    }
}

/// The longest line (report, argument, answer) a constrained round may write, in characters.
const MAX_LINE: usize = 600;

/// A round's reply form as a grammar (llguidance's Lark): a one-line report, then either an
/// action naming one of `tools` with an argument of that tool's shape, or a final answer; on
/// the last round only the answer. Every reply held to it is read by [`parse_reply`].
pub fn round_grammar<'a>(tools: impl IntoIterator<Item = &'a str>, last_round: bool) -> String {
    let actions: Vec<String> = tools
        .into_iter()
        .map(|name| {
            let head = serde_json::to_string(&format!("{name}: ")).expect("a string serialises");
            format!("{head} {}", argument_terminal(name))
        })
        .collect();
    let next = if last_round || actions.is_empty() {
        "final"
    } else {
        "action | final"
    };
    // The reply may end its last line with a newline (or a blank line: tokenizers merge
    // "\n\n"), after which the grammar is complete and generation ends; lines are bounded so that one cannot take the whole token budget.
    let mut g = format!(
        "start: \"Report: \" LINE \"\\n\" next END?\nEND: /\\n[\\n ]{{0,8}}/\nnext: {next}\n\
         final: \"Final answer: \" LINE\nLINE: /[^\\n]{{1,{MAX_LINE}}}/\n"
    );
    if next != "final" {
        g.push_str(&format!(
            "action: \"Action: \" ({})\n\
             EXPRESSION: /[0-9.+\\-*\\/%() ]{{1,{MAX_LINE}}}/\n\
             URL: /https?:\\/\\/[^\\s]{{1,{MAX_LINE}}}/\n",
            actions.join(" | ")
        ));
    }
    g
}

/// The terminal a tool's one-line argument must match: arithmetic for the calculator, a URL
/// for the fetcher, any line for the rest.
fn argument_terminal(tool: &str) -> &'static str {
    match tool {
        "calculate" => "EXPRESSION",
        "fetch_url" => "URL",
        _ => "LINE",
    }
}

/// The program after `Action: python`: a leading `:` and code fences removed.
fn program(rest: &str) -> String {
    let code = rest.trim_start_matches([':', ' ']).trim();
    let code = code
        .strip_prefix("```python")
        .or_else(|| code.strip_prefix("```"))
        .unwrap_or(code);
    let code = code.split("```").next().unwrap_or(code);
    code.trim().to_owned()
}

/// A tool the loop can offer.
struct Tool {
    name: String,
    description: String,
    /// What the one argument of the `Action: tool: argument` form means.
    argument: String,
    /// Client tools are returned to the client instead of run here.
    client: Option<ToolSpec>,
}

/// Refuses a choice of built-in tools naming one that is not offered here.
pub fn check_builtin_choice(names: &[String], fetch_urls: bool) -> std::result::Result<(), String> {
    let offered: Vec<String> = builtin_tools(fetch_urls)
        .into_iter()
        .map(|t| t.name)
        .collect();
    match names.iter().find(|n| !offered.contains(n)) {
        Some(n) => Err(format!(
            "experient.tools: '{n}' is not a built-in tool of this server; choose from {}",
            offered.join(", ")
        )),
        None => Ok(()),
    }
}

/// Every built-in tool's name, `fetch_url` included when it is off, so that whether a client
/// tool's name is free does not depend on the server's settings.
pub const RESERVED_TOOL_NAMES: [&str; 4] =
    ["search_experience", "python", "calculate", "fetch_url"];

/// The loop's own tools; `fetch_url` only where the server allows fetching.
fn builtin_tools(fetch_urls: bool) -> Vec<Tool> {
    let mut tools = vec![
        Tool {
            name: "search_experience".into(),
            description: "Searches the experience libraries for lessons and facts.".into(),
            argument: "a few search words".into(),
            client: None,
        },
        Tool {
            name: "python".into(),
            description: "Runs a short Python program in a sandbox and returns what it printed and the value of its last line.".into(),
            argument: "the program (on one line when replies are held to the round's form)".into(),
            client: None,
        },
        Tool {
            name: "calculate".into(),
            description: "Evaluates an arithmetic expression exactly.".into(),
            argument: "an expression such as (17 * 23) + 4 / 2".into(),
            client: None,
        },
    ];
    if fetch_urls {
        tools.push(Tool {
            name: "fetch_url".into(),
            description: "Fetches a web page and returns its text.".into(),
            argument: "an http or https URL".into(),
            client: None,
        });
    }
    tools
}

/// The name of a client tool's main argument: its first required property, else its first.
fn main_argument(spec: &ToolSpec) -> Option<String> {
    let p = &spec.parameters;
    p.get("required")
        .and_then(|r| r.as_array()?.first()?.as_str().map(str::to_owned))
        .or_else(|| p.get("properties")?.as_object()?.keys().next().cloned())
}

/// Turns the model's argument text into the JSON arguments a client tool expects.
fn client_arguments(spec: &ToolSpec, arg: &str) -> String {
    if serde_json::from_str::<Value>(arg).is_ok_and(|v| v.is_object()) {
        return arg.to_owned();
    }
    let key = main_argument(spec).unwrap_or_else(|| "input".into());
    json!({ key: arg }).to_string()
}

/// The route's library searched for `arg`, as its retrieval settings rank (only the library
/// the route names, which the edge has checked the key may use: searching every library let a
/// user key read an admin-only library's lessons through the trace).
async fn search_experience(ctx: &Context, route: &Route, arg: &str) -> String {
    let Some(library) = route.library.clone() else {
        return "nothing found".to_owned();
    };
    let store = ctx.store.clone();
    let vector = store.embed_query(arg).await;
    let q = arg.to_owned();
    let found = tokio::task::spawn_blocking(move || {
        let query = crate::experience::Query {
            vector: vector.as_deref(),
            ..crate::experience::Query::text(&q, 5)
        };
        store.search(&library, &query).map(|hits| {
            hits.into_iter()
                .map(|h| format!("[{library}/{}] {}", h.experience.id, h.experience.text))
                .collect::<Vec<_>>()
        })
    })
    .await;
    match found {
        Ok(Ok(lines)) if !lines.is_empty() => lines.join("\n"),
        Ok(_) => "nothing found".to_owned(),
        Err(e) => format!("error: {e}"),
    }
}

async fn run_builtin(ctx: &Context, route: &Route, name: &str, arg: &str) -> String {
    let out = match name {
        "calculate" => calculate(arg).await,
        "search_experience" => search_experience(ctx, route, arg).await,
        "python" => match crate::sandbox::run_python(arg, &crate::sandbox::Limits::default()).await
        {
            Ok(outcome) => outcome.describe(),
            Err(e) => format!("error: the sandbox could not start: {e}"),
        },
        "fetch_url" if ctx.settings.iterresearch.fetch_urls => {
            crate::web::fetch_text(arg, crate::web::is_public).await
        }
        _ => unreachable!("only built-in tools are run here"),
    };
    truncate(out)
}

/// The longest expression `calculate` takes, in characters.
pub const MAX_EXPRESSION_CHARS: usize = 1000;
/// The deepest nesting of brackets `calculate` takes.
pub const MAX_EXPRESSION_DEPTH: usize = 32;

/// Evaluates an arithmetic expression the model wrote. evalexpr's parser recurses once per
/// bracket and per unary operator, and an argument nested 12,000 deep overflowed a tokio
/// worker's stack and aborted the process. The expression is model output (a prompt injection
/// or an upstream model can shape it), so it is bounded in length and depth before it is
/// parsed, and parsed on a thread of its own with a stack far deeper than the bound needs.
async fn calculate(expression: &str) -> String {
    if let Err(e) = check_expression(expression) {
        return format!("error: {e}");
    }
    let expression = expression.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("calculate".into())
        .stack_size(16 << 20)
        .spawn(move || {
            let out = match evalexpr::eval(&expression) {
                Ok(v) => v.to_string(),
                Err(e) => format!("error: {e}"),
            };
            let _ = tx.send(out);
        });
    match spawned {
        Ok(_) => rx
            .await
            .unwrap_or_else(|_| "error: the calculator failed".into()),
        Err(e) => format!("error: the calculator could not start: {e}"),
    }
}

/// `calculate`, for the crate's property tests.
#[cfg(test)]
pub(crate) async fn calculate_for_tests(expression: &str) -> String {
    calculate(expression).await
}

/// Refuses an expression longer or more deeply bracketed than `calculate` evaluates.
fn check_expression(expression: &str) -> std::result::Result<(), String> {
    let chars = expression.chars().count();
    if chars > MAX_EXPRESSION_CHARS {
        return Err(format!(
            "the expression is {chars} characters long; at most {MAX_EXPRESSION_CHARS} are evaluated"
        ));
    }
    let mut depth = 0usize;
    for c in expression.chars() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        if depth > MAX_EXPRESSION_DEPTH {
            return Err(format!(
                "the expression nests brackets deeper than {MAX_EXPRESSION_DEPTH} levels"
            ));
        }
    }
    Ok(())
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_OBSERVATION {
        s = s.chars().take(MAX_OBSERVATION).collect::<String>() + " [...]";
    }
    s
}

/// Where a conversation stands: a new question, or a client tool's result to go on from.
struct Workspace {
    question: String,
    report: String,
    action: Option<String>,
    observation: String,
    round: u32,
}

/// What keeps `request` from being researched, if anything: no question, a tool call without
/// its result, or a client tool under a built-in tool's name.
pub(super) fn unsupported(request: &ChatRequest) -> Option<Unsupported> {
    if let Err(u) = workspace(&request.messages) {
        return Some(u);
    }
    client_tools(request)
        .position(|t| RESERVED_TOOL_NAMES.contains(&t.name.as_str()))
        .map(|tool| Unsupported::ReservedToolName { tool })
}

/// Where the conversation stands, or what in it a research loop cannot go on from.
fn workspace(messages: &[Message]) -> std::result::Result<Workspace, Unsupported> {
    let question = messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.content.clone())
        .ok_or(Unsupported::NoQuestion)?;
    let calls = messages.iter().filter(|m| !m.tool_calls.is_empty()).count() as u32;
    let Some(at) = messages.iter().rposition(|m| !m.tool_calls.is_empty()) else {
        return Ok(Workspace {
            question,
            report: String::new(),
            action: None,
            observation: String::new(),
            round: 1,
        });
    };
    let assistant = &messages[at];
    let results: Vec<&Message> = messages[at + 1..]
        .iter()
        .filter(|m| m.role == Role::Tool)
        .collect();
    if results.is_empty() {
        return Err(Unsupported::UnansweredToolCall { message: at });
    }
    let report = parse_reply(&assistant.content)
        .report
        .unwrap_or_else(|| assistant.content.trim().to_owned());
    let action = assistant
        .tool_calls
        .iter()
        .map(|c| format!("{}: {}", c.name, c.arguments))
        .collect::<Vec<_>>()
        .join("; ");
    let observation = results
        .iter()
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Workspace {
        question,
        report,
        action: Some(action),
        observation: truncate(observation),
        round: calls + 1,
    })
}

/// The client's tools, unless `tool_choice` is "none".
fn client_tools(request: &ChatRequest) -> impl Iterator<Item = &ToolSpec> {
    let offered = request.tool_choice != crate::backend::ToolChoice::None;
    request.tools.iter().filter(move |_| offered)
}

/// The built-in tools and the client's ([`unsupported`] has refused a client tool under a
/// built-in name).
fn offered_tools(ctx: &Context, request: &ChatRequest, chosen: Option<&[String]>) -> Vec<Tool> {
    let mut tools = builtin_tools(ctx.settings.iterresearch.fetch_urls);
    if let Some(names) = chosen {
        tools.retain(|t| names.contains(&t.name));
    }
    tools.extend(client_tools(request).map(|t| Tool {
        name: t.name.clone(),
        description: t.description.clone(),
        argument: main_argument(t).unwrap_or_else(|| "the input".into()),
        client: Some(t.clone()),
    }));
    tools
}

/// The system prompt that leads every round: the client's system messages, with the library's
/// experiences injected as the direct method injects them (and counted as used), and the ids
/// of those experiences.
async fn system_with_prior(
    ctx: &Context,
    route: &Route,
    request: &ChatRequest,
    question: &str,
    opts: &Options,
) -> Result<(String, Option<super::prior::Injected>)> {
    let system = request
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.clone())
        .collect::<Vec<_>>()
        .join("\n\n");
    let Some(lib) = &route.library else {
        return Ok((system, None));
    };
    let mut probe = ChatRequest {
        messages: vec![Message::new(Role::User, question.to_owned())],
        ..Default::default()
    };
    if !system.is_empty() {
        probe
            .messages
            .insert(0, Message::new(Role::System, system.clone()));
    }
    let injected = super::prior::inject(ctx, lib, &mut probe, opts).await?;
    if injected.ids.is_empty() {
        return Ok((system, Some(injected)));
    }
    Ok((probe.messages[0].content.clone(), Some(injected)))
}

/// Runs the round loop as one event stream: rounds as progress, then the answer (or the
/// client tool call that the round chose).
pub async fn run(
    ctx: &Context,
    route: Route,
    request: ChatRequest,
    opts: &Options,
) -> Result<Output> {
    let settings = ctx.settings.iterresearch.clone();
    let ws = workspace(&request.messages)
        .map_err(|u| Error::invalid(u.reason(Method::IterResearch), None))?;
    let tools = offered_tools(ctx, &request, opts.tools.as_deref());
    let (system, injected) = system_with_prior(ctx, &route, &request, &ws.question, opts).await?;
    let applied = Applied {
        method: Method::IterResearch,
        model: route.model.clone(),
        library: route.library.clone(),
        version: injected.as_ref().map(|i| i.served.version),
        retrieval: injected.as_ref().and_then(|i| i.retrieval),
        canary: injected.as_ref().and_then(|i| i.served.canary.clone()),
        experiences: injected.map(|i| i.ids).filter(|ids| !ids.is_empty()),
        trace: None,
    };
    let sampling = Sampling {
        max_tokens: Some(
            request
                .sampling
                .max_tokens
                .unwrap_or(settings.round_max_tokens),
        ),
        n: 1,
        stop: vec![],
        ..request.sampling.clone()
    };
    let constrained = ctx.settings.constrain && route.backend.constrains();
    let mut task = Task {
        ctx: ctx.clone(),
        route,
        system,
        sampling,
        tools,
        max_rounds: opts.max_rounds.unwrap_or(settings.max_rounds),
        retries: settings.retries,
        constrained,
        full: opts.workspace == super::Workspace::Full,
        first_round: ws.round,
        ws,
        history: Vec::new(),
        usage: Usage::default(),
        rounds: Vec::new(),
        tool_calls: 0,
    };
    let events = async_stream::stream! {
        loop {
            let step = match task.round().await {
                Ok(step) => step,
                Err(e) => { yield Err(e); return; }
            };
            yield Ok(Event::Progress(json!({"round": task.rounds.last()})));
            match step {
                Step::Next => continue,
                Step::Answer { text, stopped } => {
                    yield Ok(Event::Model(Model::Delta { index: 0, text }));
                    yield Ok(Event::Model(Model::Finish { index: 0, reason: FinishReason::Stop }));
                    yield Ok(Event::Trace(task.trace(stopped)));
                }
                Step::ClientCall(call) => {
                    // The report travels in the assistant message, so the next request can
                    // rebuild the workspace without server state.
                    let text = format!("Report: {}", task.ws.report);
                    yield Ok(Event::Model(Model::Delta { index: 0, text }));
                    yield Ok(Event::Model(Model::ToolCall { index: 0, call }));
                    yield Ok(Event::Model(Model::Finish { index: 0, reason: FinishReason::ToolCalls }));
                    yield Ok(Event::Trace(task.trace("client_tool")));
                }
            }
            yield Ok(Event::Model(Model::Usage(task.usage)));
            return;
        }
    }
    .boxed();
    Ok(Output { events, applied })
}

/// One research task as it runs: the workspace each round is rebuilt from, what the trace
/// records, and (with `Workspace::Full`, the ReAct baseline) the whole conversation.
struct Task {
    ctx: Context,
    route: Route,
    /// The client's system messages with the library's prior, leading every round.
    system: String,
    sampling: Sampling,
    tools: Vec<Tool>,
    max_rounds: u32,
    /// Extra attempts at a reply that names neither an action nor an answer.
    retries: u32,
    /// Replies are decoded under [`round_grammar`] (the backend can hold them to it).
    constrained: bool,
    full: bool,
    first_round: u32,
    ws: Workspace,
    history: Vec<Message>,
    usage: Usage,
    /// One trace record per round.
    rounds: Vec<Value>,
    tool_calls: u32,
}

/// What a round decided; its record is the last of `Task::rounds`.
enum Step {
    /// A built-in tool ran, or the reply could not be read: another round.
    Next,
    /// The answer, or what stands for it when the last round wrote none.
    Answer { text: String, stopped: &'static str },
    /// A client tool is to be called: the loop hands over to the client.
    ClientCall(ToolCall),
}

/// A round's reply as read, with what it cost.
struct Attempt {
    text: String,
    reply: Reply,
    usage: Usage,
    retries: u32,
}

impl Task {
    /// Asks the model once (with retries) and acts on its reply.
    async fn round(&mut self) -> Result<Step> {
        let round = self.ws.round;
        let messages = self.messages()?;
        let attempt = self.ask(messages).await?;
        self.usage.prompt_tokens += attempt.usage.prompt_tokens;
        self.usage.completion_tokens += attempt.usage.completion_tokens;
        metrics::counter!("experient_iterresearch_rounds_total", "model" => self.route.model.clone())
            .increment(1);
        if let Some(r) = &attempt.reply.report {
            self.ws.report = r.clone();
        }
        if self.full {
            self.history
                .push(Message::new(Role::Assistant, attempt.text.clone()));
        }
        let mut record = json!({
            "round": round,
            "prompt_tokens": attempt.usage.prompt_tokens,
            "completion_tokens": attempt.usage.completion_tokens,
            "report_chars": self.ws.report.chars().count(),
            "retries": attempt.retries,
        });
        let step = self.decide(&mut record, attempt).await;
        self.rounds.push(record);
        Ok(step)
    }

    /// This round's conversation: the system prompt, then the rebuilt workspace (or, for the
    /// ReAct baseline after its first round, the whole history).
    fn messages(&mut self) -> Result<Vec<Message>> {
        let round = self.ws.round;
        let tool_list: Vec<Value> = self
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "argument": t.argument}))
            .collect();
        let prompt = self.ctx.prompts.render(
            "iterresearch_round.j2",
            minijinja::context! {
                question => self.ws.question, report => self.ws.report, action => self.ws.action,
                observation => self.ws.observation, tools => tool_list, round => round,
                max_rounds => self.max_rounds, last_round => round >= self.max_rounds,
            },
        )?;
        let mut messages = Vec::new();
        if !self.system.is_empty() {
            messages.push(Message::new(Role::System, self.system.clone()));
        }
        if self.full && round > self.first_round {
            messages.extend(self.history.iter().cloned());
        } else {
            messages.push(Message::new(Role::User, prompt.clone()));
            if self.full {
                self.history.push(Message::new(Role::User, prompt));
            }
        }
        Ok(messages)
    }

    /// The model's reply, asked again (no longer greedy) while it names neither an action nor
    /// an answer, at most `retries` more times.
    async fn ask(&self, messages: Vec<Message>) -> Result<Attempt> {
        let mut attempt = Attempt {
            text: String::new(),
            reply: Reply::default(),
            usage: Usage::default(),
            retries: 0,
        };
        for n in 0..=self.retries {
            // Attempts asked again after an unreadable reply.
            attempt.retries = n;
            let mut sampling = self.sampling.clone();
            if n > 0 && sampling.temperature.unwrap_or(1.0) == 0.0 {
                sampling.temperature = Some(0.7);
            }
            if self.constrained {
                let last_round = self.ws.round >= self.max_rounds;
                let names = self.tools.iter().map(|t| t.name.as_str());
                sampling.format = OutputFormat::Grammar(round_grammar(names, last_round));
            }
            let request = ChatRequest {
                messages: messages.clone(),
                sampling,
                ..Default::default()
            };
            let out = self.route.backend.complete(request).await?;
            attempt.usage.prompt_tokens += out.usage.prompt_tokens;
            attempt.usage.completion_tokens += out.usage.completion_tokens;
            attempt.text = out
                .choices
                .into_iter()
                .next()
                .map(|c| c.text)
                .unwrap_or_default();
            attempt.reply = parse_reply(&attempt.text);
            if attempt.reply.action.is_some() || attempt.reply.answer.is_some() {
                break;
            }
        }
        Ok(attempt)
    }

    /// Acts on a reply: the answer (forced on the last round), a tool call, or a note that the
    /// reply could not be read; `record` gets what happened.
    async fn decide(&mut self, record: &mut Value, attempt: Attempt) -> Step {
        let last_round = self.ws.round >= self.max_rounds;
        match (attempt.reply.answer, attempt.reply.action) {
            (Some(answer), _) => {
                record["answer"] = json!(true);
                Step::Answer {
                    text: answer,
                    stopped: "answer",
                }
            }
            // The last round answers, whatever the model wrote.
            _ if last_round => {
                record["forced"] = json!(true);
                let text = if self.ws.report.is_empty() {
                    attempt.text.trim().to_owned()
                } else {
                    self.ws.report.clone()
                };
                Step::Answer {
                    text,
                    stopped: "round_limit",
                }
            }
            (None, None) => {
                record["malformed"] = json!(true);
                self.ws.action = Some("(a reply that could not be read)".into());
                self.ws.observation =
                    "Write 'Action: <tool name>: <argument>' or 'Final answer: <answer>'.".into();
                if self.full {
                    self.history
                        .push(Message::new(Role::User, self.ws.observation.clone()));
                }
                self.ws.round += 1;
                Step::Next
            }
            (None, Some((name, arg))) => self.act(record, name, arg).await,
        }
    }

    /// Calls the tool a reply chose: a client tool goes back to the client; a built-in one
    /// runs here and its result (or a note that no such tool exists) is the next observation.
    async fn act(&mut self, record: &mut Value, name: String, arg: String) -> Step {
        self.tool_calls += 1;
        record["tool"] = json!(name);
        record["argument"] = json!(arg);
        match self.tools.iter().find(|t| t.name == name) {
            Some(Tool {
                client: Some(spec), ..
            }) => {
                record["client_tool"] = json!(true);
                let arguments = client_arguments(spec, &arg);
                return Step::ClientCall(ToolCall {
                    id: format!("call_{}", uuid::Uuid::new_v4().simple()),
                    name,
                    arguments,
                });
            }
            Some(_) => {
                let observation = run_builtin(&self.ctx, &self.route, &name, &arg).await;
                record["observation_chars"] = json!(observation.chars().count());
                record["observation"] = json!(observation.chars().take(200).collect::<String>());
                self.ws.observation = observation;
            }
            None => {
                self.ws.observation = format!(
                    "There is no tool named '{name}'. The tools are: {}.",
                    self.tools
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        self.ws.action = Some(format!("{name}: {arg}"));
        if self.full {
            self.history.push(Message::new(
                Role::User,
                format!("Result of {name}: {}", self.ws.observation),
            ));
        }
        self.ws.round += 1;
        Step::Next
    }

    /// The trace the response carries: every round's record and why the loop stopped.
    fn trace(&self, stopped: &str) -> Value {
        json!({
            "workspace": if self.full { "full" } else { "markovian" },
            "rounds": self.rounds, "tool_calls": self.tool_calls, "stopped": stopped,
            "constrained": self.constrained,
        })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_round_grammar_offers_the_tools_until_the_last_round() {
        let g = super::round_grammar(["calculate", "get_weather"], false);
        assert!(g.contains("next: action | final"), "{g}");
        assert!(
            g.contains(r#"action: "Action: " ("calculate: " EXPRESSION | "get_weather: " LINE)"#),
            "{g}"
        );
        let last = super::round_grammar(["calculate"], true);
        assert!(
            last.contains("next: final") && !last.contains("action"),
            "{last}"
        );
        // What it admits is what the parser reads.
        let r = super::parse_reply("Report: 3 apples each\nAction: calculate: 3*4");
        assert_eq!(r.action, Some(("calculate".into(), "3*4".into())));
    }

    #[tokio::test]
    async fn deep_or_long_expressions_are_refused_not_recursed() {
        let deep = format!("{}1{}", "(".repeat(100), ")".repeat(100));
        assert!(calculate(&deep).await.contains("deeper than"));
        let deeper = format!("{}1{}", "(".repeat(12_000), ")".repeat(12_000));
        assert!(calculate(&deeper).await.starts_with("error:"));
        let long = "1+".repeat(MAX_EXPRESSION_CHARS) + "1";
        assert!(calculate(&long).await.contains("characters long"));
        // Unary chains within the length bound parse on the calculator's own deep stack.
        let unary = format!("{}1", "-".repeat(MAX_EXPRESSION_CHARS - 1));
        assert!(!calculate(&unary).await.is_empty());
        let nested = format!("{}2{}", "(".repeat(30), ")".repeat(30));
        assert_eq!(calculate(&nested).await, "2");
        assert_eq!(calculate("(17 * 23) + 4 / 2").await, "393");
    }

    use super::*;

    #[test]
    fn reads_replies_in_the_forms_models_write() {
        let r = parse_reply(
            "Report: The capital is Poseidonia.\nAction: search_experience: Poseidonia population",
        );
        assert_eq!(r.report.as_deref(), Some("The capital is Poseidonia."));
        assert_eq!(
            r.action,
            Some(("search_experience".into(), "Poseidonia population".into()))
        );
        assert_eq!(r.answer, None);

        let r = parse_reply("**Report:** found it\nline two\n**Final answer:** 4200 people.");
        assert_eq!(r.report.as_deref(), Some("found it\nline two"));
        assert_eq!(r.answer.as_deref(), Some("4200 people."));

        let r = parse_reply("Report: x\nAction: python:\n```python\nx = 17 * 23\nprint(x)\n```");
        assert_eq!(
            r.action,
            Some(("python".into(), "x = 17 * 23\nprint(x)".into()))
        );
        let r = parse_reply("Report: x\nAction: calculate(17 * 23)");
        assert_eq!(r.action, Some(("calculate".into(), "17 * 23".into())));
        let r = parse_reply(r#"Action: {"name": "get_weather", "arguments": {"city": "Paris"}}"#);
        assert_eq!(
            r.action,
            Some(("get_weather".into(), r#"{"city":"Paris"}"#.into()))
        );
        // Whichever comes first counts.
        let r = parse_reply("Answer: 3\nAction: calculate: 1+2");
        assert_eq!(
            (r.answer.as_deref(), r.action),
            (Some("3\nAction: calculate: 1+2"), None)
        );
        // Nothing to act on.
        assert_eq!(parse_reply("I am not sure what to do."), Reply::default());
        assert_eq!(parse_reply("Action: do the thing now please").action, None);
    }

    #[test]
    fn client_arguments_follow_the_schema() {
        let spec = ToolSpec {
            name: "get_weather".into(),
            description: String::new(),
            parameters: json!({"type": "object", "properties": {"unit": {}, "city": {}}, "required": ["city"]}),
            strict: None,
        };
        assert_eq!(client_arguments(&spec, "Paris"), r#"{"city":"Paris"}"#);
        assert_eq!(
            client_arguments(&spec, r#"{"city":"Oslo"}"#),
            r#"{"city":"Oslo"}"#
        );
    }

    #[test]
    fn the_workspace_is_rebuilt_from_the_last_call() {
        let mut assistant = Message::new(Role::Assistant, "Report: Paris is the city.");
        assistant.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        }];
        let mut tool = Message::new(Role::Tool, "18 degrees, sunny");
        tool.tool_call_id = Some("call_1".into());
        let ws = workspace(&[
            Message::new(Role::User, "What is the weather where the Louvre is?"),
            assistant,
            tool,
        ])
        .unwrap();
        assert_eq!(ws.question, "What is the weather where the Louvre is?");
        assert_eq!(ws.report, "Paris is the city.");
        assert_eq!(
            ws.action.as_deref(),
            Some(r#"get_weather: {"city":"Paris"}"#)
        );
        assert_eq!(ws.observation, "18 degrees, sunny");
        assert_eq!(ws.round, 2);
    }

    #[test]
    fn what_a_loop_cannot_go_on_from_is_named() {
        let user = Message::new(Role::User, "What is 2 + 2?");
        let mut ask = ChatRequest {
            messages: vec![Message::new(Role::System, "Be brief.")],
            ..Default::default()
        };
        assert_eq!(unsupported(&ask), Some(Unsupported::NoQuestion));

        let mut call = Message::new(Role::Assistant, "Report: adding.");
        call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "add".into(),
            arguments: "{}".into(),
        }];
        ask.messages = vec![user.clone(), call];
        assert_eq!(
            unsupported(&ask),
            Some(Unsupported::UnansweredToolCall { message: 1 })
        );

        ask.messages = vec![user];
        let tool = |name: &str| ToolSpec {
            name: name.into(),
            description: String::new(),
            parameters: json!({"type": "object"}),
            strict: None,
        };
        ask.tools = vec![tool("add"), tool("fetch_url")];
        assert_eq!(
            unsupported(&ask),
            Some(Unsupported::ReservedToolName { tool: 1 })
        );
        // Tools not offered cannot clash.
        ask.tool_choice = crate::backend::ToolChoice::None;
        assert_eq!(unsupported(&ask), None);
    }

    #[test]
    fn every_builtin_name_is_reserved() {
        let names: Vec<String> = builtin_tools(true).into_iter().map(|t| t.name).collect();
        assert_eq!(names, RESERVED_TOOL_NAMES);
    }
}
