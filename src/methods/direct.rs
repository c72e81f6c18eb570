//! The plain method: the request goes to the backend as it is, with a library's experiences
//! injected as a prior when the route names one.

use super::{model_events, prior, Applied, Context, Options, Output};
use crate::backend::ChatRequest;
use crate::error::Result;
use crate::router::{Method, Route};

/// The request as it is, with the library's prior when one is named.
pub async fn run(
    ctx: &Context,
    route: Route,
    mut request: ChatRequest,
    opts: &Options,
) -> Result<Output> {
    let mut injected = None;
    if let Some(library) = &route.library {
        injected = Some(prior::inject(ctx, library, &mut request, opts).await?);
    }
    let events = model_events(route.backend.stream(request).await?);
    Ok(Output {
        events,
        applied: Applied {
            method: Method::Direct,
            model: route.model,
            library: route.library,
            version: injected.as_ref().map(|i| i.served.version),
            retrieval: injected.as_ref().and_then(|i| i.retrieval),
            canary: injected.as_ref().and_then(|i| i.served.canary.clone()),
            experiences: injected.map(|i| i.ids),
            trace: None,
        },
    })
}
