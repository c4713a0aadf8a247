//! The Postgres pool and the embedded migrations.

use std::time::Duration;

use sqlx::{
    PgPool,
    migrate::Migrator,
    postgres::{PgConnectOptions, PgPoolOptions},
};

use crate::error::Result;

/// The migrations in `migrations/` at the repository root, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How the pool is sized and how long a caller waits for a connection.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Upper bound of open connections. Keep replicas × this below Postgres'
    /// `max_connections` (100 by default).
    pub max_connections: u32,
    /// How long a query waits for a free connection before it fails; short, so a Postgres
    /// outage turns into a quick 503 rather than a hung request.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// Builds a pool that connects on first use, so a process can start while Postgres is down.
pub fn connect_lazy(options: PgConnectOptions, settings: &PoolSettings) -> PgPool {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        // The default pings every connection on checkout: a round trip per query. A dead
        // connection fails its query instead, which the caller already answers with 503.
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

/// Applies pending migrations. Safe with several replicas starting at once: sqlx's Postgres
/// migrator holds an advisory lock while it runs.
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// One round trip to Postgres, for readiness probes.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}
