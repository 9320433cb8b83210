//! The edge's use of the shared HTTP accept loop ([`notify_proto::http_server`]): the filter
//! that reads the client's address it records, and its header read timeout.

use std::net::SocketAddr;

use notify_proto::http_server::ClientAddr;
pub use notify_proto::http_server::HEADER_READ_TIMEOUT;

/// Returns a filter that extracts the client's address, when the request came through
/// [`notify_proto::http_server::serve`].
pub fn client_addr() -> impl warp::Filter<Extract = (Option<SocketAddr>,), Error = std::convert::Infallible> + Clone {
    use warp::Filter;
    warp::ext::optional::<ClientAddr>().map(|addr: Option<ClientAddr>| addr.map(|ClientAddr(addr)| addr))
}
