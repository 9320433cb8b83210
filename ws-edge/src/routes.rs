//! The HTTP routes: `/ws`, `/healthz`, `/readyz`, the demo page `/` and `/demo/config`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Deserialize;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::demo;
use crate::server::Edge;
use crate::session;
use crate::upgrade::{self, Upgrade};

/// Returns every route of the edge.
pub fn routes(edge: Arc<Edge>) -> impl Filter<Extract = (impl Reply,), Error = Rejection> + Clone {
    let with_edge = warp::any().map(move || edge.clone());

    let websocket = warp::path!("ws")
        .and(upgrade::upgrade())
        .and(token())
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

#[derive(Default, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Extracts the token from `?token=` or from `Authorization: Bearer`, if either is present.
/// Neither the token nor the query string is ever logged.
fn token() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    let query = warp::query::<TokenQuery>()
        .or(warp::any().map(TokenQuery::default))
        .unify()
        .map(|query: TokenQuery| query.token);
    let header = warp::header::optional::<String>("authorization")
        .or(warp::any().map(|| None))
        .unify();
    query.and(header).map(|query: Option<String>, header: Option<String>| {
        query.or_else(|| header?.strip_prefix("Bearer ").map(str::to_owned))
    })
}

/// Finishes the upgrade and starts the socket's session, unless the edge is draining.
fn open_socket(upgrade: Upgrade, token: Option<String>, remote: Option<SocketAddr>, edge: Arc<Edge>) -> Response {
    if edge.shutdown.is_cancelled() {
        tracing::info!(client.addr = ?remote, "refusing websocket upgrade while draining");
        return upgrade::status(StatusCode::SERVICE_UNAVAILABLE);
    }
    let span = tracing::info_span!(
        "ws_session",
        client.addr = ?remote,
        user_id = tracing::field::Empty,
        conn_id = tracing::field::Empty,
    );
    let (config, sessions) = (edge.socket_config, edge.sessions.clone());
    span.in_scope(|| upgrade.respond(config, &sessions, move |socket| session::run(socket, edge, token)))
}

/// Returns 200 while the stream reader runs and the edge is not draining, else 503.
fn readiness(edge: Arc<Edge>) -> impl Reply {
    if edge.is_ready() {
        warp::reply::with_status("ready", StatusCode::OK)
    } else {
        warp::reply::with_status("not ready", StatusCode::SERVICE_UNAVAILABLE)
    }
}
