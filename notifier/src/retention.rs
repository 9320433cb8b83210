//! The retention sweeper: deletes stored events older than the retention period and idempotency
//! keys older than their window.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, operation};
use crate::store::{Store, ms_before, now_ms};

/// Time between sweeps. The first sweep runs at start.
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(60);

/// Deletes expired events and keys every [`RETENTION_INTERVAL`] until `stop` is cancelled. A
/// failed sweep is logged and tried again at the next interval.
pub async fn run(
    store: Store,
    retention: Duration,
    idempotency_window: Duration,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut interval = tokio::time::interval(RETENTION_INTERVAL);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        let now = now_ms();
        match store
            .delete_expired(ms_before(now, retention), ms_before(now, idempotency_window))
            .await
        {
            Ok((0, 0)) => {}
            Ok((events, keys)) => tracing::info!(events, keys, "deleted expired events and idempotency keys"),
            Err(err) => {
                tracing::warn!(error = %err, "retention sweep failed; retrying at the next interval");
                metrics.store_error(operation::RETENTION);
            }
        }
    }
}
