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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalModelConfig {
    /// The alias clients use as `model`.
    pub id: String,
    /// Path of the GGUF file; omitted means the embedded default model.
    #[serde(default)]
    pub gguf: Option<PathBuf>,
    /// Sequences mistral.rs decodes together in one batch. Default 1: on CPU, mistral.rs 0.8.1
    /// mixes up sequences of different lengths decoded in one batch (greedy output changes with
    /// what else is running), so batching is opt-in until that is fixed.
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
    /// Rewrite Q4_1 tensors as Q8_0 before loading (once, cached beside the file): candle has
    /// SIMD kernels for Q8_0 and none for Q4_1.
    #[serde(default = "default_true")]
    pub requantize_q4_1: bool,
}

pub fn default_true() -> bool {
    true
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
            let ModelConfig::Local(l) = m;
            if l.id.is_empty() || l.id.contains(['@', ':', '/']) {
                anyhow::bail!(
                    "models[{i}].id: '{}' must be non-empty and contain no '@', ':' or '/'",
                    l.id
                );
            }
            if !seen.insert(l.id.clone()) {
                anyhow::bail!("models[{i}].id: '{}' is defined twice", l.id);
            }
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
        if self.server.max_n == 0 {
            anyhow::bail!("server.max_n: must be at least 1");
        }
        Ok(())
    }
}
