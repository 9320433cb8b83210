//! The per-caller publish rate limit. Rejected publishes are counted in
//! [`crate::metrics`] by result.

use std::num::NonZeroU32;

use notify_proto::ratelimit::KeyedLimiter;
use tonic::Request;

use crate::error::Error;

/// Returns the key a publish request is rate-limited by: the hash of the caller's API key when
/// keys are configured, else the caller's IP address, or `unknown` when the transport does not
/// know it. An IP address puts every publisher behind one NAT or proxy into one bucket.
pub fn rate_key<T>(request: &Request<T>, key_hash: Option<&crate::apikey::KeyHash>) -> String {
    if let Some(hash) = key_hash {
        return format!("key:{}", crate::apikey::hex(hash));
    }
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |addr| addr.ip().to_string())
}

/// Token buckets of publishes, one per caller key.
///
/// Capacity: `max_keys` buckets; while that many callers are active, new callers share one
/// overflow bucket (see [`KeyedLimiter`]).
pub struct PublishLimiter {
    buckets: KeyedLimiter<String>,
}

impl PublishLimiter {
    /// Creates a limiter of `rate` publishes per second, in bursts of `burst`, per caller.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, max_keys: usize) -> Self {
        Self {
            buckets: KeyedLimiter::new(rate, burst, max_keys),
        }
    }

    /// Takes one publish from the caller's bucket.
    ///
    /// # Errors
    /// [`Error::RateLimited`] with the time until the next publish is allowed.
    pub fn check(&self, key: &String) -> Result<(), Error> {
        self.buckets.check(key).map_err(|wait| Error::RateLimited {
            retry_after_ms: wait.as_millis().clamp(1, u128::from(u32::MAX)) as u32,
        })
    }
}

impl std::fmt::Debug for PublishLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublishLimiter")
            .field("keys", &self.buckets.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use notify_proto::ratelimit::nonzero;

    use super::*;

    #[test]
    fn caller_over_rate_gets_retry_hint() {
        let limiter = PublishLimiter::new(nonzero(1), nonzero(2), 10);
        let key = "10.0.0.1".to_owned();
        assert!(limiter.check(&key).is_ok());
        assert!(limiter.check(&key).is_ok());
        let Err(Error::RateLimited { retry_after_ms }) = limiter.check(&key) else {
            panic!("third publish in a burst of 2 was not limited");
        };
        assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
        assert!(limiter.check(&"10.0.0.2".to_owned()).is_ok());
    }

    #[test]
    fn request_without_peer_has_a_key() {
        assert_eq!(rate_key(&Request::new(()), None), "unknown");
    }
}
