//! `chatproof-loadgen`: drives a scenario against a chat server speaking protocol v1,
//! checks every delivery, measures latency from the schedule, and writes a report.
//! This file declares the command line; each subcommand lives in its module.
//!
//! Exit status: 0 every target met; 1 a target missed or a contract violation;
//! 2 usage or setup error; 3 invalid run (the generator was the bottleneck or devices failed).

mod acked;
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
mod wire;
mod workers;
mod world;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
        Cmd::Run(args) => report_errors(run::command(args)),
        Cmd::Capacity(args) => report_errors(capacity::run(&args)),
        Cmd::Merge { runs, out } => report_errors(merge::command(&runs, &out)),
        Cmd::Compare {
            baseline,
            run,
            out,
            tolerance_pct,
        } => report_errors(compare::command(
            &baseline,
            &run,
            out.as_deref(),
            tolerance_pct,
        )),
        Cmd::Plan {
            scenario,
            calibration,
            hardware,
        } => report_errors(plan::command(&scenario, &calibration, &hardware)),
        Cmd::ServeReference(args) => local::serve_reference(&args),
        Cmd::ServeFloor(args) => report_errors(floor::serve(&args).map(|()| 0)),
    };
    std::process::exit(code);
}

/// The exit status of a subcommand: its own, or 2 (usage or setup error) after
/// printing the error.
fn report_errors(result: anyhow::Result<i32>) -> i32 {
    result.unwrap_or_else(|e| {
        eprintln!("chatproof-loadgen: {e:#}");
        2
    })
}
