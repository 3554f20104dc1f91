//! `merge`: combines the runs of several generator processes (or machines) on one
//! schedule into one report. Histograms add losslessly; counts and violations add up.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context};

use crate::metrics::decode;
use crate::metrics::{Histograms, Measure};
use crate::report::{evaluate, write, Summary};

/// Reads a run directory's `summary.json` and `histograms.json`.
pub fn read_run(dir: &Path) -> anyhow::Result<(Summary, Histograms)> {
    let summary: Summary = serde_json::from_str(
        &std::fs::read_to_string(dir.join("summary.json"))
            .with_context(|| format!("reading {}/summary.json", dir.display()))?,
    )
    .with_context(|| format!("parsing {}/summary.json", dir.display()))?;
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("histograms.json"))
            .with_context(|| format!("reading {}/histograms.json", dir.display()))?,
    )?;
    let mut histograms = Histograms::default();
    for m in Measure::ALL {
        match raw[m.key()].as_str() {
            Some(encoded) => histograms[m] = decode(encoded)?,
            // Histograms added after the first release: runs written before them have none.
            None if !m.always_recorded() => {}
            None => anyhow::bail!("{}: histograms.json lacks {}", dir.display(), m.key()),
        }
    }
    Ok((summary, histograms))
}

/// Merges `runs` into one summary (with its histograms).
pub fn merge(runs: Vec<(Summary, Histograms)>) -> anyhow::Result<(Summary, Histograms)> {
    let mut runs = runs.into_iter();
    let (mut s, mut h) = runs.next().context("nothing to merge")?;
    s.server_usage = None;
    for (other, oh) in runs {
        if let (Some(mine), Some(theirs)) = (&s.part, &other.part) {
            ensure!(
                !mine.split(',').any(|p| theirs.split(',').any(|q| p == q)),
                "part {theirs} is merged twice"
            );
            s.part = Some(format!("{mine},{theirs}"));
        }
        // Schedule starts: the earliest start and the spread up to the latest.
        if let (Some(a), Some(b)) = (s.schedule_start_unix_ms, other.schedule_start_unix_ms) {
            let end = (a as f64 + s.schedule_start_spread_ms)
                .max(b as f64 + other.schedule_start_spread_ms);
            let start = a.min(b);
            s.schedule_start_unix_ms = Some(start);
            s.schedule_start_spread_ms = end - start as f64;
        } else {
            s.schedule_start_unix_ms = s.schedule_start_unix_ms.or(other.schedule_start_unix_ms);
        }
        let devices = s.counts.devices_connected + other.counts.devices_connected;
        s.generator_usage = match (s.generator_usage.take(), &other.generator_usage) {
            (Some(mut mine), Some(theirs)) => {
                mine.absorb(theirs, devices);
                Some(mine)
            }
            (mine, theirs) => mine.or_else(|| theirs.clone()),
        };
        ensure!(
            other.scenario == s.scenario,
            "runs of different scenarios: {} and {}",
            s.scenario,
            other.scenario
        );
        h.add(&oh)?;
        s.settled &= other.settled;
        s.drain_waited_secs = s.drain_waited_secs.max(other.drain_waited_secs);
        let (c, o) = (&mut s.counts, &other.counts);
        c.scheduled += o.scheduled;
        c.sent += o.sent;
        c.acked += o.acked;
        c.send_errors += o.send_errors;
        c.deliveries_expected += o.deliveries_expected;
        c.deliveries_received += o.deliveries_received;
        c.devices_planned += o.devices_planned;
        c.devices_connected += o.devices_connected;
        c.devices_failed += o.devices_failed;
        c.devices_dropped += o.devices_dropped;
        c.skipped_offline += o.skipped_offline;
        c.reconnect_failures += o.reconnect_failures;
        c.images_sent += o.images_sent;
        c.upload_failures += o.upload_failures;
        c.downloads += o.downloads;
        c.download_failures += o.download_failures;
        c.presence_frames += o.presence_frames;
        c.presence_states += o.presence_states;
        s.presence_gap_min_ms = match (s.presence_gap_min_ms, other.presence_gap_min_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        s.violations.absorb(&other.violations);
        s.wall_secs = s.wall_secs.max(other.wall_secs);
        if !s.run_id.split('+').any(|id| id == other.run_id) {
            s.run_id = format!("{}+{}", s.run_id, other.run_id);
        }
        for target in other.target.split(' ') {
            if !s.target.split(' ').any(|t| t == target) {
                s.target = format!("{} {target}", s.target);
            }
        }
        // Per-second points add up; a second's percentiles keep the worst part's value.
        for (i, p) in other.timeline.iter().enumerate() {
            match s.timeline.get_mut(i) {
                Some(q) => {
                    q.devices_connected += p.devices_connected;
                    q.sent += p.sent;
                    q.delivered += p.delivered;
                    q.delivery_p99_ms = q.delivery_p99_ms.max(p.delivery_p99_ms);
                    q.delivery_p50_ms = q.delivery_p50_ms.max(p.delivery_p50_ms);
                    q.delivery_max_ms = q.delivery_max_ms.max(p.delivery_max_ms);
                    q.offered += p.offered;
                    q.acked += p.acked;
                    // Server figures come from the part that could read them.
                    q.server_cpu_percent = q.server_cpu_percent.or(p.server_cpu_percent);
                    q.server_rss_kib = q.server_rss_kib.or(p.server_rss_kib);
                }
                None => s.timeline.push(p.clone()),
            }
        }
    }
    s.latency = h.summaries();
    evaluate(&mut s);
    Ok((s, h))
}

/// `chatproof-loadgen merge DIR... --out DIR`: writes the merged report and prints its
/// `report.md` on standard error; exit status 1 when the merged run did not pass.
pub fn command(dirs: &[PathBuf], out: &Path) -> anyhow::Result<i32> {
    let summary = run(dirs, out)?;
    eprintln!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    Ok(i32::from(!summary.pass))
}

/// Merges the runs in `dirs` and writes the report into `out`.
fn run(dirs: &[PathBuf], out: &Path) -> anyhow::Result<Summary> {
    let runs = dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (summary, histograms) = merge(runs)?;
    write(out, &summary, &histograms)?;
    Ok(summary)
}
