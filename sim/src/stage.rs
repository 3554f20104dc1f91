//! What the parts of one run share, split by who writes it: the [`Recorder`] that
//! everyone writes the history to, the [`Directions`] the harness and the fault
//! injector give the devices, and the [`ServerClocks`] the fault injector moves and the
//! servers read. Each part is handed only to those that use it; none of them imports
//! the harness.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use chatproof_server::clock::{Clock, SystemClock};

use crate::history::{DeviceKey, History};

thread_local! {
    // Set at the start of every run: each run has its own simulated clock.
    static START: std::cell::Cell<Option<tokio::time::Instant>> = const { std::cell::Cell::new(None) };
}

/// Starts the run's clock: [`sim_ms`] counts from now.
pub fn start_clock() {
    START.with(|s| s.set(Some(tokio::time::Instant::now())));
}

/// Simulated milliseconds since the run began.
pub fn sim_ms() -> u64 {
    let start = START
        .with(std::cell::Cell::get)
        .expect("sim_ms inside a run");
    tokio::time::Instant::now()
        .duration_since(start)
        .as_millis() as u64
}

/// The phases of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Faults on; devices make their messages.
    Safety = 0,
    /// Healed; no new messages; everything must converge by the deadline.
    Liveness = 1,
    /// Healthy traffic, no fault near: the devices picked for it make a few new
    /// messages, so that promises judged only outside faults (`slow`, receipts
    /// reaching their senders) are judged in every seed.
    Calm = 2,
    /// No new messages; what the calm traffic caused converges and settles.
    Settle = 3,
    /// Presence: the users picked go away (all their devices disconnect and stay
    /// away); every other device stays and must come to show them offline.
    Away = 4,
}

/// The history of the run, written by every part of it.
#[derive(Default)]
pub struct Recorder {
    history: Mutex<History>,
}

impl Recorder {
    /// Records into the history.
    pub fn with<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.history.lock().expect("history"))
    }

    /// Adds a trace line at the current simulated time.
    pub fn note(&self, line: String) {
        let t = sim_ms();
        self.with(|h| h.note(t, line));
    }

    /// A copy of the history as it stands.
    pub fn snapshot(&self) -> History {
        self.with(|h| h.clone())
    }
}

/// What the harness and the fault injector tell the devices: where the run is, who
/// stays away, whose connection drops, and when to stop.
pub struct Directions {
    phase: AtomicU8,
    stopped: AtomicBool,
    disconnect: Mutex<BTreeSet<DeviceKey>>,
    away: Mutex<BTreeSet<u32>>,
}

impl Default for Directions {
    fn default() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Safety as u8),
            stopped: AtomicBool::new(false),
            disconnect: Mutex::new(BTreeSet::new()),
            away: Mutex::new(BTreeSet::new()),
        }
    }
}

impl Directions {
    /// Where the run is.
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::SeqCst) {
            0 => Phase::Safety,
            1 => Phase::Liveness,
            2 => Phase::Calm,
            3 => Phase::Settle,
            _ => Phase::Away,
        }
    }

    /// Moves the run on to `phase` (never back).
    pub fn enter(&self, phase: Phase) {
        let before = self.phase.swap(phase as u8, Ordering::SeqCst);
        assert!(before <= phase as u8, "phases only move on");
    }

    /// Moves the run on to the presence phase with `users` going away.
    pub fn send_away(&self, users: BTreeSet<u32>) {
        *self.away.lock().expect("away") = users;
        self.enter(Phase::Away);
    }

    /// Whether `user`'s devices are to stay away (the presence phase has begun
    /// and picked them).
    pub fn is_away(&self, user: u32) -> bool {
        self.phase() == Phase::Away && self.away.lock().expect("away").contains(&user)
    }

    /// Tells every device to stop.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Whether devices are to stop altogether.
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Asks a device to drop its connection.
    pub fn request_disconnect(&self, device: DeviceKey) {
        self.disconnect.lock().expect("disconnect").insert(device);
    }

    /// True once per request for `device`.
    pub fn take_disconnect(&self, device: DeviceKey) -> bool {
        self.disconnect.lock().expect("disconnect").remove(&device)
    }
}

/// Each server's wall-clock offset, moved by the fault injector (a skew applied at
/// the next start, a jump while it runs) and read by the server at every call.
pub struct ServerClocks {
    skew_at_start_ms: AtomicI64,
    offsets_ms: Vec<Arc<AtomicI64>>,
}

impl ServerClocks {
    /// Clocks for `servers` servers, none skewed.
    pub fn new(servers: u32) -> Self {
        Self {
            skew_at_start_ms: AtomicI64::new(0),
            offsets_ms: (0..servers).map(|_| Arc::new(AtomicI64::new(0))).collect(),
        }
    }

    /// The skew the next server to start gets, ms.
    pub fn skew_next_start(&self, skew_ms: i64) {
        self.skew_at_start_ms.store(skew_ms, Ordering::SeqCst);
    }

    /// Server `index` starts: its clock, offset by the skew set for starts.
    pub fn start(&self, index: usize) -> SkewedClock {
        let offset = Arc::clone(&self.offsets_ms[index]);
        offset.store(
            self.skew_at_start_ms.load(Ordering::SeqCst),
            Ordering::SeqCst,
        );
        SkewedClock(offset)
    }

    /// Steps server `index`'s running clock by `step_ms`; its offset after, or `None`
    /// for no such server.
    pub fn jump(&self, index: usize, step_ms: i64) -> Option<i64> {
        let offset = self.offsets_ms.get(index)?;
        Some(offset.fetch_add(step_ms, Ordering::SeqCst) + step_ms)
    }
}

/// A server's clock: the simulated wall clock plus its offset, read at every call so
/// a jump shows at once.
pub struct SkewedClock(Arc<AtomicI64>);

impl Clock for SkewedClock {
    fn now_ms(&self) -> u64 {
        SystemClock
            .now_ms()
            .saturating_add_signed(self.0.load(Ordering::SeqCst))
    }
}
