//! Latency histograms (HDR, microseconds) and their text forms.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records: one hour, in microseconds (larger values saturate).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;

/// A new latency histogram (1 µs up, 3 significant digits). It starts at 2 ms (16 KB)
/// and grows with the largest latency recorded, up to [`LATENCY_US_MAX`] (about
/// 180 KB): a run whose latencies stay low keeps small histograms.
pub fn latency_histogram() -> Histogram<u64> {
    let mut h = Histogram::new_with_bounds(1, 2_048, 3).expect("static bounds are valid");
    h.auto(true);
    h
}

/// Every latency a run measures. Each is one HDR histogram (`Histograms`), one entry of
/// `summary.json`'s `latency` and `histograms.json` under [`Measure::key`], and one row of
/// the report.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Measure {
    /// Scheduled send → receipt at each recipient device that was online (the target).
    Delivery,
    /// Scheduled send → ack at the sender.
    SendAck,
    /// Connect + hello + catch-up per device.
    Connect,
    /// How late the generator itself sent versus the schedule.
    GeneratorLag,
    /// Churn: reconnect until the end of catch-up, per returning device.
    Reconnect,
    /// Churn: messages that waited for an offline device, scheduled send → receipt.
    DeliveryCaughtUp,
    /// Media: image upload (`POST /v1/media`) time.
    Upload,
    /// Media: image download (`GET /v1/media/{id}`) time.
    Download,
    /// Delivery of messages scheduled during the warm-up (`warmup_secs`), not judged.
    DeliveryWarmup,
    /// Send → ack of messages scheduled during the warm-up, not judged.
    SendAckWarmup,
}

impl Measure {
    /// Every measure, in report order.
    pub const ALL: [Self; 10] = [
        Self::Delivery,
        Self::SendAck,
        Self::Connect,
        Self::GeneratorLag,
        Self::Reconnect,
        Self::DeliveryCaughtUp,
        Self::Upload,
        Self::Download,
        Self::DeliveryWarmup,
        Self::SendAckWarmup,
    ];

    /// Its name in `summary.json`, `histograms.json` and `.hgrm` file names.
    pub fn key(self) -> &'static str {
        match self {
            Self::Delivery => "delivery",
            Self::SendAck => "send_ack",
            Self::Connect => "connect",
            Self::GeneratorLag => "generator_lag",
            Self::Reconnect => "reconnect",
            Self::DeliveryCaughtUp => "delivery_caught_up",
            Self::Upload => "upload",
            Self::Download => "download",
            Self::DeliveryWarmup => "delivery_warmup",
            Self::SendAckWarmup => "send_ack_warmup",
        }
    }

    /// Its row in the report.
    pub fn label(self) -> &'static str {
        match self {
            Self::Delivery => "delivery to online devices (scheduled send → recipient)",
            Self::SendAck => "send → ack",
            Self::Connect => "connect + catch-up",
            Self::GeneratorLag => "generator lag",
            Self::Reconnect => "reconnect + catch-up (churn)",
            Self::DeliveryCaughtUp => "delivery after coming back online (churn)",
            Self::Upload => "image upload",
            Self::Download => "image download",
            Self::DeliveryWarmup => "delivery during warm-up (not judged)",
            Self::SendAckWarmup => "send → ack during warm-up (not judged)",
        }
    }

    /// Recorded by every run since the first release; `histograms.json` of older runs
    /// lacks the others, which then read as empty.
    pub fn always_recorded(self) -> bool {
        matches!(
            self,
            Self::Delivery | Self::SendAck | Self::Connect | Self::GeneratorLag
        )
    }

    /// Recorded by the devices as frames arrive, into their driver's shard
    /// ([`LatencyStats`]); the generator records the others itself.
    pub fn recorded_by_devices(self) -> bool {
        match self {
            Self::Delivery
            | Self::SendAck
            | Self::DeliveryCaughtUp
            | Self::DeliveryWarmup
            | Self::SendAckWarmup => true,
            Self::Connect
            | Self::GeneratorLag
            | Self::Reconnect
            | Self::Upload
            | Self::Download => false,
        }
    }

    /// Its slot in [`Self::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One histogram per [`Measure`].
#[derive(Debug, Clone)]
pub struct Histograms {
    by_measure: Vec<Histogram<u64>>,
}

impl Default for Histograms {
    fn default() -> Self {
        Self {
            by_measure: Measure::ALL.iter().map(|_| latency_histogram()).collect(),
        }
    }
}

impl std::ops::Index<Measure> for Histograms {
    type Output = Histogram<u64>;
    fn index(&self, m: Measure) -> &Histogram<u64> {
        &self.by_measure[m.index()]
    }
}

impl std::ops::IndexMut<Measure> for Histograms {
    fn index_mut(&mut self, m: Measure) -> &mut Histogram<u64> {
        &mut self.by_measure[m.index()]
    }
}

impl Histograms {
    /// Adds every histogram of `other` (lossless).
    pub fn add(&mut self, other: &Self) -> anyhow::Result<()> {
        for m in Measure::ALL {
            self[m]
                .add(&other[m])
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", m.key()))?;
        }
        Ok(())
    }

    /// Each measure's figures.
    pub fn summaries(&self) -> Latencies {
        Latencies(
            Measure::ALL
                .iter()
                .map(|&m| (m, summarize(&self[m])))
                .collect(),
        )
    }
}

/// The figures of every measure: `summary.json`'s `latency` object, keyed by
/// [`Measure::key`]. A measure missing from an older file reads as empty.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
#[serde(transparent)]
pub struct Latencies(pub std::collections::BTreeMap<Measure, LatencySummary>);

/// The figures of an empty histogram.
pub const EMPTY_SUMMARY: LatencySummary = LatencySummary {
    count: 0,
    p50_ms: 0.0,
    p90_ms: 0.0,
    p99_ms: 0.0,
    p999_ms: 0.0,
    max_ms: 0.0,
    mean_ms: 0.0,
};

impl std::ops::Index<Measure> for Latencies {
    type Output = LatencySummary;
    fn index(&self, m: Measure) -> &LatencySummary {
        self.0.get(&m).unwrap_or(&EMPTY_SUMMARY)
    }
}

/// Latency histograms shared by the devices of one recording thread (a histogram may
/// grow to ~180 KB, too much to keep one per device): what devices record as frames arrive.
#[derive(Debug, Clone)]
pub struct LatencyStats {
    /// Scheduled send → receipt at a recipient device, µs.
    pub delivery: Histogram<u64>,
    /// Scheduled send → ack at the sender, µs.
    pub ack: Histogram<u64>,
    /// Scheduled send → receipt of messages that waited for an offline device (caught
    /// up after a reconnect), µs; kept apart from the online delivery target.
    pub delivery_caught_up: Histogram<u64>,
    /// Delivery of messages scheduled before `judged_from_us`, µs.
    pub delivery_warmup: Histogram<u64>,
    /// Ack of messages scheduled before `judged_from_us`, µs.
    pub ack_warmup: Histogram<u64>,
    /// Messages scheduled before this instant (Unix µs) belong to the warm-up; 0 until
    /// the schedule starts (no warm-up: its start).
    pub judged_from_us: u64,
}

impl Default for LatencyStats {
    fn default() -> Self {
        Self {
            delivery: latency_histogram(),
            ack: latency_histogram(),
            delivery_caught_up: latency_histogram(),
            delivery_warmup: latency_histogram(),
            ack_warmup: latency_histogram(),
            judged_from_us: 0,
        }
    }
}

impl LatencyStats {
    /// Records the delivery of a message scheduled at `scheduled_us`, received at
    /// `now_us`; `caught_up` when it waited for the device to come back online.
    pub fn record_delivery(&mut self, scheduled_us: u64, now_us: u64, caught_up: bool) {
        let h = if scheduled_us < self.judged_from_us {
            &mut self.delivery_warmup
        } else if caught_up {
            &mut self.delivery_caught_up
        } else {
            &mut self.delivery
        };
        record_us(h, now_us.saturating_sub(scheduled_us));
    }

    /// Records the ack of a send scheduled at `scheduled_us`, received at `now_us`.
    pub fn record_ack(&mut self, scheduled_us: u64, now_us: u64) {
        let h = if scheduled_us < self.judged_from_us {
            &mut self.ack_warmup
        } else {
            &mut self.ack
        };
        record_us(h, now_us.saturating_sub(scheduled_us));
    }

    /// Adds these histograms into `into`.
    pub fn add_to(&self, into: &mut Histograms) {
        for (m, h) in [
            (Measure::Delivery, &self.delivery),
            (Measure::SendAck, &self.ack),
            (Measure::DeliveryCaughtUp, &self.delivery_caught_up),
            (Measure::DeliveryWarmup, &self.delivery_warmup),
            (Measure::SendAckWarmup, &self.ack_warmup),
        ] {
            into[m].add(h).expect("same bounds");
        }
    }
}

/// Records `us`, saturating at [`LATENCY_US_MAX`]; the histogram grows to hold it.
pub fn record_us(h: &mut Histogram<u64>, us: u64) {
    let us = us.clamp(1, LATENCY_US_MAX);
    // `saturating_record` would clamp to the current (auto-sized) bound instead of growing.
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
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
        return EMPTY_SUMMARY;
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

    /// A driver's shard holds exactly the measures that say they are recorded by devices.
    #[test]
    fn shards_hold_the_device_measures() {
        let mut stats = LatencyStats::default();
        stats.record_delivery(1, 10, false);
        stats.record_delivery(1, 10, true);
        stats.record_ack(1, 10);
        stats.judged_from_us = 5;
        stats.record_delivery(1, 10, false);
        stats.record_ack(1, 10);
        let mut all = Histograms::default();
        stats.add_to(&mut all);
        for m in Measure::ALL {
            assert_eq!(all[m].len() == 1, m.recorded_by_devices(), "{}", m.key());
        }
    }

    /// Values past the bound saturate instead of failing; the histogram grows up to it.
    #[test]
    fn saturates_at_bound() {
        let mut h = latency_histogram();
        record_us(&mut h, u64::MAX);
        record_us(&mut h, 0);
        assert_eq!(h.len(), 2);
        assert!(
            h.max() >= LATENCY_US_MAX * 999 / 1000,
            "grown to the bound: {}",
            h.max()
        );
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
