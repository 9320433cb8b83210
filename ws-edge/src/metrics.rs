//! The edge's Prometheus metrics, registered under `notify_edge_*`. Every label value is one of
//! a fixed set of strings defined here, or a partition number below `STREAM_PARTITIONS`. None
//! carries a channel, a user or a client address.
//!
//! The fan-out counts per delivered batch, not per frame: [`crate::hub::Hub::deliver`] adds up
//! the frames it queued and calls [`Counter::inc_by`] once. Gauges that other state already
//! tracks (open sockets, JWKS fetches, stream lag) are read when Prometheus scrapes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use notify_proto::metrics::{LATENCY_BUCKETS, MetricsRegistry, Registry};
use notify_proto::protocol::close;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;

use crate::admission::Admission;
use crate::jwks::Jwks;

/// Sub-registry of the edge's metrics: names start with `notify_edge_`.
pub const SERVICE: &str = "edge";

/// Label set naming why something was rejected or dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// One of the `reason` constants of this module.
    pub reason: &'static str,
}

/// Label set of a closed socket: why, and the close code sent (`none` when no close frame was).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// One of [`close_reason`]'s values.
    pub reason: &'static str,
    /// The close code as a decimal string, or `none`.
    pub code: &'static str,
}

/// Label set naming the failed call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// One of the [`operation`] constants.
    pub operation: &'static str,
}

/// Label set naming one of the edge's HTTP listeners.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    /// One of the [`listener`] constants.
    pub listener: &'static str,
}

/// `listener` values of `http_connections_rejected_total`.
pub mod listener {
    /// The HTTP and WebSocket port, `EDGE_LISTEN`.
    pub const HTTP: &str = "http";
    /// The metrics port, `EDGE_METRICS_LISTEN`.
    pub const METRICS: &str = "metrics";
}

/// `reason` values of `upgrades_rejected_total`.
pub mod upgrade_rejected {
    /// HTTP 429: over `HANDSHAKE_RATE`.
    pub const HANDSHAKE_RATE: &str = "handshake_rate";
    /// HTTP 503: `MAX_SOCKETS` sockets open.
    pub const MAX_SOCKETS: &str = "max_sockets";
    /// HTTP 403: the `Origin` is not allowed.
    pub const ORIGIN: &str = "origin";
    /// HTTP 503: the edge is draining.
    pub const DRAINING: &str = "draining";
    /// HTTP 503: `MAX_UNAUTHENTICATED_SOCKETS` sockets wait for their `auth` frame.
    pub const UNAUTHENTICATED: &str = "unauthenticated";
}

/// `operation` values of `stream_errors_total` and `store_errors_total`.
pub mod operation {
    /// A blocking read of the stream (`XREAD`).
    pub const READ: &str = "read";
    /// The partition heads, read from the notifier at start.
    pub const HEADS: &str = "heads";
    /// A page of a partition read from the notifier to fill a gap.
    pub const READ_PARTITION: &str = "read_partition";
    /// A replay for a resuming subscription, from the stream or the store.
    pub const REPLAY: &str = "replay";
}

/// Socket close reason `client_closed`: the client closed the socket or its connection ended.
pub const CLIENT_CLOSED: &str = "client_closed";
/// Socket close reason `write_failed`: a write failed or timed out, so the socket was dropped.
pub const WRITE_FAILED: &str = "write_failed";
/// Socket close reason `max_sockets_per_user`: the user had `MAX_SOCKETS_PER_USER` sockets.
pub const MAX_SOCKETS_PER_USER: &str = "max_sockets_per_user";

/// Returns the `reason` label of a close code the edge sends.
pub fn close_reason(code: u16) -> &'static str {
    match code {
        close::NO_TOKEN => "no_token",
        close::INVALID_TOKEN => "invalid_token",
        close::TOKEN_EXPIRED => "token_expired",
        close::SLOW_CONSUMER => "slow_consumer",
        close::RATE_LIMITED => "rate_limited",
        close::MESSAGE_TOO_BIG => "message_too_big",
        close::PROTOCOL_ERROR => "protocol_error",
        close::INVALID_PAYLOAD => "invalid_payload",
        close::SERVICE_RESTART => "server_restart",
        crate::writer::IDLE_CLOSE_CODE => "idle_timeout",
        _ => "other",
    }
}

/// Returns the `code` label of a close code the edge sends.
fn close_code(code: u16) -> &'static str {
    match code {
        close::NO_TOKEN => "4001",
        close::INVALID_TOKEN => "4002",
        close::TOKEN_EXPIRED => "4003",
        close::SLOW_CONSUMER => "4008",
        close::RATE_LIMITED => "4029",
        close::MESSAGE_TOO_BIG => "1009",
        close::PROTOCOL_ERROR => "1002",
        close::INVALID_PAYLOAD => "1007",
        close::SERVICE_RESTART => "1012",
        crate::writer::IDLE_CLOSE_CODE => "1001",
        close::INTERNAL_ERROR => "1011",
        _ => "other",
    }
}

/// The edge's metrics.
#[derive(Debug)]
pub struct Metrics {
    upgrades_rejected: Family<ReasonLabel, Counter>,
    http_connections_rejected: Family<ListenerLabel, Counter>,
    sockets_closed: Family<CloseLabels, Counter>,
    /// Client messages dropped by a message rate limit.
    pub messages_dropped_rate_limited: Counter,
    /// Event frames discarded when a socket's queue or recovery buffer overflowed.
    pub frames_dropped_slow_consumer: Counter,
    /// Queued event frames replaced by a newer one with the same conflation key.
    pub frames_dropped_conflated: Counter,
    /// Event frames the live fan-out queued to sockets.
    pub events_delivered: Counter,
    /// Subscriptions registered in the hub.
    pub subscriptions: Gauge,
    commit_to_delivery: Histogram,
    stream_errors: Family<OperationLabel, Counter>,
    store_errors: Family<OperationLabel, Counter>,
    scraped: Arc<Scraped>,
}

impl Metrics {
    /// Creates metrics for `partitions` partitions that no registry encodes, for tests.
    pub fn new(partitions: u32) -> Self {
        let frames_dropped = Family::<ReasonLabel, Counter>::default();
        let messages_dropped = Family::<ReasonLabel, Counter>::default();
        let scraped = Scraped {
            frames_dropped: frames_dropped.clone(),
            messages_dropped: messages_dropped.clone(),
            lag_micros: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            admission: OnceLock::new(),
            jwks: OnceLock::new(),
        };
        Self {
            upgrades_rejected: Family::default(),
            http_connections_rejected: Family::default(),
            sockets_closed: Family::default(),
            messages_dropped_rate_limited: messages_dropped
                .get_or_create_owned(&ReasonLabel { reason: "rate_limited" }),
            frames_dropped_slow_consumer: frames_dropped.get_or_create_owned(&ReasonLabel {
                reason: "slow_consumer",
            }),
            frames_dropped_conflated: frames_dropped.get_or_create_owned(&ReasonLabel { reason: "conflated" }),
            events_delivered: Counter::default(),
            subscriptions: Gauge::default(),
            commit_to_delivery: Histogram::new(LATENCY_BUCKETS),
            stream_errors: Family::default(),
            store_errors: Family::default(),
            scraped: Arc::new(scraped),
        }
    }

    /// Creates the metrics for `partitions` partitions and registers them in `registry` under
    /// [`SERVICE`].
    pub fn register(registry: &MetricsRegistry, partitions: u32) -> Self {
        let metrics = Self::new(partitions);
        registry.register(SERVICE, |registry| metrics.register_in(registry));
        metrics
    }

    fn register_in(&self, registry: &mut Registry) {
        registry.register(
            "upgrades_rejected",
            "WebSocket upgrades rejected before the handshake, by reason",
            self.upgrades_rejected.clone(),
        );
        registry.register(
            "http_connections_rejected",
            "Connections closed at once because the listener had its maximum of open HTTP connections, by listener",
            self.http_connections_rejected.clone(),
        );
        registry.register(
            "sockets_closed",
            "Authenticated and rejected sockets that ended, by reason and the close code the edge sent",
            self.sockets_closed.clone(),
        );
        registry.register(
            "events_delivered",
            "Event frames the live fan-out queued to sockets, one per event and recipient socket",
            self.events_delivered.clone(),
        );
        registry.register(
            "subscriptions",
            "Channel subscriptions of the open sockets",
            self.subscriptions.clone(),
        );
        registry.register_with_unit(
            "commit_to_delivery",
            "Time from an event's commit (its ts_ms, the notifier's clock) to its delivery to the edge's hub",
            Unit::Seconds,
            self.commit_to_delivery.clone(),
        );
        registry.register(
            "stream_errors",
            "Failed reads of the event stream (Redis), by operation",
            self.stream_errors.clone(),
        );
        registry.register(
            "store_errors",
            "Failed reads of the store of record through the notifier, by operation",
            self.store_errors.clone(),
        );
        registry.register_collector(Box::new(self.scraped.clone()));
    }

    /// Reports the open sockets of `admission` and the fetches of `jwks` on each scrape. Only
    /// the first call has effect.
    pub fn watch(&self, admission: Arc<Admission>, jwks: Option<Arc<Jwks>>) {
        let _ = self.scraped.admission.set(admission);
        if let Some(jwks) = jwks {
            let _ = self.scraped.jwks.set(jwks);
        }
    }

    /// Counts an upgrade rejected before the handshake.
    pub fn upgrade_rejected(&self, reason: &'static str) {
        self.upgrades_rejected.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Returns the counter of connections that `listener` (one of the [`listener`] constants)
    /// closed because it had its maximum of open HTTP connections.
    pub fn http_connections_rejected(&self, listener: &'static str) -> Counter {
        self.http_connections_rejected
            .get_or_create_owned(&ListenerLabel { listener })
    }

    /// Counts a socket that ended with close `code`, for the reason its code stands for.
    pub fn socket_closed(&self, code: u16) {
        self.socket_ended(close_reason(code), Some(code));
    }

    /// Counts a socket that ended for `reason`, after the close frame `code` or none.
    pub fn socket_ended(&self, reason: &'static str, code: Option<u16>) {
        let code = code.map_or("none", close_code);
        self.sockets_closed.get_or_create(&CloseLabels { reason, code }).inc();
    }

    /// Observes the commit-to-delivery time of events committed at `committed_ms` and records
    /// the partition's read lag: the time since the newest event of the batch was committed.
    pub fn delivered(&self, partition: u32, committed_ms: impl Iterator<Item = i64>) {
        let mut newest = None;
        for committed in committed_ms {
            let seconds = notify_proto::metrics::seconds_since_unix_ms(committed);
            self.commit_to_delivery.observe(seconds);
            newest = Some(seconds);
        }
        if let (Some(seconds), Some(lag)) = (newest, self.scraped.lag_micros.get(partition as usize)) {
            lag.store((seconds * 1e6) as u64, Ordering::Relaxed);
        }
    }

    /// Counts a failed read of the event stream.
    pub fn stream_error(&self, operation: &'static str) {
        self.stream_errors.get_or_create(&OperationLabel { operation }).inc();
    }

    /// Counts a failed read of the store of record.
    pub fn store_error(&self, operation: &'static str) {
        self.store_errors.get_or_create(&OperationLabel { operation }).inc();
    }
}

/// The metrics read or encoded at scrape time.
struct Scraped {
    frames_dropped: Family<ReasonLabel, Counter>,
    messages_dropped: Family<ReasonLabel, Counter>,
    /// Each partition's read lag at its last delivered batch, in microseconds.
    lag_micros: Box<[AtomicU64]>,
    admission: OnceLock<Arc<Admission>>,
    jwks: OnceLock<Arc<Jwks>>,
}

impl std::fmt::Debug for Scraped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scraped")
            .field("partitions", &self.lag_micros.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabel {
    partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

impl Collector for Scraped {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Families registered here rather than in the registry, so that they share this
        // collector's lifetime; their series exist from the start, at 0.
        let help = "Event frames dropped without reaching the client, by reason";
        let metric = encoder.encode_descriptor("frames_dropped", help, None, self.frames_dropped.metric_type())?;
        self.frames_dropped.encode(metric)?;
        let help = "Client messages the edge dropped, by reason";
        let metric = encoder.encode_descriptor("messages_dropped", help, None, self.messages_dropped.metric_type())?;
        self.messages_dropped.encode(metric)?;

        if let Some(admission) = self.admission.get() {
            let sockets = ConstGauge::new(admission.sockets() as i64);
            let help = "Open WebSocket connections, authenticated or not";
            let metric = encoder.encode_descriptor("sockets_open", help, None, sockets.metric_type())?;
            sockets.encode(metric)?;
        }

        let help = "Time from the commit of the newest event in a partition's last delivered batch to its delivery; \
                    kept until the next batch";
        let gauge = ConstGauge::new(0.0);
        let mut family =
            encoder.encode_descriptor("stream_read_lag", help, Some(&Unit::Seconds), gauge.metric_type())?;
        for (partition, lag) in self.lag_micros.iter().enumerate() {
            let labels = PartitionLabel {
                partition: partition as u32,
            };
            let seconds = lag.load(Ordering::Relaxed) as f64 / 1e6;
            ConstGauge::new(seconds).encode(family.encode_family(&labels)?)?;
        }

        if let Some(jwks) = self.jwks.get() {
            let (succeeded, failed) = jwks.fetch_results();
            let help = "Fetches of the identity provider's key set (JWKS_URL), by result";
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor("jwks_fetches", help, None, counter.metric_type())?;
            for (result, count) in [("ok", succeeded), ("error", failed)] {
                ConstCounter::new(count).encode(family.encode_family(&ResultLabel { result })?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_count_by_reason_and_code() {
        let registry = MetricsRegistry::new();
        let metrics = Metrics::register(&registry, 2);
        metrics.socket_closed(close::SLOW_CONSUMER);
        metrics.socket_ended(MAX_SOCKETS_PER_USER, Some(close::RATE_LIMITED));
        metrics.socket_ended(CLIENT_CLOSED, None);
        metrics.frames_dropped_slow_consumer.inc_by(3);
        metrics.delivered(1, [0].into_iter());
        let text = registry.encode();
        for line in [
            "notify_edge_sockets_closed_total{reason=\"slow_consumer\",code=\"4008\"} 1",
            "notify_edge_sockets_closed_total{reason=\"max_sockets_per_user\",code=\"4029\"} 1",
            "notify_edge_sockets_closed_total{reason=\"client_closed\",code=\"none\"} 1",
            "notify_edge_frames_dropped_total{reason=\"slow_consumer\"} 3",
            "notify_edge_frames_dropped_total{reason=\"conflated\"} 0",
            "notify_edge_stream_read_lag_seconds{partition=\"0\"} 0.0",
            "notify_edge_commit_to_delivery_seconds_count 1",
        ] {
            assert!(text.lines().any(|got| got == line), "missing {line:?} in\n{text}");
        }
        let lag = text
            .lines()
            .find(|line| line.starts_with("notify_edge_stream_read_lag_seconds{partition=\"1\"}"))
            .expect("partition 1 has a lag");
        assert!(!lag.ends_with(" 0.0"), "{lag}");
    }
}
