//! The Responses API: `POST /v1/responses` (plain and streamed), `GET` and `DELETE
//! /v1/responses/{id}`, and `GET /v1/responses/{id}/input_items`.
//!
//! A request is translated into the same [`ChatRequest`] a chat completion becomes, so the
//! model-name grammar, the `experient` object, libraries and methods all apply; the events that
//! come back are written as Responses output items (a message, function calls) and, when
//! streamed, as its typed event sequence. Stored responses (`store`, on by default) keep the
//! whole conversation, function-call items included, so `previous_response_id` continues it.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa_axum::{router::OpenApiRouter, routes};

use super::auth::Caller;
use super::error::JsonBody;
use super::pipeline::{self, Generation, Names, Wire};
use super::wire::{self, ExperientOptions};
use super::AppState;
use crate::backend::{
    ChatRequest, Completion, Event as Model, FinishReason, Message, OutputFormat, Role, ToolCall,
    Usage,
};
use crate::error::{Error, Result};
use crate::methods::Event;
use crate::methods::{self, Applied};

/// The Responses API routes.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(retrieve, delete))
        .routes(routes!(input_items))
}

/// The `POST /v1/responses` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateResponse {
    pub model: String,
    /// A string (one user message) or a list of input items: messages, `function_call`,
    /// `function_call_output`.
    pub input: Value,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub max_output_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"format": {"type": "text" | "json_object" | "json_schema", ...}}`.
    #[serde(default)]
    pub text: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    /// `include_obfuscation` is accepted; this server never pads its events.
    #[serde(default)]
    pub stream_options: Option<Value>,
    /// Keep the response for `previous_response_id` and `GET` (default true).
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// Up to 16 string pairs, kept with the response and returned with it.
    #[serde(default)]
    pub metadata: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub safety_identifier: Option<String>,
    #[serde(default)]
    pub prompt_cache_key: Option<String>,
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(default)]
    pub service_tier: Option<String>,
    #[serde(default)]
    pub reasoning: Option<Value>,
    #[serde(default)]
    pub background: Option<bool>,
    #[serde(default)]
    pub include: Option<Vec<String>>,
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    #[serde(default)]
    pub max_tool_calls: Option<Value>,
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub prompt: Option<Value>,
    /// experient's own options, as in chat completions.
    #[serde(default)]
    pub experient: Option<ExperientOptions>,
}

/// What is checked before anything runs, and what the response echoes.
struct Plan {
    model: String,
    stream: bool,
    store: bool,
    options: ExperientOptions,
    chat: ChatRequest,
    /// This turn's input, as items.
    input: Vec<Value>,
    /// Every item before this turn (a stored conversation's).
    history: Vec<Value>,
    /// The fields the response object repeats.
    echo: Value,
}

fn refuse(field: &'static str, why: &str) -> Error {
    Error::invalid(format!("{field}: {why}"), field)
}

/// The request's own checks (what chat does not have) on fields that are set.
fn check_unsupported(r: &CreateResponse) -> Result<()> {
    if r.truncation.as_deref().is_some_and(|t| t != "disabled") {
        return Err(refuse(
            "truncation",
            "only \"disabled\" is supported; a conversation too long for the model is an error",
        ));
    }
    if let Some(t) = r.service_tier.as_deref() {
        if !["auto", "default"].contains(&t) {
            return Err(refuse(
                "service_tier",
                "every request is served as \"default\"",
            ));
        }
    }
    if r.reasoning.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refuse(
            "reasoning",
            "the served models do not reason in hidden tokens",
        ));
    }
    if r.background == Some(true) {
        return Err(refuse(
            "background",
            "responses run while the request is open; stream for long ones",
        ));
    }
    if r.include.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(refuse("include", "no extra output is produced to include"));
    }
    if r.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refuse(
            "top_logprobs",
            "log probabilities are served by /v1/chat/completions and /v1/completions",
        ));
    }
    if r.max_tool_calls.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refuse(
            "max_tool_calls",
            "not supported; tool calls are returned to the client, which decides",
        ));
    }
    if r.conversation.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refuse(
            "conversation",
            "the Conversations API is not served; continue with previous_response_id",
        ));
    }
    if r.prompt.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(refuse("prompt", "stored prompt templates are not served"));
    }
    if let Some(m) = &r.metadata {
        if m.len() > 16 || m.iter().any(|(k, v)| k.len() > 64 || v.len() > 512) {
            return Err(refuse(
                "metadata",
                "at most 16 pairs, keys up to 64 and values up to 512 characters",
            ));
        }
    }
    if let Some(so) = &r.stream_options {
        let ok = so
            .as_object()
            .is_some_and(|o| o.keys().all(|k| k == "include_obfuscation"));
        if !ok {
            return Err(refuse(
                "stream_options",
                "only include_obfuscation is known",
            ));
        }
    }
    Ok(())
}

/// `text`: only its `format` is known.
fn text_format(text: Option<&Value>) -> Result<OutputFormat> {
    if let Some(other) = text
        .and_then(Value::as_object)
        .and_then(|o| o.keys().find(|k| *k != "format"))
    {
        return Err(Error::invalid_param(
            format!("text.{other} is not supported"),
            format!("text.{other}"),
        ));
    }
    match text.and_then(|t| t.get("format")).filter(|f| !f.is_null()) {
        None => Ok(OutputFormat::Text),
        Some(format) => wire::text_format(format),
    }
}

fn plan(state: &AppState, caller: &Caller, r: CreateResponse) -> Result<Plan> {
    check_unsupported(&r)?;
    let mut chat = chat_of(state, &r)?;
    let echo = echo(&r);
    let history = match &r.previous_response_id {
        None => vec![],
        Some(id) => conversation_of(state, caller, id)?,
    };
    let input = as_items(r.input)?;
    let mut messages = Vec::new();
    if let Some(i) = r.instructions.as_ref().filter(|i| !i.is_empty()) {
        messages.push(Message::new(Role::System, i.clone()));
    }
    messages.extend(items_to_messages(&history, "previous_response_id")?);
    messages.extend(items_to_messages(&input, "input")?);
    // What is kept is what was understood, never the client's JSON: unknown keys inside
    // items were ignored but stored, and every turn re-stored the whole conversation, so a
    // junk field grew each record by its size once more per turn.
    let (history, input) = (normalise(&history), normalise(&input));
    if r.store.unwrap_or(true) {
        check_record_size(state, &history, &input)?;
    }
    if messages.iter().all(|m| m.role == Role::System) {
        return Err(Error::invalid(
            "input must hold at least one message",
            "input",
        ));
    }
    chat.messages = messages;
    Ok(Plan {
        model: r.model,
        stream: r.stream.unwrap_or(false),
        store: r.store.unwrap_or(true),
        options: r.experient.unwrap_or_default(),
        chat,
        input,
        history,
        echo,
    })
}

/// The request's sampling, tools and format in the crate's types, checked by the same rules
/// as every endpoint's, and named as this API names them.
fn chat_of(state: &AppState, r: &CreateResponse) -> Result<ChatRequest> {
    if r.model.trim().is_empty() {
        return Err(Error::invalid("model must not be empty", "model"));
    }
    let mut sampling = wire::SamplingFields {
        max_tokens: r.max_output_tokens.map(|m| (m, "max_output_tokens")),
        temperature: r.temperature,
        top_p: r.top_p,
        ..Default::default()
    }
    .validate(&state.limits)?;
    sampling.format = text_format(r.text.as_ref())?;
    let (tools, tool_choice) = wire::tools(
        r.tools.clone().unwrap_or_default(),
        r.tool_choice.as_ref(),
        state.limits.max_tools,
        wire::ToolShape::Flat,
    )?;
    Ok(ChatRequest {
        tools,
        tool_choice,
        parallel_tool_calls: r.parallel_tool_calls,
        user: r.user.clone().or(r.safety_identifier.clone()),
        sampling,
        ..Default::default()
    })
}

/// The request's fields as every response object repeats them, with OpenAI's defaults.
fn echo(r: &CreateResponse) -> Value {
    json!({
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens,
        "metadata": r.metadata.clone().unwrap_or_default(),
        "parallel_tool_calls": r.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": r.previous_response_id,
        "temperature": r.temperature.unwrap_or(1.0),
        "top_p": r.top_p.unwrap_or(1.0),
        "text": r.text.clone().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": r.tool_choice.clone().unwrap_or_else(|| json!("auto")),
        "tools": r.tools.clone().unwrap_or_default(),
        "truncation": "disabled",
        "store": r.store.unwrap_or(true),
        "background": false,
        "user": r.user,
        "safety_identifier": r.safety_identifier,
        // Echoed as OpenAI does. The prefix cache matches every request's leading tokens, so it
        // needs no key to group requests by.
        "prompt_cache_key": r.prompt_cache_key,
    })
}

/// Items in the one shape this server reads them in: a message's text as a string, a call's
/// id, name and arguments, an output's text; nothing else the client sent.
fn normalise(items: &[Value]) -> Vec<Value> {
    items
        .iter()
        .map(|item| {
            let field = |k: &str| item.get(k).and_then(Value::as_str).unwrap_or_default();
            match item.get("type").and_then(Value::as_str) {
                Some("function_call") => json!({
                    "type": "function_call",
                    "call_id": field("call_id"),
                    "name": field("name"),
                    "arguments": item.get("arguments").and_then(Value::as_str).unwrap_or("{}"),
                }),
                Some("function_call_output") => {
                    let output = match item.get("output") {
                        Some(Value::String(s)) => s.clone(),
                        Some(v) => item_text(v, "").unwrap_or_default(),
                        None => String::new(),
                    };
                    json!({
                        "type": "function_call_output",
                        "call_id": field("call_id"),
                        "output": output,
                    })
                }
                _ => {
                    let content = item.get("content").unwrap_or(&Value::Null);
                    json!({
                        "type": "message",
                        "role": field("role"),
                        "content": item_text(content, "").unwrap_or_default(),
                    })
                }
            }
        })
        .collect()
}

/// Refuses a turn whose stored record would pass `responses.max_record_bytes`.
fn check_record_size(state: &AppState, history: &[Value], input: &[Value]) -> Result<()> {
    let size = |items: &[Value]| {
        items
            .iter()
            .map(|i| serde_json::to_vec(i).map_or(0, |b| b.len()))
            .sum::<usize>()
    };
    let bytes = (size(history) + size(input)) as u64;
    let max = state.responses.max_record_bytes();
    if bytes > max {
        return Err(Error::invalid(
            format!(
                "this conversation is {bytes} bytes, more than a stored response may hold \
                 ({max}); start a new conversation, or send store: false"
            ),
            "input",
        ));
    }
    Ok(())
}

/// The stored conversation that `previous_response_id` names: its history, input and output.
/// A response stored with another key is not found (its existence is not confirmed).
fn conversation_of(state: &AppState, caller: &Caller, id: &str) -> Result<Vec<Value>> {
    let record = stored_for(state, caller, id).map_err(|_| Error::NotFound {
        message: format!(
            "no stored response '{id}' (it was never stored, was deleted, or has expired)"
        ),
        param: Some("previous_response_id".into()),
    })?;
    let mut items = Vec::new();
    for key in ["history", "input"] {
        items.extend(record[key].as_array().cloned().unwrap_or_default());
    }
    items.extend(
        record["response"]["output"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    Ok(items)
}

fn as_items(input: Value) -> Result<Vec<Value>> {
    match input {
        Value::String(s) => Ok(vec![
            json!({"type": "message", "role": "user", "content": s}),
        ]),
        Value::Array(items) => Ok(items),
        _ => Err(Error::invalid(
            "input must be a string or a list of items",
            "input",
        )),
    }
}

/// A message item's text: a string, or parts of type `input_text`/`output_text`/`text`.
fn item_text(content: &Value, at: &str) -> Result<String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("input_text" | "output_text" | "text"), Some(t)) => text.push_str(t),
                    (Some("refusal"), _) => {}
                    (kind, _) => {
                        return Err(Error::invalid_param(
                            format!(
                                "content parts of type {kind:?} are not supported; only text is"
                            ),
                            format!("{at}.content[{j}].type"),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(Error::invalid_param(
            "content must be text or a list of parts",
            format!("{at}.content"),
        )),
    }
}

/// Input items as chat messages. Consecutive `function_call` items become one assistant turn
/// with several calls (joined to the assistant text before them, if any), and each
/// `function_call_output` a tool message that answers its call.
fn items_to_messages(items: &[Value], field: &str) -> Result<Vec<Message>> {
    let mut out: Vec<Message> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let kind = item.get("type").and_then(Value::as_str);
        let role = item.get("role").and_then(Value::as_str);
        match (kind, role) {
            (Some("message") | None, Some(role)) => {
                let role = match role {
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    "system" | "developer" => Role::System,
                    other => {
                        return Err(Error::invalid_param(
                            format!("unknown role '{other}'"),
                            format!("{at}.role"),
                        ))
                    }
                };
                let content = item.get("content").unwrap_or(&Value::Null);
                out.push(Message::new(role, item_text(content, &at)?));
            }
            (Some("function_call"), _) => {
                let field = |k: &str| item.get(k).and_then(Value::as_str);
                let (Some(call_id), Some(name)) = (field("call_id"), field("name")) else {
                    return Err(Error::invalid_param(
                        "a function_call item needs call_id and name",
                        at,
                    ));
                };
                let call = ToolCall {
                    id: call_id.to_owned(),
                    name: name.to_owned(),
                    arguments: field("arguments").unwrap_or("{}").to_owned(),
                };
                match out.last_mut() {
                    Some(m) if m.role == Role::Assistant => m.tool_calls.push(call),
                    _ => {
                        let mut m = Message::new(Role::Assistant, "");
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            (Some("function_call_output"), _) => {
                let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                    return Err(Error::invalid_param(
                        "a function_call_output item needs the call_id it answers",
                        format!("{at}.call_id"),
                    ));
                };
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    Some(v @ Value::Array(_)) => item_text(v, &at)?,
                    _ => {
                        return Err(Error::invalid_param(
                            "a function_call_output item needs its output",
                            format!("{at}.output"),
                        ))
                    }
                };
                let mut m = Message::new(Role::Tool, output);
                m.tool_call_id = Some(call_id.to_owned());
                out.push(m);
            }
            (other, _) => {
                return Err(Error::invalid_param(
                    format!(
                        "input items of type {other:?} are not supported; use messages, function_call and function_call_output"
                    ),
                    format!("{at}.type"),
                ))
            }
        }
    }
    Ok(out)
}

fn hex_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

fn call_item(id: &str, call: &ToolCall, arguments: &str, status: &str) -> Value {
    json!({
        "id": id, "type": "function_call", "status": status,
        "call_id": call.id, "name": call.name, "arguments": arguments,
    })
}

/// The Responses API's names for the fields checked past the edge: a conversation's items,
/// merged, become the chat's messages, so a problem in them is named as the input's.
static NAMES: Names = Names {
    unsupported: responses_field,
    format: "text.format",
    tools: "tools",
    methods: true,
};

fn responses_field(u: methods::Unsupported) -> String {
    match u {
        methods::Unsupported::OutputFormat => "text.format".into(),
        methods::Unsupported::NoQuestion | methods::Unsupported::UnansweredToolCall { .. } => {
            "input".into()
        }
        other => super::options::chat_field(other),
    }
}

#[utoipa::path(post, path = "/v1/responses", tag = "openai", request_body = CreateResponse, responses((status = 200, description = "a response, or with stream an SSE stream of response events", body = Object), (status = 400, description = "bad input", body = crate::api::openapi::ErrorEnvelope), (status = 401, description = "missing or wrong key", body = crate::api::openapi::ErrorEnvelope), (status = 404, description = "no such model or previous response", body = crate::api::openapi::ErrorEnvelope), (status = 429, description = "at capacity", body = crate::api::openapi::ErrorEnvelope), (status = 503, description = "loading", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn create(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    JsonBody(req): JsonBody<CreateResponse>,
) -> Result<Response> {
    let p = plan(&state, &caller, req)?;
    let out = ResponseWire {
        id: hex_id("resp"),
        owner: caller.owner.clone(),
        created: wire::now_secs(),
        state: state.clone(),
        model: p.model.clone(),
        store: p.store,
        input: p.input,
        history: p.history,
        echo: p.echo,
        events: EventWriter::default(),
        status: "completed",
    };
    let g = Generation {
        model: p.model,
        options: p.options,
        requests: vec![p.chat],
        stream: p.stream,
        tokens_field: "max_output_tokens",
        names: &NAMES,
        api: "responses",
    };
    pipeline::generate(&state, &caller, g, out).await
}

/// The Responses API's translation out: one response object, or its typed event sequence,
/// each event with its `sequence_number`; the response is stored when the request asked for it.
struct ResponseWire {
    id: String,
    /// The key that made it: only that key (or an admin) may read, continue or delete it.
    owner: Option<String>,
    created: u64,
    state: AppState,
    model: String,
    store: bool,
    /// This turn's input, as items.
    input: Vec<Value>,
    /// Every item before this turn (a stored conversation's).
    history: Vec<Value>,
    /// The fields the response object repeats.
    echo: Value,
    events: EventWriter,
    /// "completed", or "incomplete" once a choice ran out of tokens.
    status: &'static str,
}

impl ResponseWire {
    /// The response object around `output`, with the request's echoed fields.
    fn object(
        &self,
        status: &str,
        output: &[Value],
        usage: Option<Usage>,
        applied: &Applied,
    ) -> Value {
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "model": self.model,
            "output": output,
            "usage": usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total(),
            })),
            "experient": applied,
        });
        if let (Some(r), Some(e)) = (r.as_object_mut(), self.echo.as_object()) {
            for (k, v) in e {
                r.insert(k.clone(), v.clone());
            }
        }
        if status == "completed" {
            r["completed_at"] = json!(wire::now_secs());
        }
        r
    }

    /// The final response object, kept when the request asked for it.
    fn finish(&self, output: &[Value], usage: Usage, applied: &Applied) -> Result<Value> {
        let body = self.object(self.status, output, Some(usage), applied);
        if self.store {
            let record = json!({
                "response": body,
                "input": self.input,
                "history": self.history,
                "owner": self.owner,
            });
            self.state.responses.put(&self.id, &record)?;
        }
        Ok(body)
    }
}

impl Wire for ResponseWire {
    fn id(&self) -> &str {
        &self.id
    }

    fn open(&mut self, applied: &Applied, out: &mut Vec<Bytes>) {
        let start = self.object("in_progress", &[], None, applied);
        self.events
            .send("response.created", json!({"response": start}));
        self.events
            .send("response.in_progress", json!({"response": start}));
        out.append(&mut self.events.out);
    }

    fn event(&mut self, event: Event, out: &mut Vec<Bytes>) {
        match event {
            Event::Model(Model::Delta { text, .. }) => self.events.delta(text),
            Event::Model(Model::ToolCall { call, .. }) => self.events.tool_call(&call),
            Event::Model(Model::Finish {
                reason: FinishReason::Length,
                ..
            }) => {
                // The item the tokens ran out in is incomplete too: a message still open is
                // closed so, and a call already written (a forced call cut short) is marked
                // so in the final response object.
                self.status = "incomplete";
                self.events.item_status = "incomplete";
                if self.events.open.is_none() {
                    if let Some(call) = self.events.output.last_mut() {
                        call["status"] = json!("incomplete");
                    }
                }
                self.events.call_done();
            }
            Event::Model(Model::Finish { .. }) => self.events.call_done(),
            _ => {}
        }
        out.append(&mut self.events.out);
    }

    fn close(&mut self, usage: Usage, applied: &Applied, out: &mut Vec<Bytes>) {
        self.events.call_done();
        if self.events.open.is_none() && self.events.output.is_empty() {
            // An empty answer is still one message, as the non-streamed response has.
            self.events.open_message();
        }
        self.events.close_message();
        let output = std::mem::take(&mut self.events.output);
        match self.finish(&output, usage, applied) {
            Ok(done) => {
                let kind = if self.status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.events.send(kind, json!({"response": done}));
            }
            Err(err) => self.events.error(&err),
        }
        out.append(&mut self.events.out);
    }

    fn fail(&mut self, error: &Error, out: &mut Vec<Bytes>) {
        self.events.error(error);
        out.append(&mut self.events.out);
    }

    fn whole(&mut self, done: Completion, applied: &Applied) -> Result<Value> {
        let mut items = Vec::new();
        if let Some(c) = done.choices.into_iter().next() {
            if c.finish_reason == FinishReason::Length {
                self.status = "incomplete";
            }
            // Every item was cut where the tokens ran out: the last one written.
            let status = |last: bool| if last { self.status } else { "completed" };
            let (calls, text_first) = (
                c.tool_calls.len(),
                !c.text.is_empty() || c.tool_calls.is_empty(),
            );
            if text_first {
                items.push(message_item(&hex_id("msg"), &c.text, status(calls == 0)));
            }
            for (k, call) in c.tool_calls.iter().enumerate() {
                let s = status(k + 1 == calls);
                items.push(call_item(&hex_id("fc"), call, &call.arguments, s));
            }
        }
        self.finish(&items, done.usage, applied)
    }
}

/// The message item being written: its id, its output index and its text so far.
struct OpenMessage {
    id: String,
    at: usize,
    text: String,
}

/// Writes a streamed response's typed SSE events, each with the next `sequence_number`, and
/// keeps the output items they describe.
struct EventWriter {
    seq: u64,
    output: Vec<Value>,
    open: Option<OpenMessage>,
    out: Vec<Bytes>,
    /// The status the message being written closes with: "incomplete" once the tokens ran out.
    item_status: &'static str,
    /// The call whose `output_item.done` waits for the next event: only the finish that
    /// follows a call says whether the tokens ran out inside it.
    call_pending: Option<usize>,
}

impl Default for EventWriter {
    fn default() -> Self {
        EventWriter {
            seq: 0,
            output: Vec::new(),
            open: None,
            out: Vec::new(),
            item_status: "completed",
            call_pending: None,
        }
    }
}

impl EventWriter {
    fn send(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out
            .push(Bytes::from(format!("event: {kind}\ndata: {data}\n\n")));
    }

    /// A new message item with one empty text part.
    fn open_message(&mut self) {
        let (id, at) = (hex_id("msg"), self.output.len());
        let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
        self.send(
            "response.output_item.added",
            json!({"output_index": at, "item": item}),
        );
        let part = json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        self.send(
            "response.content_part.added",
            json!({"item_id": id, "output_index": at, "content_index": 0, "part": part}),
        );
        self.open = Some(OpenMessage {
            id,
            at,
            text: String::new(),
        });
    }

    fn delta(&mut self, text: String) {
        self.call_done();
        if self.open.is_none() {
            self.open_message();
        }
        let Some(m) = self.open.as_mut() else { return };
        m.text.push_str(&text);
        let d = json!({"item_id": m.id, "output_index": m.at, "content_index": 0, "delta": text, "logprobs": []});
        self.send("response.output_text.delta", d);
    }

    /// Ends the message item being written, if any: its text, its part, the item.
    fn close_message(&mut self) {
        let Some(OpenMessage { id, at, text }) = self.open.take() else {
            return;
        };
        let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
        let item = message_item(&id, &text, self.item_status);
        self.output.push(item.clone());
        self.send("response.output_text.done", json!({"item_id": id, "output_index": at, "content_index": 0, "text": text, "logprobs": []}));
        self.send(
            "response.content_part.done",
            json!({"item_id": id, "output_index": at, "content_index": 0, "part": part}),
        );
        self.send(
            "response.output_item.done",
            json!({"output_index": at, "item": item}),
        );
    }

    /// A whole call as one function_call item, after any message before it; its
    /// `output_item.done` is sent by [`Self::call_done`] once the next event shows its status.
    fn tool_call(&mut self, call: &ToolCall) {
        self.call_done();
        self.close_message();
        let (id, at) = (hex_id("fc"), self.output.len());
        self.send(
            "response.output_item.added",
            json!({"output_index": at, "item": call_item(&id, call, "", "in_progress")}),
        );
        self.send(
            "response.function_call_arguments.delta",
            json!({"item_id": id, "output_index": at, "delta": call.arguments}),
        );
        self.send("response.function_call_arguments.done", json!({"item_id": id, "output_index": at, "name": call.name, "arguments": call.arguments}));
        self.output
            .push(call_item(&id, call, &call.arguments, "completed"));
        self.call_pending = Some(at);
    }

    /// Closes the call left open by [`Self::tool_call`], with the status it ended with.
    fn call_done(&mut self) {
        if let Some(at) = self.call_pending.take() {
            let item = self.output[at].clone();
            self.send(
                "response.output_item.done",
                json!({"output_index": at, "item": item}),
            );
        }
    }

    fn error(&mut self, e: &Error) {
        let env = e.envelope();
        let err = &env["error"];
        self.send(
            "error",
            json!({"code": err["code"], "message": err["message"], "param": err["param"]}),
        );
    }
}

/// The record of `id` if `caller` may see it: made with the same key, or the caller is an
/// admin. Another key's response is "not found", as one that does not exist.
fn stored_for(state: &AppState, caller: &Caller, id: &str) -> Result<Value> {
    state
        .responses
        .get(id)?
        .filter(|r| caller.owns(r.get("owner").and_then(Value::as_str)))
        .ok_or_else(|| Error::NotFound {
            message: format!("no stored response '{id}'"),
            param: Some("response_id".into()),
        })
}

#[utoipa::path(get, path = "/v1/responses/{id}", tag = "openai", params(("id" = String, Path)), responses((status = 200, description = "the stored response", body = Object), (status = 404, description = "not stored", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn retrieve(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response> {
    let record = stored_for(&state, &caller, &id)?;
    Ok(axum::Json(record["response"].clone()).into_response())
}

#[utoipa::path(get, path = "/v1/responses/{id}/input_items", tag = "openai", params(("id" = String, Path)), responses((status = 200, description = "the response's input items", body = Object), (status = 404, description = "not stored", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn input_items(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response> {
    let record = stored_for(&state, &caller, &id)?;
    let data: Vec<Value> = record["input"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut item| {
            if item.get("id").is_none() {
                item["id"] = json!(hex_id("msg"));
            }
            if item.get("type").is_none() {
                item["type"] = json!("message");
            }
            item
        })
        .collect();
    Ok(axum::Json(json!({
        "object": "list",
        "first_id": data.first().map(|i| i["id"].clone()),
        "last_id": data.last().map(|i| i["id"].clone()),
        "has_more": false,
        "data": data,
    }))
    .into_response())
}

#[utoipa::path(delete, path = "/v1/responses/{id}", tag = "openai", params(("id" = String, Path)), responses((status = 200, description = "deleted", body = Object), (status = 404, description = "not stored", body = crate::api::openapi::ErrorEnvelope)))]
pub(super) async fn delete(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response> {
    stored_for(&state, &caller, &id)?;
    if !state.responses.delete(&id)? {
        return Err(Error::NotFound {
            message: format!("no stored response '{id}'"),
            param: Some("response_id".into()),
        });
    }
    Ok(axum::Json(json!({"id": id, "object": "response", "deleted": true})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_items_become_one_conversation_with_its_calls_intact() {
        let items = vec![
            json!({"role": "user", "content": "Weather in Oslo and Rome?"}),
            json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]}),
            json!({"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\":\"Oslo\"}"}),
            json!({"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": "{\"city\":\"Rome\"}"}),
            json!({"type": "function_call_output", "call_id": "call_1", "output": "sunny"}),
            json!({"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]}),
        ];
        let m = items_to_messages(&items, "input").unwrap();
        let roles: Vec<Role> = m.iter().map(|m| m.role).collect();
        assert_eq!(roles, [Role::User, Role::Assistant, Role::Tool, Role::Tool]);
        assert_eq!(m[1].content, "Checking.");
        let calls: Vec<&str> = m[1].tool_calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(calls, ["call_1", "call_2"]);
        assert_eq!(m[3].tool_call_id.as_deref(), Some("call_2"));
        assert_eq!(m[3].content, "rain");

        for (bad, param) in [
            (json!({"type": "reasoning", "summary": []}), "input[0].type"),
            (json!({"type": "function_call", "name": "f"}), "input[0]"),
            (
                json!({"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}),
                "input[0].content[0].type",
            ),
        ] {
            match items_to_messages(&[bad], "input") {
                Err(Error::InvalidRequest { param: Some(p), .. }) => assert_eq!(p, param),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn responses_shapes_are_read_in_place_and_errors_name_their_fields() {
        let (tools, _) = wire::tools(
            vec![json!({"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": true})],
            None,
            8,
            wire::ToolShape::Flat,
        )
        .unwrap();
        assert_eq!((tools[0].name.as_str(), tools[0].strict), ("f", Some(true)));
        let param = |e: Error| match e {
            Error::InvalidRequest { param, .. } => param.unwrap_or_default(),
            other => panic!("{other:?}"),
        };
        let bad_tool = json!({"type": "function", "name": "f", "parameters": 3});
        let e = wire::tools(vec![bad_tool], None, 8, wire::ToolShape::Flat).unwrap_err();
        assert_eq!(param(e), "tools[0].parameters");
        let f = text_format(Some(
            &json!({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}),
        ))
        .unwrap();
        assert!(matches!(f, OutputFormat::JsonSchema { name, .. } if name == "x"));
        assert_eq!(text_format(None).unwrap(), OutputFormat::Text);
        let e = text_format(Some(
            &json!({"format": {"type": "json_schema", "name": ""}}),
        ));
        assert_eq!(param(e.unwrap_err()), "text.format.name");
        let e = text_format(Some(&json!({"format": {"type": "xml"}})));
        assert_eq!(param(e.unwrap_err()), "text.format.type");
    }
}
