//! The delivery guarantees under real faults: retried and cancelled publishes, Redis stopped,
//! flushed or trimmed, two notifiers racing on one partition, a notifier killed mid-stream, and
//! clients resuming while events keep coming. Each test compares what subscribers received with
//! what `Publish` acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, ensure};
use e2e::client::Client;
use e2e::e2e_test;
use e2e::env::{Mode, Options, PARTITIONS, TestEnv, publisher_at};
use e2e::patience;
use e2e::redis_server::RedisServer;
use futures_util::{StreamExt, stream};
use notify_proto::channel::{partition_of, stream_key};
use notify_proto::entry::seq_of;
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::{PublishRequest, PublishResponse};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// Returns a publish request of event type `item` with an idempotency key (none when empty).
fn keyed(channel: &str, data: &str, key: &str) -> PublishRequest {
    PublishRequest {
        channel: channel.into(),
        r#type: "item".into(),
        data: data.into(),
        idempotency_key: key.into(),
        ..Default::default()
    }
}

/// Publishes `{"n":n}` on `channel` with the key `<channel>-<n>`, retrying until the notifier
/// acknowledges it or the patience runs out. The key makes the retries safe.
async fn publish_until_ok(
    mut client: NotifierClient<Channel>,
    channel: &str,
    n: usize,
) -> anyhow::Result<PublishResponse> {
    let request = keyed(channel, &format!(r#"{{"n":{n}}}"#), &format!("{channel}-{n}"));
    let deadline = tokio::time::Instant::now() + patience() * 3;
    loop {
        match client.publish(request.clone()).await {
            Ok(response) => return Ok(response.into_inner()),
            Err(status) if tokio::time::Instant::now() >= deadline => {
                return Err(status).with_context(|| format!("publish {n} kept failing"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Receives `count` event frames and returns them.
async fn receive(client: &mut Client, count: usize) -> anyhow::Result<Vec<Value>> {
    let mut events = Vec::with_capacity(count);
    while events.len() < count {
        let frame = client
            .recv()
            .await
            .with_context(|| format!("after {} of {count} events", events.len()))?;
        events.push(frame);
    }
    Ok(events)
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|event| event["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn positions(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|event| event["position"].as_u64().unwrap_or_default())
        .collect()
}

fn acked_ids(acked: &[PublishResponse]) -> Vec<String> {
    acked.iter().map(|response| response.id.clone()).collect()
}

fn is_increasing(positions: &[u64]) -> bool {
    positions.windows(2).all(|pair| pair[0] < pair[1])
}

/// Starts a distributed deployment on a Redis of the test's own, or returns `None` when
/// `redis-server` or the shared PostgreSQL is unavailable and `E2E_REQUIRE_SERVICES` is not set.
async fn start_on_own_redis(name: &str, options: Options) -> anyhow::Result<Option<(RedisServer, TestEnv)>> {
    let redis = match RedisServer::start_new(&format!("{name}-{}", uuid::Uuid::new_v4().simple())).await {
        Ok(redis) => redis,
        Err(err) if std::env::var_os("E2E_REQUIRE_SERVICES").is_none() => {
            eprintln!("skipped: this test needs redis-server: {err:#}");
            return Ok(None);
        }
        Err(err) => return Err(err.context("E2E_REQUIRE_SERVICES is set")),
    };
    let options = Options {
        redis_url: Some(redis.url()),
        ..options
    };
    let env = TestEnv::start_with_or_skip(Mode::Distributed, options).await?;
    Ok(env.map(|env| (redis, env)))
}

/// Returns the sequence numbers of the stream entries of `channel`'s partition in `redis_url`.
async fn stream_seqs(redis_url: &str, prefix: &str, channel: &str) -> anyhow::Result<Vec<u64>> {
    let client = redis::Client::open(redis_url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let key = stream_key(prefix, partition_of(channel, PARTITIONS));
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&key)
        .arg("-")
        .arg("+")
        .query_async(&mut connection)
        .await?;
    let channel_entries = entries
        .into_iter()
        .filter(|(_, fields)| fields.iter().any(|(name, value)| name == "ch" && value == channel));
    channel_entries.map(|(id, _)| seq_of(&id).map_err(Into::into)).collect()
}

/// Publishes `{"n":0}` to `{"n":<count - 1>}` on `channel`, one at a time.
async fn publish_numbered(env: &TestEnv, channel: &str, count: usize) -> anyhow::Result<Vec<PublishResponse>> {
    let mut acked = Vec::with_capacity(count);
    for n in 0..count {
        acked.push(env.publish(channel, "item", &format!(r#"{{"n":{n}}}"#)).await?);
    }
    Ok(acked)
}

/// Connects a client, resumes `channel` from `since`, and checks that the acknowledgement
/// reports a complete recovery and that exactly the `acked` events arrive, in order. Returns the
/// client.
async fn resume_expecting(
    env: &TestEnv,
    channel: &str,
    since: Value,
    acked: &[PublishResponse],
) -> anyhow::Result<Client> {
    let mut client = env.connect("alice").await?;
    let answer = client.subscribe_since(channel, since).await?;
    assert_eq!(answer["type"], "subscribed", "answer: {answer}");
    assert_eq!(answer["recovered"], true, "answer: {answer}");
    let replayed = receive(&mut client, acked.len()).await?;
    assert_eq!(ids(&replayed), acked_ids(acked));
    Ok(client)
}

e2e_test!(idempotent_retry_delivers_once, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("orders").await?;

    let request = keyed("orders", r#"{"order":1}"#, "order-1");
    let first = env.publish_request(request.clone()).await?;
    assert!(!first.duplicate, "first publish is marked duplicate");
    let retry = env.publish_request(request).await?;
    assert_eq!(retry.id, first.id);
    assert_eq!(retry.position, first.position);
    assert!(retry.duplicate, "retry is not marked duplicate");

    let conflict = env
        .publish_request(keyed("orders", r#"{"order":2}"#, "order-1"))
        .await
        .expect_err("the key with other data is rejected");
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    assert!(
        conflict.message().contains(&first.id),
        "message does not name the first event: {}",
        conflict.message()
    );

    // Events of a channel arrive in order, so the marker comes right after the only delivery.
    let marker = env.publish("orders", "marker", "{}").await?;
    let delivered = receive(&mut client, 2).await?;
    assert_eq!(ids(&delivered), [first.id.clone(), marker.id.clone()]);
    client.expect_nothing_pending().await?;

    let stored = env.history("orders", 0).await?;
    let stored_ids: Vec<&str> = stored.iter().map(|event| event.id.as_str()).collect();
    assert_eq!(stored_ids, [first.id.as_str(), marker.id.as_str()]);
    Ok(())
});

e2e_test!(cancelled_publish_then_retry, |env| {
    let mut client = env.connect("alice").await?;
    client.subscribe("orders").await?;
    let mut publisher = env.publisher().await?;

    // Each round drops the call after a different delay: before sending, while committing, or
    // after the commit. The retry with the same key then publishes or returns the first event.
    let mut acked = Vec::new();
    for (round, delay_us) in [100u64, 500, 1_000, 2_000, 5_000].into_iter().enumerate() {
        let request = keyed("orders", &format!(r#"{{"round":{round}}}"#), &format!("round-{round}"));
        let cancelled = publisher.publish(request.clone());
        let _ = tokio::time::timeout(Duration::from_micros(delay_us), cancelled).await;
        acked.push(publisher.publish(request).await?.into_inner());
    }
    let marker = env.publish("orders", "marker", "{}").await?;
    acked.push(marker);

    let delivered = receive(&mut client, acked.len()).await?;
    assert_eq!(ids(&delivered), acked_ids(&acked));
    client.expect_nothing_pending().await?;

    let stored = env.history("orders", 0).await?;
    let stored_ids: Vec<String> = stored.into_iter().map(|event| event.id).collect();
    assert_eq!(stored_ids, acked_ids(&acked));
    Ok(())
});

/// Publishes `{"n":..}` on `channel` every `interval` for `count` events, one at a time, and
/// returns the responses. Fails on the first error.
async fn publish_steadily(
    mut client: NotifierClient<Channel>,
    channel: &str,
    count: usize,
    interval: Duration,
) -> anyhow::Result<Vec<PublishResponse>> {
    let mut ticks = tokio::time::interval(interval);
    let mut acked = Vec::with_capacity(count);
    for n in 0..count {
        ticks.tick().await;
        let response = client.publish(keyed(channel, &format!(r#"{{"n":{n}}}"#), "")).await;
        acked.push(response.with_context(|| format!("publish {n}"))?.into_inner());
    }
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() -> anyhow::Result<()> {
    let Some((mut redis, env)) = start_on_own_redis("outage", Options::default()).await? else {
        return Ok(());
    };
    let mut first = env.connect("alice").await?;
    let mut second = env.connect("bob").await?;
    first.subscribe("ticker").await?;
    second.subscribe("ticker").await?;

    // 200 events at 20 per second; Redis is down from 2 s to 7 s and comes back empty.
    let publishing = publish_steadily(env.publisher().await?, "ticker", 200, Duration::from_millis(50));
    let outage = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        redis.stop().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        redis.start().await
    };
    let (acked, restarted) = tokio::join!(publishing, outage);
    restarted.context("restart Redis")?;
    let acked = acked?;

    for client in [&mut first, &mut second] {
        let delivered = receive(client, acked.len()).await?;
        assert_eq!(ids(&delivered), acked_ids(&acked));
        client.expect_nothing_pending().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_pause_loses_nothing() -> anyhow::Result<()> {
    let Some((redis, env)) = start_on_own_redis("pause", Options::default()).await? else {
        return Ok(());
    };
    let mut client = env.connect("alice").await?;
    client.subscribe("ticker").await?;

    // 80 events at 20 per second; Redis suspends every client for 4 s from 1 s on. That is longer
    // than the notifier's 3 s Redis response timeout, so stream calls made during the pause time
    // out, although Redis may still execute them when the pause ends.
    let publishing = publish_steadily(env.publisher().await?, "ticker", 80, Duration::from_millis(50));
    let pause = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        redis.pause(Duration::from_secs(4)).await
    };
    let (acked, paused) = tokio::join!(publishing, pause);
    paused.context("pause Redis")?;
    let acked = acked?;

    let delivered = receive(&mut client, acked.len()).await?;
    assert_eq!(ids(&delivered), acked_ids(&acked));
    client.expect_nothing_pending().await?;
    Ok(())
}

/// Returns `count` channels in different partitions.
fn channels_in_distinct_partitions(count: usize) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    (0..1000)
        .map(|i| format!("frozen-{i}"))
        .filter(|channel| seen.insert(partition_of(channel, PARTITIONS)))
        .take(count)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_does_not_hold_acks() -> anyhow::Result<()> {
    let Some((redis, env)) = start_on_own_redis("frozen", Options::default()).await? else {
        return Ok(());
    };
    let channels = channels_in_distinct_partitions(12);
    let mut client = env.connect("alice").await?;
    for channel in &channels {
        client.subscribe(channel).await?;
    }
    let mut publisher = env.publisher().await?;
    let mut acked = vec![publisher.publish(keyed(&channels[0], "0", "")).await?.into_inner()];
    receive(&mut client, 1).await?;

    // Redis stops (SIGSTOP). First each channel gets two events, one after the other. A
    // committer that waited for its append held each channel's second publish for the Redis
    // timeouts (2 s to connect, 3 s to respond). Over 12 partitions that adds up to 24 s or more,
    // beyond the 12 s allowed. Then, 6 s into the freeze, when every earlier Redis call has timed
    // out, each channel gets a third event.
    let allowed = Duration::from_secs(12);
    let frozen_at = tokio::time::Instant::now();
    redis.freeze().await?;
    let publishing = tokio::time::timeout(allowed, async {
        for channel in &channels {
            for n in 1..=2 {
                let response = publisher.publish(keyed(channel, &n.to_string(), "")).await;
                acked.push(
                    response
                        .with_context(|| format!("publish {n} to {channel}"))?
                        .into_inner(),
                );
            }
        }
        tokio::time::sleep_until(frozen_at + Duration::from_secs(6)).await;
        for channel in &channels {
            let response = publisher.publish(keyed(channel, "3", "")).await;
            acked.push(
                response
                    .with_context(|| format!("publish 3 to {channel}"))?
                    .into_inner(),
            );
        }
        anyhow::Ok(())
    })
    .await;
    let acked_while_frozen = acked.len() - 1;
    redis.thaw().await?;
    publishing
        .with_context(|| format!("{acked_while_frozen} of 36 publishes acknowledged while Redis was frozen"))??;
    assert_eq!(acked_while_frozen, 36);

    // After Redis resumes, every acknowledged event is delivered once.
    let mut delivered = ids(&receive(&mut client, acked.len() - 1).await?);
    let mut expected = acked_ids(&acked[1..]);
    delivered.sort();
    expected.sort();
    assert_eq!(delivered, expected);
    client.expect_nothing_pending().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_before_resume_recovers_from_store() -> anyhow::Result<()> {
    let options = Options::default().notifier("STREAM_MAXLEN", "5");
    let Some((redis, mut env)) = start_on_own_redis("flushall", options).await? else {
        return Ok(());
    };
    let mut watcher = env.connect("bob").await?;
    watcher.subscribe("feed").await?;
    let mut client = env.connect("alice").await?;
    let since = client.subscribe("feed").await?["position"].clone();
    drop(client);

    let acked = publish_numbered(&env, "feed", 20).await?;
    // The watcher's deliveries show that the edge read all 20 from the stream before the flush.
    assert_eq!(ids(&receive(&mut watcher, 20).await?), acked_ids(&acked));
    redis.flushall().await?;
    // A restarted edge has no recent-event window, and the flushed stream contains at most the last
    // 5 events once the relay refills it, so the first missed events can only come from the store.
    env.restart_edge().await?;

    let mut client = resume_expecting(&env, "feed", since, &acked).await?;

    let live = env.publish("feed", "item", r#"{"n":20}"#).await?;
    assert_eq!(client.recv().await?["id"], live.id);
    Ok(())
}

/// Resumes a client after 50 events of which a stream capped at 5 entries kept only the last
/// few. The edge is restarted in between, so its recent-event window cannot serve the resume
/// either, and the first missed events come from the store (the rest from the stream or store).
async fn resume_after_trim(mode: Mode) -> anyhow::Result<()> {
    let options = Options::default().notifier("STREAM_MAXLEN", "5");
    let (redis, mut env) = match mode {
        Mode::Distributed => match start_on_own_redis("maxlen", options).await? {
            Some((redis, env)) => (Some(redis), env),
            None => return Ok(()),
        },
        Mode::Standalone => (None, TestEnv::start_with(mode, options).await?),
    };
    let mut client = env.connect("alice").await?;
    let since = client.subscribe("feed").await?["position"].clone();
    drop(client);

    let acked = publish_numbered(&env, "feed", 50).await?;
    if let Some(redis) = &redis {
        let kept = stream_seqs(&redis.url(), &env.id, "feed").await?;
        let first_missed = acked.first().map(|response| response.position);
        assert!(
            kept.first().copied() > first_missed,
            "the stream still holds the first missed event: {kept:?}"
        );
    }
    env.restart_edge().await?;

    let mut client = resume_expecting(&env, "feed", since, &acked).await?;
    client.expect_nothing_pending().await?;
    Ok(())
}

mod trimmed_stream_resume {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn distributed() -> anyhow::Result<()> {
        resume_after_trim(Mode::Distributed).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn standalone() -> anyhow::Result<()> {
        resume_after_trim(Mode::Standalone).await
    }
}

e2e_test!(resume_longer_than_socket_queue, |env| {
    let mut client = env.connect("alice").await?;
    let since = client.subscribe("feed").await?["position"].clone();
    drop(client);

    // 300 missed events are more than a socket's queue can take (256 frames by default), and the
    // edge's recent-event window (1,024 events) still contains them all.
    let acked = publish_numbered(env, "feed", 300).await?;
    let mut client = resume_expecting(env, "feed", since, &acked).await?;
    client.expect_nothing_pending().await?;
    Ok(())
});

/// Publishes `count` events numbered from `first` through `client`, `in_flight` at a time, and
/// returns the responses in completion order.
async fn publish_concurrently(
    client: NotifierClient<Channel>,
    channel: &str,
    first: usize,
    count: usize,
    in_flight: usize,
) -> anyhow::Result<Vec<PublishResponse>> {
    stream::iter(first..first + count)
        .map(|n| publish_until_ok(client.clone(), channel, n))
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_notifiers_keep_one_order() -> anyhow::Result<()> {
    let Some(env) = TestEnv::start_or_skip(Mode::Distributed).await? else {
        return Ok(());
    };
    let second_notifier = env.start_extra_notifier("notifier2").await?;
    let mut first = env.connect("alice").await?;
    let mut second = env.connect("bob").await?;
    first.subscribe("race").await?;
    second.subscribe("race").await?;

    let via_first = publish_concurrently(env.publisher().await?, "race", 0, 500, 8);
    let via_second = publish_concurrently(publisher_at(second_notifier.addr("grpc")?).await?, "race", 500, 500, 8);
    let (via_first, via_second) = tokio::join!(via_first, via_second);
    let mut acked: Vec<PublishResponse> = via_first?.into_iter().chain(via_second?).collect();
    acked.sort_by_key(|response| response.position);

    let seen_first = receive(&mut first, 1000).await?;
    let seen_second = receive(&mut second, 1000).await?;
    assert_eq!(ids(&seen_first), ids(&seen_second));
    assert_eq!(ids(&seen_first), acked_ids(&acked));
    assert!(is_increasing(&positions(&seen_first)), "positions not increasing");
    first.expect_nothing_pending().await?;
    second.expect_nothing_pending().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifier_killed_mid_stream() -> anyhow::Result<()> {
    let Some(mut env) = TestEnv::start_or_skip(Mode::Distributed).await? else {
        return Ok(());
    };
    let mut steady = env.connect("alice").await?;
    steady.subscribe("steady").await?;

    // 400 events, 8 in flight, each retried with its idempotency key until acknowledged. The
    // notifier is killed once 100 are acknowledged and restarted on the same address.
    let client = env.publisher().await?;
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::channel(400);
    let publishing = tokio::spawn(async move {
        stream::iter(0..400)
            .map(|n| {
                let (client, acked_tx) = (client.clone(), acked_tx.clone());
                async move {
                    let response = publish_until_ok(client, "steady", n).await?;
                    let _ = acked_tx.send(()).await;
                    anyhow::Ok(response)
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
    });
    for _ in 0..100 {
        acked_rx.recv().await.context("publisher stopped early")?;
    }
    env.restart_notifier().await?;
    let mut acked = publishing
        .await?
        .into_iter()
        .collect::<anyhow::Result<Vec<PublishResponse>>>()?;
    acked.sort_by_key(|response| response.position);
    let duplicates = acked.windows(2).filter(|pair| pair[0].id == pair[1].id).count();
    assert_eq!(duplicates, 0, "two keys were acknowledged with one event");

    // The store contains every acknowledged event, and nothing else.
    let stored: Vec<String> = env
        .history("steady", 0)
        .await?
        .into_iter()
        .map(|event| event.id)
        .collect();
    assert_eq!(stored, acked_ids(&acked));

    // The subscriber connected throughout, and one resuming from 0, see every event once.
    let delivered = receive(&mut steady, acked.len()).await.context("steady subscriber")?;
    assert_eq!(ids(&delivered), acked_ids(&acked));
    steady.expect_nothing_pending().await?;
    let mut resumed = env.connect("bob").await?;
    let answer = resumed.subscribe_since("steady", json!(0)).await?;
    assert_eq!(answer["recovered"], true, "answer: {answer}");
    let replayed = receive(&mut resumed, acked.len()).await.context("resumed subscriber")?;
    assert_eq!(ids(&replayed), acked_ids(&acked));

    // The stream catches up with the store: the relay appends what the killed process committed
    // but did not append. Nothing signals that, so poll the stream within the patience.
    let expected: Vec<u64> = acked.iter().map(|response| response.position).collect();
    let deadline = tokio::time::Instant::now() + patience();
    let mut in_stream = stream_seqs(&e2e::env::redis_url(), &env.id, "steady").await?;
    while in_stream != expected && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        in_stream = stream_seqs(&e2e::env::redis_url(), &env.id, "steady").await?;
    }
    assert_eq!(in_stream, expected);
    Ok(())
}

/// Runs `iterations` resumes while a publisher task publishes on one channel: each round
/// connects, resumes from the last position received, reads a random number of events and
/// disconnects. Returns the positions received and the positions acknowledged.
async fn resume_while_publishing(env: &TestEnv, iterations: usize) -> anyhow::Result<(Vec<u64>, Vec<u64>)> {
    let seed = std::env::var("E2E_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("resume_while_publishing seed: {seed} (set E2E_SEED to repeat)");
    let mut rng = StdRng::seed_from_u64(seed);

    let mut client = env.connect("alice").await?;
    let mut last = client.subscribe("live").await?["position"]
        .as_u64()
        .context("subscribed has a position")?;
    drop(client);

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (mut client, stop) = (env.publisher().await?, stop.clone());
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(1));
        tokio::spawn(async move {
            let mut acked = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let request = keyed("live", &format!(r#"{{"n":{}}}"#, acked.len()), "");
                acked.push(client.publish(request).await?.into_inner().position);
                tokio::time::sleep(Duration::from_micros(rng.random_range(0..4_000))).await;
            }
            anyhow::Ok(acked)
        })
    };

    let mut received = Vec::new();
    for round in 0..iterations {
        let mut client = env.connect("alice").await?;
        let answer = client.subscribe_since("live", json!(last)).await?;
        ensure!(answer["type"] == "subscribed", "round {round}: answer {answer}");
        ensure!(answer["recovered"] == true, "round {round}: answer {answer}");
        let events = receive(&mut client, rng.random_range(1..=5)).await?;
        received.extend(positions(&events));
        last = received.last().copied().unwrap_or(last);
        drop(client);
        tokio::time::sleep(Duration::from_micros(rng.random_range(0..5_000))).await;
    }
    stop.store(true, Ordering::Relaxed);
    let acked = publisher.await??;

    // A last resume collects what was published after the last round.
    let mut client = env.connect("alice").await?;
    client.subscribe_since("live", json!(last)).await?;
    let newest = acked.last().copied().unwrap_or(last);
    while received.last().copied().unwrap_or(last) < newest {
        received.extend(positions(&receive(&mut client, 1).await?));
    }
    Ok((received, acked))
}

e2e_test!(resume_while_publishing_is_seamless, |env| {
    let run = resume_while_publishing(env, 200);
    let (received, acked) = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .context("200 resumes took over 60 s")??;
    assert!(!acked.is_empty(), "nothing was published");
    assert_eq!(received.len(), acked.len(), "received and acknowledged counts differ");
    assert_eq!(received, acked);
    Ok(())
});
