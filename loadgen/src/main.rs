//! `chatproof-loadgen`: drives a scenario against a chat server speaking protocol v1,
//! checks every delivery, measures latency from the schedule, and writes a report.
//!
//! Exit status: 0 every target met; 1 a target missed or a contract violation;
//! 2 usage or setup error; 3 invalid run (the generator was the bottleneck or devices failed).

mod check;
mod device;
mod drive;
mod metrics;
mod plots;
mod reference;
mod report;
mod scenario;
mod setup;
mod world;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use chatproof_server::auth::TokenKey;
use clap::{Parser, Subcommand};

use crate::device::now_us;
use crate::drive::Run;
use crate::reference::ReferenceServer;
use crate::scenario::Scenario;
use crate::world::World;

/// Load generator for chatproof: open-model chat scenarios against any server speaking protocol v1.
#[derive(Debug, Parser)]
#[command(name = "chatproof-loadgen", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run a scenario (scenarios/load/*.toml) and write reports/<scenario>/<timestamp>/.
    Run(RunArgs),
    /// Serve the reference server in this process (what `run` starts without --target).
    #[command(hide = true)]
    ServeReference(chatproof_server::config::ServeArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The scenario file.
    scenario: PathBuf,
    /// Server to load, `ws://HOST:PORT`. Without it a reference server is started on embedded storage.
    #[arg(long)]
    target: Option<String>,
    /// The target's token secret (needed with --target).
    #[arg(long, env = "CHATPROOF_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Directory that receives `<scenario>/<timestamp>/`.
    #[arg(long, default_value = "reports")]
    out_dir: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.command {
        Cmd::ServeReference(args) => serve_reference(args),
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

fn serve_reference(args: chatproof_server::config::ServeArgs) -> i32 {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
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
    let (server, addr, secret) = match &args.target {
        Some(target) => {
            let addr = target
                .trim_start_matches("ws://")
                .trim_end_matches('/')
                .trim_end_matches("/v1/ws")
                .to_owned();
            let secret = args.secret.clone().ok_or_else(|| {
                anyhow!("--target needs --secret (or CHATPROOF_SECRET): the target's token secret")
            })?;
            (None, addr, secret)
        }
        None => {
            let secret = format!("loadgen-{:x}-{:x}", now_us(), std::process::id());
            let server = ReferenceServer::start(&secret)?;
            let addr = server.addr.clone();
            (Some(server), addr, secret)
        }
    };
    let key = TokenKey::new(secret.as_bytes()).map_err(|e| anyhow!(e))?;
    let run_id = format!("lg{:x}", now_us() / 1000 % 0xffff_ffff);
    let url = format!("ws://{addr}/v1/ws");
    let world = World::new(&scenario, &run_id);
    let out = args.out_dir.join(&scenario.name).join(timestamp());
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!(
        "chatproof-loadgen: scenario {} (seed {}): {} users x {} devices, {} conversations, {} msg/s for {} s, {} drivers -> {url}",
        scenario.name, scenario.seed, scenario.population.users, scenario.population.devices_per_user, world.convs.len(),
        scenario.load.messages_per_sec, scenario.load.duration_secs, scenario.load.drivers
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let summary = runtime.block_on(async {
        let started = Instant::now();
        setup::create_conversations(&world, &url, &key).await?;
        let drain = Duration::from_secs(scenario.load.drain_secs);
        let run = Run::install(scenario, world, url.clone(), key, run_id);
        let progress = tokio::spawn(progress(Arc::clone(&run)));
        let goose_report = out.join("goose.html");
        drive::run_goose(
            &run,
            &format!("http://{addr}"),
            &goose_report.to_string_lossy(),
        )
        .await?;
        settle(&run, drain).await;
        progress.abort();
        let (summary, histograms) = report::summarize_run(
            &run,
            &url,
            server.is_some(),
            started.elapsed().as_secs_f64(),
        );
        report::write(&out, &summary, &histograms)?;
        let devices = run.devices.lock().expect("devices").clone();
        for device in devices {
            device.close().await;
        }
        anyhow::Ok(summary)
    })?;
    drop(server);
    eprintln!(
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

/// Waits until no send is pending and deliveries stop arriving, at most `drain`.
async fn settle(run: &Run, drain: Duration) {
    let deadline = tokio::time::Instant::now() + drain;
    let mut last = u64::MAX;
    while tokio::time::Instant::now() < deadline {
        let devices = run.devices.lock().expect("devices").clone();
        let pending: usize = devices.iter().map(|d| d.pending()).sum();
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        if pending == 0 && received == last {
            return;
        }
        last = received;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Samples the timeline every second and prints a progress line every two.
async fn progress(run: Arc<Run>) {
    let started = Instant::now();
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut previous = metrics::latency_histogram();
    let mut sent_before = 0;
    loop {
        every.tick().await;
        let devices = run.devices.lock().expect("devices").clone();
        let connected = devices
            .iter()
            .filter(|d| d.state.lock().expect("state").connected)
            .count() as u64;
        let received: u64 = devices
            .iter()
            .map(|d| d.state.lock().expect("state").received)
            .sum();
        let total = run.merged_stats().delivery;
        let mut window = total.clone();
        window.subtract(&previous).expect("counts only grow");
        previous = total;
        let sent = run.sent.load(Ordering::Relaxed);
        let point = report::TimelinePoint {
            t_secs: started.elapsed().as_secs_f64(),
            devices_connected: connected,
            sent: sent - sent_before,
            delivered: window.len(),
            delivery_p99_ms: window.value_at_quantile(0.99) as f64 / 1000.0,
            delivery_p50_ms: window.value_at_quantile(0.50) as f64 / 1000.0,
        };
        sent_before = sent;
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
