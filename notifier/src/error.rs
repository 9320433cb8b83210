//! The errors a gRPC call can end with, and their one mapping to gRPC status codes.

use notify_proto::history::HistoryError;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

/// Trailer with the time, in milliseconds, a gRPC client should wait before it retries. gRPC
/// clients with a retry policy honour it.
pub const RETRY_PUSHBACK_TRAILER: &str = "grpc-retry-pushback-ms";

/// Retry hint sent with `RESOURCE_EXHAUSTED` when a publish queue is full: long enough for a
/// committer to finish a batch or two.
pub const RETRY_PUSHBACK_MS: u32 = 100;

/// Error of a gRPC call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request breaks a rule; the message names the field, the rule and the fix.
    #[error("{0}")]
    InvalidArgument(String),
    /// The partition's publish queue is full.
    #[error("the publish queue of partition {partition} is full; retry after {RETRY_PUSHBACK_MS} ms")]
    QueueFull {
        /// Partition whose queue is full.
        partition: u32,
    },
    /// The caller exceeded its publish rate (`PUBLISH_RATE`, `PUBLISH_BURST`).
    #[error("the publish rate limit is exceeded; retry after {retry_after_ms} ms")]
    RateLimited {
        /// Time until the caller's next publish is allowed, in milliseconds.
        retry_after_ms: u32,
    },
    /// The idempotency key was first used for an event with other content.
    #[error(
        "idempotency key {key:?} was already used for event {first_id} with a different channel, type, data or \
         user_id; use a new key for a new event"
    )]
    IdempotencyConflict {
        /// The reused key.
        key: String,
        /// Id of the event the key was first used for.
        first_id: String,
    },
    /// The caller's API key may not publish to the channel.
    #[error("{0}")]
    PermissionDenied(String),
    /// An earlier event of the same channel in a `PublishBatch` call was not published, so this
    /// one was not queued either, to keep the channel's order.
    #[error(
        "event {first_failed} of this batch, on channel {channel:?}, was not published, so this later event of the \
         channel was not either, to keep the channel's order; publish the channel's events again from event \
         {first_failed}"
    )]
    EarlierEventFailed {
        /// The channel of both events.
        channel: String,
        /// Index in the batch of the channel's first event that failed.
        first_failed: usize,
    },
    /// The store of record failed. The cause was logged where it happened.
    #[error("the store of record is unavailable; retry with backoff")]
    StoreUnavailable,
    /// The notifier is shutting down and takes no more events.
    #[error("the notifier is shutting down; retry against another replica")]
    ShuttingDown,
    /// A history read failed.
    #[error(transparent)]
    History(#[from] HistoryError),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::InvalidArgument(_) => Status::invalid_argument(message),
            Error::QueueFull { .. } | Error::RateLimited { .. } => {
                let wait = err.retry_after_ms().unwrap_or(RETRY_PUSHBACK_MS);
                Status::with_metadata(Code::ResourceExhausted, message, pushback(wait))
            }
            Error::IdempotencyConflict { .. } => Status::already_exists(message),
            Error::PermissionDenied(_) => Status::permission_denied(message),
            Error::EarlierEventFailed { .. } => Status::aborted(message),
            Error::StoreUnavailable | Error::ShuttingDown => Status::unavailable(message),
            Error::History(HistoryError::NoSuchPartition { .. }) => Status::invalid_argument(message),
            Error::History(HistoryError::Unavailable(cause)) => {
                if let Some(suppressed) = HISTORY_FAILED_LOG.allow() {
                    tracing::warn!(suppressed, error = %cause, "history read failed");
                }
                Status::unavailable("the store of record is unavailable; retry with backoff")
            }
        }
    }
}

impl Error {
    /// Returns the time a caller should wait before it retries, for the errors that carry one.
    pub fn retry_after_ms(&self) -> Option<u32> {
        match self {
            Error::QueueFull { .. } => Some(RETRY_PUSHBACK_MS),
            Error::RateLimited { retry_after_ms } => Some(*retry_after_ms),
            _ => None,
        }
    }
}

fn pushback(retry_after_ms: u32) -> MetadataMap {
    let mut metadata = MetadataMap::new();
    metadata.insert(RETRY_PUSHBACK_TRAILER, MetadataValue::from(retry_after_ms));
    metadata
}

/// One warning per interval while History and ReadPartition calls fail, such as while the store
/// is down.
pub(crate) static HISTORY_FAILED_LOG: notify_proto::telemetry::throttle::LogThrottle =
    notify_proto::telemetry::throttle::LogThrottle::new(notify_proto::telemetry::throttle::DEFAULT_INTERVAL);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_queue_carries_pushback() {
        let status = Status::from(Error::QueueFull { partition: 3 });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let pushback = status.metadata().get(RETRY_PUSHBACK_TRAILER).expect("pushback trailer");
        assert_eq!(pushback.to_str().ok(), Some("100"));
    }

    #[test]
    fn rate_limit_carries_its_wait_as_pushback() {
        let status = Status::from(Error::RateLimited { retry_after_ms: 7 });
        assert_eq!(status.code(), Code::ResourceExhausted);
        let pushback = status.metadata().get(RETRY_PUSHBACK_TRAILER).expect("pushback trailer");
        assert_eq!(pushback.to_str().ok(), Some("7"));
    }

    #[test]
    fn conflict_names_first_event() {
        let status = Status::from(Error::IdempotencyConflict {
            key: "k1".into(),
            first_id: "0193-first".into(),
        });
        assert_eq!(status.code(), Code::AlreadyExists);
        assert!(status.message().contains("0193-first"), "{}", status.message());
    }

    #[test]
    fn unknown_partition_is_invalid_argument() {
        let status = Status::from(Error::History(HistoryError::NoSuchPartition {
            partition: 20,
            partitions: 16,
        }));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "partition 20 does not exist; there are 16 partitions");
    }
}
