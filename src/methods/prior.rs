//! The learned token prior of Training-Free GRPO: a library's experiences, put into the system
//! prompt with an instruction to apply them.

use super::{Context, Options, Selection};
use crate::backend::{ChatRequest, Message, Role};
use crate::error::{Error, Result};
use crate::experience::canary::Audience;
use crate::experience::{Experience, Inject, Served};

/// What a prior put into a request: the experiences' ids, and what served them.
#[derive(Debug, Clone, Default)]
pub struct Injected {
    pub ids: Vec<String>,
    pub served: Served,
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
    let (chosen, served) = choose(
        ctx,
        library,
        request,
        opts.selection,
        opts.version,
        &opts.audience,
    )
    .await?;
    if chosen.is_empty() {
        return Ok(Injected {
            ids: vec![],
            served,
        });
    }
    apply_prior(request, &render(ctx, &chosen)?);
    let ids: Vec<String> = chosen.into_iter().map(|e| e.id).collect();
    let lib = ctx.store.library(library)?;
    let used = ids.clone();
    tokio::task::spawn_blocking(move || lib.record_use(&used));
    Ok(Injected { ids, served })
}

/// The experiences a conversation gets: all of the library, or the most relevant ones to its
/// user messages, as the request or else the library's settings say, from the version that
/// serves this request.
pub async fn choose(
    ctx: &Context,
    library: &str,
    request: &ChatRequest,
    selection: Option<Selection>,
    pin: Option<u64>,
    who: &Audience,
) -> Result<(Vec<Experience>, Served)> {
    let store = ctx.store.clone();
    let lib = store.library(library).map_err(|e| match e {
        Error::NotFound { message, .. } => Error::NotFound {
            message,
            param: Some("model".into()),
        },
        other => other,
    })?;
    let settings = lib.settings();
    let selection = selection.unwrap_or(match settings.inject {
        Inject::All => Selection::All,
        Inject::TopK => Selection::TopK(settings.top_k),
    });
    let top = match selection {
        Selection::All => None,
        Selection::TopK(k) => Some(k),
        Selection::Nothing => {
            let version = pin.unwrap_or_else(|| lib.version());
            return Ok((
                vec![],
                Served {
                    version,
                    canary: None,
                },
            ));
        }
    };
    let query = request
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let name = library.to_owned();
    let who = who.clone();
    tokio::task::spawn_blocking(move || store.choose(&name, &query, top, pin, &who))
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
