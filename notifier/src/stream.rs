//! The Redis side of the event stream: [`RedisLog`] appends events to one stream per partition.

use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use notify_proto::channel::stream_key;
use notify_proto::entry::{self, encode_fields, entry_id};
use notify_proto::log::{AppendReport, LogError, LogWriter};
use notify_proto::pb::Event;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult, Value};
use tokio::sync::Mutex;

/// How long opening a connection to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a command may wait for its reply. A pipelined batch of 256 events of 64 KiB is
/// 16 MiB, which a healthy local Redis takes well under a second to write.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Part of the error Redis returns when an `XADD` id is not above the stream's last id
/// (Redis 7.0: "ERR The ID specified in XADD is equal or smaller than the target stream top item").
const ID_NOT_ABOVE_TOP: &str = "equal or smaller than the target stream top item";

/// Appends events to Redis streams, one stream per partition, with entry id `0-<seq>`.
#[derive(Debug)]
pub struct RedisLog {
    connection: SharedConnection,
    prefix: String,
    max_len: usize,
}

impl RedisLog {
    /// Prepares the connection to `url`, with streams `<prefix>:{p<n>}` capped at about
    /// `max_len` entries. An unreachable Redis is logged, not returned as an error: publishing
    /// goes on while Redis is down, and the relay appends the stored events once it is back.
    ///
    /// # Errors
    /// Fails when the URL is invalid.
    pub async fn connect(url: &str, prefix: &str, max_len: usize) -> anyhow::Result<RedisLog> {
        let client = Client::open(url).context("invalid REDIS_URL")?;
        let log = RedisLog {
            connection: SharedConnection::new(client),
            prefix: prefix.to_owned(),
            max_len: max_len.max(1),
        };
        if let Err(err) = log.ping().await {
            tracing::warn!(error = %err, "redis is unreachable at start; events wait in the store until it is back");
        }
        Ok(log)
    }

    async fn ping(&self) -> Result<(), LogError> {
        self.connection
            .run(|mut connection| async move { redis::cmd("PING").query_async::<()>(&mut connection).await })
            .await
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
        let replies: Vec<RedisResult<Value>> = self
            .connection
            .run(|mut connection| async move { pipe.query_async(&mut connection).await })
            .await?;
        tally(replies)
    }

    /// Reads the last entry with `XREVRANGE <key> + - COUNT 1`.
    async fn last_seq(&self, partition: u32) -> Result<u64, LogError> {
        let key = stream_key(&self.prefix, partition);
        let command_key = key.clone();
        let entries: Vec<(String, Value)> = self
            .connection
            .run(|mut connection| async move {
                redis::cmd("XREVRANGE")
                    .arg(&command_key)
                    .arg(&["+", "-", "COUNT", "1"])
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        entry::last_seq(&key, entries.first().map(|(id, _)| id.as_str()))
    }
}

/// One multiplexed connection that the appenders and the relay share. It is opened on first use,
/// and again on the first use after a command failed on it.
///
/// A multiplexed connection pipelines concurrent commands on one socket, so it needs no pool.
/// It needs no health check before each use either: a pool's check costs a round trip per use,
/// while a broken connection shows as a failed command, which drops it here.
struct SharedConnection {
    client: Client,
    config: AsyncConnectionConfig,
    /// The open connection, with a number that distinguishes it from the ones before it.
    current: Mutex<Option<(u64, MultiplexedConnection)>>,
}

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConnection").finish_non_exhaustive()
    }
}

impl SharedConnection {
    fn new(client: Client) -> Self {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        Self {
            client,
            config,
            current: Mutex::new(None),
        }
    }

    /// Runs `command` on the connection, opening one first if none is open. When the command
    /// fails, the connection is dropped, so that the next call opens a new one.
    async fn run<T, F, Fut>(&self, command: F) -> Result<T, LogError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let (number, connection) = self.get().await?;
        let result = command(connection).await;
        if result.is_err() {
            let mut current = self.current.lock().await;
            if current.as_ref().is_some_and(|(open, _)| *open == number) {
                *current = None;
            }
        }
        result.map_err(unavailable)
    }

    /// Returns the open connection, or opens one. Callers wait for one connect at a time, which
    /// fails after [`CONNECT_TIMEOUT`].
    async fn get(&self) -> Result<(u64, MultiplexedConnection), LogError> {
        let mut current = self.current.lock().await;
        if let Some((number, connection)) = current.as_ref() {
            return Ok((*number, connection.clone()));
        }
        let connection = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config)
            .await
            .map_err(unavailable)?;
        let number = NEXT_CONNECTION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *current = Some((number, connection.clone()));
        Ok((number, connection))
    }
}

/// Numbers the connections of every [`SharedConnection`] in the process.
static NEXT_CONNECTION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

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
