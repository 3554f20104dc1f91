//! `plan`: the capacity model. Turns a design point (`[design]` of a scenario) and
//! per-server figures measured by a calibration run into a fleet, printing every
//! assumption beside the result.

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The full-scale target a scenario models (`[design]` table).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Design {
    /// Daily active users.
    pub daily_active_users: f64,
    /// Share of them online at the busy hour.
    pub concurrent_share: f64,
    /// Connected devices per online user.
    pub devices_per_user: f64,
    /// Messages per day.
    pub messages_per_day: f64,
    /// Busy-hour rate over the daily mean.
    pub peak_factor: f64,
    /// Share of messages sent to groups.
    pub group_share: f64,
    /// Mean members of the group a group message goes to.
    pub mean_group_size: f64,
    /// Mean text size, bytes.
    pub text_bytes: f64,
    /// Share of messages carrying an image.
    #[serde(default)]
    pub media_share: f64,
    /// Mean image size, bytes.
    #[serde(default)]
    pub media_bytes: f64,
    /// Days messages are kept.
    pub retention_days: f64,
    /// Store replication factor.
    pub replication_factor: f64,
    /// Mean connected session length, minutes (registry churn).
    pub session_minutes: f64,
    /// Server heartbeat interval to the registry, seconds.
    pub heartbeat_secs: f64,
}

/// Hardware and per-node capacity assumptions (flags of `plan`).
#[derive(Debug, Clone, Serialize, PartialEq, clap::Args)]
pub struct Hardware {
    /// Cores per chat server.
    #[arg(long, default_value_t = 8.0)]
    pub server_cores: f64,
    /// Memory per chat server, GiB.
    #[arg(long, default_value_t = 32.0)]
    pub server_memory_gib: f64,
    /// Share of memory and CPU a server may use at peak (the rest is headroom).
    #[arg(long, default_value_t = 0.5)]
    pub utilisation: f64,
    /// Kernel memory per connection (socket buffers), not in the measured RSS, bytes.
    #[arg(long, default_value_t = 8192.0)]
    pub kernel_bytes_per_connection: f64,
    /// Most connections one server is allowed, whatever memory allows (descriptors, blast radius).
    #[arg(long, default_value_t = 200_000.0)]
    pub connections_per_server_max: f64,
    /// Operations per second one Redis node sustains.
    #[arg(long, default_value_t = 100_000.0)]
    pub redis_ops_per_node: f64,
    /// Writes per second one Scylla node sustains within the latency target.
    #[arg(long, default_value_t = 30_000.0)]
    pub scylla_writes_per_node: f64,
    /// Bytes stored per message besides its text (keys, metadata, index).
    #[arg(long, default_value_t = 150.0)]
    pub store_overhead_bytes: f64,
    /// Bytes on the wire per delivered message besides its text (frame, JSON fields).
    #[arg(long, default_value_t = 220.0)]
    pub frame_overhead_bytes: f64,
}

/// Figures measured by a calibration run (`summary.json` → `server_usage`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Calibration {
    /// Server memory per connected device, bytes.
    pub bytes_per_connection: f64,
    /// Deliveries per server core-second.
    pub deliveries_per_core_sec: f64,
}

/// Where the calibration figures come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationSource {
    /// The knee of a `capacity` search: the figures at the highest rate the server
    /// carried within the scenario's targets.
    Capacity {
        /// Scenario searched.
        scenario: String,
        /// The knee's offered rate, messages per second.
        knee_per_sec: f64,
        /// What bounded the search there.
        bound: crate::capacity::Bound,
    },
    /// One `run`: the figures at its offered rate, which need not be near capacity.
    Run {
        /// Scenario run.
        scenario: String,
        /// Its offered rate, messages per second.
        offered_per_sec: f64,
    },
}

impl CalibrationSource {
    /// One line for the plan.
    pub fn describe(&self) -> String {
        match self {
            Self::Capacity {
                scenario,
                knee_per_sec,
                bound,
            } => format!(
                "the knee of a capacity search of `{scenario}`: {knee_per_sec:.0} msgs/s offered (bounded by {})",
                serde_json::to_value(bound).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
            ),
            Self::Run {
                scenario,
                offered_per_sec,
            } => format!("one run of `{scenario}` at {offered_per_sec:.0} msgs/s offered"),
        }
    }

    /// Why these figures may mislead, if they may.
    pub fn warning(&self) -> Option<String> {
        match self {
            Self::Run { .. } => Some(
                "this calibration is one run, not a capacity: at a light load the server spends far more CPU per delivery (waking up) than at its knee, so the servers for CPU are overstated; calibrate with the summary.json of `chatproof-loadgen capacity`".to_owned(),
            ),
            Self::Capacity {
                bound: crate::capacity::Bound::Generator,
                ..
            } => Some(
                "the generator, not the server, ended the capacity search: the server carries at least the knee, so the servers for CPU may be overstated".to_owned(),
            ),
            Self::Capacity { .. } => None,
        }
    }
}

/// The fleet and the loads that size it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Fleet {
    /// Concurrent connections.
    pub connections: f64,
    /// Busy-hour messages per second.
    pub peak_messages_per_sec: f64,
    /// Deliveries (message × recipient device) per message.
    pub deliveries_per_message: f64,
    /// Busy-hour deliveries per second.
    pub peak_deliveries_per_sec: f64,
    /// Chat servers needed for memory.
    pub servers_for_memory: f64,
    /// Chat servers needed for CPU.
    pub servers_for_cpu: f64,
    /// Chat servers needed for the per-server connection cap.
    pub servers_for_cap: f64,
    /// Chat servers (the largest, rounded up).
    pub servers: f64,
    /// Connections per server at that count.
    pub connections_per_server: f64,
    /// Redis operations per second at peak.
    pub redis_ops_per_sec: f64,
    /// Redis nodes.
    pub redis_nodes: f64,
    /// Store writes per second at peak (before replication).
    pub store_writes_per_sec: f64,
    /// Store nodes (with replication).
    pub store_nodes: f64,
    /// Message storage for the retention period, with replication, TB.
    pub storage_tb: f64,
    /// Image storage for the retention period (blob store, not replicated here), TB.
    pub media_storage_tb: f64,
    /// Outbound delivery bandwidth at peak, Gbit/s (text; images are fetched separately).
    pub egress_gbit_per_sec: f64,
    /// The textbook estimate: connections / 100 K per server.
    pub textbook_servers: f64,
}

/// Sizes the fleet.
pub fn plan(d: &Design, hw: &Hardware, cal: &Calibration) -> Fleet {
    assert!(
        cal.bytes_per_connection > 0.0 && cal.deliveries_per_core_sec > 0.0,
        "calibration figures must be positive"
    );
    let connections = d.daily_active_users * d.concurrent_share * d.devices_per_user;
    let peak_messages_per_sec = d.messages_per_day / 86_400.0 * d.peak_factor;
    // Every device of every member receives each entry, the sender's own devices included.
    let recipient_users = (1.0 - d.group_share) * 2.0 + d.group_share * d.mean_group_size;
    let deliveries_per_message = recipient_users * d.devices_per_user;
    let peak_deliveries_per_sec = peak_messages_per_sec * deliveries_per_message;
    let memory_bytes = hw.server_memory_gib * 1024.0 * 1024.0 * 1024.0 * hw.utilisation;
    let servers_for_memory =
        connections * (cal.bytes_per_connection + hw.kernel_bytes_per_connection) / memory_bytes;
    let servers_for_cpu =
        peak_deliveries_per_sec / (cal.deliveries_per_core_sec * hw.server_cores * hw.utilisation);
    let servers_for_cap = connections / hw.connections_per_server_max;
    let servers = servers_for_memory
        .max(servers_for_cpu)
        .max(servers_for_cap)
        .ceil()
        .max(1.0);
    // Registry: one lookup per recipient user, one publish per recipient server, session churn, heartbeats.
    let lookups = peak_messages_per_sec * recipient_users;
    let publishes = peak_messages_per_sec * recipient_users.min(servers);
    let churn = connections / (d.session_minutes * 60.0) * 2.0;
    let heartbeats = servers / d.heartbeat_secs;
    let redis_ops_per_sec = lookups + publishes + churn + heartbeats;
    let redis_nodes = (redis_ops_per_sec / hw.redis_ops_per_node).ceil().max(1.0);
    // Store: the entry, its idempotency key, and one cursor write per recipient device (acks coalesce to about one).
    let store_writes_per_sec = peak_messages_per_sec * 2.0 + peak_deliveries_per_sec;
    let store_nodes = (store_writes_per_sec * d.replication_factor / hw.scylla_writes_per_node)
        .ceil()
        .max(d.replication_factor);
    let storage_tb = d.messages_per_day
        * d.retention_days
        * (d.text_bytes + hw.store_overhead_bytes)
        * d.replication_factor
        / 1e12;
    let media_storage_tb =
        d.messages_per_day * d.retention_days * d.media_share * d.media_bytes / 1e12;
    let egress_gbit_per_sec =
        peak_deliveries_per_sec * (d.text_bytes + hw.frame_overhead_bytes) * 8.0 / 1e9;
    Fleet {
        connections,
        peak_messages_per_sec,
        deliveries_per_message,
        peak_deliveries_per_sec,
        servers_for_memory,
        servers_for_cpu,
        servers_for_cap,
        servers,
        connections_per_server: connections / servers,
        redis_ops_per_sec,
        redis_nodes,
        store_writes_per_sec,
        store_nodes,
        storage_tb,
        media_storage_tb,
        egress_gbit_per_sec,
        textbook_servers: (connections / 100_000.0).ceil(),
    }
}

/// The plan as Markdown: assumptions, calibration, and the fleet.
pub fn report(
    d: &Design,
    hw: &Hardware,
    (cal, source): (&Calibration, &CalibrationSource),
    f: &Fleet,
) -> String {
    let mut out = String::from("# Capacity plan\n\n## Design point (assumed)\n\n");
    out.push_str(&format!(
        "- {:.0} daily active users, {:.0} % online at the busy hour, {:.2} devices each → **{:.0} connections**\n\
         - {:.0} messages/day, busy-hour factor {:.1} → **{:.0} messages/s**\n\
         - {:.0} % of messages to groups of {:.0} members on average → {:.1} deliveries per message → **{:.0} deliveries/s**\n\
         - text {:.0} B; {:.1} % of messages carry an image of {:.0} B; kept {:.0} days; replication {:.0}\n\
         - sessions last {:.0} min; servers heartbeat the registry every {:.0} s\n",
        d.daily_active_users, d.concurrent_share * 100.0, d.devices_per_user, f.connections,
        d.messages_per_day, d.peak_factor, f.peak_messages_per_sec,
        d.group_share * 100.0, d.mean_group_size, f.deliveries_per_message, f.peak_deliveries_per_sec,
        d.text_bytes, d.media_share * 100.0, d.media_bytes, d.retention_days, d.replication_factor,
        d.session_minutes, d.heartbeat_secs,
    ));
    out.push_str(&format!(
        "\n## Hardware (assumed)\n\n- chat server: {:.0} cores, {:.0} GiB, used to {:.0} % at peak; at most {:.0} connections; {:.0} B kernel memory per connection\n- Redis node: {:.0} ops/s; Scylla node: {:.0} writes/s\n- {:.0} B stored per message besides text; {:.0} B on the wire per delivery besides text\n",
        hw.server_cores, hw.server_memory_gib, hw.utilisation * 100.0, hw.connections_per_server_max, hw.kernel_bytes_per_connection, hw.redis_ops_per_node, hw.scylla_writes_per_node, hw.store_overhead_bytes, hw.frame_overhead_bytes
    ));
    out.push_str(&format!(
        "\n## Calibration (measured)\n\nFrom {}.\n\n- {:.0} bytes of server memory per connection\n- {:.0} deliveries per server core-second\n",
        source.describe(), cal.bytes_per_connection, cal.deliveries_per_core_sec
    ));
    if let Some(warning) = source.warning() {
        out.push_str(&format!("\n**Warning:** {warning}.\n"));
    }
    out.push_str(&format!(
        "\n## Fleet\n\n| what | figure |\n|---|---|\n\
         | chat servers for memory | {:.1} |\n| chat servers for CPU | {:.1} |\n| chat servers for the connection cap | {:.1} |\n| **chat servers** | **{:.0}** ({:.0} connections each) |\n\
         | Redis ops/s at peak | {:.0} |\n| **Redis nodes** | **{:.0}** |\n| store writes/s at peak | {:.0} |\n| **Scylla nodes** | **{:.0}** |\n\
         | message storage for retention (replicated) | {:.2} TB |\n| image storage for retention | {:.1} TB |\n| delivery egress at peak | {:.2} Gbit/s |\n",
        f.servers_for_memory, f.servers_for_cpu, f.servers_for_cap, f.servers, f.connections_per_server, f.redis_ops_per_sec, f.redis_nodes,
        f.store_writes_per_sec, f.store_nodes, f.storage_tb, f.media_storage_tb, f.egress_gbit_per_sec
    ));
    out.push_str(&format!(
        "\nTextbook estimate: {:.0} servers at 100 K connections each; this plan: {:.0} ({:.1}x).\n",
        f.textbook_servers,
        f.servers,
        f.servers / f.textbook_servers.max(1.0)
    ));
    out
}

/// `chatproof-loadgen plan`: prints the fleet for `scenario`'s `[design]` point.
pub fn command(
    scenario: &std::path::Path,
    calibration: &std::path::Path,
    hardware: &Hardware,
) -> anyhow::Result<i32> {
    let scenario = crate::scenario::Scenario::load(scenario)?;
    let design = scenario
        .design
        .ok_or_else(|| anyhow::anyhow!("{} has no [design] table", scenario.name))?;
    let (cal, source) = read_calibration(calibration)?;
    if let Some(warning) = source.warning() {
        eprintln!("chatproof-loadgen plan: warning: {warning}");
    }
    let fleet = plan(&design, hardware, &cal);
    println!("{}", report(&design, hardware, (&cal, &source), &fleet));
    Ok(0)
}

/// The calibration figures of `path`: a `capacity` summary (its knee) or a `run`
/// summary (its server usage, with a warning that it is not a capacity).
fn read_calibration(path: &std::path::Path) -> anyhow::Result<(Calibration, CalibrationSource)> {
    let (file, text) = crate::report::summary_text(path)?;
    if let Ok(capacity) = serde_json::from_str::<crate::capacity::CapacitySummary>(&text) {
        let search = &capacity.server;
        let knee = search.knee.as_ref().ok_or_else(|| {
            anyhow::anyhow!("{}: the capacity search found no knee", file.display())
        })?;
        let (Some(us_per_delivery), Some(bytes)) = (
            knee.server_cpu_us_per_delivery,
            knee.server_bytes_per_connection,
        ) else {
            anyhow::bail!("{}: the knee has no server figures: search without --target (or with --server-pid)", file.display());
        };
        let cal = Calibration {
            bytes_per_connection: bytes.max(1.0),
            deliveries_per_core_sec: 1e6 / us_per_delivery,
        };
        let source = CalibrationSource::Capacity {
            scenario: capacity.scenario.clone(),
            knee_per_sec: knee.offered_per_sec,
            bound: search.bound,
        };
        return Ok((cal, source));
    }
    let summary: crate::report::Summary =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let usage = summary.server_usage.as_ref().ok_or_else(|| {
        anyhow::anyhow!("the calibration run has no server_usage: run it without --target so the generator measures its reference server")
    })?;
    let cal = Calibration {
        bytes_per_connection: usage.bytes_per_connection.max(1.0),
        deliveries_per_core_sec: usage.deliveries_per_cpu_sec,
    };
    let source = CalibrationSource::Run {
        scenario: summary.scenario.clone(),
        offered_per_sec: summary.config.load.messages_per_sec,
    };
    Ok((cal, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn design() -> Design {
        Design {
            daily_active_users: 50e6,
            concurrent_share: 0.2,
            devices_per_user: 1.0,
            messages_per_day: 86_400e3,
            peak_factor: 2.0,
            group_share: 0.0,
            mean_group_size: 500.0,
            text_bytes: 100.0,
            media_share: 0.0,
            media_bytes: 0.0,
            retention_days: 365.0,
            replication_factor: 3.0,
            session_minutes: 30.0,
            heartbeat_secs: 10.0,
        }
    }

    fn hardware() -> Hardware {
        Hardware {
            server_cores: 8.0,
            server_memory_gib: 32.0,
            utilisation: 0.5,
            kernel_bytes_per_connection: 0.0,
            connections_per_server_max: 1e9,
            redis_ops_per_node: 100_000.0,
            scylla_writes_per_node: 30_000.0,
            store_overhead_bytes: 150.0,
            frame_overhead_bytes: 220.0,
        }
    }

    /// The arithmetic: connections, peak rates, servers by memory and CPU, store sizing.
    #[test]
    fn sizes_a_known_design() {
        // 16 GiB usable per server at 16 KiB per connection → 1 Mi connections per server by memory.
        let cal = Calibration {
            bytes_per_connection: 16.0 * 1024.0,
            deliveries_per_core_sec: 1_000.0,
        };
        let f = plan(&design(), &hardware(), &cal);
        assert_eq!(f.connections, 10e6);
        assert_eq!(f.peak_messages_per_sec, 2_000.0);
        assert_eq!(f.deliveries_per_message, 2.0);
        assert_eq!(f.peak_deliveries_per_sec, 4_000.0);
        assert!((f.servers_for_memory - 10e6 / (1024.0 * 1024.0)).abs() < 1e-9);
        assert!((f.servers_for_cpu - 4_000.0 / 4_000.0).abs() < 1e-9);
        assert_eq!(f.servers, 10.0, "memory decides: ceil(9.54)");
        assert_eq!(f.textbook_servers, 100.0);
        assert_eq!(f.store_writes_per_sec, 2_000.0 * 2.0 + 4_000.0);
        assert_eq!(f.store_nodes, 3.0, "never fewer nodes than replicas");
        let capped = plan(
            &design(),
            &Hardware {
                connections_per_server_max: 100_000.0,
                ..hardware()
            },
            &cal,
        );
        assert_eq!(capped.servers, 100.0, "the per-server cap decides");
        let tb = 86_400e3 * 365.0 * 250.0 * 3.0 / 1e12;
        assert!((f.storage_tb - tb).abs() < 1e-9);
    }

    /// Group fan-out multiplies deliveries and so CPU-bound servers.
    #[test]
    fn groups_drive_cpu() {
        let mut d = design();
        d.group_share = 0.1;
        let cal = Calibration {
            bytes_per_connection: 1_000.0,
            deliveries_per_core_sec: 1_000.0,
        };
        let f = plan(&d, &hardware(), &cal);
        assert!((f.deliveries_per_message - (0.9 * 2.0 + 0.1 * 500.0)).abs() < 1e-9);
        assert!(f.servers_for_cpu > f.servers_for_memory);
        assert_eq!(f.servers, f.servers_for_cpu.ceil());
    }
}
