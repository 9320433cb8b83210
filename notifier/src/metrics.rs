//! The notifier's Prometheus metrics, registered under `notify_notifier_*`. Every label value is
//! one of a fixed set of strings defined here; none carries a channel, a user or a caller.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use notify_proto::metrics::{LATENCY_BUCKETS, MetricsRegistry, Registry};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Unit;
use tonic::Code;

use crate::committer::QueueWatch;
use crate::error::Error;

/// Sub-registry of the notifier's metrics: names start with `notify_notifier_`.
pub const SERVICE: &str = "notifier";

/// Label set of a publish's outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// Outcome of a publish.
    pub result: &'static str,
}

/// Label set naming the store or stream call that failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    /// The failed call, such as `commit` or `append`.
    pub operation: &'static str,
}

/// `result` values of `publish_requests_total`.
pub mod publish_result {
    /// Stored and acknowledged.
    pub const OK: &str = "ok";
    /// A retry within the idempotency window; the first event was returned.
    pub const DUPLICATE: &str = "duplicate";
    /// The request broke a validation rule.
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    /// No API key, or an unknown one.
    pub const UNAUTHENTICATED: &str = "unauthenticated";
    /// The API key may not publish to the channel.
    pub const PERMISSION_DENIED: &str = "permission_denied";
    /// The caller exceeded `PUBLISH_RATE`.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// The partition's publish queue was full.
    pub const QUEUE_FULL: &str = "queue_full";
    /// The idempotency key was used for other content.
    pub const IDEMPOTENCY_CONFLICT: &str = "idempotency_conflict";
    /// The commit failed.
    pub const STORE_UNAVAILABLE: &str = "store_unavailable";
    /// The notifier was draining.
    pub const SHUTTING_DOWN: &str = "shutting_down";
    /// An earlier event of the channel in the same `PublishBatch` call failed.
    pub const ABORTED: &str = "aborted";
    /// Any other gRPC error.
    pub const OTHER: &str = "other";
    /// The caller went away (cancelled, or its deadline passed) before the reply. Its event may
    /// still have been stored and delivered.
    pub const CANCELLED: &str = "cancelled";
}

/// `operation` values of `store_errors_total` and `stream_errors_total`.
pub mod operation {
    /// A publish batch's transaction.
    pub const COMMIT: &str = "commit";
    /// A History call's read.
    pub const HISTORY: &str = "history";
    /// A read of a partition's events, for ReadPartition or the relay.
    pub const READ_PARTITION: &str = "read_partition";
    /// A read of the partition heads, for Heads or the relay.
    pub const HEADS: &str = "heads";
    /// The retention sweeper's deletes.
    pub const RETENTION: &str = "retention";
    /// An append of events to the stream (`XADD`).
    pub const APPEND: &str = "append";
    /// A read of a stream's last entry (`XREVRANGE`).
    pub const LAST_SEQ: &str = "last_seq";
}

/// The notifier's metrics. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    publish_requests: Family<ResultLabel, Counter>,
    publish_duration: Histogram,
    store_errors: Family<OperationLabel, Counter>,
    stream_errors: Family<OperationLabel, Counter>,
    /// Events committed but not yet in the stream, in the partitions the relay owns, as of the
    /// relay's last sweep.
    pub relay_backlog: Gauge,
    /// Partitions the relay owns, whose committers do not append.
    pub relay_partitions: Gauge,
    /// Events the relay appended.
    pub relay_appended: Counter,
    /// Connections to the HTTP listener closed because `MAX_METRICS_CONNECTIONS` were open.
    pub http_connections_rejected: Counter,
    queues: Arc<QueueDepth>,
}

impl Default for Metrics {
    /// Creates metrics that no registry encodes, for tests.
    fn default() -> Self {
        Self {
            publish_requests: Family::default(),
            publish_duration: Histogram::new(LATENCY_BUCKETS),
            store_errors: Family::default(),
            stream_errors: Family::default(),
            relay_backlog: Gauge::default(),
            relay_partitions: Gauge::default(),
            relay_appended: Counter::default(),
            http_connections_rejected: Counter::default(),
            queues: Arc::default(),
        }
    }
}

impl Metrics {
    /// Creates the metrics and registers them in `registry` under [`SERVICE`].
    pub fn register(registry: &MetricsRegistry) -> Self {
        let metrics = Self::default();
        registry.register(SERVICE, |registry| metrics.register_in(registry));
        metrics
    }

    fn register_in(&self, registry: &mut Registry) {
        registry.register(
            "publish_requests",
            "Publish calls by result",
            self.publish_requests.clone(),
        );
        registry.register_with_unit(
            "publish_duration",
            "Time from receiving a Publish call to its reply, for calls that stored an event or found its duplicate",
            Unit::Seconds,
            self.publish_duration.clone(),
        );
        registry.register(
            "store_errors",
            "Failed calls to the store of record, by operation",
            self.store_errors.clone(),
        );
        registry.register(
            "stream_errors",
            "Failed calls to the event stream (Redis), by operation",
            self.stream_errors.clone(),
        );
        registry.register(
            "http_connections_rejected",
            "Connections to the probes and metrics listener closed at once because too many were open",
            self.http_connections_rejected.clone(),
        );
        registry.register(
            "relay_backlog_events",
            "Events committed but not yet appended to the stream in the partitions the relay owns, as of its last sweep",
            self.relay_backlog.clone(),
        );
        registry.register(
            "relay_partitions",
            "Partitions whose appends the relay has taken over from their committer",
            self.relay_partitions.clone(),
        );
        registry.register(
            "relay_appended_events",
            "Events the relay appended to the stream from the store",
            self.relay_appended.clone(),
        );
        registry.register_collector(Box::new(self.queues.clone()));
    }

    /// Counts a publish call and, when it stored an event, observes its duration.
    pub fn record_publish(&self, result: &'static str, elapsed: Duration) {
        self.publish_requests.get_or_create(&ResultLabel { result }).inc();
        if result == publish_result::OK || result == publish_result::DUPLICATE {
            self.publish_duration.observe(elapsed.as_secs_f64());
        }
    }

    /// Counts `events` publishes that were rejected together, such as the events of a
    /// `PublishBatch` call without a valid API key.
    pub fn reject_publishes(&self, result: &'static str, events: usize) {
        let counter = self.publish_requests.get_or_create(&ResultLabel { result });
        counter.inc_by(events as u64);
    }

    /// Starts counting one publish call: [`PublishCall::finish`] records its result, and a call
    /// dropped before that, because its caller went away, counts as `cancelled`.
    pub fn publish_call(&self) -> PublishCall<'_> {
        PublishCall {
            metrics: self,
            received: std::time::Instant::now(),
            finished: false,
        }
    }

    /// Counts a failed call to the store of record.
    pub fn store_error(&self, operation: &'static str) {
        self.store_errors.get_or_create(&OperationLabel { operation }).inc();
    }

    /// Counts a failed call to the event stream.
    pub fn stream_error(&self, operation: &'static str) {
        self.stream_errors.get_or_create(&OperationLabel { operation }).inc();
    }

    /// Reports the depth of these publish queues on each scrape. Only the first call has effect.
    pub fn watch_queues(&self, queues: QueueWatch) {
        let _ = self.queues.watch.set(queues);
    }
}

/// One publish call being counted; see [`Metrics::publish_call`].
pub struct PublishCall<'a> {
    metrics: &'a Metrics,
    received: std::time::Instant,
    finished: bool,
}

impl PublishCall<'_> {
    /// Records the call's result and its duration.
    pub fn finish(mut self, result: &'static str) {
        self.metrics.record_publish(result, self.received.elapsed());
        self.finished = true;
    }
}

impl Drop for PublishCall<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics
                .record_publish(publish_result::CANCELLED, self.received.elapsed());
        }
    }
}

/// Returns the `result` label of a failed publish.
pub fn error_result(err: &Error) -> &'static str {
    match err {
        Error::InvalidArgument(_) => publish_result::INVALID_ARGUMENT,
        Error::QueueFull { .. } => publish_result::QUEUE_FULL,
        Error::RateLimited { .. } => publish_result::RATE_LIMITED,
        Error::IdempotencyConflict { .. } => publish_result::IDEMPOTENCY_CONFLICT,
        Error::PermissionDenied(_) => publish_result::PERMISSION_DENIED,
        Error::EarlierEventFailed { .. } => publish_result::ABORTED,
        Error::StoreUnavailable => publish_result::STORE_UNAVAILABLE,
        Error::ShuttingDown => publish_result::SHUTTING_DOWN,
        Error::History(_) => publish_result::OTHER,
    }
}

/// Returns the `result` label of a publish that the authentication step rejected.
pub fn status_result(code: Code) -> &'static str {
    match code {
        Code::Unauthenticated => publish_result::UNAUTHENTICATED,
        Code::PermissionDenied => publish_result::PERMISSION_DENIED,
        Code::InvalidArgument => publish_result::INVALID_ARGUMENT,
        _ => publish_result::OTHER,
    }
}

/// Reads the publish queues' depth at scrape time, so that queuing a request costs nothing extra.
#[derive(Debug, Default)]
struct QueueDepth {
    watch: OnceLock<QueueWatch>,
}

impl Collector for QueueDepth {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(watch) = self.watch.get() else {
            return Ok(());
        };
        let depths = watch.depths();
        let gauges = [
            (
                "publish_queue_depth",
                "Publish requests waiting in all partitions' queues",
                depths.iter().sum::<usize>(),
            ),
            (
                "publish_queue_depth_max",
                "Publish requests waiting in the fullest partition's queue",
                depths.iter().copied().max().unwrap_or(0),
            ),
            (
                "publish_queue_capacity",
                "Capacity of each partition's publish queue (PUBLISH_QUEUE)",
                watch.capacity(),
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value as i64);
            let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
            gauge.encode(metric)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_count_by_result() {
        let registry = MetricsRegistry::new();
        let metrics = Metrics::register(&registry);
        metrics.record_publish(publish_result::OK, Duration::from_millis(3));
        metrics.record_publish(error_result(&Error::QueueFull { partition: 1 }), Duration::ZERO);
        metrics.record_publish(status_result(Code::Unauthenticated), Duration::ZERO);
        metrics.store_error(operation::COMMIT);
        let text = registry.encode();
        for line in [
            "notify_notifier_publish_requests_total{result=\"ok\"} 1",
            "notify_notifier_publish_requests_total{result=\"queue_full\"} 1",
            "notify_notifier_publish_requests_total{result=\"unauthenticated\"} 1",
            "notify_notifier_publish_duration_seconds_count 1",
            "notify_notifier_publish_duration_seconds_bucket{le=\"0.005\"} 1",
            "notify_notifier_publish_duration_seconds_bucket{le=\"0.0025\"} 0",
            "notify_notifier_store_errors_total{operation=\"commit\"} 1",
        ] {
            assert!(text.lines().any(|got| got == line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn dropped_publish_call_counts_as_cancelled() {
        let registry = MetricsRegistry::new();
        let metrics = Metrics::register(&registry);
        metrics.publish_call().finish(publish_result::OK);
        drop(metrics.publish_call());
        let text = registry.encode();
        for line in [
            "notify_notifier_publish_requests_total{result=\"ok\"} 1",
            "notify_notifier_publish_requests_total{result=\"cancelled\"} 1",
            "notify_notifier_publish_duration_seconds_count 1",
        ] {
            assert!(text.lines().any(|got| got == line), "missing {line:?} in\n{text}");
        }
    }
}
