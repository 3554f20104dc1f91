//! Churn: a share of the devices goes offline together, stays away, and comes back
//! presenting its cursors, while the schedule goes on; each return is timed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;

use crate::device::Device;
use crate::metrics::Measure;
use crate::run::state::{Count, RunState};
use crate::world::mix;

/// Devices reconnecting at once, at most.
const RECONNECTS_IN_FLIGHT_MAX: usize = 256;

/// Runs the scenario's churn rounds (none without churn); each return is timed until
/// its catch-up ends.
pub async fn churn(state: Arc<RunState>) {
    let Some(c) = state.config.scenario.churn.clone() else {
        return;
    };
    // The schedule starts with the first due send.
    while state.counters.get(Count::Scheduled) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(state.config.scenario.load.schedule_secs());
    let mut round = 0u64;
    loop {
        let wait = Duration::from_secs(if round == 0 { c.at_secs } else { c.every_secs });
        // Every drop happens, and every device is back, within the measured period.
        if tokio::time::Instant::now() + wait + Duration::from_secs(c.offline_secs) > end {
            return;
        }
        tokio::time::sleep(wait).await;
        let devices = state.devices();
        let chosen: Vec<Arc<Device>> = devices
            .into_iter()
            .enumerate()
            .filter(|(i, _)| {
                (mix(state.config.scenario.seed ^ 0xC0FFEE ^ (round << 32) ^ *i as u64) % 10_000)
                    as f64
                    / 10_000.0
                    < c.share
            })
            .map(|(_, d)| d)
            .collect();
        eprintln!(
            "churn: {} devices go offline for {} s",
            chosen.len(),
            c.offline_secs
        );
        futures_util::future::join_all(chosen.iter().map(|d| d.go_offline())).await;
        tokio::time::sleep(Duration::from_secs(c.offline_secs)).await;
        let back = futures_util::stream::iter(chosen)
            .map(|d| {
                let state = Arc::clone(&state);
                async move {
                    match d.reconnect().await {
                        Ok(took) => state
                            .histograms
                            .record(Measure::Reconnect, took.as_micros() as u64),
                        Err(e) => {
                            tracing::warn!(device = d.name(), error = %e, "reconnect failed");
                            state.counters.bump(Count::ReconnectFailures);
                        }
                    }
                }
            })
            .buffer_unordered(RECONNECTS_IN_FLIGHT_MAX);
        futures_util::StreamExt::collect::<Vec<()>>(back).await;
        round += 1;
        if c.every_secs == 0 {
            return;
        }
    }
}
