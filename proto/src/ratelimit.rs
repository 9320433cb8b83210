//! Token-bucket rate limiters shared by the notifier and the edge, built on `governor`.
//!
//! [`KeyedLimiter`] keeps one bucket per key (a publisher's address, a user id) in a store whose
//! size is capped: governor's `DashMapStateStore` alone grows with every key it has seen.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::{DashMapStateStore, ShrinkableKeyedStateStore};
use governor::state::{InMemoryState, NotKeyed, StateStore};
use governor::{Quota, RateLimiter};

/// A bucket without keys, such as the edge's handshake limiter or one socket's message limiter.
pub type DirectLimiter = governor::DefaultDirectRateLimiter;

/// How often a [`KeyedLimiter`] removes the buckets that are full again (idle keys), at most.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(10);

/// Returns `value` as a [`NonZeroU32`], or 1 for 0; for constants and settings already checked.
pub const fn nonzero(value: u32) -> NonZeroU32 {
    match NonZeroU32::new(value) {
        Some(value) => value,
        None => NonZeroU32::MIN,
    }
}

/// Returns a quota of `rate` cells per second with bursts of up to `burst` cells.
pub fn quota(rate: NonZeroU32, burst: NonZeroU32) -> Quota {
    Quota::per_second(rate).allow_burst(burst)
}

/// Returns the clock every limiter shares. Creating a `quanta` 0.12 clock (governor's default)
/// runs `cpuid` several times, and in a virtual machine each `cpuid` traps to the hypervisor.
/// With one clock per socket's limiter, `perf` put about 6% of the new edge's CPU time there in
/// a 10,000-socket `bench reconnect-storm --rolling` on a 2-core virtual machine.
fn shared_clock() -> DefaultClock {
    static CLOCK: OnceLock<DefaultClock> = OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default).clone()
}

/// Returns a limiter without keys.
pub fn direct(rate: NonZeroU32, burst: NonZeroU32) -> DirectLimiter {
    RateLimiter::direct_with_clock(quota(rate, burst), shared_clock())
}

/// Returns how long a caller rejected by `limiter` should wait before its next cell is allowed.
pub fn wait_time(not_until: &governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Duration {
    not_until.wait_time_from(shared_clock().now())
}

/// One bucket per key, in a store of at most `max_keys` keys.
///
/// Capacity: `max_keys` buckets, plus the few that concurrent first checks may add past the
/// check. Overflow: while the store is full, a key without a bucket is checked against one
/// shared overflow bucket with the same quota, so all such keys together get one allowance.
/// Buckets that are full again (their keys were idle long enough to refill) are pruned at most
/// every [`PRUNE_INTERVAL`], on the next check, and their keys get their own buckets again.
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: RateLimiter<K, BoundedStore<K>, DefaultClock, NoOpMiddleware>,
    clock: DefaultClock,
    /// When the next prune may run; a lock so that only one check at a time prunes.
    next_prune: Mutex<<DefaultClock as Clock>::Instant>,
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// Creates a limiter of `rate` per second with bursts of `burst` for each of up to
    /// `max_keys` keys.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, max_keys: usize) -> Self {
        let clock = shared_clock();
        let store = BoundedStore {
            buckets: DashMapStateStore::default(),
            overflow: InMemoryState::default(),
            max_keys: max_keys.max(1),
        };
        Self {
            limiter: RateLimiter::new(quota(rate, burst), store, clock.clone()),
            next_prune: Mutex::new(clock.now()),
            clock,
        }
    }

    /// Takes one cell from `key`'s bucket.
    ///
    /// # Errors
    /// Returns how long the caller should wait when the bucket is empty.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.prune_if_due();
        self.limiter.check_key(key).map_err(|not_until| wait_time(&not_until))
    }

    /// Returns the number of keys with a bucket.
    pub fn len(&self) -> usize {
        self.limiter.len()
    }

    /// Returns whether no key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.limiter.is_empty()
    }

    /// Removes the buckets of idle keys now.
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    fn prune_if_due(&self) {
        let now = self.clock.now();
        let Ok(mut next_prune) = self.next_prune.try_lock() else {
            return;
        };
        if now < *next_prune {
            return;
        }
        *next_prune = now + Nanos::from(PRUNE_INTERVAL);
        drop(next_prune);
        self.prune();
    }
}

/// governor's dashmap store with a cap on its keys and a shared bucket for keys past the cap.
struct BoundedStore<K: Hash + Eq + Clone> {
    buckets: DashMapStateStore<K>,
    overflow: InMemoryState,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> StateStore for BoundedStore<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if self.buckets.len() < self.max_keys || self.buckets.contains_key(key) {
            return self.buckets.measure_and_replace(key, f);
        }
        self.overflow.measure_and_replace(&NotKeyed::NonKey, f)
    }
}

impl<K: Hash + Eq + Clone> ShrinkableKeyedStateStore<K> for BoundedStore<K> {
    fn retain_recent(&self, drop_below: Nanos) {
        self.buckets.retain_recent(drop_below);
    }

    fn shrink_to_fit(&self) {
        ShrinkableKeyedStateStore::shrink_to_fit(&self.buckets);
    }

    fn len(&self) -> usize {
        ShrinkableKeyedStateStore::len(&self.buckets)
    }

    fn is_empty(&self) -> bool {
        ShrinkableKeyedStateStore::is_empty(&self.buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_gets_its_burst() {
        let limiter = KeyedLimiter::new(nonzero(1), nonzero(3), 10);
        for _ in 0..3 {
            assert_eq!(limiter.check(&"a"), Ok(()));
        }
        assert!(limiter.check(&"a").is_err());
        assert_eq!(limiter.check(&"b"), Ok(()));
    }

    #[test]
    fn rejection_says_how_long_to_wait() {
        let limiter = KeyedLimiter::new(nonzero(1), nonzero(1), 10);
        assert_eq!(limiter.check(&"a"), Ok(()));
        let wait = limiter.check(&"a").expect_err("bucket is empty");
        assert!(
            wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn keys_past_the_cap_share_one_bucket() {
        let limiter = KeyedLimiter::new(nonzero(1), nonzero(2), 2);
        assert_eq!(limiter.check(&"a"), Ok(()));
        assert_eq!(limiter.check(&"b"), Ok(()));
        assert_eq!(limiter.check(&"c"), Ok(()));
        assert_eq!(limiter.check(&"d"), Ok(()));
        assert!(limiter.check(&"e").is_err(), "the overflow bucket allows one burst");
        assert_eq!(limiter.len(), 2);
        assert_eq!(limiter.check(&"a"), Ok(()), "keys with a bucket keep their own");
    }

    #[test]
    fn prune_removes_refilled_buckets() {
        let limiter = KeyedLimiter::new(nonzero(1000), nonzero(1), 10);
        assert_eq!(limiter.check(&"a"), Ok(()));
        std::thread::sleep(Duration::from_millis(20));
        limiter.prune();
        assert!(limiter.is_empty());
    }
}
