//! `run`: one load run of a scenario. Starts the reference server (or the floor) when no
//! `--target` is given, hands the run to `--workers` child processes or drives it in
//! this process, and writes the report folder.
//!
//! # Layout
//! - `state`: the run's configuration, counters and histograms, shared as one `Arc`.
//! - `drive`: the goose users: connect the devices, then send on the schedule.
//! - `churn`, `downloads`: what runs beside the schedule (devices leaving and coming
//!   back; recipients fetching images).
//! - `progress`: the per-second timeline and the drain at the end.

mod churn;
mod downloads;
mod drive;
mod progress;
pub mod state;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chatproof_server::auth::TokenKey;

use crate::device::{now_us, Target};
use crate::local::{LocalKind, LocalServer, ProcUsage};
use crate::report::{self, Summary};
use crate::scenario::Scenario;
use crate::world::World;
use crate::{live, media, setup, workers};
use state::{RunConfig, RunState, Start};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The scenario file.
    pub scenario: PathBuf,
    /// Server to load, `ws://HOST:PORT`. Without it a reference server is started on embedded
    /// storage. Repeat it (or separate with commas) to spread the devices over the servers
    /// of one cluster: user u's devices connect to the (u mod N)-th target.
    #[arg(long, value_delimiter = ',', conflicts_with = "floor")]
    pub target: Vec<String>,
    /// Load the protocol floor instead of the reference server: an in-memory relay that
    /// does the least any server of protocol v1 must do for this traffic (no storage, no
    /// history, no receipts or presence), started on loopback like the reference server.
    /// Its figures are what the generator reaches when the server costs almost nothing.
    /// Scenarios with churn or images need history or media and are refused.
    #[arg(long)]
    pub floor: bool,
    /// Process id of a target server on this machine (repeatable, or comma-separated): its
    /// CPU time and memory, summed over every id, are reported as the servers' usage.
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// The target's token secret (needed with --target).
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Directory that receives `<scenario>/<timestamp>/`.
    #[arg(long, default_value = "reports")]
    pub out_dir: PathBuf,
    /// Serve the run's live figures (sent, acknowledged, deliveries, violations so far,
    /// latency percentiles, connected devices) in the Prometheus text format at
    /// `http://ADDR/metrics` while it runs (dashboards: docs/grafana/). One process
    /// only: not with --workers.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Child processes that share the devices and the schedule (each process may hold
    /// only as many connections as its open-file limit allows); their runs are merged.
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Run part I of N (`I/N`) of the scenario, for one of N generator machines: this
    /// process sets up and drives only its share of the users (whole groups) at its share
    /// of the rate. Give every part the same --start-at, then `merge` their run folders.
    #[arg(long, conflicts_with = "worker")]
    pub part: Option<String>,
    /// When the schedule starts: Unix time in seconds (e.g. `$(( $(date +%s) + 120 ))`).
    /// Devices connect first; the first send is due at this instant, so parts on several
    /// machines share one schedule (their clocks must agree, e.g. by NTP).
    #[arg(long)]
    pub start_at: Option<u64>,
    /// Internal: this process is worker I of N (`I/N`), started by a parent.
    #[arg(long, hide = true)]
    pub worker: Option<String>,
    /// Internal: the parent's run id.
    #[arg(long, hide = true)]
    pub run_id: Option<String>,
}

/// `chatproof-loadgen run`: returns the exit status (0 pass, 1 a target missed or a
/// violation, 3 invalid); an error is a usage or setup error.
pub fn command(args: RunArgs) -> anyhow::Result<i32> {
    let scenario = Scenario::load(&args.scenario)?;
    let (server, addrs, secret) = servers(&args, &scenario)?;
    // Whose CPU and memory the report shows: the reference server or the named pids.
    let measured: Vec<u32> = match &server {
        Some(s) => vec![s.pid()],
        None => args.server_pids.clone(),
    };
    let key = TokenKey::new(secret.as_bytes()).map_err(|e| anyhow!(e))?;
    let run_id = args
        .run_id
        .clone()
        .unwrap_or_else(|| format!("lg{:x}", now_us() / 1000 % 0xffff_ffff));
    let targets = resolve_targets(&addrs)?;
    let urls = targets
        .iter()
        .map(|t| t.url.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    let world = World::new(&scenario, &run_id);
    let out = args.out_dir.join(&scenario.name).join(report::timestamp());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if args.workers > 1 && args.metrics_listen.is_some() {
        bail!("--metrics-listen serves one process's figures: run without --workers");
    }
    let live_listener = live_listener(args.metrics_listen)?;
    if args.workers > 1 {
        return workers::parent(
            &args,
            &scenario,
            &world,
            (&targets, &secret, &key, &run_id),
            &out,
            (server, &measured),
        );
    }
    let share = args.worker.as_deref().or(args.part.as_deref());
    let (scenario, users, is_worker) = match share {
        Some(spec) => {
            let (i, n) = workers::parse(spec)?;
            workers::check_split(&scenario, n)?;
            let users = world.users_of_worker(i, n);
            (
                workers::share(&scenario, users.len() as u32),
                users,
                args.worker.is_some(),
            )
        }
        None => (scenario, world.all_users(), false),
    };
    let start = match (is_worker, args.start_at) {
        (true, _) => Start::OnGo,
        (false, Some(unix_secs)) => {
            Start::At(std::time::UNIX_EPOCH + Duration::from_secs(unix_secs))
        }
        (false, None) => Start::Connected,
    };
    eprintln!(
        "chatproof-loadgen: scenario {} (seed {}): {} users x {} devices, {} conversations, {} msg/s for {} s after {} s of warm-up, {} drivers -> {urls}{}; open-file limit {}",
        scenario.name, scenario.seed, users.len(), scenario.population.devices_per_user, world.convs.len(),
        scenario.load.messages_per_sec, scenario.load.duration_secs, scenario.load.warmup_secs, scenario.load.drivers,
        share.map(|w| format!(" (part {w})")).unwrap_or_default(),
        report::open_files_limit().map_or("unknown".into(), |n| n.to_string()),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let here = InProcess {
        targets,
        key,
        run_id,
        measured,
        live_listener,
        is_worker,
        urls,
        host: format!("http://{}", addrs[0]),
        local_server: server.as_ref().map(|s| s.kind),
    };
    let summary = runtime.block_on(here.drive(scenario, (world, users, start), &args, &out))?;
    drop(server);
    // The report on standard output (for `| less`); progress went to standard error.
    println!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    eprintln!("report: {}", out.display());
    Ok(exit_status(&summary))
}

/// The exit status of a run with this summary: 0 pass, 3 invalid, 1 a target missed
/// or a contract violation.
pub fn exit_status(summary: &Summary) -> i32 {
    if summary.pass {
        0
    } else if !summary.valid {
        3
    } else {
        1
    }
}

/// The servers to load: a local one started here (without `--target`), or the targets;
/// with their `HOST:PORT`s and token secret.
fn servers(
    args: &RunArgs,
    scenario: &Scenario,
) -> anyhow::Result<(Option<LocalServer>, Vec<String>, String)> {
    if args.target.is_empty() {
        if !args.server_pids.is_empty() {
            bail!("--server-pid names servers given with --target; without --target the generator measures its own reference server");
        }
        let kind = if args.floor {
            floor_can_run(scenario)?;
            LocalKind::Floor
        } else {
            LocalKind::Reference
        };
        let secret = format!("loadgen-{:x}-{:x}", now_us(), std::process::id());
        let server = LocalServer::start(kind, &secret)?;
        let addr = server.addr.clone();
        return Ok((Some(server), vec![addr], secret));
    }
    let addrs = args
        .target
        .iter()
        .map(|t| {
            t.trim_start_matches("ws://")
                .trim_end_matches('/')
                .trim_end_matches("/v1/ws")
                .to_owned()
        })
        .collect();
    let secret = args.secret.clone().ok_or_else(|| {
        anyhow!("--target needs --secret (or CHATPROOF_SECRET): the target's token secret")
    })?;
    Ok((None, addrs, secret))
}

/// Binds `--metrics-listen`, when given, and says where it serves.
fn live_listener(
    addr: Option<std::net::SocketAddr>,
) -> anyhow::Result<Option<std::net::TcpListener>> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("--metrics-listen {addr}"))?;
    listener.set_nonblocking(true)?;
    eprintln!(
        "chatproof-loadgen: live metrics on http://{}/metrics",
        listener.local_addr()?
    );
    Ok(Some(listener))
}

/// Refuses a scenario the protocol floor cannot serve: it keeps no history (so devices
/// that go offline could not catch up) and stores no media.
fn floor_can_run(scenario: &Scenario) -> anyhow::Result<()> {
    if scenario.churn.is_some() {
        bail!("--floor: scenario {} has churn, and the floor keeps no history to catch devices up from", scenario.name);
    }
    if scenario.load.image_share > 0.0 {
        bail!(
            "--floor: scenario {} sends images, and the floor stores no media",
            scenario.name
        );
    }
    Ok(())
}

/// Resolves each `HOST:PORT` to the address devices connect to.
fn resolve_targets(addrs: &[String]) -> anyhow::Result<Vec<Target>> {
    addrs
        .iter()
        .map(|addr| {
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
            Ok(Target {
                url: format!("ws://{addr}/v1/ws"),
                addr: resolved,
            })
        })
        .collect()
}

/// What driving the run in this process needs beside the scenario.
struct InProcess {
    targets: Vec<Target>,
    key: TokenKey,
    run_id: String,
    /// Server processes whose CPU and memory the report shows.
    measured: Vec<u32>,
    live_listener: Option<std::net::TcpListener>,
    /// A worker of `--workers`: its parent created the conversations.
    is_worker: bool,
    /// The targets' URLs, as the report names them.
    urls: String,
    /// The first target as goose's `--host`.
    host: String,
    local_server: Option<LocalKind>,
}

impl InProcess {
    /// Drives the run here: setup, the goose users and the tasks beside them, the
    /// drain; writes the report into `out` and returns its summary.
    async fn drive(
        self,
        scenario: Scenario,
        (world, users, start): (World, Vec<u32>, Start),
        args: &RunArgs,
        out: &std::path::Path,
    ) -> anyhow::Result<Summary> {
        let started = Instant::now();
        if !self.is_worker {
            setup::create_conversations(&world, &users, &self.targets, &self.key).await?;
        }
        let usage_before = ProcUsage::of_all(&self.measured);
        let generator_before = ProcUsage::of(std::process::id());
        let drain = Duration::from_secs(scenario.load.drain_secs);
        let media = media_of(&scenario, self.targets[0].addr)?;
        let state = RunState::new(RunConfig::new(
            scenario,
            (world, users, start),
            self.targets,
            self.key,
            self.run_id,
            media,
        ));
        let progress = tokio::spawn(progress::progress(
            Arc::clone(&state),
            self.measured.clone(),
        ));
        let live = match self.live_listener {
            Some(listener) => Some(tokio::spawn(live::serve(
                tokio::net::TcpListener::from_std(listener)?,
                Arc::clone(&state),
            ))),
            None => None,
        };
        let churn = tokio::spawn(churn::churn(Arc::clone(&state)));
        let downloads = tokio::spawn(downloads::downloads(Arc::clone(&state)));
        let goose_report = out.join("goose.html");
        drive::run_goose(&state, &self.host, &goose_report.to_string_lossy()).await?;
        // Devices still offline when the schedule ends come back before the drain.
        let _ = churn.await;
        let (drain_waited, settled) = progress::settle(&state, drain).await;
        progress.abort();
        downloads.abort();
        if let Some(live) = live {
            live.abort();
        }
        let usage = usage_before.zip(ProcUsage::of_all(&self.measured));
        let connected = state.devices.lock().expect("devices").len() as u64;
        let generator = generator_before
            .zip(ProcUsage::of(std::process::id()))
            .map(|(before, after)| report::GeneratorUsage::of(before, after, connected));
        let (mut summary, histograms) = report::summarize_run(
            &state,
            (&self.urls, self.local_server),
            usage,
            generator,
            started.elapsed().as_secs_f64(),
        );
        summary.part.clone_from(&args.part);
        summary.drain_waited_secs = drain_waited.as_secs_f64();
        summary.settled = settled;
        report::evaluate(&mut summary);
        report::write(out, &summary, &histograms)?;
        for device in state.devices() {
            device.close().await;
        }
        Ok(summary)
    }
}

/// Media-mix scenarios: the images to send and the HTTP client for `target`.
fn media_of(
    scenario: &Scenario,
    target: std::net::SocketAddr,
) -> anyhow::Result<Option<(Arc<media::ImageSet>, Arc<media::MediaHttp>)>> {
    if scenario.load.image_share > 0.0 {
        let images = media::ImageSet::generate(&scenario.load.image_kib, scenario.seed)?;
        eprintln!(
            "media: {} image sizes, {:.0} KiB on average",
            scenario.load.image_kib.len(),
            images.mean_len() / 1024.0
        );
        Ok(Some((
            Arc::new(images),
            Arc::new(media::MediaHttp::new(target)),
        )))
    } else {
        Ok(None)
    }
}
