//! Fixtures shared by the integration tests: a private PostgreSQL database per test, a SQLite
//! file per test, a private Redis key prefix per test, and a stream writer that fails on demand.
//!
//! PostgreSQL and Redis must run on 127.0.0.1 (override with `TEST_DATABASE_URL` and
//! `TEST_REDIS_URL`). Each test creates its own database and drops it at the end, and deletes its
//! own stream keys; nothing else on the servers is touched.

#![allow(dead_code, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use notifier::store::NewEvent;
use notify_proto::log::{AppendReport, LogError, LogWriter};
use notify_proto::pb::Event;
use sqlx::Connection;

/// Server database the tests connect to in order to create and drop their own databases.
pub fn admin_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A PostgreSQL database that exists for one test. Dropping it drops the database.
pub struct TestDb {
    name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> TestDb {
        let name = format!("nt_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .expect("connect to the test PostgreSQL");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("create the test database");
        let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
        TestDb {
            url: format!("{base}/{name}"),
            name,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside the test's runtime, which cannot block on async work, so the drop
        // statement runs on its own thread and runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin_url()).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}

/// A SQLite database file in a temporary directory that is removed with the value.
pub struct TestSqlite {
    _dir: tempfile::TempDir,
    pub url: String,
}

impl TestSqlite {
    pub fn create() -> TestSqlite {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/data/notify.db", dir.path().display());
        TestSqlite { _dir: dir, url }
    }
}

/// Returns a stream key prefix that no other test uses.
pub fn stream_prefix() -> String {
    format!("nt-{}", uuid::Uuid::new_v4().simple())
}

pub fn new_event(channel: &str, data: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        channel: channel.to_owned(),
        event_type: "test.event".to_owned(),
        data: data.to_owned(),
        user_id: String::new(),
        idempotency_key: key.map(str::to_owned),
        idempotency_scope: String::new(),
        traceparent: String::new(),
        tracestate: String::new(),
    }
}

/// Returns `count` channel names that all map to `partition`.
pub fn channels_in(partition: u32, partitions: u32, count: usize) -> Vec<String> {
    (0..10_000)
        .map(|i| format!("ch{i}"))
        .filter(|channel| notify_proto::channel::partition_of(channel, partitions) == partition)
        .take(count)
        .collect()
}

/// Maximum time an append of a hanging [`FlakyLog`] waits for the release.
pub const HANG_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A stream writer that forwards to another one, fails every call while `failing` is set, and
/// blocks every append while `hanging` is set, like a Redis stopped with SIGSTOP.
pub struct FlakyLog<L> {
    pub inner: L,
    pub failing: AtomicBool,
    pub failed_calls: AtomicUsize,
    pub hanging: AtomicBool,
}

impl<L: LogWriter> FlakyLog<L> {
    pub fn new(inner: L, failing: bool) -> Arc<Self> {
        Arc::new(FlakyLog {
            inner,
            failing: AtomicBool::new(failing),
            failed_calls: AtomicUsize::new(0),
            hanging: AtomicBool::new(false),
        })
    }

    /// Holds appends until `set_hanging(false)`, each for at most [`HANG_LIMIT`].
    pub fn set_hanging(&self, hanging: bool) {
        self.hanging.store(hanging, Ordering::SeqCst);
    }

    async fn wait_while_hanging(&self) {
        let start = std::time::Instant::now();
        while self.hanging.load(Ordering::SeqCst) && start.elapsed() < HANG_LIMIT {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), LogError> {
        if self.failing.load(Ordering::SeqCst) {
            self.failed_calls.fetch_add(1, Ordering::SeqCst);
            return Err(LogError::Unavailable("test writer is failing on purpose".to_owned()));
        }
        Ok(())
    }
}

#[async_trait]
impl<L: LogWriter> LogWriter for FlakyLog<L> {
    async fn append(&self, partition: u32, events: &[Event]) -> Result<AppendReport, LogError> {
        self.wait_while_hanging().await;
        self.check()?;
        self.inner.append(partition, events).await
    }

    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        self.check()?;
        self.inner.last_seq(partition).await
    }
}
