//! The `experient` binary: logging, then the command line (`experient::cli`).

use clap::Parser;

/// The proxy path allocates many small JSON values per streamed chunk; mimalloc serves them
/// markedly faster than glibc's malloc under concurrency.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EXPERIENT_LOG")
                .unwrap_or_else(|_| "experient=info,mistralrs_core=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match experient::cli::Cli::parse().run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("experient: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
