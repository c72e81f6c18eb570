//! The in-process backend: a GGUF model run by mistral.rs.
//!
//! Requests go to the engine through its raw sender with our own response channel, not through
//! `Model::stream_chat_request`: that API borrows the model (awkward for a `'static` HTTP body)
//! and uses a capacity-1 channel that makes the engine wait on slow clients. Every request is
//! streamed internally, because mistral.rs cancels a sequence only when a streaming send fails;
//! that makes a dropped client stop its generation, streaming or not.
//!
//! `n > 1` is run as `n` independent sequences rather than mistral.rs's `n_choices`, whose
//! streaming path emits a chunk only when every choice has produced a delta, and can wait on a
//! choice that has already finished.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use futures::StreamExt;
use indexmap::IndexMap;
use mistralrs::{
    Constraint, CustomLogitsProcessor, GgufModelBuilder, MessageContent, Model, NormalRequest,
    Request, RequestMessage, Response, SamplingParams, StopTokens, TokenSource,
};
use tokio::sync::mpsc;

use super::{
    Admission, Backend, ChatRequest, Event, EventStream, FinishReason, OutputFormat, Priority,
    StopFilter, Usage,
};
use crate::error::{Error, Result};

/// Settings of one local model.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// The id clients use.
    pub id: String,
    pub gguf: PathBuf,
    /// Sequences generated together in one batch.
    pub max_seqs: usize,
    /// Requests admitted at once.
    pub max_concurrent: usize,
    /// Requests that may wait for admission before new ones get 429.
    pub queue: usize,
    /// Slots the learning lane may hold (`config::background_slots`).
    pub background_slots: usize,
    /// Force the CPU even when a GPU build finds a device.
    pub force_cpu: bool,
    /// Finished sequences whose KV state is kept for requests that share their prefix.
    pub prefix_cache: usize,
    /// The most prompt tokens prefilled in one engine step (0: a whole prompt at once).
    pub prefill_chunk: usize,
}

/// A GGUF model run in this process by mistral.rs, on CPU (or CUDA with the feature).
pub struct LocalBackend {
    settings: LocalSettings,
    model: OnceLock<Arc<Model>>,
    failed: AtomicBool,
    admission: Admission,
}

impl LocalBackend {
    /// Creates the backend in the not-ready state; [`LocalBackend::load`] makes it ready. The split
    /// lets the server answer `/health` with 503 while the model loads.
    pub fn new(settings: LocalSettings) -> Arc<Self> {
        let admission = Admission::with_background(
            &settings.id,
            settings.max_concurrent,
            settings.queue,
            settings.background_slots,
        )
        .yielding_to_clients();
        Arc::new(LocalBackend {
            settings,
            model: OnceLock::new(),
            failed: AtomicBool::new(false),
            admission,
        })
    }

    /// The settings it was configured with.
    pub fn settings(&self) -> &LocalSettings {
        &self.settings
    }

    /// Loads the model; `ready()` is true after it returns.
    pub async fn load(&self) -> anyhow::Result<()> {
        let res = load_model(&self.settings).await;
        match res {
            Ok(m) => {
                let _ = self.model.set(Arc::new(m));
                Ok(())
            }
            Err(e) => {
                self.failed.store(true, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    fn model(&self) -> Result<&Arc<Model>> {
        self.model.get().ok_or_else(|| {
            if self.failed.load(Ordering::SeqCst) {
                Error::Unavailable(format!("model '{}' failed to load", self.settings.id))
            } else {
                Error::Unavailable(format!("model '{}' is still loading", self.settings.id))
            }
        })
    }
}

/// Loads the GGUF with `mistralrs`'s builder, then starts its engine with mistral.rs's own
/// engine builder (as `GgufModelBuilder::build` does), because only that one takes the
/// prefill chunk.
async fn load_model(s: &LocalSettings) -> anyhow::Result<Model> {
    let (dir, file) = split_path(&s.gguf)?;
    let mut builder = GgufModelBuilder::new(dir.to_string_lossy(), vec![file])
        .with_token_source(TokenSource::None)
        .with_max_num_seqs(s.max_seqs.max(1))
        .with_prefix_cache_n((s.prefix_cache > 0).then_some(s.prefix_cache));
    if s.force_cpu {
        builder = builder.with_force_cpu();
    }
    let (pipeline, scheduler, added) =
        mistralrs::model_builder_trait::build_gguf_pipeline(builder).await?;
    let e = added.engine_config;
    let engine = mistralrs_core::MistralRsBuilder::new(
        pipeline,
        scheduler,
        e.throughput_logging_enabled,
        e.search_embedding_model,
    )
    .with_no_kv_cache(e.no_kv_cache)
    .with_no_prefix_cache(e.no_prefix_cache)
    .with_prefix_cache_n(e.prefix_cache_n)
    .with_prefill_chunk_size(s.prefill_chunk)
    .build()
    .await;
    Ok(Model::new(engine))
}

fn split_path(p: &Path) -> anyhow::Result<(PathBuf, String)> {
    if !p.is_file() {
        anyhow::bail!("GGUF file {} does not exist", p.display());
    }
    let abs = std::fs::canonicalize(p)?;
    let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
    let file = abs
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((dir, file))
}

fn sampling_params(r: &ChatRequest) -> SamplingParams {
    let s = &r.sampling;
    // `neutral`, not `deterministic`: the latter pins top_k = 1, which would keep every request
    // greedy whatever its temperature.
    let mut p = SamplingParams::neutral();
    // mistral.rs samples at temperature 1 when none is given and is greedy only for an explicit
    // 0, which is also OpenAI's meaning: unset = 1.
    p.temperature = Some(f64::from(s.temperature.unwrap_or(1.0)));
    p.top_p = s.top_p.map(f64::from);
    p.max_len = s.max_tokens.map(|m| m as usize);
    p.presence_penalty = s.presence_penalty;
    p.frequency_penalty = s.frequency_penalty;
    if !s.stop.is_empty() {
        p.stop_toks = Some(StopTokens::Seqs(s.stop.clone()));
    }
    p.n_choices = 1;
    p.top_n_logprobs = s.logprobs.map_or(0, usize::from);
    p
}

/// OpenAI's `logit_bias`: a number added to the logit of each named token before sampling.
/// mistral.rs 0.8.1 takes a `logits_bias` in its sampling parameters but drops it before the
/// sampler (engine/add_request.rs), so the bias is applied here, as a logits processor, which
/// the sampler runs after its penalties and before choosing (greedy or sampled). Ids past the
/// vocabulary name no token and change nothing.
struct LogitBias(HashMap<u32, f32>);

impl CustomLogitsProcessor for LogitBias {
    fn apply(
        &self,
        logits: &candle_core::Tensor,
        _context: &[u32],
    ) -> candle_core::Result<candle_core::Tensor> {
        let mut v = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        for (&id, &bias) in &self.0 {
            if let Some(x) = v.get_mut(id as usize) {
                *x += bias;
            }
        }
        candle_core::Tensor::from_vec(v, logits.shape(), logits.device())?.to_dtype(logits.dtype())
    }
}

/// The grammar decoding is held to: llguidance, through mistral.rs, compiles a JSON Schema so
/// that every token keeps the output a prefix of a valid document; the client's schema is
/// narrowed first to compact JSON of the keys it names (`schema::for_decoding`).
fn constraint(format: &OutputFormat) -> Constraint {
    use super::schema::for_decoding;
    match format {
        OutputFormat::Text => Constraint::None,
        // Any object: nothing to narrow, and free whitespace lets a small model end a
        // document it would otherwise run on compactly (a list counting up to max_tokens).
        OutputFormat::JsonObject => Constraint::JsonSchema(serde_json::json!({"type": "object"})),
        OutputFormat::JsonSchema { schema, .. } => {
            Constraint::JsonSchema(for_decoding(schema.clone()))
        }
        OutputFormat::Grammar(lark) => Constraint::Lark(lark.clone()),
    }
}

fn logits_processors(r: &ChatRequest) -> Option<Vec<Arc<dyn CustomLogitsProcessor>>> {
    if r.sampling.logit_bias.is_empty() {
        return None;
    }
    let bias = r.sampling.logit_bias.iter().copied().collect();
    Some(vec![Arc::new(LogitBias(bias))])
}

fn request_messages(r: &ChatRequest) -> RequestMessage {
    if let Some(text) = &r.raw_prompt {
        return RequestMessage::Completion {
            text: text.clone(),
            echo_prompt: false,
            best_of: None,
        };
    }
    let messages = r
        .messages
        .iter()
        .map(|m| {
            let mut map: IndexMap<String, MessageContent> = IndexMap::new();
            map.insert("role".into(), either::Either::Left(m.role.as_str().into()));
            map.insert("content".into(), either::Either::Left(m.content.clone()));
            map
        })
        .collect();
    RequestMessage::Chat {
        messages,
        enable_thinking: None,
        reasoning_effort: None,
    }
}

/// Builds the engine request for one sequence, with the channel its responses will come on.
fn one_sequence(model: &Model, request: &ChatRequest) -> (mpsc::Receiver<Response>, NormalRequest) {
    let (tx, rx) = mpsc::channel(1024);
    let id = model.inner().next_request_id();
    (
        rx,
        NormalRequest {
            messages: request_messages(request),
            sampling_params: sampling_params(request),
            response: tx,
            return_logprobs: request.sampling.logprobs.is_some(),
            is_streaming: true,
            id,
            constraint: constraint(&request.sampling.format),
            suffix: None,
            tools: None,
            tool_choice: None,
            logits_processors: logits_processors(request),
            return_raw_logits: false,
            web_search_options: None,
            model_id: None,
            truncate_sequence: false,
        },
    )
}

/// Turns the engine's responses for one sequence into events for choice `index`.
///
/// Stop sequences are applied here, not trusted to the engine: mistral.rs turns a stop string
/// that is one token into a token-id match, which misses the same text inside other tokens.
/// When our filter ends the output first, the sequence is cancelled (by dropping `rx`) and the
/// prompt is counted by tokenizing it, since the engine's usage never arrives.
/// One step of the engine's stream, whether it answers a chat or a text completion.
struct Step {
    text: Option<String>,
    finish: Option<String>,
    logprob: Option<super::TokenLogprob>,
}

/// mistral.rs reports log probabilities in base 10; OpenAI's are natural logarithms.
fn natural(log10: f32) -> f32 {
    log10 * std::f32::consts::LN_10
}

/// One token's log probabilities, from the parts of mistral.rs's `ResponseLogprob` (which the
/// `mistralrs` crate does not export by name).
fn token_logprob(
    token: String,
    logprob: f32,
    bytes: Option<Vec<u8>>,
    top: Vec<mistralrs::TopLogprob>,
) -> super::TokenLogprob {
    super::TokenLogprob {
        bytes: bytes.or_else(|| Some(token.as_bytes().to_vec())),
        token,
        logprob: natural(logprob),
        top_logprobs: top
            .into_iter()
            .map(|t| {
                let token = t.bytes.unwrap_or_default();
                super::TopLogprob {
                    bytes: Some(token.as_bytes().to_vec()),
                    token,
                    logprob: natural(t.logprob),
                }
            })
            .collect(),
    }
}

/// The engine's chunk as steps and maybe its usage; any other response (an error, which ends
/// the stream) is handed back as it is. It is moved, not copied, so its size costs nothing.
#[allow(clippy::result_large_err)]
fn steps(resp: Response) -> std::result::Result<(Vec<Step>, Option<Usage>), Response> {
    match resp {
        Response::Chunk(chunk) => Ok((
            chunk
                .choices
                .into_iter()
                .map(|c| Step {
                    text: c.delta.content,
                    finish: c.finish_reason,
                    logprob: c
                        .logprobs
                        .map(|l| token_logprob(l.token, l.logprob, l.bytes, l.top_logprobs)),
                })
                .collect(),
            chunk.usage.map(|u| Usage {
                prompt_tokens: u.prompt_tokens as u64,
                completion_tokens: u.completion_tokens as u64,
            }),
        )),
        Response::CompletionChunk(chunk) => Ok((
            chunk
                .choices
                .into_iter()
                .map(|c| Step {
                    text: Some(c.text),
                    finish: c.finish_reason,
                    logprob: c
                        .logprobs
                        .map(|l| token_logprob(l.token, l.logprob, l.bytes, l.top_logprobs)),
                })
                .collect(),
            None,
        )),
        other => Err(other),
    }
}

/// One sequence's text on its way out: the stop filter, the JSON document so far and the log
/// probabilities of tokens whose text the filter still holds.
struct Sequence {
    index: u32,
    stop: StopFilter,
    generated: u64,
    /// With a JSON format the text so far, to see when the document is whole: mistral.rs goes
    /// on decoding (tokens that add no text) after the grammar has accepted, until max_tokens,
    /// and would report "length" for a finished document.
    json: Option<String>,
    logprobs: Vec<super::TokenLogprob>,
}

impl Sequence {
    fn new(index: u32, sampling: &super::Sampling) -> Self {
        Sequence {
            index,
            stop: StopFilter::new(sampling.stop.clone()),
            generated: 0,
            json: sampling.format.is_json().then(String::new),
            logprobs: Vec::new(),
        }
    }

    /// A token's text, as events on `out`; true when a stop sequence or a whole JSON
    /// document ends the sequence.
    fn token(
        &mut self,
        text: &str,
        logprob: Option<super::TokenLogprob>,
        out: &mut Vec<Event>,
    ) -> bool {
        self.generated += 1;
        self.logprobs.extend(logprob);
        let (text, stopped) = self.stop.push(text);
        let complete = match self.json.as_mut() {
            Some(doc) if !text.is_empty() => {
                doc.push_str(&text);
                text.contains(['}', ']']) && serde_json::from_str::<serde_json::Value>(doc).is_ok()
            }
            _ => false,
        };
        self.send(text, out);
        stopped || complete
    }

    /// What the stop filter still holds, as the last delta.
    fn rest(&mut self, out: &mut Vec<Event>) {
        let rest = self.stop.finish();
        self.send(rest, out);
    }

    /// A delta, after the log probabilities of its tokens.
    fn send(&mut self, text: String, out: &mut Vec<Event>) {
        if text.is_empty() {
            return;
        }
        let index = self.index;
        if !self.logprobs.is_empty() {
            let tokens = std::mem::take(&mut self.logprobs);
            out.push(Event::Logprobs { index, tokens });
        }
        out.push(Event::Delta { index, text });
    }
}

/// The error a response other than a chunk ends the stream with. A client's grammar is its
/// structured-output schema or a forced call's, so a grammar error names that field, by the
/// crate's (chat's) name for it, which the API turns into the client's own; a method's own
/// grammar (`grammar_param` None) failing is the server's error.
fn engine_error(resp: Response, grammar_param: Option<&'static str>) -> Error {
    let bad_grammar = |e: String| match grammar_param {
        Some(param) => Error::invalid(format!("the schema cannot be compiled: {e}"), param),
        None => Error::Internal(format!("a method's grammar cannot be compiled: {e}")),
    };
    match resp {
        Response::ValidationError(e) => {
            let e = e.to_string();
            if e.starts_with("Invalid grammar") {
                bad_grammar(e)
            } else {
                Error::invalid(format!("the model rejected the request: {e}"), None)
            }
        }
        // The constraint compiler reports a schema past its limits as an internal error;
        // the schema is the client's, so it is the client's error.
        Response::InternalError(e)
            if ["grammar", "schema", "llguidance", "lexer", "parser"]
                .iter()
                .any(|w| e.to_string().to_lowercase().contains(w)) =>
        {
            bad_grammar(e.to_string())
        }
        Response::InternalError(e) => Error::Internal(format!("model failure: {e}")),
        Response::ModelError(e, _) | Response::CompletionModelError(e, _) => {
            Error::Internal(format!("model failure: {e}"))
        }
        _ => Error::Internal("unexpected response kind from the engine".into()),
    }
}

fn sequence_events(
    mut rx: mpsc::Receiver<Response>,
    index: u32,
    model: Arc<Model>,
    request: ChatRequest,
    grammar_param: Option<&'static str>,
) -> EventStream {
    let s = async_stream::stream! {
        let mut seq = Sequence::new(index, &request.sampling);
        let mut out = Vec::new();
        let mut finished = false;
        let mut usage_sent = false;
        while let Some(resp) = rx.recv().await {
            let (choices, chunk_usage) = match steps(resp) {
                Ok(v) => v,
                Err(other) => {
                    yield Err(engine_error(other, grammar_param));
                    return;
                }
            };
            for c in choices {
                if let Some(text) = c.text {
                    if seq.token(&text, c.logprob, &mut out) {
                        // Done early: the engine stops with the receiver gone.
                        drop(rx);
                        out.push(Event::Finish { index, reason: FinishReason::Stop });
                        for ev in out.drain(..) {
                            yield Ok(ev);
                        }
                        let prompt_tokens = count_prompt(&model, &request).await;
                        yield Ok(Event::Usage(Usage { prompt_tokens, completion_tokens: seq.generated }));
                        return;
                    }
                }
                if let Some(r) = c.finish {
                    finished = true;
                    seq.rest(&mut out);
                    out.push(Event::Finish { index, reason: FinishReason::from_backend(&r) });
                }
                for ev in out.drain(..) {
                    yield Ok(ev);
                }
            }
            if let Some(u) = chunk_usage {
                usage_sent = true;
                yield Ok(Event::Usage(u));
            }
            if finished {
                if !usage_sent {
                    // A text completion's chunks carry no usage: count it here.
                    let prompt_tokens = count_prompt(&model, &request).await;
                    yield Ok(Event::Usage(Usage { prompt_tokens, completion_tokens: seq.generated }));
                }
                break;
            }
        }
        if !finished {
            // mistral.rs 0.8.1 sends no final chunk when the last sampled token decodes to no
            // text (half of a multi-byte character, say): the sequence simply ends. It did
            // finish, so finish it here, inferring the reason and counting the usage ourselves.
            seq.rest(&mut out);
            for ev in out.drain(..) {
                yield Ok(ev);
            }
            let completion_tokens = seq.generated + 1;
            let reason = match request.sampling.max_tokens {
                Some(m) if completion_tokens >= u64::from(m) => FinishReason::Length,
                _ => FinishReason::Stop,
            };
            yield Ok(Event::Finish { index, reason });
            let prompt_tokens = count_prompt(&model, &request).await;
            yield Ok(Event::Usage(Usage { prompt_tokens, completion_tokens }));
        }
    };
    s.boxed()
}

/// The prompt's length in tokens, as the chat template renders it.
async fn count_prompt(model: &Model, request: &ChatRequest) -> u64 {
    if let Some(text) = &request.raw_prompt {
        return match model
            .tokenize(either::Either::Right(text.clone()), None, true, false, None)
            .await
        {
            Ok(t) => t.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, "could not count prompt tokens");
                0
            }
        };
    }
    let mut messages = mistralrs::TextMessages::new();
    for m in &request.messages {
        let role = match m.role {
            super::Role::System => mistralrs::TextMessageRole::System,
            super::Role::User => mistralrs::TextMessageRole::User,
            super::Role::Assistant => mistralrs::TextMessageRole::Assistant,
            super::Role::Tool => mistralrs::TextMessageRole::Tool,
        };
        messages = messages.add_message(role, m.content.clone());
    }
    match model
        .tokenize(either::Either::Left(messages), None, true, true, None)
        .await
    {
        Ok(t) => t.len() as u64,
        Err(e) => {
            tracing::warn!(error = %e, "could not count prompt tokens");
            0
        }
    }
}

#[async_trait::async_trait]
impl Backend for LocalBackend {
    fn ready(&self) -> bool {
        self.model.get().is_some()
    }

    /// llguidance holds every sequence to its request's grammar.
    fn constrains(&self) -> bool {
        true
    }

    fn context_length(&self) -> Option<u32> {
        let config = self.model.get()?.config().ok()?;
        config.max_seq_len.and_then(|n| u32::try_from(n).ok())
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        if request.priority == Priority::Background && self.admission.yields_to_clients() {
            return self.yielding(request).await;
        }
        self.generate(request).await
    }
}

impl LocalBackend {
    /// Background work (learning, evaluation) on a local model steps aside for clients. The
    /// engine decodes one sequence after another, so a client arriving behind a learning
    /// rollout would wait for all of it; instead the rollout is cancelled as soon as a client
    /// waits, and run again from the start once no client is in flight. Its events are held
    /// until it finishes, so nothing a consumer saw is ever taken back; its consumers collect
    /// whole answers anyway. Under steady client traffic background work waits: learning
    /// yields to serving.
    async fn yielding(&self, request: ChatRequest) -> Result<EventStream> {
        let preempted = metrics::counter!("experient_background_preemptions_total", "model" => self.settings.id.clone());
        loop {
            let mut events = self.generate(request.clone()).await?;
            let mut held = Vec::new();
            let finished = loop {
                tokio::select! {
                    ev = events.next() => match ev {
                        Some(ev) => held.push(ev),
                        None => break true,
                    },
                    () = self.admission.client_arrived() => break false,
                }
            };
            if finished {
                return Ok(futures::stream::iter(held).boxed());
            }
            // Dropping the stream cancels the sequence in the engine and frees its slot.
            drop(events);
            preempted.increment(1);
        }
    }

    /// Admits the request and streams its sequences from the engine.
    async fn generate(&self, request: ChatRequest) -> Result<EventStream> {
        let model = self.model()?.clone();
        let (request, mode) = super::tools::prepare(request);
        let grammar_param = match (&request.sampling.format, &mode) {
            (OutputFormat::Grammar(_), _) => None,
            (_, super::tools::Mode::Forced) => Some("tools"),
            _ => Some("response_format"),
        };
        let n = request.sampling.n.max(1);
        let permit = self.admission.admit(n as usize, request.priority).await?;
        let sender = model
            .inner()
            .get_sender(None)
            .map_err(|e| Error::Unavailable(format!("model engine unavailable: {e}")))?;
        let mut streams = Vec::with_capacity(n as usize);
        for index in 0..n {
            let (rx, req) = one_sequence(&model, &request);
            sender
                .send(Request::Normal(Box::new(req)))
                .await
                .map_err(|_| Error::Unavailable("model engine stopped".into()))?;
            let events = sequence_events(rx, index, model.clone(), request.clone(), grammar_param);
            streams.push(super::tools::read_calls(events, mode.clone()));
        }
        let label = self.settings.id.clone();
        let inflight = metrics::gauge!("experient_inflight_sequences", "model" => label.clone());
        inflight.increment(n as f64);
        // Usage is summed over the sequences and reported once; the prompt is counted once, as
        // OpenAI does for `n`.
        let merged = futures::stream::select_all(streams);
        let out = async_stream::stream! {
            struct Release(metrics::Gauge, f64, #[allow(dead_code)] super::Permit);
            impl Drop for Release {
                fn drop(&mut self) { self.0.decrement(self.1); }
            }
            let _release = Release(inflight, n as f64, permit);
            let mut usage = Usage::default();
            let mut merged = merged;
            while let Some(ev) = merged.next().await {
                match ev {
                    Ok(Event::Usage(u)) => {
                        usage.prompt_tokens = usage.prompt_tokens.max(u.prompt_tokens);
                        usage.completion_tokens += u.completion_tokens;
                    }
                    Ok(_) => yield ev,
                    Err(e) => { yield Err(e); return; }
                }
            }
            yield Ok(Event::Usage(usage));
        };
        Ok(out.boxed())
    }
}
