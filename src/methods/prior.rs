//! The learned token prior of Training-Free GRPO: a library's experiences, put into the system
//! prompt with an instruction to apply them.

use super::{Context, Selection};
use crate::backend::{ChatRequest, Message, Role};
use crate::error::{Error, Result};
use crate::experience::{Experience, Inject};

/// Picks the experiences for this conversation, adds them to its system prompt, counts their
/// use, and returns their ids.
pub async fn inject(
    ctx: &Context,
    library: &str,
    request: &mut ChatRequest,
    selection: Option<Selection>,
) -> Result<Vec<String>> {
    let chosen = choose(ctx, library, request, selection).await?;
    if chosen.is_empty() {
        return Ok(vec![]);
    }
    apply_prior(request, &render(ctx, &chosen)?);
    let ids: Vec<String> = chosen.into_iter().map(|e| e.id).collect();
    let lib = ctx.store.library(library)?;
    let used = ids.clone();
    tokio::task::spawn_blocking(move || lib.record_use(&used));
    Ok(ids)
}

/// The experiences a conversation gets: all of the library, or the most relevant ones to its
/// user messages, as the request or else the library's settings say.
pub async fn choose(
    ctx: &Context,
    library: &str,
    request: &ChatRequest,
    selection: Option<Selection>,
) -> Result<Vec<Experience>> {
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
    let query = request
        .messages
        .iter()
        .filter(|m| m.role == Role::User)
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let name = library.to_owned();
    tokio::task::spawn_blocking(move || -> Result<Vec<Experience>> {
        Ok(match selection {
            Selection::All => lib.all(),
            Selection::Nothing => Vec::new(),
            Selection::TopK(k) => store
                .search(&name, Some(&query), None, k)?
                .into_iter()
                .map(|h| h.experience)
                .collect(),
        })
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
