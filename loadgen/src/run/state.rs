//! The state of one run in this process, in three parts: what the scenario and flags
//! decided ([`RunConfig`], immutable), what has happened so far ([`Counters`], atomics
//! keyed by [`Count`]), and the latency histograms ([`RunHistograms`], keyed by
//! [`Measure`]). One `Arc<RunState>` is handed to the goose users (captured by their
//! transactions) and to every task beside the schedule; there is no global.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chatproof_server::auth::TokenKey;
use hdrhistogram::Histogram;
use tokio::sync::Barrier;

use crate::acked::Acked;
use crate::device::{Device, DeviceContext, Target};
use crate::media::{ImageSet, MediaHttp};
use crate::metrics::{latency_histogram, record_us, Histograms, LatencyStats, Measure};
use crate::report::TimelinePoint;
use crate::scenario::Scenario;
use crate::world::World;

/// When the schedule starts, once every device of the process is connected.
#[derive(Debug, Clone, Copy)]
pub enum Start {
    /// At once.
    Connected,
    /// Worker mode: say "ready" on stdout, start when the parent says "go" on stdin.
    OnGo,
    /// At this wall-clock instant (`--start-at`: parts on several machines).
    At(SystemTime),
}

/// Blocks until wall-clock time `at`; says how late it is when `at` has passed.
pub fn wait_until(at: SystemTime) {
    match at.duration_since(SystemTime::now()) {
        Ok(wait) => std::thread::sleep(wait),
        Err(late) => eprintln!(
            "chatproof-loadgen: --start-at passed {:.1} s ago (connecting took longer); starting now",
            late.duration().as_secs_f64()
        ),
    }
}

/// What the scenario and the flags decided for this process; never changes during the run.
pub struct RunConfig {
    /// The scenario (this process's share of it, for a worker or a part).
    pub scenario: Scenario,
    /// Its population.
    pub world: Arc<World>,
    /// The users this process drives (all, or one worker's share).
    pub users: Vec<u32>,
    /// When the schedule starts once this process's devices are connected.
    pub start: Start,
    /// The servers devices connect to (user `u` to `targets[u % len]`); never empty.
    pub targets: Vec<Target>,
    /// Mints device tokens.
    pub key: TokenKey,
    /// Prefix of message ids.
    pub run_id: String,
    /// Media-mix scenarios: the images and the HTTP client.
    pub media: Option<(Arc<ImageSet>, Arc<MediaHttp>)>,
    /// Time between two sends of one driver (computed once, not per send).
    pub interval: Duration,
    /// Sends each driver makes: the total rate over the duration, split evenly.
    pub sends_per_driver: u64,
}

impl RunConfig {
    /// The configuration of a run of `scenario` against `targets` (never empty).
    pub fn new(
        scenario: Scenario,
        (world, users, start): (World, Vec<u32>, Start),
        targets: Vec<Target>,
        key: TokenKey,
        run_id: String,
        media: Option<(Arc<ImageSet>, Arc<MediaHttp>)>,
    ) -> Self {
        assert!(!targets.is_empty(), "a run needs a target");
        let l = &scenario.load;
        assert!(l.drivers > 0, "a run needs a driver");
        let interval = Duration::from_secs_f64(f64::from(l.drivers) / l.messages_per_sec);
        let total = l.messages_per_sec * l.schedule_secs() as f64;
        let sends_per_driver = ((total / f64::from(l.drivers)).ceil() as u64).max(1);
        Self {
            scenario,
            world: Arc::new(world),
            users,
            start,
            targets,
            key,
            run_id,
            media,
            interval,
            sends_per_driver,
        }
    }

    /// Devices this process drives.
    pub fn devices_planned(&self) -> u64 {
        self.users.len() as u64 * u64::from(self.scenario.population.devices_per_user)
    }
}

/// Every event the run counts (each one [`AtomicU64`] of [`Counters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    /// Connections opened so far (spreads source addresses).
    ConnectionsOpened,
    /// Devices that failed to connect.
    ConnectFailures,
    /// Sends due by the schedule.
    Scheduled,
    /// Sends written to a socket.
    Sent,
    /// Sends not made because the chosen device was offline (churn).
    SkippedOffline,
    /// Reconnects that failed.
    ReconnectFailures,
    /// Images uploaded and sent.
    ImagesSent,
    /// Uploads that failed (each also fails the run).
    UploadFailures,
    /// Images downloaded by recipients.
    Downloads,
    /// Downloads that failed (each also fails the run).
    DownloadFailures,
}

impl Count {
    /// Every count, in slot order.
    pub const ALL: [Self; 10] = [
        Self::ConnectionsOpened,
        Self::ConnectFailures,
        Self::Scheduled,
        Self::Sent,
        Self::SkippedOffline,
        Self::ReconnectFailures,
        Self::ImagesSent,
        Self::UploadFailures,
        Self::Downloads,
        Self::DownloadFailures,
    ];
}

/// The run's counters: one relaxed atomic per [`Count`] (no lock on the hot path).
#[derive(Debug, Default)]
pub struct Counters([AtomicU64; Count::ALL.len()]);

impl Counters {
    /// Adds one to `c`; returns its value before.
    pub fn bump(&self, c: Count) -> u64 {
        self.0[c as usize].fetch_add(1, Ordering::Relaxed)
    }

    /// The value of `c` so far.
    pub fn get(&self, c: Count) -> u64 {
        self.0[c as usize].load(Ordering::Relaxed)
    }
}

/// Shards of the histograms devices record into. A thread records into shard
/// `its index % SHARDS`, so the runtime's worker threads (two on the design machine)
/// each have their own shard and lock, and the shards' counts stay in their caches;
/// a shard per driver cost up to 180 KB per histogram and driver.
const SHARDS: usize = 4;

/// The shard of the calling thread.
fn thread_shard() -> usize {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        static SHARD: usize = (NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS as u64) as usize;
    }
    SHARD.with(|s| *s)
}

/// The run's latency histograms, keyed by [`Measure`]. The measures devices record as
/// frames arrive ([`Measure::recorded_by_devices`]) are sharded by recording thread,
/// so that devices do not share a lock per frame; the others have one histogram each.
pub struct RunHistograms {
    /// [`SHARDS`] shards of what devices record.
    shards: Vec<Mutex<LatencyStats>>,
    /// Indexed by measure: `Some` exactly for the measures not recorded by devices.
    generator: Vec<Option<Mutex<Histogram<u64>>>>,
}

impl Default for RunHistograms {
    fn default() -> Self {
        Self::new()
    }
}

impl RunHistograms {
    /// Empty histograms.
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LatencyStats::default()))
                .collect(),
            generator: Measure::ALL
                .iter()
                .map(|m| (!m.recorded_by_devices()).then(|| Mutex::new(latency_histogram())))
                .collect(),
        }
    }

    /// The shard the calling thread's devices record into.
    pub fn shard(&self) -> &Mutex<LatencyStats> {
        &self.shards[thread_shard()]
    }

    /// Records `us` under `m`, which must not be a measure devices record.
    pub fn record(&self, m: Measure, us: u64) {
        let h = self.generator[m.index()]
            .as_ref()
            .expect("this measure is recorded by devices, into their thread's shard");
        record_us(&mut h.lock().expect("histogram"), us);
    }

    /// From `judged_from_us` (Unix µs) on, scheduled messages are judged, not warm-up.
    pub fn judge_from(&self, judged_from_us: u64) {
        for shard in &self.shards {
            shard.lock().expect("stats").judged_from_us = judged_from_us;
        }
    }

    /// Every histogram so far, the shards merged.
    pub fn merged(&self) -> Histograms {
        let mut all = Histograms::default();
        for shard in &self.shards {
            shard.lock().expect("stats").add_to(&mut all);
        }
        for (m, h) in Measure::ALL.iter().zip(&self.generator) {
            if let Some(h) = h {
                all[*m]
                    .add(&*h.lock().expect("histogram"))
                    .expect("same bounds");
            }
        }
        all
    }

    /// Acknowledgements received so far (judged and warm-up), every shard.
    pub fn acked_so_far(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| {
                let stats = shard.lock().expect("stats");
                stats.ack.len() + stats.ack_warmup.len()
            })
            .sum()
    }

    /// Online delivery latency so far (the judged histogram), the shards merged.
    pub fn delivery_so_far(&self) -> Histogram<u64> {
        let mut all = latency_histogram();
        for shard in &self.shards {
            all.add(&shard.lock().expect("stats").delivery)
                .expect("same bounds");
        }
        all
    }
}

/// Holds the drivers until every one has connected its devices, then opens once.
pub struct StartGate {
    everyone_connected: Barrier,
    go: tokio::sync::watch::Sender<bool>,
    /// When the schedule started, Unix milliseconds (0 until it has).
    started_ms: AtomicU64,
}

impl StartGate {
    fn new(drivers: u32) -> Self {
        Self {
            everyone_connected: Barrier::new(drivers as usize),
            go: tokio::sync::watch::Sender::new(false),
            started_ms: AtomicU64::new(0),
        }
    }

    /// Waits for every driver; true for the one driver that must then call [`Self::open`].
    pub async fn arrive(&self) -> bool {
        self.everyone_connected.wait().await.is_leader()
    }

    /// Starts the schedule at Unix time `started_us` and lets every driver go.
    pub fn open(&self, started_us: u64) {
        self.started_ms.store(started_us / 1000, Ordering::Relaxed);
        self.go.send_replace(true);
    }

    /// Waits until the gate is open.
    pub async fn opened(&self) {
        let _ = self.go.subscribe().wait_for(|go| *go).await;
    }

    /// When the schedule started, Unix milliseconds; none until it has.
    pub fn started_ms(&self) -> Option<u64> {
        match self.started_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }
}

/// Shared state of one run: the three parts, plus the devices, the timeline and the
/// start gate.
pub struct RunState {
    /// What the scenario and flags decided.
    pub config: RunConfig,
    /// What happened so far.
    pub counters: Counters,
    /// Latencies so far.
    pub histograms: Arc<RunHistograms>,
    /// Every acknowledged message so far, by conversation.
    pub acked: Arc<Acked>,
    /// What every device shares.
    pub devices_ctx: Arc<DeviceContext>,
    /// Every connected device.
    pub devices: Mutex<Vec<Arc<Device>>>,
    /// One point per second of the run.
    pub timeline: Mutex<Vec<TimelinePoint>>,
    /// Starts every driver's schedule at once.
    pub gate: StartGate,
}

impl RunState {
    /// The state of a run of `config`, nothing counted yet.
    pub fn new(config: RunConfig) -> Arc<Self> {
        let drivers = config.scenario.load.drivers;
        // The conversations of this process's users: a worker of a large run checks
        // its share, never the whole world's.
        let world = &config.world;
        let convs = config
            .users
            .iter()
            .flat_map(|&u| std::iter::once(world.direct_of(u)).chain(world.group_of(u)));
        let acked = Arc::new(Acked::new(convs.map(|k| k as u32)));
        let histograms = Arc::new(RunHistograms::new());
        let devices_ctx = Arc::new(DeviceContext::new(
            Arc::clone(&config.world),
            config.key.clone(),
            config.targets.clone(),
            (Arc::clone(&histograms), Arc::clone(&acked)),
        ));
        Arc::new(Self {
            config,
            counters: Counters::default(),
            histograms,
            acked,
            devices_ctx,
            devices: Mutex::new(Vec::new()),
            timeline: Mutex::new(Vec::new()),
            gate: StartGate::new(drivers),
        })
    }

    /// The devices connected so far (a copy, so the lock is not held).
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.devices.lock().expect("devices").clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every count has its own slot, and bumping one leaves the others alone.
    #[test]
    fn counts_are_independent() {
        let counters = Counters::default();
        for (i, c) in Count::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "ALL is in slot order");
            for _ in 0..=i {
                counters.bump(*c);
            }
        }
        for (i, c) in Count::ALL.iter().enumerate() {
            assert_eq!(counters.get(*c), i as u64 + 1);
        }
    }

    /// Generator measures land in their own histogram; the merge shows every one.
    #[test]
    fn generator_measures_merge() {
        let h = RunHistograms::new();
        h.record(Measure::GeneratorLag, 1_500);
        h.record(Measure::Connect, 20_000);
        h.shard().lock().unwrap().record_ack(0, 3_000);
        // Another thread records into its own shard; the merge sees both.
        std::thread::scope(|s| {
            s.spawn(|| h.shard().lock().unwrap().record_ack(0, 4_000));
        });
        let all = h.merged();
        assert_eq!(all[Measure::GeneratorLag].len(), 1);
        assert_eq!(all[Measure::Connect].len(), 1);
        assert_eq!(all[Measure::SendAck].len(), 2);
        assert_eq!(h.acked_so_far(), 2);
    }

    /// A measure devices record cannot be recorded by the generator.
    #[test]
    #[should_panic(expected = "recorded by devices")]
    fn device_measures_are_not_generator_measures() {
        RunHistograms::new().record(Measure::Delivery, 1);
    }
}
