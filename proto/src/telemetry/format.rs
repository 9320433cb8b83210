//! The two log line formats. Both add the `trace_id` and `span_id` of the innermost span around
//! the event that has OpenTelemetry ids, so a log line can be found from a trace and back.
//!
//! A JSON line is one object with `timestamp` (RFC 3339, UTC), `level`, `target`, `message`,
//! the event's fields, `span` (the innermost span's name) and, inside a span, `trace_id` and
//! `span_id`. A text line is tracing-subscriber's full format with ` trace_id=… span_id=…`
//! appended.

use std::fmt;
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{SpanId, TraceContextExt, TraceId};
use serde_json::{Map, Value};
use tracing::dispatcher::WeakDispatch;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Registry;
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The subscriber a formatter looks span ids up in, set once it is installed.
///
/// A formatter runs inside the subscriber's event call, where `tracing::dispatcher::get_default`
/// returns no subscriber, so it keeps its own weak handle.
pub type DispatchCell = Arc<OnceLock<WeakDispatch>>;

/// One JSON object per line.
#[derive(Debug, Default)]
pub struct JsonLines {
    timer: SystemTime,
    dispatch: DispatchCell,
}

impl JsonLines {
    /// Creates the format; span ids appear once `dispatch` contains the installed subscriber.
    pub fn new(dispatch: DispatchCell) -> Self {
        Self {
            timer: SystemTime,
            dispatch,
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut object = Map::new();
        event.record(&mut JsonFields(&mut object));

        // The fixed keys go in last, so an event field of the same name cannot replace them.
        let mut timestamp = String::new();
        self.timer.format_time(&mut Writer::new(&mut timestamp))?;
        let metadata = event.metadata();
        object.insert("timestamp".into(), timestamp.into());
        object.insert("level".into(), metadata.level().as_str().into());
        object.insert("target".into(), metadata.target().into());
        if let Some(span) = ctx.lookup_current() {
            object.insert("span".into(), span.name().into());
        }
        if let Some((trace_id, span_id)) = span_ids(&self.dispatch, event) {
            object.insert("trace_id".into(), trace_id.to_string().into());
            object.insert("span_id".into(), span_id.to_string().into());
        }
        writeln!(writer, "{}", Value::Object(object))
    }
}

/// tracing-subscriber's full text format, with the span ids at the end of the line.
#[derive(Debug, Default)]
pub struct TextLines {
    inner: Format,
    dispatch: DispatchCell,
}

impl TextLines {
    /// Creates the format; span ids appear once `dispatch` contains the installed subscriber.
    pub fn new(dispatch: DispatchCell) -> Self {
        Self {
            inner: Format::default(),
            dispatch,
        }
    }
}

impl<S, N> FormatEvent<S, N> for TextLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut line = String::new();
        self.inner.format_event(ctx, Writer::new(&mut line), event)?;
        let line = line.trim_end_matches('\n');
        match span_ids(&self.dispatch, event) {
            Some((trace_id, span_id)) => writeln!(writer, "{line} trace_id={trace_id} span_id={span_id}"),
            None => writeln!(writer, "{line}"),
        }
    }
}

/// Returns the OpenTelemetry ids of the innermost span around `event` that has them. Spans
/// that the OpenTelemetry layer did not see, such as those created before it was installed, are
/// skipped for their parent.
fn span_ids(dispatch: &DispatchCell, event: &Event<'_>) -> Option<(TraceId, SpanId)> {
    let dispatch = dispatch.get()?.upgrade()?;
    let id = match event.parent() {
        Some(parent) => parent.clone(),
        None if event.is_contextual() => dispatch.current_span().id()?.clone(),
        None => return None,
    };
    let registry = dispatch.downcast_ref::<Registry>()?;
    let innermost = registry.span(&id)?;
    innermost.scope().find_map(|span| {
        let context = tracing_opentelemetry::get_otel_context(&span.id(), &dispatch)?;
        let span_context = context.span().span_context().clone();
        span_context
            .is_valid()
            .then(|| (span_context.trace_id(), span_context.span_id()))
    })
}

/// Collects an event's fields into a JSON object: numbers and booleans as such, errors with
/// their `Display` text, everything else with its `Debug` text.
struct JsonFields<'a>(&'a mut Map<String, Value>);

impl Visit for JsonFields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), value.to_string().into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// A log writer that keeps every line in memory.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("lock").clone()).expect("utf-8")
        }
    }

    fn with_logger<E>(make_format: impl FnOnce(DispatchCell) -> E, body: impl FnOnce()) -> String
    where
        E: FormatEvent<
                tracing_subscriber::layer::Layered<
                    tracing_opentelemetry::OpenTelemetryLayer<Registry, opentelemetry_sdk::trace::SdkTracer>,
                    Registry,
                >,
                tracing_subscriber::fmt::format::DefaultFields,
            > + Send
            + Sync
            + 'static,
    {
        let lines = Lines::default();
        let writer = lines.clone();
        let dispatch = DispatchCell::default();
        let format = make_format(dispatch.clone());
        // Records nothing, like a process without an exporter, but still gives spans ids.
        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOff).build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(format)
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::dispatcher::get_default(|installed| dispatch.set(installed.downgrade()).expect("set once"));
            body();
        });
        lines.text()
    }

    const PARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn json_line_carries_trace_id() {
        let text = with_logger(JsonLines::new, || {
            let span = tracing::info_span!("publish");
            crate::telemetry::set_remote_parent(&span, PARENT, "");
            let _entered = span.enter();
            tracing::warn!(partition = 3u32, error = "boom", "commit failed");
        });
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["message"], "commit failed");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["partition"], 3);
        assert_eq!(line["error"], "boom");
        assert_eq!(line["span"], "publish");
        assert_eq!(line["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        let span_id = line["span_id"].as_str().expect("span_id is a string");
        assert_eq!(span_id.len(), 16);
        assert_ne!(span_id, "b7ad6b7169203331");
    }

    #[test]
    fn json_line_outside_spans_has_no_ids() {
        let text = with_logger(JsonLines::new, || tracing::info!(addr = "127.0.0.1:1", "listening"));
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["message"], "listening");
        assert!(line.get("trace_id").is_none(), "{line}");
        assert!(line.get("span").is_none(), "{line}");
    }

    #[test]
    fn text_line_ends_with_ids() {
        let text = with_logger(TextLines::new, || {
            let span = tracing::info_span!("deliver");
            crate::telemetry::set_remote_parent(&span, PARENT, "");
            span.in_scope(|| tracing::info!("delivered"));
        });
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains("delivered"), "{text}");
        assert!(
            text.trim_end()
                .contains(" trace_id=0af7651916cd43dd8448eb211c80319c span_id="),
            "{text}"
        );
    }
}
