//! PostgreSQL connection pool and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Connection};

/// Maximum number of connections: one per committer at the default 16 partitions plus room for
/// reads.
// TODO: make the pool size configurable once deployments with more partitions need it.
const MAX_CONNECTIONS: u32 = 24;

/// How long a query waits for a free connection, or for a new one to connect, before it fails,
/// so that Publish reports an unreachable database instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Connects and applies the migrations. Returns the write pool and the read pool, which are one
/// pool here: PostgreSQL serves concurrent readers and writers on its own.
pub(super) async fn connect(url: &str) -> anyhow::Result<(AnyPool, AnyPool)> {
    // One plain connection first: the pool would retry until its timeout and then report only
    // that it timed out, hiding a refused connection or a failed login.
    let probe = AnyConnection::connect(url)
        .await
        .context("connect to PostgreSQL at DATABASE_URL")?;
    probe.close().await?;
    let pool = AnyPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .context("connect to PostgreSQL at DATABASE_URL")?;
    // The migrator takes an advisory lock, so replicas that start together apply them once.
    MIGRATOR.run(&pool).await.context("apply the PostgreSQL migrations")?;
    Ok((pool.clone(), pool))
}
