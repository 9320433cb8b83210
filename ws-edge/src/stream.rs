//! The Redis Streams implementation of [`LogReader`]: `XREAD BLOCK` over the partitions' streams,
//! `XRANGE` for replays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use notify_proto::channel::stream_key;
use notify_proto::entry::{self, DecodeError};
use notify_proto::log::{Cursor, LogError, LogReader, RangePage};
use notify_proto::pb::Event;
use redis::{AsyncConnectionConfig, Value};

/// Longest `BLOCK` a read may ask for; longer requests are shortened to it.
pub const MAX_BLOCK: Duration = Duration::from_secs(10);
/// Timeout of one Redis command. It must exceed [`MAX_BLOCK`], because the redis crate's
/// default of 500 ms would cut every blocking read short.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
/// Time to open a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Maximum number of connections. Each blocking read holds one for its whole `BLOCK`, so this
/// must exceed the number of stream readers; the rest serve replays. A caller waits for a free
/// connection up to [`CONNECT_TIMEOUT`], then fails as unavailable.
const POOL_SIZE: usize = 16;
/// Rounds of `XREAD` one read may spend skipping entries that do not decode, so that a run of bad
/// entries cannot keep it busy.
const MAX_SKIP_ROUNDS: usize = 8;

/// Reads the event stream from Redis. Partition `p` is the stream at
/// [`stream_key`]`(prefix, p)`, and an entry's id is `0-<seq>`.
pub struct RedisLog {
    pool: Pool,
    prefix: String,
    /// Entries skipped because they did not decode, for rate-limited warnings.
    skipped: AtomicU64,
}

impl RedisLog {
    /// Creates a reader of the streams under `prefix`. Connections are opened on first use, so the
    /// edge starts while Redis is down and its reads retry until Redis is back.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    pub fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let manager = Manager::new_with_config(url, config).context("invalid REDIS_URL")?;
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .context("build the Redis connection pool")?;
        Ok(Self {
            pool,
            prefix: prefix.to_owned(),
            skipped: AtomicU64::new(0),
        })
    }

    async fn connection(&self) -> Result<deadpool_redis::Connection, LogError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Counts an entry that did not decode and warns on the 1st, 2nd, 4th, 8th, ... of them.
    fn skip(&self, partition: u32, err: &DecodeError) {
        let skipped = self.skipped.fetch_add(1, Ordering::Relaxed) + 1;
        if skipped.is_power_of_two() {
            tracing::warn!(partition, skipped_total = skipped, error = %err, "skipping stream entry that does not decode");
        }
    }

    /// Decodes the entries of one stream, skipping bad ones. Returns the events and the highest
    /// sequence number seen, decodable or not.
    fn decode_entries(&self, partition: u32, entries: &Value) -> (Vec<Event>, Option<u64>) {
        let mut events = Vec::new();
        let mut last_seq = None;
        for (id, fields) in entry_list(entries) {
            last_seq = entry::seq_of(id).ok().max(last_seq);
            match entry::decode(partition, id, field_pairs(fields)) {
                Ok(event) => events.push(event),
                Err(err) => self.skip(partition, &err),
            }
        }
        (events, last_seq)
    }

    /// Decodes an `XREAD` reply and moves each cursor past the entries it returned.
    fn decode_read(&self, reply: &Value, cursors: &mut [Cursor]) -> Vec<Event> {
        let mut events = Vec::new();
        for (key, entries) in key_list(reply) {
            let Some(cursor) = cursors
                .iter_mut()
                .find(|cursor| stream_key(&self.prefix, cursor.partition) == key)
            else {
                continue;
            };
            let (decoded, last_seq) = self.decode_entries(cursor.partition, entries);
            cursor.after = last_seq.unwrap_or(cursor.after).max(cursor.after);
            events.extend(decoded);
        }
        events
    }
}

#[async_trait]
impl LogReader for RedisLog {
    /// Reads with `XREAD COUNT count BLOCK block STREAMS key.. 0-<after>..`. When every entry
    /// returned fails to decode, it reads again after them, so that a bad entry is skipped rather
    /// than returned forever. The stream reader then fills that sequence number from the store.
    async fn read(&self, cursors: &[Cursor], block: Duration, count: usize) -> Result<Vec<Event>, LogError> {
        if cursors.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(Vec::new());
        }
        let mut cursors = cursors.to_vec();
        let keys: Vec<String> = cursors
            .iter()
            .map(|cursor| stream_key(&self.prefix, cursor.partition))
            .collect();
        // At least 1 ms, because `BLOCK 0` would wait forever.
        let block_ms = block.min(MAX_BLOCK).as_millis().max(1) as u64;
        let mut connection = self.connection().await?;
        for _ in 0..MAX_SKIP_ROUNDS {
            let ids: Vec<String> = cursors.iter().map(|cursor| entry::entry_id(cursor.after)).collect();
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(count.max(1))
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&keys)
                .arg(&ids)
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            let before: Vec<u64> = cursors.iter().map(|cursor| cursor.after).collect();
            let events = self.decode_read(&reply, &mut cursors);
            let advanced = cursors.iter().zip(&before).any(|(cursor, &after)| cursor.after > after);
            if !events.is_empty() || !advanced {
                return Ok(events);
            }
        }
        Ok(Vec::new())
    }

    /// Reads with `XRANGE key (0-<after> + COUNT limit`, and the first retained entry with
    /// `XRANGE key - + COUNT 1`, in one round trip.
    async fn range(&self, partition: u32, after: u64, limit: usize) -> Result<RangePage, LogError> {
        let key = stream_key(&self.prefix, partition);
        let mut connection = self.connection().await?;
        let (page, first): (Value, Value) = redis::pipe()
            .cmd("XRANGE")
            .arg(&key)
            .arg(format!("({}", entry::entry_id(after)))
            .arg("+")
            .arg("COUNT")
            .arg(limit.max(1))
            .cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        let (events, _) = self.decode_entries(partition, &page);
        Ok(RangePage {
            events,
            first_seq: first_seq(&first),
        })
    }

    /// Reads the last entry with `XREVRANGE <key> + - COUNT 1`. An entry id that is not text
    /// fails the reply's conversion, and one not of the form `0-<seq>` fails
    /// [`entry::last_seq`], so that a foreign entry is an error rather than an empty stream.
    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        let key = stream_key(&self.prefix, partition);
        let mut connection = self.connection().await?;
        let entries: Vec<(String, Value)> = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg(&["+", "-", "COUNT", "1"])
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        entry::last_seq(&key, entries.first().map(|(id, _)| id.as_str()))
    }
}

fn unavailable(err: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(err.to_string())
}

/// Returns the sequence number of the first entry of an `XRANGE` reply, 0 when it is empty.
fn first_seq(reply: &Value) -> u64 {
    entry_list(reply)
        .next()
        .and_then(|(id, _)| entry::seq_of(id).ok())
        .unwrap_or(0)
}

/// Returns the items of an array, or the key-value items of a RESP3 map, flattened.
fn items(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items.iter().collect(),
        Value::Map(pairs) => pairs.iter().flat_map(|(key, value)| [key, value]).collect(),
        _ => Vec::new(),
    }
}

fn bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(text) => Some(text.as_bytes()),
        _ => None,
    }
}

fn text(value: &Value) -> Option<&str> {
    bytes(value).and_then(|bytes| std::str::from_utf8(bytes).ok())
}

/// Returns `(key, entries)` for each stream of an `XREAD` reply: an array of `[key, entries]`
/// pairs in RESP2, a map in RESP3, nil on timeout.
fn key_list(reply: &Value) -> Vec<(&str, &Value)> {
    match reply {
        Value::Map(pairs) => pairs
            .iter()
            .filter_map(|(key, entries)| Some((text(key)?, entries)))
            .collect(),
        _ => items(reply)
            .into_iter()
            .filter_map(|pair| match items(pair).as_slice() {
                [key, entries] => Some((text(key)?, *entries)),
                _ => None,
            })
            .collect(),
    }
}

/// Returns `(id, fields)` for each entry of an entry list: `[[id, [field, value, ..]], ..]`.
fn entry_list(entries: &Value) -> impl Iterator<Item = (&str, &Value)> {
    items(entries)
        .into_iter()
        .filter_map(|entry| match items(entry).as_slice() {
            [id, fields] => Some((text(id)?, *fields)),
            _ => None,
        })
}

/// Returns the field-value pairs of an entry; values that are not strings are left out, so
/// [`entry::decode`] reports the field as missing.
fn field_pairs(fields: &Value) -> Vec<(&[u8], &[u8])> {
    let flat = items(fields);
    flat.chunks_exact(2)
        .filter_map(|pair| Some((bytes(pair[0])?, bytes(pair[1])?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use notify_proto::entry::encode_fields;
    use redis::AsyncCommands;

    use super::*;

    const REDIS_URL: &str = "redis://127.0.0.1:6379";

    /// A unique key prefix whose keys are deleted on drop.
    struct Keys {
        prefix: String,
        client: redis::Client,
    }

    impl Keys {
        fn new() -> Self {
            Self {
                prefix: format!("ws-edge-test-{}", uuid::Uuid::new_v4().simple()),
                client: redis::Client::open(REDIS_URL).expect("valid URL"),
            }
        }

        async fn connection(&self) -> redis::aio::MultiplexedConnection {
            self.client
                .get_multiplexed_async_connection()
                .await
                .expect("Redis at 127.0.0.1:6379 is reachable")
        }

        async fn append(&self, partition: u32, event: &Event) {
            let fields: Vec<(&str, String)> = encode_fields(event)
                .into_iter()
                .map(|(name, value)| (name, value.into_owned()))
                .collect();
            let key = stream_key(&self.prefix, partition);
            let _: String = self
                .connection()
                .await
                .xadd(key, entry::entry_id(event.seq), &fields)
                .await
                .expect("XADD succeeds");
        }

        async fn append_raw(&self, partition: u32, seq: u64, fields: &[(&str, &str)]) {
            let key = stream_key(&self.prefix, partition);
            let _: String = self
                .connection()
                .await
                .xadd(key, entry::entry_id(seq), fields)
                .await
                .expect("XADD succeeds");
        }

        async fn delete(&self, partitions: u32) {
            let keys: Vec<String> = (0..partitions).map(|p| stream_key(&self.prefix, p)).collect();
            let _: () = self.connection().await.del(keys).await.expect("DEL succeeds");
        }
    }

    fn event(partition: u32, seq: u64) -> Event {
        Event {
            id: format!("e{seq}"),
            partition,
            seq,
            channel: "news".into(),
            r#type: "post.created".into(),
            data: r#"{"t":"שלום"}"#.into(),
            ts_ms: 1,
            ..Event::default()
        }
    }

    fn seqs(events: &[Event]) -> Vec<(u32, u64)> {
        events.iter().map(|event| (event.partition, event.seq)).collect()
    }

    #[tokio::test]
    async fn redis_log_reads_ranges_and_skips_bad_entries() {
        let keys = Keys::new();
        let log = RedisLog::connect(REDIS_URL, &keys.prefix).expect("valid URL");
        let result = tokio::time::timeout(Duration::from_secs(30), exercise(&keys, &log)).await;
        keys.delete(2).await;
        result.expect("test finished in time");
    }

    async fn exercise(keys: &Keys, log: &RedisLog) {
        // An empty stream: the read blocks for its BLOCK time (longer than redis's default 500 ms
        // response timeout) and returns nothing.
        let cursors = [Cursor { partition: 0, after: 0 }, Cursor { partition: 1, after: 0 }];
        let empty = log.read(&cursors, Duration::from_millis(700), 10).await;
        assert_eq!(empty.expect("read succeeds").len(), 0);

        // Reads return events after each cursor, in order per partition.
        for seq in 1..=3 {
            keys.append(0, &event(0, seq)).await;
        }
        keys.append(1, &event(1, 7)).await;
        let cursors = [Cursor { partition: 0, after: 1 }, Cursor { partition: 1, after: 0 }];
        let events = log
            .read(&cursors, Duration::from_millis(100), 10)
            .await
            .expect("read succeeds");
        assert_eq!(seqs(&events), [(0, 2), (0, 3), (1, 7)]);
        assert_eq!(events[0], event(0, 2));

        // A bad entry is skipped, and a read that finds only bad entries does not return early.
        keys.append_raw(0, 4, &[("id", "e4")]).await;
        let cursors = [Cursor { partition: 0, after: 3 }];
        let events = log
            .read(&cursors, Duration::from_millis(100), 10)
            .await
            .expect("read succeeds");
        assert!(events.is_empty());
        keys.append(0, &event(0, 5)).await;
        let events = log
            .read(&cursors, Duration::from_millis(100), 10)
            .await
            .expect("read succeeds");
        assert_eq!(seqs(&events), [(0, 5)]);

        // A range returns events after `after` and the first retained sequence number.
        let page = log.range(0, 1, 2).await.expect("range succeeds");
        assert_eq!(seqs(&page.events), [(0, 2), (0, 3)]);
        assert_eq!(page.first_seq, 1);
        let tail = log.range(0, 3, 10).await.expect("range succeeds");
        assert_eq!(seqs(&tail.events), [(0, 5)]);
        assert_eq!(log.last_seq(0).await.expect("last_seq succeeds"), 5);

        // A missing stream is empty.
        let missing = log.range(9, 0, 10).await.expect("range succeeds");
        assert_eq!(missing, RangePage::default());
        assert_eq!(log.last_seq(9).await.expect("last_seq succeeds"), 0);
    }

    #[tokio::test]
    async fn last_seq_rejects_a_foreign_entry() {
        let keys = Keys::new();
        let log = RedisLog::connect(REDIS_URL, &keys.prefix).expect("valid URL");
        let key = stream_key(&keys.prefix, 1);

        // An id that Redis generates (`<ms>-<n>`) is not one a notifier writes.
        let id: String = keys
            .connection()
            .await
            .xadd(&key, "*", &[("f", "v")])
            .await
            .expect("XADD succeeds");
        let Err(LogError::Unavailable(message)) = log.last_seq(1).await else {
            panic!("last_seq accepted the entry id {id}");
        };
        assert!(message.contains(&key), "{message}");
        assert!(message.contains(&id), "{message}");
        keys.delete(2).await;
    }

    #[tokio::test]
    async fn unreachable_redis_is_unavailable() {
        // Port 1 on the loopback address refuses connections.
        let log = RedisLog::connect("redis://127.0.0.1:1", "none").expect("valid URL");
        let result = log.last_seq(0).await;
        assert!(matches!(result, Err(LogError::Unavailable(_))), "{result:?}");
    }

    #[test]
    fn invalid_url_is_rejected() {
        assert!(RedisLog::connect("not a url", "p").is_err());
    }
}
