//! The HTTP accept loop, in place of `warp::serve`: warp 0.4.3 sets no timer on hyper's
//! connection builder, so a client that never finishes its request headers would hold its
//! connection open forever. Here each connection gets hyper's `header_read_timeout`.
//!
//! Connections are served by hyper's HTTP/1 builder over a `TokioIo<TcpStream>`, so that an
//! upgraded WebSocket connection can be taken back as its TCP stream (see [`crate::upgrade`]).
//! WebSocket upgrades need HTTP/1.1 anyway.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use notify_proto::telemetry::throttle::{self, LogThrottle};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use warp::filters::BoxedFilter;
use warp::http::Request;
use warp::reply::Response;

/// Time a client has to send the headers of a request, from the connection's start or the end
/// of its previous request. A client that takes longer is disconnected without a response.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error such as too many open files, so that the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Accept errors repeat every [`ACCEPT_ERROR_PAUSE`] while file descriptors run out, so their
/// warning is rate-limited.
static ACCEPT_FAILED_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);

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

/// The client's address, in each request's extensions; [`client_addr`] reads it.
#[derive(Debug, Clone, Copy)]
struct ClientAddr(SocketAddr);

/// Returns a filter that extracts the client's address, when the request came through [`serve`].
pub fn client_addr() -> impl warp::Filter<Extract = (Option<SocketAddr>,), Error = std::convert::Infallible> + Clone {
    use warp::Filter;
    warp::ext::optional::<ClientAddr>().map(|addr: Option<ClientAddr>| addr.map(|ClientAddr(addr)| addr))
}

/// Serves `routes` on `listener` until `stop` resolves, then closes the listener, cancels
/// `listener_closed`, and waits for the requests in progress. Upgraded WebSocket connections
/// are no longer the server's by then, so the caller bounds this wait and drains the sockets
/// itself.
pub async fn serve(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    stop: impl Future<Output = ()>,
    listener_closed: CancellationToken,
) {
    let (connections, stopping) = (TaskTracker::new(), CancellationToken::new());
    let mut stop = std::pin::pin!(stop);
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                if let Some(suppressed) = ACCEPT_FAILED_LOG.allow() {
                    tracing::warn!(error = %err, suppressed, "accepting a connection failed");
                }
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        // Frames are written as soon as they are ready; Nagle's algorithm would hold small ones
        // back until the client acknowledges the previous write.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(client.addr = %remote, error = %err, "could not disable Nagle's algorithm");
        }
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(ClientAddr(remote));
            hyper::service::Service::call(&service, request)
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
        let stopping = stopping.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = stopping.cancelled() => {
                    // Finishes the request in progress, then closes; an upgrade is already ours.
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = result {
                tracing::debug!(client.addr = %remote, error = %err, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    listener_closed.cancel();
    stopping.cancel();
    connections.close();
    connections.wait().await;
}
