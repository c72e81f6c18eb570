//! `experient serve`: reads the configuration and hands it to `server::serve`.

use std::net::SocketAddr;

use super::models::ModelArgs;
use crate::server::{self, ServeOptions};

/// `experient serve`'s flags.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free one (printed at startup).
    #[arg(long, env = "EXPERIENT_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Listen on a non-loopback address even though no API keys are configured: anyone who can
    /// reach the port can then use and administer the server (refused without this flag).
    #[arg(long, env = "EXPERIENT_ALLOW_UNAUTHENTICATED")]
    allow_unauthenticated: bool,
    #[command(flatten)]
    models: ModelArgs,
}

pub(super) fn run(a: ServeArgs) -> anyhow::Result<()> {
    let config = a.models.config()?;
    let model_cache = a.models.model_cache();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(server::serve(ServeOptions {
        addr: a.addr,
        allow_unauthenticated: a.allow_unauthenticated,
        config,
        runs_dir: a.models.runs_dir(),
        prompts_dir: a.models.prompts_dir.clone(),
        experience_dir: a.models.experience_dir,
        model_cache,
    }))?;
    // Don't wait for blocking tasks (a generation still running) past the grace period.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}
