//! The configuration file (TOML, `--config`). Every field has a default, so no file at all
//! means: serve the embedded default model with default limits.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

/// Settings of the methods, `[methods.*]`.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MethodsConfig {
    #[serde(default)]
    pub iterresearch: IterResearchConfig,
    #[serde(default)]
    pub plan: PlanConfig,
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
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Keys that may use the OpenAI routes.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Keys that may also administer libraries and jobs.
    #[serde(default)]
    pub admin_keys: Vec<String>,
}

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 4 << 20,
            max_n: 8,
            max_stop: 4,
            request_timeout_secs: 300,
            shutdown_grace_secs: 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ModelConfig {
    Local(LocalModelConfig),
    Upstream(UpstreamModelConfig),
}

impl ModelConfig {
    pub fn id(&self) -> &str {
        match self {
            ModelConfig::Local(l) => &l.id,
            ModelConfig::Upstream(u) => &u.id,
        }
    }

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
    /// Aliases tried in order when this one fails before its first byte.
    #[serde(default)]
    pub fallback: Vec<String>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The alias clients use as `model`.
    pub id: String,
    /// Path of the GGUF file; omitted means the embedded default model.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// Sequences mistral.rs decodes together in one batch. Default 1, so that greedy output
    /// does not depend on what else is running: batched sequences are padded, which regroups
    /// their attention sums (README, Configuration).
    #[serde(default = "default_max_seqs")]
    pub max_seqs: usize,
    /// Requests admitted at once; they share the engine's batch slots in turn.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// Requests that may wait for admission; past that, 429.
    #[serde(default = "default_queue")]
    pub queue: usize,
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
}

pub fn default_max_seqs() -> usize {
    1
}
pub fn default_max_concurrent() -> usize {
    8
}
pub fn default_queue() -> usize {
    64
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
                ModelConfig::Local(l) => {
                    if l.max_seqs == 0 {
                        anyhow::bail!("models[{i}].max_seqs: must be at least 1");
                    }
                    if l.max_concurrent == 0 {
                        anyhow::bail!("models[{i}].max_concurrent: must be at least 1");
                    }
                    if let Some(g) = &l.gguf {
                        if !g.is_file() {
                            anyhow::bail!("models[{i}].gguf: {} is not a file", g.display());
                        }
                    }
                }
                ModelConfig::Upstream(u) => {
                    let url = reqwest::Url::parse(&u.base_url).map_err(|e| {
                        anyhow::anyhow!("models[{i}].base_url: '{}' is not a URL: {e}", u.base_url)
                    })?;
                    if !matches!(url.scheme(), "http" | "https") {
                        anyhow::bail!(
                            "models[{i}].base_url: '{}' must be http or https",
                            u.base_url
                        );
                    }
                    for (key, v) in [
                        ("connect_timeout_secs", u.connect_timeout_secs),
                        ("first_byte_timeout_secs", u.first_byte_timeout_secs),
                        ("total_timeout_secs", u.total_timeout_secs),
                    ] {
                        if !(v > 0.0 && v.is_finite()) {
                            anyhow::bail!(
                                "models[{i}].{key}: must be a positive number of seconds"
                            );
                        }
                    }
                    if u.max_concurrent == 0 {
                        anyhow::bail!("models[{i}].max_concurrent: must be at least 1");
                    }
                    if let Some(var) = &u.api_key_env {
                        if std::env::var_os(var).is_none() {
                            anyhow::bail!(
                                "models[{i}].api_key_env: the environment variable {var} is not set"
                            );
                        }
                    }
                }
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
        if self.server.max_n == 0 {
            anyhow::bail!("server.max_n: must be at least 1");
        }
        Ok(())
    }
}
