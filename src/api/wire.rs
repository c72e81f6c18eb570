//! OpenAI wire types for chat completions, and their translation into the crate's own types.
//!
//! Every request field is honoured, passed on to an upstream that takes it, or refused with a
//! 400 that names it; a field this server does not know is refused too, as OpenAI refuses
//! one, because a setting dropped without a word is one the client believes took effect.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::{
    ChatRequest, Message, OutputFormat, Role, Sampling, ToolCall, ToolChoice, ToolSpec,
};
use crate::error::{Error, Result};

/// The `POST /v1/chat/completions` body as OpenAI defines it; unknown fields are refused.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<WireMessage>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
    #[serde(default)]
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub n: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    #[serde(default)]
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub functions: Option<Vec<Value>>,
    #[serde(default)]
    pub function_call: Option<Value>,
    #[serde(default)]
    pub response_format: Option<Value>,
    #[serde(default)]
    pub audio: Option<Value>,
    #[serde(default)]
    pub prediction: Option<Value>,
    /// Identifies the end user; passed on to upstreams, used for nothing here.
    #[serde(default)]
    pub user: Option<String>,
    /// OpenAI's stored completions: this server keeps none, so only `false` is taken.
    #[serde(default)]
    pub store: Option<bool>,
    /// Only with `store`; refused when it holds anything.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// "auto" and "default" are what every request gets; others are refused.
    #[serde(default)]
    pub service_tier: Option<String>,
    /// Reasoning models only; refused.
    #[serde(default)]
    pub reasoning_effort: Option<Value>,
    /// Only `["text"]` is produced.
    #[serde(default)]
    pub modalities: Option<Vec<String>>,
    #[serde(default)]
    pub web_search_options: Option<Value>,
    #[serde(default)]
    pub verbosity: Option<Value>,
    /// experient's own options; see [`ExperientOptions`].
    #[serde(default)]
    pub experient: Option<ExperientOptions>,
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// The `"experient"` request object: another way to pick a method and a library, for clients
/// that can add fields but would rather not encode them in the model name.
#[derive(Debug, Deserialize, Default, Clone, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperientOptions {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub library: Option<String>,
    /// A version of the library to serve instead of the live one.
    #[serde(default)]
    pub version: Option<u64>,
    /// How many experiences to inject: a number, or "all".
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub experiences: Option<crate::methods::Selection>,
    /// How the library's experiences are retrieved for this request: `mode` (hybrid,
    /// lexical, semantic), `min_score`, `diversity`; each overrides the library's setting.
    #[serde(default)]
    pub retrieval: Option<crate::experience::retrieve::RetrievalOverride>,
    /// IterResearch: most rounds before an answer is forced.
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// IterResearch: "markovian" (the default: question, report, last action) or "full" (the
    /// whole history, ReAct-style; a baseline for comparison).
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub workspace: Option<crate::methods::Workspace>,
    /// IterResearch: the built-in tools to offer (default: all the server allows).
    #[serde(default)]
    pub tools: Option<Vec<String>>,
    /// Planning: the task family (a MiniGrid id such as "MiniGrid-DoorKey-5x5-v0", or "grasp").
    #[serde(default)]
    pub env: Option<String>,
    /// Planning: what to solve: a count, a list of seeds, or GRASP grids (`{"grid": [...]}`).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub instances: Option<super::options::Instances>,
    /// Planning: training instances for refinement: a count or a list of seeds.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub train: Option<super::options::Seeds>,
    /// Planning: refinement rounds after the first program.
    #[serde(default)]
    pub rounds: Option<u32>,
    /// Planning: also ask for each instance's actions directly, as a baseline.
    #[serde(default)]
    pub direct: bool,
    /// Planning: write a new program even when the family has a kept one.
    #[serde(default)]
    pub refresh: bool,
}

/// A message as clients send it, before it is flattened to a [`Message`].
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct WireMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    #[serde(default)]
    pub tool_calls: Option<Value>,
    #[serde(default)]
    pub tool_call_id: Option<String>,
    /// A reasoning model's thinking on an earlier assistant turn, as clients send it back
    /// (`reasoning_content`, and `reasoning`, vLLM's newer name). Taken and not shown to the
    /// model again, as reasoning models' own chat templates drop an earlier turn's thinking.
    #[serde(default)]
    pub reasoning_content: Option<Value>,
    #[serde(default)]
    pub reasoning: Option<Value>,
}

/// Message content: a string or a list of parts.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part; only text parts are accepted.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub text: Option<String>,
}

/// What the server limits and defaults; comes from the configuration.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_n: u32,
    pub max_stop: usize,
    /// Most tools one request may offer (`bounds.max_tools`).
    pub max_tools: usize,
}

/// A validated request: what the route needs, and the backend request.
#[derive(Debug)]
pub struct Validated {
    pub model: String,
    /// The field the client gave the token limit in (`max_completion_tokens` or `max_tokens`).
    pub tokens_field: &'static str,
    pub stream: bool,
    pub include_usage: bool,
    pub options: ExperientOptions,
    pub chat: ChatRequest,
}

fn range(v: Option<f64>, lo: f64, hi: f64, param: &'static str) -> Result<Option<f32>> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) || x.is_nan() => Err(Error::invalid(
            format!("{param} must be between {lo} and {hi}, got {x}"),
            param,
        )),
        other => Ok(other.map(|x| x as f32)),
    }
}

/// The sampling fields every generating endpoint has, as one request gave them. Each endpoint
/// fills it from its own fields and checks it here, so all of them accept exactly the same
/// values and name the field the client sent. (The request structs still declare the fields
/// each: they refuse unknown fields by name with `deny_unknown_fields`, which serde cannot
/// combine with a flattened shared struct.)
#[derive(Debug, Default)]
pub struct SamplingFields {
    /// The token limit, and the field it came in.
    pub max_tokens: Option<(i64, &'static str)>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: Option<i64>,
    pub stop: Option<Stop>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<std::collections::BTreeMap<String, f64>>,
    pub seed: Option<i64>,
}

impl SamplingFields {
    /// The checked sampling, as plain text with no log probabilities (the endpoint sets those).
    pub fn validate(self, limits: &RequestLimits) -> Result<Sampling> {
        let temperature = range(self.temperature, 0.0, 2.0, "temperature")?;
        let top_p = range(self.top_p, 0.0, 1.0, "top_p")?;
        if top_p == Some(0.0) {
            return Err(Error::invalid("top_p must be greater than 0", "top_p"));
        }
        let presence_penalty = range(self.presence_penalty, -2.0, 2.0, "presence_penalty")?;
        let frequency_penalty = range(self.frequency_penalty, -2.0, 2.0, "frequency_penalty")?;
        let n = self.n.unwrap_or(1);
        if n < 1 || n > i64::from(limits.max_n) {
            return Err(Error::invalid(
                format!("n must be between 1 and {}, got {n}", limits.max_n),
                "n",
            ));
        }
        let seed = match self.seed {
            Some(s) if s < 0 => return Err(Error::invalid("seed must not be negative", "seed")),
            s => s.map(|s| s as u64),
        };
        Ok(Sampling {
            max_tokens: max_tokens(self.max_tokens)?,
            temperature,
            top_p,
            n: n as u32,
            stop: stop_sequences(self.stop, limits.max_stop)?,
            presence_penalty,
            frequency_penalty,
            logit_bias: logit_bias(self.logit_bias.unwrap_or_default())?,
            seed,
            format: OutputFormat::Text,
            logprobs: None,
        })
    }
}

impl ChatCompletionRequest {
    /// Checks every field and converts the request into the crate's own types; a field that
    /// cannot be honoured is a 400 naming it.
    pub fn validate(self, limits: &RequestLimits) -> Result<Validated> {
        self.refuse_unserved()?;
        let logprobs = logprobs(self.logprobs, self.top_logprobs.as_ref(), 20)?;
        let (tools, tool_choice) = tools(
            self.tools.unwrap_or_default(),
            self.tool_choice.as_ref(),
            limits.max_tools,
            ToolShape::Chat,
        )?;
        let format = output_format(self.response_format.as_ref())?;
        if self.model.trim().is_empty() {
            return Err(Error::invalid("model must not be empty", "model"));
        }
        if self.messages.is_empty() {
            return Err(Error::invalid(
                "messages must contain at least one message",
                "messages",
            ));
        }
        let messages = self
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| convert_message(i, m))
            .collect::<Result<Vec<_>>>()?;

        let tokens_field = if self.max_completion_tokens.is_some() {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        let mut sampling = SamplingFields {
            max_tokens: self
                .max_completion_tokens
                .or(self.max_tokens)
                .map(|m| (m, tokens_field)),
            temperature: self.temperature,
            top_p: self.top_p,
            n: self.n,
            stop: self.stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias,
            seed: self.seed,
        }
        .validate(limits)?;
        sampling.format = format;
        sampling.logprobs = logprobs;
        let stream = self.stream.unwrap_or(false);
        let include_usage = stream
            && self
                .stream_options
                .as_ref()
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
        Ok(Validated {
            model: self.model,
            tokens_field,
            stream,
            include_usage,
            options: self.experient.unwrap_or_default(),
            chat: ChatRequest {
                tools,
                tool_choice,
                parallel_tool_calls: self.parallel_tool_calls,
                raw_prompt: None,
                user: self.user,
                priority: Default::default(),
                messages,
                sampling,
            },
        })
    }

    /// Refuses the fields OpenAI defines that this server cannot honour, naming each, rather
    /// than dropping them: a client that sent one believes it took effect.
    fn refuse_unserved(&self) -> Result<()> {
        let unsupported = |name: &'static str| {
            Error::invalid(
                format!("'{name}' is not supported by this server; remove it from the request"),
                name,
            )
        };
        let given = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if self.functions.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(Error::invalid(
                "'functions' is the deprecated form of 'tools'; send the functions as tools",
                "functions",
            ));
        }
        if given(&self.function_call) {
            return Err(Error::invalid(
                "'function_call' is the deprecated form of 'tool_choice'; use tool_choice",
                "function_call",
            ));
        }
        if self.store == Some(true) {
            return Err(Error::invalid(
                "this server does not store chat completions; leave out store or use the Responses API, which does",
                "store",
            ));
        }
        if self
            .metadata
            .as_ref()
            .is_some_and(|m| m.as_object().is_some_and(|o| !o.is_empty()))
        {
            return Err(Error::invalid(
                "metadata is kept with stored completions only, and this server stores none",
                "metadata",
            ));
        }
        if let Some(t) = self.service_tier.as_deref() {
            if !["auto", "default"].contains(&t) {
                return Err(Error::invalid(
                    format!(
                        "service_tier '{t}' is not offered; every request is served as \"default\""
                    ),
                    "service_tier",
                ));
            }
        }
        if given(&self.web_search_options) {
            return Err(Error::invalid(
                "web_search_options is not supported; the iterresearch method searches the web itself",
                "web_search_options",
            ));
        }
        if self
            .modalities
            .as_ref()
            .is_some_and(|m| m.iter().any(|x| x != "text"))
        {
            return Err(Error::invalid(
                "only the text modality is produced",
                "modalities",
            ));
        }
        for (name, v) in [
            ("reasoning_effort", &self.reasoning_effort),
            ("verbosity", &self.verbosity),
            ("audio", &self.audio),
            ("prediction", &self.prediction),
        ] {
            if given(v) {
                return Err(unsupported(name));
            }
        }
        Ok(())
    }
}

/// Where a function tool's fields are: under `function` (chat), or on the tool itself
/// (Responses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolShape {
    Chat,
    Flat,
}

impl ToolShape {
    /// The path of the function's fields inside a tool.
    fn at(self) -> &'static str {
        match self {
            ToolShape::Chat => ".function",
            ToolShape::Flat => "",
        }
    }
}

/// The request's tools, each converted and their names unique, and the tool choice checked
/// against them.
pub fn tools(
    given: Vec<Value>,
    choice: Option<&Value>,
    max: usize,
    shape: ToolShape,
) -> Result<(Vec<ToolSpec>, ToolChoice)> {
    if given.len() > max {
        return Err(Error::invalid(
            format!(
                "at most {max} tools may be offered in one request, got {}",
                given.len()
            ),
            "tools",
        ));
    }
    let tools = given
        .into_iter()
        .enumerate()
        .map(|(i, t)| convert_tool(i, t, shape))
        .collect::<Result<Vec<_>>>()?;
    let mut seen = std::collections::HashSet::with_capacity(tools.len());
    if let Some(i) = tools.iter().position(|t| !seen.insert(t.name.as_str())) {
        return Err(Error::invalid_param(
            format!("the function name '{}' is given twice", tools[i].name),
            format!("tools[{i}]{}.name", shape.at()),
        ));
    }
    let choice = tool_choice(choice, &tools)?;
    Ok((tools, choice))
}

/// The token limit, at least 1, named by the field it came in.
fn max_tokens(given: Option<(i64, &'static str)>) -> Result<Option<u32>> {
    let Some((max, param)) = given else {
        return Ok(None);
    };
    u32::try_from(max)
        .ok()
        .filter(|&m| m >= 1)
        .map(Some)
        .ok_or_else(|| Error::invalid(format!("{param} must be at least 1, got {max}"), param))
}

/// `logit_bias` as (token id, bias) pairs: keys must be token ids and biases within
/// -100..=100, as OpenAI requires.
fn logit_bias(given: std::collections::BTreeMap<String, f64>) -> Result<Vec<(u32, f32)>> {
    given
        .into_iter()
        .map(|(k, v)| {
            let id: u32 = k.parse().map_err(|_| {
                Error::invalid(
                    format!("logit_bias keys must be token ids, got '{k}'"),
                    "logit_bias",
                )
            })?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(Error::invalid(
                    format!("logit_bias values must be between -100 and 100, got {v}"),
                    "logit_bias",
                ));
            }
            Ok((id, v as f32))
        })
        .collect()
}

/// The stop sequences, at most `max` of them and none empty (an empty one would stop at once).
fn stop_sequences(stop: Option<Stop>, max: usize) -> Result<Vec<String>> {
    let stop = match stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > max {
        return Err(Error::invalid(
            format!("stop may hold at most {max} sequences"),
            "stop",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(Error::invalid("stop sequences must not be empty", "stop"));
    }
    Ok(stop)
}

/// `logprobs` and `top_logprobs` (0 to `max`): the number of alternatives, when log
/// probabilities are asked for.
pub fn logprobs(on: Option<bool>, top: Option<&Value>, max: u8) -> Result<Option<u8>> {
    let top = match top {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(k) if k <= u64::from(max) => Some(k as u8),
            _ => {
                return Err(Error::invalid(
                    format!("top_logprobs must be an integer from 0 to {max}"),
                    "top_logprobs",
                ))
            }
        },
    };
    match (on.unwrap_or(false), top) {
        (true, k) => Ok(Some(k.unwrap_or(0))),
        (false, Some(_)) => Err(Error::invalid(
            "top_logprobs needs logprobs set to true",
            "top_logprobs",
        )),
        (false, None) => Ok(None),
    }
}

/// `tool_choice`: "none", "auto", "required", or `{"type": "function", "function": {"name"}}`
/// naming one of the tools. Unset is "auto" (with no tools, nothing is called either way).
pub fn tool_choice(v: Option<&Value>, tools: &[ToolSpec]) -> Result<ToolChoice> {
    let bad = |m: String| Err(Error::invalid(m, "tool_choice"));
    let choice = match v {
        None | Some(Value::Null) => ToolChoice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => {
                return bad(format!(
                "tool_choice must be \"none\", \"auto\", \"required\" or a named function, got \"{other}\""
            ))
            }
        },
        Some(obj) => {
            let name = obj
                .get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| obj.get("name"))
                .and_then(Value::as_str);
            match (obj.get("type").and_then(Value::as_str), name) {
                (Some("function"), Some(n)) => ToolChoice::Function(n.to_owned()),
                _ => {
                    return bad(
                        "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                    )
                }
            }
        }
    };
    match &choice {
        ToolChoice::Required if tools.is_empty() => {
            bad("tool_choice \"required\" needs at least one tool in 'tools'".into())
        }
        ToolChoice::Function(n) if !tools.iter().any(|t| &t.name == n) => bad(format!(
            "tool_choice names the function '{n}', which is not among the tools"
        )),
        _ => Ok(choice),
    }
}

/// `response_format`: `{"type": "text"}`, `{"type": "json_object"}`, or `{"type":
/// "json_schema", "json_schema": {"name", "schema", "strict"}}`.
fn output_format(rf: Option<&Value>) -> Result<OutputFormat> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(OutputFormat::Text);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("json_schema") => match rf.get("json_schema").filter(|j| j.is_object()) {
            Some(js) => json_schema_format(js, "response_format.json_schema"),
            None => Err(Error::invalid(
                "response_format of type json_schema needs a json_schema object",
                "response_format.json_schema",
            )),
        },
        kind => plain_format(kind, "response_format.type"),
    }
}

/// The Responses API's `text.format`: `{"type": "text"}`, `{"type": "json_object"}`, or
/// `{"type": "json_schema", "name", "schema", "strict"}`, the schema's fields beside its type.
pub fn text_format(format: &Value) -> Result<OutputFormat> {
    match format.get("type").and_then(Value::as_str) {
        Some("json_schema") => json_schema_format(format, "text.format"),
        kind => plain_format(kind, "text.format.type"),
    }
}

fn plain_format(kind: Option<&str>, at: &'static str) -> Result<OutputFormat> {
    match kind {
        Some("text") => Ok(OutputFormat::Text),
        Some("json_object") => Ok(OutputFormat::JsonObject),
        _ => Err(Error::invalid(
            format!("{at} must be \"text\", \"json_object\" or \"json_schema\""),
            at,
        )),
    }
}

/// A JSON Schema format's `name`, `schema` and `strict`, found in `js`, which is at `at`.
fn json_schema_format(js: &Value, at: &str) -> Result<OutputFormat> {
    let bad = |m: &str, field: &str| {
        Err(Error::invalid_param(
            format!("{at}.{field} {m}"),
            format!("{at}.{field}"),
        ))
    };
    let name = match js.get("name") {
        Some(Value::String(n)) if !n.is_empty() && n.len() <= 64 => n.clone(),
        _ => return bad("must be a string of 1 to 64 characters", "name"),
    };
    let schema = match js.get("schema") {
        None => serde_json::json!({}),
        Some(s @ Value::Object(_)) => s.clone(),
        Some(_) => return bad("must be a JSON Schema object", "schema"),
    };
    check_schema_size(&schema, format!("{at}.schema"))?;
    let strict = match js.get("strict") {
        None | Some(Value::Null) => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => return bad("must be a boolean", "strict"),
    };
    Ok(OutputFormat::JsonSchema {
        name,
        schema,
        strict,
    })
}

fn convert_message(i: usize, m: WireMessage) -> Result<Message> {
    let role = match m.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" => Role::Tool,
        other => {
            return Err(Error::invalid_param(
                format!(
                "unknown role '{other}'; expected one of system, developer, user, assistant, tool"
            ),
                format!("messages[{i}].role"),
            ))
        }
    };
    let tool_calls = match m.tool_calls {
        None | Some(Value::Null) => vec![],
        Some(v) => convert_tool_calls(i, v)?,
    };
    let reasoning = match (&m.reasoning_content, &m.reasoning) {
        (Some(_), _) => Some("reasoning_content"),
        (None, Some(_)) => Some("reasoning"),
        (None, None) => None,
    };
    if let Some(field) = reasoning.filter(|_| role != Role::Assistant) {
        return Err(Error::invalid_param(
            "only assistant messages carry reasoning",
            format!("messages[{i}].{field}"),
        ));
    }
    if !tool_calls.is_empty() && role != Role::Assistant {
        return Err(Error::invalid_param(
            "only assistant messages carry tool_calls",
            format!("messages[{i}].tool_calls"),
        ));
    }
    if role == Role::Tool && m.tool_call_id.is_none() {
        return Err(Error::invalid_param(
            "a tool message needs the tool_call_id it answers",
            format!("messages[{i}].tool_call_id"),
        ));
    }
    let content = match m.content {
        None if role == Role::Assistant => String::new(),
        None => {
            return Err(Error::invalid_param(
                format!("a {} message needs content", m.role),
                format!("messages[{i}].content"),
            ))
        }
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.into_iter().enumerate() {
                match (p.kind.as_str(), p.text) {
                    ("text", Some(t)) => text.push_str(&t),
                    ("text", None) => {
                        return Err(Error::invalid_param(
                            "a text part needs 'text'",
                            format!("messages[{i}].content[{j}].text"),
                        ))
                    }
                    (kind, _) => {
                        return Err(Error::invalid_param(
                            format!(
                                "content parts of type '{kind}' are not supported; only 'text' is"
                            ),
                            format!("messages[{i}].content[{j}].type"),
                        ))
                    }
                }
            }
            text
        }
    };
    Ok(Message {
        role,
        content,
        tool_calls,
        tool_call_id: m.tool_call_id,
    })
}

/// `{"type": "function", "function": {"name", "description"?, "parameters"?}}`.
/// The most values (objects, arrays, strings, numbers...) one JSON Schema may hold. Each one
/// becomes grammar the constraint compiler builds and walks; a schema of 5,000 `anyOf`
/// branches reached it and failed as a 500. Real schemas, even large generated ones, stay far
/// below this.
pub const MAX_SCHEMA_VALUES: usize = 2_000;

/// Refuses a schema with more than [`MAX_SCHEMA_VALUES`] values, counted without recursion.
fn check_schema_size(schema: &Value, param: String) -> Result<()> {
    let mut stack = vec![schema];
    let mut count = 0usize;
    while let Some(v) = stack.pop() {
        count += 1;
        if count > MAX_SCHEMA_VALUES {
            return Err(Error::invalid_param(
                format!("the schema holds more than {MAX_SCHEMA_VALUES} values, more than this server compiles"),
                param,
            ));
        }
        match v {
            Value::Object(o) => stack.extend(o.values()),
            Value::Array(a) => stack.extend(a.iter()),
            _ => {}
        }
    }
    Ok(())
}

fn convert_tool(i: usize, t: Value, shape: ToolShape) -> Result<ToolSpec> {
    let at = shape.at();
    let bad =
        |m: &str, field: &str| Error::invalid_param(m.to_owned(), format!("tools[{i}]{at}{field}"));
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(Error::invalid_param(
            "only tools of type 'function' are supported",
            format!("tools[{i}].type"),
        ));
    }
    let f = match shape {
        ToolShape::Chat => t
            .get("function")
            .ok_or_else(|| bad("a function tool needs 'function'", ""))?,
        ToolShape::Flat => &t,
    };
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| bad("a function needs a 'name'", ".name"))?;
    if name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(bad(
            "a function name is 1 to 64 letters, digits, underscores or dashes",
            ".name",
        ));
    }
    let parameters = f.get("parameters").cloned().unwrap_or(Value::Null);
    if !(parameters.is_null() || parameters.is_object()) {
        return Err(bad(
            "a function's parameters must be a JSON Schema object",
            ".parameters",
        ));
    }
    check_schema_size(&parameters, format!("tools[{i}]{at}.parameters"))?;
    Ok(ToolSpec {
        strict: f.get("strict").and_then(Value::as_bool),
        name: name.to_owned(),
        description: f
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        parameters,
    })
}

fn convert_tool_calls(i: usize, v: Value) -> Result<Vec<ToolCall>> {
    let bad = |m: &str| Error::invalid_param(m.to_owned(), format!("messages[{i}].tool_calls"));
    let list = v
        .as_array()
        .ok_or_else(|| bad("tool_calls must be an array"))?;
    list.iter()
        .map(|c| {
            let f = c
                .get("function")
                .ok_or_else(|| bad("a tool call needs 'function'"))?;
            Ok(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a tool call needs an 'id'"))?
                    .to_owned(),
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("a tool call needs 'function.name'"))?
                    .to_owned(),
                arguments: match f.get("arguments") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => "{}".into(),
                },
            })
        })
        .collect()
}

/// `usage` as OpenAI writes it.
#[derive(Debug, Serialize)]
pub struct WireUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

impl From<crate::backend::Usage> for WireUsage {
    fn from(u: crate::backend::Usage) -> Self {
        WireUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total(),
        }
    }
}

/// The one `system_fingerprint` this build reports: it changes when the server's code does.
pub const SYSTEM_FINGERPRINT: &str = concat!("experient-", env!("CARGO_PKG_VERSION"));

/// A fresh `chatcmpl-...` id.
pub fn completion_id() -> String {
    format!("chatcmpl-{}", uuid::Uuid::new_v4().simple())
}

/// Seconds since the Unix epoch, for `created`.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(name: &str) -> ToolSpec {
        ToolSpec {
            name: name.into(),
            description: String::new(),
            parameters: Value::Null,
            strict: None,
        }
    }

    #[test]
    fn tool_choice_takes_openai_forms_and_names_only_offered_tools() {
        let tools = [spec("f")];
        let tc = |v: Value| tool_choice(Some(&v), &tools);
        assert_eq!(tc(json!("auto")).unwrap(), ToolChoice::Auto);
        assert_eq!(tc(json!("none")).unwrap(), ToolChoice::None);
        assert_eq!(tc(json!("required")).unwrap(), ToolChoice::Required);
        assert_eq!(
            tc(json!({"type": "function", "function": {"name": "f"}})).unwrap(),
            ToolChoice::Function("f".into())
        );
        assert_eq!(tool_choice(None, &[]).unwrap(), ToolChoice::Auto);
        for bad in [
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "g"}}),
            json!({"type": "file_search"}),
        ] {
            assert!(tc(bad).is_err());
        }
        assert!(tool_choice(Some(&json!("required")), &[]).is_err());
    }

    #[test]
    fn logprobs_need_their_switch_and_a_bounded_count() {
        assert_eq!(logprobs(None, None, 20).unwrap(), None);
        assert_eq!(logprobs(Some(true), None, 20).unwrap(), Some(0));
        assert_eq!(logprobs(Some(true), Some(&json!(5)), 20).unwrap(), Some(5));
        assert!(logprobs(Some(false), Some(&json!(5)), 20).is_err());
        assert!(logprobs(Some(true), Some(&json!(21)), 20).is_err());
        assert!(logprobs(Some(true), Some(&json!(-1)), 20).is_err());
    }
}
