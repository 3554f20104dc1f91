//! Everything a run does follows from one `u64` seed and a preset: [`SimOptions::derive`]
//! turns them into concrete options, printed before the run starts.

use std::fmt;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// A preset from `scenarios/sim/*.toml`: ranges the seed picks from, and fault weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Name, for reports.
    pub name: String,
    /// Chat servers: `[min, max]`; more than one runs them on the shared store
    /// and the router (the simulated stand-ins for Scylla and Redis).
    #[serde(default = "one_server")]
    pub servers: [u32; 2],
    /// A delivery slower than this outside fault windows is `slow` (default 1000 ms).
    #[serde(default = "one_second")]
    pub latency_bound_ms: u64,
    /// Chance, per group, that a user outside it is added during the safety phase,
    /// and (separately) that a member leaves or is removed by the owner.
    #[serde(default)]
    pub membership_change_share: f64,
    /// Users: `[min, max]`.
    pub users: [u32; 2],
    /// Devices per user: `[min, max]`.
    pub devices_per_user: [u32; 2],
    /// Group size: `[min, max]` (groups are cut from the users; 1:1 chats pair neighbours).
    pub group_size: [u32; 2],
    /// New messages each sending device makes in the safety phase: `[min, max]`.
    pub messages_per_device: [u32; 2],
    /// Share of devices that send (the others only receive), 0..=1.
    #[serde(default = "all")]
    pub sender_share: f64,
    /// Safety phase length (faults on), simulated seconds.
    pub safety_secs: u64,
    /// Liveness deadline after healing, simulated seconds.
    pub liveness_secs: u64,
    /// Mean time between faults, simulated milliseconds.
    pub fault_interval_ms: u64,
    /// Faults that may be under way at once (default 1): that many injector lanes,
    /// each drawing a fault every `fault_interval_ms` and holding it, so faults of
    /// different lanes overlap (a crash during a partition, power loss during a
    /// router outage). 1 to [`FAULTS_AT_ONCE_MAX`].
    #[serde(default = "one_fault")]
    pub faults_at_once: u32,
    /// Relative weight of each fault kind (0 disables it).
    pub faults: FaultWeights,
    /// How long the servers keep entries, simulated seconds, with an expiry sweep
    /// every second; without it the server's default (366 days), so nothing expires.
    #[serde(default)]
    pub retention_secs: Option<u64>,
    /// Server limits set small so that they are reached (default: the server's).
    #[serde(default)]
    pub limits: SmallLimits,
}

/// Server limits a preset sets small, so that runs reach them: pages and catch-up reads
/// of a few entries, device queues that fill (`slow_consumer`) under a burst.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmallLimits {
    /// Largest page of `sync` and `history`, and of each catch-up read.
    pub page_len_max: Option<u32>,
    /// Live events queued for one device before it gets `slow_consumer`.
    pub device_queue_len_max: Option<usize>,
}

/// The most faults a preset may have under way at once.
pub const FAULTS_AT_ONCE_MAX: u32 = 4;

fn one_fault() -> u32 {
    1
}

fn all() -> f64 {
    1.0
}

fn one_second() -> u64 {
    1_000
}

fn one_server() -> [u32; 2] {
    [1, 1]
}

/// One kind of fault the injector can apply ([`crate::faults`] says how).
/// Declaration order is the order weights are drawn in: adding a kind at the
/// end keeps every existing seed's run the same.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum FaultKind {
    /// Kill a server (its store keeps exactly what was committed) and restart it.
    ServerCrash,
    /// Cut a server off both ways.
    Partition,
    /// Cut one direction only (in or out) of a server.
    PartitionOneWay,
    /// Cut one client's link to a server.
    LinkPartition,
    /// Raise network latency for a while.
    LatencySpike,
    /// Drop a share of packets for a while.
    PacketLoss,
    /// A client drops its connection (possibly mid-send).
    ClientDisconnect,
    /// A server restarts with its clock skewed.
    ClockSkew,
    /// Several servers: the shared store's node crashes (losing only calls in flight) and restarts.
    StoreCrash,
    /// Several servers: the router crashes and restarts empty (registry lost).
    RouterCrash,
    /// Several servers: one server's link to the store or to the router is cut.
    BackendPartition,
    /// One server: its disk is full for a while (writes fail with ENOSPC).
    DiskFull,
    /// One server: its disk fails writes, or fsyncs, with EIO for a while.
    DiskIo,
    /// One server: power loss: the server dies and its disk keeps only what was
    /// synced, the last unsynced writes possibly torn; then it restarts.
    PowerLoss,
    /// A server stops running for a while (a long GC pause, SIGSTOP, a stalled VM)
    /// and then resumes where it was, its connections and registry entries aged.
    ProcessPause,
    /// A running server's wall clock steps forward or back (up to 30 s), as an NTP
    /// step would, without a restart.
    ClockJump,
    /// A device stops reading for a while: the server's writes to it block (a full
    /// TCP window) while the server goes on queueing its live events, so a small queue
    /// fills and the device gets `slow_consumer`.
    ReaderStall,
}

impl FaultKind {
    /// Every kind, in draw order.
    pub const ALL: [FaultKind; 17] = [
        FaultKind::ServerCrash,
        FaultKind::Partition,
        FaultKind::PartitionOneWay,
        FaultKind::LinkPartition,
        FaultKind::LatencySpike,
        FaultKind::PacketLoss,
        FaultKind::ClientDisconnect,
        FaultKind::ClockSkew,
        FaultKind::StoreCrash,
        FaultKind::RouterCrash,
        FaultKind::BackendPartition,
        FaultKind::DiskFull,
        FaultKind::DiskIo,
        FaultKind::PowerLoss,
        FaultKind::ProcessPause,
        FaultKind::ClockJump,
        FaultKind::ReaderStall,
    ];

    /// The name used in presets, `--faults`, traces and replay commands.
    pub const fn name(self) -> &'static str {
        match self {
            FaultKind::ServerCrash => "server_crash",
            FaultKind::Partition => "partition",
            FaultKind::PartitionOneWay => "partition_one_way",
            FaultKind::LinkPartition => "link_partition",
            FaultKind::LatencySpike => "latency_spike",
            FaultKind::PacketLoss => "packet_loss",
            FaultKind::ClientDisconnect => "client_disconnect",
            FaultKind::ClockSkew => "clock_skew",
            FaultKind::StoreCrash => "store_crash",
            FaultKind::RouterCrash => "router_crash",
            FaultKind::BackendPartition => "backend_partition",
            FaultKind::DiskFull => "disk_full",
            FaultKind::DiskIo => "disk_io",
            FaultKind::PowerLoss => "power_loss",
            FaultKind::ProcessPause => "process_pause",
            FaultKind::ClockJump => "clock_jump",
            FaultKind::ReaderStall => "reader_stall",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Relative weights of fault kinds (a preset's `[faults]` table: `name = weight`;
/// a kind not named weighs 0, an unknown name is an error).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(transparent)]
pub struct FaultWeights {
    by_kind: std::collections::BTreeMap<FaultKind, u32>,
}

impl FaultWeights {
    /// Weights with `kinds` set as given and every other kind 0.
    #[cfg(test)]
    pub fn of(kinds: &[(FaultKind, u32)]) -> Self {
        Self {
            by_kind: kinds.iter().copied().collect(),
        }
    }

    /// The weight of `kind`.
    pub fn weight(&self, kind: FaultKind) -> u32 {
        self.by_kind.get(&kind).copied().unwrap_or(0)
    }

    /// Weights in [`FaultKind::ALL`] order.
    pub fn weights(&self) -> [u32; FaultKind::ALL.len()] {
        FaultKind::ALL.map(|kind| self.weight(kind))
    }

    /// Keeps only `kinds` (`--faults a,b`); a kept kind the preset weighs 0 gets weight 1.
    pub fn only(&self, kinds: &[FaultKind]) -> Self {
        Self {
            by_kind: kinds
                .iter()
                .map(|kind| (*kind, self.weight(*kind).max(1)))
                .collect(),
        }
    }
}

impl Preset {
    /// Reads a preset file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let preset: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        anyhow::ensure!(
            preset.users[0] >= 2 && preset.users[0] <= preset.users[1],
            "users range"
        );
        anyhow::ensure!(
            preset.group_size[0] >= 2 && preset.group_size[1] <= 500,
            "group_size within 2..=500"
        );
        anyhow::ensure!(
            preset.servers[0] >= 1
                && preset.servers[0] <= preset.servers[1]
                && preset.servers[1] <= 50,
            "servers within 1..=50"
        );
        anyhow::ensure!(
            preset.devices_per_user[0] >= 1,
            "devices_per_user at least 1"
        );
        anyhow::ensure!(
            (1..=FAULTS_AT_ONCE_MAX).contains(&preset.faults_at_once),
            "faults_at_once within 1..={FAULTS_AT_ONCE_MAX}"
        );
        Ok(preset)
    }

    /// The storage-fault preset (`scenarios/sim/storage-faults.toml`).
    pub fn storage_faults() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/storage-faults.toml"))
            .expect("built-in storage-faults preset")
    }

    /// The built-in small-limits preset (`scenarios/sim/small-limits.toml`).
    pub fn small_limits() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/small-limits.toml"))
            .expect("built-in small-limits preset")
    }

    /// The built-in reconnect-storm preset (`scenarios/sim/reconnect-storm.toml`).
    pub fn reconnect_storm() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/reconnect-storm.toml"))
            .expect("built-in reconnect-storm preset")
    }

    /// The built-in retention preset (`scenarios/sim/retention.toml`).
    pub fn retention() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/retention.toml"))
            .expect("built-in retention preset")
    }

    /// The built-in smoke preset (also `scenarios/sim/smoke.toml`).
    pub fn smoke() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/smoke.toml"))
            .expect("built-in preset parses")
    }

    /// The built-in router-outage preset (`scenarios/sim/router-outage.toml`).
    pub fn router_outage() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/router-outage.toml"))
            .expect("built-in router-outage preset")
    }

    /// The built-in cluster preset (several servers, shared store, router).
    pub fn cluster() -> Self {
        toml::from_str(include_str!("../../scenarios/sim/cluster.toml"))
            .expect("built-in preset parses")
    }
}

/// A deterministic generator (SplitMix64) for deriving options and workload choices.
#[derive(Debug, Clone)]
pub struct SeedRng(u64);

impl SeedRng {
    /// Starts from `seed` and a stream id, so independent choices do not correlate.
    pub fn new(seed: u64, stream: u64) -> Self {
        Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        let unit = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        unit < p
    }

    /// An index chosen by `weights` (at least one must be positive).
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        assert!(total > 0, "no positive weight");
        let mut pick = self.next_u64() % total;
        for (i, w) in weights.iter().enumerate() {
            if pick < u64::from(*w) {
                return i;
            }
            pick -= u64::from(*w);
        }
        unreachable!("pick < total")
    }
}

/// The concrete options of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// The seed.
    pub seed: u64,
    /// The preset's name.
    pub preset: String,
    /// Chat servers (more than one: shared store and router).
    pub servers: u32,
    /// The delivery latency bound outside fault windows, ms.
    pub latency_bound_ms: u64,
    /// Membership changes made during the safety phase, in time order.
    pub member_changes: Vec<PlannedChange>,
    /// Users.
    pub users: u32,
    /// Devices of each user.
    pub devices_per_user: Vec<u32>,
    /// Groups as member user indexes.
    pub groups: Vec<Vec<u32>>,
    /// New messages each device sends (0 for receive-only devices), by (user, device).
    pub messages: Vec<Vec<u32>>,
    /// Safety phase, simulated seconds.
    pub safety_secs: u64,
    /// Liveness deadline, simulated seconds.
    pub liveness_secs: u64,
    /// Mean time between faults, ms.
    pub fault_interval_ms: u64,
    /// Faults that may be under way at once (the preset's `faults_at_once`).
    pub faults_at_once: u32,
    /// Fault weights.
    pub faults: FaultWeights,
    /// Retention of entries, simulated seconds (`None`: the server's default).
    pub retention_secs: Option<u64>,
    /// Server limits set small.
    pub limits: SmallLimits,
    /// The mutant switched on, if any.
    pub mutant: Option<String>,
}

/// A membership change the workload makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedChange {
    /// Index into the groups.
    pub group: usize,
    /// What happens to `user`.
    pub kind: ChangeKind,
    /// The user concerned.
    pub user: u32,
    /// When, ms into the run.
    pub at_ms: u64,
}

/// Kinds of planned membership change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// The owner adds the user.
    Join,
    /// The user leaves.
    Leave,
    /// The owner removes the user.
    Remove,
}

impl SimOptions {
    /// Derives every option from `seed` within `preset`.
    pub fn derive(seed: u64, preset: &Preset) -> Self {
        let mut rng = SeedRng::new(seed, 1);
        let users = rng.range(u64::from(preset.users[0]), u64::from(preset.users[1])) as u32;
        let servers = rng.range(u64::from(preset.servers[0]), u64::from(preset.servers[1])) as u32;
        let devices_per_user: Vec<u32> = (0..users)
            .map(|_| {
                rng.range(
                    u64::from(preset.devices_per_user[0]),
                    u64::from(preset.devices_per_user[1]),
                ) as u32
            })
            .collect();
        let mut groups: Vec<Vec<u32>> = Vec::new();
        let mut start = 0;
        while start + 1 < users {
            let size = rng.range(
                u64::from(preset.group_size[0]),
                u64::from(preset.group_size[1]),
            ) as u32;
            let end = (start + size).min(users);
            groups.push((start..end).collect());
            start = end;
        }
        let messages = devices_per_user
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        if rng.chance(preset.sender_share) {
                            rng.range(
                                u64::from(preset.messages_per_device[0]),
                                u64::from(preset.messages_per_device[1]),
                            ) as u32
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect();
        let mut member_changes = Vec::new();
        let safety_ms = preset.safety_secs * 1000;
        for (g, members) in groups.iter().enumerate() {
            if rng.chance(preset.membership_change_share) {
                let outside: Vec<u32> = (0..users).filter(|u| !members.contains(u)).collect();
                if !outside.is_empty() {
                    let user = outside[rng.range(0, outside.len() as u64 - 1) as usize];
                    let at_ms = rng.range(safety_ms / 5, safety_ms * 3 / 5);
                    member_changes.push(PlannedChange {
                        group: g,
                        kind: ChangeKind::Join,
                        user,
                        at_ms,
                    });
                }
            }
            if members.len() > 2 && rng.chance(preset.membership_change_share) {
                let user = members[rng.range(1, members.len() as u64 - 1) as usize];
                let kind = if rng.chance(0.5) {
                    ChangeKind::Leave
                } else {
                    ChangeKind::Remove
                };
                let at_ms = rng.range(safety_ms * 3 / 10, safety_ms * 7 / 10);
                member_changes.push(PlannedChange {
                    group: g,
                    kind,
                    user,
                    at_ms,
                });
            }
        }
        member_changes.sort_by_key(|c| c.at_ms);
        Self {
            member_changes,
            seed,
            preset: preset.name.clone(),
            servers,
            latency_bound_ms: preset.latency_bound_ms,
            users,
            devices_per_user,
            groups,
            messages,
            safety_secs: preset.safety_secs,
            liveness_secs: preset.liveness_secs,
            fault_interval_ms: preset.fault_interval_ms,
            faults_at_once: preset.faults_at_once,
            faults: preset.faults.clone(),
            retention_secs: preset.retention_secs,
            limits: preset.limits,
            mutant: None,
        }
    }

    /// Total devices.
    pub fn devices(&self) -> u32 {
        self.devices_per_user.iter().sum()
    }
}

impl fmt::Display for SimOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sizes: Vec<usize> = self.groups.iter().map(Vec::len).collect();
        let msgs: u32 = self.messages.iter().flatten().sum();
        write!(
            f,
            "seed={} preset={} servers={} users={} devices={} member_changes={} groups={:?} messages={} safety={}s liveness={}s fault_interval={}ms{}{}{}{} faults={:?} mutant={}",
            self.seed,
            self.preset,
            self.servers,
            self.users,
            self.devices(),
            self.member_changes.len(),
            sizes,
            msgs,
            self.safety_secs,
            self.liveness_secs,
            self.fault_interval_ms,
            if self.faults_at_once > 1 {
                format!(" faults_at_once={}", self.faults_at_once)
            } else {
                String::new()
            },
            self.retention_secs
                .map(|r| format!(" retention={r}s"))
                .unwrap_or_default(),
            self.limits
                .page_len_max
                .map(|n| format!(" page_len_max={n}"))
                .unwrap_or_default(),
            self.limits
                .device_queue_len_max
                .map(|n| format!(" device_queue_len_max={n}"))
                .unwrap_or_default(),
            self.faults.weights(),
            self.mutant.as_deref().unwrap_or("none"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same seed derives the same options; different seeds explore different ones.
    #[test]
    fn derivation_is_deterministic() {
        let preset = Preset::smoke();
        assert_eq!(
            SimOptions::derive(7, &preset),
            SimOptions::derive(7, &preset)
        );
        let distinct: std::collections::BTreeSet<String> = (0..20)
            .map(|s| SimOptions::derive(s, &preset).to_string())
            .collect();
        assert!(distinct.len() > 10);
        let o = SimOptions::derive(3, &preset);
        assert!(o.groups.iter().all(|g| g.len() >= 2));
        assert!(o.users >= preset.users[0] && o.users <= preset.users[1]);
    }

    /// `--faults` keeps only the named kinds; a preset naming an unknown kind is refused.
    #[test]
    fn fault_filter() {
        let w = FaultWeights::of(&[(FaultKind::ServerCrash, 3), (FaultKind::Partition, 2)]);
        let only = w.only(&[FaultKind::Partition, FaultKind::PacketLoss]);
        assert_eq!(
            only.weights(),
            [0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let parsed: FaultWeights = toml::from_str("server_crash = 3\npartition = 2").unwrap();
        assert_eq!(parsed, w);
        assert!(toml::from_str::<FaultWeights>("meteor = 1").is_err());
    }

    /// Every preset file loads; `faults_at_once` defaults to 1 and is bounded.
    #[test]
    fn preset_files_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/sim");
        let mut at_once = std::collections::BTreeMap::new();
        for file in std::fs::read_dir(&dir).unwrap() {
            let path = file.unwrap().path();
            let preset =
                Preset::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            at_once.insert(preset.name, preset.faults_at_once);
        }
        assert_eq!(at_once["cluster"], 1);
        assert_eq!(at_once["overlapping-faults"], 2);
        let tmp = std::env::temp_dir().join(format!("preset-{}.toml", std::process::id()));
        let text = include_str!("../../scenarios/sim/overlapping-faults.toml")
            .replace("faults_at_once = 2", "faults_at_once = 9");
        std::fs::write(&tmp, text).unwrap();
        let refused = Preset::load(&tmp);
        std::fs::remove_file(&tmp).unwrap();
        assert!(refused.is_err(), "faults_at_once = 9 is out of range");
    }

    /// Names, serde and clap agree for every fault kind, in draw order.
    #[test]
    fn fault_kind_names() {
        use clap::ValueEnum as _;
        for (i, kind) in FaultKind::ALL.into_iter().enumerate() {
            assert_eq!(kind as usize, i);
            let value = kind.to_possible_value().unwrap();
            assert_eq!(value.get_name(), kind.name());
            assert_eq!(FaultKind::from_str(kind.name(), false), Ok(kind));
            let weights = FaultWeights::of(&[(kind, 1)]).weights();
            assert_eq!(weights.iter().position(|w| *w == 1), Some(i));
        }
    }
}
