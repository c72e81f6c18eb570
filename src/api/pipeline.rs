//! The one path every generating endpoint's request takes.
//!
//! An endpoint is two translations around it: in, its request body to a [`Generation`] (checked
//! at the edge, with errors in the endpoint's own field names), and out, a [`Wire`] that writes
//! the method's events as the endpoint's body or stream frames. Everything between happens here,
//! once, for all of them: routing, admission, the method's checks and options, recording for
//! feedback, running the method, deadlines, token metrics, keep-alives, the SSE body, and
//! naming the fields of errors raised below the edge.

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde_json::Value;

use super::auth::Caller;
use super::wire::ExperientOptions;
use super::AppState;
use crate::backend::{ChatRequest, Completion, Event as Model, Usage};
use crate::error::{Error, Result};
use crate::methods::{self, Applied, Event, Events, Unsupported};
use crate::router::{Method, Route};

/// One validated request, in the crate's own types, with what the pipeline needs to know about
/// the endpoint it came through.
pub(super) struct Generation {
    /// The model as the client named it; responses echo it.
    pub model: String,
    pub options: ExperientOptions,
    /// What to run: one request, or one per prompt of a legacy completion, run one after
    /// another, each one's choices numbered after the previous one's.
    pub requests: Vec<ChatRequest>,
    pub stream: bool,
    /// The field the client gave the token limit in.
    pub tokens_field: &'static str,
    /// How the endpoint spells the fields that checks past the edge name.
    pub names: &'static Names,
    /// The endpoint's name in recorded traffic.
    pub api: &'static str,
}

/// An endpoint's names for the fields that the method's checks and the backend refer to by
/// meaning. Only `api` knows wire fields; these are the endpoint's answers.
pub(super) struct Names {
    /// A method that cannot honour a part of the request: the field holding it.
    pub unsupported: fn(Unsupported) -> String,
    /// The structured-output field (a schema the model cannot be held to).
    pub format: &'static str,
    /// The tools field (a forced call's schema the model cannot be held to).
    pub tools: &'static str,
    /// Whether methods and libraries apply; legacy completions continue a prompt as it is.
    pub methods: bool,
}

/// Writes one endpoint's answer: whole, or as the frames of its stream.
pub(super) trait Wire: Send + 'static {
    /// The answer's id: in every frame, and the one feedback names.
    fn id(&self) -> &str;
    /// The frames that open a stream.
    fn open(&mut self, applied: &Applied, out: &mut Vec<Bytes>);
    /// One event's frames. Traces and usage are kept by the pipeline and never passed here.
    fn event(&mut self, event: Event, out: &mut Vec<Bytes>);
    /// The frames that end a stream that finished. Runs on a blocking thread: an endpoint that
    /// stores its answer writes it here.
    fn close(&mut self, usage: Usage, applied: &Applied, out: &mut Vec<Bytes>);
    /// The frames of an error that ends a stream.
    fn fail(&mut self, error: &Error, out: &mut Vec<Bytes>);
    /// The whole answer's body. Runs on a blocking thread, as `close` does.
    fn whole(&mut self, done: Completion, applied: &Applied) -> Result<Value>;
}

/// Runs one request through the pipeline and answers it with `wire`.
pub(super) async fn generate<W: Wire>(
    state: &AppState,
    caller: &Caller,
    g: Generation,
    wire: W,
) -> Result<Response> {
    let names = g.names;
    run(state, caller, g, wire)
        .await
        .map_err(|e| name_fields(e, names))
}

async fn run<W: Wire>(
    state: &AppState,
    caller: &Caller,
    g: Generation,
    wire: W,
) -> Result<Response> {
    let mut requests = g.requests.into_iter();
    let first = requests
        .next()
        .ok_or_else(|| Error::Internal("an endpoint passed no request".into()))?;
    let route = state.router.resolve(
        &g.model,
        g.options.method.as_deref(),
        g.options.library.as_deref(),
    )?;
    let slot = super::options::admit(
        state,
        caller,
        &route,
        first.sampling.max_tokens,
        g.tokens_field,
    )?;
    if !g.names.methods && (route.method != Method::Direct || route.library.is_some()) {
        return Err(Error::invalid(
            "legacy completions continue a prompt as it is; methods and libraries apply to /v1/chat/completions and /v1/responses",
            "model",
        ));
    }
    refuse_unsupported(&route, &first, g.names)?;
    let opts = super::options::method_options(state, caller, &route, &g.options, &first)?;
    let rec = super::feedback::recording(state, caller, &route, wire.id(), g.api, &first.messages);
    let rest: Vec<ChatRequest> = requests.collect();
    let n = first.sampling.n;
    let choices = (rest.len() + 1) * n as usize;
    let ctx = state.method_context();
    let output = methods::run(&ctx, route.clone(), first, &opts).await?;
    let events = one_after_another(output.events, rest, n, ctx, route);
    let header = applied_header(&output.applied);
    let mut resp = if g.stream {
        let events = super::stream_deadline(events, state.stream_timeout, slot);
        let events = super::feedback::record_stream(events, rec, output.applied.clone());
        let body = sse(events, wire, output.applied, g.names, KEEP_ALIVE_EVERY);
        stream_response(body)
    } else {
        let body = whole(state, events, choices, output.applied, rec, wire).await?;
        drop(slot);
        axum::Json(body).into_response()
    };
    if let Some(v) = header {
        let name = HeaderName::from_static("x-experient-experiences");
        resp.headers_mut().insert(name, v);
    }
    Ok(resp)
}

/// Refuses what the route's method cannot honour, in the endpoint's field names.
fn refuse_unsupported(route: &Route, chat: &ChatRequest, names: &Names) -> Result<()> {
    match methods::unsupported(route.method, chat) {
        None => Ok(()),
        Some(u) => {
            let field = (names.unsupported)(u);
            Err(Error::invalid_param(
                format!("'{field}' cannot be used here: {}", u.reason(route.method)),
                field,
            ))
        }
    }
}

/// A backend's refusal names the structured-output or tools field by its chat name (the
/// crate's name for it); the client is told its own.
fn name_fields(e: Error, names: &Names) -> Error {
    match e {
        Error::InvalidRequest {
            message,
            param: Some(p),
        } => {
            let param = match p.as_str() {
                "response_format" => names.format.to_owned(),
                "tools" => names.tools.to_owned(),
                _ => p,
            };
            Error::InvalidRequest {
                message,
                param: Some(param),
            }
        }
        other => other,
    }
}

/// The answer in one body, once the method has finished, recorded for feedback when the
/// library records traffic.
async fn whole<W: Wire>(
    state: &AppState,
    events: Events,
    choices: usize,
    mut applied: Applied,
    rec: Option<super::feedback::Recording>,
    mut wire: W,
) -> Result<Value> {
    let limit = state.request_timeout;
    let answer = tokio::time::timeout(limit, methods::collect(events, choices))
        .await
        .map_err(|_| {
            Error::Timeout(format!(
                "generation did not finish within {} s",
                limit.as_secs()
            ))
        })??;
    count_tokens(&applied.model, answer.completion.usage);
    applied.trace = answer.trace;
    let done = answer.completion;
    let recorded = rec.zip(done.choices.first()).map(|(rec, c)| {
        let text = super::feedback::answer_text(&c.text, &c.tool_calls);
        (rec, text)
    });
    blocking(move || {
        if let Some((rec, text)) = recorded {
            rec.keep(text, &applied);
        }
        wire.whole(done, &applied)
    })
    .await?
}

/// Runs disk work (recording, storing) off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("a blocking task failed: {e}")))
}

/// The first request's events, then each later request's, started when the one before has
/// ended, with choices renumbered after the ones before and one usage at the end, their sum.
/// A later request's failure ends the stream with its error. With one request this is its
/// events as they are.
fn one_after_another(
    first: Events,
    rest: Vec<ChatRequest>,
    n: u32,
    ctx: methods::Context,
    route: Route,
) -> Events {
    if rest.is_empty() {
        return first;
    }
    async_stream::stream! {
        let mut usage = Usage::default();
        let mut base = 0;
        let mut current = Some(first);
        let mut rest = rest.into_iter();
        while let Some(mut events) = current.take() {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(Event::Model(Model::Usage(u))) => {
                        usage.prompt_tokens += u.prompt_tokens;
                        usage.completion_tokens += u.completion_tokens;
                    }
                    Ok(Event::Model(e)) => yield Ok(Event::Model(reindex(e, base))),
                    Ok(other) => yield Ok(other),
                    Err(e) => { yield Err(e); return; }
                }
            }
            base += n;
            if let Some(request) = rest.next() {
                match methods::run(&ctx, route.clone(), request, &Default::default()).await {
                    Ok(out) => current = Some(out.events),
                    Err(e) => { yield Err(e); return; }
                }
            }
        }
        yield Ok(Event::Model(Model::Usage(usage)));
    }
    .boxed()
}

/// An event with its choice moved up by `base`.
fn reindex(event: Model, base: u32) -> Model {
    match event {
        Model::Delta { index, text } => Model::Delta {
            index: index + base,
            text,
        },
        Model::Finish { index, reason } => Model::Finish {
            index: index + base,
            reason,
        },
        Model::Logprobs { index, tokens } => Model::Logprobs {
            index: index + base,
            tokens,
        },
        Model::ToolCall { index, call } => Model::ToolCall {
            index: index + base,
            call,
        },
        other => other,
    }
}

fn stream_response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(coalesce(body).map(Ok::<_, Infallible>)),
    )
        .into_response()
}

/// A comment event, sent when a stream has been quiet for a while, so that proxies and clients
/// with idle timeouts keep the connection during a long prefill or a long IterResearch round.
/// SSE readers skip comments, so no endpoint's protocol sees it.
pub(super) const KEEP_ALIVE: &[u8] = b":\n\n";

/// How often a quiet stream is checked: a comment goes out after 15 to 30 s without an event.
pub(super) const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(15);

/// The one SSE writer: the wire's opening frames, each event's frames as it comes, a keep-alive
/// comment while quiet, then the wire's closing frames (counting the tokens) or, when the
/// method failed, its error frames.
pub(super) fn sse<W: Wire>(
    mut events: Events,
    mut wire: W,
    mut applied: Applied,
    names: &'static Names,
    keep_alive_every: Duration,
) -> impl Stream<Item = Bytes> + Send {
    async_stream::stream! {
        let mut out = Vec::new();
        wire.open(&applied, &mut out);
        let mut usage = Usage::default();
        let mut keep_alive = KeepAlive::new(keep_alive_every);
        let failed = loop {
            match keep_alive.next(&mut events).await {
                Next::Event(Ok(Event::Trace(t))) => applied.trace = Some(t),
                Next::Event(Ok(Event::Model(Model::Usage(u)))) => usage = u,
                Next::Event(Ok(ev)) => wire.event(ev, &mut out),
                Next::Event(Err(e)) => break Some(name_fields(e, names)),
                Next::End => break None,
                Next::Comment => out.push(Bytes::from_static(KEEP_ALIVE)),
                Next::Wait => {}
            }
            for b in out.drain(..) {
                yield b;
            }
        };
        match failed {
            Some(e) => wire.fail(&e, &mut out),
            None => {
                count_tokens(&applied.model, usage);
                let closed = blocking(move || {
                    let mut out = Vec::new();
                    wire.close(usage, &applied, &mut out);
                    out
                });
                match closed.await {
                    Ok(frames) => out = frames,
                    Err(e) => tracing::error!(error = %e, "a stream could not be closed"),
                }
            }
        }
        for b in out.drain(..) {
            yield b;
        }
    }
}

/// One SSE event: `data: PAYLOAD` and the blank line that ends it (the payloads are JSON, which
/// never holds a raw newline, or `[DONE]`).
pub(super) fn frame(payload: &str) -> Bytes {
    let mut f = String::with_capacity(payload.len() + 8);
    f.push_str("data: ");
    f.push_str(payload);
    f.push_str("\n\n");
    Bytes::from(f)
}

/// The last frame of a chat or legacy completion stream.
pub(super) const DONE: &[u8] = b"data: [DONE]\n\n";

/// The stream with every run of events that are ready together joined into one body frame.
///
/// hyper writes each body frame as its own chunked-encoding frame and flushes at most 16 queued
/// frames in one write: an upstream answer that arrives whole (a short answer, or a burst after
/// a stall) left as 20 frames cost two `writev`s and per-frame encoding, where the client gets
/// the same bytes from one. Joining only what is ready never holds an event back waiting for
/// the next, so a token still reaches the client the moment it is produced.
fn coalesce(frames: impl Stream<Item = Bytes> + Send) -> impl Stream<Item = Bytes> + Send {
    frames.ready_chunks(64).map(join_frames)
}

fn join_frames(mut batch: Vec<Bytes>) -> Bytes {
    if batch.len() == 1 {
        return batch.pop().unwrap_or_default();
    }
    let mut joined = bytes::BytesMut::with_capacity(batch.iter().map(Bytes::len).sum());
    for f in &batch {
        joined.extend_from_slice(f);
    }
    joined.freeze()
}

fn count_tokens(model: &str, u: Usage) {
    metrics::counter!("experient_prompt_tokens_total", "model" => model.to_owned())
        .increment(u.prompt_tokens);
    metrics::counter!("experient_completion_tokens_total", "model" => model.to_owned())
        .increment(u.completion_tokens);
}

/// The experiences a library contributed, as a header, so that streaming clients learn them
/// before the first frame.
fn applied_header(applied: &Applied) -> Option<HeaderValue> {
    let ids = applied.experiences.as_ref()?;
    HeaderValue::from_str(&ids.join(",")).ok()
}

/// Waits for a method's next event and says when the stream has been quiet since the last tick.
/// One interval for the whole stream rather than a timer reset at every event; ticks missed
/// while events kept coming are not made up in a burst.
struct KeepAlive {
    interval: tokio::time::Interval,
    quiet: bool,
}

/// What a stream does next.
enum Next {
    Event(Result<Event>),
    End,
    Comment,
    Wait,
}

impl KeepAlive {
    fn new(every: Duration) -> Self {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        KeepAlive {
            interval,
            quiet: true,
        }
    }

    async fn next(&mut self, events: &mut Events) -> Next {
        tokio::select! {
            biased;
            ev = events.next() => {
                self.quiet = false;
                ev.map_or(Next::End, Next::Event)
            }
            _ = self.interval.tick() => {
                if std::mem::replace(&mut self.quiet, true) { Next::Comment } else { Next::Wait }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_frames_are_joined_in_order() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let joined: Vec<Bytes> =
            coalesce(futures::stream::iter([b("data: 1\n\n"), b("data: 2\n\n")]))
                .collect()
                .await;
        assert_eq!(joined, vec![b("data: 1\n\ndata: 2\n\n")]);
        assert_eq!(join_frames(vec![b("data: x\n\n")]), b("data: x\n\n"));
    }
}
