//! The command line: `run`, `replay`, `mutants`, `determinism`; one seed at a time
//! through [`run_one`], which never lets a panic escape.

use std::path::PathBuf;
use std::time::Instant;

use chatproof_server::mutants::{self, Mutant};
use clap::{Parser, Subcommand};

use crate::checker::{check, Finding, World};
use crate::cluster::{simulate, Outcome};
use crate::exit::Exit;
use crate::options::{FaultKind, Preset, SimOptions};

/// Set once standard output's reader went away (`| head` exited).
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes one line of results to standard output. When the reader has gone (a closed
/// pipe), output stops quietly and the run goes on, so the exit status still says the
/// verdict.
fn out_line(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}").and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
        } else {
            eprintln!("chatproof-sim: writing to standard output: {e}");
        }
    }
}

/// `println!` through [`out_line`].
macro_rules! say {
    ($($arg:tt)*) => { out_line(format_args!($($arg)*)) };
}

/// Deterministic fault simulator for chatproof.
#[derive(Debug, Parser)]
#[command(
    name = "chatproof-sim",
    version,
    after_help = "Output: results go to standard output: each failing seed's verdict, replay command and event trace (every seed's with --trace), `replay`'s options, trace and verdict, `mutants` and `determinism` verdicts, and the summary line, so `| head` and `| less` see them; progress (a line per seed, or a bar on a terminal) goes to standard error; `run --junit FILE` writes the JUnit XML report to FILE and each failing seed's picture next to it (<preset>-seed-<SEED>.html); `replay --html FILE` writes the seed's picture to FILE.\n\nExit status: 0 all seeds passed; 1 a delivery-contract violation; 2 no convergence by the liveness deadline; 3 a panic; 4 a usage error; 5 a mutant escaped (mutants); 6 a seed was not deterministic (determinism)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args, Clone)]
struct Common {
    /// Preset file (scenarios/sim/*.toml); default: the built-in smoke preset.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Only these fault kinds, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum)]
    faults: Option<Vec<FaultKind>>,
    /// Print the event trace of every seed (always printed for a failing seed).
    #[arg(long)]
    trace: bool,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a range of seeds: `--seeds 1..500` (end exclusive) or `--seeds 42`.
    Run {
        /// Seeds.
        #[arg(long, default_value = "1..11")]
        seeds: String,
        #[command(flatten)]
        common: Common,
        /// Write a JUnit XML report (one test case per seed); each failing seed's picture
        /// (as `replay --html`) goes next to it, as `<preset>-seed-<SEED>.html`.
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Run one seed again, printing its options, event trace and verdict on standard output.
    Replay {
        /// The seed.
        seed: u64,
        #[command(flatten)]
        common: Common,
        /// Switch on a mutant (as `mutants` does).
        #[arg(long)]
        mutant: Option<String>,
        /// Also draw the run as an HTML page into FILE: a swimlane per server and
        /// device, fault windows shaded, every violation marked where it showed.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
    },
    /// Switch on each built-in bug and require the checker to catch it within `--seeds-max` seeds.
    Mutants {
        /// Most seeds tried per mutant.
        #[arg(long, default_value_t = 20)]
        seeds_max: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Spread a large seed range over `--jobs` processes (each a `run` of a contiguous
    /// share) and print one summary with every failing seed's verdict and replay command.
    Swarm {
        /// Seeds: `A..B` (end exclusive).
        #[arg(long)]
        seeds: String,
        /// Processes at once (default: the machine's cores).
        #[arg(long)]
        jobs: Option<usize>,
        #[command(flatten)]
        common: Common,
        /// Keep each process's JUnit report (`swarm-<I>.xml`), log and failing seeds'
        /// pictures in this directory.
        #[arg(long, value_name = "DIR")]
        junit_dir: Option<PathBuf>,
    },
    /// Run the seed once, in this process, and print its history's fingerprint
    /// (`determinism` runs it so, in a fresh process per run).
    #[command(hide = true)]
    Fingerprint {
        /// The seed.
        seed: u64,
        #[command(flatten)]
        common: Common,
    },
    /// Run each seed twice, each in a process of its own as its replay command runs
    /// it, and require identical histories (and madsim's own draw-log check).
    Determinism {
        /// Seeds.
        #[arg(long, default_value = "1..4")]
        seeds: String,
        #[command(flatten)]
        common: Common,
    },
}

static CHECK_OPTIONS: std::sync::Mutex<Option<SimOptions>> = std::sync::Mutex::new(None);

/// How one seed ended.
pub enum Verdict {
    /// Everything held.
    Pass,
    /// The checker found violations.
    Correctness(Vec<Finding>),
    /// No convergence by the deadline.
    Liveness(String),
    /// A panic.
    Crash(String),
}

impl Verdict {
    fn exit(&self) -> Exit {
        match self {
            Verdict::Pass => Exit::Pass,
            Verdict::Correctness(_) => Exit::Correctness,
            Verdict::Liveness(_) => Exit::Liveness,
            Verdict::Crash(_) => Exit::Crash,
        }
    }
}

/// The result of one seed.
pub struct SeedResult {
    /// The verdict.
    pub verdict: Verdict,
    /// The history (if the run finished).
    pub outcome: Option<Outcome>,
    /// Wall time, seconds.
    pub wall_secs: f64,
}

fn parse_seeds(text: &str) -> anyhow::Result<Vec<u64>> {
    if let Some((a, b)) = text.split_once("..") {
        let (a, b): (u64, u64) = (a.parse()?, b.parse()?);
        anyhow::ensure!(a < b, "empty seed range {text}");
        return Ok((a..b).collect());
    }
    Ok(vec![text.parse()?])
}

fn preset(common: &Common) -> anyhow::Result<Preset> {
    let mut preset = match &common.scenario {
        Some(path) => Preset::load(path)?,
        None => Preset::smoke(),
    };
    if let Some(only) = &common.faults {
        preset.faults = preset.faults.only(only);
    }
    Ok(preset)
}

/// Runs one seed in a fresh runtime.
pub fn run_one(opts: &SimOptions, mutant: Option<Mutant>) -> SeedResult {
    let started = Instant::now();
    mutants::set(mutant);
    let task = opts.clone();
    // A fresh thread per seed: thread-local state (such as std's hash seeds, drawn once
    // per thread from the simulator's generator) must not leak from one run into the next.
    let result = std::thread::spawn(move || {
        let runtime =
            madsim::runtime::Runtime::with_seed_and_config(task.seed, madsim::Config::default());
        runtime.block_on(simulate(task))
    })
    .join();
    mutants::set(None);
    let wall_secs = started.elapsed().as_secs_f64();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panic".into());
            return SeedResult {
                verdict: Verdict::Crash(msg),
                outcome: None,
                wall_secs,
            };
        }
    };
    let world = World {
        convs: &outcome.convs,
        devices_per_user: &opts.devices_per_user,
        latency_bound_ms: opts.latency_bound_ms,
        retention_ms: opts.retention_secs.map(|s| s * 1000),
    };
    let violations = check(&outcome.history, &world);
    let verdict = if !violations.is_empty() {
        Verdict::Correctness(violations)
    } else if !outcome.converged {
        Verdict::Liveness(outcome.liveness_detail.clone())
    } else {
        Verdict::Pass
    };
    SeedResult {
        verdict,
        outcome: Some(outcome),
        wall_secs,
    }
}

fn replay_command(common: &Common, seed: u64, mutant: Option<Mutant>) -> String {
    let mut cmd = format!("scripts/sim.sh replay {seed}");
    if let Some(s) = &common.scenario {
        cmd.push_str(&format!(" --scenario {}", s.display()));
    }
    if let Some(f) = &common.faults {
        let names: Vec<&str> = f.iter().map(|k| k.name()).collect();
        cmd.push_str(&format!(" --faults {}", names.join(",")));
    }
    if let Some(m) = mutant {
        cmd.push_str(&format!(" --mutant {}", m.name()));
    }
    cmd
}

fn describe(result: &SeedResult) -> String {
    match &result.verdict {
        Verdict::Pass => "pass".into(),
        Verdict::Correctness(findings) => describe_findings(findings),
        Verdict::Liveness(why) => format!("liveness: {why}"),
        Verdict::Crash(why) => format!("crash: {why}"),
    }
}

/// The count of every violation seen and the first example of each, so no
/// kind hides behind another's many examples.
fn describe_findings(findings: &[Finding]) -> String {
    let mut s = format!("{} violation(s):", findings.len());
    for violation in chatproof_contract::Violation::ALL {
        let mut of_kind = findings.iter().filter(|f| f.violation == violation);
        if let Some(first) = of_kind.next() {
            let count = 1 + of_kind.count();
            s.push_str(&format!("\n    {violation} ×{count}, first: {first}"));
        }
    }
    s
}

/// `swarm`: the seed range in contiguous shares, one `run` process per share (at most
/// `jobs` at once); their failing seeds and one summary on standard output.
fn swarm(
    seeds: &str,
    jobs: Option<usize>,
    common: &Common,
    junit_dir: Option<&std::path::Path>,
) -> anyhow::Result<Exit> {
    let all = parse_seeds(seeds)?;
    let jobs = jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .clamp(1, all.len());
    let preset = preset(common)?;
    let work = match junit_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            dir.to_owned()
        }
        None => std::env::temp_dir().join(format!("chatproof-sim-swarm-{}", std::process::id())),
    };
    std::fs::create_dir_all(&work)?;
    // Shares of the range, small enough that a slow share does not hold up the end.
    let share_len = all.len().div_ceil(jobs * 4).max(1);
    let shares: Vec<(u64, u64)> = all
        .chunks(share_len)
        .map(|c| (c[0], c[c.len() - 1] + 1))
        .collect();
    let exe = std::env::current_exe()?;
    let started = Instant::now();
    eprintln!(
        "chatproof-sim swarm: preset {} seeds {seeds} in {} shares over {jobs} processes",
        preset.name,
        shares.len()
    );
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: std::sync::Mutex<Vec<(usize, Exit, String)>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(a, b)) = shares.get(i) else { return };
                let mut command = std::process::Command::new(&exe);
                command.arg("run").arg("--seeds").arg(format!("{a}..{b}"));
                if let Some(s) = &common.scenario {
                    command.arg("--scenario").arg(s);
                }
                if let Some(f) = &common.faults {
                    let names: Vec<&str> = f.iter().map(|k| k.name()).collect();
                    command.arg("--faults").arg(names.join(","));
                }
                command
                    .arg("--junit")
                    .arg(work.join(format!("swarm-{i}.xml")));
                let log = std::fs::File::create(work.join(format!("swarm-{i}.log")));
                let output = match log {
                    Ok(log) => command.stderr(log).output(),
                    Err(e) => Err(e),
                };
                let (exit, stdout) = match output {
                    Ok(out) => (
                        Exit::from_code(out.status.code()),
                        String::from_utf8_lossy(&out.stdout).into_owned(),
                    ),
                    Err(e) => (
                        Exit::Crash,
                        format!("  FAIL seeds {a}..{b}: could not run: {e}\n"),
                    ),
                };
                eprintln!("  seeds {a}..{b}: {}", exit.meaning());
                results.lock().expect("results").push((i, exit, stdout));
            });
        }
    });
    let mut results = results.into_inner().expect("results");
    results.sort_by_key(|r| r.0);
    let worst = results.iter().map(|r| r.1).max().unwrap_or(Exit::Pass);
    let mut failed = 0;
    for (_, _, stdout) in &results {
        // Each failing seed: everything from its FAIL line up to its trace (which starts
        // with the options line at 0 ms) or the summary line; not the trace.
        let mut in_failure = false;
        for line in stdout.lines() {
            if line.starts_with("  FAIL seed") {
                failed += 1;
                in_failure = true;
            } else if is_trace_line(line) || line.starts_with("chatproof-sim: preset") {
                in_failure = false;
            }
            // Pictures in a temporary directory are gone once the swarm ends.
            let gone = junit_dir.is_none() && line.starts_with("  picture:");
            if in_failure && !gone {
                say!("{line}");
            }
        }
    }
    let wall = started.elapsed().as_secs_f64();
    say!(
        "chatproof-sim swarm: preset {} | {} seeds, {failed} failed | {wall:.1} s wall over {jobs} processes | {:.1} seeds/min | {}",
        preset.name,
        all.len(),
        all.len() as f64 / wall.max(1e-9) * 60.0,
        worst.meaning()
    );
    if junit_dir.is_none() {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(worst)
}

/// A line of a printed trace: `  ` then the simulated time right-aligned, then ` ms  `.
fn is_trace_line(line: &str) -> bool {
    let rest = line.trim_start();
    line.len() > rest.len()
        && rest
            .split_once(" ms  ")
            .is_some_and(|(t, _)| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
}

/// Writes the seed's picture (`swimlanes`) to `path`.
fn write_picture(
    path: &std::path::Path,
    opts: &SimOptions,
    result: &SeedResult,
    replay: &str,
) -> anyhow::Result<()> {
    let empty = crate::history::History::default();
    let (history, sim_ms) = result
        .outcome
        .as_ref()
        .map_or((&empty, 0), |o| (&o.history, o.sim_ms));
    let findings: &[Finding] = match &result.verdict {
        Verdict::Correctness(findings) => findings,
        _ => &[],
    };
    let page = crate::swimlanes::render(&crate::swimlanes::Picture {
        seed: opts.seed,
        options: opts.to_string(),
        replay: replay.to_owned(),
        verdict: describe(result),
        pass: matches!(result.verdict, Verdict::Pass),
        servers: opts.servers,
        history,
        findings,
        sim_ms,
    });
    std::fs::write(path, page).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// The seed's event trace, on standard output (where `| head` and `| less` see it).
fn print_trace(result: &SeedResult) {
    if let Some(o) = &result.outcome {
        for line in &o.history.trace {
            say!("  {line}");
        }
        if std::env::var_os("CHATPROOF_SIM_DUMP").is_some() {
            for a in &o.history.acked {
                say!(
                    "  ack {:?} {} {} seq {} at {} ms",
                    a.device,
                    a.conv,
                    a.message_id,
                    a.seq,
                    a.t_ms
                );
            }
            for r in &o.history.received {
                say!(
                    "  recv {:?} {} seq {} {} at {} ms",
                    r.device,
                    r.conv,
                    r.seq,
                    r.message_id,
                    r.t_ms
                );
            }
        }
    }
}

/// Entry point; returns the exit status.
pub fn main() -> Exit {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            // Colour only on a terminal: a log file or pipe gets plain text.
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let cli = Cli::parse();
    match execute(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chatproof-sim: {e:#}");
            Exit::Usage
        }
    }
}

fn execute(cli: Cli) -> anyhow::Result<Exit> {
    match cli.command {
        Cmd::Run {
            seeds,
            common,
            junit,
        } => {
            let preset = preset(&common)?;
            let seeds = parse_seeds(&seeds)?;
            let started = Instant::now();
            let (mut sim_ms, mut messages, mut worst) = (0u64, 0usize, Exit::Pass);
            let mut cases = Vec::new();
            // On a terminal, one progress line that updates in place; in logs, a line per seed.
            let progress_bar =
                std::io::IsTerminal::is_terminal(&std::io::stderr()) && !common.trace;
            for (i, &seed) in seeds.iter().enumerate() {
                let opts = SimOptions::derive(seed, &preset);
                if progress_bar {
                    let done = i as f64 / seeds.len() as f64;
                    let elapsed = started.elapsed().as_secs_f64();
                    let eta = if i > 0 { elapsed / done - elapsed } else { 0.0 };
                    let filled = (done * 30.0) as usize;
                    eprint!(
                        "\r[{}{}] {}/{} seeds, {} failed, {elapsed:.0} s, about {eta:.0} s left ",
                        "#".repeat(filled),
                        ".".repeat(30 - filled),
                        i,
                        seeds.len(),
                        cases
                            .iter()
                            .filter(|c: &&(u64, f64, Exit, String)| c.2 != Exit::Pass)
                            .count()
                    );
                } else {
                    eprintln!("[{}/{}] {opts}", i + 1, seeds.len());
                }
                let result = run_one(&opts, None);
                if let Some(o) = &result.outcome {
                    sim_ms += o.sim_ms;
                    messages += o.history.acked.len();
                }
                let code = result.verdict.exit();
                if code != Exit::Pass {
                    say!(
                        "  FAIL seed {seed}: {}\n  replay: {}",
                        describe(&result),
                        replay_command(&common, seed, None)
                    );
                    // The replay command runs the seed alone, in a fresh process; a
                    // seed can run differently after others in one process (see
                    // sim/README.md, Determinism), so say whether it reproduces.
                    match exit_alone(seed, &common) {
                        Ok(alone) if alone == code => {}
                        Ok(alone) => say!(
                            "  note: alone (its replay command) seed {seed} ends {:?}, not {code:?}: it ran differently after the seeds before it in this process; `run --seeds {}..{}` repeats the batch",
                            alone,
                            seeds[0],
                            seed + 1
                        ),
                        Err(e) => eprintln!("chatproof-sim: warning: replaying seed {seed} alone: {e:#}"),
                    }
                    if let Some(junit) = &junit {
                        let dir = junit.parent().unwrap_or(std::path::Path::new("."));
                        let path = dir.join(format!("{}-seed-{seed}.html", preset.name));
                        // A picture that cannot be written must not end the run.
                        match write_picture(
                            &path,
                            &opts,
                            &result,
                            &replay_command(&common, seed, None),
                        ) {
                            Ok(()) => say!("  picture: {}", path.display()),
                            Err(e) => eprintln!("chatproof-sim: warning: {e:#}"),
                        }
                    }
                    print_trace(&result);
                    worst = worst.max(code);
                } else if common.trace {
                    print_trace(&result);
                }
                cases.push((seed, result.wall_secs, code, describe(&result)));
            }
            if progress_bar {
                eprintln!();
            }
            let wall = started.elapsed().as_secs_f64();
            let failed = cases.iter().filter(|c| c.2 != Exit::Pass).count();
            say!(
                "chatproof-sim: preset {} | {} seeds, {failed} failed | {:.1} s simulated in {wall:.1} s wall (x{:.0}) | {:.1} seeds/min | {messages} acknowledged messages checked",
                preset.name,
                seeds.len(),
                sim_ms as f64 / 1000.0,
                sim_ms as f64 / 1000.0 / wall.max(1e-9),
                seeds.len() as f64 / wall.max(1e-9) * 60.0,
            );
            if let Some(path) = junit {
                std::fs::write(&path, junit_xml(&preset.name, &cases))?;
            }
            Ok(worst)
        }
        Cmd::Replay {
            seed,
            common,
            mutant,
            html,
        } => {
            let preset = preset(&common)?;
            let mutant = match mutant {
                Some(name) => Some(
                    Mutant::ALL
                        .into_iter()
                        .find(|m| m.name() == name)
                        .ok_or_else(|| anyhow::anyhow!("unknown mutant {name}"))?,
                ),
                None => None,
            };
            let mut opts = SimOptions::derive(seed, &preset);
            opts.mutant = mutant.map(|m| m.name().to_owned());
            say!("{opts}");
            let result = run_one(&opts, mutant);
            print_trace(&result);
            say!("seed {seed}: {}", describe(&result));
            if let Some(path) = html {
                write_picture(
                    &path,
                    &opts,
                    &result,
                    &replay_command(&common, seed, mutant),
                )?;
                eprintln!("picture: {}", path.display());
            }
            Ok(result.verdict.exit())
        }
        Cmd::Mutants { seeds_max, common } => {
            let preset = preset(&common)?;
            let mut escaped = 0;
            for mutant in Mutant::ALL {
                // A bug of the router path shows only with several servers.
                let needs_cluster = matches!(
                    mutant,
                    Mutant::DropPendingOnRouterLoss
                        | Mutant::RegistryIgnoresIncarnation
                        | Mutant::WatchesNotRestored
                );
                // A bug of the failed-commit path shows only when commits fail.
                let needs_disk_faults = matches!(
                    mutant,
                    Mutant::AckFailedCommit | Mutant::StayDownAfterIoError
                );
                let disk_faults = [FaultKind::DiskFull, FaultKind::DiskIo, FaultKind::PowerLoss];
                // A long-poll bug of resuming shows when poll responses are lost on
                // the way, which the router-outage preset's frequent cuts cause most.
                let needs_lost_polls = mutant == Mutant::PollResumesWhereItLeft;
                // An expiry bug shows only where entries expire within the run.
                let needs_retention = mutant == Mutant::ExpiryCutoffInSeconds;
                // A full-queue bug shows only where device queues fill.
                let needs_full_queues = mutant == Mutant::SlowConsumerLeftOpen;
                // A bug of reconnecting shows where devices come and go most.
                let needs_reconnects = mutant == Mutant::ReconnectForgetsReceipts;
                let preset = if needs_retention && preset.retention_secs.is_none() {
                    Preset::retention()
                } else if needs_full_queues && preset.limits.device_queue_len_max.is_none() {
                    Preset::small_limits()
                } else if needs_reconnects && preset.name != "reconnect-storm" {
                    Preset::reconnect_storm()
                } else if needs_lost_polls && preset.servers[1] <= 1 {
                    Preset::router_outage()
                } else if needs_cluster && preset.servers[1] <= 1 {
                    // Events lost to a router outage show most where conversations
                    // are quiet and the router fails often.
                    // The registry bugs show once their fault has happened, the
                    // rest only hide it: a restart that registers the crashed
                    // process's connections again, a router that loses every watch.
                    match mutant {
                        Mutant::DropPendingOnRouterLoss => Preset::router_outage(),
                        Mutant::RegistryIgnoresIncarnation => {
                            let mut p = Preset::cluster();
                            p.faults = p.faults.only(&[FaultKind::ServerCrash]);
                            p
                        }
                        Mutant::WatchesNotRestored => {
                            let mut p = Preset::cluster();
                            p.faults = p.faults.only(&[FaultKind::RouterCrash]);
                            p
                        }
                        _ => Preset::cluster(),
                    }
                } else if needs_disk_faults
                    && disk_faults.iter().all(|k| preset.faults.weight(*k) == 0)
                {
                    Preset::storage_faults()
                } else {
                    preset.clone()
                };
                let mut caught = None;
                for seed in 1..=seeds_max {
                    let mut opts = SimOptions::derive(seed, &preset);
                    opts.mutant = Some(mutant.name().to_owned());
                    let result = run_one(&opts, Some(mutant));
                    if result.verdict.exit() != Exit::Pass {
                        caught = Some((seed, describe(&result)));
                        break;
                    }
                }
                match caught {
                    Some((seed, how)) => {
                        let first = how.lines().nth(1).unwrap_or(&how).trim().to_owned();
                        say!(
                            "mutant {:<28} caught after {seed:>3} seed(s): {first}",
                            mutant.name()
                        );
                    }
                    None => {
                        escaped += 1;
                        say!("mutant {:<28} ESCAPED {seeds_max} seeds", mutant.name());
                    }
                }
            }
            Ok(if escaped > 0 {
                Exit::MutantEscaped
            } else {
                Exit::Pass
            })
        }
        Cmd::Swarm {
            seeds,
            jobs,
            common,
            junit_dir,
        } => swarm(&seeds, jobs, &common, junit_dir.as_deref()),
        Cmd::Determinism { seeds, common } => {
            let preset = preset(&common)?;
            let mut differing = 0;
            for seed in parse_seeds(&seeds)? {
                let opts = SimOptions::derive(seed, &preset);
                // Each run in a process of its own, as its replay command runs it: a
                // run inside a batch can differ from its replay (see sim/README.md,
                // "Determinism"), which is not what this checks.
                let fa = fingerprint_in_child(seed, &common)?;
                let fb = fingerprint_in_child(seed, &common)?;
                let same = fa.is_some() && fa == fb;
                // madsim's own check: every random draw, in order and at the same simulated time.
                *CHECK_OPTIONS.lock().expect("options") = Some(opts.clone());
                let draws_match = std::panic::catch_unwind(|| {
                    madsim::runtime::Runtime::check_determinism(
                        seed,
                        madsim::Config::default(),
                        || async {
                            let opts = CHECK_OPTIONS.lock().expect("options").clone().expect("set");
                            let _ = simulate(opts).await;
                        },
                    );
                })
                .is_ok();
                let same = same && draws_match;
                say!(
                    "seed {seed}: {} (history {fa:?} vs {fb:?}; madsim draw log {})",
                    if same { "deterministic" } else { "DIFFERENT" },
                    if draws_match { "identical" } else { "diverged" }
                );
                if !same {
                    say!(
                        "  compare the traces of two runs of {}",
                        replay_command(&common, seed, None)
                    );
                }
                differing += usize::from(!same);
            }
            Ok(if differing > 0 {
                Exit::Nondeterminism
            } else {
                Exit::Pass
            })
        }
        Cmd::Fingerprint { seed, common } => {
            let preset = preset(&common)?;
            let result = run_one(&SimOptions::derive(seed, &preset), None);
            match result.outcome {
                Some(outcome) => println!("{:x}", outcome.history.fingerprint()),
                None => println!("none"),
            }
            Ok(Exit::Pass)
        }
    }
}

/// `chatproof-sim SUBCOMMAND SEED` with `common`'s scenario and faults, for a fresh
/// process of this binary.
fn seed_in_child(
    subcommand: &str,
    seed: u64,
    common: &Common,
) -> anyhow::Result<std::process::Command> {
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg(subcommand).arg(seed.to_string());
    if let Some(path) = &common.scenario {
        cmd.arg("--scenario").arg(path);
    }
    if let Some(kinds) = &common.faults {
        let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
        cmd.arg("--faults").arg(names.join(","));
    }
    Ok(cmd)
}

/// How `seed` ends run alone in a fresh process of this binary, as its replay
/// command runs it.
fn exit_alone(seed: u64, common: &Common) -> anyhow::Result<Exit> {
    let status = seed_in_child("replay", seed, common)?
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    Ok(Exit::from_code(status.code()))
}

/// The history fingerprint of `seed` run in a fresh process of this binary (`None`
/// when the run did not finish).
fn fingerprint_in_child(seed: u64, common: &Common) -> anyhow::Result<Option<String>> {
    let out = seed_in_child("fingerprint", seed, common)?
        .stderr(std::process::Stdio::null())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "fingerprint of seed {seed} failed: {}",
        out.status
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok((text != "none").then_some(text))
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn junit_xml(preset: &str, cases: &[(u64, f64, Exit, String)]) -> String {
    let failures = cases.iter().filter(|c| c.2 != Exit::Pass).count();
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuite name=\"chatproof-sim.{}\" tests=\"{}\" failures=\"{failures}\">\n",
        xml_escape(preset),
        cases.len()
    );
    for (seed, wall, code, detail) in cases {
        xml.push_str(&format!(
            "  <testcase classname=\"chatproof-sim.{}\" name=\"seed-{seed}\" time=\"{wall:.3}\">",
            xml_escape(preset)
        ));
        if *code != Exit::Pass {
            xml.push_str(&format!(
                "<failure message=\"{}\">{}</failure>",
                xml_escape(&code.to_string()),
                xml_escape(detail)
            ));
        }
        xml.push_str("</testcase>\n");
    }
    xml.push_str("</testsuite>\n");
    xml
}
