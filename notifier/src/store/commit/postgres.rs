//! The publish transaction on PostgreSQL, through sqlx's native driver. It binds each column of
//! a batch as one array and expands it with `unnest`, so each step is one prepared statement
//! whatever the batch size: four round trips for a batch without idempotency keys (BEGIN, lock,
//! write, COMMIT) and five with keys.

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

/// Runs the transaction once; see [`super::run`].
pub(super) async fn try_commit(pool: &PgPool, batch: &Batch<'_>) -> Result<Option<super::Committed>, StoreError> {
    let tx = PgTransaction(pool.begin().await?);
    super::run(tx, batch).await
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
            .bind(
                writes
                    .heads
                    .iter()
                    .map(|(partition, _)| i64::from(*partition))
                    .collect::<Vec<_>>(),
            )
            .bind(writes.heads.iter().map(|(_, head)| to_i64(*head)).collect::<Vec<_>>())
            .bind(now_ms)
            .bind(key_cutoff_ms)
            .bind(
                events
                    .iter()
                    .map(|event| i64::from(event.partition))
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|event| to_i64(event.seq)).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.id.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.channel.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.r#type.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.data.as_str()).collect::<Vec<_>>())
            .bind(events.iter().map(|event| event.user_id.as_str()).collect::<Vec<_>>())
            .bind(writes.event_keys.as_slice())
            .bind(
                events
                    .iter()
                    .map(|event| event.traceparent.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(events.iter().map(|event| event.tracestate.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| row.scope.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| row.key.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| row.event_id.as_str()).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| i64::from(row.partition)).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| to_i64(row.seq)).collect::<Vec<_>>())
            .bind(keys.iter().map(|row| row.fingerprint.as_str()).collect::<Vec<_>>());
        Ok(query.fetch_all(&mut *self.0).await?.len())
    }

    async fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.0.rollback().await?)
    }
}

/// Converts a stored partition number, which the schema does not bound.
pub(super) fn partition_of_row(partition: i64) -> Result<u32, StoreError> {
    u32::try_from(partition).map_err(|_| StoreError::Corrupt(format!("partition {partition}")))
}
