//! Function calling on a model that runs here: the tools go into the prompt, and the calls come
//! out of the generated text.
//!
//! Chat templates differ in whether and how they take tools (SmolLM2's takes none), so the local
//! backend uses one documented format for every model, the one Hermes and Qwen use: the tools are
//! listed in the system prompt (`prompts/local_tools.txt`), a call is
//! `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and a result goes back as a user
//! turn inside `<tool_response>`. With `tool_choice` "required" or a named function, decoding is
//! constrained (llguidance, through mistral.rs) to a JSON object naming the function with
//! arguments valid against its `parameters` schema, so even a small model always calls well;
//! with "auto" the model chooses, and its text is read for calls as it streams.

use futures::StreamExt;
use serde_json::{json, Value};

use super::{
    ChatRequest, Event, EventStream, FinishReason, Message, OutputFormat, Role, StopFilter,
    ToolCall, ToolChoice, ToolSpec,
};

const PROMPT: &str = include_str!("../../prompts/local_tools.txt");
const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How a sequence's output is read.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Plain text.
    Off,
    /// Text, or calls in `<tool_call>` tags (or one bare call object) of these tools.
    Auto { names: Vec<String>, parallel: bool },
    /// The whole output is one call object, held to the call schema.
    Forced,
}

/// OpenAI's call ids: `call_` and 24 characters.
pub fn call_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("call_{}", &id[..24])
}

/// The request as the model sees it: tools listed in the system prompt, earlier calls and
/// their results written into the conversation, and for a forced call the output constrained
/// to it. The returned request carries no tools.
pub fn prepare(mut r: ChatRequest) -> (ChatRequest, Mode) {
    let offered = !r.tools.is_empty() && r.tool_choice != ToolChoice::None;
    let history = r
        .messages
        .iter()
        .any(|m| m.role == Role::Tool || !m.tool_calls.is_empty());
    if !offered && !history {
        r.tools.clear();
        return (r, Mode::Off);
    }
    let mut messages: Vec<Message> = r.messages.iter().map(render_message).collect();
    let mode = if offered {
        add_to_system(&mut messages, &tool_prompt(&r.tools));
        match &r.tool_choice {
            ToolChoice::Auto if r.sampling.format.is_json() => {
                r.sampling.format = call_or_answer(&r.tools, &r.sampling.format);
                Mode::Auto {
                    names: r.tools.iter().map(|t| t.name.clone()).collect(),
                    parallel: false,
                }
            }
            ToolChoice::Auto => Mode::Auto {
                names: r.tools.iter().map(|t| t.name.clone()).collect(),
                parallel: r.parallel_tool_calls != Some(false),
            },
            choice => {
                r.sampling.format = OutputFormat::JsonSchema {
                    name: "tool_call".into(),
                    schema: call_schema(&r.tools, choice),
                    strict: Some(true),
                };
                Mode::Forced
            }
        }
    } else {
        Mode::Off
    };
    r.messages = messages;
    r.tools.clear();
    (r, mode)
}

fn tool_prompt(tools: &[ToolSpec]) -> String {
    let list = tools
        .iter()
        .map(|t| {
            json!({"name": t.name, "description": t.description, "parameters": parameters(t)})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    PROMPT.trim_end().replace("{tools}", &list)
}

fn parameters(t: &ToolSpec) -> Value {
    match &t.parameters {
        Value::Null => json!({"type": "object"}),
        p => p.clone(),
    }
}

/// A call of `t` as the model writes it: `{"name": <the function>, "arguments": <its
/// parameters>}`.
fn call_object(t: &ToolSpec) -> Value {
    json!({
        "type": "object",
        "properties": {"name": {"const": t.name}, "arguments": parameters(t)},
        "required": ["name", "arguments"],
        "additionalProperties": false,
    })
}

/// With tools the model may call and a structured answer (`tool_choice` "auto" beside
/// `response_format`, as agent frameworks send for an output type), the reply is one JSON
/// object held to either: a call of an offered tool, or the answer held to its schema (TGI's
/// tool grammar has a no-tool branch for the same reason). The reply is read as in auto mode:
/// a call of a known tool becomes a call, anything else is the answer's text.
fn call_or_answer(tools: &[ToolSpec], format: &OutputFormat) -> OutputFormat {
    let answer = match format {
        OutputFormat::JsonSchema { schema, .. } => schema.clone(),
        _ => json!({"type": "object"}),
    };
    let mut either: Vec<Value> = tools.iter().map(call_object).collect();
    either.push(answer);
    OutputFormat::JsonSchema {
        name: "call_or_answer".into(),
        schema: json!({"anyOf": either}),
        strict: Some(true),
    }
}

/// The schema a forced call is held to: a call of one function or of any of them.
fn call_schema(tools: &[ToolSpec], choice: &ToolChoice) -> Value {
    let one = call_object;
    match choice {
        ToolChoice::Function(name) => tools
            .iter()
            .find(|t| &t.name == name)
            .map(one)
            .unwrap_or_else(|| json!({"type": "object"})),
        _ if tools.len() == 1 => one(&tools[0]),
        _ => json!({"anyOf": tools.iter().map(one).collect::<Vec<_>>()}),
    }
}

fn add_to_system(messages: &mut Vec<Message>, text: &str) {
    match messages.iter_mut().find(|m| m.role == Role::System) {
        Some(m) => m.content = format!("{}\n\n{text}", m.content),
        None => messages.insert(0, Message::new(Role::System, text)),
    }
}

/// An assistant turn's calls are written as the model would have written them; a tool's result
/// becomes a user turn, which every chat template accepts.
fn render_message(m: &Message) -> Message {
    match m.role {
        Role::Tool => Message::new(
            Role::User,
            format!("<tool_response>\n{}\n</tool_response>", m.content),
        ),
        Role::Assistant if !m.tool_calls.is_empty() => {
            let mut text = m.content.trim().to_owned();
            for c in &m.tool_calls {
                let arguments: Value = serde_json::from_str(&c.arguments)
                    .unwrap_or(Value::String(c.arguments.clone()));
                if !text.is_empty() {
                    text.push('\n');
                }
                text.push_str(&format!(
                    "{OPEN}{}{CLOSE}",
                    json!({"name": c.name, "arguments": arguments})
                ));
            }
            Message::new(Role::Assistant, text)
        }
        _ => Message::new(m.role, m.content.clone()),
    }
}

/// One call object, `{"name", "arguments"}` (arguments as an object, or as JSON text).
fn parse_call(text: &str, names: Option<&[String]>) -> Option<ToolCall> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let name = v.get("name")?.as_str()?;
    if names.is_some_and(|n| !n.iter().any(|k| k == name)) {
        return None;
    }
    let arguments = match v.get("arguments").or_else(|| v.get("parameters")) {
        None => "{}".to_owned(),
        Some(Value::String(s)) if serde_json::from_str::<Value>(s).is_ok_and(|a| a.is_object()) => {
            s.clone()
        }
        Some(a @ Value::Object(_)) => a.to_string(),
        Some(_) => return None,
    };
    Some(ToolCall {
        id: call_id(),
        name: name.to_owned(),
        arguments,
    })
}

/// The calls in text that followed an opening `<tool_call>`: each up to its closing tag (the
/// last may lack one). Text that is not a call of a known tool makes the whole reply text.
fn parse_tagged(after_open: &str, names: &[String]) -> Option<Vec<ToolCall>> {
    after_open
        .split(OPEN)
        .map(|part| {
            let body = part.split(CLOSE).next().unwrap_or(part);
            parse_call(body, Some(names))
        })
        .collect()
}

/// How a sequence's captured output is turned back into events once it ends.
enum Capture {
    /// After `<tool_call>`.
    Tagged(String),
    /// A reply that began with `{`: maybe a bare call object.
    Bare(String),
}

/// Reads one sequence's events (choice `index`) for calls, as [`Mode`] says.
///
/// With `Auto`, text streams as it comes until `<tool_call>` appears (the text before it is
/// released, the tag held back as a stop sequence would be) or the reply opens with `{`; from
/// then on it is kept, and at the end it becomes calls or, if it is not a call of a known tool,
/// is released as the text it was.
pub fn read_calls(events: EventStream, mode: Mode) -> EventStream {
    if mode == Mode::Off {
        return events;
    }
    async_stream::stream! {
        let mut events = events;
        let mut filter = StopFilter::new(vec![OPEN.to_owned()]);
        let mut lead = String::new();
        let mut released = false;
        let mut capture = (mode == Mode::Forced).then(|| Capture::Bare(String::new()));
        while let Some(ev) = events.next().await {
            match ev {
                Ok(Event::Delta { index, text }) => {
                    match capture.as_mut() {
                        Some(Capture::Tagged(s) | Capture::Bare(s)) => { s.push_str(&text); continue; }
                        None => {}
                    }
                    let text = if released { text } else {
                        lead.push_str(&text);
                        let head = lead.trim_start();
                        if head.is_empty() { continue; }
                        if head.starts_with('{') {
                            capture = Some(Capture::Bare(std::mem::take(&mut lead)));
                            continue;
                        }
                        released = true;
                        std::mem::take(&mut lead)
                    };
                    let (out, hit) = filter.push(&text);
                    if !out.is_empty() {
                        yield Ok(Event::Delta { index, text: out });
                    }
                    if hit {
                        capture = Some(Capture::Tagged(filter.after_stop()));
                    }
                }
                Ok(Event::Finish { index, reason }) => {
                    for ev in finish(index, reason, capture.take(), &mut filter, &mut lead, &mode) {
                        yield Ok(ev);
                    }
                }
                other => yield other,
            }
        }
    }
    .boxed()
}

/// The events that end a sequence: its calls, or the text that was held back.
fn finish(
    index: u32,
    reason: FinishReason,
    capture: Option<Capture>,
    filter: &mut StopFilter,
    lead: &mut String,
    mode: &Mode,
) -> Vec<Event> {
    let (names, parallel) = match mode {
        Mode::Auto { names, parallel } => (Some(names.as_slice()), *parallel),
        _ => (None, false),
    };
    let (calls, raw) = match capture {
        None => {
            let rest = format!("{}{}", std::mem::take(lead), filter.finish());
            (None, rest)
        }
        Some(Capture::Bare(s)) => (parse_call(&s, names).map(|c| vec![c]), s),
        Some(Capture::Tagged(s)) => (
            names.and_then(|n| parse_tagged(&s, n)),
            format!("{OPEN}{s}"),
        ),
    };
    if calls.is_none() && *mode == Mode::Forced && reason == FinishReason::Length {
        if let Some(call) = cut_call(&raw) {
            return vec![
                Event::ToolCall { index, call },
                Event::Finish { index, reason },
            ];
        }
    }
    match calls {
        Some(mut calls) if !calls.is_empty() => {
            if !parallel {
                calls.truncate(1);
            }
            let mut out: Vec<Event> = calls
                .into_iter()
                .map(|call| Event::ToolCall { index, call })
                .collect();
            out.push(Event::Finish {
                index,
                reason: FinishReason::ToolCalls,
            });
            out
        }
        _ => {
            let mut out = Vec::new();
            if !raw.is_empty() {
                out.push(Event::Delta { index, text: raw });
            }
            out.push(Event::Finish { index, reason });
            out
        }
    }
}

/// A forced call cut off by the token limit, returned as OpenAI returns one: the call, with the
/// arguments written so far (not yet valid JSON), so the client sees a call that ran out of
/// tokens rather than text. The call object's keys come in the schema's order, its name
/// first; a reply cut before its arguments began is not a call.
fn cut_call(raw: &str) -> Option<ToolCall> {
    const ARGUMENTS: &str = "\"arguments\":";
    let at = raw.find(ARGUMENTS)?;
    let head = raw[..at].trim_end().trim_end_matches(',');
    let name: Value = serde_json::from_str(&format!("{head}}}")).ok()?;
    Some(ToolCall {
        id: call_id(),
        name: name.get("name")?.as_str()?.to_owned(),
        arguments: raw[at + ARGUMENTS.len()..].trim_start().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Sampling;

    #[tokio::test]
    async fn a_forced_call_cut_by_the_token_limit_is_still_a_call() {
        let evs = vec![
            Ok(Event::Delta {
                index: 0,
                text: "{\"name\":\"weather\",\"arguments\":{\"city\":\"Pa".into(),
            }),
            Ok(Event::Finish {
                index: 0,
                reason: FinishReason::Length,
            }),
        ];
        let out: Vec<Event> = read_calls(futures::stream::iter(evs).boxed(), Mode::Forced)
            .map(|e| e.unwrap())
            .collect()
            .await;
        match &out[..] {
            [Event::ToolCall { call, .. }, Event::Finish { reason, .. }] => {
                assert_eq!(call.name, "weather");
                assert_eq!(call.arguments, "{\"city\":\"Pa");
                assert_eq!(*reason, FinishReason::Length);
            }
            other => panic!("{other:?}"),
        }
        assert!(cut_call("{\"name\":\"wea").is_none());
    }

    fn tool(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: format!("{name} things"),
            parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            strict: None,
        }
    }

    async fn read(mode: Mode, deltas: &[&str]) -> Vec<Event> {
        let mut evs: Vec<crate::Result<Event>> = deltas
            .iter()
            .map(|d| {
                Ok(Event::Delta {
                    index: 0,
                    text: (*d).into(),
                })
            })
            .collect();
        evs.push(Ok(Event::Finish {
            index: 0,
            reason: FinishReason::Stop,
        }));
        read_calls(futures::stream::iter(evs).boxed(), mode)
            .map(|e| e.unwrap())
            .collect()
            .await
    }

    fn auto() -> Mode {
        Mode::Auto {
            names: vec!["weather".into(), "time".into()],
            parallel: true,
        }
    }

    fn text_of(evs: &[Event]) -> String {
        evs.iter()
            .filter_map(|e| match e {
                Event::Delta { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    fn calls_of(evs: &[Event]) -> Vec<(String, Value)> {
        evs.iter()
            .filter_map(|e| match e {
                Event::ToolCall { call, .. } => Some((
                    call.name.clone(),
                    serde_json::from_str(&call.arguments).unwrap(),
                )),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn tagged_calls_split_across_deltas_become_calls() {
        let evs = read(
            auto(),
            &[
                "Let me look. <tool",
                "_call>{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}</tool_call>\n",
                "<tool_call>{\"name\": \"time\", \"arguments\": \"{\\\"city\\\": \\\"Rome\\\"}\"}",
            ],
        )
        .await;
        assert_eq!(text_of(&evs), "Let me look. ");
        assert_eq!(
            calls_of(&evs),
            vec![
                ("weather".into(), json!({"city": "Oslo"})),
                ("time".into(), json!({"city": "Rome"}))
            ]
        );
        assert!(matches!(
            evs.last(),
            Some(Event::Finish {
                reason: FinishReason::ToolCalls,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_bare_call_object_counts_and_other_text_stays_text() {
        let evs = read(
            auto(),
            &[
                "  {\"name\": \"weather\",",
                " \"arguments\": {\"city\": \"Oslo\"}}",
            ],
        )
        .await;
        assert_eq!(
            calls_of(&evs),
            vec![("weather".into(), json!({"city": "Oslo"}))]
        );
        // An unknown tool, broken JSON, or plain text: released as it was.
        for deltas in [
            &["{\"name\": \"nope\", \"arguments\": {}}"][..],
            &["<tool_call>{\"name\": \"weather\""][..],
            &["It is ", "sunny {really}."][..],
        ] {
            let evs = read(auto(), deltas).await;
            assert_eq!(text_of(&evs), deltas.concat());
            assert!(calls_of(&evs).is_empty());
            assert!(matches!(
                evs.last(),
                Some(Event::Finish {
                    reason: FinishReason::Stop,
                    ..
                })
            ));
        }
    }

    #[tokio::test]
    async fn without_parallel_calls_only_the_first_is_kept() {
        let mode = Mode::Auto {
            names: vec!["weather".into()],
            parallel: false,
        };
        let one =
            "<tool_call>{\"name\": \"weather\", \"arguments\": {\"city\": \"A\"}}</tool_call>";
        let evs = read(mode, &[one, one]).await;
        assert_eq!(calls_of(&evs).len(), 1);
    }

    #[test]
    fn forced_choices_constrain_to_the_call_schema() {
        let r = ChatRequest {
            messages: vec![Message::new(Role::User, "Weather in Oslo?")],
            tools: vec![tool("weather"), tool("time")],
            tool_choice: ToolChoice::Function("time".into()),
            sampling: Sampling::default(),
            ..Default::default()
        };
        let (p, mode) = prepare(r.clone());
        assert_eq!(mode, Mode::Forced);
        assert!(p.tools.is_empty());
        assert!(p.messages[0].content.contains("\"name\":\"weather\""));
        let OutputFormat::JsonSchema { schema, .. } = &p.sampling.format else {
            panic!("constrained")
        };
        assert_eq!(schema["properties"]["name"]["const"], "time");
        assert_eq!(
            schema["properties"]["arguments"]["required"],
            json!(["city"])
        );
        let (p, _) = prepare(ChatRequest {
            tool_choice: ToolChoice::Required,
            ..r.clone()
        });
        let OutputFormat::JsonSchema { schema, .. } = &p.sampling.format else {
            panic!("constrained")
        };
        assert_eq!(schema["anyOf"].as_array().unwrap().len(), 2);
        // "none" lists no tools and constrains nothing.
        let (p, mode) = prepare(ChatRequest {
            tool_choice: ToolChoice::None,
            ..r
        });
        assert_eq!((mode, p.messages.len()), (Mode::Off, 1));
    }

    #[test]
    fn history_is_written_in_the_call_format() {
        let mut call = Message::new(Role::Assistant, "");
        call.tool_calls = vec![ToolCall {
            id: "call_1".into(),
            name: "weather".into(),
            arguments: "{\"city\":\"Oslo\"}".into(),
        }];
        let mut result = Message::new(Role::Tool, "Sunny, 20 C");
        result.tool_call_id = Some("call_1".into());
        let r = ChatRequest {
            messages: vec![Message::new(Role::User, "Weather?"), call, result],
            tools: vec![tool("weather")],
            ..Default::default()
        };
        let (p, _) = prepare(r);
        let roles: Vec<Role> = p.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [Role::System, Role::User, Role::Assistant, Role::User]
        );
        assert_eq!(
            p.messages[2].content,
            "<tool_call>{\"name\":\"weather\",\"arguments\":{\"city\":\"Oslo\"}}</tool_call>"
        );
        assert_eq!(
            p.messages[3].content,
            "<tool_response>\nSunny, 20 C\n</tool_response>"
        );
    }
}
