//! Logging and tracing set-up shared by the binaries.
//!
//! Logs: `LOG_FORMAT=json` writes one JSON object per line, for a cluster's log pipeline; `text`
//! (the default) writes readable lines. `RUST_LOG` filters as usual and defaults to `info`. A
//! line written inside a span carries the span's `trace_id` and `span_id` in both formats.
//!
//! Traces: with `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set,
//! spans go to that OTLP/gRPC endpoint in batches. The OpenTelemetry SDK reads the standard
//! variables itself: `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`,
//! `OTEL_TRACES_SAMPLER_ARG`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_EXPORTER_OTLP_HEADERS` and
//! `OTEL_BSP_*`. An `https` endpoint is verified with Mozilla's root certificates and the CA
//! certificates of `OTEL_EXPORTER_OTLP_CERTIFICATE`. Without an endpoint, or with `OTEL_TRACES_EXPORTER=none` or
//! `OTEL_SDK_DISABLED=true`, nothing is exported: spans still get ids for the log lines, from a
//! sampler that records nothing.
//!
//! Layout: [`format`] writes the log lines, [`throttle`] rate-limits repeated warnings.

pub mod format;
pub mod throttle;

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Environment variable that selects the log format: `text` or `json`.
pub const ENV_LOG_FORMAT: &str = "LOG_FORMAT";
/// OTLP endpoint of every signal, for example `http://otel-collector:4317`.
pub const ENV_OTLP_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
/// OTLP endpoint of traces; wins over [`ENV_OTLP_ENDPOINT`].
pub const ENV_OTLP_TRACES_ENDPOINT: &str = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT";
/// Set to `none` to turn the trace exporter off while an endpoint is set.
pub const ENV_TRACES_EXPORTER: &str = "OTEL_TRACES_EXPORTER";
/// Set to `true` to turn the whole SDK off.
pub const ENV_SDK_DISABLED: &str = "OTEL_SDK_DISABLED";
/// Transport of the OTLP exporter. Only `grpc` is built in.
pub const ENV_OTLP_PROTOCOL: &str = "OTEL_EXPORTER_OTLP_PROTOCOL";
/// Name of the service in exported spans; the binary's name when unset.
pub const ENV_SERVICE_NAME: &str = "OTEL_SERVICE_NAME";
/// PEM file of CA certificates that verify an `https` OTLP endpoint, in addition to Mozilla's
/// root certificates.
pub const ENV_OTLP_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_CERTIFICATE";
/// PEM file of CA certificates for the traces endpoint; wins over [`ENV_OTLP_CERTIFICATE`].
pub const ENV_OTLP_TRACES_CERTIFICATE: &str = "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE";

/// How long the exit waits for the last spans to be exported.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether spans are exported. Read on hot paths that create spans only for export.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Returns whether an OTLP exporter is installed. Code that would build a span per event only
/// for the trace backend checks this first, so that a process without an exporter pays nothing.
pub fn is_exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The installed tracer provider. [`Telemetry::shutdown`] exports the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the buffered spans, waiting at most 5 s, and stops the exporter.
    pub fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        if let Err(err) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            // The logger still works here; only the span pipeline is gone.
            tracing::warn!(error = %err, "exporting the last spans failed");
        }
        EXPORTING.store(false, Ordering::Relaxed);
    }
}

/// Destination of the log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutput {
    /// Standard output, which container platforms collect: the services.
    Stdout,
    /// Standard error, for a binary whose standard output carries its own text (a banner, a
    /// token) that must stay apart from the logs.
    Stderr,
}

impl LogOutput {
    fn make_writer(self) -> tracing_subscriber::fmt::writer::BoxMakeWriter {
        match self {
            LogOutput::Stdout => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stdout),
            LogOutput::Stderr => tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr),
        }
    }

    fn is_terminal(self) -> bool {
        match self {
            LogOutput::Stdout => std::io::stdout().is_terminal(),
            LogOutput::Stderr => std::io::stderr().is_terminal(),
        }
    }
}

/// Installs the global logger, writing to standard output, and, when an OTLP endpoint is
/// configured, the span exporter. `service_name` is the `service.name` of the spans unless
/// `OTEL_SERVICE_NAME` sets one.
///
/// Call it inside the Tokio runtime, because the gRPC exporter needs one. A second call
/// installs nothing and returns an empty [`Telemetry`], so tests may call it freely.
pub fn init(service_name: &'static str) -> Telemetry {
    init_to(service_name, LogOutput::Stdout)
}

/// Crates whose `trace` level logs message contents: tungstenite logs every WebSocket frame with
/// its payload, which includes the tokens of `auth` and `refresh` frames, and the HTTP and gRPC
/// crates log headers, which include API keys. They are capped at `debug` whatever `RUST_LOG`
/// sets, and the exporter's own spans (from these crates) stay out of the traces too.
const CAPPED_AT_DEBUG: [&str; 6] = ["tungstenite", "tokio_tungstenite", "hyper", "hyper_util", "h2", "tonic"];

/// Builds the filter that caps each crate in [`CAPPED_AT_DEBUG`] at `debug` and lets every other
/// event through. Installed as a layer of its own next to the `RUST_LOG` filter, it only removes
/// what `RUST_LOG` enabled: `RUST_LOG=trace` gets `debug` for these crates, and the default
/// `info` keeps them at `info`.
///
/// NOTE: adding `h2=debug`-style directives to the `RUST_LOG` filter instead raised these crates
/// from `info` to `debug`, which logged every HTTP/2 frame and cost more CPU than a publish.
fn message_logging_cap() -> Targets {
    let capped = CAPPED_AT_DEBUG.map(|target| (target, LevelFilter::DEBUG));
    Targets::new().with_default(LevelFilter::TRACE).with_targets(capped)
}

/// Installs the logger and the span exporter like [`init`], writing the log lines to `output`.
pub fn init_to(service_name: &'static str, output: LogOutput) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(ENV_LOG_FORMAT).is_ok_and(|format| format.eq_ignore_ascii_case("json"));
    let (exporter, exporter_error) = match exporter_requested().then(build_exporter) {
        Some(Ok(exporter)) => (Some(exporter), None),
        Some(Err(err)) => (None, Some(err)),
        None => (None, None),
    };
    let exporting = exporter.is_some();
    let provider = tracer_provider(service_name, exporter);
    // One filter for both layers, so RUST_LOG also decides which spans are traced (they are at
    // info). NOTE: with a separate filter per layer (tracing-subscriber 0.3.23), spans went
    // missing from the log lines of a notifier on PostgreSQL, so that is not used.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service_name))
        .with_location(false)
        .with_threads(false)
        .with_tracked_inactivity(false)
        .with_level(true)
        .with_target(false);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(message_logging_cap())
        .with(otel);
    let dispatch = format::DispatchCell::default();
    let installed = if json {
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(output.make_writer())
            .event_format(format::JsonLines::new(dispatch.clone()));
        registry.with(fmt).try_init()
    } else {
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(output.is_terminal())
            .with_writer(output.make_writer())
            .event_format(format::TextLines::new(dispatch.clone()));
        registry.with(fmt).try_init()
    };
    if installed.is_err() {
        // A logger is already installed, which is what a second call expects.
        return Telemetry { provider: None };
    }
    tracing::dispatcher::get_default(|installed| dispatch.set(installed.downgrade()).ok());

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    if exporting {
        EXPORTING.store(true, Ordering::Relaxed);
        tracing::info!(endpoint = %otlp_endpoint(), "exporting spans over OTLP/gRPC");
    }
    if let Some(err) = exporter_error {
        tracing::warn!(error = %err, "the OTLP span exporter could not be built; no spans are exported");
    }
    Telemetry {
        provider: Some(provider),
    }
}

/// Returns whether the environment requests a trace exporter.
fn exporter_requested() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let is =
        |name: &str, expected: &str| std::env::var(name).is_ok_and(|value| value.trim().eq_ignore_ascii_case(expected));
    let endpoint = set(ENV_OTLP_ENDPOINT) || set(ENV_OTLP_TRACES_ENDPOINT);
    endpoint && !is(ENV_TRACES_EXPORTER, "none") && !is(ENV_SDK_DISABLED, "true")
}

fn otlp_endpoint() -> String {
    std::env::var(ENV_OTLP_TRACES_ENDPOINT)
        .or_else(|_| std::env::var(ENV_OTLP_ENDPOINT))
        .unwrap_or_default()
}

/// Builds the OTLP/gRPC span exporter. It reads the endpoint, timeout, headers and compression
/// from the standard variables.
fn build_exporter() -> Result<opentelemetry_otlp::SpanExporter, String> {
    if let Ok(protocol) = std::env::var(ENV_OTLP_PROTOCOL)
        && !protocol.trim().is_empty()
        && protocol.trim() != "grpc"
    {
        return Err(format!(
            "{ENV_OTLP_PROTOCOL} is {protocol:?}, but only grpc is built in; unset it or set it to grpc"
        ));
    }
    let extra_ca = std::env::var(ENV_OTLP_TRACES_CERTIFICATE)
        .map(|path| (ENV_OTLP_TRACES_CERTIFICATE, path))
        .or_else(|_| std::env::var(ENV_OTLP_CERTIFICATE).map(|path| (ENV_OTLP_CERTIFICATE, path)))
        .ok()
        .filter(|(_, path)| !path.trim().is_empty());
    let tls = otlp_tls_config(extra_ca)?;
    opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_tls_config(tls)
        .build()
        .map_err(|err| err.to_string())
}

/// Returns the TLS settings of the exporter: Mozilla's root certificates, plus the CA
/// certificates in the PEM file of `extra_ca`, a `(variable, path)` pair. tonic uses them only
/// for an `https` endpoint; an `http` endpoint stays plain.
///
/// # Errors
/// Fails when the file cannot be read, naming the variable and the path.
fn otlp_tls_config(extra_ca: Option<(&str, String)>) -> Result<ClientTlsConfig, String> {
    let tls = ClientTlsConfig::new().with_webpki_roots();
    let Some((variable, path)) = extra_ca else {
        return Ok(tls);
    };
    let pem = std::fs::read(&path)
        .map_err(|err| format!("read {variable} {path}: {err}; set it to a readable PEM file of CA certificates"))?;
    Ok(tls.ca_certificate(Certificate::from_pem(pem)))
}

/// Builds the tracer provider: batched export to `exporter`, or a sampler that records nothing
/// when there is none, so that spans still get ids for the log lines.
fn tracer_provider(
    service_name: &'static str,
    exporter: Option<opentelemetry_otlp::SpanExporter>,
) -> SdkTracerProvider {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var(ENV_SERVICE_NAME).is_err() {
        resource = resource.with_service_name(service_name);
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    match exporter {
        // The SDK reads OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG itself.
        Some(exporter) => builder.with_batch_exporter(exporter).build(),
        None => builder.with_sampler(Sampler::AlwaysOff).build(),
    }
}

/// A `traceparent` and `tracestate` pair, as carried in gRPC metadata and stream entries.
struct Headers<'a> {
    traceparent: &'a str,
    tracestate: &'a str,
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => Some(self.traceparent).filter(|value| !value.is_empty()),
            "tracestate" => Some(self.tracestate).filter(|value| !value.is_empty()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[derive(Default)]
struct OwnedHeaders {
    traceparent: String,
    tracestate: String,
}

impl Injector for OwnedHeaders {
    fn set(&mut self, key: &str, value: String) {
        match key {
            "traceparent" => self.traceparent = value,
            "tracestate" => self.tracestate = value,
            _ => {}
        }
    }
}

/// Makes the remote span described by `traceparent` and `tracestate` the parent of `span`.
/// An empty or invalid `traceparent` leaves `span` a root. Call it before anything is logged in
/// `span`, because a span's parent is fixed once its ids were used.
pub fn set_remote_parent(span: &tracing::Span, traceparent: &str, tracestate: &str) {
    if traceparent.is_empty() || span.is_disabled() {
        return;
    }
    let headers = Headers {
        traceparent,
        tracestate,
    };
    let parent = TraceContextPropagator::new().extract(&headers);
    // Fails only when the span is disabled or already started; it then keeps its own parent.
    let _ = span.set_parent(parent);
}

/// Returns the `traceparent` and `tracestate` of `span`, or `None` when it has no valid span
/// context (no OpenTelemetry layer, or a disabled span).
pub fn trace_headers(span: &tracing::Span) -> Option<(String, String)> {
    if span.is_disabled() {
        return None;
    }
    let context = span.context();
    let mut headers = OwnedHeaders::default();
    TraceContextPropagator::new().inject_context(&context, &mut headers);
    (!headers.traceparent.is_empty()).then_some((headers.traceparent, headers.tracestate))
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    /// Returns whether an event of `target` at `level` passes `RUST_LOG` filter `filter` and the
    /// cap.
    fn passes(filter: &str, target: &str, level: tracing::Level) -> bool {
        let subscriber = tracing_subscriber::registry()
            .with(super::EnvFilter::new(filter))
            .with(super::message_logging_cap());
        tracing::subscriber::with_default(subscriber, || match (target, level) {
            ("tungstenite", tracing::Level::TRACE) => {
                tracing::enabled!(target: "tungstenite::protocol", tracing::Level::TRACE)
            }
            ("tungstenite", _) => tracing::enabled!(target: "tungstenite::protocol", tracing::Level::DEBUG),
            ("h2", _) => tracing::enabled!(target: "h2::codec::framed_write", tracing::Level::DEBUG),
            _ => tracing::enabled!(target: "ws_edge::session", tracing::Level::TRACE),
        })
    }

    #[test]
    fn message_logging_crates_stop_at_debug() {
        for filter in ["trace", "tungstenite=trace", "trace,tungstenite=trace"] {
            assert!(!passes(filter, "tungstenite", tracing::Level::TRACE), "{filter}");
            assert!(passes(filter, "tungstenite", tracing::Level::DEBUG), "{filter}");
        }
        assert!(
            passes("trace", "ws_edge", tracing::Level::TRACE),
            "other crates keep trace"
        );
    }

    #[test]
    fn cap_does_not_raise_the_level() {
        for filter in ["info", "warn", "info,notifier=debug"] {
            assert!(!passes(filter, "h2", tracing::Level::DEBUG), "{filter}");
            assert!(!passes(filter, "tungstenite", tracing::Level::DEBUG), "{filter}");
        }
        assert!(passes("debug", "h2", tracing::Level::DEBUG));
    }

    use super::*;

    #[test]
    fn headers_extract_known_keys_only() {
        let headers = Headers {
            traceparent: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            tracestate: "",
        };
        assert_eq!(
            headers.get("traceparent"),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert_eq!(headers.get("tracestate"), None);
        assert_eq!(headers.get("baggage"), None);
    }

    #[test]
    fn remote_parent_round_trips_through_a_span() {
        use opentelemetry::trace::TraceContextExt;

        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOn).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("publish");
            set_remote_parent(
                &span,
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "congo=t61rcWkgMzE",
            );
            let (traceparent, tracestate) = trace_headers(&span).expect("span has a context");
            let span_id = span.context().span().span_context().span_id().to_string();
            assert_eq!(traceparent, format!("00-0af7651916cd43dd8448eb211c80319c-{span_id}-01"));
            assert_ne!(span_id, "b7ad6b7169203331");
            assert_eq!(tracestate, "congo=t61rcWkgMzE");
        });
    }

    #[test]
    fn invalid_parent_leaves_a_root() {
        let provider = SdkTracerProvider::builder().with_sampler(Sampler::AlwaysOn).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("publish");
            set_remote_parent(&span, "00-zz-1-01", "");
            let (traceparent, _) = trace_headers(&span).expect("span has a context");
            assert!(!traceparent.contains("zz"), "{traceparent}");
            assert_eq!(traceparent.len(), 55, "{traceparent}");
        });
    }

    #[test]
    fn no_layer_means_no_headers() {
        let span = tracing::Span::none();
        assert_eq!(trace_headers(&span), None);
    }

    #[tokio::test]
    async fn https_exporter_builds() {
        use opentelemetry_otlp::WithExportConfig;

        let tls = otlp_tls_config(None).expect("no file to read");
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint("https://127.0.0.1:4317")
            .with_tls_config(tls)
            .build();
        assert!(exporter.is_ok(), "{:?}", exporter.err());
    }

    #[test]
    fn unreadable_ca_file_is_named() {
        let missing = "/nonexistent/otlp-ca.pem".to_owned();
        let Err(message) = otlp_tls_config(Some((ENV_OTLP_CERTIFICATE, missing))) else {
            panic!("a missing CA file was accepted");
        };
        assert!(message.contains("OTEL_EXPORTER_OTLP_CERTIFICATE"), "{message}");
        assert!(message.contains("/nonexistent/otlp-ca.pem"), "{message}");
    }
}
