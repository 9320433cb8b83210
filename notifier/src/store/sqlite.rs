//! SQLite connection pools and migrations, for the single-process mode.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::AnyConnection;
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;

/// Connections of the read pool. WAL mode lets them read while the writer commits.
const READ_CONNECTIONS: u32 = 4;

/// How long a query waits for a free connection before it fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings applied to every new connection.
/// - WAL lets readers work while a transaction commits.
/// - `synchronous = FULL` syncs the WAL at every commit. `NORMAL` could lose the last
///   acknowledged events on a power failure, which would break the promise that an acknowledged
///   event is durable.
/// - A busy writer from another process is waited for up to 5 s instead of failing at once.
const CONNECTION_SETTINGS: &[&str] = &[
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA busy_timeout = 5000",
];

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Creates the database file and its directory if missing, connects, and applies the migrations.
/// Returns the write pool, of one connection so that committers queue for it instead of retrying
/// on a locked database, and the read pool.
pub(super) async fn connect(url: &str) -> anyhow::Result<(AnyPool, AnyPool)> {
    let url = with_create_mode(url);
    let in_memory = url.contains(":memory:") || url.contains("mode=memory");
    if !in_memory {
        create_parent_dir(&url)?;
    }
    let write = pool_options(1, in_memory)
        .connect(&url)
        .await
        .context("open the SQLite database at DATABASE_URL")?;
    MIGRATOR.run(&write).await.context("apply the SQLite migrations")?;
    // An in-memory database exists only inside its one connection, so reads share it.
    let read = if in_memory {
        write.clone()
    } else {
        pool_options(READ_CONNECTIONS, false).connect(&url).await?
    };
    Ok((write, read))
}

fn pool_options(connections: u32, in_memory: bool) -> AnyPoolOptions {
    let options = AnyPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .after_connect(|connection, _| Box::pin(apply_settings(connection)));
    if in_memory {
        // Closing the only connection would drop the database.
        options.idle_timeout(None).max_lifetime(None)
    } else {
        options
    }
}

async fn apply_settings(connection: &mut AnyConnection) -> Result<(), sqlx::Error> {
    for setting in CONNECTION_SETTINGS {
        sqlx::query(*setting).execute(&mut *connection).await?;
    }
    Ok(())
}

/// Adds `mode=rwc` (read, write, create) unless the URL sets a mode, so that a first start
/// creates the database file.
fn with_create_mode(url: &str) -> String {
    if url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// Creates the directory of the database file named by a `sqlite://path?…` or `sqlite:path` URL.
fn create_parent_dir(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .unwrap_or(url);
    let path = Path::new(rest.split('?').next().unwrap_or(rest));
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir)
            .with_context(|| format!("create the directory {} for the SQLite database", dir.display())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_mode_is_added_once() {
        assert_eq!(with_create_mode("sqlite://a.db"), "sqlite://a.db?mode=rwc");
        assert_eq!(
            with_create_mode("sqlite://a.db?cache=shared"),
            "sqlite://a.db?cache=shared&mode=rwc"
        );
        assert_eq!(with_create_mode("sqlite://a.db?mode=ro"), "sqlite://a.db?mode=ro");
    }

    #[test]
    fn parent_dir_is_created() {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/nested/deeper/db.sqlite?mode=rwc", dir.path().display());
        create_parent_dir(&url).expect("create dir");
        assert!(dir.path().join("nested/deeper").is_dir());
    }
}
