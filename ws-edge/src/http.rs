//! The edge's use of the shared HTTP accept loop ([`notify_proto::http_server`]): the binding
//! of its listener, the filter that reads the client's address the loop records, and its header
//! read timeout.

use std::net::SocketAddr;

use notify_proto::http_server::ClientAddr;
pub use notify_proto::http_server::HEADER_READ_TIMEOUT;
use tokio::net::{TcpListener, TcpSocket};

/// Pending connections the kernel queues for `accept`, as in `tokio::net::TcpListener::bind`.
const LISTEN_BACKLOG: u32 = 1024;

/// Binds the edge's listener on `addr`, with `SO_REUSEADDR` as `TcpListener::bind` sets it, and
/// with `SO_REUSEPORT` when `reuseport` is set. With `SO_REUSEPORT` several processes can listen
/// on one port, and Linux spreads new connections over their listeners by a hash of the
/// connection's addresses, so a replacement edge can start before the old one drains.
///
/// # Errors
/// Fails when the address is in use by a listener without `SO_REUSEPORT` (or of another user),
/// or when the platform has no `SO_REUSEPORT`.
pub fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuseport {
        set_reuseport(&socket)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))))]
fn set_reuseport(socket: &TcpSocket) -> std::io::Result<()> {
    socket.set_reuseport(true)
}

#[cfg(not(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin")))))]
fn set_reuseport(_socket: &TcpSocket) -> std::io::Result<()> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "SO_REUSEPORT is not available on this platform; unset EDGE_LISTEN_REUSEPORT",
    ))
}

/// Returns a filter that extracts the client's address, when the request came through
/// [`notify_proto::http_server::serve`].
pub fn client_addr() -> impl warp::Filter<Extract = (Option<SocketAddr>,), Error = std::convert::Infallible> + Clone {
    use warp::Filter;
    warp::ext::optional::<ClientAddr>().map(|addr: Option<ClientAddr>| addr.map(|ClientAddr(addr)| addr))
}
