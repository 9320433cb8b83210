//! The Redis side of the event stream: [`RedisLog`] appends events to one stream per partition.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use deadpool_redis::{Manager, Pool, Runtime};
use notify_proto::channel::stream_key;
use notify_proto::entry::{self, encode_fields, entry_id};
use notify_proto::log::{AppendReport, LogError, LogWriter};
use notify_proto::pb::Event;
use redis::{AsyncConnectionConfig, RedisError, RedisResult, Value};

/// How long opening a connection to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a command may wait for its reply. A pipelined batch of 256 events of 64 KiB is
/// 16 MiB, which a healthy local Redis takes well under a second to write.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections in the pool. Each is multiplexed, and appends are short, so a few serve every
/// committer and the relay.
const POOL_SIZE: usize = 8;

/// Part of the error Redis returns when an `XADD` id is not above the stream's last id
/// (Redis 7.0: "ERR The ID specified in XADD is equal or smaller than the target stream top item").
const ID_NOT_ABOVE_TOP: &str = "equal or smaller than the target stream top item";

/// Appends events to Redis streams, one stream per partition, with entry id `0-<seq>`.
#[derive(Clone)]
pub struct RedisLog {
    pool: Pool,
    prefix: String,
    max_len: usize,
}

impl std::fmt::Debug for RedisLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLog")
            .field("prefix", &self.prefix)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl RedisLog {
    /// Creates the connection pool for `url`, with streams `<prefix>:{p<n>}` capped at about
    /// `max_len` entries. An unreachable Redis is logged, not returned as an error: publishing
    /// goes on while Redis is down, and the relay appends the stored events once it is back.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    pub async fn connect(url: &str, prefix: &str, max_len: usize) -> anyhow::Result<RedisLog> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let manager = Manager::new_with_config(url, config).context("invalid REDIS_URL")?;
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(RESPONSE_TIMEOUT))
            .build()
            .context("build the Redis connection pool")?;
        let log = RedisLog {
            pool,
            prefix: prefix.to_owned(),
            max_len: max_len.max(1),
        };
        if let Err(err) = log.ping().await {
            tracing::warn!(error = %err, "redis is unreachable at start; events wait in the store until it is back");
        }
        Ok(log)
    }

    async fn ping(&self) -> Result<(), LogError> {
        let mut connection = self.pool.get().await.map_err(unavailable)?;
        redis::cmd("PING")
            .query_async::<()>(&mut connection)
            .await
            .map_err(unavailable)
    }
}

#[async_trait]
impl LogWriter for RedisLog {
    /// Sends one `XADD <key> MAXLEN ~ <max_len> 0-<seq> …` per event in one pipelined round trip.
    /// Redis rejects an id that is not above the stream's last one; those events count as skipped.
    async fn append(&self, partition: u32, events: &[Event]) -> Result<AppendReport, LogError> {
        if events.is_empty() {
            return Ok(AppendReport::default());
        }
        let key = stream_key(&self.prefix, partition);
        let mut pipe = redis::pipe();
        // Report each command's error separately, so a rejected id does not hide the others.
        pipe.ignore_errors();
        for event in events {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg(entry_id(event.seq));
            for (name, value) in encode_fields(event) {
                pipe.arg(name).arg(value.as_ref());
            }
        }
        let mut connection = self.pool.get().await.map_err(unavailable)?;
        let replies: Vec<RedisResult<Value>> = pipe.query_async(&mut connection).await.map_err(unavailable)?;
        tally(replies)
    }

    /// Reads the last entry with `XREVRANGE <key> + - COUNT 1`.
    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        let mut connection = self.pool.get().await.map_err(unavailable)?;
        let key = stream_key(&self.prefix, partition);
        let entries: Vec<(String, Value)> = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg(&["+", "-", "COUNT", "1"])
            .query_async(&mut connection)
            .await
            .map_err(unavailable)?;
        entry::last_seq(&key, entries.first().map(|(id, _)| id.as_str()))
    }
}

/// Counts the replies of a pipelined append. A rejected id counts as skipped. Any other error
/// fails the whole append, so the caller re-reads the stream's last id to see what was written.
fn tally(replies: Vec<RedisResult<Value>>) -> Result<AppendReport, LogError> {
    let mut report = AppendReport::default();
    for reply in replies {
        match reply {
            Ok(_) => report.appended += 1,
            Err(err) if is_id_not_above_top(&err) => report.skipped += 1,
            Err(err) => return Err(unavailable(err)),
        }
    }
    Ok(report)
}

fn is_id_not_above_top(err: &RedisError) -> bool {
    err.detail().is_some_and(|detail| detail.contains(ID_NOT_ABOVE_TOP))
}

fn unavailable(err: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(err.to_string())
}
