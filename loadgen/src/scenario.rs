//! Scenarios as data: `scenarios/load/*.toml`, each opening with comments on what it
//! models and what must hold.

use std::path::Path;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// One load scenario.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name; reports go to `reports/<name>/<timestamp>/`.
    pub name: String,
    /// Decides the population's conversations and every message's conversation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Who exists and who talks to whom.
    pub population: Population,
    /// How much traffic, for how long.
    pub load: Load,
    /// What must hold; any miss makes the exit status non-zero.
    #[serde(default)]
    pub slo: Slo,
    /// Devices dropping off and coming back during the run.
    #[serde(default)]
    pub churn: Option<Churn>,
    /// The full-scale design point this scenario is a slice of (for `plan`).
    #[serde(default)]
    pub design: Option<crate::plan::Design>,
}

fn default_seed() -> u64 {
    1
}

/// Users, devices and conversations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Population {
    /// Users; each has one 1:1 partner and belongs to one group.
    pub users: u32,
    /// Connected devices per user (phone + desktop = 2).
    #[serde(default = "one")]
    pub devices_per_user: u32,
    /// Members per group (the last group may be smaller).
    pub group_size: u32,
}

fn one() -> u32 {
    1
}

/// Offered load (open model: sends are scheduled, never wait for acks).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Measured period, seconds.
    pub duration_secs: u64,
    /// Before the measured period: traffic at the same rate whose latencies are
    /// reported apart and not judged (the contract still is), seconds. Devices
    /// connecting and presence arriving then do not decide the run's percentiles;
    /// [`DEFAULT_WARMUP_SECS`] when the scenario does not say, 0 to judge from the
    /// first message.
    #[serde(default = "default_warmup_secs")]
    pub warmup_secs: u64,
    /// Messages per second over the whole population.
    pub messages_per_sec: f64,
    /// Share of messages sent to groups (the rest are 1:1).
    pub group_share: f64,
    /// Text size in bytes (the timestamp stamp included).
    #[serde(default = "default_text_bytes")]
    pub text_bytes: usize,
    /// Goose users; each drives an equal share of the devices and the rate.
    #[serde(default = "default_drivers")]
    pub drivers: u32,
    /// After the measured period, how long to wait for deliveries in flight, seconds.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    /// Share of messages that are images: uploaded over HTTP (`POST /v1/media`),
    /// then sent with the stamp as caption. Latency still counts from the scheduled time.
    #[serde(default)]
    pub image_share: f64,
    /// Image sizes in KiB, used in turn (each at most 10240).
    #[serde(default = "default_image_kib")]
    pub image_kib: Vec<u32>,
    /// Share of image deliveries the receiving device downloads (`GET /v1/media/{id}`).
    #[serde(default)]
    pub image_download_share: f64,
}

impl Load {
    /// Seconds of schedule: the warm-up, then the measured period.
    pub fn schedule_secs(&self) -> u64 {
        self.warmup_secs + self.duration_secs
    }
}

/// The warm-up of a scenario that does not set `warmup_secs`, seconds.
pub const DEFAULT_WARMUP_SECS: u64 = 3;

fn default_warmup_secs() -> u64 {
    DEFAULT_WARMUP_SECS
}

fn default_image_kib() -> Vec<u32> {
    vec![200]
}

fn default_text_bytes() -> usize {
    64
}
fn default_drivers() -> u32 {
    10
}
fn default_drain_secs() -> u64 {
    5
}

/// Churn: a share of the devices goes offline at once and comes back with its cursors.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Churn {
    /// Share of devices that drop, 0..=1.
    pub share: f64,
    /// Seconds after the schedule starts that the first drop happens.
    pub at_secs: u64,
    /// Seconds the devices stay offline (their messages queue on the server).
    pub offline_secs: u64,
    /// Seconds between further drops (0: only once).
    #[serde(default)]
    pub every_secs: u64,
}

/// Targets; defaults: delivery p99 < 500 ms, nothing lost.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// End-to-end delivery latency target at p99, milliseconds.
    #[serde(default = "default_p99_ms")]
    pub delivery_p99_ms: f64,
    /// Send→ack latency target at p99, milliseconds.
    #[serde(default = "default_p99_ms")]
    pub ack_p99_ms: f64,
    /// Lost deliveries tolerated.
    #[serde(default)]
    pub lost_max: u64,
    /// Generator lag (its own lateness versus the schedule) at p99 above which the run
    /// is invalid: the generator, not the server, was the bottleneck. Milliseconds.
    #[serde(default = "default_lag_p99_ms")]
    pub generator_lag_p99_ms: f64,
    /// When set: the shortest gap between two `presence` frames on one connection must
    /// be at least this (the server's coalescing bound), milliseconds.
    #[serde(default)]
    pub presence_gap_min_ms: Option<f64>,
    /// When set: the server's peak resident memory (all its processes, summed) must
    /// stay at most this, MiB. Needs the server's usage (the generator started it, or
    /// `--server-pid` names it); without it the run is invalid.
    #[serde(default)]
    pub server_rss_peak_mib: Option<f64>,
}

fn default_lag_p99_ms() -> f64 {
    50.0
}

fn default_p99_ms() -> f64 {
    500.0
}

impl Default for Slo {
    fn default() -> Self {
        Self {
            delivery_p99_ms: default_p99_ms(),
            ack_p99_ms: default_p99_ms(),
            lost_max: 0,
            generator_lag_p99_ms: default_lag_p99_ms(),
            presence_gap_min_ms: None,
            server_rss_peak_mib: None,
        }
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let scenario: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        scenario
            .validate()
            .with_context(|| format!("checking {}", path.display()))?;
        Ok(scenario)
    }

    /// Refuses scenarios that cannot run as written.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.population;
        let l = &self.load;
        if p.users < 2 || !p.users.is_multiple_of(2) {
            bail!("population.users must be an even number of at least 2 (users are paired 1:1)");
        }
        if p.devices_per_user == 0 || p.group_size < 2 || p.group_size > 500 {
            bail!("devices_per_user must be positive and group_size 2..=500");
        }
        if l.messages_per_sec.is_nan()
            || l.messages_per_sec <= 0.0
            || !(0.0..=1.0).contains(&l.group_share)
        {
            bail!("messages_per_sec must be positive and group_share within 0..=1");
        }
        if l.drivers == 0 || l.drivers > p.users {
            bail!("load.drivers must be 1..=population.users");
        }
        if l.duration_secs == 0 || l.text_bytes < 32 || l.text_bytes > 64 * 1024 {
            bail!("duration_secs must be positive and text_bytes 32..=65536");
        }
        if !(0.0..=1.0).contains(&l.image_share) || !(0.0..=1.0).contains(&l.image_download_share) {
            bail!("image_share and image_download_share must be within 0..=1");
        }
        if l.image_kib.is_empty() || l.image_kib.iter().any(|k| *k == 0 || *k > 10_240) {
            bail!("image_kib must list sizes of 1..=10240 KiB (the server's 10 MiB limit)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every scenario the repository ships loads and passes validation, and its file
    /// name is its `name`.
    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/load");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let scenario =
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            assert_eq!(
                Some(scenario.name.as_str()),
                path.file_stem().and_then(|s| s.to_str()),
                "{}",
                path.display()
            );
            seen += 1;
        }
        assert!(seen >= 12, "only {seen} scenarios in {}", dir.display());
    }

    /// The memory bound is read from `[slo]` and absent by default.
    #[test]
    fn server_memory_bound_is_optional() {
        assert_eq!(Slo::default().server_rss_peak_mib, None);
        let slo: Slo = toml::from_str("server_rss_peak_mib = 384").unwrap();
        assert_eq!(slo.server_rss_peak_mib, Some(384.0));
    }
}
