//! Watching a run from beside it: one timeline point per second (with a progress line
//! every two), and the drain that waits for the last deliveries once the schedule ends.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::local::ProcUsage;
use crate::metrics;
use crate::report::TimelinePoint;
use crate::run::state::{Count, RunState};

/// Longest wait past the scenario's `drain_secs` while deliveries keep arriving.
const DRAIN_EXTENSION_MAX: Duration = Duration::from_secs(30);

/// Waits until no send is pending and deliveries stop arriving, at most `drain`; past
/// `drain`, waits on while deliveries still arrive, at most [`DRAIN_EXTENSION_MAX`] more.
/// Returns how long it waited and whether deliveries had stopped arriving (when they had
/// not, a delivery still missing may be late rather than lost).
pub async fn settle(state: &RunState, drain: Duration) -> (Duration, bool) {
    let started = tokio::time::Instant::now();
    let (soft, hard) = (started + drain, started + drain + DRAIN_EXTENSION_MAX);
    let mut last = u64::MAX;
    loop {
        let devices = state.devices();
        let pending: usize = devices.iter().map(|d| d.pending()).sum();
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        let quiet = received == last;
        let now = tokio::time::Instant::now();
        if quiet && (pending == 0 || now >= soft) {
            return (started.elapsed(), true);
        }
        if now >= hard {
            return (started.elapsed(), false);
        }
        last = received;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Samples the timeline every second (with the CPU and memory of the server
/// processes `server_pids`, when readable) and prints a progress line every two.
pub async fn progress(state: Arc<RunState>, server_pids: Vec<u32>) {
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut previous = metrics::latency_histogram();
    let (mut sent_before, mut offered_before, mut acked_before) = (0, 0, 0);
    let mut server_before = ProcUsage::of_all(&server_pids).map(|u| (Instant::now(), u));
    loop {
        every.tick().await;
        let server_now = ProcUsage::of_all(&server_pids).map(|u| (Instant::now(), u));
        let server_cpu_percent = match (server_before, server_now) {
            (Some((t0, u0)), Some((t1, u1))) if t1 > t0 => {
                Some(100.0 * (u1.cpu_secs - u0.cpu_secs).max(0.0) / (t1 - t0).as_secs_f64())
            }
            _ => None,
        };
        server_before = server_now;
        let devices = state.devices();
        let connected = devices
            .iter()
            .filter(|d| d.state.lock().expect("state").connected)
            .count() as u64;
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        let total = state.histograms.delivery_so_far();
        let mut window = total.clone();
        window.subtract(&previous).expect("counts only grow");
        previous = total;
        let sent = state.counters.get(Count::Sent);
        let offered = state.counters.get(Count::Scheduled);
        let acked = state.histograms.acked_so_far();
        let point = TimelinePoint {
            t_secs: started.elapsed().as_secs_f64(),
            devices_connected: connected,
            sent: sent - sent_before,
            delivered: window.len(),
            delivery_p99_ms: window.value_at_quantile(0.99) as f64 / 1000.0,
            delivery_p50_ms: window.value_at_quantile(0.50) as f64 / 1000.0,
            delivery_max_ms: window.max() as f64 / 1000.0,
            offered: offered.saturating_sub(offered_before),
            acked: acked.saturating_sub(acked_before),
            server_cpu_percent,
            server_rss_kib: server_now.map(|(_, u)| u.rss_kib),
        };
        (sent_before, offered_before, acked_before) = (sent, offered, acked);
        let seconds = state.timeline.lock().expect("timeline").len();
        if seconds.is_multiple_of(2) {
            eprintln!(
                "[{:>5.1}s] devices {connected} | sent {sent} / due {} | received {received} | delivery p99 {:.1} ms",
                point.t_secs,
                state.counters.get(Count::Scheduled),
                point.delivery_p99_ms
            );
        }
        state.timeline.lock().expect("timeline").push(point);
    }
}
