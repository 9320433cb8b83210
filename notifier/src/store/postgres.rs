//! PostgreSQL connection pools and migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use sqlx::{AnyConnection, AnyPool, Connection, PgPool};

/// Maximum number of connections for reads, retention and set-up.
// TODO: make the pool sizes configurable once deployments need more concurrent reads.
const MAX_CONNECTIONS: u32 = 8;

/// Maximum number of connections of the pool that runs publish transactions, and so of the
/// transactions a notifier runs at once. The pool opens them as the committers need them.
pub(super) const MAX_COMMIT_CONNECTIONS: u32 = 16;

/// How long a query waits for a free connection, or for a new one to connect, before it fails,
/// so that Publish reports an unreachable database instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Connects and applies the migrations. Returns the pool for reads and other writes, which
/// serves concurrent readers and writers, and a native pool for the publish transactions.
pub(super) async fn connect(url: &str) -> anyhow::Result<(AnyPool, PgPool)> {
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
    let commits = PgPoolOptions::new()
        .max_connections(MAX_COMMIT_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await
        .context("connect to PostgreSQL at DATABASE_URL")?;
    Ok((pool, commits))
}
