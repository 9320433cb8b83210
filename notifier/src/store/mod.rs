//! The store of record: PostgreSQL in production, SQLite in the single-process mode.
//!
//! Reads and retention run the same SQL on both through sqlx's `Any` driver: SQLite accepts
//! PostgreSQL's `$1` placeholders, and those statements are written in the dialect the two
//! share. The publish transaction has one implementation per backend, because on PostgreSQL it
//! binds whole columns as arrays, which only the native driver can.
//!
//! Layout:
//! - [`commit`]: the publish transaction, with sequence numbers and idempotency keys.
//! - [`postgres`], [`sqlite`]: connection pools and migrations of each backend.

mod commit;
mod postgres;
mod sqlite;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use notify_proto::channel::partition_of;
use notify_proto::history::{HistoryError, HistoryStore, MAX_PAGE};
use notify_proto::pb::{Event, HistoryResponse, ReadPartitionResponse};
use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyRow;

pub use commit::{Committed, Outcome};

/// Number of expired rows one retention statement deletes, so that a large backlog is removed
/// in short transactions that do not hold up commits.
pub const RETENTION_BATCH: i64 = 1000;

/// Maximum number of retention statements per table and sweep; the next sweep continues.
const MAX_RETENTION_BATCHES: usize = 100;

/// A validated event, before the store assigns its id, sequence number and commit time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    /// Channel name.
    pub channel: String,
    /// Event type.
    pub event_type: String,
    /// JSON payload.
    pub data: String,
    /// Target user; empty for every subscriber.
    pub user_id: String,
    /// Idempotency key, if the publisher sent one.
    pub idempotency_key: Option<String>,
    /// Caller the idempotency key belongs to: the hex hash of its API key, or empty when the
    /// notifier runs without API keys. Equal keys of different scopes are unrelated.
    pub idempotency_scope: String,
    /// W3C `traceparent` of the publish call; empty when absent.
    pub traceparent: String,
    /// W3C `tracestate` of the publish call; empty when absent.
    pub tracestate: String,
}

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database returned an error or could not be reached.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database contains a value this version cannot use.
    #[error("unexpected data in the store: {0}")]
    Corrupt(String),
}

/// Handle to the store of record. Clones share the connection pools.
#[derive(Clone, Debug)]
pub struct Store {
    /// Pool for the writes other than publish transactions: retention and set-up. SQLite's has
    /// one connection, so writers queue in the pool instead of retrying on a busy database.
    write: AnyPool,
    /// Pool for reads; the same pool as `write` on PostgreSQL.
    read: AnyPool,
    /// Connections that run the publish transactions.
    writer: Writer,
    partitions: u32,
}

/// The connections publish transactions run on.
#[derive(Clone, Debug)]
enum Writer {
    /// A native PostgreSQL pool of its own, of [`Store::max_commit_concurrency`] connections.
    Postgres(sqlx::PgPool),
    /// SQLite's one write connection, the `write` pool.
    Sqlite(AnyPool),
}

impl Store {
    /// Connects to `postgres://…` or `sqlite://path` (the file and its directory are created if
    /// missing), applies the migrations and makes sure the partition rows `0..partitions` exist.
    ///
    /// # Errors
    /// Fails when the URL has another scheme, the database is unreachable, a migration fails, or
    /// the database was set up with a different number of partitions.
    pub async fn open(database_url: &str, partitions: u32) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let (write, read, writer) = if database_url.starts_with("postgres:") || database_url.starts_with("postgresql:")
        {
            let (pool, commits) = postgres::connect(database_url).await?;
            (pool.clone(), pool, Writer::Postgres(commits))
        } else if database_url.starts_with("sqlite:") {
            let (write, read) = sqlite::connect(database_url).await?;
            (write.clone(), read, Writer::Sqlite(write))
        } else {
            anyhow::bail!("DATABASE_URL must start with postgres:// or sqlite://; got another scheme");
        };
        let store = Store {
            write,
            read,
            writer,
            partitions,
        };
        store.ensure_partitions().await?;
        Ok(store)
    }

    /// Returns the number of partitions the store was opened with.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Returns how many publish transactions can run at once: one per commit connection on
    /// PostgreSQL, one on SQLite, whose database takes one writer at a time.
    pub fn max_commit_concurrency(&self) -> usize {
        match &self.writer {
            Writer::Postgres(_) => postgres::MAX_COMMIT_CONNECTIONS as usize,
            Writer::Sqlite(_) => 1,
        }
    }

    /// Creates the partition rows on first start; later starts check their number, because the
    /// channel-to-partition mapping of stored events depends on it.
    async fn ensure_partitions(&self) -> anyhow::Result<()> {
        let mut tx = self.write.begin().await?;
        let stored: i64 = sqlx::query("SELECT COUNT(*) FROM partitions")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if stored == 0 {
            for partition in 0..self.partitions {
                // A replica starting at the same time may have created the row already.
                sqlx::query(
                    "INSERT INTO partitions (partition, last_seq) VALUES ($1, 0) ON CONFLICT (partition) DO NOTHING",
                )
                .bind(i64::from(partition))
                .execute(&mut *tx)
                .await
                .context("create the partition rows")?;
            }
        } else if stored != i64::from(self.partitions) {
            anyhow::bail!(
                "the database has {stored} partitions but STREAM_PARTITIONS is {}; the number cannot change \
                 once events are stored, so set STREAM_PARTITIONS={stored}",
                self.partitions
            );
        }
        tx.commit().await?;
        Ok(())
    }

    /// Checks that the database responds to a query.
    ///
    /// # Errors
    /// Returns the database error.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.read).await?;
        Ok(())
    }

    /// Returns the channel's events with a position above `since`, at most `limit` (capped at
    /// [`MAX_PAGE`]), with the partition's head and whether retention removed any of the
    /// requested events.
    ///
    /// # Errors
    /// Returns the database error.
    pub async fn history(&self, channel: &str, since: u64, limit: u32) -> Result<HistoryResponse, StoreError> {
        let partition = partition_of(channel, self.partitions);
        let head = self.head(partition).await?;
        let oldest = self.oldest(partition).await?;
        let limit = limit.min(MAX_PAGE);
        let rows = sqlx::query(
            "SELECT partition, seq, id, channel, event_type, data, user_id, traceparent, tracestate, ts_ms \
             FROM events WHERE channel = $1 AND partition = $2 AND seq > $3 AND seq <= $4 ORDER BY seq LIMIT $5",
        )
        .bind(channel)
        .bind(i64::from(partition))
        .bind(to_i64(since))
        .bind(to_i64(head))
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await?;
        let events = rows.iter().map(event_of).collect::<Result<Vec<_>, _>>()?;
        Ok(history_page(events, since, limit, head, oldest))
    }

    /// Returns every partition's last committed sequence number, indexed by partition.
    ///
    /// # Errors
    /// Returns the database error.
    pub async fn heads(&self) -> Result<Vec<u64>, StoreError> {
        let rows = sqlx::query("SELECT partition, last_seq FROM partitions ORDER BY partition")
            .fetch_all(&self.read)
            .await?;
        let mut heads = vec![0; self.partitions as usize];
        for row in rows {
            let partition = to_u64(row.try_get("partition")?);
            if let Some(head) = usize::try_from(partition).ok().and_then(|index| heads.get_mut(index)) {
                *head = to_u64(row.try_get("last_seq")?);
            }
        }
        Ok(heads)
    }

    /// Returns at most `limit` events of a partition after `after`, with its head and oldest
    /// retained sequence number. A `limit` of 0 or above [`MAX_PAGE`] reads [`MAX_PAGE`] events.
    ///
    /// # Errors
    /// Returns the database error.
    pub async fn read(&self, partition: u32, after: u64, limit: u32) -> Result<ReadPartitionResponse, StoreError> {
        // Read the head first and no event above it, so that `head` is never below the last
        // event of the page while commits go on.
        let head = self.head(partition).await?;
        let oldest = self.oldest(partition).await?;
        let rows = sqlx::query(
            "SELECT partition, seq, id, channel, event_type, data, user_id, traceparent, tracestate, ts_ms \
             FROM events WHERE partition = $1 AND seq > $2 AND seq <= $3 ORDER BY seq LIMIT $4",
        )
        .bind(i64::from(partition))
        .bind(to_i64(after))
        .bind(to_i64(head))
        .bind(i64::from(if limit == 0 { MAX_PAGE } else { limit.min(MAX_PAGE) }))
        .fetch_all(&self.read)
        .await?;
        let events = rows.iter().map(event_of).collect::<Result<Vec<_>, _>>()?;
        Ok(ReadPartitionResponse { events, head, oldest })
    }

    async fn head(&self, partition: u32) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT last_seq FROM partitions WHERE partition = $1")
            .bind(i64::from(partition))
            .fetch_one(&self.read)
            .await?;
        Ok(to_u64(row.try_get(0)?))
    }

    async fn oldest(&self, partition: u32) -> Result<u64, StoreError> {
        let row = sqlx::query("SELECT MIN(seq) FROM events WHERE partition = $1")
            .bind(i64::from(partition))
            .fetch_one(&self.read)
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.map_or(0, to_u64))
    }

    /// Deletes events committed before `events_before` and idempotency keys created before
    /// `keys_before` (both in milliseconds since the Unix epoch), in batches of
    /// [`RETENTION_BATCH`] rows. Returns the number of events and keys deleted.
    ///
    /// # Errors
    /// Returns the database error; batches deleted before it stay deleted.
    pub async fn delete_expired(&self, events_before: i64, keys_before: i64) -> Result<(u64, u64), StoreError> {
        let events = self
            .delete_batches(
                "DELETE FROM events WHERE (partition, seq) IN \
                 (SELECT partition, seq FROM events WHERE ts_ms < $1 ORDER BY ts_ms LIMIT $2)",
                events_before,
            )
            .await?;
        let keys = self
            .delete_batches(
                "DELETE FROM idempotency_keys WHERE (scope, key) IN \
                 (SELECT scope, key FROM idempotency_keys WHERE created_ms < $1 ORDER BY created_ms LIMIT $2)",
                keys_before,
            )
            .await?;
        Ok((events, keys))
    }

    async fn delete_batches(&self, statement: &'static str, before: i64) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for _ in 0..MAX_RETENTION_BATCHES {
            let result = sqlx::query(statement)
                .bind(before)
                .bind(RETENTION_BATCH)
                .execute(&self.write)
                .await?;
            deleted += result.rows_affected();
            if result.rows_affected() < RETENTION_BATCH as u64 {
                break;
            }
        }
        Ok(deleted)
    }
}

/// Builds a History page. `next_since` is the last event's position when the page is full, and
/// the head otherwise, because the channel has no more events up to the head.
fn history_page(events: Vec<Event>, since: u64, limit: u32, head: u64, oldest: u64) -> HistoryResponse {
    let full = events.len() >= limit as usize;
    let next_since = match events.last() {
        Some(last) if full => last.seq,
        _ => head,
    };
    // With nothing retained, the first retained position would be the next one to commit.
    // Saturating: `since` comes from the caller and `head` from the store, and neither may
    // overflow the sum.
    let first_retained = if oldest == 0 { head.saturating_add(1) } else { oldest };
    HistoryResponse {
        events,
        head,
        complete: since == 0 || since.saturating_add(1) >= first_retained,
        next_since,
    }
}

fn event_of(row: &AnyRow) -> Result<Event, StoreError> {
    let partition = row.try_get::<i64, _>("partition")?;
    Ok(Event {
        id: row.try_get("id")?,
        partition: u32::try_from(partition).map_err(|_| StoreError::Corrupt(format!("partition {partition}")))?,
        seq: to_u64(row.try_get("seq")?),
        channel: row.try_get("channel")?,
        r#type: row.try_get("event_type")?,
        data: row.try_get("data")?,
        user_id: row.try_get("user_id")?,
        ts_ms: row.try_get("ts_ms")?,
        traceparent: row.try_get("traceparent")?,
        tracestate: row.try_get("tracestate")?,
    })
}

/// Converts a stored sequence number. The store never contains a negative one.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Converts a position from a request; positions beyond `i64::MAX` cannot exist in the store.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Returns the current time in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Returns `now_ms` minus a duration, for "older than" cut-offs.
pub(crate) fn ms_before(now_ms: i64, age: Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(age.as_millis()).unwrap_or(i64::MAX))
}

#[async_trait]
impl HistoryStore for Store {
    async fn read_partition(
        &self,
        partition: u32,
        after: u64,
        limit: u32,
    ) -> Result<ReadPartitionResponse, HistoryError> {
        if partition >= self.partitions {
            return Err(HistoryError::NoSuchPartition {
                partition,
                partitions: self.partitions,
            });
        }
        self.read(partition, after, limit)
            .await
            .map_err(|err| HistoryError::Unavailable(err.to_string()))
    }

    async fn heads(&self) -> Result<Vec<u64>, HistoryError> {
        Store::heads(self)
            .await
            .map_err(|err| HistoryError::Unavailable(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> Event {
        Event {
            seq,
            ..Event::default()
        }
    }

    #[test]
    fn full_page_continues_after_last_event() {
        let page = history_page(vec![event(4), event(9)], 0, 2, 20, 1);
        assert_eq!(page.next_since, 9);
        assert!(page.complete);
    }

    #[test]
    fn short_page_continues_at_head() {
        let page = history_page(vec![event(4)], 3, 10, 20, 1);
        assert_eq!(page.next_since, 20);
    }

    #[test]
    fn trimmed_history_is_incomplete() {
        assert!(!history_page(vec![], 3, 10, 20, 10).complete);
        assert!(history_page(vec![], 9, 10, 20, 10).complete);
        assert!(history_page(vec![], 0, 10, 20, 10).complete);
        // Everything up to the head was removed.
        assert!(!history_page(vec![], 3, 10, 20, 0).complete);
        assert!(history_page(vec![], 20, 10, 20, 0).complete);
    }

    #[test]
    fn largest_positions_do_not_overflow() {
        let page = history_page(vec![], u64::MAX, 10, 20, 10);
        assert!(page.complete);
        assert_eq!(page.next_since, 20);
        assert!(!history_page(vec![], 3, 10, u64::MAX, 0).complete);
        assert!(history_page(vec![], u64::MAX, 10, u64::MAX, 0).complete);
    }
}
