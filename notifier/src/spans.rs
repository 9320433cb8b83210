//! The spans of a publish call: `publish` (the gRPC server span, a child of the caller's
//! `traceparent`), and its children `validate`, `commit` and `append`.
//!
//! `publish` exists while spans are exported ([`telemetry::is_exporting`]) or while the call's
//! `debug` lines are logged, so that those lines carry its trace id. At the default `info` level
//! a call writes no line, and the span would cost several microseconds per call for nothing. The
//! children exist only while spans are exported. While spans are
//! exported, the event stores the `publish` span's context instead of the caller's, so that the
//! edges' delivery spans are children of `publish` and the chain back to the caller stays
//! intact. Without an exporter, the caller's context is stored as it came.

use notify_proto::pb::{Event, PublishResponse};
use notify_proto::telemetry;
use tracing::Span;
use tracing::field::Empty;

use crate::error::Error;
use crate::store::NewEvent;
use crate::validate::TraceContext;

/// Creates the `publish` span of one event of a `method` call (`Publish` or `PublishBatch`), as a
/// child of the caller's trace context, while spans are exported or `debug_logged` is true,
/// meaning the call's `debug` lines are logged. Otherwise returns a disabled span.
pub fn publish(method: &'static str, channel: &str, trace: &TraceContext, debug_logged: bool) -> Span {
    if !debug_logged && !telemetry::is_exporting() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "publish",
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = "notify.v1.Notifier",
        rpc.method = method,
        messaging.destination.name = channel,
        event.partition = Empty,
        event.position = Empty,
        event.id = Empty,
        event.duplicate = Empty,
        error = Empty,
    );
    telemetry::set_remote_parent(&span, &trace.traceparent, &trace.tracestate);
    span
}

/// Creates the `validate` span inside the current span, while spans are exported.
pub fn validate() -> Span {
    if telemetry::is_exporting() {
        tracing::info_span!("validate")
    } else {
        Span::none()
    }
}

/// Replaces the caller's trace context in `event` with the `publish` span's, while spans are
/// exported.
pub fn stamp(mut event: NewEvent, publish: &Span) -> NewEvent {
    if !telemetry::is_exporting() {
        return event;
    }
    if let Some((traceparent, tracestate)) = telemetry::trace_headers(publish) {
        event.traceparent = traceparent;
        event.tracestate = tracestate;
    }
    event
}

/// Records the end of a call on its `publish` span.
pub fn record_outcome(span: &Span, outcome: &Result<PublishResponse, Error>) {
    match outcome {
        Ok(response) => {
            span.record("event.id", response.id.as_str());
            span.record("event.position", attribute(response.position));
            span.record("event.duplicate", response.duplicate);
        }
        Err(err) => {
            span.record("otel.status_code", "error");
            span.record("error", tracing::field::display(err));
        }
    }
}

/// Returns the span a queued request carries to its committer: the current `publish` span while
/// spans are exported, otherwise a disabled span that costs nothing.
pub fn for_committer() -> Span {
    if telemetry::is_exporting() {
        Span::current()
    } else {
        Span::none()
    }
}

/// Creates one `commit` span per request of a batch, each a child of the request's span and
/// tagged with the request's partition. The batch shares one transaction, so the spans share
/// their start and end; drop them after the commit.
pub fn commit<'a>(parents: impl Iterator<Item = (&'a Span, u32)>, batch: usize) -> Vec<Span> {
    if !telemetry::is_exporting() {
        return Vec::new();
    }
    parents
        .filter(|(parent, _)| !parent.is_disabled())
        .map(|(parent, partition)| {
            tracing::info_span!(
                parent: parent,
                "commit",
                event.partition = i64::from(partition),
                batch.size = attribute(batch as u64)
            )
        })
        .collect()
}

/// Creates one `append` span per committed event, each a child of the `publish` span whose
/// context the event carries. Drop them after the append.
pub fn append(events: &[Event], partition: u32) -> Vec<Span> {
    if !telemetry::is_exporting() {
        return Vec::new();
    }
    events
        .iter()
        .filter(|event| !event.traceparent.is_empty())
        .map(|event| {
            let span = tracing::info_span!(
                parent: None,
                "append",
                event.partition = i64::from(partition),
                event.position = attribute(event.seq),
                batch.size = attribute(events.len() as u64)
            );
            telemetry::set_remote_parent(&span, &event.traceparent, &event.tracestate);
            span
        })
        .collect()
}

/// Converts a number to the signed integer OpenTelemetry keeps; tracing-opentelemetry 0.34 turns
/// a `u64` field into a string attribute.
fn attribute(number: u64) -> i64 {
    i64::try_from(number).unwrap_or(i64::MAX)
}
