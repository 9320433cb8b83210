//! The publish transaction on PostgreSQL, through sqlx's native driver. It binds each column of
//! a batch as one array and expands it with `unnest`, so each step is one prepared statement
//! whatever the batch size. A batch with idempotency keys takes five round trips (BEGIN, lock,
//! key lookup, write, COMMIT). A batch without keys takes one, [`WRITE_WITHOUT_KEYS`].

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use sqlx::{PgPool, Postgres, Row};

use super::plan::{FirstUse, ScopedKey, Writes};
use super::{Batch, CommitTransaction};
use crate::store::{StoreError, to_i64, to_u64};

/// Locks the partition rows in ascending order and reads their heads. `ORDER BY` sorts before
/// `FOR UPDATE` locks, so every transaction takes the locks in one order.
const LOCK_HEADS: &str = "SELECT partition, last_seq FROM partitions WHERE partition = ANY($1) \
                          ORDER BY partition FOR UPDATE";

/// Returns the first uses of the scoped keys `($2[i], $3[i])` created at or after `$1`.
const FIND_KEYS: &str = "SELECT k.scope, k.key, k.event_id, k.seq, k.fingerprint FROM idempotency_keys AS k \
                         JOIN unnest($2::text[], $3::text[]) AS wanted(scope, key) \
                         ON k.scope = wanted.scope AND k.key = wanted.key \
                         WHERE k.created_ms >= $1";

/// Raises the partitions' heads, inserts the events and inserts the keys, and returns each key
/// it wrote. A key row that has not expired (created at or after `$4`) is left as it is and not
/// returned; the caller compares the count.
///
/// - `$1`, `$2`: partition and new `last_seq` of each partition that got events.
/// - `$3`: the commit time in milliseconds, the events' `ts_ms` and the keys' `created_ms`.
/// - `$4`: the idempotency window's cut-off in milliseconds.
/// - `$5` to `$14`: the events' columns.
/// - `$15` to `$20`: the keys' columns.
const WRITE: &str = "WITH advanced AS ( \
        UPDATE partitions SET last_seq = heads.last_seq \
        FROM unnest($1::int8[], $2::int8[]) AS heads(partition, last_seq) \
        WHERE partitions.partition = heads.partition \
    ), stored AS ( \
        INSERT INTO events (partition, seq, id, channel, event_type, data, user_id, idempotency_key, \
            traceparent, tracestate, ts_ms) \
        SELECT partition, seq, id, channel, event_type, data, user_id, idempotency_key, traceparent, \
            tracestate, $3::int8 \
        FROM unnest($5::int8[], $6::int8[], $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], \
            $12::text[], $13::text[], $14::text[]) \
            AS fresh(partition, seq, id, channel, event_type, data, user_id, idempotency_key, traceparent, tracestate) \
    ) \
    INSERT INTO idempotency_keys (scope, key, event_id, partition, seq, fingerprint, created_ms) \
    SELECT scope, key, event_id, partition, seq, fingerprint, $3::int8 \
    FROM unnest($15::text[], $16::text[], $17::text[], $18::int8[], $19::int8[], $20::text[]) \
        AS new_keys(scope, key, event_id, partition, seq, fingerprint) \
    ON CONFLICT (scope, key) DO UPDATE SET event_id = excluded.event_id, partition = excluded.partition, \
        seq = excluded.seq, fingerprint = excluded.fingerprint, created_ms = excluded.created_ms \
    WHERE idempotency_keys.created_ms < $4::int8 \
    RETURNING key";

/// Stores a batch without idempotency keys in one statement, which PostgreSQL runs as a
/// transaction of its own, so the batch costs one round trip instead of four. It locks the
/// batch's partition rows in ascending order like [`LOCK_HEADS`] and raises each `last_seq` by the
/// partition's number of events. It then numbers the events of each partition above its old head
/// in batch order, inserts them and returns each partition's old head.
///
/// - `$1`: the commit time in milliseconds, the events' `ts_ms`.
/// - `$2` to `$9`: the events' columns, in batch order.
const WRITE_WITHOUT_KEYS: &str = "WITH fresh AS ( \
        SELECT *, row_number() OVER (PARTITION BY partition ORDER BY ord) AS rank \
        FROM unnest($2::int8[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[], \
            $9::text[]) WITH ORDINALITY \
            AS f(partition, id, channel, event_type, data, user_id, traceparent, tracestate, ord) \
    ), counts AS ( \
        SELECT partition, count(*) AS added FROM fresh GROUP BY partition \
    ), locked AS ( \
        SELECT partition FROM partitions WHERE partition IN (SELECT partition FROM counts) \
        ORDER BY partition FOR UPDATE \
    ), advanced AS ( \
        UPDATE partitions SET last_seq = partitions.last_seq + counts.added \
        FROM counts \
        WHERE partitions.partition = counts.partition \
            AND partitions.partition IN (SELECT partition FROM locked) \
        RETURNING partitions.partition, partitions.last_seq - counts.added AS head \
    ), stored AS ( \
        INSERT INTO events (partition, seq, id, channel, event_type, data, user_id, traceparent, tracestate, ts_ms) \
        SELECT fresh.partition, advanced.head + fresh.rank, id, channel, event_type, data, user_id, traceparent, \
            tracestate, $1::int8 \
        FROM fresh JOIN advanced ON advanced.partition = fresh.partition \
    ) \
    SELECT partition, head FROM advanced";

/// Runs the transaction once; see [`super::run`].
pub(super) async fn try_commit(pool: &PgPool, batch: &Batch<'_>) -> Result<Option<super::Committed>, StoreError> {
    let tx = PgTransaction(pool.begin().await?);
    super::run(tx, batch).await
}

/// Stores a batch without idempotency keys with [`WRITE_WITHOUT_KEYS`].
///
/// # Errors
/// [`StoreError::Corrupt`] when a partition of the batch has no row. The statement has then
/// stored the events of the other partitions, which is why [`crate::store::Store::open`] creates
/// every partition's row and the batch holds only partitions below the store's count.
pub(super) async fn commit_without_keys(pool: &PgPool, batch: &Batch<'_>) -> Result<super::Committed, StoreError> {
    let plan = batch.plan(HashMap::new());
    let fresh: Vec<_> = plan.fresh_events().collect();
    let rows = sqlx::query(WRITE_WITHOUT_KEYS)
        .bind(batch.now_ms)
        .bind(column(&fresh, |(partition, _, _)| i64::from(*partition)))
        .bind(column(&fresh, |(_, id, _)| *id))
        .bind(column(&fresh, |(_, _, event)| event.channel.as_str()))
        .bind(column(&fresh, |(_, _, event)| event.event_type.as_str()))
        .bind(column(&fresh, |(_, _, event)| event.data.as_str()))
        .bind(column(&fresh, |(_, _, event)| event.user_id.as_str()))
        .bind(column(&fresh, |(_, _, event)| event.traceparent.as_str()))
        .bind(column(&fresh, |(_, _, event)| event.tracestate.as_str()))
        .fetch_all(pool)
        .await?;
    let mut heads = BTreeMap::new();
    for row in rows {
        heads.insert(
            partition_of_row(row.try_get("partition")?)?,
            to_u64(row.try_get("head")?),
        );
    }
    Ok(plan.finish(&heads, batch.now_ms)?.committed)
}

struct PgTransaction(sqlx::Transaction<'static, Postgres>);

#[async_trait]
impl CommitTransaction for PgTransaction {
    async fn lock_heads(&mut self, partitions: &[u32]) -> Result<BTreeMap<u32, u64>, StoreError> {
        let partitions: Vec<i64> = partitions.iter().map(|&partition| i64::from(partition)).collect();
        let rows = sqlx::query(LOCK_HEADS).bind(partitions).fetch_all(&mut *self.0).await?;
        rows.iter()
            .map(|row| {
                Ok((
                    partition_of_row(row.try_get("partition")?)?,
                    to_u64(row.try_get("last_seq")?),
                ))
            })
            .collect()
    }

    async fn find_keys(
        &mut self,
        keys: &[(&str, &str)],
        cutoff_ms: i64,
    ) -> Result<HashMap<ScopedKey, FirstUse>, StoreError> {
        let (scopes, texts): (Vec<&str>, Vec<&str>) = keys.iter().copied().unzip();
        let rows = sqlx::query(FIND_KEYS)
            .bind(cutoff_ms)
            .bind(scopes)
            .bind(texts)
            .fetch_all(&mut *self.0)
            .await?;
        let mut first_uses = HashMap::with_capacity(rows.len());
        for row in rows {
            let (key, first) = super::first_use_of_row(&row)?;
            first_uses.insert(key, first);
        }
        Ok(first_uses)
    }

    async fn write(&mut self, writes: &Writes<'_>, now_ms: i64, key_cutoff_ms: i64) -> Result<usize, StoreError> {
        let events = &writes.committed.events;
        let keys = &writes.key_rows;
        let query = sqlx::query(WRITE)
            .bind(column(&writes.heads, |(partition, _)| i64::from(*partition)))
            .bind(column(&writes.heads, |(_, head)| to_i64(*head)))
            .bind(now_ms)
            .bind(key_cutoff_ms)
            .bind(column(events, |event| i64::from(event.partition)))
            .bind(column(events, |event| to_i64(event.seq)))
            .bind(column(events, |event| event.id.as_str()))
            .bind(column(events, |event| event.channel.as_str()))
            .bind(column(events, |event| event.r#type.as_str()))
            .bind(column(events, |event| event.data.as_str()))
            .bind(column(events, |event| event.user_id.as_str()))
            .bind(writes.event_keys.as_slice())
            .bind(column(events, |event| event.traceparent.as_str()))
            .bind(column(events, |event| event.tracestate.as_str()))
            .bind(column(keys, |row| row.scope.as_str()))
            .bind(column(keys, |row| row.key.as_str()))
            .bind(column(keys, |row| row.event_id.as_str()))
            .bind(column(keys, |row| i64::from(row.partition)))
            .bind(column(keys, |row| to_i64(row.seq)))
            .bind(column(keys, |row| row.fingerprint.as_str()));
        Ok(query.fetch_all(&mut *self.0).await?.len())
    }

    async fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.0.rollback().await?)
    }
}

/// Returns one field of every row, as the array a `unnest` parameter takes.
fn column<'a, T, U>(rows: &'a [T], field: impl Fn(&'a T) -> U) -> Vec<U> {
    rows.iter().map(field).collect()
}

/// Converts a stored partition number, which the schema does not bound.
pub(super) fn partition_of_row(partition: i64) -> Result<u32, StoreError> {
    u32::try_from(partition).map_err(|_| StoreError::Corrupt(format!("partition {partition}")))
}
