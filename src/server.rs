//! Assembling and running the server: configuration to backends, binding, model loading,
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, wire::Limits, AppSettings, AppState};
use crate::backend::fetch;
use crate::backend::local::{LocalBackend, LocalSettings};
use crate::config::{Config, LocalModelConfig, ModelConfig};
use crate::experience::{Store, StoreOptions};
use crate::prompts::Prompts;
use crate::router::Router;

pub struct ServeOptions {
    pub addr: SocketAddr,
    pub config: Config,
    pub experience_dir: PathBuf,
    pub model_cache: PathBuf,
    pub prompts_dir: Option<PathBuf>,
    /// Where learning jobs write their run directories.
    pub runs_dir: PathBuf,
    /// Listen beyond loopback although no API keys are configured.
    pub allow_unauthenticated: bool,
}

/// Refuses to serve a non-loopback address with no keys: every admin route (learning jobs read
/// server files, libraries can be deleted) would be open to the network. An operator who means
/// it says so explicitly.
fn check_exposure(addr: SocketAddr, keys: &api::auth::Keys, allowed: bool) -> anyhow::Result<()> {
    if addr.ip().is_loopback() || keys.enabled() {
        return Ok(());
    }
    if allowed {
        eprintln!(
            "experient: WARNING: listening on {addr} with no API keys: anyone who can reach it \
             can use and administer this server"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to listen on {addr} with no API keys: anyone who can reach it could read \
         server files through learning jobs and delete libraries. Set EXPERIENT_API_KEYS and \
         EXPERIENT_ADMIN_KEYS (or [auth] in the config), listen on 127.0.0.1, or pass \
         --allow-unauthenticated (EXPERIENT_ALLOW_UNAUTHENTICATED=true) to accept the risk"
    )
}

/// Fails with a clear message on a CPU that lacks what this build was compiled for, instead of
/// dying later on an illegal instruction.
pub fn check_cpu() -> anyhow::Result<()> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        let missing: Vec<&str> = [
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
            ("f16c", std::arch::is_x86_feature_detected!("f16c")),
        ]
        .into_iter()
        .filter(|(_, ok)| !ok)
        .map(|(n, _)| n)
        .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "this build of experient needs an x86-64-v3 CPU, but this CPU lacks {}; rebuild \
                 without .cargo/config.toml's target-cpu setting (slower) or run on a newer CPU",
                missing.join(", ")
            );
        }
    }
    Ok(())
}

fn local_models(config: &Config) -> Vec<LocalModelConfig> {
    if config.models.is_empty() {
        return vec![LocalModelConfig {
            id: fetch::DEFAULT_MODEL_ID.into(),
            gguf: None,
            max_seqs: crate::config::default_max_seqs(),
            max_concurrent: crate::config::default_max_concurrent(),
            queue: crate::config::default_queue(),
            background_slots: None,
            force_cpu: false,
            requantize_q4_1: false,
            fallback: vec![],
            prefix_cache: crate::config::default_prefix_cache(),
        }];
    }
    config
        .models
        .iter()
        .filter_map(|m| match m {
            ModelConfig::Local(l) => Some(l.clone()),
            ModelConfig::Upstream(_) => None,
        })
        .collect()
}

/// Builds the router and its local backends from the configuration, fetching and rewriting
/// model files as needed. The backends are not loaded yet.
pub async fn backends(
    config: &Config,
    model_cache: &std::path::Path,
) -> anyhow::Result<(Router, Vec<Arc<LocalBackend>>)> {
    let mut router = Router::default();
    let mut locals = Vec::new();
    let mut raw: std::collections::HashMap<String, Arc<dyn crate::backend::Backend>> =
        std::collections::HashMap::new();
    for m in local_models(config) {
        let gguf = match &m.gguf {
            Some(p) => p.clone(),
            None => {
                let cache = model_cache.to_owned();
                tokio::task::spawn_blocking(move || fetch::ensure_default_model(&cache))
                    .await
                    .context("model fetch task failed")??
            }
        };
        let gguf = if m.requantize_q4_1 {
            tokio::task::spawn_blocking(move || crate::backend::requantize::prefer_q8_0(&gguf))
                .await
                .context("requantize task failed")??
        } else {
            gguf
        };
        let backend = LocalBackend::new(LocalSettings {
            id: m.id.clone(),
            gguf,
            max_seqs: m.max_seqs,
            max_concurrent: m.max_concurrent,
            queue: m.queue,
            background_slots: crate::config::background_slots(m.background_slots, m.max_concurrent),
            force_cpu: m.force_cpu,
            prefix_cache: m.prefix_cache,
        });
        raw.insert(
            m.id.clone(),
            backend.clone() as Arc<dyn crate::backend::Backend>,
        );
        locals.push(backend);
    }
    for m in &config.models {
        if let ModelConfig::Upstream(u) = m {
            let backend = crate::backend::upstream::UpstreamBackend::new(u)
                .with_context(|| format!("model '{}'", u.id))?;
            raw.insert(u.id.clone(), Arc::new(backend));
        }
    }
    // Aliases in configuration order; one with a fallback chain is served by the chain.
    let order: Vec<String> = if config.models.is_empty() {
        raw.keys().cloned().collect()
    } else {
        config.models.iter().map(|m| m.id().to_owned()).collect()
    };
    for id in order {
        let primary = raw[&id].clone();
        let fallback: Vec<(String, Arc<dyn crate::backend::Backend>)> = config
            .models
            .iter()
            .find(|m| m.id() == id)
            .map(|m| {
                m.fallback()
                    .iter()
                    .map(|f| (f.clone(), raw[f].clone()))
                    .collect()
            })
            .unwrap_or_default();
        if fallback.is_empty() {
            router.add(id, primary);
        } else {
            let mut chain = vec![(id.clone(), primary)];
            chain.extend(fallback);
            router.add(id, Arc::new(crate::backend::fallback::Chain::new(chain)));
        }
    }
    Ok((router, locals))
}

pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    check_cpu()?;
    let keys = keys(&opts.config);
    check_exposure(opts.addr, &keys, opts.allow_unauthenticated)?;
    let max_connections = api::listen::fit_connections(opts.config.server.max_connections);
    crate::sandbox::set_max_workers(opts.config.server.max_sandboxes);
    let (router, locals) = backends(&opts.config, &opts.model_cache).await?;

    let store_dir = opts.experience_dir.clone();
    let store_options = StoreOptions {
        max_top_k: opts.config.bounds.max_experiences,
        max_proposals: opts.config.bounds.max_proposals,
        ..StoreOptions::default()
    };
    let store = tokio::task::spawn_blocking(move || Store::open(&store_dir, store_options))
        .await
        .context("store task failed")?
        .map_err(|e| {
            anyhow::anyhow!(
                "experience directory {}: {e}",
                opts.experience_dir.display()
            )
        })?;
    let store = Arc::new(store);
    // Inside the experience directory, where a dot-name can never be a library.
    let responses = crate::response_store::ResponseStore::open(
        &opts.experience_dir.join(".responses"),
        opts.config.responses.clone(),
    )
    .map_err(|e| anyhow::anyhow!("stored responses: {e}"))?;
    let traffic = crate::experience::traffic::Traffic::open(
        &opts.experience_dir.join(".traffic"),
        opts.config.traffic.clone(),
    )
    .map_err(|e| anyhow::anyhow!("recorded traffic: {e}"))?;

    let shutting_down = Arc::new(AtomicBool::new(false));
    let state = AppState::new(api::Shared {
        router: Arc::new(router),
        limits: Limits {
            max_n: opts.config.server.max_n,
            max_stop: opts.config.server.max_stop,
        },
        request_timeout: Duration::from_secs(opts.config.server.request_timeout_secs),
        started: api::wire::now_secs(),
        shutting_down: shutting_down.clone(),
        metrics: api::metrics::Metrics::install(),
        store: store.clone(),
        prompts: Arc::new(Prompts::load(opts.prompts_dir.as_deref())?),
        keys,
        public_metrics: opts.config.auth.public_metrics,
        jobs: crate::learn::jobs::Jobs::new(&opts.runs_dir, opts.config.bounds.max_jobs),
        methods: Arc::new(opts.config.methods.clone()),
        bounds: Arc::new(opts.config.bounds.clone()),
        responses: Arc::new(responses),
        traffic: Arc::new(traffic),
    });
    let app = api::app(
        state,
        &AppSettings {
            max_body_bytes: opts.config.server.max_body_bytes,
        },
    );

    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("cannot listen on {}", opts.addr))?;
    let local = listener.local_addr()?;
    // Tests and scripts read this line to learn an ephemeral port.
    println!("experient: listening on http://{local}");

    for b in locals {
        let id = b.settings().id.clone();
        let load = tokio::spawn(async move {
            let t = std::time::Instant::now();
            match b.load().await {
                Ok(()) => tracing::info!(
                    model = %b.settings().id,
                    secs = t.elapsed().as_secs_f32(),
                    "model loaded"
                ),
                Err(e) => {
                    eprintln!(
                        "experient: loading model '{}' from {} failed: {e:#}",
                        b.settings().id,
                        b.settings().gguf.display()
                    );
                    std::process::exit(1);
                }
            }
        });
        // A panic inside the loader must not leave a server that answers 503 forever.
        tokio::spawn(async move {
            if let Err(e) = load.await {
                eprintln!("experient: loading model '{id}' crashed: {e}");
                std::process::exit(1);
            }
        });
    }

    let grace = Duration::from_secs(opts.config.server.shutdown_grace_secs);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = api::listen::ConnectionLimits {
        max_connections,
        header_read_timeout: Duration::from_secs(opts.config.server.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(opts.config.server.idle_timeout_secs),
    };
    let server = api::listen::serve(listener, app, limits, async move {
        shutdown_signal().await;
        shutting_down.store(true, Ordering::SeqCst);
        eprintln!(
            "experient: shutting down; waiting up to {} s for in-flight requests",
            grace.as_secs()
        );
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        () = server => {},
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            eprintln!("experient: grace period over; cancelling remaining requests");
        }
    }
    store.flush();
    Ok(())
}

fn keys(config: &Config) -> api::auth::Keys {
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let (users, admins) = (env("EXPERIENT_API_KEYS"), env("EXPERIENT_ADMIN_KEYS"));
    api::auth::Keys::new(
        config
            .auth
            .api_keys
            .iter()
            .map(String::as_str)
            .chain(users.split(',')),
        config
            .auth
            .admin_keys
            .iter()
            .map(String::as_str)
            .chain(admins.split(',')),
    )
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
