//! The life of one socket.
//!
//! 1. Authenticate: the token comes from the URL, the `Authorization` header or the subprotocol
//!    list, or else from an `auth` frame within [`AUTH_TIMEOUT`]. Nothing but a close frame is
//!    sent before the token is verified: 4001 without a token, 4002 with an invalid one.
//!    While the socket lives, a `token_expiring` frame comes `TOKEN_EXPIRY_WARNING` before the
//!    token's expiry, and the socket closes with 4003 at the expiry unless `refresh` moved it.
//! 2. Run: this task reads client frames and replies through the socket's outbound queue, which
//!    the fan-out writes into too. The writer task ([`crate::writer`]) writes what a full socket
//!    buffer held back, pings idle peers and sends the close frame.
//! 3. End together: when the reader stops (peer closed, read error, token expired), it requests
//!    the ending through the queue and waits for the writer. When the writer stops (slow
//!    consumer, shutdown, idle peer, write error), the reader stops too. Then every subscription
//!    is removed from the hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, Stream, StreamExt};
use notify_proto::claims::Claims;
use notify_proto::protocol::{close, error_code};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};
use tracing::Instrument;

use crate::admission::{MessageLimiter, SocketSlot, Verdict};
use crate::auth::{ChannelError, MAX_TOKEN_LIFETIME, Verifier};
use crate::frames::{self, Reply, Request};
use crate::hub::{HeadError, Registration, Socket, Subscription};
use crate::metrics;
use crate::outbound::{Ending, Outbound};
use crate::recovery::{RecoveryError, fits_at_once};
use crate::server::Edge;
use crate::upgrade::{Connection, WebSocket};
use crate::writer::{self, Activity, WRITE_TIMEOUT, WriteError};

/// Time a client has to send its `auth` frame when the URL carries no token.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a subscription waits for the stream reader to reach the requested position (another edge
/// may have delivered it a moment earlier) or to start.
pub const HEAD_WAIT: Duration = Duration::from_secs(1);
/// Time the server waits for the client's close frame after sending its own.
pub const CLOSE_LINGER: Duration = Duration::from_secs(2);

/// A close code and reason sent before authentication completes.
type Rejection = (u16, &'static str);

/// Runs one upgraded connection to its end. `token` is the token from the URL or header, if any;
/// `slot` is the socket's place in the socket counts, held until the end.
pub async fn run(connection: Connection, edge: Arc<Edge>, token: Option<String>, mut slot: SocketSlot) {
    let Connection {
        socket: mut stream,
        queue,
    } = connection;
    let authenticated = tokio::select! {
        // Boxed: verifying a token may fetch the JWKS, which makes this future several KiB.
        result = Box::pin(authenticate(&mut stream, &edge.verifier, token)) => result,
        () = edge.shutdown.cancelled() => Err((close::SERVICE_RESTART, "server restarting")),
    };
    let admitted = authenticated.and_then(|claims| match edge.admission.add_user_socket(&mut slot, &claims.sub) {
        Ok(()) => Ok(claims),
        Err(max) => {
            tracing::debug!(max, "user has too many sockets");
            Err((close::RATE_LIMITED, "too many sockets for this user"))
        }
    });
    let claims = match admitted {
        Ok(claims) => claims,
        Err((code, reason)) => {
            // Before authentication, 4029 is sent only for too many sockets of one user.
            let label = match code {
                close::RATE_LIMITED => metrics::MAX_SOCKETS_PER_USER,
                code => metrics::close_reason(code),
            };
            edge.metrics.socket_ended(label, Some(code));
            tracing::debug!(code, reason, "rejected socket before authentication");
            let _ = writer::close(&queue, Ending::Close(code, reason)).await;
            await_close_reply(&mut stream).await;
            return;
        }
    };

    let session = Session::new(edge, claims, slot, queue);
    let span = tracing::Span::current();
    span.record("user_id", session.socket.user_id.as_str());
    span.record("conn_id", session.socket.conn_id.as_str());
    tracing::debug!("socket authenticated");
    let writer = tokio::spawn(
        writer::run(
            session.socket.clone(),
            session.activity.clone(),
            session.edge.shutdown.clone(),
        )
        .instrument(span.clone()),
    );
    // The read loop gets its own task, so this one ends here and frees the memory of the
    // handshake and authentication states, which would otherwise stay reserved per socket.
    let sessions = session.edge.sessions.clone();
    sessions.spawn(session.run(stream, writer).instrument(span));
}

/// Returns the verified claims, or the close code to reject the socket with.
async fn authenticate<S>(stream: &mut S, verifier: &Verifier, token: Option<String>) -> Result<Claims, Rejection>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let token = match token.filter(|token| !token.is_empty()) {
        Some(token) => token,
        None => auth_frame_token(stream).await?,
    };
    verifier.verify(&token).await.map_err(|err| {
        tracing::debug!(error = %err, "token rejected");
        (close::INVALID_TOKEN, "invalid token")
    })
}

/// Waits for the first frame, which must be `{"type":"auth","token":..}`.
async fn auth_frame_token<S>(stream: &mut S) -> Result<String, Rejection>
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    const NO_TOKEN: Rejection = (close::NO_TOKEN, "no token");
    let deadline = Instant::now() + AUTH_TIMEOUT;
    loop {
        let message = tokio::time::timeout_at(deadline, stream.next())
            .await
            .map_err(|_| NO_TOKEN)?;
        return match message {
            // tungstenite replies to pings itself; they do not count as the first frame.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(text))) => match frames::parse_request(&text) {
                Ok(Request::Auth { token }) => Ok(token),
                _ => Err(NO_TOKEN),
            },
            Some(Err(err)) => match read_error_ending(&err) {
                Ending::Close(code, reason) => Err((code, reason)),
                Ending::Stop => Err(NO_TOKEN),
            },
            _ => Err(NO_TOKEN),
        };
    }
}

/// Next step of the reader after a client frame.
enum Flow {
    Continue,
    End(Ending),
}

/// Outcome of one recovery task: the subscription it replayed, and whether it succeeded.
type Recovered = (Arc<Subscription>, Result<(), RecoveryError>);

/// An authenticated socket's reader side and its subscriptions.
struct Session {
    edge: Arc<Edge>,
    socket: Arc<Socket>,
    activity: Arc<Activity>,
    claims: Claims,
    /// When the token expires: `exp` plus the leeway.
    expires: Instant,
    /// When to send `token_expiring`; `None` once sent for the current token.
    warn_at: Option<Instant>,
    /// Subscriptions by channel. Capacity: `MAX_SUBSCRIPTIONS`; more are refused with an error frame.
    subscriptions: HashMap<String, Arc<Subscription>>,
    /// Replays in progress, at most one per subscription; dropped (and aborted) with the session.
    recoveries: JoinSet<Recovered>,
    /// The socket's and its user's message rate limits.
    messages: MessageLimiter,
    /// The socket's place in the socket counts, freed when the session is dropped.
    _slot: SocketSlot,
}

impl Session {
    fn new(edge: Arc<Edge>, claims: Claims, slot: SocketSlot, queue: Arc<Outbound>) -> Self {
        let socket = Arc::new(Socket {
            conn_id: uuid::Uuid::now_v7().to_string(),
            user_id: claims.sub.clone(),
            queue,
        });
        let expires = expiry(&claims, edge.limits.jwt_leeway);
        let warn_at = Some(warning_time(&claims, edge.limits.token_expiry_warning));
        let messages = edge.admission.message_limiter(&claims.sub);
        Self {
            edge,
            socket,
            activity: Arc::new(Activity::default()),
            claims,
            expires,
            warn_at,
            subscriptions: HashMap::new(),
            recoveries: JoinSet::new(),
            messages,
            _slot: slot,
        }
    }

    /// Sends `connected`, reads until either side ends, then cleans up.
    async fn run(mut self, mut stream: WebSocket, mut writer: JoinHandle<Result<Ending, WriteError>>) {
        let connected = Reply::Connected {
            user_id: &self.socket.user_id,
            conn_id: &self.socket.conn_id,
            expires_at: self.claims.exp,
        };
        self.send(connected.encode());

        let writer_done = self.read_loop(&mut stream, &mut writer).await;
        for subscription in self.subscriptions.values() {
            self.edge.hub.unregister(subscription);
        }
        self.recoveries.abort_all();
        let result = match writer_done {
            Some(result) => result,
            None => finish_writer(writer).await,
        };
        self.count_end(&result);
        // A slow consumer is not reading, so waiting for its reply would only hold its memory.
        if matches!(result, Ok(Ending::Close(code, _)) if code != close::SLOW_CONSUMER) {
            await_close_reply(&mut stream).await;
        }
        match result {
            Ok(ending) => tracing::debug!(?ending, "socket closed"),
            Err(err) => tracing::debug!(error = %err, "socket dropped"),
        }
    }

    /// Counts the socket's close by reason and code, and the frames its overflows discarded.
    fn count_end(&self, result: &Result<Ending, WriteError>) {
        let metrics = &self.edge.metrics;
        let dropped = self.socket.queue.dropped();
        if dropped > 0 {
            metrics.frames_dropped_slow_consumer.inc_by(dropped as u64);
        }
        // A slow consumer counts as one even when its close frame could not be written.
        if self.socket.queue.is_slow_consumer() {
            return metrics.socket_closed(close::SLOW_CONSUMER);
        }
        match result {
            Ok(Ending::Close(code, _)) => metrics.socket_closed(*code),
            Ok(Ending::Stop) => metrics.socket_ended(metrics::CLIENT_CLOSED, None),
            Err(_) => metrics.socket_ended(metrics::WRITE_FAILED, None),
        }
    }

    /// Reads client frames until the socket ends. Returns the writer's result when the writer
    /// ended first.
    async fn read_loop(
        &mut self,
        stream: &mut WebSocket,
        writer: &mut JoinHandle<Result<Ending, WriteError>>,
    ) -> Option<Result<Ending, WriteError>> {
        loop {
            let ending = tokio::select! {
                result = &mut *writer => return Some(result.unwrap_or_else(|err| Err(WriteError::Failed(err.to_string())))),
                () = tokio::time::sleep_until(self.expires) => Ending::Close(close::TOKEN_EXPIRED, "token expired"),
                () = sleep_until_some(self.warn_at), if self.warn_at.is_some() => {
                    self.warn_expiry();
                    continue;
                }
                Some(joined) = self.recoveries.join_next(), if !self.recoveries.is_empty() => {
                    if let Ok(recovered) = joined {
                        self.recovered(recovered);
                    }
                    continue;
                }
                // Boxed: a subscribe may call the notifier, a large future this loop would
                // otherwise hold for the socket's whole life.
                message = stream.next() => match Box::pin(self.handle(message)).await {
                    Flow::Continue => continue,
                    Flow::End(ending) => ending,
                },
            };
            // tungstenite queues its reply to a client's close until the next write or flush.
            let _ = stream.flush().await;
            self.socket.queue.end(ending);
            return None;
        }
    }

    /// Handles one item from the socket's stream.
    async fn handle(&mut self, message: Option<Result<Message, tungstenite::Error>>) -> Flow {
        let message = match message {
            None => return Flow::End(Ending::Stop),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "socket read failed");
                return Flow::End(read_error_ending(&err));
            }
            Some(Ok(message)) => message,
        };
        self.activity.touch();
        if matches!(message, Message::Text(_) | Message::Binary(_))
            && let Some(ending) = self.check_rate()
        {
            return ending;
        }
        match message {
            Message::Text(text) => self.handle_text(&text).await,
            Message::Binary(_) => {
                self.send_error(
                    error_code::BAD_REQUEST,
                    "binary frames are not supported; send JSON text",
                    None,
                );
                Flow::Continue
            }
            Message::Close(_) => Flow::End(Ending::Stop),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Flow::Continue,
        }
    }

    /// Applies the message rate limits to a text or binary message. Returns the flow for a
    /// message that is dropped: a `rate_limited` error frame the first time, then the close 4029.
    fn check_rate(&mut self) -> Option<Flow> {
        let verdict = self.messages.check();
        if verdict == Verdict::Allow {
            return None;
        }
        self.edge.metrics.messages_dropped_rate_limited.inc();
        if verdict == Verdict::Close {
            tracing::debug!("closing socket that kept exceeding its message rate");
            return Some(Flow::End(Ending::Close(close::RATE_LIMITED, "rate limited")));
        }
        let message = "message dropped: too many messages; slow down or the socket is closed with 4029";
        self.send_error(error_code::RATE_LIMITED, message, None);
        Some(Flow::Continue)
    }

    async fn handle_text(&mut self, text: &str) -> Flow {
        let request = match frames::parse_request(text) {
            Ok(request) => request,
            Err(err) => {
                self.send_error(err.code(), &err.to_string(), None);
                return Flow::Continue;
            }
        };
        match request {
            Request::Ping => self.send(Reply::Pong.encode()),
            Request::Subscribe { channel, since } => self.subscribe(channel, since).await,
            Request::Unsubscribe { channel } => self.unsubscribe(&channel),
            Request::Refresh { token } => self.refresh(&token).await,
            Request::Auth { .. } => {
                let message = "the socket is already authenticated; send refresh to replace the token";
                self.send_error(error_code::BAD_REQUEST, message, None);
            }
        }
        Flow::Continue
    }

    /// Replaces the token with a newer one for the same user, moving the expiry. A rejected
    /// token gets an error frame and changes nothing: the socket still closes at the current
    /// token's expiry.
    async fn refresh(&mut self, token: &str) {
        let claims = match self.edge.verifier.verify(token).await {
            Ok(claims) => claims,
            Err(err) => {
                tracing::debug!(error = %err, "refresh token rejected");
                let message = "the refresh token is invalid; the socket keeps its current token";
                return self.send_error(error_code::INVALID_TOKEN, message, None);
            }
        };
        if claims.sub != self.claims.sub {
            return self.send_error(error_code::FORBIDDEN, "the new token is for another user", None);
        }
        self.expires = expiry(&claims, self.edge.limits.jwt_leeway);
        self.warn_at = Some(warning_time(&claims, self.edge.limits.token_expiry_warning));
        self.send(Reply::Refreshed { expires_at: claims.exp }.encode());
        self.claims = claims;
        self.drop_forbidden_subscriptions();
    }

    /// Ends every subscription the current token no longer grants, with an `unsubscribed` frame
    /// whose `reason` is `forbidden`.
    fn drop_forbidden_subscriptions(&mut self) {
        let policy = &self.edge.policy;
        let mut forbidden: Vec<String> = self
            .subscriptions
            .keys()
            .filter(|channel| policy.authorize(&self.claims, channel).is_err())
            .cloned()
            .collect();
        forbidden.sort_unstable();
        for channel in forbidden {
            if let Some(subscription) = self.subscriptions.remove(&channel) {
                self.edge.hub.unregister(&subscription);
            }
            tracing::debug!(channel, "ended a subscription the refreshed token does not grant");
            let reply = Reply::Unsubscribed {
                channel: &channel,
                reason: Some(error_code::FORBIDDEN),
            };
            self.send(reply.encode());
        }
    }

    /// Sends `token_expiring` once for the current token.
    fn warn_expiry(&mut self) {
        self.warn_at = None;
        let in_secs = self.claims.exp.saturating_sub(unix_now().as_secs());
        self.send(
            Reply::TokenExpiring {
                expires_at: self.claims.exp,
                in_secs,
            }
            .encode(),
        );
    }

    /// Subscribes to a channel, replaying from `since` when given. A subscribe of a channel that
    /// is already subscribed replaces that subscription only once every check passed; an error
    /// frame leaves it as it was.
    async fn subscribe(&mut self, channel: String, since: Option<serde_json::Value>) {
        let since = match self.check_subscribe(&channel, since) {
            Ok(since) => since,
            Err((code, message)) => return self.send_error(code, &message, Some(&channel)),
        };

        // Wait briefly for the stream reader to start or to reach `since`.
        let partition = self.edge.hub.partition_of(&channel);
        let waited = self
            .edge
            .hub
            .wait_for_head(partition, since.unwrap_or(0), HEAD_WAIT)
            .await;
        if let Err(err) = waited {
            return self.send_head_error(err, since, &channel);
        }

        // While the partition's reads fail, its head may be behind the store, so the edge cannot
        // tell which events a resume missed.
        if since.is_some() && !self.edge.fanout.is_current(partition) {
            let message = "the edge cannot read the event stream just now, so it cannot recover missed events; \
                           retry after a delay";
            return self.send_error(error_code::UNAVAILABLE, message, Some(&channel));
        }

        // Register in place of the previous subscription, then send `subscribed` and the replay
        // before going live.
        let subscription = Arc::new(Subscription::new(self.socket.clone(), channel.clone(), partition));
        let previous = self.subscriptions.get(&channel);
        let registration = match self.edge.hub.replace(previous, &subscription, since) {
            Ok(registration) => registration,
            Err(err) => return self.send_head_error(err, since, &channel),
        };
        self.subscriptions.insert(channel, subscription.clone());
        self.start_delivery(subscription, since, registration);
    }

    /// Sends `subscribed` and the replay, then switches the subscription live. A replay that
    /// needs the stream or the store runs as a task, so that the socket keeps serving requests.
    fn start_delivery(&mut self, subscription: Arc<Subscription>, since: Option<u64>, registration: Registration) {
        let head = registration.head;
        // A recent-window replay too long to queue at once goes through the recovery task,
        // which waits for room in the socket's queue.
        let limits = self.socket.queue.limits();
        let recent = registration.recent.filter(|frames| fits_at_once(frames, limits));
        let recent = match (since, recent) {
            (Some(since), None) => {
                let recovery = self.edge.recovery.clone();
                let replay = async move {
                    let result = recovery.replay(&subscription, since, head).await;
                    (subscription, result)
                };
                self.recoveries.spawn(replay.in_current_span());
                return;
            }
            (_, recent) => recent.unwrap_or_default(),
        };
        let subscribed = Reply::Subscribed {
            channel: subscription.channel(),
            position: head,
            recovered: since.map(|_| true),
        };
        let frames = std::iter::once(subscribed.encode()).chain(recent);
        for frame in frames {
            if !subscription.send(frame) {
                return;
            }
        }
        subscription.go_live(head);
    }

    /// Checks a subscribe request before any waiting: the channel, `since` and the limit.
    fn check_subscribe(
        &self,
        channel: &str,
        since: Option<serde_json::Value>,
    ) -> Result<Option<u64>, (&'static str, String)> {
        if let Err(err) = self.edge.policy.authorize(&self.claims, channel) {
            let code = match err {
                ChannelError::Invalid(_) => error_code::INVALID_CHANNEL,
                ChannelError::Forbidden(_) => error_code::FORBIDDEN,
            };
            return Err((code, err.to_string()));
        }
        let since = since.map(|since| frames::parse_since(&since)).transpose();
        let since = since.map_err(|message| (error_code::INVALID_POSITION, message))?;
        let max = self.edge.limits.max_subscriptions;
        if !self.subscriptions.contains_key(channel) && self.subscriptions.len() >= max {
            let message = format!("a socket may hold at most {max} subscriptions; unsubscribe first");
            return Err((error_code::TOO_MANY_SUBSCRIPTIONS, message));
        }
        Ok(since)
    }

    fn send_head_error(&self, err: HeadError, since: Option<u64>, channel: &str) {
        match err {
            HeadError::NotReady => {
                let message = "the edge is not reading the stream yet; retry shortly";
                self.send_error(error_code::UNAVAILABLE, message, Some(channel));
            }
            HeadError::Behind { head } => {
                let since = since.unwrap_or_default();
                let message = format!("since {since} is ahead of the channel's position {head}");
                self.send_error(error_code::INVALID_POSITION, &message, Some(channel));
            }
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        match self.subscriptions.remove(channel) {
            Some(subscription) => {
                self.edge.hub.unregister(&subscription);
                self.send(Reply::Unsubscribed { channel, reason: None }.encode());
            }
            None => self.send_error(
                error_code::NOT_SUBSCRIBED,
                "the channel is not subscribed",
                Some(channel),
            ),
        }
    }

    /// Handles a finished replay: a failed one drops its subscription and sends an error frame.
    fn recovered(&mut self, (subscription, result): Recovered) {
        let Err(err) = result else { return };
        tracing::warn!(
            conn_id = %self.socket.conn_id,
            channel = subscription.channel(),
            error = %err,
            "replay failed"
        );
        self.edge.metrics.store_error(metrics::operation::REPLAY);
        self.edge.hub.unregister(&subscription);
        let channel = subscription.channel();
        if self
            .subscriptions
            .get(channel)
            .is_some_and(|current| Arc::ptr_eq(current, &subscription))
        {
            self.subscriptions.remove(channel);
            let message = "missed events could not be read; subscribe again later";
            self.send_error(error_code::UNAVAILABLE, message, Some(channel));
        }
    }

    fn send(&self, frame: Utf8Bytes) {
        // A full queue ends the socket by itself; the writer then stops the reader.
        let _ = self.socket.queue.push(frame);
    }

    fn send_error(&self, code: &str, message: &str, channel: Option<&str>) {
        self.send(frames::error(code, message, channel));
    }
}

/// Returns how to end a socket whose read failed: with the close code RFC 6455 assigns to a
/// client's error (1009 too big, 1007 invalid UTF-8, 1002 protocol error), or without a close
/// frame when the connection itself is gone.
fn read_error_ending(err: &tungstenite::Error) -> Ending {
    use tungstenite::error::ProtocolError;
    match err {
        tungstenite::Error::Capacity(_) => Ending::Close(close::MESSAGE_TOO_BIG, "message too big"),
        tungstenite::Error::Utf8(_) => Ending::Close(close::INVALID_PAYLOAD, "invalid UTF-8"),
        tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => Ending::Stop,
        tungstenite::Error::Protocol(_) => Ending::Close(close::PROTOCOL_ERROR, "protocol error"),
        _ => Ending::Stop,
    }
}

/// Reads and discards client frames until the client's close frame arrives, for at most
/// [`CLOSE_LINGER`], after the server sent its own close frame.
///
/// Closing the TCP connection while the client's frames are still unread makes the kernel reset
/// it, and a reset discards the server's close frame if the client has not read it yet. A client
/// flooding the socket would then get a reset instead of its close code.
async fn await_close_reply<S>(stream: &mut S)
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let drain = async {
        while let Some(Ok(message)) = stream.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
}

/// Waits for the writer to send its close frame, and aborts it when that takes too long.
async fn finish_writer(mut writer: JoinHandle<Result<Ending, WriteError>>) -> Result<Ending, WriteError> {
    match tokio::time::timeout(WRITE_TIMEOUT + Duration::from_secs(1), &mut writer).await {
        Ok(joined) => joined.unwrap_or_else(|err| Err(WriteError::Failed(err.to_string()))),
        Err(_) => {
            writer.abort();
            Err(WriteError::TimedOut)
        }
    }
}

/// Returns when a token stops being valid: its `exp` plus the leeway, at most a year ahead.
fn expiry(claims: &Claims, leeway: Duration) -> Instant {
    let left = Duration::from_secs(claims.exp).saturating_sub(unix_now()) + leeway;
    Instant::now() + left.min(MAX_TOKEN_LIFETIME)
}

/// Returns when to send `token_expiring`: `warning` before `exp`, or now when that has passed.
fn warning_time(claims: &Claims, warning: Duration) -> Instant {
    let left = Duration::from_secs(claims.exp).saturating_sub(unix_now());
    Instant::now() + left.saturating_sub(warning).min(MAX_TOKEN_LIFETIME)
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Sleeps until `deadline`, or forever when there is none.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
