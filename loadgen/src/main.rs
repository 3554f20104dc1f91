//! `chatproof-loadgen`: drives a scenario against a chat server speaking protocol v1,
//! checks every delivery, measures latency from the schedule, and writes a report.
//!
//! Exit status: 0 every target met; 1 a target missed or a contract violation;
//! 2 usage or setup error; 3 invalid run (the generator was the bottleneck or devices failed).

mod capacity;
mod compare;
mod device;
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
mod run;
mod scenario;
mod setup;
mod workers;
mod world;

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};

use crate::scenario::Scenario;

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
    Run(run::RunArgs),
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
        Cmd::Run(args) => report_errors(run::command(args)),
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
