//! The goose side: one goose user per driver. Each driver connects its share of
//! the devices (on start), waits until every driver is connected, then sends on
//! an open-model schedule: message k of driver i is due at `start + (k + i/drivers) * interval`
//! whatever the server does, and latency is measured from that due time.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use chatproof_server::auth::TokenKey;
use futures_util::StreamExt as _;
use goose::prelude::*;
use hdrhistogram::Histogram;
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::device::{now_us, Device, Target};
use crate::media::{ImageSet, MediaHttp};
use crate::metrics::{latency_histogram, record_us, Histograms, LatencyStats, Measure};
use crate::scenario::Scenario as LoadScenario;
use crate::world::{mix, World};

/// Shared state of one run (goose transactions are plain functions, so it is global).
pub struct Run {
    /// The scenario.
    pub scenario: LoadScenario,
    /// Its population.
    pub world: World,
    /// The users this process drives (all, or one worker's share).
    pub users: Vec<u32>,
    /// When the schedule starts once this process's devices are connected.
    pub start: Start,
    /// When the schedule started, Unix milliseconds (0 until it has).
    pub schedule_started_ms: AtomicU64,
    /// The servers devices connect to (user `u` to `targets[u % len]`); never empty.
    pub targets: Vec<Target>,
    /// Connections opened so far (spreads source addresses).
    pub connections_opened: AtomicU64,
    /// Mints device tokens.
    pub key: TokenKey,
    /// Prefix of message ids.
    pub run_id: String,
    /// Every connected device.
    pub devices: Mutex<Vec<Arc<Device>>>,
    /// Connect + catch-up time per device, µs.
    pub connect: Mutex<Histogram<u64>>,
    /// How late the generator sent, versus the schedule, µs.
    pub lag: Mutex<Histogram<u64>>,
    /// Latency histograms, one set per driver.
    pub stats: Vec<Arc<Mutex<LatencyStats>>>,
    /// One point per second of the run.
    pub timeline: Mutex<Vec<crate::report::TimelinePoint>>,
    /// Devices that failed to connect.
    pub connect_failures: AtomicU64,
    /// Sends written to a socket.
    pub sent: AtomicU64,
    /// Sends not made because the chosen device was offline (churn).
    pub skipped_offline: AtomicU64,
    /// Reconnect + catch-up time of devices coming back from churn, µs.
    pub reconnect: Mutex<Histogram<u64>>,
    /// Reconnects that failed.
    pub reconnect_failures: AtomicU64,
    /// Sends due by the schedule.
    pub scheduled: AtomicU64,
    /// Media-mix scenarios: the images and the HTTP client.
    pub media: Option<(Arc<ImageSet>, Arc<MediaHttp>)>,
    /// Upload time per image, µs.
    pub upload: Mutex<Histogram<u64>>,
    /// Download time per image, µs.
    pub download: Mutex<Histogram<u64>>,
    /// Images uploaded and sent.
    pub images_sent: AtomicU64,
    /// Uploads that failed (each also fails the run).
    pub upload_failures: AtomicU64,
    /// Images downloaded by recipients.
    pub downloads: AtomicU64,
    /// Downloads that failed (each also fails the run).
    pub download_failures: AtomicU64,
    everyone_connected: Barrier,
    go: tokio::sync::watch::Sender<bool>,
}

static RUN: OnceLock<Arc<Run>> = OnceLock::new();

/// When the schedule starts, once every device of the process is connected.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At once.
    Connected,
    /// Worker mode: say "ready" on stdout, start when the parent says "go" on stdin.
    OnGo,
    /// At this wall-clock instant (`--start-at`: parts on several machines).
    At(std::time::SystemTime),
}

/// Blocks until wall-clock time `at`; says how late it is when `at` has passed.
pub fn wait_until(at: std::time::SystemTime) {
    match at.duration_since(std::time::SystemTime::now()) {
        Ok(wait) => std::thread::sleep(wait),
        Err(late) => eprintln!(
            "chatproof-loadgen: --start-at passed {:.1} s ago (connecting took longer); starting now",
            late.duration().as_secs_f64()
        ),
    }
}

impl Run {
    /// Creates the run's shared state; there is one run per process.
    pub fn install(
        scenario: LoadScenario,
        (world, users, start): (World, Vec<u32>, Start),
        targets: Vec<Target>,
        key: TokenKey,
        run_id: String,
        media: Option<(Arc<ImageSet>, Arc<MediaHttp>)>,
    ) -> Arc<Self> {
        let drivers = scenario.load.drivers as usize;
        assert!(!targets.is_empty(), "a run needs a target");
        let run = Arc::new(Self {
            scenario,
            world,
            users,
            start,
            schedule_started_ms: AtomicU64::new(0),
            targets,
            connections_opened: AtomicU64::new(0),
            key,
            run_id,
            devices: Mutex::new(Vec::new()),
            connect: Mutex::new(latency_histogram()),
            lag: Mutex::new(latency_histogram()),
            stats: (0..drivers)
                .map(|_| Arc::new(Mutex::new(LatencyStats::default())))
                .collect(),
            timeline: Mutex::new(Vec::new()),
            connect_failures: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            skipped_offline: AtomicU64::new(0),
            reconnect: Mutex::new(latency_histogram()),
            reconnect_failures: AtomicU64::new(0),
            scheduled: AtomicU64::new(0),
            media,
            upload: Mutex::new(latency_histogram()),
            download: Mutex::new(latency_histogram()),
            images_sent: AtomicU64::new(0),
            upload_failures: AtomicU64::new(0),
            downloads: AtomicU64::new(0),
            download_failures: AtomicU64::new(0),
            everyone_connected: Barrier::new(drivers),
            go: tokio::sync::watch::Sender::new(false),
        });
        assert!(RUN.set(Arc::clone(&run)).is_ok(), "one run per process");
        run
    }

    /// Every latency histogram of the run so far, the drivers' merged.
    pub fn histograms(&self) -> Histograms {
        let mut all = Histograms::default();
        for stats in &self.stats {
            stats.lock().expect("stats").add_to(&mut all);
        }
        for (m, h) in [
            (Measure::Connect, &self.connect),
            (Measure::GeneratorLag, &self.lag),
            (Measure::Reconnect, &self.reconnect),
            (Measure::Upload, &self.upload),
            (Measure::Download, &self.download),
        ] {
            all[m]
                .add(&*h.lock().expect("histogram"))
                .expect("same bounds");
        }
        all
    }

    /// Acknowledgements received so far (judged and warm-up), all drivers.
    pub fn acked_so_far(&self) -> u64 {
        self.stats
            .iter()
            .map(|stats| {
                let stats = stats.lock().expect("stats");
                stats.ack.len() + stats.ack_warmup.len()
            })
            .sum()
    }

    /// Online delivery latency so far (the judged histogram), the drivers' merged.
    pub fn delivery_so_far(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        for stats in &self.stats {
            all.add(&stats.lock().expect("stats").delivery)
                .expect("same bounds");
        }
        all
    }

    /// The server user `u`'s devices connect to.
    pub fn target_of(&self, u: u32) -> &Target {
        &self.targets[u as usize % self.targets.len()]
    }

    /// Sends each driver makes: the total rate over the duration, split evenly.
    pub fn sends_per_driver(&self) -> u64 {
        let l = &self.scenario.load;
        let total = l.messages_per_sec * l.schedule_secs() as f64;
        ((total / f64::from(l.drivers)).ceil() as u64).max(1)
    }

    fn interval(&self) -> Duration {
        let l = &self.scenario.load;
        Duration::from_secs_f64(f64::from(l.drivers) / l.messages_per_sec)
    }
}

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

fn run_state() -> Arc<Run> {
    Arc::clone(RUN.get().expect("Run::install before goose starts"))
}

fn failed(msg: String) -> TransactionError {
    TransactionError::Custom(msg)
}

/// On start: connect this driver's devices, then wait for every other driver.
async fn connect_devices(user: &mut GooseUser) -> TransactionResult {
    let run = run_state();
    let drivers = run.scenario.load.drivers;
    let index = u32::try_from(user.weighted_users_index).unwrap_or(0) % drivers;
    let users = World::users_of_driver(&run.users, index, drivers);
    let mut devices = Vec::with_capacity(users.len());
    for &u in &users {
        let user_id = run.world.user_id(u);
        let token = run.key.mint(&user_id, now_us() / 1_000_000 + 24 * 3600);
        let convs: HashSet<String> = std::iter::once(run.world.direct_of(u))
            .chain(run.world.group_of(u))
            .map(|k| run.world.convs[k].id.clone())
            .collect();
        let target = run.target_of(u);
        let mut of_user = Vec::new();
        for d in 0..run.world.devices_per_user() {
            let started = std::time::Instant::now();
            let result = Device::connect(
                &target.url,
                &token,
                (&user_id, &World::device_id(d)),
                convs.clone(),
                Arc::clone(&run.stats[index as usize]),
                (
                    target.addr,
                    crate::device::source_for(
                        target.addr,
                        run.connections_opened.fetch_add(1, Ordering::Relaxed),
                    ),
                ),
            )
            .await;
            let took = started.elapsed();
            match result {
                Ok(device) => {
                    record_us(
                        &mut run.connect.lock().expect("histogram"),
                        took.as_micros() as u64,
                    );
                    run.devices
                        .lock()
                        .expect("devices")
                        .push(Arc::clone(&device));
                    of_user.push(device);
                    user.record_custom_request_duration("WS", "connect", took, true, None, None)
                        .await?;
                }
                Err(e) => {
                    run.connect_failures.fetch_add(1, Ordering::Relaxed);
                    let why = format!("{e:#}");
                    user.record_custom_request_duration(
                        "WS",
                        "connect",
                        took,
                        false,
                        None,
                        Some(&why),
                    )
                    .await?;
                }
            }
        }
        devices.push(of_user);
    }
    if run.everyone_connected.wait().await.is_leader() {
        match run.start {
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
        let started_us = now_us();
        run.schedule_started_ms
            .store(started_us / 1000, Ordering::Relaxed);
        // Messages scheduled before this belong to the warm-up.
        let judged_from_us = started_us + run.scenario.load.warmup_secs * 1_000_000;
        for stats in &run.stats {
            stats.lock().expect("stats").judged_from_us = judged_from_us;
        }
        run.go.send_replace(true);
    } else {
        let _ = run.go.subscribe().wait_for(|go| *go).await;
    }
    let phase = run
        .interval()
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

/// One scheduled send. Acks are timed by the device that receives them (into the
/// HDR histograms), not reported to goose one by one.
async fn send_scheduled(user: &mut GooseUser) -> TransactionResult {
    let run = run_state();
    let session = user
        .get_session_data::<DriverSession>()
        .cloned()
        .ok_or_else(|| Box::new(failed("driver not connected".into())))?;
    let mut d = session.0.lock().await;
    let k = d.next_k;
    d.next_k += 1;
    let due = d.start + run.interval() * u32::try_from(k).unwrap_or(u32::MAX);
    tokio::time::sleep_until(due).await;
    let lag = Instant::now().saturating_duration_since(due);
    record_us(
        &mut run.lag.lock().expect("histogram"),
        lag.as_micros() as u64,
    );
    run.scheduled.fetch_add(1, Ordering::Relaxed);
    let scheduled_us = now_us().saturating_sub(lag.as_micros() as u64);

    let h = mix(run.scenario.seed ^ (u64::from(d.index) << 40) ^ k);
    let slot = (h % d.users.len() as u64) as usize;
    let u = d.users[slot];
    let want_group = ((h >> 32) as f64 / f64::from(u32::MAX)) < run.scenario.load.group_share;
    let group = if want_group {
        run.world.group_of(u)
    } else {
        None
    };
    let conv = group.unwrap_or_else(|| run.world.direct_of(u));
    let conv = run.world.convs[conv].id.clone();
    let sender = d.devices[slot]
        .get(((h >> 16) % u64::from(run.world.devices_per_user())) as usize)
        .cloned();
    let mut text = String::with_capacity(run.scenario.load.text_bytes.max(32));
    let _ = write!(text, "lg:{scheduled_us}:");
    let padding = run.scenario.load.text_bytes.saturating_sub(text.len());
    text.push_str(&PADDING[..padding.min(PADDING.len())]);
    for _ in 0..padding.saturating_sub(PADDING.len()) {
        text.push('x');
    }
    let message_id = format!("{}-{}-{k}", run.run_id, d.index);
    let want_image = (mix(h ^ 0x1A6E) % 10_000) as f64 / 10_000.0 < run.scenario.load.image_share;
    if let (true, Some((images, http)), Some(device)) = (want_image, &run.media, &sender) {
        if device.is_offline() {
            run.skipped_offline.fetch_add(1, Ordering::Relaxed);
        } else {
            // Open model: the upload runs beside the schedule, never holding it up.
            let bytes = images.unique(h >> 8, k ^ (u64::from(d.index) << 48));
            let (run, http, device) = (Arc::clone(&run), Arc::clone(http), Arc::clone(device));
            tokio::spawn(send_image(
                run,
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
        None => Err(crate::device::SendError::Failed(anyhow::anyhow!(
            "sender device is not connected"
        ))),
    };
    match outcome {
        Ok(()) => {
            run.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(crate::device::SendError::Offline) => {
            run.skipped_offline.fetch_add(1, Ordering::Relaxed);
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
    run: Arc<Run>,
    http: Arc<MediaHttp>,
    device: Arc<Device>,
    (conv, message_id, caption): (String, String, String),
    bytes: Vec<u8>,
    scheduled_us: u64,
) {
    match http.upload(device.token(), &conv, bytes).await {
        Ok((id, took)) => {
            record_us(
                &mut run.upload.lock().expect("histogram"),
                took.as_micros() as u64,
            );
            match device
                .send(&conv, &message_id, &caption, Some(&id), scheduled_us)
                .await
            {
                Ok(()) => {
                    run.sent.fetch_add(1, Ordering::Relaxed);
                    run.images_sent.fetch_add(1, Ordering::Relaxed);
                }
                Err(crate::device::SendError::Offline) => {
                    run.skipped_offline.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(device = device.name, error = %e, "image send failed"),
            }
        }
        Err(e) => {
            tracing::warn!(device = device.name, error = %e, "upload failed");
            run.upload_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Runs the goose attack; returns goose's metrics.
pub async fn run_goose(
    run: &Run,
    host: &str,
    goose_report: &str,
) -> anyhow::Result<goose::metrics::GooseMetrics> {
    let drivers = run.scenario.load.drivers.to_string();
    let iterations = run.sends_per_driver().to_string();
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
                    transaction!(connect_devices)
                        .set_on_start()
                        .set_name("connect"),
                )
                .register_transaction(transaction!(send_scheduled).set_name("send")),
        )
        .execute()
        .await?;
    Ok(metrics)
}

/// Media-mix: recipients download a share of the images they receive, beside the
/// schedule, until aborted.
pub async fn downloads(run: Arc<Run>) {
    let Some((_, http)) = run.media.clone() else {
        return;
    };
    let share = run.scenario.load.image_download_share;
    let permits = Arc::new(tokio::sync::Semaphore::new(16));
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let devices = run.devices.lock().expect("devices").clone();
        for device in devices {
            let received =
                std::mem::take(&mut device.state.lock().expect("device state").images_received);
            for (id, size, _) in received {
                let pick = mix(run.scenario.seed ^ now_us() ^ size);
                if (pick % 10_000) as f64 / 10_000.0 >= share {
                    continue;
                }
                let (run, http, device) =
                    (Arc::clone(&run), Arc::clone(&http), Arc::clone(&device));
                let permit = Arc::clone(&permits)
                    .acquire_owned()
                    .await
                    .expect("never closed");
                tokio::spawn(async move {
                    let _permit = permit;
                    match http.download(device.token(), &id, size).await {
                        Ok(took) => {
                            record_us(
                                &mut run.download.lock().expect("histogram"),
                                took.as_micros() as u64,
                            );
                            run.downloads.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            tracing::warn!(device = device.name, error = %e, "download failed");
                            run.download_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        }
    }
}

/// Churn: a share of the devices goes offline together, stays away, and comes back
/// presenting its cursors; each return is timed until catch-up ends.
pub async fn churn(run: Arc<Run>) {
    let Some(c) = run.scenario.churn.clone() else {
        return;
    };
    // The schedule starts with the first due send.
    while run.scheduled.load(Ordering::Relaxed) == 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(run.scenario.load.schedule_secs());
    let mut round = 0u64;
    loop {
        let wait = Duration::from_secs(if round == 0 { c.at_secs } else { c.every_secs });
        // Every drop happens, and every device is back, within the measured period.
        if tokio::time::Instant::now() + wait + Duration::from_secs(c.offline_secs) > end {
            return;
        }
        tokio::time::sleep(wait).await;
        let devices = run.devices.lock().expect("devices").clone();
        let chosen: Vec<Arc<Device>> = devices
            .into_iter()
            .enumerate()
            .filter(|(i, _)| {
                (mix(run.scenario.seed ^ 0xC0FFEE ^ (round << 32) ^ *i as u64) % 10_000) as f64
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
                let run = Arc::clone(&run);
                async move {
                    match d.reconnect().await {
                        Ok(took) => record_us(
                            &mut run.reconnect.lock().expect("histogram"),
                            took.as_micros() as u64,
                        ),
                        Err(e) => {
                            tracing::warn!(device = d.name, error = %e, "reconnect failed");
                            run.reconnect_failures.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
            .buffer_unordered(256);
        futures_util::StreamExt::collect::<Vec<()>>(back).await;
        round += 1;
        if c.every_secs == 0 {
            return;
        }
    }
}
