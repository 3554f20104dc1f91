//! Latency histograms (HDR, microseconds) and their text forms.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records: one hour, in microseconds (larger values saturate).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A new latency histogram (1 µs to one hour, 3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("static bounds are valid")
}

/// Latency histograms shared by the devices of one driver (a histogram costs ~180 KB,
/// too much to keep one per device).
#[derive(Debug, Clone)]
pub struct LatencyStats {
    /// Scheduled send → receipt at a recipient device, µs.
    pub delivery: Histogram<u64>,
    /// Scheduled send → ack at the sender, µs.
    pub ack: Histogram<u64>,
    /// Scheduled send → receipt of messages that waited for an offline device (caught
    /// up after a reconnect), µs; kept apart from the online delivery target.
    pub delivery_caught_up: Histogram<u64>,
}

impl Default for LatencyStats {
    fn default() -> Self {
        Self {
            delivery: latency_histogram(),
            ack: latency_histogram(),
            delivery_caught_up: latency_histogram(),
        }
    }
}

/// Records `us`, saturating at the histogram's bound.
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, LATENCY_US_MAX));
}

/// The figures a report shows for one histogram, in milliseconds.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Summarizes `h` (all zero when empty).
pub fn summarize(h: &Histogram<u64>) -> LatencySummary {
    if h.is_empty() {
        return LatencySummary {
            count: 0,
            p50_ms: 0.0,
            p90_ms: 0.0,
            p99_ms: 0.0,
            p999_ms: 0.0,
            max_ms: 0.0,
            mean_ms: 0.0,
        };
    }
    LatencySummary {
        count: h.len(),
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        p999_ms: ms(h.value_at_quantile(0.999)),
        max_ms: ms(h.max()),
        mean_ms: h.mean() / 1000.0,
    }
}

/// The percentile distribution in HdrHistogram's `.hgrm` text format (values in ms).
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        return out;
    }
    for v in h.iter_quantiles(1) {
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - q))
        } else {
            "inf".to_owned()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {:>14}",
            ms(v.value_iterated_to()),
            q,
            v.count_since_last_iteration(),
            inverse
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0,
        ms(h.max()),
        h.len()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Merging per-device histograms gives the same figures as one histogram of all samples.
    #[test]
    fn merge_is_lossless() {
        let (mut a, mut b, mut all) = (
            latency_histogram(),
            latency_histogram(),
            latency_histogram(),
        );
        for us in [150, 900, 12_000, 480_000] {
            record_us(&mut a, us);
            record_us(&mut all, us);
        }
        for us in [70, 3_000, 3_000, 2_000_000] {
            record_us(&mut b, us);
            record_us(&mut all, us);
        }
        a.add(&b).unwrap();
        assert_eq!(summarize(&a), summarize(&all));
        assert_eq!(summarize(&a).count, 8);
        assert!((summarize(&a).max_ms - 2000.0).abs() < 2.0);
    }

    /// Values past the bound saturate instead of failing.
    #[test]
    fn saturates_at_bound() {
        let mut h = latency_histogram();
        record_us(&mut h, u64::MAX);
        record_us(&mut h, 0);
        assert_eq!(h.len(), 2);
        assert!(hgrm(&h).contains("Total count"));
    }
}

/// A histogram as base64 of HdrHistogram's V2 encoding (lossless, portable).
pub fn encode(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut bytes = Vec::new();
    hdrhistogram::serialization::Serializer::serialize(
        &mut hdrhistogram::serialization::V2Serializer::new(),
        h,
        &mut bytes,
    )
    .expect("serializing into memory");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The inverse of [`encode`].
pub fn decode(text: &str) -> anyhow::Result<Histogram<u64>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text)?;
    let mut h: Histogram<u64> = hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))?;
    h.auto(true);
    Ok(h)
}

#[cfg(test)]
mod encoding_tests {
    use super::*;

    /// Encoding round-trips exactly, so merged reports lose nothing.
    #[test]
    fn round_trip() {
        let mut h = latency_histogram();
        for us in [1, 10, 999, 123_456, 3_000_000] {
            record_us(&mut h, us);
        }
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(summarize(&back), summarize(&h));
        assert_eq!(back.len(), 5);
    }
}
