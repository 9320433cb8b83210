//! The load client: a fleet of WebSocket sockets, each authenticated and subscribed to one
//! channel, that counts deliveries, duplicates (by event id) and gaps (by the publisher's
//! sequence number), and records the latency from each event's intended send time.
//!
//! Each socket is one task that reads its frames and records them itself. Sockets bind to
//! source addresses 127.0.0.1 to 127.0.0.N before connecting, so many sockets do not run out
//! of ephemeral ports of one source address. Connects, reconnects included, are bounded by one
//! semaphore, so the client never opens more than `connect_concurrency` at a time.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Deserialize;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{WebSocketStream, client_async_with_config};
use tokio_util::sync::CancellationToken;

use notify_proto::protocol::close::SERVICE_RESTART;

use crate::publisher::Payload;
use crate::stats::{latency_histogram, record_latency};
use crate::token::TokenMinter;
use crate::wire::{Incoming, PONG, Protocol};

/// Read buffer of each client socket. tungstenite's default is 128 KiB, which at 10,000
/// sockets would make the client, not the server, the memory hog.
pub const READ_BUFFER_SIZE: usize = 4 * 1024;
/// Default maximum of connects in progress at once. It is high because browsers reconnecting
/// after a deploy have no shared cap; with 64 the client itself slowed the reconnect storm.
pub const DEFAULT_CONNECT_CONCURRENCY: usize = 1024;
/// How long one connect, handshake and subscribe may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Reconnect attempts of one socket after a disconnect before it gives up.
pub const MAX_RECONNECT_ATTEMPTS: u32 = 30;
/// Default first reconnect step; each delay is drawn between zero and the step (full jitter).
pub const RECONNECT_FIRST_STEP: Duration = Duration::from_millis(500);
/// Default largest reconnect step.
pub const RECONNECT_MAX_STEP: Duration = Duration::from_secs(4);
/// Default window of the first reconnect after a 1012 close; see [`Backoff::restart_window`].
pub const RESTART_RECONNECT_WINDOW: Duration = Duration::from_millis(250);
/// Extra time the first connects of a fleet may take for retries.
const CONNECT_RETRY_SLACK: Duration = Duration::from_secs(60);
/// Latency and counter shards; sockets are spread over them so that two cores rarely contend.
const SHARDS: usize = 16;
/// Value of the catch-up target while none is set.
const NO_TARGET: u64 = u64::MAX;

/// Fleet settings: the server, the sockets and how they connect.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Server address; must be a loopback address.
    pub server: SocketAddr,
    /// Path of the WebSocket endpoint, `/ws`.
    pub path: String,
    /// Number of sockets.
    pub sockets: usize,
    /// Channels; socket `i` subscribes to `channels[i % channels.len()]`.
    pub channels: Vec<String>,
    /// Number of loopback source addresses, 127.0.0.1 to 127.0.0.N (1 to 254).
    pub source_addrs: u8,
    /// Maximum connects in progress at once.
    pub connect_concurrency: usize,
    /// Whether a socket reconnects and resumes with `since` after a disconnect.
    pub reconnect: bool,
    /// Wire protocol of the server.
    pub protocol: Protocol,
    /// Reconnect delays.
    pub backoff: Backoff,
}

/// Reconnect delays: exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First step.
    pub first_step: Duration,
    /// Largest step.
    pub max_step: Duration,
    /// Window of the first attempt after a 1012 close (the edge restarts): its delay is drawn
    /// between zero and this window, so that the sockets of a draining edge do not all arrive
    /// at once. Zero: the first attempt goes at once.
    pub restart_window: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first_step: RECONNECT_FIRST_STEP,
            max_step: RECONNECT_MAX_STEP,
            restart_window: RESTART_RECONNECT_WINDOW,
        }
    }
}

/// Counters and latencies shared by the sockets of one shard.
struct Shard {
    latency: Histogram<u64>,
    delivered: u64,
    duplicates: u64,
}

/// State shared by every socket of a fleet.
struct Shared {
    config: FleetConfig,
    minter: TokenMinter,
    connect_permits: Semaphore,
    shards: Vec<Mutex<Shard>>,
    id_hasher: RandomState,
    /// Sequence number every socket must have received, with all before it, to count as caught
    /// up; [`NO_TARGET`] while unset.
    catch_up_target: AtomicU64,
    /// Sockets subscribed right now.
    subscribed: AtomicUsize,
    cancel: CancellationToken,
}

impl Shared {
    fn shard(&self, index: usize) -> std::sync::MutexGuard<'_, Shard> {
        // A poisoned shard only means a socket task panicked; its counters are still usable.
        self.shards[index % SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Received sequence numbers of one socket: everything below `next`, plus those in `ahead`.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    next: u64,
    ahead: BTreeSet<u64>,
    highest: Option<u64>,
    gaps: u64,
}

impl SeqTracker {
    /// Records a sequence number and returns whether it is new.
    pub fn insert(&mut self, seq: u64) -> bool {
        if self.contains(seq) {
            return false;
        }
        let expected_next = self.highest.map_or(0, |highest| highest + 1);
        if seq > expected_next {
            self.gaps += 1;
        }
        self.highest = Some(self.highest.map_or(seq, |highest| highest.max(seq)));
        if seq == self.next {
            self.next += 1;
            while self.ahead.remove(&self.next) {
                self.next += 1;
            }
        } else {
            self.ahead.insert(seq);
        }
        true
    }

    /// Returns whether a sequence number was received.
    pub fn contains(&self, seq: u64) -> bool {
        seq < self.next || self.ahead.contains(&seq)
    }

    /// Returns the number of sequence numbers from 0 on that were all received.
    pub fn contiguous(&self) -> u64 {
        self.next
    }

    /// Returns how often a sequence number arrived with unreceived numbers before it.
    pub fn gaps(&self) -> u64 {
        self.gaps
    }
}

/// Report of one socket, returned when the fleet finishes.
#[derive(Debug, Clone, Default)]
pub struct SocketReport {
    /// Index of the socket's channel in [`FleetConfig::channels`].
    pub channel: usize,
    /// Whether the first connect and subscribe succeeded.
    pub connected: bool,
    /// Received sequence numbers.
    pub seqs: SeqTracker,
    /// Events received more than once, by id.
    pub duplicates: u64,
    /// `error` frames received.
    pub error_frames: u64,
    /// Frames that were neither control frames nor events with a benchmark payload.
    pub unparsed: u64,
    /// Failed attempts of the first connect before it succeeded or gave up.
    pub connect_retries: u64,
    /// Successful reconnects.
    pub reconnects: u64,
    /// Failed reconnect attempts.
    pub failed_reconnects: u64,
    /// Close codes received, with counts; 0 counts connections that ended without a close frame.
    pub closes: HashMap<u16, u64>,
    /// When the socket had every event up to the catch-up target.
    pub caught_up_at: Option<Instant>,
    /// When the socket last got its `subscribed` frame after a reconnect.
    pub resubscribed_at: Option<Instant>,
    /// Whether the socket stopped reconnecting after [`MAX_RECONNECT_ATTEMPTS`].
    pub gave_up: bool,
}

/// Frames the client reads; unknown fields are ignored.
#[derive(Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    position: Option<u64>,
    #[serde(default)]
    data: Option<Payload>,
}

/// One socket's state across reconnects.
struct Socket {
    index: usize,
    channel: String,
    token: String,
    last_position: Option<u64>,
    seen_ids: HashSet<u64>,
    report: SocketReport,
}

impl Socket {
    /// Handles one text frame.
    fn on_text(&mut self, text: &str, shared: &Shared) {
        let Ok(frame) = serde_json::from_str::<Frame<'_>>(text) else {
            self.report.unparsed += 1;
            return;
        };
        match frame.kind.as_ref() {
            "subscribed" => self.advance_position(frame.position),
            "error" => self.report.error_frames += 1,
            "connected" | "pong" | "unsubscribed" | "reconnect" | "token_expiring" => {}
            _ => self.on_event(&frame, shared),
        }
    }

    fn on_event(&mut self, frame: &Frame<'_>, shared: &Shared) {
        let (Some(id), Some(payload)) = (&frame.id, &frame.data) else {
            self.report.unparsed += 1;
            return;
        };
        self.advance_position(frame.position);
        let latency = crate::unix_micros().saturating_sub(payload.sent_at_us);
        let new_id = self.seen_ids.insert(shared.id_hasher.hash_one(id.as_ref()));
        {
            let mut shard = shared.shard(self.index);
            if new_id {
                shard.delivered += 1;
                record_latency(&mut shard.latency, latency);
            } else {
                shard.duplicates += 1;
            }
        }
        if !new_id {
            self.report.duplicates += 1;
            return;
        }
        self.report.seqs.insert(payload.seq);
        let target = shared.catch_up_target.load(Ordering::Relaxed);
        if self.report.caught_up_at.is_none() && target != NO_TARGET && self.report.seqs.contiguous() > target {
            self.report.caught_up_at = Some(Instant::now());
        }
    }

    fn advance_position(&mut self, position: Option<u64>) {
        if let Some(position) = position {
            self.last_position = Some(self.last_position.map_or(position, |last| last.max(position)));
        }
    }
}

type Connection = WebSocketStream<TcpStream>;

/// End of a connection.
enum Ending {
    Cancelled,
    Closed(u16),
}

/// A set of connected, subscribed sockets and their tasks.
pub struct Fleet {
    shared: Arc<Shared>,
    tasks: JoinSet<SocketReport>,
    /// Time from the first connect to the last first subscribe.
    pub connect_elapsed: Duration,
    /// Sockets whose first connect or subscribe failed.
    pub connect_failures: usize,
    /// The first few connect errors, for the report.
    pub connect_errors: Vec<String>,
    /// Sockets whose first subscribe succeeded, per channel.
    pub connected_per_channel: Vec<u64>,
}

impl Fleet {
    /// Connects and subscribes every socket, at most `connect_concurrency` at a time, and
    /// returns once each has either subscribed or failed.
    ///
    /// # Errors
    /// Fails when the server is not a loopback address, when no socket could connect, or when
    /// connecting takes longer than a bound derived from the number of sockets.
    pub async fn connect(config: FleetConfig, minter: TokenMinter) -> anyhow::Result<Self> {
        validate(&config)?;
        let sockets = config.sockets;
        let shared = Arc::new(Shared {
            connect_permits: Semaphore::new(config.connect_concurrency),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        latency: latency_histogram(),
                        delivered: 0,
                        duplicates: 0,
                    })
                })
                .collect(),
            id_hasher: RandomState::new(),
            catch_up_target: AtomicU64::new(NO_TARGET),
            subscribed: AtomicUsize::new(0),
            cancel: CancellationToken::new(),
            config,
            minter,
        });

        // Start every socket task; each reports its first subscribe on `ready_tx`.
        let started = Instant::now();
        let (ready_tx, mut ready_rx) = mpsc::channel::<Result<usize, String>>(sockets.max(1));
        let mut tasks = JoinSet::new();
        for index in 0..sockets {
            tasks.spawn(run_socket(shared.clone(), index, ready_tx.clone()));
        }
        drop(ready_tx);

        // Wait for every first subscribe, bounded by a generous rate of 50 sockets per second
        // plus time for a socket's retries.
        let deadline = tokio::time::Instant::now()
            + CONNECT_TIMEOUT
            + CONNECT_RETRY_SLACK
            + Duration::from_millis(20 * sockets as u64);
        let (mut failures, mut errors, mut done) = (0, Vec::new(), 0);
        let mut connected_per_channel = vec![0; shared.config.channels.len()];
        while done < sockets {
            let Ok(Some(result)) = tokio::time::timeout_at(deadline, ready_rx.recv()).await else {
                shared.cancel.cancel();
                bail!("only {done} of {sockets} sockets finished connecting in time");
            };
            done += 1;
            match result {
                Ok(channel) => connected_per_channel[channel] += 1,
                Err(error) => {
                    failures += 1;
                    if errors.len() < 5 {
                        errors.push(error);
                    }
                }
            }
        }
        if failures == sockets && sockets > 0 {
            shared.cancel.cancel();
            bail!("no socket could connect; first errors: {errors:?}");
        }
        Ok(Self {
            shared,
            tasks,
            connect_elapsed: started.elapsed(),
            connect_failures: failures,
            connect_errors: errors,
            connected_per_channel,
        })
    }

    /// Returns the number of distinct events delivered so far, over all sockets.
    pub fn delivered(&self) -> u64 {
        (0..SHARDS).map(|index| self.shared.shard(index).delivered).sum()
    }

    /// Returns the deliveries expected when every subscribed socket receives every acknowledged
    /// event of its channel.
    pub fn expected_deliveries(&self, acked: &[Vec<u64>]) -> u64 {
        self.connected_per_channel
            .iter()
            .zip(acked)
            .map(|(sockets, seqs)| sockets * seqs.len() as u64)
            .sum()
    }

    /// Returns the number of sockets subscribed right now.
    pub fn subscribed(&self) -> usize {
        self.shared.subscribed.load(Ordering::Relaxed)
    }

    /// Sets the sequence number each socket must have received, with all before it, to count as
    /// caught up; see [`SocketReport::caught_up_at`].
    pub fn set_catch_up_target(&self, seq: u64) {
        self.shared.catch_up_target.store(seq, Ordering::Relaxed);
    }

    /// Waits until at least `expected` distinct deliveries arrived or `timeout` passed, and
    /// returns whether they all arrived.
    pub async fn wait_for_deliveries(&self, expected: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.delivered() >= expected {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes every socket and returns what each saw, with the merged latency histogram.
    pub async fn finish(mut self) -> FleetReport {
        self.shared.cancel.cancel();
        let mut sockets = Vec::with_capacity(self.shared.config.sockets);
        while let Some(result) = self.tasks.join_next().await {
            // A panicked socket task has no report; the missing socket shows in the counts.
            if let Ok(report) = result {
                sockets.push(report);
            }
        }
        let mut latency = latency_histogram();
        let (mut delivered, mut duplicates) = (0, 0);
        for index in 0..SHARDS {
            let shard = self.shared.shard(index);
            // Both histograms come from `latency_histogram`, with the same bounds, so adding
            // cannot fail.
            let _ = latency.add(&shard.latency);
            delivered += shard.delivered;
            duplicates += shard.duplicates;
        }
        FleetReport {
            sockets,
            latency,
            delivered,
            duplicates,
        }
    }
}

fn validate(config: &FleetConfig) -> anyhow::Result<()> {
    if !config.server.ip().is_loopback() {
        bail!(
            "the load client only connects to loopback addresses, not {}",
            config.server
        );
    }
    if config.channels.is_empty() {
        bail!("at least one channel is needed");
    }
    if config.source_addrs == 0 || config.source_addrs > 254 {
        bail!("source addresses must be 1 to 254, not {}", config.source_addrs);
    }
    if config.connect_concurrency == 0 {
        bail!("connect concurrency must be at least 1");
    }
    Ok(())
}

/// Report of a whole fleet.
pub struct FleetReport {
    /// One report per socket task that ended normally.
    pub sockets: Vec<SocketReport>,
    /// Latency of every first delivery, in microseconds from the intended send time.
    pub latency: Histogram<u64>,
    /// Distinct deliveries.
    pub delivered: u64,
    /// Deliveries of an event id the socket had already received.
    pub duplicates: u64,
}

impl FleetReport {
    /// Returns the deliveries expected and the number of them that never arrived, given the
    /// sequence numbers acknowledged per channel.
    pub fn expected_and_lost(&self, acked: &[Vec<u64>]) -> (u64, u64) {
        let (mut expected, mut lost) = (0, 0);
        for socket in self.sockets.iter().filter(|socket| socket.connected) {
            let seqs = acked.get(socket.channel).map_or(&[][..], Vec::as_slice);
            expected += seqs.len() as u64;
            lost += seqs.iter().filter(|&&seq| !socket.seqs.contains(seq)).count() as u64;
        }
        (expected, lost)
    }

    /// Returns the number of times a sequence number arrived with missing numbers before it.
    pub fn gaps(&self) -> u64 {
        self.sockets.iter().map(|socket| socket.seqs.gaps()).sum()
    }

    /// Returns the failed attempts of first connects over all sockets.
    pub fn connect_retries(&self) -> u64 {
        self.sockets.iter().map(|socket| socket.connect_retries).sum()
    }

    /// Returns close codes with counts over all sockets (0: ended without a close frame).
    pub fn closes(&self) -> std::collections::BTreeMap<u16, u64> {
        let mut closes = std::collections::BTreeMap::new();
        for (code, count) in self.sockets.iter().flat_map(|socket| &socket.closes) {
            *closes.entry(*code).or_default() += count;
        }
        closes
    }
}

/// Runs one socket: first connect and subscribe, then read until cancelled, reconnecting with
/// `since` after a disconnect when the fleet is configured to.
async fn run_socket(shared: Arc<Shared>, index: usize, ready_tx: mpsc::Sender<Result<usize, String>>) -> SocketReport {
    let channel_index = index % shared.config.channels.len();
    let token = match shared.minter.mint(&format!("bench-{index}")) {
        Ok(token) => token,
        Err(error) => {
            let _ = ready_tx.send(Err(format!("{error:#}"))).await;
            return SocketReport::default();
        }
    };
    let mut socket = Socket {
        index,
        channel: shared.config.channels[channel_index].clone(),
        token,
        last_position: None,
        seen_ids: HashSet::new(),
        report: SocketReport {
            channel: channel_index,
            ..SocketReport::default()
        },
    };

    // The first connect retries like a reconnect, so that a server's handshake rate limit
    // (HTTP 429) delays sockets instead of failing them.
    let (first, attempts) = connect_with_backoff(&shared, &mut socket, Some(Duration::ZERO)).await;
    socket.report.connect_retries = attempts.failures;
    let Some(mut connection) = first else {
        let error = attempts.last_error.unwrap_or_else(|| "cancelled".to_owned());
        let _ = ready_tx.send(Err(error)).await;
        return socket.report;
    };
    socket.report.connected = true;
    let _ = ready_tx.send(Ok(channel_index)).await;
    drop(ready_tx);

    loop {
        shared.subscribed.fetch_add(1, Ordering::Relaxed);
        let ending = read_until_end(&shared, &mut socket, &mut connection).await;
        shared.subscribed.fetch_sub(1, Ordering::Relaxed);
        drop(connection);
        let code = match ending {
            Ending::Cancelled => return socket.report,
            Ending::Closed(code) => code,
        };
        *socket.report.closes.entry(code).or_default() += 1;
        if !shared.config.reconnect {
            return socket.report;
        }
        let first_window = (code == SERVICE_RESTART).then_some(shared.config.backoff.restart_window);
        let (next, attempts) = connect_with_backoff(&shared, &mut socket, first_window).await;
        socket.report.failed_reconnects += attempts.failures;
        socket.report.gave_up = attempts.exhausted;
        match next {
            Some(next) => {
                socket.report.reconnects += 1;
                socket.report.resubscribed_at = Some(Instant::now());
                connection = next;
            }
            None => return socket.report,
        }
    }
}

/// Reads frames until the connection ends or the fleet is cancelled.
async fn read_until_end(shared: &Shared, socket: &mut Socket, connection: &mut Connection) -> Ending {
    // One cancellation future for the whole loop: creating one per frame showed up in profiles.
    let cancelled = shared.cancel.cancelled();
    tokio::pin!(cancelled);
    loop {
        let message = tokio::select! {
            biased;
            message = connection.next() => message,
            () = &mut cancelled => return Ending::Cancelled,
        };
        match message {
            Some(Ok(Message::Text(text))) => match shared.config.protocol.decode(text.as_str()) {
                Incoming::Frame(frame) => socket.on_text(&frame, shared),
                Incoming::Ping => {
                    if connection.send(Message::text(PONG)).await.is_err() {
                        return Ending::Closed(0);
                    }
                }
                Incoming::Open | Incoming::Other => {}
            },
            Some(Ok(Message::Close(frame))) => return Ending::Closed(frame.map_or(0, |frame| frame.code.into())),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Ending::Closed(0),
        }
    }
}

/// Failed attempts of one [`connect_with_backoff`].
#[derive(Default)]
struct Attempts {
    failures: u64,
    last_error: Option<String>,
    /// Whether all [`MAX_RECONNECT_ATTEMPTS`] attempts failed.
    exhausted: bool,
}

/// Connects and subscribes with exponential backoff and full jitter: each delay is drawn between
/// zero and a step that starts at the fleet's [`Backoff::first_step`] and doubles up to its
/// [`Backoff::max_step`]. With `first_window` the first attempt's delay is drawn between zero
/// and that window instead: zero for a first connect, [`Backoff::restart_window`] after a 1012
/// close (the edge restarts). Returns `None` after [`MAX_RECONNECT_ATTEMPTS`] failed attempts or
/// when the fleet is cancelled.
async fn connect_with_backoff(
    shared: &Shared,
    socket: &mut Socket,
    first_window: Option<Duration>,
) -> (Option<Connection>, Attempts) {
    let mut attempts = Attempts::default();
    let Backoff {
        first_step, max_step, ..
    } = shared.config.backoff;
    let mut step = first_step;
    for attempt in 0..MAX_RECONNECT_ATTEMPTS {
        let window = match first_window {
            Some(window) if attempt == 0 => window,
            _ => step,
        };
        let delay = rand::rng().random_range(Duration::ZERO..=window);
        tokio::select! {
            _ = shared.cancel.cancelled() => return (None, attempts),
            _ = tokio::time::sleep(delay) => {}
        }
        let result = tokio::select! {
            _ = shared.cancel.cancelled() => return (None, attempts),
            result = connect_bounded(shared, socket) => result,
        };
        match result {
            Ok(connection) => return (Some(connection), attempts),
            Err(error) => {
                attempts.failures += 1;
                attempts.last_error = Some(format!("{error:#}"));
            }
        }
        step = (step * 2).min(max_step);
    }
    attempts.exhausted = true;
    (None, attempts)
}

/// Connects, waits for `connected`, subscribes (with `since` once a position is known) and
/// waits for `subscribed`, holding a connect permit and bounded by [`CONNECT_TIMEOUT`].
async fn connect_bounded(shared: &Shared, socket: &mut Socket) -> anyhow::Result<Connection> {
    let _permit = shared.connect_permits.acquire().await.context("the fleet is closed")?;
    tokio::time::timeout(CONNECT_TIMEOUT, connect_and_subscribe(shared, socket))
        .await
        .context("connect and subscribe timed out")?
}

async fn connect_and_subscribe(shared: &Shared, socket: &mut Socket) -> anyhow::Result<Connection> {
    let config = &shared.config;
    let source = Ipv4Addr::new(127, 0, 0, 1 + (socket.index % usize::from(config.source_addrs)) as u8);
    let tcp = TcpSocket::new_v4().context("create a TCP socket")?;
    tcp.bind(SocketAddr::new(source.into(), 0))
        .with_context(|| format!("bind source address {source}"))?;
    let stream = tcp
        .connect(config.server)
        .await
        .with_context(|| format!("connect to {}", config.server))?;
    stream.set_nodelay(true)?;
    let url = format!(
        "ws://{}{}",
        config.server,
        config.protocol.path_and_query(&config.path, &socket.token)
    );
    let ws_config = WebSocketConfig::default().read_buffer_size(READ_BUFFER_SIZE);
    let (mut connection, _) = client_async_with_config(url, stream, Some(ws_config))
        .await
        .context("WebSocket handshake")?;

    expect_frame(shared, socket, &mut connection, "connected").await?;
    let subscribe = config.protocol.subscribe_message(&socket.channel, socket.last_position);
    connection.send(Message::text(subscribe)).await?;
    expect_frame(shared, socket, &mut connection, "subscribed").await?;
    Ok(connection)
}

/// Reads frames until one of type `expected`, which is then handled like any frame. An `error`
/// frame or the end of the connection fails. The reply to Socket.IO's open packet is its
/// connect message, and the reply to a ping is a pong.
async fn expect_frame(
    shared: &Shared,
    socket: &mut Socket,
    connection: &mut Connection,
    expected: &str,
) -> anyhow::Result<()> {
    loop {
        let text = match connection.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => bail!("closed while waiting for {expected}: {frame:?}"),
            Some(Ok(_)) => continue,
            Some(Err(error)) => bail!("socket error while waiting for {expected}: {error}"),
            None => bail!("connection ended while waiting for {expected}"),
        };
        let protocol = shared.config.protocol;
        let frame = match protocol.decode(text.as_str()) {
            Incoming::Frame(frame) => frame,
            Incoming::Open => {
                if let Some(connect) = protocol.connect_message(&socket.token) {
                    connection.send(Message::text(connect)).await?;
                }
                continue;
            }
            Incoming::Ping => {
                connection.send(Message::text(PONG)).await?;
                continue;
            }
            Incoming::Other => continue,
        };
        let kind = serde_json::from_str::<Frame<'_>>(&frame)
            .map(|frame| frame.kind.into_owned())
            .unwrap_or_default();
        if kind == "error" {
            bail!("server sent an error while waiting for {expected}: {frame}");
        }
        socket.on_text(&frame, shared);
        if kind == expected {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_counts_gaps_and_fills_them() {
        let mut seqs = SeqTracker::default();
        assert!(seqs.insert(0));
        assert!(seqs.insert(2));
        assert_eq!(seqs.gaps(), 1);
        assert_eq!(seqs.contiguous(), 1);
        assert!(seqs.insert(1));
        assert_eq!(seqs.contiguous(), 3);
        assert!(!seqs.insert(2));
        assert!(seqs.contains(1));
        assert!(!seqs.contains(3));
    }

    #[test]
    fn lost_counts_acked_seqs_never_received() {
        let mut seqs = SeqTracker::default();
        seqs.insert(0);
        seqs.insert(2);
        let socket = SocketReport {
            connected: true,
            seqs,
            ..SocketReport::default()
        };
        let report = FleetReport {
            sockets: vec![socket],
            latency: latency_histogram(),
            delivered: 2,
            duplicates: 0,
        };
        assert_eq!(report.expected_and_lost(&[vec![0, 1, 2]]), (3, 1));
    }
}
