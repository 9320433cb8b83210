//! The HTTP listener for probes and metrics. `/healthz` returns 200 while the process runs,
//! `/readyz` returns 200 only while the store responds and no shutdown has started, and
//! `/metrics` returns the process's Prometheus metrics.
//!
//! `/readyz` leaves Redis out on purpose: the notifier keeps accepting events while Redis is down
//! and the relay appends them later, so taking every replica out of service would only stop
//! publishing.

use std::future::Future;
use std::time::Duration;

use notify_proto::http_server::{self, ConnectionLimits, MAX_METRICS_CONNECTIONS};
use notify_proto::metrics::MetricsRegistry;
use prometheus_client::metrics::counter::Counter;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::http::StatusCode;

use crate::store::Store;

/// How long `/readyz` waits for the store before it reports not ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(2);

/// Dependencies and state that `/readyz` checks.
#[derive(Clone, Debug)]
pub struct Readiness {
    /// Store of record, pinged on each request.
    pub store: Store,
    /// Cancelled when shutdown starts.
    pub draining: CancellationToken,
}

/// Serves the probes and `registry`'s metrics on `listener` until `stop` resolves.
///
/// A client has [`HEADER_READ_TIMEOUT`](http_server::HEADER_READ_TIMEOUT) to send a request's headers, and at most
/// [`MAX_METRICS_CONNECTIONS`] connections are served at once. A connection over that cap is
/// closed at once and counted in `rejected`.
pub async fn run(
    listener: TcpListener,
    readiness: Readiness,
    registry: MetricsRegistry,
    rejected: Counter,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let healthz = warp::path!("healthz").and(warp::get()).map(alive);
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(warp::any().map(move || readiness.clone()))
        .then(ready);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .map(move || metrics_reply(&registry));
    let routes = warp::service(healthz.or(readyz).or(metrics));
    let limits = ConnectionLimits::new(MAX_METRICS_CONNECTIONS, rejected);
    http_server::serve(listener, routes, limits, stop).await;
}

fn alive() -> &'static str {
    "ok"
}

/// Returns the metrics in the OpenMetrics text format.
pub fn metrics_reply(registry: &MetricsRegistry) -> impl warp::Reply + use<> {
    warp::reply::with_header(registry.encode(), "content-type", notify_proto::metrics::CONTENT_TYPE)
}

async fn ready(readiness: Readiness) -> warp::reply::WithStatus<&'static str> {
    if readiness.draining.is_cancelled() {
        return warp::reply::with_status("draining", StatusCode::SERVICE_UNAVAILABLE);
    }
    match tokio::time::timeout(READY_TIMEOUT, readiness.store.ping()).await {
        Ok(Ok(())) => warp::reply::with_status("ready", StatusCode::OK),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness check: store unavailable");
            warp::reply::with_status("store unavailable", StatusCode::SERVICE_UNAVAILABLE)
        }
        Err(_) => {
            tracing::warn!(
                timeout_ms = READY_TIMEOUT.as_millis() as u64,
                "readiness check: store timed out"
            );
            warp::reply::with_status("store timed out", StatusCode::SERVICE_UNAVAILABLE)
        }
    }
}
