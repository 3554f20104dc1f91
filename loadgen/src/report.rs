//! Results: computed from every device's observations, written as `summary.json`
//! (machine-readable, usable as a baseline), `report.md`, `report.html` and `.hgrm` files.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use chatproof_contract::{Tally, Violation};

/// The contract violations the generator checks: each device's order and
/// membership as it receives, and every acknowledged message at the end (its
/// latency is held to the SLO targets instead of counted as `slow`).
pub const CHECKED_VIOLATIONS: [Violation; 5] = [
    Violation::Lost,
    Violation::Duplicate,
    Violation::Reorder,
    Violation::Gap,
    Violation::Phantom,
];
use crate::html::{self, Page, Verdict};
use crate::metrics::{hgrm, Histograms, Latencies, Measure};
use crate::run::state::{Count, RunState};
use crate::scenario::Scenario;

/// One second of the run, sampled by the progress task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TimelinePoint {
    /// Seconds since the first device connected.
    pub t_secs: f64,
    /// Devices with an open connection.
    pub devices_connected: u64,
    /// Sends written in this second.
    pub sent: u64,
    /// Deliveries (timed) in this second.
    pub delivered: u64,
    /// Delivery latency p99 within this second, ms.
    pub delivery_p99_ms: f64,
    /// Delivery latency p50 within this second, ms.
    pub delivery_p50_ms: f64,
    /// Slowest delivery within this second, ms.
    #[serde(default)]
    pub delivery_max_ms: f64,
    /// Sends the schedule made due in this second (the offered load).
    #[serde(default)]
    pub offered: u64,
    /// Acknowledgements received in this second.
    #[serde(default)]
    pub acked: u64,
    /// The servers' CPU in this second, percent of one core (summed over their
    /// processes); none when the process drawing the timeline could not read it.
    #[serde(default)]
    pub server_cpu_percent: Option<f64>,
    /// The servers' resident memory at the end of this second, KiB (summed).
    #[serde(default)]
    pub server_rss_kib: Option<u64>,
}

/// One target and what was measured against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SloResult {
    /// What is measured.
    pub name: String,
    /// The target (upper bound).
    pub target: f64,
    /// The measurement.
    pub measured: f64,
    /// `measured <= target` (or `>=` for a lower bound).
    pub pass: bool,
    /// The target is a lower bound.
    #[serde(default)]
    pub at_least: bool,
}

/// Message counts of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    /// Sends due by the schedule.
    pub scheduled: u64,
    /// Sends written to a socket.
    pub sent: u64,
    /// Sends acknowledged.
    pub acked: u64,
    /// Sends refused (by the server or the generator's own bounds).
    pub send_errors: u64,
    /// (acknowledged message × member device) pairs that should arrive.
    pub deliveries_expected: u64,
    /// Of those, how many arrived.
    pub deliveries_received: u64,
    /// Devices planned, connected, failed to connect, and still connected at the end.
    pub devices_planned: u64,
    /// Devices that connected.
    pub devices_connected: u64,
    /// Devices that could not connect.
    pub devices_failed: u64,
    /// Connected devices whose connection ended before the end of the run.
    pub devices_dropped: u64,
    /// Sends skipped because the chosen device was offline (churn).
    #[serde(default)]
    pub skipped_offline: u64,
    /// Devices that could not reconnect after churn.
    #[serde(default)]
    pub reconnect_failures: u64,
    /// Images uploaded and sent.
    #[serde(default)]
    pub images_sent: u64,
    /// Uploads that failed.
    #[serde(default)]
    pub upload_failures: u64,
    /// Images downloaded by recipients.
    #[serde(default)]
    pub downloads: u64,
    /// Downloads that failed.
    #[serde(default)]
    pub download_failures: u64,
    /// `presence` frames received, over all devices.
    #[serde(default)]
    pub presence_frames: u64,
    /// User states carried by those frames.
    #[serde(default)]
    pub presence_states: u64,
}

/// What the server processes used during the run: the reference server the generator
/// started, or the processes named with `--server-pid` (their figures summed).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServerUsage {
    /// How many server processes the figures add up.
    #[serde(default = "one")]
    pub processes: u32,
    /// CPU seconds the server used from first connect to the end of the drain.
    pub cpu_secs: f64,
    /// Resident memory before any device connected, KiB.
    pub rss_before_kib: u64,
    /// Resident memory with every device connected, at the end, KiB.
    pub rss_connected_kib: u64,
    /// Peak resident memory, KiB.
    pub rss_peak_kib: u64,
    /// Server memory per connected device: anonymous resident memory (heap, stacks;
    /// not the program's code) grown from before to connected, over the devices, bytes.
    pub bytes_per_connection: f64,
    /// Deliveries (message × recipient device) per server CPU second.
    pub deliveries_per_cpu_sec: f64,
    /// Acknowledged messages per server CPU second.
    pub messages_per_cpu_sec: f64,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// What the generator's own processes used: the memory each connected device costs the
/// generator, so a planner knows how many devices one generator machine may drive.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct GeneratorUsage {
    /// Generator processes (workers) the figures add up.
    pub processes: u32,
    /// CPU seconds the generator used from before the first connect to the end of the drain.
    pub cpu_secs: f64,
    /// Resident memory before any device connected, KiB.
    pub rss_before_kib: u64,
    /// Resident memory with every device connected, at the end, KiB.
    pub rss_connected_kib: u64,
    /// Peak resident memory (sum of each process's peak), KiB.
    pub rss_peak_kib: u64,
    /// Anonymous resident memory (heap, stacks) before any device connected, KiB; 0
    /// when unknown (older summaries).
    #[serde(default)]
    pub anon_before_kib: u64,
    /// Anonymous resident memory with every device connected, at the end, KiB.
    #[serde(default)]
    pub anon_connected_kib: u64,
    /// Generator memory per connected device: anonymous resident memory grown from
    /// before to connected (not the program's code, paged in once), over the devices, bytes.
    pub bytes_per_device: f64,
}

impl GeneratorUsage {
    /// The figures of one process from its usage before the connects and at the end.
    pub fn of(
        before: crate::local::ProcUsage,
        after: crate::local::ProcUsage,
        devices: u64,
    ) -> Self {
        let mut usage = Self {
            processes: 1,
            cpu_secs: (after.cpu_secs - before.cpu_secs).max(0.0),
            rss_before_kib: before.rss_kib,
            rss_connected_kib: after.rss_kib,
            rss_peak_kib: after.rss_peak_kib,
            anon_before_kib: before.anon_kib,
            anon_connected_kib: after.anon_kib,
            bytes_per_device: 0.0,
        };
        usage.set_per_device(devices);
        usage
    }

    /// Computes `bytes_per_device` over `devices`.
    fn set_per_device(&mut self, devices: u64) {
        let grown = crate::local::grown_kib(
            (self.rss_before_kib, self.anon_before_kib),
            (self.rss_connected_kib, self.anon_connected_kib),
        );
        self.bytes_per_device = (grown * 1024) as f64 / devices.max(1) as f64;
    }

    /// Adds another process's figures; `devices` is the devices both connected together.
    pub fn absorb(&mut self, other: &Self, devices: u64) {
        self.processes += other.processes;
        self.cpu_secs += other.cpu_secs;
        self.rss_before_kib += other.rss_before_kib;
        self.rss_connected_kib += other.rss_connected_kib;
        self.rss_peak_kib += other.rss_peak_kib;
        // A process that did not report anonymous memory leaves the sum to all memory.
        let anon_known = self.anon_before_kib > 0 && other.anon_before_kib > 0;
        self.anon_before_kib = if anon_known {
            self.anon_before_kib + other.anon_before_kib
        } else {
            0
        };
        self.anon_connected_kib = if anon_known {
            self.anon_connected_kib + other.anon_connected_kib
        } else {
            0
        };
        self.set_per_device(devices);
    }
}

/// Everything a run produced: `summary.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Run id (prefix of user, group and message ids).
    pub run_id: String,
    /// Where the load went.
    pub target: String,
    /// True when the generator started its own reference server.
    pub reference_server: bool,
    /// The server the generator started itself (none: it loaded `--target`).
    #[serde(default)]
    pub local_server: Option<crate::local::LocalKind>,
    /// Wall-clock seconds from first connect to the end of the drain.
    pub wall_secs: f64,
    /// Seconds waited after the schedule for deliveries in flight: the scenario's
    /// `drain_secs`, extended while deliveries kept arriving (at most 30 s more).
    #[serde(default)]
    pub drain_waited_secs: f64,
    /// False when deliveries were still arriving when that wait ended: a delivery still
    /// missing then may be late rather than lost, so the run is invalid.
    #[serde(default = "yes")]
    pub settled: bool,
    /// `I/N` when this run is one part of a scenario split over machines (`--part`);
    /// after `merge`, the parts merged, comma-separated.
    #[serde(default)]
    pub part: Option<String>,
    /// When the schedule started (every device connected), Unix milliseconds; after
    /// `merge`, the earliest part's.
    #[serde(default)]
    pub schedule_start_unix_ms: Option<u64>,
    /// How far apart the merged parts started their schedules, ms (0 for one process).
    #[serde(default)]
    pub schedule_start_spread_ms: f64,
    /// The open-file limit the process found (bounds connections per process).
    pub open_files_limit: Option<u64>,
    /// The servers' resource use: the reference server when the generator started it,
    /// or the processes named with `--server-pid`.
    #[serde(default)]
    pub server_usage: Option<ServerUsage>,
    /// The generator's own resource use (all its worker processes).
    #[serde(default)]
    pub generator_usage: Option<GeneratorUsage>,
    /// Counts.
    pub counts: Counts,
    /// Latencies.
    pub latency: Latencies,
    /// Contract violations seen.
    pub violations: Tally,
    /// Shortest gap between two `presence` frames on one connection, ms (none: fewer than two).
    #[serde(default)]
    pub presence_gap_min_ms: Option<f64>,
    /// Each target and its result.
    pub slo: Vec<SloResult>,
    /// One point per second.
    pub timeline: Vec<TimelinePoint>,
    /// False when the generator, not the server, was the bottleneck (or devices failed).
    pub valid: bool,
    /// Why the run is invalid.
    pub invalid_reasons: Vec<String>,
    /// Every target met, no violation, and the run valid.
    pub pass: bool,
    /// The scenario as run.
    pub config: Scenario,
}

/// Computes the summary from every device's observations.
pub fn summarize_run(
    state: &RunState,
    (target, local_server): (&str, Option<crate::local::LocalKind>),
    usage: Option<(crate::local::ProcUsage, crate::local::ProcUsage)>,
    generator_usage: Option<GeneratorUsage>,
    wall_secs: f64,
) -> (Summary, Histograms) {
    let (config, counters) = (&state.config, &state.counters);
    let devices = state.devices();
    let histograms = state.histograms.merged();
    let mut violations = Tally::default();
    let mut counts = Counts {
        devices_planned: config.devices_planned(),
        devices_connected: devices.len() as u64,
        devices_failed: counters.get(Count::ConnectFailures),
        scheduled: counters.get(Count::Scheduled),
        sent: counters.get(Count::Sent),
        skipped_offline: counters.get(Count::SkippedOffline),
        reconnect_failures: counters.get(Count::ReconnectFailures),
        images_sent: counters.get(Count::ImagesSent),
        upload_failures: counters.get(Count::UploadFailures),
        downloads: counters.get(Count::Downloads),
        download_failures: counters.get(Count::DownloadFailures),
        ..Counts::default()
    };
    let mut presence_gap_min_us: Option<u64> = None;
    for device in &devices {
        let s = device.state.lock().expect("device state");
        violations.absorb(&s.violations);
        counts.send_errors += s.send_errors;
        counts.devices_dropped += u64::from(!s.connected);
        counts.presence_frames += s.presence_frames;
        counts.presence_states += s.presence_states;
        if let Some(gap) = s.presence_gap_min_us {
            presence_gap_min_us = Some(presence_gap_min_us.map_or(gap, |g| g.min(gap)));
        }
    }
    counts.acked = state.acked.count();
    // Lost: every acknowledged message must be held by every connected device of every member.
    // Each device's user, indexed once rather than scanned per acknowledged message.
    let mut devices_of_user: std::collections::HashMap<
        u32,
        Vec<&std::sync::Arc<crate::device::Device>>,
    > = std::collections::HashMap::new();
    for device in &devices {
        devices_of_user.entry(device.user).or_default().push(device);
    }
    for (index, seqs) in state.acked.by_conv() {
        if seqs.len() == 0 {
            continue;
        }
        let c = &config.world.convs[index as usize];
        let conv = c.id.as_str();
        let members = c.members.iter().flat_map(|u| devices_of_user.get(u));
        for device in members.flatten() {
            counts.deliveries_expected += seqs.len();
            let s = device.state.lock().expect("device state");
            for seq in seqs.iter() {
                if s.holds(index, seq) {
                    counts.deliveries_received += 1;
                } else {
                    violations.record(Violation::Lost, || {
                        format!("{} never received {conv} seq {seq}", device.name())
                    });
                }
            }
        }
    }
    let latency = histograms.summaries();
    let mut summary = Summary {
        scenario: config.scenario.name.clone(),
        run_id: config.run_id.clone(),
        target: target.to_owned(),
        reference_server: local_server == Some(crate::local::LocalKind::Reference),
        local_server,
        wall_secs,
        drain_waited_secs: 0.0,
        settled: true,
        part: None,
        schedule_start_unix_ms: state.gate.started_ms(),
        schedule_start_spread_ms: 0.0,
        open_files_limit: open_files_limit(),
        server_usage: None,
        generator_usage,
        counts,
        latency,
        violations,
        presence_gap_min_ms: presence_gap_min_us.map(|us| us as f64 / 1000.0),
        slo: Vec::new(),
        timeline: state.timeline.lock().expect("timeline").clone(),
        valid: false,
        invalid_reasons: Vec::new(),
        pass: false,
        config: config.scenario.clone(),
    };
    if let Some((before, after)) = usage {
        summary.server_usage = Some(server_usage(&summary, before, after));
    }
    evaluate(&mut summary);
    (summary, histograms)
}

/// The reference server's figures over a run, from its usage before and after.
pub fn server_usage(
    summary: &Summary,
    before: crate::local::ProcUsage,
    after: crate::local::ProcUsage,
) -> ServerUsage {
    let cpu_secs = (after.cpu_secs - before.cpu_secs).max(0.01);
    let devices = summary.counts.devices_connected.max(1) as f64;
    ServerUsage {
        processes: after.processes,
        cpu_secs,
        rss_before_kib: before.rss_kib,
        rss_connected_kib: after.rss_kib,
        rss_peak_kib: after.rss_peak_kib,
        bytes_per_connection: (crate::local::grown_kib(
            (before.rss_kib, before.anon_kib),
            (after.rss_kib, after.anon_kib),
        ) * 1024) as f64
            / devices,
        deliveries_per_cpu_sec: summary.counts.deliveries_received as f64 / cpu_secs,
        messages_per_cpu_sec: summary.counts.acked as f64 / cpu_secs,
    }
}

/// Merged parts whose schedules started further apart than this make the run invalid.
pub const SCHEDULE_START_SPREAD_MAX_MS: f64 = 1000.0;

/// Judges a summary against its scenario's targets: sets `slo`, validity and `pass`.
pub fn evaluate(s: &mut Summary) {
    let slo_cfg = &s.config.slo;
    s.slo = vec![
        slo_result(
            "delivery p99 (ms)",
            slo_cfg.delivery_p99_ms,
            s.latency[Measure::Delivery].p99_ms,
        ),
        slo_result(
            "send→ack p99 (ms)",
            slo_cfg.ack_p99_ms,
            s.latency[Measure::SendAck].p99_ms,
        ),
        slo_result(
            "lost deliveries",
            slo_cfg.lost_max as f64,
            s.violations.count(Violation::Lost) as f64,
        ),
    ];
    if let Some(gap_min_ms) = slo_cfg.presence_gap_min_ms {
        // No two frames at all would prove nothing: count it as a miss.
        let measured = s.presence_gap_min_ms.unwrap_or(0.0);
        s.slo.push(SloResult {
            name: "shortest gap between presence frames on a connection (ms)".into(),
            target: gap_min_ms,
            measured,
            pass: measured >= gap_min_ms,
            at_least: true,
        });
    }
    s.invalid_reasons.clear();
    if let Some(bound_mib) = slo_cfg.server_rss_peak_mib {
        match &s.server_usage {
            Some(usage) => s.slo.push(slo_result(
                "server peak resident memory (MiB)",
                bound_mib,
                usage.rss_peak_kib as f64 / 1024.0,
            )),
            None => s.invalid_reasons.push(
                "slo.server_rss_peak_mib is set but the server's memory was not read: \
                 let the generator start the server, or name its processes with --server-pid"
                    .into(),
            ),
        }
    }
    let lag_max_ms = slo_cfg.generator_lag_p99_ms;
    if s.latency[Measure::GeneratorLag].p99_ms > lag_max_ms {
        s.invalid_reasons.push(format!(
            "generator lag p99 {:.1} ms exceeds {lag_max_ms:.1} ms: the generator, not the server, was the bottleneck",
            s.latency[Measure::GeneratorLag].p99_ms
        ));
    }
    if s.counts.devices_failed > 0 {
        s.invalid_reasons.push(format!(
            "{} of {} devices could not connect",
            s.counts.devices_failed, s.counts.devices_planned
        ));
    }
    if s.counts.reconnect_failures > 0 {
        s.invalid_reasons.push(format!(
            "{} devices could not reconnect after churn",
            s.counts.reconnect_failures
        ));
    }
    if s.counts.acked == 0 {
        s.invalid_reasons.push("no message was acknowledged".into());
    }
    if !s.settled {
        s.invalid_reasons.push(format!(
            "deliveries were still arriving {:.1} s after the schedule ended: a missing delivery cannot be told from a late one",
            s.drain_waited_secs
        ));
    }
    if s.schedule_start_spread_ms > SCHEDULE_START_SPREAD_MAX_MS {
        s.invalid_reasons.push(format!(
            "the merged parts started their schedules {:.0} ms apart (more than {SCHEDULE_START_SPREAD_MAX_MS} ms): they did not share one schedule",
            s.schedule_start_spread_ms
        ));
    }
    s.valid = s.invalid_reasons.is_empty();
    s.pass = s.valid
        && s.slo.iter().all(|r| r.pass)
        && s.violations.total() == 0
        && s.counts.send_errors == 0
        && s.counts.upload_failures == 0
        && s.counts.download_failures == 0;
}

fn slo_result(name: &str, target: f64, measured: f64) -> SloResult {
    SloResult {
        name: name.to_owned(),
        target,
        measured,
        pass: measured <= target,
        at_least: false,
    }
}

/// The soft open-file limit of this process, from `/proc/self/limits`.
pub fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The text of `path`'s `summary.json` (`path` is the file or its folder), and the file.
pub fn summary_text(path: &Path) -> anyhow::Result<(std::path::PathBuf, String)> {
    let file = if path.is_dir() {
        path.join("summary.json")
    } else {
        path.to_owned()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok((file, text))
}

/// The `summary.json` of `path` (the file or its folder).
pub fn read_summary(path: &Path) -> anyhow::Result<Summary> {
    let (file, text) = summary_text(path)?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

/// A report folder's time stamp: now, UTC, `YYYYMMDDTHHMMSSZ`.
pub fn timestamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

/// Writes `summary.json`, `histograms.json`, `report.md`, `report.html` and the `.hgrm` files into `dir`.
pub fn write(dir: &Path, summary: &Summary, h: &Histograms) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    for m in Measure::ALL {
        if m.always_recorded() || !h[m].is_empty() {
            std::fs::write(dir.join(format!("{}.hgrm", m.key())), hgrm(&h[m]))?;
        }
    }
    let md = markdown(summary);
    std::fs::write(dir.join("report.md"), &md)?;
    let encoded: serde_json::Map<String, serde_json::Value> = Measure::ALL
        .iter()
        .map(|&m| (m.key().to_owned(), crate::metrics::encode(&h[m]).into()))
        .collect();
    std::fs::write(
        dir.join("histograms.json"),
        serde_json::to_string_pretty(&encoded)?,
    )?;
    std::fs::write(dir.join("report.html"), html(summary, h))?;
    Ok(())
}

fn markdown(s: &Summary) -> String {
    let verdict = if s.pass {
        "PASS"
    } else if !s.valid {
        "INVALID"
    } else {
        "FAIL"
    };
    let mut md = format!(
        "# Load run `{}`: {verdict}\n\nTarget `{}`{}; run id `{}`; {:.1} s wall; open-file limit {}.\n\n",
        s.scenario,
        s.target,
        s.local_server.map_or(String::new(), |k| format!(" ({}, started by the generator)", k.label())),
        s.run_id,
        s.wall_secs,
        s.open_files_limit.map_or("unknown".into(), |n| n.to_string()),
    );
    md.push_str("## Targets\n\n| what | target | measured | |\n|---|---|---|---|\n");
    for r in &s.slo {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.name,
            html::figure(r.target, 3),
            html::figure(r.measured, 3),
            if r.pass { "pass" } else { "**miss**" }
        ));
    }
    for reason in &s.invalid_reasons {
        md.push_str(&format!("\n**Invalid run:** {reason}\n"));
    }
    md.push_str("\n## Latency (ms)\n\n| | count | p50 | p90 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|\n");
    // Histograms a run did not use (no churn, no images, no warm-up) are left out.
    for m in Measure::ALL {
        let l = &s.latency[m];
        if l.count == 0 && !m.always_recorded() {
            continue;
        }
        let name = m.label();
        md.push_str(&format!(
            "| {name} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
        ));
    }
    let c = &s.counts;
    md.push_str(&format!(
        "\n## Counts\n\n- devices: {} planned, {} connected, {} failed, {} dropped during the run\n- messages: {} scheduled, {} sent, {} acknowledged, {} refused, {} skipped (device offline)\n- deliveries: {} of {} expected\n",
        c.devices_planned, c.devices_connected, c.devices_failed, c.devices_dropped, c.scheduled, c.sent, c.acked, c.send_errors, c.skipped_offline, c.deliveries_received, c.deliveries_expected
    ));
    if c.images_sent + c.upload_failures > 0 {
        md.push_str(&format!(
            "- images: {} uploaded and sent, {} uploads failed, {} downloaded, {} downloads failed\n",
            c.images_sent, c.upload_failures, c.downloads, c.download_failures
        ));
    }
    if c.presence_frames > 0 {
        md.push_str(&format!(
            "- presence: {} frames carrying {} user states; shortest gap on one connection {}\n",
            c.presence_frames,
            c.presence_states,
            s.presence_gap_min_ms
                .map_or("n/a".into(), |g| format!("{g:.1} ms"))
        ));
    }
    if let Some(u) = &s.server_usage {
        let heading = if let Some(kind) = s.local_server {
            kind.label().to_owned()
        } else if s.reference_server {
            "Reference server".to_owned()
        } else {
            format!(
                "Servers ({} processes named by --server-pid, figures summed)",
                u.processes
            )
        };
        md.push_str(&format!(
            "\n## {heading}\n\n- CPU: {:.2} s; {:.0} messages and {:.0} deliveries per CPU second\n- memory: {} KiB before connects, {} KiB connected, {} KiB peak; {:.0} bytes per connection\n",
            u.cpu_secs, u.messages_per_cpu_sec, u.deliveries_per_cpu_sec, u.rss_before_kib, u.rss_connected_kib, u.rss_peak_kib, u.bytes_per_connection
        ));
    }
    if let Some(g) = &s.generator_usage {
        md.push_str(&format!(
            "\n## Generator\n\n- {} process(es); CPU {:.2} s\n- memory: {} KiB before connects, {} KiB connected, {} KiB peak; {:.0} bytes per device\n",
            g.processes, g.cpu_secs, g.rss_before_kib, g.rss_connected_kib, g.rss_peak_kib, g.bytes_per_device
        ));
    }
    let v = &s.violations;
    let counts: Vec<String> = CHECKED_VIOLATIONS
        .iter()
        .map(|kind| format!("{kind} {}", v.count(*kind)))
        .collect();
    md.push_str(&format!(
        "\n## Delivery contract\n\n{} (docs/GUARANTEES.md)\n",
        counts.join(" · ")
    ));
    for e in v.examples() {
        md.push_str(&format!("- {e}\n"));
    }
    md.push_str("\nFiles: `summary.json`, `histograms.json` (lossless, for `merge`), `*.hgrm` (percentile distributions, ms), `report.html`, `goose.html` (goose's own report).\n");
    md
}

/// The run's verdict and the reasons behind it, for the banner.
fn verdict(s: &Summary) -> (Verdict, String, Vec<String>) {
    let missed: Vec<String> = s
        .slo
        .iter()
        .filter(|r| !r.pass)
        .map(|r| {
            format!(
                "missed: {} measured {} against {} {}",
                r.name,
                html::figure(r.measured, 3),
                if r.at_least { "at least" } else { "at most" },
                html::figure(r.target, 3)
            )
        })
        .collect();
    let c = &s.counts;
    let mut failures = missed;
    if s.violations.total() > 0 {
        failures.push(format!(
            "{} delivery contract violations",
            s.violations.total()
        ));
    }
    for (n, what) in [
        (c.send_errors, "sends refused"),
        (c.upload_failures, "uploads failed"),
        (c.download_failures, "downloads failed"),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    if !s.valid {
        let mut reasons = s.invalid_reasons.clone();
        reasons.extend(failures);
        return (
            Verdict::Invalid,
            "the figures say nothing about the server".into(),
            reasons,
        );
    }
    if s.pass {
        let headline = format!(
            "every target met; {} messages acknowledged, {} of {} deliveries, no contract violation",
            html::thousands(c.acked),
            html::thousands(c.deliveries_received),
            html::thousands(c.deliveries_expected)
        );
        return (Verdict::Pass, headline, Vec::new());
    }
    (
        Verdict::Fail,
        format!("{} problem(s)", failures.len()),
        failures,
    )
}

/// `report.html`: a self-contained page (no script, no network) with the verdict, the
/// targets, latency, counts, usage, the delivery contract and the charts.
fn html(s: &Summary, h: &Histograms) -> String {
    use html::Cell;
    let mut page = Page::new(&format!("Load run {}", s.scenario));
    let (verdict, headline, reasons) = verdict(s);
    page.banner(verdict, &headline, &reasons);
    page.paragraph(&format!(
        "Target {}{}; run id {}; {:.1} s wall; open-file limit {}.",
        s.target,
        s.local_server.map_or(String::new(), |k| format!(
            " ({}, started by the generator)",
            k.label()
        )),
        s.run_id,
        s.wall_secs,
        s.open_files_limit.map_or("unknown".into(), html::thousands)
    ));

    page.heading("Targets");
    let rows: Vec<Vec<Cell>> = s
        .slo
        .iter()
        .map(|r| {
            vec![
                Cell::text(&r.name),
                Cell::text(format!(
                    "{} {}",
                    if r.at_least { "≥" } else { "≤" },
                    html::figure(r.target, 3)
                )),
                Cell::Num(r.measured, 3),
                Cell::Mark(r.pass),
            ]
        })
        .collect();
    page.table("targets", &["what", "target", "measured", "result"], &rows);

    page.heading("Latency (ms)");
    let rows: Vec<Vec<Cell>> = Measure::ALL
        .iter()
        .filter(|m| s.latency[**m].count > 0)
        .map(|&m| {
            let l = &s.latency[m];
            vec![
                Cell::text(m.label()),
                Cell::Int(l.count),
                Cell::Num(l.p50_ms, 3),
                Cell::Num(l.p90_ms, 3),
                Cell::Num(l.p99_ms, 3),
                Cell::Num(l.p999_ms, 3),
                Cell::Num(l.max_ms, 3),
            ]
        })
        .collect();
    if rows.is_empty() {
        page.paragraph("No latency was recorded.");
    } else {
        page.table(
            "latency",
            &["measure", "count", "p50", "p90", "p99", "p99.9", "max"],
            &rows,
        );
    }

    page.heading("Counts");
    let c = &s.counts;
    let mut rows = vec![
        count_row("devices planned", c.devices_planned),
        count_row("devices connected", c.devices_connected),
        count_row("devices that failed to connect", c.devices_failed),
        count_row("devices dropped during the run", c.devices_dropped),
        count_row("messages scheduled", c.scheduled),
        count_row("messages sent", c.sent),
        count_row("messages acknowledged", c.acked),
        count_row("sends refused", c.send_errors),
        count_row("sends skipped (device offline)", c.skipped_offline),
        count_row("deliveries expected", c.deliveries_expected),
        count_row("deliveries received", c.deliveries_received),
    ];
    if c.images_sent + c.upload_failures > 0 {
        rows.extend([
            count_row("images uploaded and sent", c.images_sent),
            count_row("uploads failed", c.upload_failures),
            count_row("images downloaded", c.downloads),
            count_row("downloads failed", c.download_failures),
        ]);
    }
    if c.presence_frames > 0 {
        rows.extend([
            count_row("presence frames", c.presence_frames),
            count_row("user states in them", c.presence_states),
        ]);
    }
    page.table("counts", &["what", "count"], &rows);

    let mut usage_rows = Vec::new();
    if let Some(u) = &s.server_usage {
        usage_rows.push(vec![
            Cell::text(if u.processes > 1 {
                format!("server ({} processes, summed)", u.processes)
            } else {
                "server".into()
            }),
            Cell::Num(u.cpu_secs, 2),
            Cell::Int(u.rss_before_kib),
            Cell::Int(u.rss_connected_kib),
            Cell::Int(u.rss_peak_kib),
            Cell::Num(u.bytes_per_connection, 0),
        ]);
    }
    if let Some(g) = &s.generator_usage {
        usage_rows.push(vec![
            Cell::text(format!("generator ({} process(es))", g.processes)),
            Cell::Num(g.cpu_secs, 2),
            Cell::Int(g.rss_before_kib),
            Cell::Int(g.rss_connected_kib),
            Cell::Int(g.rss_peak_kib),
            Cell::Num(g.bytes_per_device, 0),
        ]);
    }
    if !usage_rows.is_empty() {
        page.heading("Resource use");
        page.table(
            "usage",
            &[
                "process",
                "CPU s",
                "KiB before connects",
                "KiB connected",
                "KiB peak",
                "bytes per device",
            ],
            &usage_rows,
        );
        if let Some(u) = &s.server_usage {
            page.paragraph(&format!(
                "Server: {} messages and {} deliveries per CPU second.",
                html::figure(u.messages_per_cpu_sec.round(), 0),
                html::figure(u.deliveries_per_cpu_sec.round(), 0)
            ));
        }
    }

    page.heading("Delivery contract (docs/GUARANTEES.md)");
    let rows: Vec<Vec<Cell>> = CHECKED_VIOLATIONS
        .iter()
        .map(|kind| {
            let n = s.violations.count(*kind);
            vec![
                Cell::text(kind.to_string()),
                Cell::Int(n),
                Cell::Mark(n == 0),
            ]
        })
        .collect();
    page.table("contract", &["violation", "count", "result"], &rows);
    if !s.violations.examples().is_empty() {
        page.list(s.violations.examples());
    }

    page.heading("Charts");
    let t = &s.timeline;
    page.chart(
        "percentile-spectrum",
        &crate::plots::percentile_spectrum(&h[Measure::Delivery], &h[Measure::SendAck]),
        "Latency by percentile (log scale: each step right is ten times rarer), from the scheduled send time.",
    );
    page.chart(
        "latency-over-time",
        &crate::plots::latency_over_time(t),
        "Delivery latency per second: p50, p99 and the slowest delivery.",
    );
    page.chart(
        "messages-over-time",
        &crate::plots::messages_over_time(t),
        "Messages per second: offered by the schedule, sent by the generator, acknowledged by the server.",
    );
    page.chart(
        "deliveries-over-time",
        &crate::plots::deliveries_over_time(t),
        "Deliveries (message × recipient device) per second.",
    );
    page.chart(
        "devices-over-time",
        &crate::plots::devices_over_time(t),
        "Devices with an open connection.",
    );
    if let Some(svg) = crate::plots::server_cpu_over_time(t) {
        page.chart(
            "server-cpu",
            &svg,
            "Server CPU per second, percent of one core.",
        );
    }
    if let Some(svg) = crate::plots::server_memory_over_time(t) {
        page.chart("server-memory", &svg, "Server resident memory.");
    }
    page.paragraph("Files: summary.json, histograms.json (lossless, for merge), *.hgrm (percentile distributions, ms), report.md, goose.html (goose's own report).");
    page.finish()
}

fn count_row(what: &str, n: u64) -> Vec<html::Cell> {
    vec![html::Cell::text(what), html::Cell::Int(n)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::ProcUsage;

    fn usage(cpu_secs: f64, rss_kib: u64) -> ProcUsage {
        ProcUsage {
            cpu_secs,
            rss_kib,
            rss_peak_kib: rss_kib + 100,
            processes: 1,
            anon_kib: 0,
        }
    }

    /// Per-device memory is the anonymous memory grown when it is known: code pages
    /// paged in by the first connects are not a device's.
    #[test]
    fn generator_usage_counts_anonymous_memory() {
        let before = ProcUsage {
            anon_kib: 4_000,
            ..usage(1.0, 10_000)
        };
        let after = ProcUsage {
            anon_kib: 6_000,
            ..usage(2.0, 20_000)
        };
        let mut a = GeneratorUsage::of(before, after, 1_000);
        assert!((a.bytes_per_device - 2_048.0).abs() < 1e-9);
        a.absorb(&GeneratorUsage::of(before, after, 1_000), 2_000);
        assert!((a.bytes_per_device - 2_048.0).abs() < 1e-9);
        // One process without the figure: all resident memory, as before.
        a.absorb(
            &GeneratorUsage::of(usage(0.0, 10_000), usage(0.0, 20_000), 1_000),
            3_000,
        );
        assert!((a.bytes_per_device - 30_000.0 * 1024.0 / 3_000.0).abs() < 1e-6);
    }

    /// Per-device memory is the growth over the devices; workers add up and the
    /// per-device figure is recomputed over all their devices.
    #[test]
    fn generator_usage_per_device_and_summed() {
        let mut a = GeneratorUsage::of(usage(1.0, 10_000), usage(3.0, 20_000), 1_000);
        assert_eq!(a.processes, 1);
        assert!((a.cpu_secs - 2.0).abs() < 1e-9);
        assert!((a.bytes_per_device - 10_240.0).abs() < 1e-9);
        let b = GeneratorUsage::of(usage(0.5, 10_000), usage(1.5, 40_000), 2_000);
        assert!((b.bytes_per_device - 15_360.0).abs() < 1e-9);
        a.absorb(&b, 3_000);
        assert_eq!(a.processes, 2);
        assert!((a.cpu_secs - 3.0).abs() < 1e-9);
        assert_eq!(
            (a.rss_before_kib, a.rss_connected_kib, a.rss_peak_kib),
            (20_000, 60_000, 60_200)
        );
        // (60,000 - 20,000) KiB over 3,000 devices.
        assert!((a.bytes_per_device - 40_000.0 * 1024.0 / 3_000.0).abs() < 1e-6);
    }
}
