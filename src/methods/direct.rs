//! The plain method: the request goes to the backend as it is, with a library's experiences
//! injected as a prior when the route names one.

use super::{model_events, prior, Applied, Context, Output, Selection};
use crate::backend::ChatRequest;
use crate::error::Result;
use crate::router::{Method, Route};

/// The request as it is, with the library's prior when one is named.
pub async fn run(
    ctx: &Context,
    route: Route,
    mut request: ChatRequest,
    selection: Option<Selection>,
) -> Result<Output> {
    let mut experiences = None;
    if let Some(library) = &route.library {
        let used = prior::inject(ctx, library, &mut request, selection).await?;
        experiences = Some(used);
    }
    let events = model_events(route.backend.stream(request).await?);
    Ok(Output {
        events,
        applied: Applied {
            method: Method::Direct,
            model: route.model,
            library: route.library,
            experiences,
            trace: None,
        },
    })
}
