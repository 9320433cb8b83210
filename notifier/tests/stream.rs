//! The Redis stream writer against a real Redis. Each test uses its own key prefix and deletes
//! its keys at the end.

mod common;

use std::time::Duration;

use common::{redis_url, stream_prefix};
use notifier::stream::RedisLog;
use notify_proto::channel::stream_key;
use notify_proto::entry::decode;
use notify_proto::log::{AppendReport, LogError, LogWriter};
use notify_proto::pb::Event;
use redis::AsyncCommands;

fn event(seq: u64) -> Event {
    Event {
        id: format!("event-{seq}"),
        partition: 2,
        seq,
        channel: "news".into(),
        r#type: "post.created".into(),
        data: format!("{{\"n\":{seq},\"t\":\"שלום\"}}"),
        user_id: if seq.is_multiple_of(2) {
            "u1".into()
        } else {
            String::new()
        },
        ts_ms: 1_700_000_000_000 + seq as i64,
        traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        tracestate: String::new(),
    }
}

/// Stream entries as XRANGE returns them: id and field-value pairs.
type RawEntries = Vec<(String, Vec<(Vec<u8>, Vec<u8>)>)>;

/// A raw connection for checks, and the keys to delete afterwards.
struct Keys {
    connection: redis::aio::MultiplexedConnection,
    keys: Vec<String>,
}

impl Keys {
    async fn new(keys: Vec<String>) -> Keys {
        let client = redis::Client::open(redis_url()).expect("redis url");
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to redis");
        Keys { connection, keys }
    }

    async fn entries(&mut self, key: &str) -> Vec<Event> {
        let entries: RawEntries = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut self.connection)
            .await
            .expect("xrange");
        entries
            .iter()
            .map(|(id, fields)| {
                decode(2, id, fields.iter().map(|(n, v)| (n.as_slice(), v.as_slice()))).expect("decode")
            })
            .collect()
    }

    async fn delete(mut self) {
        for key in &self.keys {
            let _: () = self.connection.del(key).await.expect("delete test key");
        }
    }
}

#[tokio::test]
async fn append_writes_entries_in_order() {
    let prefix = stream_prefix();
    let key = stream_key(&prefix, 2);
    let mut keys = Keys::new(vec![key.clone()]).await;
    let log = RedisLog::connect(&redis_url(), &prefix, 1000).await.expect("connect");

    assert_eq!(log.last_seq(2).await.expect("last seq"), 0);
    let events: Vec<Event> = (1..=3).map(event).collect();
    let report = log.append(2, &events).await.expect("append");
    assert_eq!(
        report,
        AppendReport {
            appended: 3,
            skipped: 0
        }
    );
    assert_eq!(log.last_seq(2).await.expect("last seq"), 3);
    assert_eq!(keys.entries(&key).await, events);
    keys.delete().await;
}

#[tokio::test]
async fn last_seq_rejects_a_foreign_entry() {
    let prefix = stream_prefix();
    let key = stream_key(&prefix, 2);
    let mut keys = Keys::new(vec![key.clone()]).await;
    let log = RedisLog::connect(&redis_url(), &prefix, 1000).await.expect("connect");

    // An id that Redis generates (`<ms>-<n>`) is not one a notifier writes.
    let id: String = keys.connection.xadd(&key, "*", &[("f", "v")]).await.expect("xadd");
    let Err(LogError::Unavailable(message)) = log.last_seq(2).await else {
        panic!("last_seq accepted the entry id {id}");
    };
    assert!(message.contains(&key), "{message}");
    assert!(message.contains(&id), "{message}");
    keys.delete().await;
}

#[tokio::test]
async fn old_sequences_are_skipped() {
    let prefix = stream_prefix();
    let key = stream_key(&prefix, 2);
    let mut keys = Keys::new(vec![key.clone()]).await;
    let log = RedisLog::connect(&redis_url(), &prefix, 1000).await.expect("connect");

    log.append(2, &[event(1), event(2), event(3)]).await.expect("append");
    let report = log.append(2, &[event(2), event(3), event(4)]).await.expect("append");
    assert_eq!(
        report,
        AppendReport {
            appended: 1,
            skipped: 2
        }
    );
    let report = log.append(2, &[event(1)]).await.expect("append");
    assert_eq!(
        report,
        AppendReport {
            appended: 0,
            skipped: 1
        }
    );
    let seqs: Vec<u64> = keys.entries(&key).await.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    keys.delete().await;
}

#[tokio::test]
async fn maxlen_trims_the_stream() {
    let prefix = stream_prefix();
    let key = stream_key(&prefix, 2);
    let mut keys = Keys::new(vec![key.clone()]).await;
    let log = RedisLog::connect(&redis_url(), &prefix, 10).await.expect("connect");

    for chunk in (1..=600).collect::<Vec<u64>>().chunks(200) {
        let events: Vec<Event> = chunk.iter().copied().map(event).collect();
        log.append(2, &events).await.expect("append");
    }
    // `MAXLEN ~` trims whole nodes of up to 100 entries, so a few more than 10 remain.
    let len: usize = keys.connection.xlen(&key).await.expect("xlen");
    assert!((10..=200).contains(&len), "stream has {len} entries");
    assert_eq!(log.last_seq(2).await.expect("last seq"), 600);
    keys.delete().await;
}

#[tokio::test]
async fn unreachable_redis_fails_fast() {
    // Port 1 on the loopback refuses connections.
    let log = RedisLog::connect("redis://127.0.0.1:1", &stream_prefix(), 10)
        .await
        .expect("connect succeeds while Redis is down");
    let append = tokio::time::timeout(Duration::from_secs(20), log.append(0, &[event(1)])).await;
    assert!(matches!(append, Ok(Err(_))), "append returned {append:?}");
    let last = tokio::time::timeout(Duration::from_secs(20), log.last_seq(0)).await;
    assert!(matches!(last, Ok(Err(_))), "last_seq returned {last:?}");
}

#[tokio::test]
async fn invalid_url_is_an_error() {
    let err = RedisLog::connect("http://127.0.0.1:6379", "p", 10)
        .await
        .expect_err("bad scheme");
    assert!(err.to_string().contains("REDIS_URL"), "{err}");
}
