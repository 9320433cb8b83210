//! The store of record against real PostgreSQL and SQLite databases. Each scenario runs on both.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{TestDb, TestSqlite, channels_in, new_event};
use notifier::store::{Outcome, Store};
use notify_proto::history::{HistoryError, HistoryStore};
use tokio::task::JoinSet;

const WINDOW: Duration = Duration::from_secs(3600);

/// Runs each named scenario once on a fresh PostgreSQL database and once on a fresh SQLite file.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = super::TestDb::create().await;
                    super::$scenario(&db.url).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let db = super::TestSqlite::create();
                    super::$scenario(&db.url).await;
                }
            )*
        }
    };
}

on_both_backends!(
    sequence_is_gap_free_across_handles,
    history_pages_through_one_channel,
    idempotency_key_returns_first_event,
    idempotency_keys_are_scoped_per_caller,
    concurrent_key_is_stored_once,
    key_reused_on_other_channel_conflicts,
    read_partition_and_heads,
    retention_deletes_expired_rows,
    partition_count_cannot_change,
    one_batch_spans_partitions,
    batch_keys_resolve_across_partitions,
    overlapping_batches_do_not_deadlock,
);

async fn open(url: &str) -> Store {
    Store::open(url, 4).await.expect("open the store")
}

fn now_ms() -> i64 {
    let elapsed = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970");
    i64::try_from(elapsed.as_millis()).expect("fits i64")
}

fn stored(outcome: &Outcome) -> (String, u64, bool) {
    match outcome {
        Outcome::Stored { id, seq, duplicate } => (id.clone(), *seq, *duplicate),
        Outcome::Conflict { .. } => panic!("expected a stored event, got {outcome:?}"),
    }
}

async fn sequence_is_gap_free_across_handles(url: &str) {
    // Two handles have two connection pools, like two notifier replicas.
    let handles = [open(url).await, open(url).await];
    let channel = &channels_in(1, 4, 1)[0];
    let mut tasks = JoinSet::new();
    for task in 0..6 {
        let store = handles[task % 2].clone();
        let channel = channel.clone();
        tasks.spawn(async move {
            let mut committed = 0;
            for round in 0..15 {
                let batch: Vec<_> = (0..round % 3 + 1)
                    .map(|k| {
                        new_event(
                            &channel,
                            &format!("{{\"task\":{task},\"round\":{round},\"k\":{k}}}"),
                            None,
                        )
                    })
                    .collect();
                committed += store.commit(&batch, WINDOW).await.expect("commit").events.len() as u64;
            }
            committed
        });
    }
    let total: u64 = tasks.join_all().await.into_iter().sum();

    let page = handles[0].read(1, 0, 1000).await.expect("read");
    let seqs: Vec<u64> = page.events.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (1..=total).collect::<Vec<_>>());
    assert_eq!(page.head, total);
    assert_eq!(page.oldest, 1);
}

async fn history_pages_through_one_channel(url: &str) {
    let store = open(url).await;
    let channels = channels_in(2, 4, 2);
    let (mine, other) = (&channels[0], &channels[1]);
    let batch: Vec<_> = (0..12)
        .map(|i| {
            let channel = if i % 3 == 2 { other } else { mine };
            new_event(channel, &format!("{{\"n\":{i},\"text\":\"שלום 🎉\"}}"), None)
        })
        .collect();
    store.commit(&batch, WINDOW).await.expect("commit");

    let mut since = 0;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let page = store.history(mine, since, 3).await.expect("history");
        assert_eq!(page.head, 12);
        assert!(page.complete);
        assert!(page.events.iter().all(|event| &event.channel == mine));
        if page.events.is_empty() {
            assert_eq!(page.next_since, 12);
            break;
        }
        since = page.next_since;
        seen.extend(page.events);
    }
    let expected: Vec<String> = batch
        .iter()
        .filter(|e| &e.channel == mine)
        .map(|e| e.data.clone())
        .collect();
    let data: Vec<String> = seen.iter().map(|event| event.data.clone()).collect();
    assert_eq!(data, expected);
    assert!(seen.windows(2).all(|pair| pair[0].seq < pair[1].seq));
}

async fn idempotency_key_returns_first_event(url: &str) {
    let store = open(url).await;
    let channel = &channels_in(0, 4, 1)[0];
    let first = store
        .commit(&[new_event(channel, "1", Some("k1"))], WINDOW)
        .await
        .expect("commit");
    let (first_id, first_seq, duplicate) = stored(&first.outcomes[0]);
    assert_eq!((first_seq, duplicate), (1, false));

    let again = store
        .commit(&[new_event(channel, "1", Some("k1"))], WINDOW)
        .await
        .expect("commit");
    assert_eq!(stored(&again.outcomes[0]), (first_id.clone(), 1, true));
    assert!(again.events.is_empty());

    let changed = store
        .commit(&[new_event(channel, "2", Some("k1"))], WINDOW)
        .await
        .expect("commit");
    assert_eq!(
        changed.outcomes[0],
        Outcome::Conflict {
            key: "k1".into(),
            first_id: first_id.clone()
        }
    );

    // Within one batch, a repeated key gets the first request's outcome.
    let batch = [
        new_event(channel, "3", Some("k2")),
        new_event(channel, "3", Some("k2")),
        new_event(channel, "4", Some("k2")),
        new_event(channel, "5", None),
    ];
    let committed = store.commit(&batch, WINDOW).await.expect("commit");
    let (k2_id, k2_seq, k2_duplicate) = stored(&committed.outcomes[0]);
    assert_eq!((k2_seq, k2_duplicate), (2, false));
    assert_eq!(stored(&committed.outcomes[1]), (k2_id.clone(), 2, true));
    assert_eq!(
        committed.outcomes[2],
        Outcome::Conflict {
            key: "k2".into(),
            first_id: k2_id
        }
    );
    assert_eq!(stored(&committed.outcomes[3]).1, 3);
    assert_eq!(committed.events.len(), 2);

    // A key older than the window is forgotten.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let later = store
        .commit(&[new_event(channel, "1", Some("k1"))], Duration::from_millis(1))
        .await
        .expect("commit");
    let (later_id, later_seq, later_duplicate) = stored(&later.outcomes[0]);
    assert_ne!(later_id, first_id);
    assert_eq!((later_seq, later_duplicate), (4, false));
}

fn scoped_event(channel: &str, data: &str, scope: &str) -> notifier::store::NewEvent {
    let mut event = new_event(channel, data, Some("shared-key"));
    event.idempotency_scope = scope.to_owned();
    event
}

async fn idempotency_keys_are_scoped_per_caller(url: &str) {
    let store = open(url).await;
    let channel = &channels_in(2, 4, 1)[0];
    let first_a = store
        .commit(&[scoped_event(channel, "1", "caller-a")], WINDOW)
        .await
        .expect("commit");
    let (a_id, a_seq, a_duplicate) = stored(&first_a.outcomes[0]);
    assert_eq!((a_seq, a_duplicate), (1, false));

    // The same key text from another caller, with other content, is a new event, not a conflict.
    let first_b = store
        .commit(&[scoped_event(channel, "2", "caller-b")], WINDOW)
        .await
        .expect("commit");
    let (b_id, b_seq, b_duplicate) = stored(&first_b.outcomes[0]);
    assert_eq!((b_seq, b_duplicate), (2, false));
    assert_ne!(b_id, a_id);

    // Each caller's retry returns its own first event, also when both are in one batch.
    let retries = [
        scoped_event(channel, "2", "caller-b"),
        scoped_event(channel, "1", "caller-a"),
    ];
    let again = store.commit(&retries, WINDOW).await.expect("commit");
    assert_eq!(stored(&again.outcomes[0]), (b_id.clone(), 2, true));
    assert_eq!(stored(&again.outcomes[1]), (a_id.clone(), 1, true));
    assert!(again.events.is_empty());

    // A conflict names only the caller's own event.
    let changed = store
        .commit(&[scoped_event(channel, "3", "caller-b")], WINDOW)
        .await
        .expect("commit");
    assert_eq!(
        changed.outcomes[0],
        Outcome::Conflict {
            key: "shared-key".into(),
            first_id: b_id
        }
    );

    // The retention sweep deletes scoped keys too.
    let (_, keys) = store.delete_expired(0, now_ms() + 1000).await.expect("delete");
    assert_eq!(keys, 2);
}

async fn concurrent_key_is_stored_once(url: &str) {
    let handles = [open(url).await, open(url).await];
    let channel = &channels_in(3, 4, 1)[0];
    let mut tasks = JoinSet::new();
    for task in 0..8 {
        let store = handles[task % 2].clone();
        let event = new_event(channel, "{\"order\":7}", Some("race"));
        tasks.spawn(async move { store.commit(&[event], WINDOW).await.expect("commit") });
    }
    let results: Vec<_> = tasks.join_all().await.iter().map(|c| stored(&c.outcomes[0])).collect();
    assert_eq!(results.iter().filter(|(_, _, duplicate)| !duplicate).count(), 1);
    assert!(results.iter().all(|(id, _, _)| id == &results[0].0));
    assert!(results.iter().all(|(_, seq, _)| *seq == 1));
    assert_eq!(handles[0].heads().await.expect("heads")[3], 1);
}

async fn key_reused_on_other_channel_conflicts(url: &str) {
    // Different channels in different partitions: the partition locks do not order these
    // commits, so the key insert detects the collision.
    let handles = [open(url).await, open(url).await];
    let channels = [channels_in(0, 4, 1)[0].clone(), channels_in(1, 4, 1)[0].clone()];
    let mut tasks = JoinSet::new();
    for round in 0..5 {
        for (partition, channel) in channels.iter().enumerate() {
            let store = handles[partition].clone();
            let event = new_event(channel, "1", Some(&format!("shared-{round}")));
            tasks.spawn(async move { store.commit(&[event], WINDOW).await.expect("commit") });
        }
    }
    let committed = tasks.join_all().await;
    let conflicts = committed
        .iter()
        .filter(|c| matches!(c.outcomes[0], Outcome::Conflict { .. }))
        .count();
    assert_eq!(conflicts, 5);
    let heads = handles[0].heads().await.expect("heads");
    assert_eq!(heads[0] + heads[1], 5);
}

async fn read_partition_and_heads(url: &str) {
    let store = open(url).await;
    let one = channels_in(1, 4, 1)[0].clone();
    let three = channels_in(3, 4, 1)[0].clone();
    let batch: Vec<_> = (0..5).map(|i| new_event(&one, &i.to_string(), None)).collect();
    store.commit(&batch, WINDOW).await.expect("commit");
    store
        .commit(&[new_event(&three, "1", None), new_event(&three, "2", None)], WINDOW)
        .await
        .expect("commit");

    assert_eq!(HistoryStore::heads(&store).await.expect("heads"), vec![0, 5, 0, 2]);
    let page = HistoryStore::read_partition(&store, 1, 2, 2).await.expect("read");
    assert_eq!(page.events.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(page.events[0].data, "2");
    assert_eq!((page.head, page.oldest), (5, 1));
    let all = HistoryStore::read_partition(&store, 1, 0, 0).await.expect("read");
    assert_eq!(all.events.len(), 5);
    let empty = HistoryStore::read_partition(&store, 0, 0, 10).await.expect("read");
    assert_eq!((empty.events.len(), empty.head, empty.oldest), (0, 0, 0));
    let missing = HistoryStore::read_partition(&store, 4, 0, 10).await;
    assert!(matches!(
        missing,
        Err(HistoryError::NoSuchPartition {
            partition: 4,
            partitions: 4
        })
    ));
}

async fn retention_deletes_expired_rows(url: &str) {
    let store = open(url).await;
    let channel = &channels_in(2, 4, 1)[0];
    let batch = [
        new_event(channel, "1", Some("old")),
        new_event(channel, "2", None),
        new_event(channel, "3", None),
    ];
    store.commit(&batch, WINDOW).await.expect("commit");

    let cutoff = now_ms() + 1000;
    assert_eq!(store.delete_expired(cutoff, cutoff).await.expect("delete"), (3, 1));
    let page = store.read(2, 0, 10).await.expect("read");
    assert_eq!((page.events.len(), page.head, page.oldest), (0, 3, 0));
    let trimmed = store.history(channel, 1, 10).await.expect("history");
    assert!(!trimmed.complete);
    assert_eq!(trimmed.next_since, 3);
    assert!(store.history(channel, 3, 10).await.expect("history").complete);

    // The counter survives, and the expired key can be used again.
    let next = store
        .commit(&[new_event(channel, "9", Some("old"))], WINDOW)
        .await
        .expect("commit");
    assert_eq!(stored(&next.outcomes[0]).1, 4);
}

async fn partition_count_cannot_change(url: &str) {
    open(url).await;
    let err = Store::open(url, 8).await.expect_err("partition count changed");
    let message = err.to_string();
    assert!(message.contains("has 4 partitions"), "{message}");
    assert!(message.contains("set STREAM_PARTITIONS=4"), "{message}");
    // The rejected start created no rows.
    assert_eq!(open(url).await.heads().await.expect("heads").len(), 4);
}

async fn one_batch_spans_partitions(url: &str) {
    let store = open(url).await;
    let channels: Vec<String> = (0..4)
        .map(|partition| channels_in(partition, 4, 1)[0].clone())
        .collect();
    store
        .commit(&[new_event(&channels[2], "before", None)], WINDOW)
        .await
        .expect("commit");

    // Partitions in mixed order: 3, 2, 0, 3, 2, 3.
    let order = [3, 2, 0, 3, 2, 3];
    let batch: Vec<_> = order
        .iter()
        .enumerate()
        .map(|(i, &partition)| new_event(&channels[partition], &i.to_string(), None))
        .collect();
    let committed = store.commit(&batch, WINDOW).await.expect("commit");

    let seqs: Vec<u64> = committed.outcomes.iter().map(|outcome| stored(outcome).1).collect();
    assert_eq!(seqs, vec![1, 2, 1, 2, 3, 3]);
    let stored_order: Vec<(u32, u64)> = committed
        .events
        .iter()
        .map(|event| (event.partition, event.seq))
        .collect();
    assert_eq!(stored_order, vec![(0, 1), (2, 2), (2, 3), (3, 1), (3, 2), (3, 3)]);
    assert_eq!(store.heads().await.expect("heads"), vec![1, 0, 3, 3]);
    let partition_three: Vec<String> = store
        .read(3, 0, 10)
        .await
        .expect("read")
        .events
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(partition_three, vec!["0", "3", "5"]);
}

async fn batch_keys_resolve_across_partitions(url: &str) {
    let store = open(url).await;
    let zero = channels_in(0, 4, 1)[0].clone();
    let one = channels_in(1, 4, 1)[0].clone();
    let first = store
        .commit(&[new_event(&one, "stored", Some("old"))], WINDOW)
        .await
        .expect("commit");
    let (old_id, _, _) = stored(&first.outcomes[0]);

    let batch = [
        new_event(&zero, "a", Some("k")),
        new_event(&one, "b", None),
        // The same key and content in the same batch: a duplicate of the first request.
        new_event(&zero, "a", Some("k")),
        // The same key with other content, on another partition: a conflict.
        new_event(&one, "changed", Some("k")),
        // A retry of an event stored by an earlier batch.
        new_event(&one, "stored", Some("old")),
        // A key stored earlier, sent with other content.
        new_event(&zero, "other", Some("old")),
        new_event(&zero, "c", None),
    ];
    let committed = store.commit(&batch, WINDOW).await.expect("commit");
    let outcomes = &committed.outcomes;
    assert_eq!(outcomes.len(), batch.len());

    let (k_id, k_seq, k_duplicate) = stored(&outcomes[0]);
    assert_eq!((k_seq, k_duplicate), (1, false));
    assert_eq!(stored(&outcomes[1]).1, 2);
    assert_eq!(stored(&outcomes[2]), (k_id.clone(), 1, true));
    assert_eq!(
        outcomes[3],
        Outcome::Conflict {
            key: "k".into(),
            first_id: k_id
        }
    );
    assert_eq!(stored(&outcomes[4]), (old_id.clone(), 1, true));
    assert_eq!(
        outcomes[5],
        Outcome::Conflict {
            key: "old".into(),
            first_id: old_id
        }
    );
    assert_eq!(stored(&outcomes[6]).1, 2);
    assert_eq!(committed.events.len(), 3);
    assert_eq!(store.heads().await.expect("heads"), vec![2, 2, 0, 0]);
}

async fn overlapping_batches_do_not_deadlock(url: &str) {
    // Two handles, like two notifier replicas, commit batches over all partitions, half of them
    // listing the partitions in reverse order. The locks are taken in partition order, so no
    // transaction waits for another in a cycle.
    let handles = [open(url).await, open(url).await];
    let channels: Vec<String> = (0..4)
        .map(|partition| channels_in(partition, 4, 1)[0].clone())
        .collect();
    let mut tasks = JoinSet::new();
    for task in 0..8 {
        let store = handles[task % 2].clone();
        let mut order = channels.clone();
        if task % 2 == 1 {
            order.reverse();
        }
        tasks.spawn(async move {
            for round in 0..10 {
                let batch: Vec<_> = order
                    .iter()
                    .map(|channel| new_event(channel, &format!("{{\"task\":{task},\"round\":{round}}}"), None))
                    .collect();
                store.commit(&batch, WINDOW).await.expect("commit");
            }
        });
    }
    tasks.join_all().await;

    assert_eq!(handles[0].heads().await.expect("heads"), vec![80; 4]);
    for partition in 0..4 {
        let seqs: Vec<u64> = handles[1]
            .read(partition, 0, 1000)
            .await
            .expect("read")
            .events
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, (1..=80).collect::<Vec<_>>(), "partition {partition}");
    }
}
