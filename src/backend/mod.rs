//! Backends run a chat completion and nothing else.
//!
//! The types here are the crate's own, not OpenAI's wire types: methods build a [`ChatRequest`]
//! and read [`Event`]s without knowing whether mistral.rs or a remote server produced them.
//! Non-streaming is derived from streaming ([`collect`]) so that both paths share one code path,
//! and so that dropping the consumer always cancels generation.

pub mod embed;
pub(crate) mod fallback;
pub mod fetch;
#[cfg(test)]
pub(crate) mod grammar_check;
pub(crate) mod local;
pub(crate) mod requantize;
pub(crate) mod schema;
pub mod scripted;
pub(crate) mod tools;
pub(crate) mod upstream;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, Result};

/// Who wrote a message; backends render it with the model's chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The role as OpenAI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation, already validated and flattened to text at the edge.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// The calls an assistant message made (client tools, OpenAI's `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool message answers.
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A plain message with no tool calls, for prompts the server writes itself.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message {
            role,
            content: content.into(),
            tool_calls: vec![],
            tool_call_id: None,
        }
    }
}

/// A call of a function tool: `arguments` is a JSON object as text, as OpenAI sends it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// A function tool a client offers (`tools` in the request).
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// JSON Schema of the arguments.
    pub parameters: serde_json::Value,
    /// OpenAI's `strict`, passed on to upstreams; local calls always follow the schema.
    pub strict: Option<bool>,
}

/// Whether and which tool the model must call (`tool_choice`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ToolChoice {
    /// The model decides between text and calls (OpenAI's default when tools are given).
    #[default]
    Auto,
    /// No calls: the tools are context only.
    None,
    /// At least one call, of any tool.
    Required,
    /// A call of this function.
    Function(String),
}

/// One generated token's log probability (natural log, as OpenAI reports it), with the most
/// likely alternatives at its position when they were asked for.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token at a position and its log probability.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Option<Vec<u8>>,
}

/// What a completion must be: free text, or JSON (any object, or valid against a schema), or
/// a method's own reply format.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OutputFormat {
    #[default]
    Text,
    JsonObject,
    JsonSchema {
        name: String,
        schema: serde_json::Value,
        strict: Option<bool>,
    },
    /// A grammar in llguidance's Lark dialect, which only methods set (never a client): a
    /// backend that [`Backend::constrains`] decodes under it; one that cannot generates free
    /// text, which the method parses and retries as before.
    Grammar(String),
}

impl OutputFormat {
    /// Whether the reply must be a JSON document.
    pub fn is_json(&self) -> bool {
        matches!(
            self,
            OutputFormat::JsonObject | OutputFormat::JsonSchema { .. }
        )
    }
}

/// How to sample, as the request asked, with OpenAI's meaning (`temperature` 0 is greedy,
/// anything above samples from the full distribution); `None` leaves a choice to the
/// backend's default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: u32,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub logit_bias: Vec<(u32, f32)>,
    pub seed: Option<u64>,
    /// Local models constrain decoding to it; upstreams get it forwarded.
    pub format: OutputFormat,
    /// Report each token's log probability, with this many alternatives (0 to 20).
    pub logprobs: Option<u8>,
}

/// What every method hands a backend: the messages, sampling, tools and priority, with no
/// HTTP or OpenAI shape left.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub sampling: Sampling,
    /// Client tools. The direct method hands them to the backend, which returns the model's
    /// calls as [`Event::ToolCall`]s; IterResearch runs its own tool loop and never passes them.
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
    /// `parallel_tool_calls`: unset lets the model make several calls in one turn.
    pub parallel_tool_calls: Option<bool>,
    /// A legacy text completion: the model continues this text as it is, with no chat
    /// template; `messages` are then empty.
    pub raw_prompt: Option<String>,
    /// The client's end-user id (`user`), passed on to upstreams.
    pub user: Option<String>,
    /// The admission lane: learning and evaluation mark their requests `Background`.
    pub priority: Priority,
}

/// Why a choice stopped; mapped to OpenAI's `finish_reason` strings at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
}

impl FinishReason {
    /// The `finish_reason` as OpenAI spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
        }
    }

    /// Maps any backend's finish string onto OpenAI's closed set. Unknown reasons (mistral.rs
    /// says `canceled`) become `stop`, because clients reject values outside the set.
    pub fn from_backend(s: &str) -> Self {
        match s {
            "length" => FinishReason::Length,
            "tool_calls" | "function_call" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            _ => FinishReason::Stop,
        }
    }
}

/// Tokens a request consumed, summed over every model call a method made for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    /// Prompt plus completion tokens.
    pub fn total(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// One step of a generation. A well-formed stream carries, per choice index, any number of
/// `Delta`s then exactly one `Finish`, and ends with exactly one `Usage`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Delta {
        index: u32,
        text: String,
    },
    Finish {
        index: u32,
        reason: FinishReason,
    },
    /// A call the client is to run (the choice then finishes with `tool_calls`).
    ToolCall {
        index: u32,
        call: ToolCall,
    },
    /// The log probabilities of the tokens of the next `Delta` of choice `index` (sent just
    /// before it); tokens whose text was cut (a stop sequence) have none sent.
    Logprobs {
        index: u32,
        tokens: Vec<TokenLogprob>,
    },
    Usage(Usage),
}

/// What a backend and a method return: events in order; dropping it cancels generation.
pub type EventStream = BoxStream<'static, Result<Event>>;

/// Turns a panic inside whatever produces `events` into a last `Internal` error, so that a
/// stream ends with an error event (and a non-streaming request with a 500) instead of the
/// panic unwinding through the connection and cutting it without a word.
pub fn catch_panics<T: Send + 'static>(
    events: BoxStream<'static, Result<T>>,
) -> BoxStream<'static, Result<T>> {
    std::panic::AssertUnwindSafe(events)
        .catch_unwind()
        .map(|item| {
            item.unwrap_or_else(|panic| {
                tracing::error!("a response stream panicked");
                Err(Error::Internal(format!(
                    "the server hit an internal error while answering: {}",
                    crate::error::panic_message(&*panic)
                )))
            })
        })
        .boxed()
}

/// One finished choice of a non-streaming answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: FinishReason,
    /// Present when log probabilities were asked for.
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// A whole answer, collected from an [`EventStream`] by [`collect`].
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

/// A model that generates: in-process (`local`), on another server (`upstream`), or a
/// fallback chain of them. Methods see only this trait, never which one they talk to.
#[async_trait::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// True once the backend can serve requests (a local model has finished loading).
    fn ready(&self) -> bool;

    /// The model's context length in tokens, where the backend knows it (a loaded local
    /// model); it is the default bound on the tokens one request may ask for.
    fn context_length(&self) -> Option<u32> {
        None
    }

    /// What a token costs, where the operator configured it (upstreams).
    fn price(&self) -> Option<crate::config::Price> {
        None
    }

    /// Whether generation is held to an [`OutputFormat::Grammar`]: methods ask, so that they
    /// can rely on a reply's form where it is guaranteed and keep parse-and-retry where not.
    fn constrains(&self) -> bool {
        false
    }

    /// Starts a generation. Errors that happen before the first event (validation, overload)
    /// are returned here; later ones come through the stream. Dropping the stream cancels.
    async fn stream(&self, request: ChatRequest) -> Result<EventStream>;

    /// Runs a generation to the end.
    async fn complete(&self, request: ChatRequest) -> Result<Completion> {
        let n = request.sampling.n.max(1) as usize;
        collect(self.stream(request).await?, n).await
    }
}

/// Model calls and tokens counted by [`Metered`] backends, shared by all that count into it.
#[derive(Debug, Default)]
pub struct Meter {
    calls: std::sync::atomic::AtomicU64,
    prompt_tokens: std::sync::atomic::AtomicU64,
    completion_tokens: std::sync::atomic::AtomicU64,
    /// Money, in millionths of the configured currency unit.
    micros: std::sync::atomic::AtomicU64,
}

/// What a [`Meter`] has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metered {
    pub model_calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Set when a priced (upstream) model was called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<f64>,
}

impl Meter {
    /// The counts so far.
    pub fn read(&self) -> Metered {
        use std::sync::atomic::Ordering::Relaxed;
        let micros = self.micros.load(Relaxed);
        Metered {
            model_calls: self.calls.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            price: (micros > 0).then(|| micros as f64 / 1e6),
        }
    }

    fn count(&self, usage: Usage, price: Option<crate::config::Price>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.calls.fetch_add(1, Relaxed);
        self.prompt_tokens.fetch_add(usage.prompt_tokens, Relaxed);
        self.completion_tokens
            .fetch_add(usage.completion_tokens, Relaxed);
        if let Some(p) = price {
            self.micros
                .fetch_add((p.of(usage) * 1e6).round() as u64, Relaxed);
        }
    }
}

impl Metered {
    /// What was counted between `earlier` and this reading.
    pub fn since(&self, earlier: &Metered) -> Metered {
        let price = match (self.price, earlier.price) {
            (Some(a), b) => Some(a - b.unwrap_or(0.0)),
            (None, _) => None,
        };
        Metered {
            model_calls: self.model_calls - earlier.model_calls,
            prompt_tokens: self.prompt_tokens - earlier.prompt_tokens,
            completion_tokens: self.completion_tokens - earlier.completion_tokens,
            price,
        }
    }
}

/// A backend whose every generation is counted into a [`Meter`]: how learning knows what a
/// run cost, whichever models it used.
pub struct Counting {
    inner: Arc<dyn Backend>,
    meter: Arc<Meter>,
}

impl Counting {
    /// `inner`, counted into `meter`.
    pub fn wrap(inner: Arc<dyn Backend>, meter: Arc<Meter>) -> Arc<dyn Backend> {
        Arc::new(Counting { inner, meter })
    }
}

#[async_trait::async_trait]
impl Backend for Counting {
    fn ready(&self) -> bool {
        self.inner.ready()
    }

    fn context_length(&self) -> Option<u32> {
        self.inner.context_length()
    }

    fn price(&self) -> Option<crate::config::Price> {
        self.inner.price()
    }

    fn constrains(&self) -> bool {
        self.inner.constrains()
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        let events = self.inner.stream(request).await?;
        let (meter, price) = (self.meter.clone(), self.inner.price());
        let mut usage = Usage::default();
        Ok(async_stream::stream! {
            let mut events = events;
            while let Some(e) = events.next().await {
                if let Ok(Event::Usage(u)) = &e {
                    usage = *u;
                }
                yield e;
            }
            meter.count(usage, price);
        }
        .boxed())
    }
}

/// Drains a stream into a completion with `n` choices.
pub async fn collect(mut stream: EventStream, n: usize) -> Result<Completion> {
    let mut collector = Collector::new(n);
    while let Some(event) = stream.next().await {
        collector.push(event?);
    }
    Ok(collector.finish())
}

/// Builds a [`Completion`] from events one at a time, so that a stream which carries more than
/// the backend's events (a method's) can be drained by the same code.
pub struct Collector {
    texts: Vec<String>,
    calls: Vec<Vec<ToolCall>>,
    logprobs: Vec<Option<Vec<TokenLogprob>>>,
    finishes: Vec<Option<FinishReason>>,
    usage: Usage,
}

impl Collector {
    /// A collector for `n` choices; events for an index past them are dropped.
    pub fn new(n: usize) -> Collector {
        Collector {
            texts: vec![String::new(); n],
            calls: vec![Vec::new(); n],
            logprobs: vec![None; n],
            finishes: vec![None; n],
            usage: Usage::default(),
        }
    }

    /// Adds one event to its choice.
    pub fn push(&mut self, event: Event) {
        match event {
            Event::Delta { index, text } => {
                if let Some(t) = self.texts.get_mut(index as usize) {
                    t.push_str(&text)
                }
            }
            Event::ToolCall { index, call } => {
                if let Some(c) = self.calls.get_mut(index as usize) {
                    c.push(call)
                }
            }
            Event::Logprobs { index, tokens } => {
                if let Some(l) = self.logprobs.get_mut(index as usize) {
                    l.get_or_insert_with(Vec::new).extend(tokens)
                }
            }
            Event::Finish { index, reason } => {
                if let Some(f) = self.finishes.get_mut(index as usize) {
                    *f = Some(reason)
                }
            }
            Event::Usage(u) => self.usage = u,
        }
    }

    /// The completion; a choice that never finished counts as stopped.
    pub fn finish(self) -> Completion {
        let choices = self
            .texts
            .into_iter()
            .zip(self.calls)
            .zip(self.finishes)
            .zip(self.logprobs)
            .map(|(((text, tool_calls), f), logprobs)| Choice {
                text,
                tool_calls,
                finish_reason: f.unwrap_or(FinishReason::Stop),
                logprobs,
            })
            .collect();
        Completion {
            choices,
            usage: self.usage,
        }
    }
}

/// Which lane of admission a request waits in. Learning and evaluation send many requests
/// for a long time; interactive clients must not queue behind them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Priority {
    /// A client's request: waits in the queue and is admitted first.
    #[default]
    Interactive,
    /// Learning and evaluation: admitted only while no interactive request waits, and only
    /// into the model's few background slots.
    Background,
}

/// Admission control: at most `slots` requests are admitted at once and at most `queue` more
/// wait for a slot; a request for `n` choices takes `n` slots (at most all of them). Past that
/// an interactive request is refused at once with `Overloaded`, because a client that is told
/// to retry is better served than one whose request waits unboundedly.
///
/// Background requests take a second, smaller lane: at most `background` of them hold slots at
/// once, and one is admitted only while no interactive request is waiting. Their waits are
/// bounded by the jobs' own concurrency, not by the queue, which stays the clients'.
///
/// With `yield_to_clients` (a local model, whose engine decodes one sequence after another), a
/// background request is also held back while any client request is in flight, and
/// [`Admission::client_arrived`] tells a running one to step aside (`local.rs` cancels it and
/// runs it again later), so that a learning job costs a client almost nothing.
pub struct Admission {
    slots: Arc<Semaphore>,
    background: Arc<Semaphore>,
    capacity: usize,
    queue: usize,
    waiting: Arc<AtomicUsize>,
    /// Client requests waiting or holding slots.
    clients: Arc<AtomicUsize>,
    /// Woken whenever a client request starts waiting or is admitted.
    arrived: Arc<tokio::sync::Notify>,
    yield_to_clients: bool,
    /// When the last client request left, in milliseconds since `epoch`.
    last_client_ms: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
    /// Woken whenever a slot is freed or an interactive request stops waiting.
    freed: Arc<tokio::sync::Notify>,
    label: String,
}

/// How long a yielding model stays quiet after its last client request before background work
/// resumes: a client sending its next request within this never finds a background prompt
/// being prefilled, which cannot be cut off half-way.
const QUIET_AFTER_CLIENT: std::time::Duration = std::time::Duration::from_millis(500);

/// Slots held by one admitted request; dropping it frees them and wakes background waiters.
pub struct Permit {
    _slots: OwnedSemaphorePermit,
    _lane: Option<OwnedSemaphorePermit>,
    /// A client request's place in the count of clients in flight.
    client: Option<ClientMark>,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        drop(self.client.take());
        self.freed.notify_waiters();
    }
}

/// A client request counted among those in flight, from when it starts waiting until its
/// permit is dropped (or it gives up waiting); dropping it notes when the client left.
struct ClientMark {
    clients: Arc<AtomicUsize>,
    last_ms: Arc<std::sync::atomic::AtomicU64>,
    epoch: std::time::Instant,
    freed: Arc<tokio::sync::Notify>,
}

impl Drop for ClientMark {
    fn drop(&mut self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now.max(1), Ordering::SeqCst);
        self.clients.fetch_sub(1, Ordering::SeqCst);
        self.freed.notify_waiters();
    }
}

impl Admission {
    /// `slots` requests at once, `queue` more waiting, `background` of the slots open to the
    /// learning lane.
    pub fn with_background(label: &str, slots: usize, queue: usize, background: usize) -> Self {
        Admission {
            clients: Arc::new(AtomicUsize::new(0)),
            arrived: Arc::new(tokio::sync::Notify::new()),
            yield_to_clients: false,
            last_client_ms: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            epoch: std::time::Instant::now(),
            slots: Arc::new(Semaphore::new(slots.max(1))),
            background: Arc::new(Semaphore::new(background.clamp(1, slots.max(1)))),
            capacity: slots.max(1),
            queue,
            waiting: Arc::new(AtomicUsize::new(0)),
            freed: Arc::new(tokio::sync::Notify::new()),
            label: label.to_owned(),
        }
    }

    /// Background requests also wait while any client request is in flight, and are told to
    /// step aside when one arrives.
    pub fn yielding_to_clients(mut self) -> Self {
        self.yield_to_clients = true;
        self
    }

    /// Whether background work waits while clients are in flight (local models: one CPU).
    pub fn yields_to_clients(&self) -> bool {
        self.yield_to_clients
    }

    /// Sequences admitted at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Resolves once a client request is waiting or in flight (never, without
    /// `yielding_to_clients`): the signal for a running background request to step aside.
    pub async fn client_arrived(&self) {
        if !self.yield_to_clients {
            return std::future::pending().await;
        }
        loop {
            let arrived = self.arrived.notified();
            if self.clients.load(Ordering::SeqCst) > 0 {
                return;
            }
            arrived.await;
        }
    }

    /// Waits for `n` slots in `priority`'s lane, or fails at once when the queue is full.
    pub async fn admit(&self, n: usize, priority: Priority) -> Result<Permit> {
        let n = n.clamp(1, self.capacity) as u32;
        let (slots, lane, client) = match priority {
            Priority::Interactive => {
                // Counted from the moment it waits, so that background work steps aside at once.
                self.clients.fetch_add(1, Ordering::SeqCst);
                let mark = ClientMark {
                    clients: self.clients.clone(),
                    last_ms: self.last_client_ms.clone(),
                    epoch: self.epoch,
                    freed: self.freed.clone(),
                };
                self.arrived.notify_waiters();
                (self.admit_interactive(n).await?, None, Some(mark))
            }
            Priority::Background => {
                let lane = self
                    .background
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| Error::Unavailable("the model is shutting down".into()))?;
                (self.admit_background(n).await, Some(lane), None)
            }
        };
        Ok(Permit {
            _slots: slots,
            _lane: lane,
            client,
            freed: self.freed.clone(),
        })
    }

    /// On a yielding model, how much of the quiet period after the last client is left.
    fn quiet_left(&self) -> Option<std::time::Duration> {
        let last = self.last_client_ms.load(Ordering::SeqCst);
        if !self.yield_to_clients || last == 0 {
            return None;
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let since = std::time::Duration::from_millis(now.saturating_sub(last));
        QUIET_AFTER_CLIENT
            .checked_sub(since)
            .filter(|d| !d.is_zero())
    }

    async fn admit_interactive(&self, n: u32) -> Result<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_many_owned(n) {
            return Ok(p);
        }
        let prior = self.waiting.fetch_add(1, Ordering::SeqCst);
        if prior >= self.queue {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Overloaded {
                message: format!(
                    "model '{}' is at capacity ({} generating, {} queued); retry shortly",
                    self.label, self.capacity, self.queue
                ),
                retry_after_secs: 1,
            });
        }
        let gauge = metrics::gauge!("experient_queue_depth", "model" => self.label.clone());
        gauge.increment(1.0);
        // Decrement on every exit path, including this future being dropped by a client that
        // went away while queued; background requests may go once nobody waits.
        struct Leave<'a>(&'a AtomicUsize, metrics::Gauge, &'a tokio::sync::Notify);
        impl Drop for Leave<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
                self.1.decrement(1.0);
                self.2.notify_waiters();
            }
        }
        let _leave = Leave(&self.waiting, gauge, &self.freed);
        self.slots
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| Error::Unavailable("the model is shutting down".into()))
    }

    /// Takes slots only while no interactive request waits; otherwise waits for a slot to be
    /// freed or the interactive queue to empty, and looks again.
    async fn admit_background(&self, n: u32) -> OwnedSemaphorePermit {
        loop {
            // Registered before the check, so a wake-up between the check and the wait is kept.
            let freed = self.freed.notified();
            let clear = if self.yield_to_clients {
                self.clients.load(Ordering::SeqCst) == 0
            } else {
                self.waiting.load(Ordering::SeqCst) == 0
            };
            if clear {
                if let Some(rest) = self.quiet_left() {
                    // A client may be about to send its next request; look again after.
                    tokio::select! {
                        () = tokio::time::sleep(rest) => {},
                        () = freed => {},
                    }
                    continue;
                }
                if let Ok(p) = self.slots.clone().try_acquire_many_owned(n) {
                    return p;
                }
            }
            freed.await;
        }
    }
}

/// Applies stop sequences to streamed text. Text is released only once it can no longer turn
/// into a stop sequence, so a client never sees part of one; when one completes, the text
/// before it is released and the stream is over.
#[derive(Debug, Default)]
pub struct StopFilter {
    stops: Vec<String>,
    pending: String,
    /// What followed the stop sequence in the text pushed so far, once one completed.
    after: String,
}

impl StopFilter {
    /// A filter for these stop strings (empty ones are dropped: they would match everywhere).
    pub fn new(stops: Vec<String>) -> Self {
        StopFilter {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            after: String::new(),
        }
    }

    /// The text after the stop sequence that ended the output (tool-call parsing reads on).
    pub fn after_stop(&mut self) -> String {
        std::mem::take(&mut self.after)
    }

    /// Feeds a delta; returns the text that is safe to release and whether a stop sequence
    /// ended the output.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (text.to_owned(), false);
        }
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| Some((self.pending.find(s.as_str())?, s.len())))
            .min();
        if let Some((i, len)) = earliest {
            let out = self.pending[..i].to_owned();
            self.after = self.pending[i + len..].to_owned();
            self.pending.clear();
            return (out, true);
        }
        // Hold back the longest tail that is a prefix of some stop sequence.
        let hold = self
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(self.pending.len() + 1))
                    .rev()
                    .find(|&k| {
                        s.is_char_boundary(k)
                            && self.pending.is_char_boundary(self.pending.len() - k)
                            && self.pending.ends_with(&s[..k])
                    })
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_owned();
        self.pending.drain(..cut);
        (out, false)
    }

    /// The held-back text, released when generation ends without a stop sequence.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::{catch_panics, Admission, Event, Priority, StopFilter};
    use futures::StreamExt;
    use std::time::Duration;

    #[tokio::test]
    async fn background_requests_wait_behind_interactive_ones() {
        let a = std::sync::Arc::new(Admission::with_background("m", 2, 8, 1));
        let first = a.admit(1, Priority::Background).await.unwrap();
        // The lane holds one: a second background request waits even with a slot free.
        let lane =
            tokio::time::timeout(Duration::from_millis(50), a.admit(1, Priority::Background));
        assert!(lane.await.is_err());
        let busy = a.admit(1, Priority::Interactive).await.unwrap();
        // Both slots taken; an interactive and then a background request queue up.
        let (a1, a2) = (a.clone(), a.clone());
        let interactive = tokio::spawn(async move { a1.admit(1, Priority::Interactive).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let background = tokio::spawn(async move { a2.admit(1, Priority::Background).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(first);
        // The freed slot goes to the interactive request; the background one keeps waiting.
        let got = tokio::time::timeout(Duration::from_secs(1), interactive).await;
        let held = got.unwrap().unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!background.is_finished());
        drop(busy);
        let bg = tokio::time::timeout(Duration::from_secs(1), background).await;
        assert!(bg.unwrap().unwrap().is_ok());
        drop(held);
    }

    #[tokio::test]
    async fn on_a_yielding_model_background_work_steps_aside_for_any_client() {
        let a = std::sync::Arc::new(Admission::with_background("m", 4, 8, 2).yielding_to_clients());
        let bg = a.admit(1, Priority::Background).await.unwrap();
        // Nobody is in flight: no signal.
        let quiet = tokio::time::timeout(Duration::from_millis(30), a.client_arrived());
        assert!(quiet.await.is_err());
        // A client, admitted at once since slots are free, is the signal to step aside.
        let client = a.admit(1, Priority::Interactive).await.unwrap();
        tokio::time::timeout(Duration::from_secs(1), a.client_arrived())
            .await
            .expect("the background request is told");
        drop(bg);
        // While the client is in flight, background work is not admitted, slots or no slots.
        let a2 = a.clone();
        let next = tokio::spawn(async move { a2.admit(1, Priority::Background).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!next.is_finished());
        drop(client);
        let next = tokio::time::timeout(Duration::from_secs(1), next).await;
        assert!(next.unwrap().unwrap().is_ok());
        // Without yielding (an upstream), a running client does not hold background work back.
        let up = Admission::with_background("u", 4, 8, 2);
        let _client = up.admit(1, Priority::Interactive).await.unwrap();
        let bg = tokio::time::timeout(Duration::from_secs(1), up.admit(1, Priority::Background));
        assert!(bg.await.is_ok());
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_with_an_internal_error() {
        let events = futures::stream::iter(0..3)
            .map(|i| {
                if i == 1 {
                    panic!("boom in the method");
                }
                Ok(Event::Delta {
                    index: 0,
                    text: "x".into(),
                })
            })
            .boxed();
        let got: Vec<_> = catch_panics(events).collect().await;
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        let err = got[1].as_ref().unwrap_err().to_string();
        assert!(err.contains("boom in the method"), "{err}");
    }

    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut f = StopFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let (t, stopped) = f.push(d);
            out.push_str(&t);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&f.finish());
        (out, false)
    }

    #[test]
    fn stop_sequences_split_across_deltas_are_caught() {
        assert_eq!(
            run(&["END"], &["Hello E", "N", "D more"]),
            ("Hello ".into(), true)
        );
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["xyz", "b"], &["aaa", "b"]), ("aaa".into(), true));
    }

    #[test]
    fn near_misses_are_released() {
        assert_eq!(run(&["END"], &["Hello E", "ND"]), ("Hello ".into(), true));
        assert_eq!(run(&["END"], &["Hello E", "x"]), ("Hello Ex".into(), false));
        assert_eq!(run(&["END"], &["tail E"]), ("tail E".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["café", "é", "?"]), ("caféé?".into(), false));
    }

    #[test]
    fn a_meter_counts_calls_tokens_and_money_and_differences_readings() {
        let m = super::Meter::default();
        let price = crate::config::Price {
            prompt_per_million: 2.0,
            completion_per_million: 8.0,
        };
        let usage = |p, c| super::Usage {
            prompt_tokens: p,
            completion_tokens: c,
        };
        m.count(usage(1000, 0), None);
        assert_eq!(m.read().price, None, "unpriced calls cost nothing known");
        let before = m.read();
        m.count(usage(500_000, 250_000), Some(price));
        m.count(usage(500_000, 0), Some(price));
        let now = m.read();
        assert_eq!(
            (now.model_calls, now.prompt_tokens, now.completion_tokens),
            (3, 1_001_000, 250_000)
        );
        assert_eq!(now.price, Some(4.0));
        let step = now.since(&before);
        assert_eq!((step.model_calls, step.prompt_tokens), (2, 1_000_000));
        assert_eq!(step.price, Some(4.0));
    }
}
