//! Assembling and running the server: configuration to backends, binding, model loading,
//! graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::api::{self, wire::RequestLimits, AppSettings, AppState};
use crate::backend::fetch;
use crate::backend::local::{LocalBackend, LocalSettings};
use crate::config::{Config, LocalModelConfig, ModelConfig};
use crate::experience::{Store, StoreOptions};
use crate::prompts::Prompts;
use crate::router::Router;

/// What `experient serve` is started with: where to listen, the configuration and where the
/// libraries live.
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
        return vec![LocalModelConfig::with_defaults(fetch::DEFAULT_MODEL_ID)];
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
            prefill_chunk: m.prefill_chunk,
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

/// What a running server is made of. `serve` builds it from the configuration (models
/// fetched and loading, keys from the environment); a test builds it around a scripted
/// backend and serves it in-process.
pub struct Parts {
    pub config: Config,
    pub router: Router,
    pub store: Arc<Store>,
    pub keys: api::auth::Keys,
    pub prompts: Prompts,
    /// Holds `.responses/` (stored Responses API objects) and `.traffic/` (recordings).
    pub experience_dir: PathBuf,
    /// Where learning jobs write their run directories.
    pub runs_dir: PathBuf,
    /// The database replicas share (`--database-url`); stored responses are kept there.
    pub db: Option<crate::db::Db>,
}

/// The state every handler reads, from its parts. Opens the response and traffic stores.
pub fn state(parts: Parts) -> anyhow::Result<AppState> {
    let Parts {
        config,
        router,
        store,
        keys,
        prompts,
        experience_dir,
        runs_dir,
        db,
    } = parts;
    let responses = match &db {
        Some(db) => {
            crate::response_store::ResponseStore::shared(db.clone(), config.responses.clone())
        }
        // Inside the experience directory, where a dot-name can never be a library.
        None => crate::response_store::ResponseStore::open(
            &experience_dir.join(".responses"),
            config.responses.clone(),
        ),
    }
    .map_err(|e| anyhow::anyhow!("stored responses: {e}"))?;
    let traffic = match &db {
        Some(db) => Ok(crate::experience::traffic::Traffic::shared(
            db.clone(),
            config.traffic.clone(),
        )),
        None => crate::experience::traffic::Traffic::open(
            &experience_dir.join(".traffic"),
            config.traffic.clone(),
        ),
    }
    .map_err(|e| anyhow::anyhow!("recorded traffic: {e}"))?;
    Ok(AppState::new(api::Shared {
        router: Arc::new(router),
        limits: RequestLimits {
            max_n: config.server.max_n,
            max_stop: config.server.max_stop,
            max_tools: config.bounds.max_tools,
        },
        request_timeout: Duration::from_secs(config.server.request_timeout_secs),
        stream_timeout: Duration::from_secs(config.server.stream_timeout_secs),
        started: api::wire::now_secs(),
        shutting_down: Arc::new(AtomicBool::new(false)),
        metrics: api::metrics::Metrics::install(),
        store,
        prompts: Arc::new(prompts),
        keys,
        public_metrics: config.auth.public_metrics,
        jobs: crate::learn::jobs::Jobs::new(&runs_dir, config.bounds.max_jobs),
        evaluations: Arc::new(crate::learn::evaluations::Evaluations::new(
            &runs_dir,
            config.bounds.max_jobs,
        )),
        methods: Arc::new(config.methods.clone()),
        bounds: Arc::new(config.bounds.clone()),
        responses: Arc::new(responses),
        feedback_rate: api::feedback::FeedbackRate::new(config.traffic.feedback_per_minute),
        key_slots: api::auth::KeySlots::new(config.auth.max_requests_per_key),
        traffic: Arc::new(traffic),
        embeddings: Arc::new(api::embeddings::Embeddings::new(config.embeddings.clone())?),
    }))
}

/// Serves `state` on `listener` until `shutdown` completes; then `/health` answers 503, new
/// connections are refused, and requests in flight get `shutdown_grace_secs` to finish before
/// they are cancelled. The store's usage counts are flushed last.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: AppState,
    server: &crate::config::ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = api::app(
        state.clone(),
        &AppSettings {
            max_body_bytes: server.max_body_bytes,
            edge: api::edge::Edge {
                allowed_hosts: server.allowed_hosts.clone(),
                body_timeout: Duration::from_secs(server.body_read_timeout_secs),
                max_body_bytes: server.max_body_bytes,
            },
        },
    );
    let grace = Duration::from_secs(server.shutdown_grace_secs);
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let limits = api::listen::ConnectionLimits {
        max_connections: api::listen::fit_connections(server.max_connections),
        header_read_timeout: Duration::from_secs(server.header_read_timeout_secs),
        idle_timeout: Duration::from_secs(server.idle_timeout_secs),
        max_per_client: server.max_connections_per_client,
        stuck_timeout: Duration::from_secs(
            server
                .request_timeout_secs
                .max(server.body_read_timeout_secs)
                + server.idle_timeout_secs,
        ),
    };
    let shutting_down = state.shutting_down.clone();
    let serving = api::listen::serve(listener, app, limits, async move {
        shutdown.await;
        shutting_down.store(true, Ordering::SeqCst);
        eprintln!(
            "experient: shutting down; waiting up to {} s for in-flight requests",
            grace.as_secs()
        );
        let _ = stop_tx.send(true);
    });
    tokio::select! {
        () = serving => {},
        _ = async {
            let _ = stop_rx.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            eprintln!("experient: grace period over; cancelling remaining requests");
        }
    }
    state.store.flush();
    Ok(())
}

/// The whole server from its options: checks, models, store, state, the listening socket,
/// then [`run`] until a signal, or until a model fails to load.
pub async fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    check_cpu()?;
    let keys = keys(&opts.config)?;
    check_exposure(opts.addr, &keys, opts.allow_unauthenticated)?;
    crate::sandbox::set_max_workers(opts.config.server.max_sandboxes);
    let (router, locals) = backends(&opts.config, &opts.model_cache).await?;
    let db = match opts.config.database.url {
        Some(_) => Some(
            crate::db::Db::connect(&opts.config.database)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        None => None,
    };
    let store = open_store(&opts, db.clone()).await?;
    let prompts = Prompts::load(opts.prompts_dir.as_deref())?;
    prompts.report_grammar_conflicts(opts.config.methods.constrain);
    let state = state(Parts {
        config: opts.config.clone(),
        router,
        store,
        keys,
        prompts,
        experience_dir: opts.experience_dir.clone(),
        runs_dir: opts.runs_dir.clone(),
        db,
    })?;
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .with_context(|| format!("cannot listen on {}", opts.addr))?;
    // Tests and scripts read this line to learn an ephemeral port.
    println!("experient: listening on http://{}", listener.local_addr()?);

    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel();
    for b in locals {
        load_in_background(b, failed_tx.clone());
    }
    drop(failed_tx);
    load_embeddings(
        state.embeddings.clone(),
        opts.model_cache.clone(),
        state.store.clone(),
    );
    let failure = Arc::new(parking_lot::Mutex::new(None));
    let noted = failure.clone();
    let stop = async move {
        tokio::select! {
            () = shutdown_signal() => {},
            Some(e) = failed_rx.recv() => *noted.lock() = Some(e),
        }
    };
    run(listener, state, &opts.config.server, stop).await?;
    // A model that cannot load leaves a server that would answer 503 forever: stop instead.
    let failed = failure.lock().take();
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// The libraries: in the experience directory, or in the shared database (followed from then
/// on) with the directory holding what this replica derives.
async fn open_store(opts: &ServeOptions, db: Option<crate::db::Db>) -> anyhow::Result<Arc<Store>> {
    let dir = opts.experience_dir.clone();
    let options = StoreOptions {
        max_top_k: opts.config.bounds.max_experiences,
        max_proposals: opts.config.bounds.max_proposals,
        cache_bytes: opts.config.bounds.search_cache_bytes,
        snapshot_bytes: opts.config.bounds.snapshot_cache_bytes,
        exact_search_up_to: opts.config.embeddings.exact_search_up_to,
        ..StoreOptions::default()
    };
    let shared = db.clone();
    let store = tokio::task::spawn_blocking(move || match shared {
        Some(db) => Store::open_shared(&dir, options, db),
        None => Store::open(&dir, options),
    })
    .await
    .context("store task failed")?
    .map_err(|e| {
        anyhow::anyhow!(
            "experience directory {}: {e}",
            opts.experience_dir.display()
        )
    })?;
    let store = Arc::new(store);
    if let Some(db) = db {
        store.follow(db);
    }
    Ok(store)
}

/// Fetches (when it is the embedded default) and loads the embedding model in the background.
/// A failure is logged and kept as the reason `/v1/embeddings` gives; chat goes on serving.
/// Once the model is there (an upstream's at once), the store retrieves experiences with it.
fn load_embeddings(
    slot: Arc<api::embeddings::Embeddings>,
    model_cache: std::path::PathBuf,
    store: Arc<Store>,
) {
    let c = slot.config.clone();
    let retrieve = c.enabled && c.retrieval;
    if !slot.local() {
        if retrieve && c.base_url.is_some() {
            store.start_embedding(slot);
        }
        return;
    }
    slot.start_loading();
    tokio::spawn(async move {
        let t = std::time::Instant::now();
        let settings = c.settings();
        let loaded = tokio::task::spawn_blocking(move || {
            let dir = match &c.dir {
                Some(d) => d.clone(),
                None => fetch::ensure_embedding_model(&model_cache)?,
            };
            crate::backend::embed::Embedder::load(&dir, settings)
        })
        .await
        .unwrap_or_else(|e| Err(anyhow::anyhow!("the loading task failed: {e}")));
        let ok = loaded.is_ok();
        match &loaded {
            Ok(m) => tracing::info!(
                model = m.id(),
                secs = t.elapsed().as_secs_f64(),
                "embedding model loaded"
            ),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "the embedding model did not load; /v1/embeddings answers 503 and experiences are retrieved by words")
            }
        }
        slot.set(loaded);
        if ok && retrieve {
            store.start_embedding(slot);
        }
    });
}

/// Loads a local model in the background; a failure (or a panic in the loader) is sent on
/// `failed`, which stops the server.
fn load_in_background(
    b: Arc<LocalBackend>,
    failed: tokio::sync::mpsc::UnboundedSender<anyhow::Error>,
) {
    let id = b.settings().id.clone();
    let crashed = failed.clone();
    let load = tokio::spawn(async move {
        let t = std::time::Instant::now();
        match b.load().await {
            Ok(()) => tracing::info!(
                model = %b.settings().id,
                secs = t.elapsed().as_secs_f32(),
                "model loaded"
            ),
            Err(e) => {
                let _ = failed.send(anyhow::anyhow!(
                    "loading model '{}' from {} failed: {e:#}",
                    b.settings().id,
                    b.settings().gguf.display()
                ));
            }
        }
    });
    tokio::spawn(async move {
        if let Err(e) = load.await {
            let _ = crashed.send(anyhow::anyhow!("loading model '{id}' crashed: {e}"));
        }
    });
}

fn keys(config: &Config) -> anyhow::Result<api::auth::Keys> {
    let scoped = config
        .auth
        .scoped_keys
        .iter()
        .map(|k| Ok((k.resolve()?, k.libraries.clone())))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let env = |name: &str| std::env::var(name).unwrap_or_default();
    let (users, admins) = (env("EXPERIENT_API_KEYS"), env("EXPERIENT_ADMIN_KEYS"));
    Ok(api::auth::Keys::new(
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
    .with_scoped(scoped.iter().map(|(k, l)| (k.as_str(), l.clone()))))
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
