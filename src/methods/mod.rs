//! Methods: what happens between a validated request and the backend.
//!
//! A method receives a [`Route`] and a [`ChatRequest`] and returns events; it may call the
//! backend several times, rewrite prompts or consult the experience store, but it never knows
//! which backend it talks to, and it never sees HTTP.

pub mod direct;
pub mod iterresearch;
pub mod plan;
pub mod prior;

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use serde::Serialize;

use crate::backend::{self, ChatRequest, Collector, Completion, EventStream, ToolChoice};
use crate::error::{Error, Result};
use crate::experience::Store;
use crate::prompts::Prompts;
use crate::router::{Method, Route};

/// What every method may use besides its backend.
#[derive(Clone)]
pub struct Context {
    pub store: Arc<Store>,
    pub prompts: Arc<Prompts>,
    pub settings: Arc<crate::config::MethodsConfig>,
    /// Upper bounds on what requests and jobs may ask for.
    pub bounds: Arc<crate::config::Bounds>,
}

/// Per-request choices of the methods, from the `experient` request object.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// How many experiences to inject, overriding the library's setting.
    pub selection: Option<Selection>,
    /// IterResearch: most rounds, overriding the configuration.
    pub max_rounds: Option<u32>,
    /// IterResearch: rebuild the workspace every round, or keep the whole history.
    pub workspace: Workspace,
    /// IterResearch: the built-in tools offered (None: all the server allows).
    pub tools: Option<Vec<String>>,
    /// Planning: the task family, instances and rounds.
    pub plan: plan::PlanOptions,
    /// A library version to serve instead of the live one (`experient.version`).
    pub version: Option<u64>,
    /// Who asks, so that a live trial keeps each key or conversation on one arm.
    pub audience: crate::experience::canary::Audience,
    /// Overrides of the library's retrieval settings (`experient.retrieval`).
    pub retrieval: crate::experience::retrieve::RetrievalOverride,
    /// The model's context window in tokens, when known: the prior takes at most the
    /// library's `retrieval.max_share` of it.
    pub context_length: Option<u32>,
}

/// How many experiences a request asks for, overriding the library's setting: `"all"`, `"none"` or a
/// count on the wire (checked against `bounds.max_experiences` where the request is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "serde_json::Value")]
pub enum Selection {
    All,
    TopK(usize),
    /// None at all: the route's library is still the one IterResearch's `search_experience`
    /// searches, but nothing is put into the prompt.
    Nothing,
}

impl TryFrom<serde_json::Value> for Selection {
    type Error = &'static str;
    fn try_from(v: serde_json::Value) -> std::result::Result<Selection, Self::Error> {
        match &v {
            serde_json::Value::String(s) if s == "all" => Ok(Selection::All),
            serde_json::Value::String(s) if s == "none" => Ok(Selection::Nothing),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(k) if k >= 1 => Ok(Selection::TopK(usize::try_from(k).unwrap_or(usize::MAX))),
                _ => Err("must be \"all\", \"none\" or a count from 1"),
            },
            _ => Err("must be \"all\", \"none\" or a count from 1"),
        }
    }
}

/// IterResearch's workspace: rebuilt every round (the method itself), or the whole history
/// (ReAct), kept as a baseline for comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workspace {
    #[default]
    Markovian,
    Full,
}

/// What a method applied, reported to the client in the `experient` response object.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub method: Method,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub library: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experiences: Option<Vec<String>>,
    /// How the per-request experiences were retrieved (`lexical` when the embedding model
    /// is not there), when the prior searched the library.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retrieval: Option<crate::experience::retrieve::Mode>,
    /// The library version the experiences came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// The live trial that chose them, and on which arm.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub canary: Option<crate::experience::canary::CanaryArm>,
    /// What a multi-round method did (rounds, tool calls, tokens), once it is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace: Option<serde_json::Value>,
}

/// What a method streams. The model's events pass through as `Model`; progress and the trace
/// are what a method adds, so the backend's own type carries neither.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Model(backend::Event),
    /// Progress of a multi-round method, passed to streaming clients as the chunk's
    /// `experient` object: `{"round": ...}` for an IterResearch round, `{"plan": ...}` for a
    /// planning stage.
    Progress(serde_json::Value),
    /// What the method did, for the response's `experient.trace`; sent before `Usage`.
    Trace(serde_json::Value),
}

impl From<backend::Event> for Event {
    fn from(event: backend::Event) -> Event {
        Event::Model(event)
    }
}

/// A method's events in order; dropping it cancels whatever generation is running.
pub type Events = BoxStream<'static, Result<Event>>;

/// A backend's stream as a method's, for methods that pass the model's answer on as it is.
pub fn model_events(events: EventStream) -> Events {
    events.map(|e| e.map(Event::Model)).boxed()
}

/// A method's whole answer, collected from its [`Events`].
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub completion: Completion,
    pub trace: Option<serde_json::Value>,
}

/// Drains a method's events into its answer with `n` choices; progress is dropped, because a
/// non-streaming client sees only the end.
pub async fn collect(mut events: Events, n: usize) -> Result<Answer> {
    let mut collector = Collector::new(n);
    let mut trace = None;
    while let Some(event) = events.next().await {
        match event? {
            Event::Model(e) => collector.push(e),
            Event::Progress(_) => {}
            Event::Trace(t) => trace = Some(t),
        }
    }
    Ok(Answer {
        completion: collector.finish(),
        trace,
    })
}

/// What a method returns: its events and what it applied.
pub struct Output {
    pub events: Events,
    pub applied: Applied,
}

/// Something a request asks for that only some methods can give. Methods state what they
/// cannot do in these terms; `api` names the field in its own API's spelling (`response_format`
/// in chat, `text.format` in Responses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsupported {
    /// A constrained output format (JSON mode, a schema, a grammar).
    OutputFormat,
    /// A tool call the client forces (`required` or one named function).
    ForcedToolCall,
    /// Tools of the client's own.
    ClientTools,
    /// Per-token log probabilities.
    Logprobs,
    /// More than one choice (`n`): these methods give one answer.
    SeveralChoices,
    /// A conversation with no user message: there is no question to research.
    NoQuestion,
    /// The assistant message at `message` calls tools, and no tool message after it carries
    /// the result, so a research loop cannot go on from it.
    UnansweredToolCall { message: usize },
    /// The client tool at `tool` takes the name of one of the method's built-in tools.
    ReservedToolName { tool: usize },
}

impl Unsupported {
    /// Why `method` cannot give it, in words that name no request field.
    pub fn reason(self, method: Method) -> String {
        let m = method.name();
        match self {
            Unsupported::OutputFormat => format!(
                "an output format is applied to direct requests only; the {m} method writes its own replies"
            ),
            Unsupported::ForcedToolCall => format!(
                "the {m} method decides itself when to call a tool; tool calls cannot be forced"
            ),
            Unsupported::ClientTools => {
                format!("the {m} method writes and runs its own program; it takes no tools")
            }
            Unsupported::Logprobs => format!(
                "log probabilities are reported for direct requests only; the {m} method's reply is built from several generations"
            ),
            Unsupported::SeveralChoices => {
                format!("the {m} method gives one answer; ask for one choice")
            }
            Unsupported::NoQuestion => {
                format!("the {m} method needs a user message with the question")
            }
            Unsupported::UnansweredToolCall { .. } => format!(
                "the {m} method goes on from the last tool call only with its result; send a tool message after it"
            ),
            Unsupported::ReservedToolName { .. } => format!(
                "the {m} method's built-in tools take these names: {}; rename the client's tool",
                iterresearch::RESERVED_TOOL_NAMES.join(", ")
            ),
        }
    }
}

/// The first thing in `request` that `method` cannot honour, if any.
pub fn unsupported(method: Method, request: &ChatRequest) -> Option<Unsupported> {
    let forced = matches!(
        request.tool_choice,
        ToolChoice::Required | ToolChoice::Function(_)
    );
    match method {
        Method::Direct => None,
        _ if request.sampling.format != backend::OutputFormat::Text => {
            Some(Unsupported::OutputFormat)
        }
        Method::IterResearch if forced => Some(Unsupported::ForcedToolCall),
        Method::Plan if !request.tools.is_empty() => Some(Unsupported::ClientTools),
        _ if request.sampling.logprobs.is_some() => Some(Unsupported::Logprobs),
        _ if request.sampling.n > 1 => Some(Unsupported::SeveralChoices),
        Method::IterResearch => iterresearch::unsupported(request),
        _ => None,
    }
}

/// Runs the route's method. What it cannot honour is refused first; `api` checks the same
/// with [`unsupported`] beforehand to name the field, so this guards internal callers.
pub async fn run(
    ctx: &Context,
    route: Route,
    request: ChatRequest,
    opts: &Options,
) -> Result<Output> {
    if let Some(u) = unsupported(route.method, &request) {
        return Err(Error::invalid(u.reason(route.method), None));
    }
    let output = match route.method {
        Method::Direct => direct::run(ctx, route, request, opts).await,
        Method::IterResearch => iterresearch::run(ctx, route, request, opts).await,
        Method::Plan => plan::run(ctx, route, request, &opts.plan).await,
    }?;
    Ok(Output {
        events: backend::catch_panics(output.events),
        applied: output.applied,
    })
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex;
    use std::sync::Arc;

    use futures::StreamExt;

    use super::*;
    use crate::backend::{Backend, Event, FinishReason, Message, Role, Sampling, Usage};
    use crate::experience::StoreOptions;

    /// A backend that keeps every request it receives and answers "ok".
    #[derive(Default)]
    struct Recording(Mutex<Vec<ChatRequest>>);

    #[async_trait::async_trait]
    impl Backend for Recording {
        fn ready(&self) -> bool {
            true
        }
        async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
            self.0.lock().push(request);
            Ok(futures::stream::iter([
                Ok(Event::Delta {
                    index: 0,
                    text: "ok".into(),
                }),
                Ok(Event::Finish {
                    index: 0,
                    reason: FinishReason::Stop,
                }),
                Ok(Event::Usage(Usage::default())),
            ])
            .boxed())
        }
    }

    #[tokio::test]
    async fn the_backend_receives_the_library_as_a_system_prior() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        store.create("math").unwrap();
        store
            .add(
                "math",
                "Units: convert every quantity to one unit first.",
                vec![],
            )
            .unwrap();
        store
            .add(
                "math",
                "Percentages: a discount of p% leaves (100-p)%.",
                vec![],
            )
            .unwrap();
        let ctx = Context {
            store: store.clone(),
            prompts: Arc::new(Prompts::builtin()),
            settings: Arc::default(),
            bounds: Arc::default(),
        };
        let backend = Arc::new(Recording::default());
        let route = Route {
            method: Method::Direct,
            model: "m".into(),
            backend: backend.clone(),
            library: Some("math".into()),
        };
        let request = ChatRequest {
            tools: vec![],
            messages: vec![
                Message::new(Role::System, "Be brief."),
                Message::new(Role::User, "A shirt costs $20 with a 25% discount. Price?"),
            ],
            sampling: Sampling::default(),
            ..Default::default()
        };

        let out = run(&ctx, route.clone(), request.clone(), &Options::default())
            .await
            .unwrap();
        assert_eq!(
            out.applied.experiences.as_deref(),
            Some(&["E1".to_string(), "E2".to_string()][..])
        );
        let got = backend.0.lock()[0].clone();
        assert_eq!(
            got.messages.len(),
            2,
            "the prior joins the existing system message"
        );
        let system = &got.messages[0].content;
        assert!(system.starts_with("Be brief.\n\n"), "{system}");
        assert!(system.contains("[E1]. Units: convert every quantity to one unit first."));
        assert!(system.contains("[E2]. Percentages: a discount of p% leaves (100-p)%."));
        assert_eq!(got.messages[1], request.messages[1]);

        // top_k picks the experience that matches the conversation.
        let top1 = Options {
            selection: Some(Selection::TopK(1)),
            ..Default::default()
        };
        run(&ctx, route, request, &top1).await.unwrap();
        let got = backend.0.lock()[1].clone();
        assert!(got.messages[0].content.contains("[E2]. Percentages"));
        assert!(!got.messages[0].content.contains("[E1]"));
    }
}
