//! Limits on who may open a socket and how fast clients may send: the handshake rate, the
//! number of sockets in total and per user, and the message rates per socket and per user.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use notify_proto::ratelimit::{self, DirectLimiter, KeyedLimiter};
use tokio::time::Instant;

/// Share of the open-files limit that `MAX_SOCKETS` takes by default, in percent; the rest is
/// left for Redis, gRPC and log files.
pub const DEFAULT_SOCKET_SHARE_PERCENT: u64 = 90;
/// Time after a `rate_limited` error frame during which another rejected message closes the
/// socket with 4029.
pub const RATE_LIMIT_WARNING: Duration = Duration::from_secs(10);

/// Raises the open-files soft limit to the hard limit, and returns how many sockets fit in
/// [`DEFAULT_SOCKET_SHARE_PERCENT`] of it. Logs both at info.
pub fn default_max_sockets() -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(err) => {
            let (soft, _) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
            tracing::warn!(error = %err, soft, "could not raise the open-files limit");
            soft
        }
    };
    let sockets = usize::try_from(limit.saturating_mul(DEFAULT_SOCKET_SHARE_PERCENT) / 100).unwrap_or(usize::MAX);
    tracing::info!(
        open_files = limit,
        max_sockets = sockets,
        "open-files limit allows this many sockets"
    );
    sockets
}

/// Reason an upgrade was rejected before the handshake completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// `HANDSHAKE_RATE` is exceeded; retry after this long (HTTP 429 with `Retry-After`).
    Rate(Duration),
    /// `MAX_SOCKETS` sockets are open (HTTP 503).
    Full,
    /// `MAX_UNAUTHENTICATED_SOCKETS` sockets wait for their `auth` frame (HTTP 503 with
    /// `Retry-After`).
    Unauthenticated,
}

/// Settings of [`Admission`].
#[derive(Debug, Clone, Copy)]
pub struct AdmissionLimits {
    /// Maximum open sockets on this edge.
    pub max_sockets: usize,
    /// Maximum open sockets that wait for their `auth` frame, counted within `max_sockets`.
    pub max_unauthenticated: usize,
    /// Maximum open connections on the HTTP and WebSocket port that have not upgraded, which
    /// the accept loop counts; see [`Admission::max_http_connections`].
    pub max_http_connections: usize,
    /// Maximum open sockets of one user.
    pub max_sockets_per_user: usize,
    /// Upgrades per second, and their burst.
    pub handshake: (NonZeroU32, NonZeroU32),
    /// Client messages per second on one socket, and their burst.
    pub socket_messages: (NonZeroU32, NonZeroU32),
    /// Client messages per second of one user over all its sockets, and their burst.
    pub user_messages: (NonZeroU32, NonZeroU32),
    /// Maximum users with their own message bucket.
    pub rate_limit_keys: usize,
}

/// The edge's admission state, shared by every route and session.
pub struct Admission {
    limits: AdmissionLimits,
    handshakes: DirectLimiter,
    /// Sockets counted from the accepted upgrade to the end of their session.
    sockets: Arc<AtomicUsize>,
    /// Sockets without a token in the handshake, counted from the accepted upgrade until their
    /// `auth` frame is verified or they end.
    unauthenticated: Arc<AtomicUsize>,
    /// Authenticated sockets per user. Capacity: one entry per user with an open socket, so at
    /// most `max_sockets`; an entry is removed with the user's last socket.
    users: Arc<UserSockets>,
    /// Message buckets per user. Capacity: `rate_limit_keys` (see [`KeyedLimiter`]).
    user_messages: KeyedLimiter<String>,
}

impl Admission {
    /// Creates the admission state.
    pub fn new(limits: AdmissionLimits) -> Self {
        let (rate, burst) = limits.handshake;
        let (user_rate, user_burst) = limits.user_messages;
        Self {
            handshakes: ratelimit::direct(rate, burst),
            sockets: Arc::default(),
            unauthenticated: Arc::default(),
            users: Arc::default(),
            user_messages: KeyedLimiter::new(user_rate, user_burst, limits.rate_limit_keys),
            limits,
        }
    }

    /// Admits an upgrade: takes a handshake token and a socket slot, which the returned guard
    /// holds until it is dropped.
    ///
    /// # Errors
    /// [`Rejected::Rate`] when the handshake rate is exceeded, [`Rejected::Full`] when every
    /// socket slot is taken.
    pub fn admit(&self) -> Result<SocketSlot, Rejected> {
        if let Err(not_until) = self.handshakes.check() {
            return Err(Rejected::Rate(ratelimit::wait_time(&not_until)));
        }
        let taken = self.sockets.fetch_add(1, Ordering::AcqRel);
        let slot = SocketSlot {
            sockets: self.sockets.clone(),
            unauthenticated: None,
            user: None,
        };
        if taken >= self.limits.max_sockets {
            return Err(Rejected::Full);
        }
        Ok(slot)
    }

    /// Admits an upgrade without a token, whose socket waits for an `auth` frame: like
    /// [`Admission::admit`], and it also holds one of the `max_unauthenticated` places until
    /// [`Admission::add_user_socket`] or the end of the socket.
    ///
    /// # Errors
    /// [`Rejected::Rate`], [`Rejected::Unauthenticated`] when every place for such sockets is
    /// taken, or [`Rejected::Full`].
    pub fn admit_without_token(&self) -> Result<SocketSlot, Rejected> {
        let mut slot = self.admit()?;
        let waiting = self.unauthenticated.fetch_add(1, Ordering::AcqRel);
        slot.unauthenticated = Some(self.unauthenticated.clone());
        if waiting >= self.limits.max_unauthenticated {
            return Err(Rejected::Unauthenticated);
        }
        Ok(slot)
    }

    /// Counts an authenticated socket of `user` in its slot.
    ///
    /// # Errors
    /// Fails when the user already has `MAX_SOCKETS_PER_USER` sockets; the slot is unchanged.
    pub fn add_user_socket(&self, slot: &mut SocketSlot, user: &str) -> Result<(), usize> {
        slot.release_unauthenticated();
        let max = self.limits.max_sockets_per_user;
        let mut users = lock(&self.users);
        let count = users.entry(user.to_owned()).or_default();
        if *count >= max {
            if *count == 0 {
                users.remove(user);
            }
            return Err(max);
        }
        *count += 1;
        slot.user = Some((self.users.clone(), user.to_owned()));
        Ok(())
    }

    /// Returns the maximum open connections on the HTTP and WebSocket port, from the accept to
    /// the upgrade or the end. The accept loop enforces it: WebSocket sockets are not counted
    /// in it but in `max_sockets`.
    pub fn max_http_connections(&self) -> usize {
        self.limits.max_http_connections
    }

    /// Returns the number of open sockets, counted from the accepted upgrade.
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Acquire)
    }

    /// Returns the number of open sockets that wait for their `auth` frame.
    pub fn unauthenticated_sockets(&self) -> usize {
        self.unauthenticated.load(Ordering::Acquire)
    }

    /// Returns a message limiter for one socket of `user`.
    pub fn message_limiter(self: &Arc<Self>, user: &str) -> MessageLimiter {
        let (rate, burst) = self.limits.socket_messages;
        MessageLimiter {
            admission: self.clone(),
            user: user.to_owned(),
            socket: ratelimit::direct(rate, burst),
            warned_at: None,
        }
    }
}

/// Authenticated sockets per user.
type UserSockets = Mutex<HashMap<String, usize>>;

fn lock(users: &UserSockets) -> MutexGuard<'_, HashMap<String, usize>> {
    // Every critical section leaves the map consistent, so a poisoned lock is still usable.
    users.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A socket's place in the socket counts; dropping it frees the place.
pub struct SocketSlot {
    sockets: Arc<AtomicUsize>,
    /// The count of sockets waiting for their `auth` frame, while this one is among them.
    unauthenticated: Option<Arc<AtomicUsize>>,
    user: Option<(Arc<UserSockets>, String)>,
}

impl SocketSlot {
    fn release_unauthenticated(&mut self) {
        if let Some(waiting) = self.unauthenticated.take() {
            waiting.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.release_unauthenticated();
        self.sockets.fetch_sub(1, Ordering::AcqRel);
        let Some((users, user)) = self.user.take() else {
            return;
        };
        let mut users = lock(&users);
        if let Some(count) = users.get_mut(&user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                users.remove(&user);
            }
        }
    }
}

/// Decision on a client message after the rate check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Handle the message.
    Allow,
    /// Drop the message and send a `rate_limited` error frame.
    Warn,
    /// Drop the message and close the socket with 4029.
    Close,
}

/// The message rate limits of one socket: its own bucket and its user's shared one.
pub struct MessageLimiter {
    admission: Arc<Admission>,
    user: String,
    socket: DirectLimiter,
    /// When the last `rate_limited` error frame was sent.
    warned_at: Option<Instant>,
}

impl MessageLimiter {
    /// Takes a token from the socket's bucket and from the user's.
    ///
    /// A message over either limit is dropped. The first one gets [`Verdict::Warn`]; another one
    /// within [`RATE_LIMIT_WARNING`] of that warning gets [`Verdict::Close`].
    pub fn check(&mut self) -> Verdict {
        let allowed = self.socket.check().is_ok() && self.admission.user_messages.check(&self.user).is_ok();
        if allowed {
            return Verdict::Allow;
        }
        let now = Instant::now();
        if self.warned_at.is_some_and(|warned| now < warned + RATE_LIMIT_WARNING) {
            return Verdict::Close;
        }
        self.warned_at = Some(now);
        Verdict::Warn
    }
}

#[cfg(test)]
mod tests {
    use notify_proto::ratelimit::nonzero;

    use super::*;

    fn admission(max_sockets: usize, handshake_burst: u32) -> Arc<Admission> {
        Arc::new(Admission::new(AdmissionLimits {
            max_sockets,
            max_unauthenticated: 2,
            max_http_connections: 10,
            max_sockets_per_user: 2,
            handshake: (nonzero(1), nonzero(handshake_burst)),
            socket_messages: (nonzero(1), nonzero(3)),
            user_messages: (nonzero(1), nonzero(4)),
            rate_limit_keys: 100,
        }))
    }

    #[test]
    fn handshakes_over_the_burst_are_told_to_wait() {
        let admission = admission(10, 2);
        let _first = admission.admit().expect("within burst");
        let _second = admission.admit().expect("within burst");
        let Err(Rejected::Rate(wait)) = admission.admit() else {
            panic!("third handshake in a burst of 2 was admitted");
        };
        assert!(wait > Duration::ZERO, "{wait:?}");
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
    }

    #[test]
    fn sockets_over_maximum_are_rejected() {
        let admission = admission(1, 10);
        let first = admission.admit().expect("one slot");
        assert!(matches!(admission.admit(), Err(Rejected::Full)));
        assert_eq!(admission.sockets(), 1);
        drop(first);
        assert!(admission.admit().is_ok());
    }

    #[test]
    fn sockets_without_token_have_their_own_cap() {
        let admission = admission(10, 10);
        let mut first = admission.admit_without_token().expect("one of 2 places");
        let _second = admission.admit_without_token().expect("two of 2 places");
        assert!(matches!(
            admission.admit_without_token(),
            Err(Rejected::Unauthenticated)
        ));
        assert_eq!(admission.unauthenticated_sockets(), 2);
        assert_eq!(admission.sockets(), 2, "the rejected upgrade freed its socket slot");

        // Sockets with a token still get in, and authentication frees a place.
        let _with_token = admission.admit().expect("token sockets are not capped by it");
        assert_eq!(admission.add_user_socket(&mut first, "alice"), Ok(()));
        assert_eq!(admission.unauthenticated_sockets(), 1);
        let third = admission.admit_without_token().expect("a place was freed");
        drop(third);
        assert_eq!(admission.unauthenticated_sockets(), 1);
    }

    #[test]
    fn user_socket_count_is_capped_and_released() {
        let admission = admission(10, 10);
        let mut slots: Vec<_> = (0..3).map(|_| admission.admit().expect("slot")).collect();
        assert_eq!(admission.add_user_socket(&mut slots[0], "alice"), Ok(()));
        assert_eq!(admission.add_user_socket(&mut slots[1], "alice"), Ok(()));
        assert_eq!(admission.add_user_socket(&mut slots[2], "alice"), Err(2));
        slots.remove(0);
        let mut slot = admission.admit().expect("slot");
        assert_eq!(admission.add_user_socket(&mut slot, "alice"), Ok(()));
        drop(slots);
        drop(slot);
        assert!(lock(&admission.users).is_empty());
    }

    #[test]
    fn flood_is_warned_once_then_closed() {
        let admission = admission(10, 10);
        let mut limiter = admission.message_limiter("alice");
        let verdicts: Vec<_> = (0..5).map(|_| limiter.check()).collect();
        let expected = [
            Verdict::Allow,
            Verdict::Allow,
            Verdict::Allow,
            Verdict::Warn,
            Verdict::Close,
        ];
        assert_eq!(verdicts, expected);
    }

    #[test]
    fn user_bucket_is_shared_by_its_sockets() {
        let admission = admission(10, 10);
        let mut first = admission.message_limiter("alice");
        let mut second = admission.message_limiter("alice");
        let allowed = (0..3)
            .flat_map(|_| [first.check(), second.check()])
            .filter(|verdict| *verdict == Verdict::Allow)
            .count();
        assert_eq!(allowed, 4, "the user's burst of 4 covers both sockets");
        assert_eq!(admission.message_limiter("bob").check(), Verdict::Allow);
    }
}
