//! The PostgreSQL connection that replicas share (`--database-url`): a bounded pool, the
//! schema migrations (the files in `migrations/`, compiled in and run at start-up under
//! sqlx's advisory lock, so replicas starting together apply each once), and the channel on
//! which a replica tells the others that a library changed.
//!
//! The stores above it (`experience::backing`, `response_store`) are synchronous, like the
//! file store they replace, and are called from blocking threads; [`block`] runs a query from
//! there on the server's runtime.

use std::future::Future;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};

use crate::error::{Error, Result};

/// The channel every replica listens on; a payload is the name of the library that changed.
pub const CHANNEL: &str = "experient_libraries";

/// `[database]`: where the shared state lives, and how many connections one replica holds.
#[derive(Debug, Clone, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `postgres://user:password@host/db`; unset, everything is kept in files in the
    /// experience directory and belongs to one process.
    pub url: Option<String>,
    /// Connections one replica opens at most (its listener takes one more).
    pub max_connections: u32,
    /// Seconds a query waits for a free connection before it fails with 503.
    pub acquire_timeout_secs: u64,
    /// Seconds between a replica's full comparisons with the database, beside the
    /// notifications (which a lost connection can miss).
    pub resync_secs: u64,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            max_connections: 16,
            acquire_timeout_secs: 10,
            resync_secs: 5,
        }
    }
}

/// A pool of connections to the shared database, with its schema migrated.
#[derive(Clone)]
pub struct Db {
    pool: PgPool,
    resync: Duration,
}

impl Db {
    /// Connects and brings the schema up to date.
    pub async fn connect(config: &DatabaseConfig) -> Result<Db> {
        let url = config
            .url
            .as_deref()
            .ok_or_else(|| Error::internal("no database URL"))?;
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(config.acquire_timeout_secs.max(1)))
            .connect(url)
            .await
            .map_err(|e| Error::Unavailable(format!("connecting to PostgreSQL: {e}")))?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| Error::internal(format!("migrating the database: {e}")))?;
        Ok(Db {
            pool,
            resync: Duration::from_secs(config.resync_secs.max(1)),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// How often a replica compares all it holds with the database.
    pub fn resync(&self) -> Duration {
        self.resync
    }

    /// A connection listening on [`CHANNEL`]; it reconnects by itself after a loss.
    pub async fn listen(&self) -> Result<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await.map_err(failed)?;
        l.listen(CHANNEL).await.map_err(failed)?;
        Ok(l)
    }
}

/// A database error as the crate's: a pool that has no connection to give, or a database that
/// cannot be reached, is 503 (another try may work); anything else is internal.
pub fn failed(e: sqlx::Error) -> Error {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            Error::Unavailable(format!("the database is unavailable: {e}"))
        }
        e => Error::internal(format!("database: {e}")),
    }
}

/// Whether the error is a unique-key violation: another replica took the row first.
pub fn taken(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// Runs `f` to completion from synchronous code on the server's (multi-threaded) runtime:
/// on a blocking thread directly, on a worker thread after handing its other tasks away.
pub fn block<F: Future>(f: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| handle.block_on(f))
}
