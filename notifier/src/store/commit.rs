//! The publish transaction. One transaction stores a batch of events of one partition:
//! 1. With idempotency keys in the batch, lock the partition's row, then look the keys up.
//!    Holding the lock first means a concurrent commit of the same key, which locks the same
//!    row, is visible by the time the lookup runs.
//! 2. Decide per request: a new event, a duplicate of an earlier one, or a key conflict.
//! 3. Raise the partition's `last_seq` by the number of new events; the new events take the
//!    numbers just below the returned value.
//! 4. Insert the events and the new keys.
//!
//! Keys are scoped by caller ([`NewEvent::idempotency_scope`]): the same text sent by two API keys
//! is two unrelated keys. A key with the same scope and text but another channel maps to another
//! partition, whose lock does not help. If such a concurrent commit takes a key between the lookup and the insert, the insert
//! reports fewer keys than expected. The transaction is then rolled back and retried, and the
//! retry's lookup finds the key.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use notify_proto::pb::Event;
use sha2::{Digest, Sha256};
use sqlx::any::Any;
use sqlx::{AssertSqlSafe, Row, Transaction};

use super::{NewEvent, Store, StoreError, ms_before, now_ms, to_i64, to_u64};

/// An idempotency key with the caller it belongs to: `(scope, key)`.
type ScopedKey = (String, String);

/// Number of times a batch is tried when concurrent commits keep taking its idempotency keys.
const MAX_COMMIT_ATTEMPTS: u32 = 3;

/// Rows per multi-row INSERT, well below SQLite's limit of 32766 bound values per statement.
const INSERT_ROWS: usize = 500;

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
    /// The events this batch stored, in sequence order.
    pub events: Vec<Event>,
}

impl Store {
    /// Commits a batch of one partition's events in one transaction and returns an outcome per
    /// request. A request whose idempotency key was used within `idempotency_window` stores
    /// nothing: it gets the first event's position, or a conflict when its content differs.
    ///
    /// # Errors
    /// Returns the database error, after which nothing of the batch is stored.
    pub async fn commit(
        &self,
        partition: u32,
        batch: &[NewEvent],
        idempotency_window: Duration,
    ) -> Result<Committed, StoreError> {
        for attempt in 1..=MAX_COMMIT_ATTEMPTS {
            if let Some(committed) = self.try_commit(partition, batch, idempotency_window).await? {
                return Ok(committed);
            }
            tracing::debug!(
                partition,
                attempt,
                "concurrent commit took an idempotency key; retrying the batch"
            );
        }
        Err(StoreError::Corrupt(format!(
            "concurrent commits took this batch's idempotency keys {MAX_COMMIT_ATTEMPTS} times in a row"
        )))
    }

    /// Runs the transaction once. Returns `None`, having rolled back, when a concurrent commit
    /// took one of the batch's keys.
    async fn try_commit(
        &self,
        partition: u32,
        batch: &[NewEvent],
        idempotency_window: Duration,
    ) -> Result<Option<Committed>, StoreError> {
        let now = now_ms();
        let key_cutoff = ms_before(now, idempotency_window);
        let mut tx = self.write.begin().await?;

        let keys: HashSet<(&str, &str)> = batch
            .iter()
            .filter_map(|event| Some((event.idempotency_scope.as_str(), event.idempotency_key.as_deref()?)))
            .collect();
        let mut plan = Plan::default();
        if !keys.is_empty() {
            lock_partition(&mut tx, partition).await?;
            plan.first_uses = find_keys(&mut tx, &keys, key_cutoff).await?;
        }
        for event in batch {
            plan.add(event);
        }

        let last_seq = match plan.fresh.len() {
            0 => 0,
            count => advance(&mut tx, partition, count).await?,
        };
        let event_keys: Vec<Option<&str>> = plan
            .fresh
            .iter()
            .map(|(event, _)| event.idempotency_key.as_deref())
            .collect();
        let (committed, key_rows) = plan.finish(partition, last_seq, now);
        insert_events(&mut tx, &committed.events, &event_keys).await?;
        if insert_keys(&mut tx, &key_rows, key_cutoff, now).await? < key_rows.len() {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(committed))
    }
}

/// Location of the event that first used an idempotency key.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Already stored, at this sequence number.
    Stored(u64),
    /// New in this batch, at this index of [`Plan::fresh`].
    Fresh(usize),
}

#[derive(Debug, Clone)]
struct FirstUse {
    event_id: String,
    position: Position,
    fingerprint: String,
}

#[derive(Debug)]
enum Planned {
    Stored {
        id: String,
        position: Position,
        duplicate: bool,
    },
    Conflict {
        key: String,
        first_id: String,
    },
}

/// The decisions for one batch before sequence numbers are known.
#[derive(Debug, Default)]
struct Plan<'a> {
    /// First use of each scoped key: from the store, or from an earlier request of this batch.
    first_uses: HashMap<ScopedKey, FirstUse>,
    /// New events with their ids.
    fresh: Vec<(&'a NewEvent, String)>,
    planned: Vec<Planned>,
    /// Keys to insert: scoped key, index into `fresh`, fingerprint.
    new_keys: Vec<(ScopedKey, usize, String)>,
}

/// A row of `idempotency_keys` to insert.
#[derive(Debug)]
struct KeyRow {
    scope: String,
    key: String,
    event_id: String,
    partition: u32,
    seq: u64,
    fingerprint: String,
}

impl<'a> Plan<'a> {
    fn add(&mut self, event: &'a NewEvent) {
        let Some(key) = &event.idempotency_key else {
            self.add_fresh(event);
            return;
        };
        let fingerprint = fingerprint(event);
        let scoped = (event.idempotency_scope.clone(), key.clone());
        let planned = match self.first_uses.get(&scoped) {
            Some(first) if first.fingerprint == fingerprint => Planned::Stored {
                id: first.event_id.clone(),
                position: first.position,
                duplicate: true,
            },
            Some(first) => Planned::Conflict {
                key: key.clone(),
                first_id: first.event_id.clone(),
            },
            None => {
                let index = self.add_fresh(event);
                let event_id = self.fresh[index].1.clone();
                let position = Position::Fresh(index);
                self.new_keys.push((scoped.clone(), index, fingerprint.clone()));
                let first = FirstUse {
                    event_id,
                    position,
                    fingerprint,
                };
                self.first_uses.insert(scoped, first);
                return;
            }
        };
        self.planned.push(planned);
    }

    fn add_fresh(&mut self, event: &'a NewEvent) -> usize {
        let index = self.fresh.len();
        let id = uuid::Uuid::now_v7().to_string();
        self.planned.push(Planned::Stored {
            id: id.clone(),
            position: Position::Fresh(index),
            duplicate: false,
        });
        self.fresh.push((event, id));
        index
    }

    /// Assigns the sequence numbers up to `last_seq` to the new events, in batch order.
    fn finish(self, partition: u32, last_seq: u64, now_ms: i64) -> (Committed, Vec<KeyRow>) {
        let base = last_seq.saturating_sub(self.fresh.len() as u64);
        let seq_at = |position| match position {
            Position::Stored(seq) => seq,
            Position::Fresh(index) => base + index as u64 + 1,
        };
        let events = self
            .fresh
            .iter()
            .enumerate()
            .map(|(index, (event, id))| stored_event(event, id, partition, base + index as u64 + 1, now_ms))
            .collect();
        let outcomes = self
            .planned
            .into_iter()
            .map(|planned| match planned {
                Planned::Stored {
                    id,
                    position,
                    duplicate,
                } => Outcome::Stored {
                    id,
                    seq: seq_at(position),
                    duplicate,
                },
                Planned::Conflict { key, first_id } => Outcome::Conflict { key, first_id },
            })
            .collect();
        let key_rows = self
            .new_keys
            .into_iter()
            .map(|((scope, key), index, fingerprint)| KeyRow {
                scope,
                key,
                event_id: self.fresh[index].1.clone(),
                partition,
                seq: seq_at(Position::Fresh(index)),
                fingerprint,
            })
            .collect();
        (Committed { outcomes, events }, key_rows)
    }
}

fn stored_event(event: &NewEvent, id: &str, partition: u32, seq: u64, ts_ms: i64) -> Event {
    Event {
        id: id.to_owned(),
        partition,
        seq,
        channel: event.channel.clone(),
        r#type: event.event_type.clone(),
        data: event.data.clone(),
        user_id: event.user_id.clone(),
        ts_ms,
        traceparent: event.traceparent.clone(),
        tracestate: event.tracestate.clone(),
    }
}

/// Returns the hex SHA-256 of the fields that make two publishes the same event. Each field is
/// prefixed with its length, so that moving bytes between fields changes the hash.
fn fingerprint(event: &NewEvent) -> String {
    let mut hasher = Sha256::new();
    for field in [&event.channel, &event.event_type, &event.data, &event.user_id] {
        hasher.update((field.len() as u64).to_be_bytes());
        hasher.update(field.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .fold(String::with_capacity(64), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

/// Takes the partition row's lock for the rest of the transaction. On SQLite the first write
/// takes the database's write lock, which serves the same purpose.
async fn lock_partition(tx: &mut Transaction<'static, Any>, partition: u32) -> Result<(), StoreError> {
    sqlx::query("UPDATE partitions SET last_seq = last_seq WHERE partition = $1")
        .bind(i64::from(partition))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Returns the first uses of the scoped `keys` created at or after `cutoff_ms`; older ones have
/// expired.
async fn find_keys(
    tx: &mut Transaction<'static, Any>,
    keys: &HashSet<(&str, &str)>,
    cutoff_ms: i64,
) -> Result<HashMap<ScopedKey, FirstUse>, StoreError> {
    let sql = format!(
        "SELECT scope, key, event_id, seq, fingerprint FROM idempotency_keys \
         WHERE created_ms >= $1 AND (scope, key) IN ({})",
        placeholders(keys.len(), 2, 2)
    );
    let mut query = sqlx::query(AssertSqlSafe(sql)).bind(cutoff_ms);
    for (scope, key) in keys {
        query = query.bind(*scope).bind(*key);
    }
    let mut first_uses = HashMap::new();
    for row in query.fetch_all(&mut **tx).await? {
        let first = FirstUse {
            event_id: row.try_get("event_id")?,
            position: Position::Stored(to_u64(row.try_get("seq")?)),
            fingerprint: row.try_get("fingerprint")?,
        };
        first_uses.insert((row.try_get("scope")?, row.try_get("key")?), first);
    }
    Ok(first_uses)
}

/// Raises the partition's `last_seq` by `count` and returns the new value.
async fn advance(tx: &mut Transaction<'static, Any>, partition: u32, count: usize) -> Result<u64, StoreError> {
    let row = sqlx::query("UPDATE partitions SET last_seq = last_seq + $2 WHERE partition = $1 RETURNING last_seq")
        .bind(i64::from(partition))
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .fetch_one(&mut **tx)
        .await?;
    Ok(to_u64(row.try_get(0)?))
}

async fn insert_events(
    tx: &mut Transaction<'static, Any>,
    events: &[Event],
    keys: &[Option<&str>],
) -> Result<(), StoreError> {
    const COLUMNS: usize = 11;
    for (chunk, chunk_keys) in events.chunks(INSERT_ROWS).zip(keys.chunks(INSERT_ROWS)) {
        let sql = format!(
            "INSERT INTO events (partition, seq, id, channel, event_type, data, user_id, idempotency_key, \
             traceparent, tracestate, ts_ms) VALUES {}",
            placeholders(chunk.len(), COLUMNS, 1)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for (event, key) in chunk.iter().zip(chunk_keys) {
            query = query
                .bind(i64::from(event.partition))
                .bind(to_i64(event.seq))
                .bind(event.id.as_str())
                .bind(event.channel.as_str())
                .bind(event.r#type.as_str())
                .bind(event.data.as_str())
                .bind(event.user_id.as_str())
                .bind(*key)
                .bind(event.traceparent.as_str())
                .bind(event.tracestate.as_str())
                .bind(event.ts_ms);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// Inserts the keys, replacing rows whose key expired before `cutoff_ms`, and returns how many
/// were written. A key that a concurrent commit wrote, and that has not expired, is not written.
async fn insert_keys(
    tx: &mut Transaction<'static, Any>,
    rows: &[KeyRow],
    cutoff_ms: i64,
    created_ms: i64,
) -> Result<usize, StoreError> {
    const COLUMNS: usize = 7;
    let mut written = 0;
    for chunk in rows.chunks(INSERT_ROWS) {
        let sql = format!(
            "INSERT INTO idempotency_keys (scope, key, event_id, partition, seq, fingerprint, created_ms) VALUES {} \
             ON CONFLICT (scope, key) DO UPDATE SET event_id = excluded.event_id, partition = excluded.partition, \
             seq = excluded.seq, fingerprint = excluded.fingerprint, created_ms = excluded.created_ms \
             WHERE idempotency_keys.created_ms < $1 RETURNING key",
            placeholders(chunk.len(), COLUMNS, 2)
        );
        let mut query = sqlx::query(AssertSqlSafe(sql)).bind(cutoff_ms);
        for row in chunk {
            query = query
                .bind(row.scope.as_str())
                .bind(row.key.as_str())
                .bind(row.event_id.as_str())
                .bind(i64::from(row.partition))
                .bind(to_i64(row.seq))
                .bind(row.fingerprint.as_str())
                .bind(created_ms);
        }
        written += query.fetch_all(&mut **tx).await?.len();
    }
    Ok(written)
}

/// Returns `($first, …), (…)`: `rows` groups of `columns` numbered placeholders from `$first` on.
fn placeholders(rows: usize, columns: usize, first: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            let separator = if column == 0 { "" } else { ", " };
            let _ = write!(sql, "{separator}${}", first + row * columns + column);
        }
        sql.push(')');
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_event(data: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            channel: "news".into(),
            event_type: "post.created".into(),
            data: data.into(),
            user_id: String::new(),
            idempotency_key: key.map(str::to_owned),
            idempotency_scope: String::new(),
            traceparent: String::new(),
            tracestate: String::new(),
        }
    }

    #[test]
    fn placeholders_number_rows_in_order() {
        assert_eq!(placeholders(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 2, 2), "($2, $3)");
    }

    #[test]
    fn fingerprint_separates_fields() {
        let mut a = new_event("1", None);
        a.user_id = "ab".into();
        let mut b = new_event("1a", None);
        b.user_id = "b".into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        assert_eq!(fingerprint(&a).len(), 64);
    }

    #[test]
    fn plan_numbers_events_and_resolves_keys() {
        let batch = [
            new_event("1", Some("k")),
            new_event("2", None),
            new_event("1", Some("k")),
            new_event("other", Some("k")),
        ];
        let mut plan = Plan::default();
        for event in &batch {
            plan.add(event);
        }
        let (committed, keys) = plan.finish(7, 12, 1000);
        let seqs: Vec<u64> = committed.events.iter().map(|event| event.seq).collect();
        assert_eq!(seqs, vec![11, 12]);
        let first_id = committed.events[0].id.clone();
        assert_eq!(
            committed.outcomes[2],
            Outcome::Stored {
                id: first_id.clone(),
                seq: 11,
                duplicate: true
            }
        );
        assert_eq!(
            committed.outcomes[3],
            Outcome::Conflict {
                key: "k".into(),
                first_id: first_id.clone()
            }
        );
        assert_eq!(keys.len(), 1);
        assert_eq!((keys[0].seq, keys[0].event_id.as_str()), (11, first_id.as_str()));
    }
}
