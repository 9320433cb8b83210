//! The committers and the relay on a real SQLite store, with the in-process stream behind a
//! writer that fails on demand.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FlakyLog, TestSqlite, channels_in, new_event};
use notifier::committer::{Committers, Publisher};
use notifier::metrics::Metrics;
use notifier::relay::{Lanes, Relay};
use notifier::store::Store;
use notify_proto::log::{LogReader, LogWriter};
use notify_proto::memory::MemoryLog;
use notify_proto::pb::Event;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const PARTITIONS: u32 = 2;
const WINDOW: Duration = Duration::from_secs(3600);

/// Maximum time a test waits for the relay, well above its maximum retry delay of 5 s.
const PATIENCE: Duration = Duration::from_secs(30);

/// A running set of committers and relay; stops them when dropped.
struct Pipeline {
    publisher: Publisher,
    stop: CancellationToken,
    tracker: TaskTracker,
}

impl Pipeline {
    fn start(store: &Store, log: Arc<dyn LogWriter>, stream_max_len: usize) -> Pipeline {
        let lanes = Arc::new(Lanes::new(PARTITIONS));
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let committers = Committers {
            store: store.clone(),
            log: Arc::clone(&log),
            lanes: Arc::clone(&lanes),
            publish_queue: 64,
            committers: 1,
            idempotency_window: WINDOW,
            metrics: Metrics::default(),
        };
        let publisher = committers.spawn(&tracker, &stop);
        let relay = Relay::new(store.clone(), log, lanes, stream_max_len);
        tracker.spawn(relay.run(stop.clone()));
        Pipeline {
            publisher,
            stop,
            tracker,
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tracker.close();
    }
}

/// Waits until the stream's partition contains `seq`, or fails the test after [`PATIENCE`].
async fn wait_for_seq(log: &MemoryLog, partition: u32, seq: u64) {
    let waited = tokio::time::timeout(PATIENCE, async {
        while LogReader::last_seq(log, partition).await.expect("partition exists") < seq {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "partition {partition} did not reach seq {seq} within {PATIENCE:?}"
    );
}

async fn stream_events(log: &MemoryLog, partition: u32) -> Vec<Event> {
    log.range(partition, 0, 10_000).await.expect("partition exists").events
}

async fn stored_events(store: &Store, partition: u32) -> Vec<Event> {
    store.read(partition, 0, 1000).await.expect("read").events
}

#[tokio::test]
async fn events_committed_during_outage_are_relayed_in_order() {
    let db = TestSqlite::create();
    let store = Store::open(&db.url, PARTITIONS).await.expect("open");
    let flaky = FlakyLog::new(MemoryLog::new(PARTITIONS, 1000), true);
    let pipeline = Pipeline::start(&store, flaky.clone(), 1000);

    // Publishing goes on while every append fails.
    let channels = [
        channels_in(0, PARTITIONS, 1)[0].clone(),
        channels_in(1, PARTITIONS, 1)[0].clone(),
    ];
    for i in 0..30 {
        let partition = i % 2;
        let event = new_event(&channels[partition], &format!("{{\"i\":{i}}}"), None);
        let response = pipeline
            .publisher
            .publish(partition as u32, event)
            .await
            .expect("publish");
        assert_eq!(response.position, (i / 2 + 1) as u64);
    }
    assert_eq!(LogReader::last_seq(&flaky.inner, 0).await.expect("partition"), 0);

    // Once the writer works, the relay appends every stored event in order.
    flaky.set_failing(false);
    for partition in 0..PARTITIONS {
        wait_for_seq(&flaky.inner, partition, 15).await;
        assert_eq!(
            stream_events(&flaky.inner, partition).await,
            stored_events(&store, partition).await
        );
    }

    // New events flow again.
    let event = new_event(&channels[0], "{\"after\":true}", None);
    let response = pipeline.publisher.publish(0, event).await.expect("publish");
    wait_for_seq(&flaky.inner, 0, response.position).await;
    assert_eq!(stream_events(&flaky.inner, 0).await, stored_events(&store, 0).await);
}

#[tokio::test]
async fn acknowledgements_do_not_wait_for_a_hung_stream() {
    let db = TestSqlite::create();
    let store = Store::open(&db.url, PARTITIONS).await.expect("open");
    let flaky = FlakyLog::new(MemoryLog::new(PARTITIONS, 1000), false);
    let pipeline = Pipeline::start(&store, flaky.clone(), 1000);
    let channel = channels_in(0, PARTITIONS, 1)[0].clone();
    let first = pipeline
        .publisher
        .publish(0, new_event(&channel, "0", None))
        .await
        .expect("publish");
    wait_for_seq(&flaky.inner, 0, first.position).await;

    // Every append now hangs, as against a Redis stopped with SIGSTOP. The committer used to
    // wait for its append before the next commit, so the second publish waited for the hang.
    flaky.set_hanging(true);
    let mut positions = Vec::new();
    let published = tokio::time::timeout(PATIENCE, async {
        for i in 1..=40 {
            let event = new_event(&channel, &i.to_string(), None);
            positions.push(pipeline.publisher.publish(0, event).await.expect("publish").position);
        }
    })
    .await;
    assert!(
        published.is_ok(),
        "{} of 40 publishes were acknowledged while appends hung",
        positions.len()
    );
    assert_eq!(positions, (2..=41).collect::<Vec<u64>>());

    // Once the stream responds, every acknowledged event reaches it in order.
    flaky.set_hanging(false);
    wait_for_seq(&flaky.inner, 0, 41).await;
    assert_eq!(stream_events(&flaky.inner, 0).await, stored_events(&store, 0).await);
}

#[tokio::test]
async fn commits_without_append_are_repaired_at_start() {
    // Events committed by a process that died before appending them.
    let db = TestSqlite::create();
    let store = Store::open(&db.url, PARTITIONS).await.expect("open");
    let channel = channels_in(1, PARTITIONS, 1)[0].clone();
    let batch: Vec<_> = (0..5).map(|i| new_event(&channel, &i.to_string(), None)).collect();
    store.commit(&batch, WINDOW).await.expect("commit");

    let log = Arc::new(MemoryLog::new(PARTITIONS, 1000));
    let _pipeline = Pipeline::start(&store, log.clone(), 1000);
    wait_for_seq(&log, 1, 5).await;
    assert_eq!(stream_events(&log, 1).await, stored_events(&store, 1).await);
}

#[tokio::test]
async fn empty_stream_is_refilled_with_recent_events_only() {
    let db = TestSqlite::create();
    let store = Store::open(&db.url, PARTITIONS).await.expect("open");
    let channel = channels_in(0, PARTITIONS, 1)[0].clone();
    let batch: Vec<_> = (0..50).map(|i| new_event(&channel, &i.to_string(), None)).collect();
    store.commit(&batch, WINDOW).await.expect("commit");

    let log = Arc::new(MemoryLog::new(PARTITIONS, 1000));
    let _pipeline = Pipeline::start(&store, log.clone(), 10);
    wait_for_seq(&log, 0, 50).await;
    let seqs: Vec<u64> = stream_events(&log, 0).await.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (41..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn full_queue_fails_fast() {
    let db = TestSqlite::create();
    let store = Store::open(&db.url, PARTITIONS).await.expect("open");
    let lanes = Arc::new(Lanes::new(PARTITIONS));
    let tracker = TaskTracker::new();
    let abort = CancellationToken::new();
    let publisher = Committers {
        store: store.clone(),
        log: Arc::new(MemoryLog::new(PARTITIONS, 100)),
        lanes,
        publish_queue: 1,
        committers: 1,
        idempotency_window: WINDOW,
        metrics: Metrics::default(),
    }
    .spawn(&tracker, &abort);

    // Hold SQLite's write lock from another connection, so the committer blocks in its commit.
    let blocker = sqlx::SqlitePool::connect(&db.url).await.expect("connect");
    let mut lock = blocker
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("take the write lock");
    let channel = channels_in(0, PARTITIONS, 1)[0].clone();
    let mut calls = Vec::new();
    for i in 0..6 {
        let publisher = publisher.clone();
        let event = new_event(&channel, &i.to_string(), None);
        calls.push(tokio::spawn(async move { publisher.publish(0, event).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("SELECT 1")
        .execute(&mut *lock)
        .await
        .expect("hold the lock");
    lock.rollback().await.expect("release the lock");

    // One request is in the committer and one waits in the queue; the rest are turned away.
    let mut full = 0;
    for call in calls {
        match call.await.expect("task") {
            Ok(_) => {}
            Err(notifier::error::Error::QueueFull { partition: 0 }) => full += 1,
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert!(full >= 4, "{full} of 6 requests found the queue full");
    abort.cancel();
}
