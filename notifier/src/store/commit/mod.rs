//! The publish transaction. One transaction stores a batch of requests of any partitions:
//! 1. Lock the rows of the batch's partitions in ascending partition order and read their heads
//!    (`last_seq`). Every notifier takes the locks in that order, so two replicas committing
//!    overlapping partitions wait for each other instead of deadlocking.
//! 2. With idempotency keys in the batch, look the keys up. Holding the locks first means a
//!    concurrent commit of the same key in the same partition is visible by the time the lookup
//!    runs.
//! 3. Decide per request ([`plan`]): a new event, a duplicate of an earlier one, or a key
//!    conflict. The new events of each partition take the numbers above its head, in batch
//!    order.
//! 4. Raise each partition's `last_seq`, and insert the events and the new keys.
//!
//! Keys are scoped by caller ([`NewEvent::idempotency_scope`]): the same text sent by two API
//! keys is two unrelated keys. A key with the same scope and text but another channel may map to
//! a partition this batch did not lock. If such a concurrent commit takes a key between the
//! lookup and the insert, the insert reports fewer keys than expected. The transaction is then
//! rolled back and retried, and the retry's lookup finds the key.
//!
//! [`postgres`] binds each column as an array, so a batch costs a fixed number of statements;
//! [`sqlite`] uses multi-row `VALUES` lists. On PostgreSQL a batch without idempotency keys
//! needs no lookup between the steps, so it runs steps 1, 3 and 4 as one statement in one round
//! trip.

mod plan;
mod postgres;
mod sqlite;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_trait::async_trait;
use notify_proto::channel::partition_of;
use notify_proto::pb::Event;

use self::plan::{FirstUse, Plan, Position, ScopedKey, Writes};
use super::{NewEvent, Store, StoreError, Writer, ms_before, now_ms, to_u64};

/// Number of times a batch is tried when concurrent commits keep taking its idempotency keys.
const MAX_COMMIT_ATTEMPTS: u32 = 3;

/// The outcome of one request of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The event is stored at `seq`. `duplicate` is true when an earlier request with the same
    /// idempotency key and content stored it, and this request stored nothing.
    Stored {
        /// Event id.
        id: String,
        /// Sequence number in the partition.
        seq: u64,
        /// Whether an earlier request stored the event.
        duplicate: bool,
    },
    /// The idempotency key was first used for an event with other content.
    Conflict {
        /// The reused key.
        key: String,
        /// Id of the event the key was first used for.
        first_id: String,
    },
}

/// A committed batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// One outcome per request, in request order.
    pub outcomes: Vec<Outcome>,
    /// The events this batch stored, sorted by partition and then sequence number.
    pub events: Vec<Event>,
}

impl Store {
    /// Commits a batch of events of any partitions in one transaction and returns an outcome
    /// per request. Each event goes to the partition its channel maps to. A request whose
    /// idempotency key was used within `idempotency_window` stores nothing: it gets the first
    /// event's position, or a conflict when its content differs. A conflict does not affect the
    /// other requests of the batch.
    ///
    /// # Errors
    /// Returns the database error, after which nothing of the batch is stored.
    pub async fn commit(&self, batch: &[NewEvent], idempotency_window: Duration) -> Result<Committed, StoreError> {
        if batch.is_empty() {
            return Ok(Committed {
                outcomes: Vec::new(),
                events: Vec::new(),
            });
        }
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            let batch = Batch::new(batch, self.partitions, idempotency_window);
            if let (Writer::Postgres(pool), true) = (&self.writer, batch.keys.is_empty()) {
                return postgres::commit_without_keys(pool, &batch).await;
            }
            let committed = match &self.writer {
                Writer::Postgres(pool) => postgres::try_commit(pool, &batch).await?,
                Writer::Sqlite(pool) => sqlite::try_commit(pool, &batch).await?,
            };
            if let Some(committed) = committed {
                return Ok(committed);
            }
            tracing::debug!(attempt, "concurrent commit took an idempotency key; retrying the batch");
        }
        Err(StoreError::Corrupt(format!(
            "concurrent commits took this batch's idempotency keys {MAX_COMMIT_ATTEMPTS} times in a row"
        )))
    }
}

/// A batch with what every attempt of its transaction needs.
struct Batch<'a> {
    events: &'a [NewEvent],
    /// The partition of each event, by the same index.
    partitions: Vec<u32>,
    /// The partitions of the batch, ascending and without repeats: the lock order.
    locked: Vec<u32>,
    /// The batch's scoped idempotency keys, without repeats.
    keys: Vec<(&'a str, &'a str)>,
    /// Commit time in milliseconds since the Unix epoch.
    now_ms: i64,
    /// Keys created before this time have expired.
    key_cutoff_ms: i64,
}

impl<'a> Batch<'a> {
    fn new(events: &'a [NewEvent], partitions: u32, idempotency_window: Duration) -> Self {
        let of_event: Vec<u32> = events
            .iter()
            .map(|event| partition_of(&event.channel, partitions))
            .collect();
        let mut locked = of_event.clone();
        locked.sort_unstable();
        locked.dedup();
        let mut keys: Vec<(&str, &str)> = events
            .iter()
            .filter_map(|event| Some((event.idempotency_scope.as_str(), event.idempotency_key.as_deref()?)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let now_ms = now_ms();
        Self {
            events,
            partitions: of_event,
            locked,
            keys,
            now_ms,
            key_cutoff_ms: ms_before(now_ms, idempotency_window),
        }
    }

    fn plan(&self, first_uses: HashMap<ScopedKey, FirstUse>) -> Plan<'a> {
        let mut plan = Plan::new(first_uses);
        for (event, partition) in self.events.iter().zip(&self.partitions) {
            plan.add(*partition, event);
        }
        plan
    }
}

/// Reads a row of `idempotency_keys` with the columns `scope`, `key`, `event_id`, `seq` and
/// `fingerprint`.
fn first_use_of_row<R>(row: &R) -> Result<(ScopedKey, FirstUse), StoreError>
where
    R: sqlx::Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let first = FirstUse {
        event_id: row.try_get("event_id")?,
        position: Position::Stored(to_u64(row.try_get("seq")?)),
        fingerprint: row.try_get("fingerprint")?,
    };
    Ok(((row.try_get("scope")?, row.try_get("key")?), first))
}

/// The steps of the publish transaction on one backend. Each step runs in the open transaction.
#[async_trait]
trait CommitTransaction: Send + Sized {
    /// Locks the rows of `partitions`, given in ascending order, and returns their `last_seq`.
    async fn lock_heads(&mut self, partitions: &[u32]) -> Result<BTreeMap<u32, u64>, StoreError>;

    /// Returns the first uses of the scoped `keys` created at or after `cutoff_ms`; older ones
    /// have expired.
    async fn find_keys(
        &mut self,
        keys: &[(&str, &str)],
        cutoff_ms: i64,
    ) -> Result<HashMap<ScopedKey, FirstUse>, StoreError>;

    /// Raises the heads, inserts the events and the keys, and returns how many keys it wrote.
    /// A key that has not expired by `key_cutoff_ms` is not overwritten and not counted.
    async fn write(&mut self, writes: &Writes<'_>, now_ms: i64, key_cutoff_ms: i64) -> Result<usize, StoreError>;

    async fn commit(self) -> Result<(), StoreError>;

    async fn rollback(self) -> Result<(), StoreError>;
}

/// Runs the transaction once. Returns `None`, having rolled back, when a concurrent commit took
/// one of the batch's keys.
async fn run(mut tx: impl CommitTransaction, batch: &Batch<'_>) -> Result<Option<Committed>, StoreError> {
    let heads = tx.lock_heads(&batch.locked).await?;
    let first_uses = if batch.keys.is_empty() {
        HashMap::new()
    } else {
        tx.find_keys(&batch.keys, batch.key_cutoff_ms).await?
    };
    let writes = batch.plan(first_uses).finish(&heads, batch.now_ms)?;
    let written = tx.write(&writes, batch.now_ms, batch.key_cutoff_ms).await?;
    if written < writes.key_rows.len() {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    Ok(Some(writes.committed))
}
