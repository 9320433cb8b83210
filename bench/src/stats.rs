//! Latency histograms in microseconds and their summary.

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency a histogram records, in microseconds; larger values are clamped to it.
pub const MAX_LATENCY_US: u64 = 120_000_000;

/// Creates an empty histogram for latencies from 1 µs to [`MAX_LATENCY_US`] with three
/// significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("the bounds are valid constants")
}

/// Records a latency, clamped to the histogram's range.
pub fn record_latency(histogram: &mut Histogram<u64>, micros: u64) {
    // Clamped into the histogram's bounds, so recording cannot fail.
    let _ = histogram.record(micros.clamp(1, MAX_LATENCY_US));
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    /// Number of values recorded.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises a histogram of microseconds.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |micros: u64| micros as f64 / 1000.0;
        Self {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.50)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_percentiles_in_ms() {
        let mut histogram = latency_histogram();
        for micros in 1..=1000 {
            record_latency(&mut histogram, micros * 1000);
        }
        let summary = LatencySummary::of(&histogram);
        assert_eq!(summary.count, 1000);
        assert!((summary.p50_ms - 500.0).abs() < 1.0, "p50 {}", summary.p50_ms);
        assert!((summary.p99_ms - 990.0).abs() < 1.0, "p99 {}", summary.p99_ms);
        assert!((summary.max_ms - 1000.0).abs() < 1.0, "max {}", summary.max_ms);
    }

    #[test]
    fn out_of_range_latency_is_clamped() {
        let mut histogram = latency_histogram();
        record_latency(&mut histogram, 0);
        record_latency(&mut histogram, u64::MAX);
        assert_eq!(histogram.len(), 2);
    }
}
