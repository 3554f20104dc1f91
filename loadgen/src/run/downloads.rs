//! Media-mix scenarios: recipients download a share of the images they receive, beside
//! the schedule (at most [`DOWNLOADS_IN_FLIGHT_MAX`] at once), each download timed.

use std::sync::Arc;
use std::time::Duration;

use crate::device::now_us;
use crate::metrics::Measure;
use crate::run::state::{Count, RunState};
use crate::world::mix;

/// Downloads running at once, at most.
const DOWNLOADS_IN_FLIGHT_MAX: usize = 16;

/// Media-mix: recipients download a share of the images they receive, beside the
/// schedule, until aborted.
pub async fn downloads(state: Arc<RunState>) {
    let Some((_, http)) = state.config.media.clone() else {
        return;
    };
    let share = state.config.scenario.load.image_download_share;
    let permits = Arc::new(tokio::sync::Semaphore::new(DOWNLOADS_IN_FLIGHT_MAX));
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let devices = state.devices();
        for device in devices {
            let received =
                std::mem::take(&mut device.state.lock().expect("device state").images_received);
            for (id, size, _) in received {
                let pick = mix(state.config.scenario.seed ^ now_us() ^ size);
                if (pick % 10_000) as f64 / 10_000.0 >= share {
                    continue;
                }
                let (state, http, device) =
                    (Arc::clone(&state), Arc::clone(&http), Arc::clone(&device));
                let permit = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("never closed");
                tokio::spawn(async move {
                    let _permit = permit;
                    match http.download(&device.token(), &id, size).await {
                        Ok(took) => {
                            state
                                .histograms
                                .record(Measure::Download, took.as_micros() as u64);
                            state.counters.bump(Count::Downloads);
                        }
                        Err(e) => {
                            tracing::warn!(device = device.name(), error = %e, "download failed");
                            state.counters.bump(Count::DownloadFailures);
                        }
                    }
                });
            }
        }
    }
}
