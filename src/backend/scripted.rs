//! A backend that answers from a script instead of a model.
//!
//! Everything above the backend (wire format, stream framing, envelopes, auth, routing,
//! libraries and the methods' control flow) can be exercised without loading a model: the
//! server runs in-process on this backend (`server::run`), in milliseconds, and the script
//! says exactly what the "model" returns, so a test can assert the bytes that come out. It
//! keeps every request it receives, so a test can also assert what reached the backend (a
//! library's prior, sampling settings).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;

use super::{Backend, ChatRequest, Event, EventStream, FinishReason, Role, Usage};
use crate::error::{Error, Result};

/// What the backend answers to one request.
#[derive(Debug)]
pub struct Script {
    /// The reply's text in the pieces it streams in (each choice gets the same).
    pub pieces: Vec<String>,
    pub finish: FinishReason,
    /// Waited before each piece, to make streams that take time (cancellation, timeouts).
    pub delay: Duration,
    /// Refuse the request before the first event, as an overloaded or failing model does.
    pub refuse: Option<Error>,
}

impl Script {
    /// A reply of these words, streamed one word at a time.
    pub fn words(text: &str) -> Script {
        let mut pieces: Vec<String> = Vec::new();
        for (i, w) in text.split(' ').enumerate() {
            pieces.push(if i == 0 {
                w.to_owned()
            } else {
                format!(" {w}")
            });
        }
        Script {
            pieces,
            finish: FinishReason::Stop,
            delay: Duration::ZERO,
            refuse: None,
        }
    }
}

type Reply = dyn Fn(&ChatRequest) -> Script + Send + Sync;

/// A backend that answers from a script, for in-process tests of everything but the model.
pub struct Scripted {
    reply: Box<Reply>,
    received: Mutex<Vec<ChatRequest>>,
    /// Claims to hold replies to a grammar (the script is trusted to), so that a test can see
    /// what a method asks of a backend that constrains.
    constrains: bool,
}

impl Scripted {
    /// Answers each request with `reply(request)`.
    pub fn new(reply: impl Fn(&ChatRequest) -> Script + Send + Sync + 'static) -> Arc<Scripted> {
        Arc::new(Scripted {
            reply: Box::new(reply),
            received: Mutex::default(),
            constrains: false,
        })
    }

    /// Like [`Scripted::new`], for a backend that says it decodes under grammars.
    pub fn constraining(
        reply: impl Fn(&ChatRequest) -> Script + Send + Sync + 'static,
    ) -> Arc<Scripted> {
        Arc::new(Scripted {
            reply: Box::new(reply),
            received: Mutex::default(),
            constrains: true,
        })
    }

    /// Repeats the last user message back, word by word, cut at `max_tokens` words (then
    /// finishing with `length`).
    pub fn echo() -> Arc<Scripted> {
        Scripted::new(|r| {
            let last = r
                .messages
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
                .or_else(|| r.raw_prompt.clone())
                .unwrap_or_default();
            let mut s = Script::words(&last);
            if let Some(max) = r.sampling.max_tokens {
                if s.pieces.len() > max as usize {
                    s.pieces.truncate(max as usize);
                    s.finish = FinishReason::Length;
                }
            }
            s
        })
    }

    /// Every request received so far, oldest first.
    pub fn received(&self) -> Vec<ChatRequest> {
        self.received.lock().clone()
    }
}

/// Words, as a stand-in for tokens in the usage the script reports.
fn words(r: &ChatRequest) -> u64 {
    let text = r.messages.iter().map(|m| m.content.as_str());
    text.chain(r.raw_prompt.as_deref())
        .map(|t| t.split_whitespace().count() as u64)
        .sum()
}

#[async_trait::async_trait]
impl Backend for Scripted {
    fn ready(&self) -> bool {
        true
    }

    fn constrains(&self) -> bool {
        self.constrains
    }

    async fn stream(&self, request: ChatRequest) -> Result<EventStream> {
        self.received.lock().push(request.clone());
        let script = (self.reply)(&request);
        if let Some(e) = script.refuse {
            return Err(e);
        }
        let n = request.sampling.n.max(1);
        let usage = Usage {
            prompt_tokens: words(&request),
            completion_tokens: script.pieces.len() as u64 * u64::from(n),
        };
        let delay = script.delay;
        let mut events = Vec::new();
        for piece in &script.pieces {
            for index in 0..n {
                events.push(Event::Delta {
                    index,
                    text: piece.clone(),
                });
            }
        }
        for index in 0..n {
            events.push(Event::Finish {
                index,
                reason: script.finish,
            });
        }
        events.push(Event::Usage(usage));
        Ok(futures::stream::iter(events)
            .then(move |e| async move {
                if !delay.is_zero() && matches!(e, Event::Delta { .. }) {
                    tokio::time::sleep(delay).await;
                }
                Ok(e)
            })
            .boxed())
    }
}
