//! The fault injector. During the safety phase it draws, from the seed, one fault at a
//! time: a server crash and restart (its store keeps exactly what was committed), clock
//! skew on restart, a running server's clock stepping forward or back, two-way and one-way partitions of a server, a partition of one
//! client's link, latency spikes, packet loss, and clients dropping their connection
//! (possibly mid-send); with several servers also crashes of the shared store's node
//! (losing only calls in flight) and of the router (losing its registry), and cuts of
//! one server's link to either; with one server, storage faults on its disk
//! ([`crate::disk`]: full, write or fsync errors, power loss with torn writes);
//! and a server process pausing (a long GC pause or SIGSTOP) and resuming.
//! The system must survive all of them and converge after `heal`.

use std::sync::Arc;
use std::time::Duration;

use chatproof_server::transport::stall;
use madsim::net::NetSim;
use madsim::runtime::Handle;
use madsim::task::NodeId;

use crate::disk::{DiskFault, SimDisk};
use crate::history::WindowKind;
use crate::history::{DeviceKey, FaultWindow};
use crate::options::{FaultKind, SeedRng, SimOptions};

use crate::stage::{sim_ms, Directions, Recorder, ServerClocks};

/// The nodes faults act on.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    /// The chat servers.
    pub servers: Vec<NodeId>,
    /// The shared store's node (several servers only).
    pub store: Option<NodeId>,
    /// The router's node (several servers only).
    pub router: Option<NodeId>,
    /// The server's disk (one server only).
    pub disk: Option<Arc<SimDisk>>,
    /// Each device's address, as the servers see it.
    pub device_ips: std::collections::BTreeMap<DeviceKey, std::net::IpAddr>,
}

/// What a fault holds while under way: two lanes never hold the same one, so one
/// lane never restarts a process another lane killed, nor resets a network setting
/// another lane's fault still needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// A node's process (killed, paused or restarted).
    Process(NodeId),
    /// A node's partition from everything (either way).
    Clogged(NodeId),
    /// The network's latency and loss settings.
    Network,
    /// The server's disk.
    Disk,
}

/// Draws and applies faults.
pub struct Injector {
    rng: std::cell::RefCell<SeedRng>,
    weights: [u32; FaultKind::ALL.len()],
    interval_ms: u64,
    /// Faults under way at once at most (one per lane).
    lanes: u32,
    /// What the faults under way hold.
    held: std::cell::RefCell<Vec<Held>>,
    nodes: Backends,
    devices: Vec<DeviceKey>,
    recorder: Arc<Recorder>,
    directions: Arc<Directions>,
    clocks: Arc<ServerClocks>,
}

impl Injector {
    /// An injector for `opts` acting on `nodes`, recording its faults to `recorder`,
    /// dropping devices' connections through `directions` and moving `clocks`.
    pub fn new(
        opts: &SimOptions,
        nodes: Backends,
        recorder: Arc<Recorder>,
        directions: Arc<Directions>,
        clocks: Arc<ServerClocks>,
    ) -> Self {
        let devices = (0..opts.users)
            .flat_map(|u| (0..opts.devices_per_user[u as usize]).map(move |d| (u, d)))
            .collect();
        Self {
            rng: std::cell::RefCell::new(SeedRng::new(opts.seed, 7)),
            weights: opts.faults.weights(),
            interval_ms: opts.fault_interval_ms.max(10),
            lanes: opts.faults_at_once.max(1),
            held: std::cell::RefCell::new(Vec::new()),
            nodes,
            devices,
            recorder,
            directions,
            clocks,
        }
    }

    fn range(&self, lo: u64, hi: u64) -> u64 {
        self.rng.borrow_mut().range(lo, hi)
    }

    /// A server drawn from the seed.
    fn some_server(&self) -> NodeId {
        let servers = &self.nodes.servers;
        servers[self.range(0, servers.len() as u64 - 1) as usize]
    }

    fn window(
        &self,
        kind: FaultKind,
        start_ms: u64,
        device: Option<DeviceKey>,
        server: Option<u32>,
    ) {
        let end_ms = sim_ms();
        self.recorder.note(format!(
            "fault {kind} from {start_ms} ms to {end_ms} ms{}",
            device.map(|d| format!(" on {d:?}")).unwrap_or_default()
        ));
        self.recorder.with(|h| {
            h.faults.push(FaultWindow {
                kind: WindowKind::Fault(kind),
                start_ms,
                end_ms,
                device,
                server,
            })
        });
    }

    /// What `kind` acting on `server` holds while under way.
    fn holds(&self, kind: FaultKind, server: NodeId) -> Vec<Held> {
        match kind {
            FaultKind::ServerCrash | FaultKind::ClockSkew | FaultKind::ProcessPause => {
                vec![Held::Process(server)]
            }
            FaultKind::PowerLoss => vec![Held::Process(server), Held::Disk],
            FaultKind::Partition | FaultKind::PartitionOneWay => vec![Held::Clogged(server)],
            FaultKind::LatencySpike | FaultKind::PacketLoss => vec![Held::Network],
            FaultKind::DiskFull | FaultKind::DiskIo => vec![Held::Disk],
            FaultKind::StoreCrash => self.nodes.store.map(Held::Process).into_iter().collect(),
            FaultKind::RouterCrash => self.nodes.router.map(Held::Process).into_iter().collect(),
            // Links and clocks add up: a second cut or step on top of one is itself a fault.
            FaultKind::LinkPartition
            | FaultKind::BackendPartition
            | FaultKind::ClientDisconnect
            | FaultKind::ClockJump
            | FaultKind::ReaderStall => Vec::new(),
        }
    }

    /// Injects faults for `length`: `lanes` of them at once at most, each lane
    /// drawing its own (one lane keeps a seed's faults exactly as they always were).
    /// A lane whose draw needs what another lane's fault holds ([`Held`]: a process,
    /// a node's partition, the network settings, the disk) skips that draw; faults on
    /// different things overlap freely (a server crashes while the router is down). A
    /// window records what a lane did, so overlapping lanes only ever widen what the
    /// checker excuses, and every fault is undone by [`Injector::heal`].
    pub async fn run_for(&self, length: Duration, handle: &Handle) {
        let end = tokio::time::Instant::now() + length;
        if self.weights.iter().all(|w| *w == 0) {
            tokio::time::sleep_until(end).await;
            return;
        }
        futures_util::future::join_all((0..self.lanes).map(|_| self.lane(end, handle))).await;
    }

    /// One lane: a fault, held, then a pause, until `end`.
    async fn lane(&self, end: tokio::time::Instant, handle: &Handle) {
        loop {
            let pause =
                Duration::from_millis(self.range(self.interval_ms / 2, self.interval_ms * 3 / 2));
            if tokio::time::Instant::now() + pause >= end {
                tokio::time::sleep_until(end).await;
                return;
            }
            tokio::time::sleep(pause).await;
            let kind = FaultKind::ALL[self.rng.borrow_mut().weighted(&self.weights)];
            let hold = Duration::from_millis(self.range(200, 2_500));
            let start = sim_ms();
            let mut device = None;
            let server = self.some_server();
            let holds = self.holds(kind, server);
            if holds.iter().any(|h| self.held.borrow().contains(h)) {
                continue;
            }
            self.held.borrow_mut().extend(&holds);
            let acted = self.act(kind, server, hold, &mut device, handle).await;
            self.held.borrow_mut().retain(|h| !holds.contains(h));
            if !acted {
                continue;
            }
            // The server the fault concerned, for the pictures: the drawn one, or the
            // only one for a disk fault; none for faults of the network or a backend.
            let index = self.nodes.servers.iter().position(|s| *s == server);
            let concerned = match kind {
                FaultKind::LatencySpike
                | FaultKind::PacketLoss
                | FaultKind::ClientDisconnect
                | FaultKind::ReaderStall
                | FaultKind::StoreCrash
                | FaultKind::RouterCrash => None,
                FaultKind::DiskFull | FaultKind::DiskIo => {
                    (self.nodes.servers.len() == 1).then_some(0)
                }
                _ => index,
            };
            self.window(kind, start, device, concerned.map(|i| i as u32));
        }
    }

    /// Applies one fault of `kind` (on `server` where it acts on one) for `hold`, then
    /// undoes it. A fault whose node this run lacks (a store crash on one server) does
    /// nothing and returns false.
    async fn act(
        &self,
        kind: FaultKind,
        server: NodeId,
        hold: Duration,
        device: &mut Option<DeviceKey>,
        handle: &Handle,
    ) -> bool {
        let net = NetSim::current();
        {
            match kind {
                FaultKind::ServerCrash => {
                    handle.kill(server);
                    tokio::time::sleep(hold).await;
                    handle.restart(server);
                }
                FaultKind::ClockSkew => {
                    let skew = self.range(0, 60_000) as i64 - 30_000;
                    self.clocks.skew_next_start(skew);
                    handle.kill(server);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    handle.restart(server);
                }
                FaultKind::Partition => {
                    net.clog_node(server);
                    tokio::time::sleep(hold).await;
                    net.unclog_node(server);
                }
                FaultKind::PartitionOneWay => {
                    if self.range(0, 1) == 0 {
                        net.clog_node_in(server);
                        tokio::time::sleep(hold).await;
                        net.unclog_node_in(server);
                    } else {
                        net.clog_node_out(server);
                        tokio::time::sleep(hold).await;
                        net.unclog_node_out(server);
                    }
                }
                FaultKind::LinkPartition => {
                    let d = self.devices[self.range(0, self.devices.len() as u64 - 1) as usize];
                    *device = Some(d);
                    let node = handle
                        .get_node(format!("device-{}-{}", d.0, d.1))
                        .map(|n| n.id());
                    if let Some(node) = node {
                        net.clog_link(node, server);
                        net.clog_link(server, node);
                        tokio::time::sleep(hold).await;
                        net.unclog_link(node, server);
                        net.unclog_link(server, node);
                    }
                }
                FaultKind::LatencySpike => {
                    let high = Duration::from_millis(self.range(50, 400));
                    net.update_config(|c| c.send_latency = high / 2..high);
                    tokio::time::sleep(hold).await;
                    net.update_config(|c| {
                        c.send_latency = Duration::from_millis(1)..Duration::from_millis(10)
                    });
                }
                FaultKind::PacketLoss => {
                    net.update_config(|c| c.packet_loss_rate = 0.1);
                    tokio::time::sleep(hold).await;
                    net.update_config(|c| c.packet_loss_rate = 0.0);
                }
                FaultKind::ClientDisconnect => {
                    let d = self.devices[self.range(0, self.devices.len() as u64 - 1) as usize];
                    *device = Some(d);
                    self.directions.request_disconnect(d);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                FaultKind::ReaderStall => {
                    let d = self.devices[self.range(0, self.devices.len() as u64 - 1) as usize];
                    *device = Some(d);
                    let Some(ip) = self.nodes.device_ips.get(&d).copied() else {
                        return false;
                    };
                    stall::stall(ip);
                    tokio::time::sleep(hold).await;
                    stall::resume(ip);
                }
                FaultKind::StoreCrash => {
                    let Some(store) = self.nodes.store else {
                        return false;
                    };
                    handle.kill(store);
                    tokio::time::sleep(hold).await;
                    handle.restart(store);
                }
                FaultKind::RouterCrash => {
                    let Some(router) = self.nodes.router else {
                        return false;
                    };
                    handle.kill(router);
                    tokio::time::sleep(hold).await;
                    handle.restart(router);
                }
                FaultKind::DiskFull | FaultKind::DiskIo => {
                    let Some(disk) = &self.nodes.disk else {
                        return false;
                    };
                    let fault = match kind {
                        FaultKind::DiskFull => DiskFault::Full,
                        _ if self.range(0, 1) == 0 => DiskFault::WriteIo,
                        _ => DiskFault::SyncIo,
                    };
                    self.recorder.note(format!("disk fault {fault:?} begins"));
                    disk.set_fault(Some(fault));
                    tokio::time::sleep(hold).await;
                    disk.set_fault(None);
                }
                FaultKind::PowerLoss => {
                    let Some(disk) = &self.nodes.disk else {
                        return false;
                    };
                    handle.kill(server);
                    let kept = self.range(0, 8) as usize;
                    let torn_len = self.range(0, 4096) as usize;
                    let pending = disk.power_loss(kept, torn_len);
                    self.recorder.note(format!(
                        "power loss: {pending} unsynced change(s), first {kept} kept, the last torn at {torn_len} bytes"
                    ));
                    tokio::time::sleep(hold).await;
                    handle.restart(server);
                }
                FaultKind::ClockJump => {
                    let index = self.nodes.servers.iter().position(|s| *s == server);
                    let step = self.range(0, 60_000) as i64 - 30_000;
                    if let Some(now) = index.and_then(|i| self.clocks.jump(i, step)) {
                        self.recorder.note(format!(
                            "clock of server {} steps {step:+} ms (offset now {now:+} ms)",
                            index.unwrap_or_default()
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                FaultKind::ProcessPause => {
                    handle.pause(server);
                    tokio::time::sleep(hold).await;
                    handle.resume(server);
                }
                FaultKind::BackendPartition => {
                    let backend = if self.range(0, 1) == 0 {
                        self.nodes.store
                    } else {
                        self.nodes.router
                    };
                    let Some(backend) = backend else { return false };
                    net.clog_link(server, backend);
                    net.clog_link(backend, server);
                    tokio::time::sleep(hold).await;
                    net.unclog_link(server, backend);
                    net.unclog_link(backend, server);
                }
            }
        }
        true
    }

    /// Ends every fault: network back to normal, server running.
    pub fn heal(&self, handle: &Handle) {
        let net = NetSim::current();
        let backends = self.nodes.store.iter().chain(&self.nodes.router);
        for node in self.nodes.servers.iter().chain(backends) {
            net.unclog_node(*node);
        }
        net.update_config(|c| {
            c.packet_loss_rate = 0.0;
            c.send_latency = Duration::from_millis(1)..Duration::from_millis(10);
        });
        if let Some(disk) = &self.nodes.disk {
            disk.set_fault(None);
        }
        for ip in self.nodes.device_ips.values() {
            stall::resume(*ip);
        }
        let _ = handle;
    }
}
