//! `--workers N`: one command drives more connections than one process may open.
//! The parent creates the conversations, starts N copies of itself, each driving whole
//! groups of users (so each checks its deliveries completely), says "go" to all of them
//! at once when every one has connected, and merges their reports losslessly.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, ensure, Context};
use chatproof_server::auth::TokenKey;

use crate::device::Target;
use crate::local::{LocalServer, ProcUsage};
use crate::run::RunArgs;
use crate::scenario::Scenario;
use crate::world::World;

/// Parses `I/N`.
pub fn parse(spec: &str) -> anyhow::Result<(u32, u32)> {
    let (i, n) = spec
        .split_once('/')
        .ok_or_else(|| anyhow!("--worker wants I/N, got {spec:?}"))?;
    let (i, n): (u32, u32) = (i.parse()?, n.parse()?);
    ensure!(i < n, "worker {i} of {n}");
    Ok((i, n))
}

/// Checks that `scenario` splits into `n` shares of whole groups (and so of whole 1:1
/// pairs), so that each share checks its deliveries completely.
pub fn check_split(scenario: &Scenario, n: u32) -> anyhow::Result<()> {
    ensure!(
        scenario.population.group_size.is_multiple_of(2)
            && n <= scenario.population.users / scenario.population.group_size,
        "--workers and --part need an even group_size and at least one whole group per share"
    );
    Ok(())
}

/// The scenario as one worker runs it: its share of the rate and drivers.
pub fn share(scenario: &Scenario, users: u32) -> Scenario {
    let mut s = scenario.clone();
    let fraction = f64::from(users) / f64::from(scenario.population.users);
    s.load.messages_per_sec = (scenario.load.messages_per_sec * fraction).max(0.001);
    s.load.drivers =
        ((f64::from(scenario.load.drivers) * fraction).round() as u32).clamp(1, users.max(1));
    s
}

/// Runs the parent: setup, children, one schedule, merge. Returns the exit status.
pub fn parent(
    args: &RunArgs,
    scenario: &Scenario,
    world: &World,
    (targets, secret, key, run_id): (&[Target], &str, &TokenKey, &str),
    out: &Path,
    (server, measured): (Option<LocalServer>, &[u32]),
) -> anyhow::Result<i32> {
    let n = args.workers;
    // With --part p/P, worker i drives share p + P*i of P*n: a split of the part's groups.
    let (part, parts) = match &args.part {
        Some(spec) => parse(spec)?,
        None => (0, 1),
    };
    check_split(scenario, n * parts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(crate::setup::create_conversations(
        world,
        &world.users_of_worker(part, parts),
        targets,
        key,
    ))?;
    let usage_before = ProcUsage::of_all(measured);
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..n {
        let child = Command::new(&exe)
            .arg("run")
            .arg(&args.scenario)
            .args(
                targets
                    .iter()
                    .flat_map(|t| ["--target".to_owned(), t.url.clone()]),
            )
            .args(["--worker", &format!("{}/{}", part + parts * i, parts * n)])
            .args(["--run-id", run_id])
            .arg("--out-dir")
            .arg(out.join("workers").join(i.to_string()))
            .env("CHATPROOF_SECRET", secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        children.push(child);
    }
    // Wait until every worker has connected its devices, then start them together.
    for (i, child) in children.iter_mut().enumerate() {
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.trim() == "ready" => break,
                Some(Ok(_)) => continue,
                _ => bail!("worker {i} stopped before it was ready"),
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
    }
    if let Some(at) = args.start_at {
        crate::run::state::wait_until(std::time::UNIX_EPOCH + std::time::Duration::from_secs(at));
    }
    for child in &mut children {
        let stdin = child.stdin.as_mut().context("worker stdin")?;
        writeln!(stdin, "go")?;
    }
    for (i, child) in children.iter_mut().enumerate() {
        let status = child.wait()?;
        ensure!(
            matches!(status.code(), Some(0 | 1 | 3)),
            "worker {i} failed ({status})"
        );
    }
    let usage_after = ProcUsage::of_all(measured);
    let dirs = (0..n)
        .map(|i| {
            let base = out.join("workers").join(i.to_string()).join(&scenario.name);
            let mut runs: Vec<_> = std::fs::read_dir(&base)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            runs.sort();
            runs.pop()
                .ok_or_else(|| anyhow!("worker {i} wrote no report under {}", base.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let runs = dirs
        .iter()
        .map(|d| crate::merge::read_run(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (mut summary, histograms) = crate::merge::merge(runs)?;
    summary.config = scenario.clone();
    summary.part.clone_from(&args.part);
    summary.local_server = server.as_ref().map(|s| s.kind);
    summary.reference_server = summary.local_server == Some(crate::local::LocalKind::Reference);
    if let Some((before, after)) = usage_before.zip(usage_after) {
        summary.server_usage = Some(crate::report::server_usage(&summary, before, after));
    }
    crate::report::evaluate(&mut summary);
    crate::report::write(out, &summary, &histograms)?;
    drop(server);
    // As for one process: the report on standard output, the folder on standard error.
    println!(
        "{}",
        std::fs::read_to_string(out.join("report.md")).unwrap_or_default()
    );
    eprintln!(
        "report: {} (worker runs in {})",
        out.display(),
        out.join("workers").display()
    );
    Ok(crate::run::exit_status(&summary))
}
