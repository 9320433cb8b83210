//! The `deliver` span of one event on this edge, while spans are exported.
//!
//! The span is a child of the notifier's `publish` span, whose context the stream entry carries.
//! It opens when the stream reader hands the event to the hub and closes when the last socket
//! that queued the event has written or dropped it. It then records:
//! - `delivery.recipients`: local sockets the event was offered to, live or recovering;
//! - `delivery.dropped`: frames that were never written, because a queue overflowed, a newer
//!   frame with the same conflation key replaced them, or the socket closed first;
//! - `delivery.commit_to_last_write_ms`: milliseconds from the commit (the event's `ts_ms`, the
//!   notifier's clock) to the last socket write that flushed the event (this edge's clock).
//!
//! The frames carry a reference to the span's counters, so no socket gets a span of its own.
//! Without an exporter, [`DeliveryTrace::start`] returns `None` and nothing is counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use notify_proto::pb::Event;
use notify_proto::telemetry;
use tracing::Span;
use tracing::field::Empty;

/// The `deliver` span of one event and its counters. Dropped when the hub and every queued
/// frame of the event have let go of it, which records the counters and closes the span.
#[derive(Debug)]
pub struct DeliveryTrace {
    span: Span,
    committed_ms: i64,
    recipients: AtomicU64,
    dropped: AtomicU64,
    /// Wall-clock milliseconds of the last flush that wrote the event; 0 before any.
    last_write_ms: AtomicI64,
}

impl DeliveryTrace {
    /// Opens the `deliver` span of `event` in the publisher's trace. Returns `None` when spans
    /// are not exported or the event carries no trace context.
    pub fn start(event: &Event) -> Option<Arc<Self>> {
        if !telemetry::is_exporting() || event.traceparent.is_empty() {
            return None;
        }
        let span = tracing::info_span!(
            parent: None,
            "deliver",
            otel.kind = "consumer",
            messaging.destination.name = event.channel.as_str(),
            event.id = event.id.as_str(),
            event.partition = i64::from(event.partition),
            event.position = attribute(event.seq),
            delivery.recipients = Empty,
            delivery.dropped = Empty,
            delivery.commit_to_last_write_ms = Empty,
        );
        telemetry::set_remote_parent(&span, &event.traceparent, &event.tracestate);
        Some(Arc::new(Self {
            span,
            committed_ms: event.ts_ms,
            recipients: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_write_ms: AtomicI64::new(0),
        }))
    }

    /// Counts a live recipient and returns the handle its queued frame carries.
    pub fn frame(self: &Arc<Self>) -> FrameTrace {
        self.recipients.fetch_add(1, Ordering::Relaxed);
        FrameTrace {
            trace: Arc::clone(self),
            written: false,
        }
    }

    /// Counts a recipient whose subscription is still recovering. It buffers the frame and
    /// queues it after its replay, which the span does not wait for.
    pub fn count_buffered(&self) {
        self.recipients.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for DeliveryTrace {
    fn drop(&mut self) {
        self.span.record(
            "delivery.recipients",
            attribute(self.recipients.load(Ordering::Relaxed)),
        );
        self.span
            .record("delivery.dropped", attribute(self.dropped.load(Ordering::Relaxed)));
        let last_write_ms = self.last_write_ms.load(Ordering::Relaxed);
        if last_write_ms > 0 {
            let latency = last_write_ms.saturating_sub(self.committed_ms).max(0);
            self.span.record("delivery.commit_to_last_write_ms", latency);
        }
    }
}

/// A queued frame's reference to its event's [`DeliveryTrace`]. Dropped without
/// [`FrameTrace::written`], it counts as a dropped frame.
#[derive(Debug)]
pub struct FrameTrace {
    trace: Arc<DeliveryTrace>,
    written: bool,
}

impl FrameTrace {
    /// Records that the frame was flushed to its socket at `now_ms`.
    pub fn written(mut self, now_ms: i64) {
        self.written = true;
        self.trace.last_write_ms.fetch_max(now_ms, Ordering::Relaxed);
    }
}

impl Drop for FrameTrace {
    fn drop(&mut self) {
        if !self.written {
            self.trace.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Marks every frame in `traces` as flushed now and empties it.
pub fn mark_written(traces: &mut Vec<FrameTrace>) {
    if traces.is_empty() {
        return;
    }
    let now_ms = now_ms();
    for trace in traces.drain(..) {
        trace.written(now_ms);
    }
}

/// Converts a count to the signed integer OpenTelemetry keeps; tracing-opentelemetry 0.34 turns
/// a `u64` field into a string attribute.
fn attribute(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> Arc<DeliveryTrace> {
        Arc::new(DeliveryTrace {
            span: Span::none(),
            committed_ms: 1_000,
            recipients: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            last_write_ms: AtomicI64::new(0),
        })
    }

    #[test]
    fn frames_count_recipients_drops_and_last_write() {
        let trace = trace();
        let written = trace.frame();
        let later = trace.frame();
        let dropped = trace.frame();
        trace.count_buffered();
        written.written(1_250);
        later.written(1_400);
        drop(dropped);
        assert_eq!(trace.recipients.load(Ordering::Relaxed), 4);
        assert_eq!(trace.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(trace.last_write_ms.load(Ordering::Relaxed), 1_400);
    }

    #[test]
    fn mark_written_empties_the_batch() {
        let trace = trace();
        let mut traces = vec![trace.frame(), trace.frame()];
        mark_written(&mut traces);
        assert!(traces.is_empty());
        assert_eq!(trace.dropped.load(Ordering::Relaxed), 0);
        assert!(trace.last_write_ms.load(Ordering::Relaxed) > 1_000);
    }

    #[test]
    fn no_span_without_exporter() {
        let event = Event {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
            ..Event::default()
        };
        assert!(DeliveryTrace::start(&event).is_none());
    }
}
