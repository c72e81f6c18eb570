//! The flags every model-running command shares, and what they open.

use std::path::PathBuf;

use crate::backend::fetch;
use crate::config::Config;
use crate::server;

/// Flags shared by every command that runs models.
#[derive(clap::Args)]
pub(super) struct ModelArgs {
    /// TOML configuration file (models, limits). Without one, the embedded default model is used.
    #[arg(long, env = "EXPERIENT_CONFIG")]
    pub(super) config: Option<PathBuf>,
    /// Directory holding the experience libraries.
    #[arg(long, env = "EXPERIENT_EXPERIENCE_DIR", default_value = "experience")]
    pub(super) experience_dir: PathBuf,
    /// Where downloaded models are cached (default: $XDG_CACHE_HOME/experient or ~/.cache/experient).
    #[arg(long, env = "EXPERIENT_MODEL_CACHE")]
    pub(super) model_cache: Option<PathBuf>,
    /// Where learning runs keep their records (default: .runs inside the experience directory).
    #[arg(long, env = "EXPERIENT_RUNS_DIR")]
    pub(super) runs_dir: Option<PathBuf>,
    /// Directory of prompt templates that override the built-in ones, file by file.
    #[arg(long, env = "EXPERIENT_PROMPTS_DIR")]
    pub(super) prompts_dir: Option<PathBuf>,
    /// PostgreSQL shared by replicas (`postgres://user:pass@host/db`), overriding
    /// `[database] url`: libraries and stored responses are kept there, and the experience
    /// directory holds only what this process derives.
    #[arg(long, env = "EXPERIENT_DATABASE_URL", hide_env_values = true)]
    pub(super) database_url: Option<String>,
}

impl ModelArgs {
    pub(super) fn runs_dir(&self) -> PathBuf {
        self.runs_dir
            .clone()
            .unwrap_or_else(|| self.experience_dir.join(".runs"))
    }

    /// The backends of the configuration, loaded, and the context methods run in.
    pub(super) async fn load(
        &self,
        config: &Config,
        model_cache: &std::path::Path,
    ) -> anyhow::Result<(crate::router::Router, crate::methods::Context)> {
        use std::sync::Arc;
        server::check_cpu()?;
        let (router, locals) = server::backends(config, model_cache).await?;
        for b in &locals {
            b.load().await?;
        }
        let options = crate::experience::StoreOptions {
            max_top_k: config.bounds.max_experiences,
            max_proposals: config.bounds.max_proposals,
            ..Default::default()
        };
        let store = match config.database.url {
            Some(_) => {
                let db = crate::db::Db::connect(&config.database)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                crate::experience::Store::open_shared(&self.experience_dir, options, db)
            }
            None => crate::experience::Store::open(&self.experience_dir, options),
        }
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let prompts = crate::prompts::Prompts::load(self.prompts_dir.as_deref())?;
        prompts.report_grammar_conflicts(config.methods.constrain);
        let ctx = crate::methods::Context {
            store: Arc::new(store),
            prompts: Arc::new(prompts),
            settings: Arc::new(config.methods.clone()),
            bounds: Arc::new(config.bounds.clone()),
        };
        Ok((router, ctx))
    }
    pub(super) fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(url) = &self.database_url {
            config.database.url = Some(url.clone());
        }
        Ok(config)
    }

    /// The model cache, with the environment mistral.rs needs pointed into it. mistral.rs asks
    /// hf-hub for a cache directory even for local files, and hf-hub panics when there is no
    /// home directory (a user with no passwd entry and no HOME would never load a model).
    /// Called before any thread exists, so setting the environment is sound.
    pub(super) fn model_cache(&self) -> PathBuf {
        let cache = self
            .model_cache
            .clone()
            .unwrap_or_else(fetch::default_cache_dir);
        if std::env::var_os("HF_HOME").is_none() {
            std::env::set_var("HF_HOME", cache.join("hf"));
        }
        if std::env::var_os("HOME").is_none() {
            std::env::set_var("HOME", &cache);
        }
        cache
    }
}

/// The recorded traffic of the experience directory, for the CLI (which runs while no server
/// holds the directory).
pub(super) fn traffic(
    models: &ModelArgs,
    config: &crate::config::Config,
) -> anyhow::Result<crate::experience::traffic::Traffic> {
    crate::experience::traffic::Traffic::open(
        &models.experience_dir.join(".traffic"),
        config.traffic.clone(),
    )
    .map_err(|e| anyhow::anyhow!("recorded traffic: {e}"))
}
