//! The HTTP routes: `/ws`, `/healthz`, `/readyz`, the demo page `/` and `/demo/config`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use warp::http::{HeaderValue, StatusCode, header};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::admission::Rejected;
use crate::demo;
use crate::server::Edge;
use crate::session;
use crate::stats::Stats;
use crate::upgrade::{self, Upgrade};

/// Returns every route of the edge.
pub fn routes(edge: Arc<Edge>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let with_edge = warp::any().map(move || edge.clone());

    let websocket = warp::path!("ws")
        .and(upgrade::upgrade())
        .and(handshake())
        .and(warp::addr::remote())
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
                let bearer = authorization.and_then(|value| value.strip_prefix("Bearer ").map(str::to_owned));
                handshake.token = query.or(bearer).or(protocol_token);
                handshake
            },
        )
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
        return upgrade::status(StatusCode::FORBIDDEN);
    }
    if edge.shutdown.is_cancelled() {
        tracing::info!(client.addr = ?remote, "refusing websocket upgrade while draining");
        return upgrade::status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let slot = match edge.admission.admit() {
        Ok(slot) => slot,
        Err(rejected) => return reject_upgrade(&edge, rejected, remote),
    };
    let token = handshake.token;
    let span = tracing::info_span!(
        "ws_session",
        client.addr = ?remote,
        user_id = tracing::field::Empty,
        conn_id = tracing::field::Empty,
    );
    let (config, sessions) = (edge.socket_config, edge.sessions.clone());
    let mut response =
        span.in_scope(|| upgrade.respond(config, &sessions, move |socket| session::run(socket, edge, token, slot)));
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
/// (at least 1) over the handshake rate, 503 when every socket slot is taken.
fn reject_upgrade(edge: &Edge, rejected: Rejected, remote: Option<SocketAddr>) -> Response {
    match rejected {
        Rejected::Rate(wait) => {
            Stats::add(&edge.stats.rejected_handshake_rate_total);
            tracing::debug!(client.addr = ?remote, wait_ms = wait.as_millis() as u64, "upgrade over the handshake rate");
            let mut response = upgrade::status(StatusCode::TOO_MANY_REQUESTS);
            let retry_after = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after.max(1)));
            response
        }
        Rejected::Full => {
            Stats::add(&edge.stats.rejected_max_sockets_total);
            tracing::debug!(client.addr = ?remote, sockets = edge.admission.sockets(), "upgrade over MAX_SOCKETS");
            upgrade::status(StatusCode::SERVICE_UNAVAILABLE)
        }
    }
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
}
