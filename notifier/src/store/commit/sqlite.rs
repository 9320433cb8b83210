//! The publish transaction on SQLite, through sqlx's `Any` driver, with multi-row `VALUES`
//! lists. SQLite runs in the process, so a statement costs no round trip; the transaction's cost
//! is its WAL sync at commit.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use async_trait::async_trait;
use sqlx::any::Any;
use sqlx::{AnyPool, AssertSqlSafe, Row};

use super::plan::{FirstUse, KeyRow, ScopedKey, Writes};
use super::postgres::partition_of_row;
use super::{Batch, CommitTransaction};
use crate::store::{StoreError, to_i64, to_u64};

/// Rows per multi-row statement. With at most 11 columns that is 5,500 bound values, well below
/// SQLite's limit of 32,766 per statement.
const ROWS_PER_STATEMENT: usize = 500;

/// Runs the transaction once; see [`super::run`]. `BEGIN IMMEDIATE` takes the database's write
/// lock before the heads are read, which orders concurrent writers the way PostgreSQL's row
/// locks do.
pub(super) async fn try_commit(pool: &AnyPool, batch: &Batch<'_>) -> Result<Option<super::Committed>, StoreError> {
    let tx = SqliteTransaction(pool.begin_with("BEGIN IMMEDIATE").await?);
    super::run(tx, batch).await
}

struct SqliteTransaction(sqlx::Transaction<'static, Any>);

#[async_trait]
impl CommitTransaction for SqliteTransaction {
    async fn lock_heads(&mut self, partitions: &[u32]) -> Result<BTreeMap<u32, u64>, StoreError> {
        let mut heads = BTreeMap::new();
        for chunk in partitions.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT partition, last_seq FROM partitions WHERE partition IN {}",
                placeholders(1, chunk.len(), 1)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for partition in chunk {
                query = query.bind(i64::from(*partition));
            }
            for row in query.fetch_all(&mut *self.0).await? {
                heads.insert(
                    partition_of_row(row.try_get("partition")?)?,
                    to_u64(row.try_get("last_seq")?),
                );
            }
        }
        Ok(heads)
    }

    async fn find_keys(
        &mut self,
        keys: &[(&str, &str)],
        cutoff_ms: i64,
    ) -> Result<HashMap<ScopedKey, FirstUse>, StoreError> {
        let mut first_uses = HashMap::new();
        for chunk in keys.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT scope, key, event_id, seq, fingerprint FROM idempotency_keys \
                 WHERE created_ms >= $1 AND (scope, key) IN ({})",
                placeholders(chunk.len(), 2, 2)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).bind(cutoff_ms);
            for (scope, key) in chunk {
                query = query.bind(*scope).bind(*key);
            }
            for row in query.fetch_all(&mut *self.0).await? {
                let (key, first) = super::first_use_of_row(&row)?;
                first_uses.insert(key, first);
            }
        }
        Ok(first_uses)
    }

    async fn write(&mut self, writes: &Writes<'_>, now_ms: i64, key_cutoff_ms: i64) -> Result<usize, StoreError> {
        self.advance(&writes.heads).await?;
        self.insert_events(writes).await?;
        self.insert_keys(&writes.key_rows, key_cutoff_ms, now_ms).await
    }

    async fn commit(self) -> Result<(), StoreError> {
        Ok(self.0.commit().await?)
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Ok(self.0.rollback().await?)
    }
}

impl SqliteTransaction {
    /// Sets each partition's `last_seq` to its new head.
    async fn advance(&mut self, heads: &[(u32, u64)]) -> Result<(), StoreError> {
        for chunk in heads.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "UPDATE partitions SET last_seq = heads.column2 FROM (VALUES {}) AS heads \
                 WHERE partitions.partition = heads.column1",
                placeholders(chunk.len(), 2, 1)
            );
            let mut query = sqlx::query(AssertSqlSafe(sql));
            for (partition, head) in chunk {
                query = query.bind(i64::from(*partition)).bind(to_i64(*head));
            }
            query.execute(&mut *self.0).await?;
        }
        Ok(())
    }

    async fn insert_events(&mut self, writes: &Writes<'_>) -> Result<(), StoreError> {
        const COLUMNS: usize = 11;
        let events = &writes.committed.events;
        for (chunk, chunk_keys) in events
            .chunks(ROWS_PER_STATEMENT)
            .zip(writes.event_keys.chunks(ROWS_PER_STATEMENT))
        {
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
            query.execute(&mut *self.0).await?;
        }
        Ok(())
    }

    /// Inserts the keys, replacing rows whose key expired before `cutoff_ms`, and returns how
    /// many were written. A key that a concurrent commit wrote, and that has not expired, is not
    /// written.
    async fn insert_keys(&mut self, rows: &[KeyRow], cutoff_ms: i64, created_ms: i64) -> Result<usize, StoreError> {
        const COLUMNS: usize = 7;
        let mut written = 0;
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO idempotency_keys (scope, key, event_id, partition, seq, fingerprint, created_ms) \
                 VALUES {} \
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
            written += query.fetch_all(&mut *self.0).await?.len();
        }
        Ok(written)
    }
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

    #[test]
    fn placeholders_number_rows_in_order() {
        assert_eq!(placeholders(2, 3, 1), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(placeholders(1, 2, 2), "($2, $3)");
    }
}
