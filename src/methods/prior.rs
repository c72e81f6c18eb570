//! The learned token prior of Training-Free GRPO: a library's experiences, put into the system
//! prompt with an instruction to apply them.

use super::{Context, Options, Selection};
use crate::backend::{ChatRequest, Message, Role};
use crate::error::{Error, Result};
use crate::experience::retrieve::Mode;
use crate::experience::vectors::tail;
use crate::experience::{Chosen, Experience, Query, Select, Served};

/// What a prior put into a request: the experiences' ids, and what served them.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    pub ids: Vec<String>,
    pub served: Served,
    /// How the per-request part was retrieved, when there was one.
    pub retrieval: Option<Mode>,
}

/// Picks the experiences for this conversation (from the live version, the version the
/// request pins, or a live trial's arm), adds them to its system prompt, counts their use,
/// and returns what it injected.
pub async fn inject(
    ctx: &Context,
    library: &str,
    request: &mut ChatRequest,
    opts: &Options,
) -> Result<Injected> {
    let chosen = choose(ctx, library, request, opts).await?;
    let injected = Injected {
        ids: chosen.experiences.iter().map(|e| e.id.clone()).collect(),
        served: chosen.served.clone(),
        retrieval: chosen.retrieval,
    };
    if chosen.experiences.is_empty() {
        return Ok(injected);
    }
    apply_prior(request, &render(ctx, &chosen.experiences)?);
    let lib = ctx.store.library(library)?;
    let used = injected.ids.clone();
    tokio::task::spawn_blocking(move || lib.record_use(&used));
    Ok(injected)
}

/// The experiences a conversation gets, in prompt order (the stable part, then those
/// retrieved for its user messages), as the request or else the library's settings say, from
/// the version that serves this request, within the prior's share of the context window.
pub async fn choose(
    ctx: &Context,
    library: &str,
    request: &ChatRequest,
    opts: &Options,
) -> Result<Chosen> {
    let store = ctx.store.clone();
    let lib = store.library(library).map_err(|e| match e {
        Error::NotFound { message, .. } => Error::NotFound {
            message,
            param: Some("model".into()),
        },
        other => other,
    })?;
    let select = match opts.selection {
        None => Select::Library,
        Some(Selection::All) => Select::All,
        Some(Selection::TopK(k)) => Select::TopK(k),
        Some(Selection::Nothing) => {
            let version = opts.version.unwrap_or_else(|| lib.version());
            let served = Served {
                version,
                canary: None,
            };
            return Ok(Chosen {
                served,
                ..Default::default()
            });
        }
    };
    let query = request
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let r = lib.settings().retrieval.with(&opts.retrieval);
    // Only a library that will be searched needs the question's vector.
    let searched = select.top(&lib.settings(), lib.len()).is_some();
    let vector = match r.mode.semantic() && searched {
        true => store.embed_query(tail(&query, 2000)).await,
        false => None,
    };
    let budget = opts
        .context_length
        .map(|n| (f64::from(n) * r.max_share) as usize);
    let (name, pin, who, retrieval) = (
        library.to_owned(),
        opts.version,
        opts.audience.clone(),
        opts.retrieval,
    );
    tokio::task::spawn_blocking(move || {
        let q = Query {
            vector: vector.as_deref(),
            retrieval,
            ..Query::text(&query, 0)
        };
        store.choose(&name, &q, select, budget, pin, &who)
    })
    .await
    .map_err(Error::internal)?
}

/// The prior's text: the instruction to apply the lessons, then one `[id]. text` line each.
pub fn render(ctx: &Context, chosen: &[Experience]) -> Result<String> {
    ctx.prompts.render(
        "experience_prior.j2",
        minijinja::context! { experiences => chosen.iter().map(|e| minijinja::context!{ id => e.id, text => e.text }).collect::<Vec<_>>() },
    )
}

/// Adds the prior to the first system message, or puts a system message first.
pub fn apply_prior(request: &mut ChatRequest, prior: &str) {
    match request.messages.first_mut() {
        Some(m) if m.role == Role::System => {
            m.content = format!("{}\n\n{prior}", m.content.trim_end());
        }
        _ => request
            .messages
            .insert(0, Message::new(Role::System, prior)),
    }
}
