//! `chatproof-loadgen`: drives a scenario against a chat server speaking protocol v1,
//! checks every delivery, measures latency from the schedule, and writes a report.
//!
//! Exit status: 0 every target met; 1 a target missed or a contract violation;
//! 2 usage or setup error; 3 invalid run (the generator was the bottleneck or devices failed).

mod capacity;
mod compare;
mod device;
mod drive;
mod floor;
mod html;
mod live;
mod local;
mod media;
mod merge;
mod metrics;
mod plan;
mod plots;
mod report;
mod scenario;
mod setup;
mod workers;
mod world;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use chatproof_server::auth::TokenKey;
use clap::{Parser, Subcommand};

use crate::device::now_us;
use crate::drive::Run;
use crate::local::{LocalKind, LocalServer, ProcUsage};
use crate::scenario::Scenario;
use crate::world::World;

/// mimalloc: the generator allocates a few small buffers per frame on two threads, where
/// glibc's allocator took about a tenth of its CPU (perf, 40,000 msgs/s on the floor).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for chatproof: open-model chat scenarios against any server speaking protocol v1.
#[derive(Debug, Parser)]
#[command(
    name = "chatproof-loadgen",
    version,
    after_help = "Output: `run` and `capacity` write a report folder (--out-dir, default reports/; inside it <scenario>/<timestamp>/ or <scenario>/capacity-<timestamp>/) with summary.json, report.md, report.html, the .hgrm files, histograms.json and goose.html, and print report.md on standard output when done; progress lines, warnings and the folder's path go to standard error. `compare` prints its table on standard output and writes compare.md and compare.html (--out, default the run's folder); `plan` prints on standard output; `merge` writes the folder given by --out.\n\nExit status of `run`: 0 every target met, 1 a target missed or a contract violation, 2 usage or setup error, 3 invalid run (the generator was the limit, or devices failed)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scenario (scenarios/load/*.toml) and write reports/<scenario>/<timestamp>/.
    Run(RunArgs),
    /// Find the highest offered rate at which the server meets the scenario's targets
    /// with a valid run: runs the scenario at doubling, then bisected rates, each with a
    /// warm-up, and writes reports/<scenario>/capacity-<timestamp>/ (summary.json with the
    /// curve and the knee, report.md, report.html, and each step's run folder).
    /// Exit status: 0 knee found, 1 no rate passed or a contract violation, 2 usage or
    /// setup error, 3 no step was valid (the generator was the limit at every rate).
    Capacity(capacity::CapacityArgs),
    /// Merge the runs of several generator processes or machines into one report.
    Merge {
        /// Run directories (each with summary.json and histograms.json).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Where the merged report goes.
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare a run with a baseline, figure by figure, regressions first: prints the
    /// table and writes compare.md and compare.html; exit 1 when a figure regressed.
    Compare {
        /// Baseline summary.json (or its run directory).
        baseline: PathBuf,
        /// Run summary.json (or its run directory).
        run: PathBuf,
        /// Where compare.md and compare.html go (default: the run's directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// How much worse (percent) a figure may be before it counts as a regression.
        #[arg(long, default_value_t = 10.0)]
        tolerance_pct: f64,
    },
    /// Size a fleet for a scenario's [design] point from a capacity search's knee (or one run's server figures).
    Plan {
        /// Scenario with a [design] table (e.g. scenarios/load/design-point.toml).
        scenario: PathBuf,
        /// summary.json of `capacity` (the figures at the server's knee), or of one `run`
        /// against the reference server (its server_usage; a warning says it is not a
        /// capacity).
        #[arg(long)]
        calibration: PathBuf,
        #[command(flatten)]
        hardware: plan::Hardware,
    },
    /// Serve the reference server in this process (what `run` starts without --target).
    #[command(hide = true)]
    ServeReference(Box<chatproof_server::config::ServeArgs>),
    /// Serve the protocol floor in this process (what `run --floor` starts).
    #[command(hide = true)]
    ServeFloor(floor::FloorArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct RunArgs {
    /// The scenario file.
    pub(crate) scenario: PathBuf,
    /// Server to load, `ws://HOST:PORT`. Without it a reference server is started on embedded
    /// storage. Repeat it (or separate with commas) to spread the devices over the servers
    /// of one cluster: user u's devices connect to the (u mod N)-th target.
    #[arg(long, value_delimiter = ',', conflicts_with = "floor")]
    pub(crate) target: Vec<String>,
    /// Load the protocol floor instead of the reference server: an in-memory relay that
    /// does the least any server of protocol v1 must do for this traffic (no storage, no
    /// history, no receipts or presence), started on loopback like the reference server.
    /// Its figures are what the generator reaches when the server costs almost nothing.
    /// Scenarios with churn or images need history or media and are refused.
    #[arg(long)]
    pub(crate) floor: bool,
    /// Process id of a target server on this machine (repeatable, or comma-separated): its
    /// CPU time and memory, summed over every id, are reported as the servers' usage.
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub(crate) server_pids: Vec<u32>,
    /// The target's token secret (needed with --target).
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    pub(crate) secret: Option<String>,
    /// Directory that receives `<scenario>/<timestamp>/`.
    #[arg(long, default_value = "reports")]
    pub(crate) out_dir: PathBuf,
    /// Serve the run's live figures (sent, acknowledged, deliveries, violations so far,
    /// latency percentiles, connected devices) in the Prometheus text format at
    /// `http://ADDR/metrics` while it runs (dashboards: docs/grafana/). One process
    /// only: not with --workers.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// Child processes that share the devices and the schedule (each process may hold
    /// only as many connections as its open-file limit allows); their runs are merged.
    #[arg(long, default_value_t = 1)]
    pub(crate) workers: u32,
    /// Run part I of N (`I/N`) of the scenario, for one of N generator machines: this
    /// process sets up and drives only its share of the users (whole groups) at its share
    /// of the rate. Give every part the same --start-at, then `merge` their run folders.
    #[arg(long, conflicts_with = "worker")]
    pub(crate) part: Option<String>,
    /// When the schedule starts: Unix time in seconds (e.g. `$(( $(date +%s) + 120 ))`).
    /// Devices connect first; the first send is due at this instant, so parts on several
    /// machines share one schedule (their clocks must agree, e.g. by NTP).
    #[arg(long)]
    pub(crate) start_at: Option<u64>,
    /// Internal: this process is worker I of N (`I/N`), started by a parent.
    #[arg(long, hide = true)]
    pub(crate) worker: Option<String>,
    /// Internal: the parent's run id.
    #[arg(long, hide = true)]
    pub(crate) run_id: Option<String>,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::ServeReference(args) => serve_reference(*args),
        Cmd::Capacity(args) => report_errors(capacity::run(&args)),
        Cmd::ServeFloor(args) => report_errors(floor::serve(&args).map(|()| 0)),
        Cmd::Merge { runs, out } => report_errors(merge::run(&runs, &out).map(|s| {
            eprintln!(
                "{}",
                std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
            );
            i32::from(!s.pass)
        })),
        Cmd::Compare {
            baseline,
            run,
            out,
            tolerance_pct,
        } => report_errors(compare_cmd(&baseline, &run, out.as_deref(), tolerance_pct)),
        Cmd::Plan {
            scenario,
            calibration,
            hardware,
        } => report_errors(plan_cmd(&scenario, &calibration, &hardware)),
        Cmd::Run(args) => match run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("chatproof-loadgen: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}

fn report_errors(result: anyhow::Result<i32>) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("chatproof-loadgen: {e:#}");
        2
    })
}

/// The text of `path`'s `summary.json` (`path` is the file or its folder), and the file.
fn summary_text(path: &std::path::Path) -> anyhow::Result<(PathBuf, String)> {
    let file = if path.is_dir() {
        path.join("summary.json")
    } else {
        path.to_owned()
    };
    let text =
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    Ok((file, text))
}

fn read_summary(path: &std::path::Path) -> anyhow::Result<report::Summary> {
    let (file, text) = summary_text(path)?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))
}

fn compare_cmd(
    baseline: &std::path::Path,
    run: &std::path::Path,
    out: Option<&std::path::Path>,
    tolerance_pct: f64,
) -> anyhow::Result<i32> {
    let (base, this) = (read_summary(baseline)?, read_summary(run)?);
    let rows = compare::compare(&base, &this, tolerance_pct);
    println!("{}", compare::table(&rows));
    let out = match out {
        Some(dir) => dir.to_owned(),
        None if run.is_dir() => run.to_owned(),
        None => run
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(|| PathBuf::from("."), std::path::Path::to_owned),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    std::fs::write(
        out.join("compare.md"),
        compare::markdown(&base, &this, &rows),
    )?;
    std::fs::write(out.join("compare.html"), compare::html(&base, &this, &rows))?;
    eprintln!("compare: {}", out.join("compare.html").display());
    Ok(i32::from(rows.iter().any(|r| r.regressed)))
}

fn plan_cmd(
    scenario: &std::path::Path,
    calibration: &std::path::Path,
    hardware: &plan::Hardware,
) -> anyhow::Result<i32> {
    let scenario = Scenario::load(scenario)?;
    let design = scenario
        .design
        .ok_or_else(|| anyhow!("{} has no [design] table", scenario.name))?;
    let (cal, source) = read_calibration(calibration)?;
    if let Some(warning) = source.warning() {
        eprintln!("chatproof-loadgen plan: warning: {warning}");
    }
    let fleet = plan::plan(&design, hardware, &cal);
    println!(
        "{}",
        plan::report(&design, hardware, (&cal, &source), &fleet)
    );
    Ok(0)
}

/// The calibration figures of `path`: a `capacity` summary (its knee) or a `run`
/// summary (its server usage, with a warning that it is not a capacity).
fn read_calibration(
    path: &std::path::Path,
) -> anyhow::Result<(plan::Calibration, plan::CalibrationSource)> {
    let (file, text) = summary_text(path)?;
    if let Ok(capacity) = serde_json::from_str::<capacity::CapacitySummary>(&text) {
        let search = &capacity.server;
        let knee = search
            .knee
            .as_ref()
            .ok_or_else(|| anyhow!("{}: the capacity search found no knee", file.display()))?;
        let (Some(us_per_delivery), Some(bytes)) = (
            knee.server_cpu_us_per_delivery,
            knee.server_bytes_per_connection,
        ) else {
            bail!("{}: the knee has no server figures: search without --target (or with --server-pid)", file.display());
        };
        let cal = plan::Calibration {
            bytes_per_connection: bytes.max(1.0),
            deliveries_per_core_sec: 1e6 / us_per_delivery,
        };
        let source = plan::CalibrationSource::Capacity {
            scenario: capacity.scenario.clone(),
            knee_per_sec: knee.offered_per_sec,
            bound: search.bound,
        };
        return Ok((cal, source));
    }
    let summary: report::Summary =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", file.display()))?;
    let usage = summary.server_usage.as_ref().ok_or_else(|| {
        anyhow!("the calibration run has no server_usage: run it without --target so the generator measures its reference server")
    })?;
    let cal = plan::Calibration {
        bytes_per_connection: usage.bytes_per_connection.max(1.0),
        deliveries_per_core_sec: usage.deliveries_per_cpu_sec,
    };
    let source = plan::CalibrationSource::Run {
        scenario: summary.scenario.clone(),
        offered_per_sec: summary.config.load.messages_per_sec,
    };
    Ok((cal, source))
}

fn serve_reference(args: chatproof_server::config::ServeArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only on a terminal: a log file or pipe gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(chatproof_server::launch::serve_embedded(
        &args,
        |addr| println!("listening on {addr}"),
        async {
            let _ = tokio::signal::ctrl_c().await;
        },
    ));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("reference server: {e}");
            2
        }
    }
}

fn timestamp() -> String {
    chrono::Utc::now().format("%Y%m%dT%H%M%SZ").to_string()
}

fn run(args: RunArgs) -> anyhow::Result<i32> {
    let scenario = Scenario::load(&args.scenario)?;
    let (server, addrs, secret) = if args.target.is_empty() {
        if !args.server_pids.is_empty() {
            bail!("--server-pid names servers given with --target; without --target the generator measures its own reference server");
        }
        let kind = if args.floor {
            floor_can_run(&scenario)?;
            LocalKind::Floor
        } else {
            LocalKind::Reference
        };
        let secret = format!("loadgen-{:x}-{:x}", now_us(), std::process::id());
        let server = LocalServer::start(kind, &secret)?;
        let addr = server.addr.clone();
        (Some(server), vec![addr], secret)
    } else {
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
        (None, addrs, secret)
    };
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
    let out = args.out_dir.join(&scenario.name).join(timestamp());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    if args.workers > 1 && args.metrics_listen.is_some() {
        anyhow::bail!("--metrics-listen serves one process's figures: run without --workers");
    }
    let live_listener = match args.metrics_listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("--metrics-listen {addr}"))?;
            listener.set_nonblocking(true)?;
            eprintln!(
                "chatproof-loadgen: live metrics on http://{}/metrics",
                listener.local_addr()?
            );
            Some(listener)
        }
        None => None,
    };
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
        (true, _) => drive::Start::OnGo,
        (false, Some(unix_secs)) => {
            drive::Start::At(std::time::UNIX_EPOCH + Duration::from_secs(unix_secs))
        }
        (false, None) => drive::Start::Connected,
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
    let summary = runtime.block_on(async {
        let started = Instant::now();
        if !is_worker {
            setup::create_conversations(&world, &users, &targets, &key).await?;
        }
        let usage_before = ProcUsage::of_all(&measured);
        let generator_before = ProcUsage::of(std::process::id());
        let drain = Duration::from_secs(scenario.load.drain_secs);
        let target = targets[0].addr;
        let media = if scenario.load.image_share > 0.0 {
            let images = media::ImageSet::generate(&scenario.load.image_kib, scenario.seed)?;
            eprintln!(
                "media: {} image sizes, {:.0} KiB on average",
                scenario.load.image_kib.len(),
                images.mean_len() / 1024.0
            );
            Some((Arc::new(images), Arc::new(media::MediaHttp::new(target))))
        } else {
            None
        };
        let run = Run::install(
            scenario,
            (world, users, start),
            targets.clone(),
            key,
            run_id,
            media,
        );
        let progress = tokio::spawn(progress(Arc::clone(&run), measured.clone()));
        let live = match live_listener {
            Some(listener) => Some(tokio::spawn(live::serve(
                tokio::net::TcpListener::from_std(listener)?,
                Arc::clone(&run),
            ))),
            None => None,
        };
        let churn = tokio::spawn(drive::churn(Arc::clone(&run)));
        let downloads = tokio::spawn(drive::downloads(Arc::clone(&run)));
        let goose_report = out.join("goose.html");
        drive::run_goose(
            &run,
            &format!("http://{}", addrs[0]),
            &goose_report.to_string_lossy(),
        )
        .await?;
        // Devices still offline when the schedule ends come back before the drain.
        let _ = churn.await;
        let (drain_waited, settled) = settle(&run, drain).await;
        progress.abort();
        downloads.abort();
        if let Some(live) = live {
            live.abort();
        }
        let usage_after = ProcUsage::of_all(&measured);
        let usage = usage_before.zip(usage_after);
        let connected = run.devices.lock().expect("devices").len() as u64;
        let generator = generator_before
            .zip(ProcUsage::of(std::process::id()))
            .map(|(before, after)| report::GeneratorUsage::of(before, after, connected));
        let (mut summary, histograms) = report::summarize_run(
            &run,
            (&urls, server.as_ref().map(|s| s.kind)),
            usage,
            generator,
            started.elapsed().as_secs_f64(),
        );
        summary.part.clone_from(&args.part);
        summary.drain_waited_secs = drain_waited.as_secs_f64();
        summary.settled = settled;
        report::evaluate(&mut summary);
        report::write(&out, &summary, &histograms)?;
        let devices = run.devices.lock().expect("devices").clone();
        for device in devices {
            device.close().await;
        }
        anyhow::Ok(summary)
    })?;
    drop(server);
    // The report on standard output (for `| less`); progress went to standard error.
    println!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    eprintln!("report: {}", out.display());
    Ok(if summary.pass {
        0
    } else if !summary.valid {
        3
    } else {
        1
    })
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
fn resolve_targets(addrs: &[String]) -> anyhow::Result<Vec<device::Target>> {
    addrs
        .iter()
        .map(|addr| {
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr.as_str())
                .with_context(|| format!("resolving {addr}"))?
                .next()
                .ok_or_else(|| anyhow!("{addr} resolves to no address"))?;
            Ok(device::Target {
                url: format!("ws://{addr}/v1/ws"),
                addr: resolved,
            })
        })
        .collect()
}

/// Longest wait past the scenario's `drain_secs` while deliveries keep arriving.
const DRAIN_EXTENSION_MAX: Duration = Duration::from_secs(30);

/// Waits until no send is pending and deliveries stop arriving, at most `drain`; past
/// `drain`, waits on while deliveries still arrive, at most [`DRAIN_EXTENSION_MAX`] more.
/// Returns how long it waited and whether deliveries had stopped arriving (when they had
/// not, a delivery still missing may be late rather than lost).
async fn settle(run: &Run, drain: Duration) -> (Duration, bool) {
    let started = tokio::time::Instant::now();
    let (soft, hard) = (started + drain, started + drain + DRAIN_EXTENSION_MAX);
    let mut last = u64::MAX;
    loop {
        let devices = run.devices.lock().expect("devices").clone();
        let pending: usize = devices.iter().map(|d| d.pending()).sum();
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        let quiet = received == last;
        let now = tokio::time::Instant::now();
        if quiet && (pending == 0 || now >= soft) {
            return (started.elapsed(), true);
        }
        if now >= hard {
            return (started.elapsed(), false);
        }
        last = received;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Samples the timeline every second (with the CPU and memory of the server
/// processes `server_pids`, when readable) and prints a progress line every two.
async fn progress(run: Arc<Run>, server_pids: Vec<u32>) {
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut previous = metrics::latency_histogram();
    let (mut sent_before, mut offered_before, mut acked_before) = (0, 0, 0);
    let mut server_before = ProcUsage::of_all(&server_pids).map(|u| (Instant::now(), u));
    loop {
        every.tick().await;
        let server_now = ProcUsage::of_all(&server_pids).map(|u| (Instant::now(), u));
        let server_cpu_percent = match (server_before, server_now) {
            (Some((t0, u0)), Some((t1, u1))) if t1 > t0 => {
                Some(100.0 * (u1.cpu_secs - u0.cpu_secs).max(0.0) / (t1 - t0).as_secs_f64())
            }
            _ => None,
        };
        server_before = server_now;
        let devices = run.devices.lock().expect("devices").clone();
        let connected = devices
            .iter()
            .filter(|d| d.state.lock().expect("state").connected)
            .count() as u64;
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        let total = run.delivery_so_far();
        let mut window = total.clone();
        window.subtract(&previous).expect("counts only grow");
        previous = total;
        let sent = run.sent.load(Ordering::Relaxed);
        let offered = run.scheduled.load(Ordering::Relaxed);
        let acked = run.acked_so_far();
        let point = report::TimelinePoint {
            t_secs: started.elapsed().as_secs_f64(),
            devices_connected: connected,
            sent: sent - sent_before,
            delivered: window.len(),
            delivery_p99_ms: window.value_at_quantile(0.99) as f64 / 1000.0,
            delivery_p50_ms: window.value_at_quantile(0.50) as f64 / 1000.0,
            delivery_max_ms: window.max() as f64 / 1000.0,
            offered: offered.saturating_sub(offered_before),
            acked: acked.saturating_sub(acked_before),
            server_cpu_percent,
            server_rss_kib: server_now.map(|(_, u)| u.rss_kib),
        };
        (sent_before, offered_before, acked_before) = (sent, offered, acked);
        let seconds = run.timeline.lock().expect("timeline").len();
        if seconds.is_multiple_of(2) {
            eprintln!(
                "[{:>5.1}s] devices {connected} | sent {sent} / due {} | received {received} | delivery p99 {:.1} ms",
                point.t_secs,
                run.scheduled.load(Ordering::Relaxed),
                point.delivery_p99_ms
            );
        }
        run.timeline.lock().expect("timeline").push(point);
    }
}
