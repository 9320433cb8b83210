//! The HTTP routes: `/ws`, `/healthz`, `/readyz`, the demo page `/` and `/demo/config`, and
//! `/metrics` on its own listener.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use notify_proto::auth_header::bearer_credentials;
use notify_proto::http_server::{self, ConnectionLimits, MAX_METRICS_CONNECTIONS};
use notify_proto::metrics::MetricsRegistry;
use prometheus_client::metrics::counter::Counter;
use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::admission::Rejected;
use crate::demo;
use crate::metrics::upgrade_rejected;
use crate::server::Edge;
use crate::session;
use crate::upgrade::{self, Upgrade};

/// Returns every route of the edge.
pub fn routes(edge: Arc<Edge>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let with_edge = warp::any().map(move || edge.clone());

    let websocket = warp::path!("ws")
        .and(upgrade::upgrade())
        .and(handshake())
        .and(crate::http::client_addr())
        .and(with_edge.clone())
        .map(open_socket);
    let healthz = warp::path!("healthz").and(warp::get()).map(|| "ok");
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_edge.clone())
        .map(readiness);
    let index = warp::path::end()
        .and(warp::get())
        .map(|| warp::reply::html(demo::INDEX_HTML));
    let demo_config = warp::path!("demo" / "config")
        .and(warp::get())
        .and(with_edge)
        .map(|edge: Arc<Edge>| warp::reply::json(&edge.demo));

    websocket.or(healthz).or(readyz).or(index).or(demo_config)
}

/// The subprotocol a client offers, and the edge echoes, next to a `bearer.<JWT>` entry.
pub const SUBPROTOCOL: &str = "notify.v1";
/// Prefix of the `Sec-WebSocket-Protocol` entry that carries the token.
pub const BEARER_SUBPROTOCOL_PREFIX: &str = "bearer.";

/// The authentication inputs of a handshake.
#[derive(Debug, Default)]
struct Handshake {
    /// The token, from `?token=`, `Authorization: Bearer` or a `bearer.<JWT>` subprotocol, in
    /// that order of preference.
    token: Option<String>,
    /// Whether the client offered [`SUBPROTOCOL`], which the response then selects.
    notify_subprotocol: bool,
    /// The `Origin` header.
    origin: Option<String>,
}

/// Reads the token, the subprotocols and the origin from the handshake. Neither the token nor
/// the query string is ever logged.
fn handshake() -> impl Filter<Extract = (Handshake,), Error = Infallible> + Clone {
    // `warp::query` logs the whole query string at debug level when it fails to decode (warp
    // 0.4.3, for example on a repeated `token`), so the raw string is decoded here instead.
    let query = warp::query::raw()
        .or(warp::any().map(String::new))
        .unify()
        .map(|raw: String| query_token(&raw));
    let optional_header = |name: &'static str| {
        warp::header::optional::<String>(name)
            .or(warp::any().map(|| None))
            .unify()
    };
    query
        .and(optional_header("authorization"))
        .and(optional_header("sec-websocket-protocol"))
        .and(optional_header("origin"))
        .map(
            |query: Option<String>,
             authorization: Option<String>,
             protocols: Option<String>,
             origin: Option<String>| {
                let offered = protocols.as_deref().unwrap_or_default().split(',').map(str::trim);
                let mut handshake = Handshake {
                    origin,
                    ..Handshake::default()
                };
                let mut protocol_token = None;
                for protocol in offered {
                    if protocol == SUBPROTOCOL {
                        handshake.notify_subprotocol = true;
                    } else if let Some(token) = protocol.strip_prefix(BEARER_SUBPROTOCOL_PREFIX) {
                        protocol_token = Some(token.to_owned());
                    }
                }
                let bearer = authorization.as_deref().and_then(bearer_credentials).map(str::to_owned);
                handshake.token = pick_token([query, bearer, protocol_token]);
                handshake
            },
        )
}

/// Returns the first of the tokens that is present and not empty, so that an empty `?token=`
/// does not hide a token in the `Authorization` header or the subprotocol list.
fn pick_token(candidates: [Option<String>; 3]) -> Option<String> {
    candidates.into_iter().flatten().find(|token| !token.is_empty())
}

/// Returns the first `token` parameter of a query string; an undecodable string has none.
fn query_token(raw: &str) -> Option<String> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw).ok()?;
    pairs
        .into_iter()
        .find(|(name, _)| name == "token")
        .map(|(_, value)| value)
}

/// Finishes the upgrade and starts the socket's session, unless the edge is draining or the
/// origin is not allowed.
fn open_socket(upgrade: Upgrade, handshake: Handshake, remote: Option<SocketAddr>, edge: Arc<Edge>) -> Response {
    if !edge.origins.allows(handshake.origin.as_deref()) {
        tracing::info!(client.addr = ?remote, origin = ?handshake.origin, "rejected websocket upgrade from a disallowed origin");
        edge.metrics.upgrade_rejected(upgrade_rejected::ORIGIN);
        return upgrade::status(StatusCode::FORBIDDEN);
    }
    if edge.shutdown.is_cancelled() {
        tracing::info!(client.addr = ?remote, "refusing websocket upgrade while draining");
        edge.metrics.upgrade_rejected(upgrade_rejected::DRAINING);
        return upgrade::status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let admitted = match handshake.token {
        Some(_) => edge.admission.admit(),
        None => edge.admission.admit_without_token(),
    };
    let slot = match admitted {
        Ok(slot) => slot,
        Err(rejected) => return reject_upgrade(&edge, rejected, remote),
    };
    let token = handshake.token;
    // A debug span: at the default `info` level it is disabled and costs a socket nothing, while
    // an enabled span lives as long as its socket, in memory and, when exporting, in the trace.
    let span = tracing::debug_span!(
        "ws_session",
        client.addr = ?remote,
        user_id = tracing::field::Empty,
        conn_id = tracing::field::Empty,
    );
    let (config, limits, sessions) = (edge.socket_config, edge.limits.queue, edge.sessions.clone());
    let mut response = span.in_scope(|| {
        upgrade.respond(config, limits, &sessions, move |connection| {
            session::run(connection, edge, token, slot)
        })
    });
    // Echo only the protocol name, because the `bearer.` entry contains the token.
    if handshake.notify_subprotocol && response.status() == StatusCode::SWITCHING_PROTOCOLS {
        response.headers_mut().insert(
            warp::http::header::SEC_WEBSOCKET_PROTOCOL,
            warp::http::HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    response
}

/// Counts a rejected upgrade and returns its response: 429 with `Retry-After` in whole seconds
/// (at least 1) over the handshake rate, 503 when every socket slot is taken, and 503 with
/// `Retry-After: 1` when every place for sockets without a token is taken.
fn reject_upgrade(edge: &Edge, rejected: Rejected, remote: Option<SocketAddr>) -> Response {
    match rejected {
        Rejected::Rate(wait) => {
            edge.metrics.upgrade_rejected(upgrade_rejected::HANDSHAKE_RATE);
            tracing::debug!(client.addr = ?remote, wait_ms = wait.as_millis() as u64, "upgrade over the handshake rate");
            let mut response = upgrade::status(StatusCode::TOO_MANY_REQUESTS);
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            response
        }
        Rejected::Full => {
            edge.metrics.upgrade_rejected(upgrade_rejected::MAX_SOCKETS);
            tracing::debug!(client.addr = ?remote, sockets = edge.admission.sockets(), "upgrade over MAX_SOCKETS");
            upgrade::status(StatusCode::SERVICE_UNAVAILABLE)
        }
        Rejected::Unauthenticated => {
            edge.metrics.upgrade_rejected(upgrade_rejected::UNAUTHENTICATED);
            tracing::debug!(
                client.addr = ?remote,
                waiting = edge.admission.unauthenticated_sockets(),
                "upgrade without a token over MAX_UNAUTHENTICATED_SOCKETS"
            );
            let mut response = upgrade::status(StatusCode::SERVICE_UNAVAILABLE);
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            response
        }
    }
}

/// Serves `GET /metrics`, the OpenMetrics text of `registry`, on `listener` until `stop`
/// resolves. It is a listener of its own (`EDGE_METRICS_LISTEN`), so that the public WebSocket
/// port does not expose the metrics and needs no rule to hide them. At most
/// [`MAX_METRICS_CONNECTIONS`] connections are served at once; one more is closed at once and
/// counted in `rejected`.
pub async fn serve_metrics(
    listener: tokio::net::TcpListener,
    registry: MetricsRegistry,
    rejected: Counter,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let metrics = warp::path!("metrics").and(warp::get()).map(move || {
        warp::reply::with_header(
            registry.encode(),
            header::CONTENT_TYPE,
            notify_proto::metrics::CONTENT_TYPE,
        )
        .into_response()
    });
    // The shared accept loop, for its header read timeout: a client that opens a connection and
    // sends nothing is disconnected after `http::HEADER_READ_TIMEOUT`.
    let limits = ConnectionLimits::new(MAX_METRICS_CONNECTIONS, rejected);
    http_server::serve(listener, warp::service(metrics), limits, stop).await;
}

/// Returns 200 while the stream reader runs and the edge is not draining, else 503.
fn readiness(edge: Arc<Edge>) -> impl Reply {
    if edge.is_ready() {
        warp::reply::with_status("ready", StatusCode::OK)
    } else {
        warp::reply::with_status("not ready", StatusCode::SERVICE_UNAVAILABLE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_token_takes_the_first() {
        assert_eq!(query_token("token=a.b.c"), Some("a.b.c".to_owned()));
        assert_eq!(query_token("x=1&token=first&token=second"), Some("first".to_owned()));
        assert_eq!(query_token("token=a%2Eb"), Some("a.b".to_owned()));
        assert_eq!(query_token("other=1"), None);
        assert_eq!(query_token(""), None);
    }

    #[test]
    fn empty_query_token_does_not_hide_the_header() {
        let token = |value: &str| Some(value.to_owned());
        assert_eq!(pick_token([token(""), token("h.h.h"), None]), token("h.h.h"));
        assert_eq!(pick_token([token(""), None, token("p.p.p")]), token("p.p.p"));
        assert_eq!(pick_token([token("q.q.q"), token("h.h.h"), None]), token("q.q.q"));
        assert_eq!(pick_token([token(""), token(""), None]), None);
    }
}
