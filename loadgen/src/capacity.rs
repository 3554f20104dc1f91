//! `capacity`: finds the highest offered rate at which a server meets a scenario's
//! targets with a valid run. Each step is a complete `run` of the scenario at one rate
//! (a child process, so every step starts a fresh server when the generator starts its
//! own), with a warm-up that is not judged. The rate doubles from the scenario's own
//! until a step fails, then bisects between the last pass and the first failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::local::LocalKind;
use crate::metrics::Measure;
use crate::report::Summary;
use crate::scenario::Scenario;

/// Options of `capacity`.
#[derive(Debug, clap::Args)]
pub struct CapacityArgs {
    /// The scenario file; its `messages_per_sec` is the first rate tried.
    pub scenario: PathBuf,
    /// Server to load, `ws://HOST:PORT` (repeatable, as for `run`). Without it each step
    /// starts a fresh reference server on embedded storage.
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// The target's token secret (needed with --target).
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Process ids of the target servers (as for `run`): their CPU and memory per step.
    #[arg(long = "server-pid", value_delimiter = ',')]
    pub server_pids: Vec<u32>,
    /// Search the protocol floor too, in the same command, and report the server's knee
    /// as a ratio of the floor's.
    #[arg(long)]
    pub floor: bool,
    /// Steps per search at most (each is a full run of the scenario).
    #[arg(long, default_value_t = 8)]
    pub max_steps: u32,
    /// Stop bisecting once the failing rate is within this many percent of the passing one.
    #[arg(long, default_value_t = 10.0)]
    pub precision_pct: f64,
    /// Never offer more than this many messages per second.
    #[arg(long, default_value_t = 1_000_000.0)]
    pub max_rate: f64,
    /// Directory that receives `<scenario>/capacity-<timestamp>/`.
    #[arg(long, default_value = "reports")]
    pub out_dir: PathBuf,
}

/// How one step ended, from its run's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepVerdict {
    /// Every target met, nothing violated, the run valid.
    Pass,
    /// A latency target missed.
    Miss,
    /// A contract violation: the search stops, whatever the rate.
    Violation,
    /// The generator was the bottleneck, or devices failed: the rate says nothing about
    /// the server.
    Invalid,
}

/// One step of a search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// Offered messages per second.
    pub offered_per_sec: f64,
    /// How it ended.
    pub verdict: StepVerdict,
    /// Acknowledged messages per second over the schedule.
    pub acked_per_sec: f64,
    /// Deliveries per second over the schedule.
    pub delivered_per_sec: f64,
    /// Judged delivery latency, ms.
    pub delivery_p50_ms: f64,
    /// See `delivery_p50_ms`.
    pub delivery_p99_ms: f64,
    /// Judged send → ack p99, ms.
    pub ack_p99_ms: f64,
    /// Server CPU per acknowledged message, µs (when the server's usage was measured).
    pub server_cpu_us_per_message: Option<f64>,
    /// Server CPU per delivery, µs.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Server cores busy on average over the run.
    pub server_cores: Option<f64>,
    /// Server memory per connected device, bytes.
    pub server_bytes_per_connection: Option<f64>,
    /// Generator CPU per acknowledged message, µs.
    pub generator_cpu_us_per_message: Option<f64>,
    /// The step's run folder.
    pub run: PathBuf,
}

/// Why the search ended where it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// A step above the knee missed a target: the knee is the server's.
    Server,
    /// A step above the knee was invalid: the generator ran out first, so the server's
    /// capacity is at least the knee.
    Generator,
    /// `--max-rate` or `--max-steps` ended the search while every step passed.
    SearchLimit,
    /// Not even the lowest rate tried passed.
    NonePassed,
    /// A contract violation ended the search.
    Violation,
}

/// One capacity search.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Search {
    /// What was loaded.
    pub server: String,
    /// Every step, in the order run.
    pub steps: Vec<Step>,
    /// The highest passing step (none: no step passed).
    pub knee: Option<Step>,
    /// Why the search ended there.
    pub bound: Bound,
}

/// `summary.json` of `capacity`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapacitySummary {
    /// Scenario name.
    pub scenario: String,
    /// The server's search.
    pub server: Search,
    /// The floor's search (`--floor`).
    pub floor: Option<Search>,
    /// The server's knee over the floor's (offered messages per second).
    pub knee_ratio_to_floor: Option<f64>,
    /// True when the server's knee exists and no step violated the contract.
    pub pass: bool,
}

/// Runs the search(es), writes the report, returns the exit status (as for `run`: 0
/// a knee was found and nothing was violated; 1 a violation or no passing rate; 3 no
/// step was valid).
pub fn run(args: &CapacityArgs) -> anyhow::Result<i32> {
    let scenario = Scenario::load(&args.scenario)?;
    if scenario.load.messages_per_sec <= 0.0 {
        bail!("{}: messages_per_sec must be positive", scenario.name);
    }
    let out = args
        .out_dir
        .join(&scenario.name)
        .join(format!("capacity-{}", crate::report::timestamp()));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let server_label = if args.target.is_empty() {
        LocalKind::Reference.label().to_owned()
    } else {
        args.target.join(",")
    };
    let server = search(args, &scenario, &out.join("server"), None, server_label)?;
    let floor = if args.floor {
        Some(search(
            args,
            &scenario,
            &out.join("floor"),
            Some(LocalKind::Floor),
            LocalKind::Floor.label().to_owned(),
        )?)
    } else {
        None
    };
    let knee_ratio_to_floor = match (&server.knee, floor.as_ref().and_then(|f| f.knee.as_ref())) {
        (Some(s), Some(f)) => Some(s.offered_per_sec / f.offered_per_sec),
        _ => None,
    };
    let violated = |s: &Search| s.bound == Bound::Violation;
    let summary = CapacitySummary {
        scenario: scenario.name.clone(),
        pass: server.knee.is_some() && !violated(&server) && !floor.as_ref().is_some_and(violated),
        server,
        floor,
        knee_ratio_to_floor,
    };
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    let md = markdown(&summary);
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(out.join("report.html"), html(&summary))?;
    println!("{md}");
    eprintln!("report: {}", out.display());
    let all_invalid = summary
        .server
        .steps
        .iter()
        .all(|s| s.verdict == StepVerdict::Invalid);
    Ok(if summary.pass {
        0
    } else if all_invalid {
        3
    } else {
        1
    })
}

/// Doubles, then bisects; `local` is the server to start (none: the reference server,
/// or `--target`).
fn search(
    args: &CapacityArgs,
    scenario: &Scenario,
    dir: &Path,
    local: Option<LocalKind>,
    label: String,
) -> anyhow::Result<Search> {
    let mut steps: Vec<Step> = Vec::new();
    let mut pass: Option<f64> = None;
    let mut fail: Option<(f64, StepVerdict)> = None;
    let mut rate = scenario.load.messages_per_sec.min(args.max_rate);
    let mut bound = Bound::SearchLimit;
    for n in 0..args.max_steps {
        eprintln!("capacity ({label}): step {} at {rate:.0} msgs/s", n + 1);
        let step = step(
            args,
            scenario,
            &dir.join(format!("step-{:02}", n + 1)),
            local,
            rate,
        )?;
        eprintln!(
            "capacity ({label}): {rate:.0} msgs/s -> {:?}, delivery p99 {:.1} ms",
            step.verdict, step.delivery_p99_ms
        );
        let verdict = step.verdict;
        steps.push(step);
        match verdict {
            StepVerdict::Violation => {
                bound = Bound::Violation;
                break;
            }
            StepVerdict::Pass => pass = Some(pass.map_or(rate, |p: f64| p.max(rate))),
            StepVerdict::Miss | StepVerdict::Invalid => {
                if fail.is_none_or(|(f, _)| rate < f) {
                    fail = Some((rate, verdict));
                }
            }
        }
        rate = match (pass, fail) {
            (Some(p), None) if p >= args.max_rate => break,
            (Some(p), None) => (p * 2.0).min(args.max_rate),
            (None, Some((f, _))) => f / 2.0,
            (Some(p), Some((f, _))) => {
                if (f - p) / p * 100.0 <= args.precision_pct {
                    break;
                }
                (p + f) / 2.0
            }
            (None, None) => unreachable!("a step either passed or failed"),
        };
        if rate < 1.0 {
            break;
        }
    }
    let knee = pass.and_then(|p| {
        steps
            .iter()
            .find(|s| s.verdict == StepVerdict::Pass && s.offered_per_sec == p)
            .cloned()
    });
    if bound != Bound::Violation {
        bound = match (knee.is_some(), fail) {
            (false, _) => Bound::NonePassed,
            (true, Some((_, StepVerdict::Invalid))) => Bound::Generator,
            (true, Some(_)) => Bound::Server,
            (true, None) => Bound::SearchLimit,
        };
    }
    Ok(Search {
        server: label,
        steps,
        knee,
        bound,
    })
}

/// One full run at `rate`, in a child process.
fn step(
    args: &CapacityArgs,
    scenario: &Scenario,
    dir: &Path,
    local: Option<LocalKind>,
    rate: f64,
) -> anyhow::Result<Step> {
    std::fs::create_dir_all(dir)?;
    let mut at_rate = scenario.clone();
    at_rate.load.messages_per_sec = rate;
    let file = dir.join("scenario.toml");
    std::fs::write(&file, toml::to_string(&at_rate)?)?;
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut command = Command::new(exe);
    command.arg("run").arg(&file).arg("--out-dir").arg(dir);
    match local {
        Some(LocalKind::Floor) => {
            command.arg("--floor");
        }
        Some(LocalKind::Reference) | None => {
            if !args.target.is_empty() {
                command.arg("--target").arg(args.target.join(","));
            }
            if let Some(secret) = &args.secret {
                command.env("CHATPROOF_SECRET", secret);
            }
            if !args.server_pids.is_empty() {
                let pids: Vec<String> = args.server_pids.iter().map(u32::to_string).collect();
                command.arg("--server-pid").arg(pids.join(","));
            }
        }
    }
    // The step's progress and report go to its log, not between the search's lines.
    let log = std::fs::File::create(dir.join("run.log"))?;
    let output = command
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("running a step")?;
    let verdict = match output.code() {
        Some(0) => StepVerdict::Pass,
        Some(3) => StepVerdict::Invalid,
        Some(1) => StepVerdict::Miss,
        other => bail!(
            "a step at {rate:.0} msgs/s failed to run (exit status {other:?}); its files are in {}",
            dir.display()
        ),
    };
    let run_dir = std::fs::read_dir(dir.join(&scenario.name))
        .with_context(|| format!("the step at {rate:.0} msgs/s wrote no report"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
        .context("the step's run folder")?;
    let summary: Summary =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json"))?)?;
    // Deliveries missing from an unsettled run may be late, not lost (the run is then
    // invalid); every other kind of violation stands.
    let lost = summary
        .violations
        .count(chatproof_contract::Violation::Lost);
    let violated = summary.violations.total() > lost || (lost > 0 && summary.settled);
    Ok(Step::of(
        rate,
        if violated {
            StepVerdict::Violation
        } else {
            verdict
        },
        &summary,
        run_dir,
    ))
}

impl Step {
    fn of(rate: f64, verdict: StepVerdict, s: &Summary, run: PathBuf) -> Self {
        let secs = s.config.load.schedule_secs().max(1) as f64;
        let acked = s.counts.acked as f64;
        let delivered = s.counts.deliveries_received as f64;
        let per = |cpu: f64, n: f64| (n > 0.0).then(|| cpu * 1e6 / n);
        let server = s.server_usage.as_ref();
        Self {
            offered_per_sec: rate,
            verdict,
            acked_per_sec: acked / secs,
            delivered_per_sec: delivered / secs,
            delivery_p50_ms: s.latency[Measure::Delivery].p50_ms,
            delivery_p99_ms: s.latency[Measure::Delivery].p99_ms,
            ack_p99_ms: s.latency[Measure::SendAck].p99_ms,
            server_cpu_us_per_message: server.and_then(|u| per(u.cpu_secs, acked)),
            server_cpu_us_per_delivery: server.and_then(|u| per(u.cpu_secs, delivered)),
            server_cores: server.map(|u| u.cpu_secs / s.wall_secs.max(1e-9)),
            server_bytes_per_connection: server.map(|u| u.bytes_per_connection),
            generator_cpu_us_per_message: s
                .generator_usage
                .as_ref()
                .and_then(|g| per(g.cpu_secs, acked)),
            run,
        }
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn search_markdown(md: &mut String, title: &str, s: &Search) {
    md.push_str(&format!("\n## {title}: {}\n\n", s.server));
    match &s.knee {
        Some(k) => md.push_str(&format!(
            "Knee: **{:.0} msgs/s** offered ({:.0} deliveries/s), delivery p99 {:.1} ms; server CPU {} µs per message, {} µs per delivery; bounded by: {}.\n\n",
            k.offered_per_sec,
            k.delivered_per_sec,
            k.delivery_p99_ms,
            opt(k.server_cpu_us_per_message, 1),
            opt(k.server_cpu_us_per_delivery, 2),
            bound_text(s.bound),
        )),
        None => md.push_str(&format!("No rate passed; bounded by: {}.\n\n", bound_text(s.bound))),
    }
    md.push_str("| offered msgs/s | verdict | acked/s | deliveries/s | delivery p50 ms | delivery p99 ms | ack p99 ms | server cores | server µs/msg | generator µs/msg |\n|---|---|---|---|---|---|---|---|---|---|\n");
    for st in &s.steps {
        md.push_str(&format!(
            "| {:.0} | {:?} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} |\n",
            st.offered_per_sec,
            st.verdict,
            st.acked_per_sec,
            st.delivered_per_sec,
            st.delivery_p50_ms,
            st.delivery_p99_ms,
            st.ack_p99_ms,
            opt(st.server_cores, 2),
            opt(st.server_cpu_us_per_message, 1),
            opt(st.generator_cpu_us_per_message, 1),
        ));
    }
}

fn bound_text(b: Bound) -> &'static str {
    match b {
        Bound::Server => "the server (the next step missed a target)",
        Bound::Generator => {
            "the generator (the next step was invalid: the server's capacity is at least this)"
        }
        Bound::SearchLimit => "the search limits (--max-rate or --max-steps; every step passed)",
        Bound::NonePassed => "no passing rate",
        Bound::Violation => "a contract violation (see the step's report)",
    }
}

fn markdown(s: &CapacitySummary) -> String {
    let mut md = format!(
        "# Capacity `{}`: {}\n",
        s.scenario,
        if s.pass { "knee found" } else { "FAIL" }
    );
    search_markdown(&mut md, "Server", &s.server);
    if let Some(f) = &s.floor {
        search_markdown(&mut md, "Protocol floor", f);
    }
    if let Some(r) = s.knee_ratio_to_floor {
        md.push_str(&format!(
            "\nThe server's knee is **{:.2}** of the floor's.\n",
            r
        ));
    }
    md
}

/// The capacity report page: verdict, each search's knee and steps, and the curves.
fn html(s: &CapacitySummary) -> String {
    use crate::html::{Cell, Page, Verdict};
    let mut page = Page::new(&format!("Capacity {}", s.scenario));
    let headline = match &s.server.knee {
        Some(k) => format!(
            "{}: knee at {} msgs/s offered, delivery p99 {:.1} ms; bounded by {}",
            s.server.server,
            crate::html::figure(k.offered_per_sec.round(), 0),
            k.delivery_p99_ms,
            bound_text(s.server.bound)
        ),
        None => format!("{}: no rate passed", s.server.server),
    };
    let mut reasons = Vec::new();
    if let Some(r) = s.knee_ratio_to_floor {
        reasons.push(format!(
            "the server's knee is {r:.2} of the protocol floor's"
        ));
    }
    let verdict = if s.pass { Verdict::Pass } else { Verdict::Fail };
    page.banner(verdict, &headline, &reasons);
    for (title, search) in
        std::iter::once(("Server", &s.server)).chain(s.floor.iter().map(|f| ("Protocol floor", f)))
    {
        page.heading(&format!("{title}: {}", search.server));
        let rows: Vec<Vec<Cell>> = search
            .steps
            .iter()
            .map(|st| {
                let opt =
                    |v: Option<f64>, d: usize| v.map_or(Cell::text("—"), |v| Cell::Num(v, d));
                vec![
                    Cell::Num(st.offered_per_sec.round(), 0),
                    Cell::text(format!("{:?}", st.verdict)),
                    Cell::Num(st.acked_per_sec.round(), 0),
                    Cell::Num(st.delivered_per_sec.round(), 0),
                    Cell::Num(st.delivery_p50_ms, 2),
                    Cell::Num(st.delivery_p99_ms, 2),
                    Cell::Num(st.ack_p99_ms, 2),
                    opt(st.server_cores, 2),
                    opt(st.server_cpu_us_per_message, 1),
                    opt(st.generator_cpu_us_per_message, 1),
                ]
            })
            .collect();
        page.table(
            &format!("steps-{}", title.to_lowercase().replace(' ', "-")),
            &[
                "offered msgs/s",
                "verdict",
                "acked/s",
                "deliveries/s",
                "delivery p50 ms",
                "delivery p99 ms",
                "ack p99 ms",
                "server cores",
                "server µs/msg",
                "generator µs/msg",
            ],
            &rows,
        );
        let mut points: Vec<&Step> = search
            .steps
            .iter()
            .filter(|st| st.verdict != StepVerdict::Invalid)
            .collect();
        points.sort_by(|a, b| a.offered_per_sec.total_cmp(&b.offered_per_sec));
        let latency: Vec<(f64, f64, f64)> = points
            .iter()
            .map(|st| (st.offered_per_sec, st.delivery_p50_ms, st.delivery_p99_ms))
            .collect();
        page.chart(
            "capacity-latency",
            &crate::plots::capacity_curve(
                &format!("{}: delivery latency by offered rate", search.server),
                &latency,
            ),
            "Delivery latency (p50, p99) at each valid step, against the offered rate.",
        );
        let cores: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|st| st.server_cores.map(|c| (st.offered_per_sec, 100.0 * c)))
            .collect();
        if !cores.is_empty() {
            page.chart(
                "capacity-cpu",
                &crate::plots::capacity_cpu(
                    &format!("{}: CPU by offered rate", search.server),
                    &cores,
                ),
                "Server CPU at each valid step, percent of one core.",
            );
        }
    }
    page.finish()
}
