//! Publishers. The open-loop publisher sends on a fixed schedule and puts each event's intended
//! send time in its payload. A slow acknowledgement therefore never delays the next event, and
//! latency counts from when the event should have left, not from when it did. The closed-loop publisher
//! measures how many durable publishes per second the notifier acknowledges.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use notify_proto::pb::notifier_client::NotifierClient;
use notify_proto::pb::publish_result;
use notify_proto::pb::{PublishBatchRequest, PublishRequest};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use crate::stats::{latency_histogram, record_latency};

/// Event type of every benchmark event.
pub const EVENT_TYPE: &str = "bench";
/// How long the open-loop publisher waits for outstanding acknowledgements after the last send.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The payload of a benchmark event.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Payload {
    /// Intended send time, in microseconds since the Unix epoch.
    pub sent_at_us: u64,
    /// Publisher tick, from 0; the same on every channel for one tick.
    pub seq: u64,
}

/// Publish target.
#[derive(Debug, Clone, Copy)]
pub enum PublishTarget {
    /// The notifier's gRPC `Publish`.
    Grpc(SocketAddr),
    /// The ceiling server's trigger port: one JSON object per line, never acknowledged.
    Trigger(SocketAddr),
}

/// An open-loop schedule: `events` ticks at `rate` ticks per second, one event per channel per
/// tick.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Ticks per second.
    pub rate: f64,
    /// Number of ticks.
    pub events: u64,
    /// Channels that get one event each tick.
    pub channels: Vec<String>,
}

/// Report of the open-loop publisher.
pub struct OpenLoopReport {
    /// Acknowledged sequence numbers per channel, in the order of [`OpenLoop::channels`].
    pub acked: Vec<Vec<u64>>,
    /// Publishes that failed or were not acknowledged within [`ACK_TIMEOUT`].
    pub failures: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// Acknowledgement latency from the intended send time, in microseconds.
    pub ack_latency: Histogram<u64>,
    /// When the first tick was due.
    pub started: Instant,
    /// When the last acknowledgement arrived.
    pub finished: Instant,
}

impl OpenLoopReport {
    /// Returns the number of acknowledged events over all channels.
    pub fn acked_count(&self) -> u64 {
        self.acked.iter().map(|seqs| seqs.len() as u64).sum()
    }
}

/// Result of one publish: channel index, sequence number, and acknowledgement latency or error.
type Outcome = (usize, u64, Result<u64, String>);

/// Runs an open-loop schedule. `next_tick` is set to each tick's number just before it is sent,
/// so a caller can tell which ticks came after a moment.
///
/// # Errors
/// Fails when the target cannot be reached at the start, or the schedule is invalid.
pub async fn run_open_loop(
    target: PublishTarget,
    plan: &OpenLoop,
    next_tick: Arc<AtomicU64>,
) -> anyhow::Result<OpenLoopReport> {
    if !(plan.rate > 0.0 && plan.rate.is_finite()) {
        bail!("the publish rate must be a positive number, not {}", plan.rate);
    }
    let period = Duration::from_secs_f64(1.0 / plan.rate);
    let mut sender = Sender::connect(target).await?;
    let mut in_flight: JoinSet<Outcome> = JoinSet::new();
    let mut outcomes = Vec::new();
    let started = Instant::now();
    let wall_start_us = crate::unix_micros();

    for seq in 0..plan.events {
        // Sleep until this tick is due; a late tick is sent at once with its intended time.
        let offset = period.saturating_mul(u32::try_from(seq).unwrap_or(u32::MAX));
        tokio::time::sleep_until((started + offset).into()).await;
        next_tick.store(seq, Ordering::Relaxed);
        let payload = Payload {
            sent_at_us: wall_start_us + offset.as_micros() as u64,
            seq,
        };
        let data = serde_json::to_string(&payload)?;
        for (index, channel) in plan.channels.iter().enumerate() {
            sender.send(&mut in_flight, index, channel, &data, payload).await;
        }
        while let Some(Ok(outcome)) = in_flight.try_join_next() {
            outcomes.push(outcome);
        }
    }
    next_tick.store(plan.events, Ordering::Relaxed);

    // Collect the outstanding acknowledgements, bounded by ACK_TIMEOUT.
    let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, in_flight.join_next()).await {
        if let Ok(outcome) = joined {
            outcomes.push(outcome);
        }
    }
    let unfinished = in_flight.len() as u64;
    in_flight.abort_all();
    let mut report = summarize(plan.channels.len(), outcomes, started);
    report.failures += unfinished;
    Ok(report)
}

fn summarize(channels: usize, outcomes: Vec<Outcome>, started: Instant) -> OpenLoopReport {
    let mut report = OpenLoopReport {
        acked: vec![Vec::new(); channels],
        failures: 0,
        errors: Vec::new(),
        ack_latency: latency_histogram(),
        started,
        finished: Instant::now(),
    };
    for (channel, seq, result) in outcomes {
        match result {
            Ok(latency) => {
                report.acked[channel].push(seq);
                record_latency(&mut report.ack_latency, latency);
            }
            Err(error) => {
                report.failures += 1;
                if report.errors.len() < 5 {
                    report.errors.push(error);
                }
            }
        }
    }
    for seqs in &mut report.acked {
        seqs.sort_unstable();
    }
    report
}

/// The connection an open-loop publisher sends on.
enum Sender {
    Grpc(NotifierClient<Channel>),
    Trigger(TcpStream),
}

impl Sender {
    async fn connect(target: PublishTarget) -> anyhow::Result<Self> {
        match target {
            PublishTarget::Grpc(addr) => {
                check_loopback(addr)?;
                let client = NotifierClient::connect(format!("http://{addr}"))
                    .await
                    .with_context(|| format!("connect to the notifier at {addr}"))?;
                Ok(Self::Grpc(client))
            }
            PublishTarget::Trigger(addr) => {
                check_loopback(addr)?;
                let stream = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connect to the ceiling trigger at {addr}"))?;
                stream.set_nodelay(true)?;
                Ok(Self::Trigger(stream))
            }
        }
    }

    /// Sends one event. A gRPC publish runs as a task of its own, so the schedule does not wait
    /// for its acknowledgement. A trigger line counts as acknowledged once written.
    async fn send(
        &mut self,
        in_flight: &mut JoinSet<Outcome>,
        index: usize,
        channel: &str,
        data: &str,
        payload: Payload,
    ) {
        match self {
            Self::Grpc(client) => {
                let mut client = client.clone();
                let request = PublishRequest {
                    channel: channel.to_owned(),
                    r#type: EVENT_TYPE.to_owned(),
                    data: data.to_owned(),
                    ..PublishRequest::default()
                };
                in_flight.spawn(async move {
                    let result = client.publish(request).await;
                    let latency = crate::unix_micros().saturating_sub(payload.sent_at_us);
                    (
                        index,
                        payload.seq,
                        result.map(|_| latency).map_err(|status| status.to_string()),
                    )
                });
            }
            Self::Trigger(stream) => {
                let line = format!("{{\"channel\":{channel:?},\"type\":\"{EVENT_TYPE}\",\"data\":{data}}}\n");
                let result = stream.write_all(line.as_bytes()).await;
                let latency = crate::unix_micros().saturating_sub(payload.sent_at_us);
                let outcome = result.map(|()| latency).map_err(|error| error.to_string());
                in_flight.spawn(async move { (index, payload.seq, outcome) });
            }
        }
    }
}

fn check_loopback(addr: SocketAddr) -> anyhow::Result<()> {
    if !addr.ip().is_loopback() {
        bail!("benchmarks only publish to loopback addresses, not {addr}");
    }
    Ok(())
}

/// A closed-loop throughput run: `concurrency` workers each publish, wait for the
/// acknowledgement and publish again, until `events` were sent or `max_duration` passed.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    /// Publishes in flight at once.
    pub concurrency: usize,
    /// Events per call; more than 1 sends PublishBatch calls.
    pub batch: usize,
    /// HTTP/2 connections the workers share, round-robin.
    pub connections: usize,
    /// Total publishes.
    pub events: u64,
    /// Time limit.
    pub max_duration: Duration,
    /// Channels, used round-robin.
    pub channels: Vec<String>,
}

impl ClosedLoop {
    /// Returns the publish request of sequence number `seq`, on the channels round-robin.
    fn request(&self, seq: u64) -> PublishRequest {
        let payload = Payload {
            sent_at_us: crate::unix_micros(),
            seq,
        };
        PublishRequest {
            channel: self.channels[seq as usize % self.channels.len()].clone(),
            r#type: EVENT_TYPE.to_owned(),
            data: serde_json::to_string(&payload).unwrap_or_default(),
            ..PublishRequest::default()
        }
    }
}

/// Report of the closed-loop publisher.
pub struct ClosedLoopReport {
    /// Acknowledged publishes.
    pub acked: u64,
    /// Failed publishes.
    pub failures: u64,
    /// The first few failure messages.
    pub errors: Vec<String>,
    /// Acknowledgement latency from the call to its response, in microseconds.
    pub latency: Histogram<u64>,
    /// Time from the first call to the last response.
    pub elapsed: Duration,
}

impl ClosedLoopReport {
    fn empty() -> Self {
        Self {
            acked: 0,
            failures: 0,
            errors: Vec::new(),
            latency: latency_histogram(),
            elapsed: Duration::ZERO,
        }
    }
}

/// Runs a closed-loop throughput measurement against the notifier at `addr`.
///
/// # Errors
/// Fails when the notifier cannot be reached.
pub async fn run_closed_loop(addr: SocketAddr, plan: &ClosedLoop) -> anyhow::Result<ClosedLoopReport> {
    check_loopback(addr)?;
    if plan.channels.is_empty() || plan.concurrency == 0 || plan.connections == 0 {
        bail!("throughput needs at least one channel, worker and connection");
    }
    let mut clients = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        let client = NotifierClient::connect(format!("http://{addr}"))
            .await
            .with_context(|| format!("connect to the notifier at {addr}"))?;
        clients.push(client);
    }

    let issued = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = JoinSet::new();
    for worker in 0..plan.concurrency {
        let client = clients[worker % clients.len()].clone();
        workers.spawn(publish_until_done(client, plan.clone(), issued.clone(), started));
    }
    let mut report = ClosedLoopReport::empty();
    while let Some(joined) = workers.join_next().await {
        let worker = joined.context("a publish worker panicked")?;
        report.acked += worker.acked;
        report.failures += worker.failures;
        let _ = report.latency.add(&worker.latency);
        report.errors.extend(worker.errors);
    }
    report.errors.truncate(5);
    report.elapsed = started.elapsed();
    Ok(report)
}

/// Publishes in a closed loop until the shared count reaches the plan's total or time runs out.
async fn publish_until_done(
    mut client: NotifierClient<Channel>,
    plan: ClosedLoop,
    issued: Arc<AtomicU64>,
    started: Instant,
) -> ClosedLoopReport {
    let mut report = ClosedLoopReport::empty();
    let batch = plan.batch.max(1) as u64;
    loop {
        let first = issued.fetch_add(batch, Ordering::Relaxed);
        if first >= plan.events || started.elapsed() >= plan.max_duration {
            return report;
        }
        let requests: Vec<PublishRequest> = (first..plan.events.min(first + batch))
            .map(|seq| plan.request(seq))
            .collect();
        let call_started = Instant::now();
        let outcomes = if batch == 1 {
            publish_one(&mut client, requests).await
        } else {
            publish_batch(&mut client, requests).await
        };
        let latency = call_started.elapsed().as_micros() as u64;
        for outcome in outcomes {
            match outcome {
                Ok(()) => {
                    report.acked += 1;
                    record_latency(&mut report.latency, latency);
                }
                Err(error) => {
                    report.failures += 1;
                    if report.errors.len() < 5 {
                        report.errors.push(error);
                    }
                }
            }
        }
    }
}

/// Sends each request in a Publish call of its own.
async fn publish_one(client: &mut NotifierClient<Channel>, requests: Vec<PublishRequest>) -> Vec<Result<(), String>> {
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        outcomes.push(
            client
                .publish(request)
                .await
                .map(drop)
                .map_err(|status| status.to_string()),
        );
    }
    outcomes
}

/// Sends the requests in one PublishBatch call and returns each event's outcome.
async fn publish_batch(client: &mut NotifierClient<Channel>, events: Vec<PublishRequest>) -> Vec<Result<(), String>> {
    let count = events.len();
    match client.publish_batch(PublishBatchRequest { events }).await {
        Ok(response) => response
            .into_inner()
            .results
            .into_iter()
            .map(|result| match result.outcome {
                Some(publish_result::Outcome::Published(_)) => Ok(()),
                Some(publish_result::Outcome::Error(error)) => Err(format!("code {}: {}", error.code, error.message)),
                None => Err("a result without an outcome".to_owned()),
            })
            .collect(),
        Err(status) => vec![Err(status.to_string()); count],
    }
}
