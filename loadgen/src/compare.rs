//! `compare`: a run against a baseline `summary.json`, metric by metric.

use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::metrics::Measure;
use crate::report::{read_summary, Summary};

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

/// `chatproof-loadgen compare`: prints the table and writes `compare.md` and
/// `compare.html` into `out` (default: the run's folder); exit status 1 when a figure
/// regressed.
pub fn command(
    baseline: &Path,
    run: &Path,
    out: Option<&Path>,
    tolerance_pct: f64,
) -> anyhow::Result<i32> {
    let (base, this) = (read_summary(baseline)?, read_summary(run)?);
    let rows = compare(&base, &this, tolerance_pct);
    println!("{}", table(&rows));
    let out = match out {
        Some(dir) => dir.to_owned(),
        None if run.is_dir() => run.to_owned(),
        None => run
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), Path::to_owned),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(out.join("compare.md"), markdown(&base, &this, &rows))?;
    std::fs::write(out.join("compare.html"), html(&base, &this, &rows))?;
    eprintln!("compare: {}", out.join("compare.html").display());
    Ok(i32::from(rows.iter().any(|r| r.regressed)))
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
    if let (Some(bu), Some(ru)) = (&baseline.server_usage, &run.server_usage) {
        let per_message = |u: &crate::report::ServerUsage, s: &Summary| {
            u.cpu_secs * 1e6 / (s.counts.acked.max(1) as f64)
        };
        for (name, b, r) in [
            (
                "server CPU per message (µs)",
                per_message(bu, baseline),
                per_message(ru, run),
            ),
            (
                "server peak memory (KiB)",
                bu.rss_peak_kib as f64,
                ru.rss_peak_kib as f64,
            ),
        ] {
            rows.push(Row {
                name,
                baseline: b,
                run: r,
                regressed: r > b * factor,
            });
        }
    }
    // Regressions first; otherwise in the order above.
    rows.sort_by_key(|r| !r.regressed);
    rows
}

/// The change from baseline to run, as text.
fn change(r: &Row) -> String {
    if r.baseline == 0.0 {
        "n/a".to_owned()
    } else {
        format!("{:+.1} %", (r.run - r.baseline) / r.baseline * 100.0)
    }
}

/// `compare.md`: a heading naming both runs and the table.
pub fn markdown(baseline: &Summary, run: &Summary, rows: &[Row]) -> String {
    let regressed = rows.iter().filter(|r| r.regressed).count();
    format!(
        "# Compare `{}` run `{}` with baseline `{}`: {}\n\n{}",
        run.scenario,
        run.run_id,
        baseline.run_id,
        if regressed == 0 {
            "no regression".to_owned()
        } else {
            format!("{regressed} regressed")
        },
        table(rows)
    )
}

/// `compare.html`: the same as a page, regressions first and marked.
pub fn html(baseline: &Summary, run: &Summary, rows: &[Row]) -> String {
    use crate::html::{Cell, Page, Verdict};
    let mut page = Page::new(&format!("Compare {}", run.scenario));
    let regressed: Vec<String> = rows
        .iter()
        .filter(|r| r.regressed)
        .map(|r| {
            format!(
                "{}: {} → {} ({})",
                r.name,
                crate::html::figure(r.baseline, 3),
                crate::html::figure(r.run, 3),
                change(r)
            )
        })
        .collect();
    let (verdict, headline) = if regressed.is_empty() {
        (Verdict::Pass, "no figure regressed".to_owned())
    } else {
        (
            Verdict::Fail,
            format!("{} figure(s) regressed", regressed.len()),
        )
    };
    page.banner(verdict, &headline, &regressed);
    page.paragraph(&format!(
        "Run {} (target {}) against baseline {} (target {}).",
        run.run_id, run.target, baseline.run_id, baseline.target
    ));
    let cells: Vec<Vec<Cell>> = rows
        .iter()
        .map(|r| {
            vec![
                Cell::text(r.name),
                Cell::Num(r.baseline, 3),
                Cell::Num(r.run, 3),
                Cell::text(change(r)),
                Cell::text(if r.regressed { "regressed" } else { "ok" }),
            ]
        })
        .collect();
    page.table(
        "compare",
        &["figure", "baseline", "run", "change", "verdict"],
        &cells,
    );
    page.finish()
}

/// The comparison as a Markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from("| figure | baseline | run | change | |\n|---|---|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.name,
            crate::html::figure(r.baseline, 3),
            crate::html::figure(r.run, 3),
            change(r),
            if r.regressed { "**regressed**" } else { "ok" }
        ));
    }
    out
}
