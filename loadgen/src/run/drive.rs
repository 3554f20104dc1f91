//! The goose side: one goose user per driver. Each driver connects its share of
//! the devices (on start), waits until every driver is connected, then sends on
//! an open-model schedule: message k of driver i is due at `start + (k + i/drivers) * interval`
//! whatever the server does, and latency is measured from that due time. The whole
//! schedule of a driver is one goose transaction: a transaction per send cost more
//! than the send.

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
}

#[derive(Clone)]
struct DriverSession(Arc<Driver>);

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
        devices.push(connect_user(state, u, user).await?);
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
    };
    user.set_session_data(DriverSession(Arc::new(driver)));
    Ok(())
}

/// Connects every device of user `u`; a device that fails to connect is counted,
/// reported to goose, and left out.
async fn connect_user(
    state: &RunState,
    u: u32,
    user: &mut GooseUser,
) -> Result<Vec<Arc<Device>>, Box<TransactionError>> {
    let world = &state.config.world;
    let convs: Box<[u32]> = std::iter::once(world.direct_of(u))
        .chain(world.group_of(u))
        .map(|k| k as u32)
        .collect();
    let target = state.devices_ctx.target_of(u);
    let mut of_user = Vec::new();
    for d in 0..world.devices_per_user() {
        let started = std::time::Instant::now();
        let source =
            crate::device::source_for(target.addr, state.counters.bump(Count::ConnectionsOpened));
        let result = Device::connect(&state.devices_ctx, (u, d), convs.clone(), source).await;
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

/// The whole schedule of one driver, in one goose transaction: message k is due at
/// `start + k * interval`. The driver sleeps only while it is ahead of the schedule;
/// sends that fell due while it slept (the timer wakes at millisecond granularity)
/// go out one after another without a timer each. Acks are timed by the device that
/// receives them (into the HDR histograms), not reported to goose one by one.
async fn run_schedule(state: &Arc<RunState>, user: &mut GooseUser) -> TransactionResult {
    let session = user
        .get_session_data::<DriverSession>()
        .cloned()
        .ok_or_else(|| Box::new(failed("driver not connected".into())))?;
    let d = &*session.0;
    let mut composer = Composer::new(state, d.index);
    for k in 0..state.config.sends_per_driver {
        let due = d.start + state.config.interval * u32::try_from(k).unwrap_or(u32::MAX);
        if Instant::now() < due {
            tokio::time::sleep_until(due).await;
        }
        let lag = Instant::now().saturating_duration_since(due);
        state
            .histograms
            .record(Measure::GeneratorLag, lag.as_micros() as u64);
        state.counters.bump(Count::Scheduled);
        let scheduled_us = now_us().saturating_sub(lag.as_micros() as u64);
        if let Err(why) = send_one(state, d, &mut composer, k, scheduled_us).await {
            user.record_custom_request_duration("WS", "send", lag, false, None, Some(&why))
                .await?;
        }
    }
    Ok(())
}

/// Builds the text and message id of a driver's sends in buffers it reuses.
struct Composer {
    /// `RUN-DRIVER-`: every message id of this driver starts with it.
    id_prefix: String,
    text_bytes: usize,
    message_id: String,
    text: String,
}

impl Composer {
    fn new(state: &RunState, driver: u32) -> Self {
        Self {
            id_prefix: format!("{}-{driver}-", state.config.run_id),
            text_bytes: state.config.scenario.load.text_bytes,
            message_id: String::new(),
            text: String::new(),
        }
    }

    /// Message `k`'s id and its text: the scheduled time stamp the receivers time
    /// deliveries by, padded to the scenario's `text_bytes`.
    fn compose(&mut self, k: u64, scheduled_us: u64) -> (&str, &str) {
        self.message_id.clear();
        self.message_id.push_str(&self.id_prefix);
        let _ = write!(self.message_id, "{k}");
        self.text.clear();
        let _ = write!(self.text, "lg:{scheduled_us}:");
        while self.text.len() < self.text_bytes {
            let padding = (self.text_bytes - self.text.len()).min(PADDING.len());
            self.text.push_str(&PADDING[..padding]);
        }
        (&self.message_id, &self.text)
    }
}

/// Send `k` of driver `d`, scheduled at `scheduled_us`: picks its sender and
/// conversation from the seed, then writes it (or starts its upload). `Err` says
/// why a send failed; an offline sender is counted, not an error.
async fn send_one(
    state: &Arc<RunState>,
    d: &Driver,
    composer: &mut Composer,
    k: u64,
    scheduled_us: u64,
) -> Result<(), String> {
    let (config, counters) = (&state.config, &state.counters);
    let h = mix(config.scenario.seed ^ (u64::from(d.index) << 40) ^ k);
    let slot = (h % d.users.len() as u64) as usize;
    let u = d.users[slot];
    let want_group = ((h >> 32) as f64 / f64::from(u32::MAX)) < config.scenario.load.group_share;
    let group = if want_group {
        config.world.group_of(u)
    } else {
        None
    };
    let conv = &config.world.convs[group.unwrap_or_else(|| config.world.direct_of(u))].id;
    let sender =
        d.devices[slot].get(((h >> 16) % u64::from(config.world.devices_per_user())) as usize);
    let (message_id, text) = composer.compose(k, scheduled_us);
    let want_image =
        (mix(h ^ 0x1A6E) % 10_000) as f64 / 10_000.0 < config.scenario.load.image_share;
    if let (true, Some((images, http)), Some(device)) = (want_image, &config.media, sender) {
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
                (conv.clone(), message_id.to_owned(), text.to_owned()),
                bytes,
                scheduled_us,
            ));
        }
        return Ok(());
    }
    let Some(device) = sender else {
        return Err("sender device is not connected".into());
    };
    match device
        .send(conv, message_id, text, None, scheduled_us)
        .await
    {
        Ok(()) => {
            counters.bump(Count::Sent);
            Ok(())
        }
        Err(SendError::Offline) => {
            counters.bump(Count::SkippedOffline);
            Ok(())
        }
        Err(e) => Err(format!("{e:#}")),
    }
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
    match http.upload(&device.token(), &conv, bytes).await {
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
                Err(e) => tracing::warn!(device = device.name(), error = %e, "image send failed"),
            }
        }
        Err(e) => {
            tracing::warn!(device = device.name(), error = %e, "upload failed");
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
    let args = [
        "--host",
        host,
        "--users",
        &drivers,
        "--increase-rate",
        &drivers,
        // One iteration: the send transaction runs the driver's whole schedule.
        "--iterations",
        "1",
        "--report-file",
        goose_report,
        "--no-print-metrics",
        // Latency is in the run's own histograms; goose's per-transaction and
        // per-scenario metrics would only repeat it.
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

/// [`run_schedule`] as a goose transaction holding the run's state.
fn send_transaction(state: &Arc<RunState>) -> Transaction {
    let state = Arc::clone(state);
    Transaction::new(Arc::new(move |user| {
        let state = Arc::clone(&state);
        Box::pin(async move { run_schedule(&state, user).await })
    }))
}
