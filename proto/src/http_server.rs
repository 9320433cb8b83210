//! The HTTP accept loop of both services, in place of `warp::serve`.
//!
//! warp 0.4.3 sets no timer on hyper's connection builder, so a client that never finishes its
//! request headers would hold its connection, and a file descriptor, forever. [`serve`] gives
//! every connection hyper's header read timeout and a maximum age, and caps how many connections
//! it serves at once. The age covers what the header timeout does not: a client that sends
//! requests but reads no responses, so that the server's writes never finish.
//!
//! Connections speak HTTP/1 only. hyper-util's automatic HTTP/1 and HTTP/2 detection (0.1.21)
//! first waits for up to 24 bytes with no timeout, and hyper's HTTP/2 server has no header read
//! timeout, so either would let an idle connection keep its place under the cap forever. The
//! probes, Prometheus scrapes and WebSocket upgrades served here all use HTTP/1.1. Serving
//! hyper's HTTP/1 builder over a `TokioIo<TcpStream>` also lets the edge take an upgraded
//! connection back as its TCP stream.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::throttle::{self, LogThrottle};

/// Time a client has to send the headers of a request, from the connection's start or the end
/// of its previous request. A client that takes longer is disconnected without a response.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Maximum connections served at once on a listener for probes and metrics: the notifier's
/// `NOTIFIER_HTTP_LISTEN` and the edge's `EDGE_METRICS_LISTEN`. Probes and scrapes open a few
/// connections at a time, so 64 leaves room for several Prometheus servers and kubelets.
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// Time after which a connection that has not upgraded is asked to close. The header read
/// timeout only covers reading: a client that pipelines requests and never reads the responses
/// blocks the server's writes, and would otherwise hold its place under the cap forever. No
/// connection that keeps to the header read timeout needs this long for its requests.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30);
/// Time a connection asked to close (by its age or by the server's stop) has to finish the
/// response in progress before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);
/// Largest request head (request line and headers) a connection may send, in bytes, checked
/// after each read of an incomplete head. A larger one gets 431 and the connection closes.
/// hyper's default limit is 8 KiB plus 400 KiB, which every connection that never finishes its
/// headers could fill until the header read timeout. A handshake's head needs a few KiB, token
/// included.
pub const MAX_REQUEST_HEAD_BYTES: usize = 64 * 1024;
/// Pause after an accept error such as too many open files, so that the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);
/// Accept errors repeat every [`ACCEPT_ERROR_PAUSE`] while file descriptors run out, so their
/// warning is rate-limited.
static ACCEPT_FAILED_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);
/// A flood of connections over the cap would log one line each, so the warning is rate-limited.
static REJECTED_LOG: LogThrottle = LogThrottle::new(throttle::DEFAULT_INTERVAL);

/// The client's address, which [`serve`] puts in each request's extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub SocketAddr);

/// Limits of the connections [`serve`] accepts.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers; see [`HEADER_READ_TIMEOUT`].
    pub header_read_timeout: Duration,
    /// Age at which a connection is asked to close; see [`MAX_CONNECTION_AGE`].
    pub max_age: Duration,
    /// Time a connection asked to close has to finish its response; see [`CLOSE_GRACE`].
    pub close_grace: Duration,
    /// Maximum connections served at once, counted from the accept until the connection closes
    /// or is upgraded (a WebSocket is then no longer the server's). One more is closed at once,
    /// without a response.
    pub max_connections: usize,
    /// Counts the connections closed because `max_connections` were open.
    pub rejected: Counter,
}

impl ConnectionLimits {
    /// Returns limits with the [`HEADER_READ_TIMEOUT`] and `max_connections`, counting
    /// rejections in `rejected`.
    pub fn new(max_connections: usize, rejected: Counter) -> Self {
        Self {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_age: MAX_CONNECTION_AGE,
            close_grace: CLOSE_GRACE,
            max_connections,
            rejected,
        }
    }
}

/// Serves `service` on `listener` until `stop` resolves, then closes the listener, cancels
/// `listener_closed`, asks every connection to finish its request in progress, and waits for
/// them. Connections upgraded to WebSocket have left the server by then, so their owner drains
/// them.
///
/// Each request carries the client's [`ClientAddr`] in its extensions.
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: ConnectionLimits,
    stop: impl Future<Output = ()>,
    listener_closed: CancellationToken,
) where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    let places = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
    let connections = TaskTracker::new();
    let stopping = CancellationToken::new();
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
        let Ok(place) = places.clone().try_acquire_owned() else {
            reject(stream, remote, &limits);
            continue;
        };
        let connection = serve_connection(stream, remote, service.clone(), &limits, place, stopping.clone());
        connections.spawn(connection);
    }

    drop(listener);
    listener_closed.cancel();
    stopping.cancel();
    connections.close();
    connections.wait().await;
}

/// Closes a connection over the cap and counts it.
fn reject(stream: TcpStream, remote: SocketAddr, limits: &ConnectionLimits) {
    drop(stream);
    limits.rejected.inc();
    if let Some(suppressed) = REJECTED_LOG.allow() {
        tracing::warn!(
            client.addr = %remote,
            max_connections = limits.max_connections,
            suppressed,
            "closed a new connection: too many open HTTP connections"
        );
    }
}

/// Serves one connection until it closes or is upgraded, holding its `place` under the cap
/// until then. When `stopping` is cancelled or the connection reaches `limits.max_age`, it
/// finishes its request in progress and closes. A connection that has not finished after
/// `limits.close_grace`, such as one whose client reads no responses, is dropped.
fn serve_connection<S, B>(
    stream: TcpStream,
    remote: SocketAddr,
    service: S,
    limits: &ConnectionLimits,
    place: OwnedSemaphorePermit,
    stopping: CancellationToken,
) -> impl Future<Output = ()> + Send + 'static
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn StdError + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    // Frames are written as soon as they are ready: Nagle's algorithm would hold small ones
    // back until the client acknowledges the previous write.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(client.addr = %remote, error = %err, "could not disable Nagle's algorithm");
    }
    let service = TowerToHyperService::new(service);
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ClientAddr(remote));
        hyper::service::Service::call(&service, request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD_BYTES);
    let connection = builder.serve_connection(TokioIo::new(stream), service).with_upgrades();
    let (max_age, close_grace) = (limits.max_age, limits.close_grace);
    async move {
        let _place = place;
        let mut connection = std::pin::pin!(connection);
        let finished = tokio::select! {
            result = connection.as_mut() => Some(result),
            () = stopping.cancelled() => None,
            () = tokio::time::sleep(max_age) => None,
        };
        let result = match finished {
            Some(result) => result,
            None => {
                connection.as_mut().graceful_shutdown();
                match tokio::time::timeout(close_grace, connection).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::debug!(client.addr = %remote, "dropped an HTTP connection that did not finish its response");
                        Ok(())
                    }
                }
            }
        };
        if let Err(err) = result {
            tracing::debug!(client.addr = %remote, error = %err, "HTTP connection ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::future::Ready;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::oneshot;

    use super::*;

    /// Size of the response to `GET /big`, more than the socket buffers of a client that reads
    /// nothing take.
    const BIG_RESPONSE: usize = 32 << 20;

    /// Returns `ok` with the client's port, to show that [`ClientAddr`] reached the request, or
    /// [`BIG_RESPONSE`] bytes for `GET /big`.
    #[derive(Clone)]
    struct Hello;

    impl tower_service::Service<Request<Incoming>> for Hello {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = Ready<Result<Response<String>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Incoming>) -> Self::Future {
            if request.uri().path() == "/big" {
                return std::future::ready(Ok(Response::new("x".repeat(BIG_RESPONSE))));
            }
            let port = request
                .extensions()
                .get::<ClientAddr>()
                .map(|ClientAddr(addr)| addr.port());
            std::future::ready(Ok(Response::new(format!("ok {port:?}"))))
        }
    }

    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start(header_read_timeout: Duration, max_connections: usize, rejected: Counter) -> Server {
        let limits = ConnectionLimits {
            header_read_timeout,
            max_age: MAX_CONNECTION_AGE,
            close_grace: CLOSE_GRACE,
            max_connections,
            rejected,
        };
        start_with(limits).await
    }

    async fn start_with(limits: ConnectionLimits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let task = tokio::spawn(serve(listener, Hello, limits, stopped, CancellationToken::new()));
        Server { addr, stop, task }
    }

    impl Server {
        async fn stop(self) {
            let _ = self.stop.send(());
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("serve returns after stop")
                .expect("serve task");
        }
    }

    /// Sends a whole request and returns the response.
    async fn get(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        stream.write_all(request).await.expect("write");
        let mut response = String::new();
        let read = stream.read_to_string(&mut response);
        tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .expect("a response in time")
            .expect("read");
        response
    }

    /// Sends a whole request and returns the response, or an empty string when the server closed
    /// the connection first.
    async fn try_get(addr: SocketAddr) -> String {
        let mut response = String::new();
        let Ok(mut stream) = TcpStream::connect(addr).await else {
            return response;
        };
        let request = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";
        if stream.write_all(request).await.is_err() {
            return response;
        }
        let read = stream.read_to_string(&mut response);
        match tokio::time::timeout(Duration::from_secs(5), read).await {
            Ok(Ok(_)) => response,
            _ => String::new(),
        }
    }

    /// Sends requests until one gets 200, failing the test with `failure` after 5 s.
    async fn wait_until_served(addr: SocketAddr, failure: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let response = try_get(addr).await;
            if response.starts_with("HTTP/1.1 200 OK") {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{failure}: {response:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns whether the server closed `stream` within `wait`.
    async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
        let mut rest = Vec::new();
        tokio::time::timeout(wait, stream.read_to_end(&mut rest)).await.is_ok()
    }

    #[tokio::test]
    async fn unfinished_headers_time_out() {
        let timeout = Duration::from_millis(300);
        let server = start(timeout, 8, Counter::default()).await;
        let started = tokio::time::Instant::now();
        let mut silent = TcpStream::connect(server.addr).await.expect("connect");
        let mut partial = TcpStream::connect(server.addr).await.expect("connect");
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write half a header");

        assert!(
            closed_within(&mut silent, Duration::from_secs(5)).await,
            "silent client still open"
        );
        assert!(
            closed_within(&mut partial, Duration::from_secs(5)).await,
            "partial header still open"
        );
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(250),
            "closed after {elapsed:?}, before the timeout"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn requests_carry_the_client_address() {
        let server = start(HEADER_READ_TIMEOUT, 8, Counter::default()).await;
        let response = get(server.addr).await;
        assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
        assert!(response.ends_with(')'), "no client port in {response}");
        assert!(response.contains("ok Some("), "{response}");
        server.stop().await;
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_closed() {
        let rejected = Counter::default();
        let server = start(HEADER_READ_TIMEOUT, 2, rejected.clone()).await;
        let mut first = TcpStream::connect(server.addr).await.expect("connect");
        let mut second = TcpStream::connect(server.addr).await.expect("connect");
        let mut third = TcpStream::connect(server.addr).await.expect("connect");

        assert!(
            closed_within(&mut third, Duration::from_secs(5)).await,
            "third connection still open"
        );
        assert_eq!(rejected.get(), 1);
        let short = Duration::from_millis(200);
        assert!(!closed_within(&mut first, short).await, "first connection closed");
        assert!(!closed_within(&mut second, short).await, "second connection closed");

        // A closed connection frees its place.
        drop(first);
        wait_until_served(server.addr, "no place was freed").await;
        drop(second);
        server.stop().await;
    }

    /// A client that pipelines requests and reads none of the responses blocks the server's
    /// writes, which the header read timeout does not cover. Its place is freed once the
    /// connection reaches its maximum age and the close grace has passed.
    #[tokio::test]
    async fn stalled_reader_frees_its_place() {
        let limits = ConnectionLimits {
            header_read_timeout: Duration::from_millis(300),
            max_age: Duration::from_millis(500),
            close_grace: Duration::from_millis(300),
            max_connections: 1,
            rejected: Counter::default(),
        };
        let server = start_with(limits).await;
        let stalled = tokio::net::TcpSocket::new_v4().expect("socket");
        stalled.set_recv_buffer_size(4096).expect("small receive buffer");
        let mut stalled = stalled.connect(server.addr).await.expect("connect");
        let request = b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n";
        stalled.write_all(&request.repeat(2)).await.expect("write");

        // The server cannot finish the response, so the connection keeps the only place.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut second = TcpStream::connect(server.addr).await.expect("connect");
        assert!(
            closed_within(&mut second, Duration::from_secs(2)).await,
            "a second connection was served while the first held the only place"
        );

        // The place is freed once the connection's age and the close grace have passed.
        wait_until_served(server.addr, "the stalled connection still holds its place").await;
        drop(stalled);
        server.stop().await;
    }

    #[tokio::test]
    async fn oversized_request_head_is_rejected() {
        let server = start(HEADER_READ_TIMEOUT, 8, Counter::default()).await;
        // hyper checks the limit only while a head is incomplete, after each read, so one read may
        // take a head somewhat past it. Four times the limit is over it in any case.
        let header = "a".repeat(4 * MAX_REQUEST_HEAD_BYTES);
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        let request = format!("GET / HTTP/1.1\r\nHost: test\r\nX-Big: {header}\r\n\r\n");
        // The server may close before it has read the whole request, so a failed write is fine.
        let _ = stream.write_all(request.as_bytes()).await;
        // The server responds with 431 and closes. The close may reset the connection before the
        // response is read, and then the read returns nothing, but the request is not served either way.
        let mut response = vec![0; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut response))
            .await
            .expect("a response in time");
        if let Ok(read) = read {
            let response = String::from_utf8_lossy(&response[..read]);
            assert!(
                response.is_empty() || response.starts_with("HTTP/1.1 431"),
                "{response}"
            );
        }

        let small = format!(
            "GET / HTTP/1.1\r\nHost: test\r\nX-Token: {}\r\n\r\n",
            "a".repeat(16 * 1024)
        );
        let mut stream = TcpStream::connect(server.addr).await.expect("connect");
        stream.write_all(small.as_bytes()).await.expect("write");
        let mut response = vec![0; 64];
        let read = stream.read(&mut response).await.expect("read");
        let response = String::from_utf8_lossy(&response[..read]);
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        server.stop().await;
    }
}
