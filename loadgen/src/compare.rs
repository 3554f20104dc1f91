//! `compare`: a run against a baseline `summary.json`, metric by metric.

use crate::metrics::Measure;
use crate::report::Summary;

/// One compared figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What.
    pub name: &'static str,
    /// Baseline value.
    pub baseline: f64,
    /// This run's value.
    pub run: f64,
    /// Worse than the baseline by more than the tolerance.
    pub regressed: bool,
}

/// Compares `run` with `baseline`; a figure regresses when it is worse by more than
/// `tolerance_pct` percent (any new contract violation always regresses).
pub fn compare(baseline: &Summary, run: &Summary, tolerance_pct: f64) -> Vec<Row> {
    let per_sec = |s: &Summary| s.counts.acked as f64 / s.config.load.schedule_secs().max(1) as f64;
    let lower_is_better: [(&'static str, f64, f64); 6] = [
        (
            "delivery p50 (ms)",
            baseline.latency[Measure::Delivery].p50_ms,
            run.latency[Measure::Delivery].p50_ms,
        ),
        (
            "delivery p99 (ms)",
            baseline.latency[Measure::Delivery].p99_ms,
            run.latency[Measure::Delivery].p99_ms,
        ),
        (
            "delivery p99.9 (ms)",
            baseline.latency[Measure::Delivery].p999_ms,
            run.latency[Measure::Delivery].p999_ms,
        ),
        (
            "send→ack p99 (ms)",
            baseline.latency[Measure::SendAck].p99_ms,
            run.latency[Measure::SendAck].p99_ms,
        ),
        (
            "connect p99 (ms)",
            baseline.latency[Measure::Connect].p99_ms,
            run.latency[Measure::Connect].p99_ms,
        ),
        (
            "generator lag p99 (ms)",
            baseline.latency[Measure::GeneratorLag].p99_ms,
            run.latency[Measure::GeneratorLag].p99_ms,
        ),
    ];
    let factor = 1.0 + tolerance_pct / 100.0;
    let mut rows: Vec<Row> = lower_is_better
        .into_iter()
        .map(|(name, b, r)| Row {
            name,
            baseline: b,
            run: r,
            regressed: r > b * factor && r - b > 0.05,
        })
        .collect();
    let (b, r) = (per_sec(baseline), per_sec(run));
    rows.push(Row {
        name: "acknowledged messages/s",
        baseline: b,
        run: r,
        regressed: r * factor < b,
    });
    let (bv, rv) = (
        baseline.violations.total() as f64,
        run.violations.total() as f64,
    );
    rows.push(Row {
        name: "contract violations",
        baseline: bv,
        run: rv,
        regressed: rv > bv,
    });
    rows
}

/// The comparison as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| figure | baseline | run | change | |\n|---|---|---|---|---|\n");
    for r in rows {
        let change = if r.baseline == 0.0 {
            "n/a".to_owned()
        } else {
            format!("{:+.1} %", (r.run - r.baseline) / r.baseline * 100.0)
        };
        out.push_str(&format!(
            "| {} | {:.3} | {:.3} | {change} | {} |\n",
            r.name,
            r.baseline,
            r.run,
            if r.regressed { "**regressed**" } else { "ok" }
        ));
    }
    out
}
