//! The `experient` request object and the methods' limits, turned into what methods take:
//! typed options checked against the bounds, and refusals of what a method cannot honour,
//! each naming the field in the client's API. Methods themselves never name a request field.

use serde::Deserialize;
use serde_json::Value;

use super::wire::ExperientOptions;
use super::AppState;
use crate::config::Bounds;
use crate::error::{Error, Result};
use crate::methods::plan::PlanOptions;
use crate::methods::{self, Selection, Unsupported};
use crate::planning::grasp::Grasp;
use crate::planning::ipp::TRAIN_SEED_BASE;
use crate::planning::{Family, Instance};
use crate::router::{Method, Route};

/// What a caller may ask of a route, checked once the route is known: the key's library scope
/// (injection, `search_experience` and feedback all go through the route's library), the
/// token limit against `bounds.max_tokens`, else the model's context length, else
/// [`UNKNOWN_CONTEXT_MAX_TOKENS`] (`tokens_field` is the endpoint's name for it), and one of
/// the key's request slots, which the caller holds for the request's life.
pub(super) fn admit(
    state: &AppState,
    caller: &super::auth::Caller,
    route: &Route,
    max_tokens: Option<u32>,
    tokens_field: &'static str,
) -> Result<super::auth::KeySlot> {
    caller.may_use(route.library.as_deref())?;
    let bound = state
        .bounds
        .max_tokens
        .or_else(|| route.backend.context_length())
        .unwrap_or(UNKNOWN_CONTEXT_MAX_TOKENS);
    if let Some(m) = max_tokens.filter(|&m| m > bound) {
        return Err(Error::invalid(
            format!("{tokens_field} must be at most {bound} for this model, got {m}"),
            tokens_field,
        ));
    }
    state.key_slots.take(caller)
}

/// The token bound for a model whose context length is not known (an upstream), unless
/// `bounds.max_tokens` says otherwise.
pub const UNKNOWN_CONTEXT_MAX_TOKENS: u32 = 32_768;

/// The methods' choices from the `experient` object for a request that `method` serves, with
/// every count checked against the bounds. An option of another method is refused, not
/// ignored.
pub(super) fn method_options(
    state: &AppState,
    caller: &super::auth::Caller,
    route: &crate::router::Route,
    options: &ExperientOptions,
    chat: &crate::backend::ChatRequest,
) -> Result<methods::Options> {
    let method = route.method;
    refuse_foreign(method, options)?;
    if options.version.is_some() && route.library.is_none() {
        return Err(Error::invalid(
            "experient.version pins a version of the request's library, and this request names no library",
            "experient.version",
        ));
    }
    let max = state.bounds.max_experiences;
    if let Some(Selection::TopK(k)) = options.experiences {
        if k > max {
            return Err(Error::invalid(
                format!("experient.experiences must be \"all\" or a number from 1 to {max}"),
                "experient.experiences",
            ));
        }
    }
    let retrieval = options.retrieval.unwrap_or_default();
    retrieval.check("experient.retrieval.")?;
    if options.retrieval.is_some() && route.library.is_none() {
        return Err(Error::invalid(
            "experient.retrieval ranks the request's library, and this request names no library",
            "experient.retrieval",
        ));
    }
    let limit = methods::iterresearch::MAX_ROUNDS_LIMIT;
    if options
        .max_rounds
        .is_some_and(|r| !(1..=limit).contains(&r))
    {
        return Err(Error::invalid(
            format!("experient.max_rounds must be between 1 and {limit}"),
            "experient.max_rounds",
        ));
    }
    if let Some(names) = &options.tools {
        methods::iterresearch::check_builtin_choice(names, state.methods.iterresearch.fetch_urls)
            .map_err(|m| Error::invalid(m, "experient.tools"))?;
    }
    Ok(methods::Options {
        selection: options.experiences,
        max_rounds: options.max_rounds,
        tools: options.tools.clone(),
        workspace: options.workspace.unwrap_or_default(),
        plan: PlanOptions {
            cache_owner: (!caller.admin).then(|| caller.owner.clone()).flatten(),
            ..plan_options(method, options, &state.bounds)?
        },
        version: options.version,
        audience: audience(caller, chat),
        retrieval,
        context_length: route.backend.context_length(),
    })
}

/// Who asks, for a live trial's sticky arms: the key, and the conversation, which is its
/// `user` field when the client sends one, else a digest of its first user message (the same
/// on every turn, since each turn sends the conversation again).
fn audience(
    caller: &super::auth::Caller,
    chat: &crate::backend::ChatRequest,
) -> crate::experience::canary::Audience {
    use sha2::{Digest, Sha256};
    let first = chat
        .messages
        .iter()
        .find(|m| m.role == crate::backend::Role::User)
        .map(|m| m.content.as_str());
    let conversation = match (&chat.user, first) {
        (Some(u), _) => Some(format!("user:{u}")),
        (None, Some(text)) => Some(format!("{:x}", Sha256::digest(text.as_bytes()))),
        (None, None) => None,
    };
    crate::experience::canary::Audience {
        key: caller.owner.clone(),
        conversation,
    }
}

/// Refuses an option that belongs to a method other than `method`.
fn refuse_foreign(method: Method, o: &ExperientOptions) -> Result<()> {
    let owned: [(&'static str, bool, Method); 9] = [
        (
            "experient.max_rounds",
            o.max_rounds.is_some(),
            Method::IterResearch,
        ),
        (
            "experient.workspace",
            o.workspace.is_some(),
            Method::IterResearch,
        ),
        ("experient.tools", o.tools.is_some(), Method::IterResearch),
        ("experient.env", o.env.is_some(), Method::Plan),
        ("experient.instances", o.instances.is_some(), Method::Plan),
        ("experient.train", o.train.is_some(), Method::Plan),
        ("experient.rounds", o.rounds.is_some(), Method::Plan),
        ("experient.direct", o.direct, Method::Plan),
        ("experient.refresh", o.refresh, Method::Plan),
    ];
    match owned
        .iter()
        .find(|(_, set, owner)| *set && *owner != method)
    {
        None => Ok(()),
        Some((field, _, owner)) => Err(Error::invalid(
            format!(
                "{field} applies to the {} method; this request uses the {} method",
                owner.name(),
                method.name()
            ),
            *field,
        )),
    }
}

/// The plan method's options: the family parsed, the instances made, the counts bounded.
fn plan_options(method: Method, o: &ExperientOptions, bounds: &Bounds) -> Result<PlanOptions> {
    let family = match o.env.as_deref() {
        None if method == Method::Plan => {
            return Err(Error::invalid(
                format!(
                    "the plan method needs experient.env, the task family: {}",
                    Family::known()
                ),
                "experient.env",
            ))
        }
        None => return Ok(PlanOptions::default()),
        Some(env) => Family::parse(env).ok_or_else(|| {
            Error::invalid(
                format!("unknown environment '{env}'; known: {}", Family::known()),
                "experient.env",
            )
        })?,
    };
    let max = bounds.max_plan_instances;
    let eval = o
        .instances
        .as_ref()
        .map(|given| instances(&family, given, max))
        .transpose()?;
    let train = o
        .train
        .as_ref()
        .map(|seeds| {
            let seeds = seeds.resolve(TRAIN_SEED_BASE, "experient.train", max)?;
            Ok::<_, Error>(seeds.into_iter().map(|s| family.instance(s)).collect())
        })
        .transpose()?;
    if let Some(r) = o.rounds.filter(|r| *r > bounds.max_plan_rounds) {
        return Err(Error::invalid(
            format!(
                "experient.rounds is {r}; at most {} (bounds.max_plan_rounds)",
                bounds.max_plan_rounds
            ),
            "experient.rounds",
        ));
    }
    Ok(PlanOptions {
        family: Some(family),
        eval,
        train,
        rounds: o.rounds,
        direct: o.direct,
        refresh: o.refresh,
        cache_owner: None,
    })
}

/// Chat's name for each field a method may refuse.
pub(super) fn chat_field(u: Unsupported) -> String {
    match u {
        Unsupported::OutputFormat => "response_format".into(),
        Unsupported::ForcedToolCall => "tool_choice".into(),
        Unsupported::ClientTools => "tools".into(),
        Unsupported::Logprobs => "logprobs".into(),
        Unsupported::SeveralChoices => "n".into(),
        Unsupported::NoQuestion => "messages".into(),
        Unsupported::UnansweredToolCall { message } => format!("messages[{message}].tool_calls"),
        Unsupported::ReservedToolName { tool } => format!("tools[{tool}]"),
    }
}

/// Instances named by seed: a count (seeds from a base) or the seeds themselves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Seeds {
    Count(u64),
    List(Vec<u64>),
}

impl TryFrom<Value> for Seeds {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Seeds, String> {
        const SHAPE: &str = "a count or a list of seeds (non-negative integers)";
        match v {
            Value::Number(n) => n
                .as_u64()
                .map(Seeds::Count)
                .ok_or(format!("must be {SHAPE}")),
            Value::Array(items) => items
                .iter()
                .map(Value::as_u64)
                .collect::<Option<Vec<u64>>>()
                .map(Seeds::List)
                .ok_or(format!("must be {SHAPE}")),
            _ => Err(format!("must be {SHAPE}")),
        }
    }
}

/// What a plan request solves: instances by seed, or (GRASP) grids the client drew.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Instances {
    Seeds(Seeds),
    /// Each grid as its rows of text (`{"grid": ["row", ...]}` on the wire).
    Grids(Vec<Vec<String>>),
}

impl TryFrom<Value> for Instances {
    type Error = String;
    fn try_from(v: Value) -> std::result::Result<Instances, String> {
        match &v {
            Value::Array(items) if items.first().is_some_and(Value::is_object) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    item.get("grid")
                        .and_then(|g| serde_json::from_value(g.clone()).ok())
                        .ok_or(format!(
                            "item {i} is not a GRASP instance, {{\"grid\": [\"row\", ...]}}"
                        ))
                })
                .collect::<std::result::Result<_, _>>()
                .map(Instances::Grids),
            _ => Seeds::try_from(v).map(Instances::Seeds),
        }
    }
}

impl Seeds {
    /// The seeds, `1..=max` of them; a count starts at `base`.
    fn resolve(&self, base: u64, param: &'static str, max: usize) -> Result<Vec<u64>> {
        let seeds: Vec<u64> = match self {
            Seeds::Count(k) => (base..base.saturating_add((*k).min(max as u64 + 1))).collect(),
            Seeds::List(list) => list.clone(),
        };
        if !(1..=max).contains(&seeds.len()) {
            return Err(Error::invalid(
                format!("{param} must name from 1 to {max} instances (bounds.max_plan_instances)"),
                param,
            ));
        }
        Ok(seeds)
    }
}

/// The instances `given` names, of `family`: seeds from 0, or GRASP grids.
fn instances(family: &Family, given: &Instances, max: usize) -> Result<Vec<Instance>> {
    const PARAM: &str = "experient.instances";
    let grids = match given {
        Instances::Seeds(seeds) => {
            return Ok(seeds
                .resolve(0, PARAM, max)?
                .into_iter()
                .map(|s| family.instance(s))
                .collect())
        }
        Instances::Grids(grids) => grids,
    };
    let Family::Grasp(settings) = family else {
        return Err(Error::invalid(
            "grids are given for GRASP families only; name MiniGrid instances by seed",
            PARAM,
        ));
    };
    if grids.len() > max {
        return Err(Error::invalid(format!("at most {max} instances"), PARAM));
    }
    grids
        .iter()
        .enumerate()
        .map(|(i, rows)| {
            let grid = Grasp::from_rows(*settings, rows.clone())
                .map_err(|e| Error::invalid_param(e, format!("{PARAM}[{i}].grid")))?;
            Ok(Instance::Grasp {
                id: format!("instance {i}"),
                grid,
            })
        })
        .collect()
}
