//! The goose side: one goose user per driver. Each driver connects its share of
//! the devices (on start), waits until every driver is connected, then sends on
//! an open-model schedule: message k of driver i is due at `start + (k + i/drivers) * interval`
//! whatever the server does, and latency is measured from that due time.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::Arc;

use goose::prelude::*;
use tokio::time::Instant;

use crate::device::{now_us, Device, SendError};
use crate::media::MediaHttp;
use crate::metrics::Measure;
use crate::run::state::{wait_until, Count, RunState, Start};
use crate::world::{mix, World};

/// Filler after a message's time stamp, up to the scenario's `text_bytes`.
const PADDING: &str = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx";

struct Driver {
    index: u32,
    users: Vec<u32>,
    devices: Vec<Vec<Arc<Device>>>,
    start: Instant,
    next_k: u64,
}

#[derive(Clone)]
struct DriverSession(Arc<tokio::sync::Mutex<Driver>>);

fn failed(msg: String) -> TransactionError {
    TransactionError::Custom(msg)
}

/// On start: connect this driver's devices, then wait for every other driver.
async fn connect_devices(state: &RunState, user: &mut GooseUser) -> TransactionResult {
    let config = &state.config;
    let drivers = config.scenario.load.drivers;
    let index = u32::try_from(user.weighted_users_index).unwrap_or(0) % drivers;
    let users = World::users_of_driver(&config.users, index, drivers);
    let mut devices = Vec::with_capacity(users.len());
    for &u in &users {
        devices.push(connect_user(state, index, u, user).await?);
    }
    if state.gate.arrive().await {
        wait_for_start(config.start).await;
        let started_us = now_us();
        // Messages scheduled before this belong to the warm-up.
        let judged_from_us = started_us + config.scenario.load.warmup_secs * 1_000_000;
        state.histograms.judge_from(judged_from_us);
        state.gate.open(started_us);
    } else {
        state.gate.opened().await;
    }
    let phase = config
        .interval
        .mul_f64(f64::from(index) / f64::from(drivers));
    let driver = Driver {
        index,
        users,
        devices,
        start: Instant::now() + phase,
        next_k: 0,
    };
    user.set_session_data(DriverSession(Arc::new(tokio::sync::Mutex::new(driver))));
    Ok(())
}

/// Connects every device of user `u` for driver `index`; a device that fails to
/// connect is counted, reported to goose, and left out.
async fn connect_user(
    state: &RunState,
    index: u32,
    u: u32,
    user: &mut GooseUser,
) -> Result<Vec<Arc<Device>>, Box<TransactionError>> {
    let world = &state.config.world;
    let user_id = world.user_id(u);
    let token = state
        .config
        .key
        .mint(&user_id, now_us() / 1_000_000 + 24 * 3600);
    let convs: HashSet<String> = std::iter::once(world.direct_of(u))
        .chain(world.group_of(u))
        .map(|k| world.convs[k].id.clone())
        .collect();
    let target = state.config.target_of(u);
    let mut of_user = Vec::new();
    for d in 0..world.devices_per_user() {
        let started = std::time::Instant::now();
        let result = Device::connect(
            &target.url,
            &token,
            (&user_id, &World::device_id(d)),
            convs.clone(),
            Arc::clone(state.histograms.driver(index)),
            (
                target.addr,
                crate::device::source_for(
                    target.addr,
                    state.counters.bump(Count::ConnectionsOpened),
                ),
            ),
        )
        .await;
        let took = started.elapsed();
        match result {
            Ok(device) => {
                state
                    .histograms
                    .record(Measure::Connect, took.as_micros() as u64);
                state
                    .devices
                    .lock()
                    .expect("devices")
                    .push(Arc::clone(&device));
                of_user.push(device);
                user.record_custom_request_duration("WS", "connect", took, true, None, None)
                    .await?;
            }
            Err(e) => {
                state.counters.bump(Count::ConnectFailures);
                let why = format!("{e:#}");
                user.record_custom_request_duration("WS", "connect", took, false, None, Some(&why))
                    .await?;
            }
        }
    }
    Ok(of_user)
}

/// The last driver to connect waits here for the schedule's start.
async fn wait_for_start(start: Start) {
    match start {
        Start::Connected => {}
        Start::OnGo => {
            // One schedule across worker processes: the parent says go once all are connected.
            println!("ready");
            let go = tokio::task::spawn_blocking(|| {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line).map(|_| line)
            });
            let _ = go.await;
        }
        Start::At(at) => {
            let _ = tokio::task::spawn_blocking(move || wait_until(at)).await;
        }
    }
}

/// One scheduled send. Acks are timed by the device that receives them (into the
/// HDR histograms), not reported to goose one by one.
async fn send_scheduled(state: &Arc<RunState>, user: &mut GooseUser) -> TransactionResult {
    let (config, counters) = (&state.config, &state.counters);
    let session = user
        .get_session_data::<DriverSession>()
        .cloned()
        .ok_or_else(|| Box::new(failed("driver not connected".into())))?;
    let mut d = session.0.lock().await;
    let k = d.next_k;
    d.next_k += 1;
    let due = d.start + config.interval * u32::try_from(k).unwrap_or(u32::MAX);
    tokio::time::sleep_until(due).await;
    let lag = Instant::now().saturating_duration_since(due);
    state
        .histograms
        .record(Measure::GeneratorLag, lag.as_micros() as u64);
    counters.bump(Count::Scheduled);
    let scheduled_us = now_us().saturating_sub(lag.as_micros() as u64);

    let h = mix(config.scenario.seed ^ (u64::from(d.index) << 40) ^ k);
    let slot = (h % d.users.len() as u64) as usize;
    let u = d.users[slot];
    let want_group = ((h >> 32) as f64 / f64::from(u32::MAX)) < config.scenario.load.group_share;
    let group = if want_group {
        config.world.group_of(u)
    } else {
        None
    };
    let conv = group.unwrap_or_else(|| config.world.direct_of(u));
    let conv = config.world.convs[conv].id.clone();
    let sender = d.devices[slot]
        .get(((h >> 16) % u64::from(config.world.devices_per_user())) as usize)
        .cloned();
    let mut text = String::with_capacity(config.scenario.load.text_bytes.max(32));
    let _ = write!(text, "lg:{scheduled_us}:");
    let padding = config.scenario.load.text_bytes.saturating_sub(text.len());
    text.push_str(&PADDING[..padding.min(PADDING.len())]);
    for _ in 0..padding.saturating_sub(PADDING.len()) {
        text.push('x');
    }
    let message_id = format!("{}-{}-{k}", config.run_id, d.index);
    let want_image =
        (mix(h ^ 0x1A6E) % 10_000) as f64 / 10_000.0 < config.scenario.load.image_share;
    if let (true, Some((images, http)), Some(device)) = (want_image, &config.media, &sender) {
        if device.is_offline() {
            counters.bump(Count::SkippedOffline);
        } else {
            // Open model: the upload runs beside the schedule, never holding it up.
            let bytes = images.unique(h >> 8, k ^ (u64::from(d.index) << 48));
            let (state, http, device) = (Arc::clone(state), Arc::clone(http), Arc::clone(device));
            tokio::spawn(send_image(
                state,
                http,
                device,
                (conv, message_id, text),
                bytes,
                scheduled_us,
            ));
        }
        return Ok(());
    }
    let outcome = match sender {
        Some(device) => {
            device
                .send(&conv, &message_id, &text, None, scheduled_us)
                .await
        }
        None => Err(SendError::Failed(anyhow::anyhow!(
            "sender device is not connected"
        ))),
    };
    match outcome {
        Ok(()) => {
            counters.bump(Count::Sent);
        }
        Err(SendError::Offline) => {
            counters.bump(Count::SkippedOffline);
        }
        Err(e) => {
            let why = format!("{e:#}");
            user.record_custom_request_duration("WS", "send", lag, false, None, Some(&why))
                .await?;
        }
    }
    Ok(())
}

/// Uploads an image, then sends it; failures are counted (and fail the run).
async fn send_image(
    state: Arc<RunState>,
    http: Arc<MediaHttp>,
    device: Arc<Device>,
    (conv, message_id, caption): (String, String, String),
    bytes: Vec<u8>,
    scheduled_us: u64,
) {
    match http.upload(device.token(), &conv, bytes).await {
        Ok((id, took)) => {
            state
                .histograms
                .record(Measure::Upload, took.as_micros() as u64);
            match device
                .send(&conv, &message_id, &caption, Some(&id), scheduled_us)
                .await
            {
                Ok(()) => {
                    state.counters.bump(Count::Sent);
                    state.counters.bump(Count::ImagesSent);
                }
                Err(SendError::Offline) => {
                    state.counters.bump(Count::SkippedOffline);
                }
                Err(e) => tracing::warn!(device = device.name, error = %e, "image send failed"),
            }
        }
        Err(e) => {
            tracing::warn!(device = device.name, error = %e, "upload failed");
            state.counters.bump(Count::UploadFailures);
        }
    }
}

/// Runs the goose attack; returns goose's metrics.
pub async fn run_goose(
    state: &Arc<RunState>,
    host: &str,
    goose_report: &str,
) -> anyhow::Result<goose::metrics::GooseMetrics> {
    let drivers = state.config.scenario.load.drivers.to_string();
    let iterations = state.config.sends_per_driver.to_string();
    let args = [
        "--host",
        host,
        "--users",
        &drivers,
        "--increase-rate",
        &drivers,
        "--iterations",
        &iterations,
        "--report-file",
        goose_report,
        "--no-print-metrics",
        // One transaction per send: goose's per-transaction and per-scenario metrics
        // would cost more than the send; latency is in the run's own histograms.
        "--no-transaction-metrics",
        "--no-scenario-metrics",
        "--quiet",
        "--no-telnet",
    ];
    let config = goose::config::GooseConfiguration::parse_args_default(&args)
        .map_err(|e| anyhow::anyhow!("goose configuration: {e}"))?;
    let metrics = GooseAttack::initialize_with_config(config)?
        .register_scenario(
            scenario!("chat")
                .register_transaction(
                    connect_transaction(state)
                        .set_on_start()
                        .set_name("connect"),
                )
                .register_transaction(send_transaction(state).set_name("send")),
        )
        .execute()
        .await?;
    Ok(metrics)
}

/// [`connect_devices`] as a goose transaction holding the run's state.
fn connect_transaction(state: &Arc<RunState>) -> Transaction {
    let state = Arc::clone(state);
    Transaction::new(Arc::new(move |user| {
        let state = Arc::clone(&state);
        Box::pin(async move { connect_devices(&state, user).await })
    }))
}

/// [`send_scheduled`] as a goose transaction holding the run's state: one `Arc`
/// clone per send, what looking up a global cost before.
fn send_transaction(state: &Arc<RunState>) -> Transaction {
    let state = Arc::clone(state);
    Transaction::new(Arc::new(move |user| {
        let state = Arc::clone(&state);
        Box::pin(async move { send_scheduled(&state, user).await })
    }))
}
