//! Prometheus metrics shared by both services: the registry every metric of a process is
//! registered in, its text encoding for `/metrics`, and the histogram buckets.
//!
//! A process has one [`Registry`] with the prefix [`PREFIX`]. Each service registers its metrics
//! in a sub-registry (`notify_notifier_*`, `notify_edge_*`), so the single-process mode serves
//! both services' metrics from one registry without a name clash. `docs/operations.md` lists
//! every metric.

use std::sync::{Arc, PoisonError, RwLock};

pub use prometheus_client::registry::Registry;

/// Prefix of every metric name.
pub const PREFIX: &str = "notify";

/// Content type of [`MetricsRegistry::encode`]'s output: the OpenMetrics 1.0 text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds, in seconds, of the latency histograms (publish and commit-to-delivery): 0.5 ms
/// to 10 s, about 2.5 times apart. Slower observations land in the `+Inf` bucket.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The registry of one process, shared by the services that register in it and the `/metrics`
/// route that encodes it. Cloning shares the same registry.
#[derive(Clone, Debug)]
pub struct MetricsRegistry {
    registry: Arc<RwLock<Registry>>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    /// Creates an empty registry with the prefix [`PREFIX`].
    pub fn new() -> Self {
        Self {
            registry: Arc::new(RwLock::new(Registry::with_prefix(PREFIX))),
        }
    }

    /// Registers metrics in the sub-registry `<PREFIX>_<service>` through `register`.
    pub fn register<T>(&self, service: &str, register: impl FnOnce(&mut Registry) -> T) -> T {
        // Registration only appends to the registry, so a poisoned lock still holds a usable one.
        let mut registry = self.registry.write().unwrap_or_else(PoisonError::into_inner);
        register(registry.sub_registry_with_prefix(service))
    }

    /// Encodes every registered metric in the OpenMetrics text format ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let registry = self.registry.read().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        // Writing to a String cannot fail, so an error comes from a collector. The text so far is
        // still returned.
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &registry) {
            tracing::warn!(error = %err, "encoding the metrics failed");
        }
        text
    }
}

/// Returns the seconds from `since_ms` (milliseconds since the Unix epoch) to now, or 0 when
/// `since_ms` is in the future, as it is when the clocks of two hosts differ.
pub fn seconds_since_unix_ms(since_ms: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let elapsed_ms = (now.as_millis() as i64).saturating_sub(since_ms).max(0);
    elapsed_ms as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn services_register_under_their_prefix() {
        let registry = MetricsRegistry::new();
        let counter: Counter = registry.register("edge", |registry| {
            let counter = Counter::default();
            registry.register("frames", "Frames.", counter.clone());
            counter
        });
        counter.inc_by(3);
        let text = registry.encode();
        assert!(text.contains("notify_edge_frames_total 3\n"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn future_timestamp_is_zero_seconds_ago() {
        assert_eq!(seconds_since_unix_ms(i64::MAX), 0.0);
        assert!(seconds_since_unix_ms(0) > 1.0e9);
    }
}
