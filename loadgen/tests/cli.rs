//! The load generator end to end: a tiny scenario against the reference server it starts.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

mod browser;

fn scenario(dir: &Path, name: &str, delivery_p99_ms: f64) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "# A tiny test scenario.\nname = \"{name}\"\n[population]\nusers = 6\ndevices_per_user = 2\ngroup_size = 3\n\
         [load]\nwarmup_secs = 0\nduration_secs = 2\nmessages_per_sec = 30\ngroup_share = 0.5\ndrivers = 3\ndrain_secs = 3\n\
         [slo]\ndelivery_p99_ms = {delivery_p99_ms}\nack_p99_ms = 1000\ngenerator_lag_p99_ms = 1000\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn run(scenario: &Path, out: &Path) -> (i32, Option<PathBuf>) {
    let status = Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
        .arg("run")
        .arg(scenario)
        .arg("--out-dir")
        .arg(out)
        .status()
        .unwrap();
    let name = scenario.file_stem().unwrap();
    let report = std::fs::read_dir(out.join(name))
        .ok()
        .and_then(|mut d| d.next())
        .map(|e| e.unwrap().path());
    (status.code().unwrap(), report)
}

fn loadgen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
        .args(args)
        .output()
        .unwrap()
}

/// Writes scenario `text` (named `name`), runs it with `extra` flags, and returns the
/// temporary directory (keep it alive), the exit status and the report directory.
fn run_text(
    name: &str,
    text: &str,
    extra: &[&str],
) -> (tempfile::TempDir, std::process::ExitStatus, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let out = tmp.path().join("reports");
    let mut args = vec![
        "run",
        path.to_str().unwrap(),
        "--out-dir",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let status = loadgen(&args).status;
    (tmp, status, only_run(&out.join(name)))
}

/// The one run folder (`<timestamp>/`) under a scenario's report folder.
fn only_run(scenario_reports: &Path) -> PathBuf {
    std::fs::read_dir(scenario_reports)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap()
}

/// A healthy run passes with every delivery checked and every report file written; an
/// unmeetable target makes the exit status 1; a broken scenario file gives 2.
#[test]
fn tiny_scenario_reports_and_gates() {
    let tmp = tempfile::tempdir().unwrap();
    let (code, report) = run(
        &scenario(tmp.path(), "tiny", 500.0),
        &tmp.path().join("reports"),
    );
    let report = report.expect("a report directory");
    let s = summary(&report);
    assert_eq!(code, 0, "{s:#}");
    for file in [
        "summary.json",
        "report.md",
        "delivery.hgrm",
        "send_ack.hgrm",
        "connect.hgrm",
        "goose.html",
    ] {
        assert!(report.join(file).is_file(), "{file} missing");
    }
    // report.html is a page of its own: verdict, tables, a chart each; only the
    // latency histograms that recorded something get a row; counts are integers.
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("data-verdict=\"PASS\""), "verdict banner");
    for table in ["targets", "latency", "counts", "usage", "contract"] {
        assert!(
            html.contains(&format!("data-table=\"{table}\"")),
            "table {table}"
        );
    }
    let latency = html.split("data-table=\"latency\"").nth(1).unwrap();
    let latency = latency.split("</table>").next().unwrap();
    let recorded = s["latency"]
        .as_object()
        .unwrap()
        .values()
        .filter(|l| l["count"].as_u64().unwrap() > 0)
        .count();
    assert_eq!(latency.matches("<tr>").count(), 1 + recorded, "{latency}");
    assert!(
        !latency.contains("<td class=\"n\">0</td><td class=\"n\">0.000"),
        "{latency}"
    );
    assert!(html.contains("<td>messages acknowledged</td><td class=\"n\">60</td>"));
    for chart in [
        "percentile-spectrum",
        "latency-over-time",
        "messages-over-time",
        "deliveries-over-time",
        "devices-over-time",
        "server-cpu",
        "server-memory",
    ] {
        let at = html
            .find(&format!("data-chart=\"{chart}\""))
            .unwrap_or_else(|| panic!("chart {chart} missing"));
        assert!(
            html[at..].starts_with(&format!("data-chart=\"{chart}\"><svg")),
            "{chart} is an SVG"
        );
    }
    assert!(!html.contains("<pre>"), "no Markdown shown as text");
    browser::assert_page_shows(
        &report.join("report.html"),
        &["targets", "latency", "counts", "usage", "contract"],
        &[
            "percentile-spectrum",
            "latency-over-time",
            "messages-over-time",
            "server-cpu",
        ],
    );

    let c = &s["counts"];
    assert_eq!(c["scheduled"], 60);
    assert_eq!(c["acked"], 60);
    assert_eq!(c["devices_connected"], 12);
    assert!(
        c["deliveries_expected"].as_u64().unwrap() >= 60 * 4,
        "each message reaches at least 2 users x 2 devices"
    );
    assert_eq!(c["deliveries_received"], c["deliveries_expected"]);
    assert_eq!(s["violations"]["lost"], 0);
    assert_eq!(s["pass"], true);
    assert_eq!(s["latency"]["delivery"]["count"], c["deliveries_expected"]);
    assert!(
        s["server_usage"]["deliveries_per_cpu_sec"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // merge: two copies of the run add up exactly; compare: a run against itself is no regression.
    let merged = tmp.path().join("merged");
    let (r, m) = (report.to_str().unwrap(), merged.to_str().unwrap());
    let out = loadgen(&["merge", r, r, "--out", m]);
    assert_eq!(out.status.code(), Some(0));
    let ms = summary(&merged);
    assert_eq!(ms["counts"]["acked"], 120);
    let count = |x: &Value| x["latency"]["delivery"]["count"].as_u64().unwrap();
    assert_eq!(count(&ms), count(&s) * 2);
    assert_eq!(
        ms["latency"]["delivery"]["p99_ms"],
        s["latency"]["delivery"]["p99_ms"]
    );
    let out = loadgen(&["compare", r, m]);
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{table}");
    assert!(table.contains("| delivery p99 (ms) |"));
    // compare.md and compare.html land in the run's folder (here the merged one).
    assert!(merged.join("compare.md").is_file());
    let page = std::fs::read_to_string(merged.join("compare.html")).unwrap();
    assert!(page.contains("data-verdict=\"PASS\""), "{page}");
    assert!(page.contains("<td>delivery p99 (ms)</td>"), "{page}");
    browser::assert_page_shows(&merged.join("compare.html"), &["compare"], &[]);
    // A run compared with a far better baseline regresses, and the regressions come first.
    let mut better: Value = summary(&report);
    better["latency"]["delivery"]["p99_ms"] = 0.001.into();
    better["latency"]["delivery"]["p50_ms"] = 0.001.into();
    let better_dir = tmp.path().join("better");
    std::fs::create_dir_all(&better_dir).unwrap();
    std::fs::write(better_dir.join("summary.json"), better.to_string()).unwrap();
    let out = loadgen(&[
        "compare",
        better_dir.to_str().unwrap(),
        r,
        "--out",
        better_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "a regression exits 1");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let first_rows: Vec<&str> = table.lines().skip(2).take(2).collect();
    assert!(
        first_rows.iter().all(|l| l.contains("**regressed**")),
        "{table}"
    );
    let page = std::fs::read_to_string(better_dir.join("compare.html")).unwrap();
    assert!(page.contains("data-verdict=\"FAIL\""), "{page}");

    // plan: the design point sized from this run's server figures.
    let design = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/load/design-point.toml"
    );
    let calibration = report.join("summary.json");
    let out = loadgen(&[
        "plan",
        design,
        "--calibration",
        calibration.to_str().unwrap(),
    ]);
    let plan = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        plan.contains("10000000 connections") && plan.contains("**chat servers**"),
        "{plan}"
    );

    let (code, report) = run(
        &scenario(tmp.path(), "impossible", 0.001),
        &tmp.path().join("reports"),
    );
    let s = summary(&report.unwrap());
    assert_eq!(code, 1, "a missed target fails the run: {s:#}");
    assert_eq!(s["pass"], false);
    assert_eq!(s["slo"][0]["pass"], false);

    let broken = tmp.path().join("broken.toml");
    std::fs::write(&broken, "name = \"broken\"\n[population]\nusers = 3\n").unwrap();
    assert_eq!(run(&broken, &tmp.path().join("reports")).0, 2);

    // The generator reports its own memory; --server-pid is for servers given with --target.
    assert_eq!(s["generator_usage"]["processes"], 1, "{s:#}");
    assert!(s["generator_usage"]["rss_connected_kib"].as_u64().unwrap() > 0);
    let tiny = scenario(tmp.path(), "tiny", 500.0);
    let out = loadgen(&["run", tiny.to_str().unwrap(), "--server-pid", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server-pid"));
}

/// `--workers 2`: two processes share the devices and one schedule; the merged report
/// counts every device and message once and checks every delivery.
#[test]
fn workers_share_one_schedule() {
    let text = "# Even groups so that workers own whole groups.\nname = \"pairs\"\n[population]\nusers = 8\ndevices_per_user = 2\ngroup_size = 2\n\
                [load]\nwarmup_secs = 0\nduration_secs = 2\nmessages_per_sec = 40\ngroup_share = 0.5\ndrivers = 4\ndrain_secs = 3\n[slo]\ngenerator_lag_p99_ms = 1000\n";
    let (_tmp, status, report) = run_text("pairs", text, &["--workers", "2"]);
    let s = summary(&report);
    assert_eq!(status.code(), Some(0), "{s:#}");
    assert_eq!(s["counts"]["devices_planned"], 16);
    assert_eq!(s["counts"]["devices_connected"], 16);
    assert_eq!(s["counts"]["acked"], 80);
    assert_eq!(
        s["counts"]["deliveries_received"],
        s["counts"]["deliveries_expected"]
    );
    assert!(report.join("workers").join("0").is_dir() && report.join("workers").join("1").is_dir());
}

/// Churn: devices drop and come back presenting their cursors; they catch up with
/// nothing lost, and what waited for them is reported apart from online delivery.
#[test]
fn churned_devices_catch_up_without_loss() {
    let text = "# Devices drop and return.\nname = \"churn\"\n[population]\nusers = 12\ndevices_per_user = 2\ngroup_size = 4\n\
                [load]\nwarmup_secs = 0\nduration_secs = 5\nmessages_per_sec = 40\ngroup_share = 0.5\ndrivers = 3\ndrain_secs = 3\n\
                [slo]\ngenerator_lag_p99_ms = 1000\n[churn]\nshare = 0.5\nat_secs = 1\noffline_secs = 2\n";
    let (_tmp, status, report) = run_text("churn", text, &[]);
    let s = summary(&report);
    assert_eq!(status.code(), Some(0), "{s:#}");
    let returned = s["latency"]["reconnect"]["count"].as_u64().unwrap();
    assert!(returned > 0, "some devices went offline and came back");
    assert!(
        s["latency"]["delivery_caught_up"]["count"]
            .as_u64()
            .unwrap()
            > 0,
        "a backlog waited for them"
    );
    assert_eq!(s["counts"]["reconnect_failures"], 0);
    assert_eq!(
        s["counts"]["deliveries_received"],
        s["counts"]["deliveries_expected"]
    );
    assert_eq!(s["violations"]["lost"], 0);
    assert_eq!(s["violations"]["gap"], 0);
    assert_eq!(s["violations"]["duplicate"], 0);
}

/// Starts the reference server (`serve-reference`) with `secret` on a free loopback port;
/// returns the child and its `HOST:PORT`.
fn reference_server(data: &Path, secret: &str) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
        .args(["serve-reference", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("CHATPROOF_SECRET", secret)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    (child, addr)
}

/// Two parts of one scenario, as two generator machines would run them: each sets up and
/// drives its own share against the same server, both start their schedules at the same
/// --start-at, and `merge` makes one report of them. Parts whose schedules started far
/// apart make the merged run invalid, and a part merged twice is refused.
#[test]
fn parts_share_a_schedule_and_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "parts-test-secret-0123456789";
    let (mut server, addr) = reference_server(&tmp.path().join("data"), secret);
    let scenario = tmp.path().join("parts.toml");
    std::fs::write(
        &scenario,
        "name = \"parts\"\n[population]\nusers = 8\ndevices_per_user = 1\ngroup_size = 2\n\
         [load]\nwarmup_secs = 0\nduration_secs = 2\nmessages_per_sec = 40\ngroup_share = 0.5\ndrivers = 4\ndrain_secs = 3\n\
         [slo]\ngenerator_lag_p99_ms = 1000\n",
    )
    .unwrap();
    let start_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 6;
    let parts: Vec<_> = (0..2)
        .map(|i| {
            let out = tmp.path().join(format!("part{i}"));
            let child = Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
                .arg("run")
                .arg(&scenario)
                .args([
                    "--target",
                    &format!("ws://{addr}"),
                    "--part",
                    &format!("{i}/2"),
                ])
                .args(["--start-at", &start_at.to_string(), "--out-dir"])
                .arg(&out)
                .env("CHATPROOF_SECRET", secret)
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    let mut dirs = Vec::new();
    for (mut child, out) in parts {
        assert_eq!(child.wait().unwrap().code(), Some(0));
        let dir = only_run(&out.join("parts"));
        let s = summary(&dir);
        assert_eq!(s["counts"]["devices_connected"], 4, "{s:#}");
        let started = s["schedule_start_unix_ms"].as_u64().unwrap();
        assert!(
            started >= start_at * 1000,
            "started at {started}, before --start-at"
        );
        dirs.push(dir);
    }
    let merged = tmp.path().join("merged");
    let d: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let out = loadgen(&["merge", d[0], d[1], "--out", merged.to_str().unwrap()]);
    let s = summary(&merged);
    assert_eq!(out.status.code(), Some(0), "{s:#}");
    assert_eq!(s["part"], "0/2,1/2");
    assert_eq!(s["counts"]["devices_connected"], 8);
    assert_eq!(s["counts"]["acked"], 80);
    assert_eq!(
        s["counts"]["deliveries_received"],
        s["counts"]["deliveries_expected"]
    );
    assert!(
        s["schedule_start_spread_ms"].as_f64().unwrap() < 1000.0,
        "{s:#}"
    );

    // The same part twice is refused.
    let out = loadgen(&[
        "merge",
        d[0],
        d[0],
        "--out",
        tmp.path().join("twice").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("merged twice"));

    // A part whose schedule started 3 s later did not share the schedule.
    let late = tmp.path().join("late");
    std::fs::create_dir(&late).unwrap();
    std::fs::copy(
        dirs[1].join("histograms.json"),
        late.join("histograms.json"),
    )
    .unwrap();
    let mut s1 = summary(&dirs[1]);
    s1["schedule_start_unix_ms"] = (s1["schedule_start_unix_ms"].as_u64().unwrap() + 3000).into();
    std::fs::write(late.join("summary.json"), s1.to_string()).unwrap();
    let out = loadgen(&[
        "merge",
        d[0],
        late.to_str().unwrap(),
        "--out",
        tmp.path().join("skewed").to_str().unwrap(),
    ]);
    let s = summary(&tmp.path().join("skewed"));
    assert_eq!(out.status.code(), Some(1), "{s:#}");
    assert_eq!(s["valid"], false);
    assert!(
        s["invalid_reasons"]
            .to_string()
            .contains("did not share one schedule"),
        "{s:#}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

/// `--floor` loads the protocol floor in place of the reference server: the same checks
/// pass against it, the report names it, and a scenario it cannot serve is refused.
#[test]
fn the_floor_stands_in_for_the_reference_server() {
    let text = "# On the floor.\nname = \"floor\"\n[population]\nusers = 8\ndevices_per_user = 2\ngroup_size = 4\n\
                [load]\nwarmup_secs = 0\nduration_secs = 2\nmessages_per_sec = 40\ngroup_share = 0.5\ndrivers = 2\ndrain_secs = 3\n[slo]\ngenerator_lag_p99_ms = 1000\n";
    let (_tmp, status, report) = run_text("floor", text, &["--floor"]);
    let s = summary(&report);
    assert_eq!(status.code(), Some(0), "{s:#}");
    assert_eq!(s["local_server"], "floor");
    assert_eq!(s["reference_server"], false);
    assert_eq!(s["counts"]["acked"], 80);
    assert_eq!(
        s["counts"]["deliveries_received"],
        s["counts"]["deliveries_expected"]
    );
    for kind in ["lost", "duplicate", "reorder", "gap", "phantom"] {
        assert_eq!(s["violations"][kind], 0, "{kind}: {s:#}");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("protocol floor"), "{md}");

    let tmp = tempfile::tempdir().unwrap();
    let churn = tmp.path().join("churn.toml");
    std::fs::write(
        &churn,
        format!("{text}[churn]\nshare = 0.5\nat_secs = 1\noffline_secs = 1\n"),
    )
    .unwrap();
    let refused = loadgen(&[
        "run",
        churn.to_str().unwrap(),
        "--floor",
        "--out-dir",
        tmp.path().to_str().unwrap(),
    ]);
    assert_eq!(refused.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("churn") && stderr.contains("history"),
        "{stderr}"
    );
}

/// `warmup_secs`: traffic runs before the measured period at the same rate, its
/// latencies are reported apart, and every message is still held to the contract.
#[test]
fn warm_up_is_reported_apart_and_still_checked() {
    let text = "# With a warm-up.\nname = \"warm\"\n[population]\nusers = 6\ndevices_per_user = 1\ngroup_size = 3\n\
                [load]\nwarmup_secs = 1\nduration_secs = 2\nmessages_per_sec = 30\ngroup_share = 0.5\ndrivers = 2\ndrain_secs = 3\n[slo]\ngenerator_lag_p99_ms = 1000\n";
    let (_tmp, status, report) = run_text("warm", text, &[]);
    let s = summary(&report);
    assert_eq!(status.code(), Some(0), "{s:#}");
    // 3 s of schedule at 30/s, warm-up included.
    assert_eq!(s["counts"]["acked"], 90);
    assert_eq!(
        s["counts"]["deliveries_received"],
        s["counts"]["deliveries_expected"]
    );
    let warm_acks = s["latency"]["send_ack_warmup"]["count"].as_u64().unwrap();
    let judged_acks = s["latency"]["send_ack"]["count"].as_u64().unwrap();
    assert_eq!(warm_acks + judged_acks, 90);
    // The driver's phase shifts a send or two across the boundary.
    assert!(
        (25..=35).contains(&warm_acks),
        "{warm_acks} of 90 acks in the 1 s warm-up"
    );
    assert!(s["latency"]["delivery_warmup"]["count"].as_u64().unwrap() > 0);
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("during warm-up (not judged)"), "{md}");
    assert!(
        !md.contains("image upload"),
        "unused histograms are left out: {md}"
    );
}

/// `capacity` runs the scenario at doubling rates (here every step passes, so the search
/// limit ends it), against the reference server and, with `--floor`, the floor, and
/// writes the curve, the knee and the ratio between the two.
#[test]
fn capacity_steps_the_rate_and_finds_the_knee() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cap.toml");
    std::fs::write(
        &path,
        "# Capacity.\nname = \"cap\"\n[population]\nusers = 6\ndevices_per_user = 1\ngroup_size = 3\n\
         [load]\nwarmup_secs = 1\nduration_secs = 1\nmessages_per_sec = 20\ngroup_share = 0.5\ndrivers = 2\ndrain_secs = 2\n\
         [slo]\ndelivery_p99_ms = 2000\nack_p99_ms = 2000\ngenerator_lag_p99_ms = 1000\n",
    )
    .unwrap();
    let out = tmp.path().join("reports");
    let done = loadgen(&[
        "capacity",
        path.to_str().unwrap(),
        "--floor",
        "--max-steps",
        "2",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let dir = only_run(&out.join("cap"));
    let s = summary(&dir);
    for search in ["server", "floor"] {
        let steps = s[search]["steps"].as_array().unwrap();
        let rates: Vec<f64> = steps
            .iter()
            .map(|st| st["offered_per_sec"].as_f64().unwrap())
            .collect();
        assert_eq!(rates, [20.0, 40.0], "{search}: {s:#}");
        assert!(steps.iter().all(|st| st["verdict"] == "pass"), "{s:#}");
        assert_eq!(s[search]["knee"]["offered_per_sec"], 40.0);
        assert_eq!(s[search]["bound"], "search_limit");
        // Each step is a complete run with its own report.
        let run = std::path::PathBuf::from(steps[1]["run"].as_str().unwrap());
        assert_eq!(
            summary(&run)["counts"]["acked"],
            80,
            "2 s of schedule at 40/s"
        );
    }
    assert_eq!(s["knee_ratio_to_floor"], 1.0);
    assert_eq!(s["pass"], true);
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert_eq!(
        html.matches("data-chart=\"capacity-latency\"").count(),
        2,
        "one latency curve per search"
    );
    assert!(
        html.contains("data-verdict=\"PASS\""),
        "capacity verdict banner"
    );
    assert_eq!(
        html.matches("data-table=\"steps-").count(),
        2,
        "a steps table per search"
    );
    browser::assert_page_shows(
        &dir.join("report.html"),
        &["steps-server", "steps-protocol-floor"],
        &["capacity-latency"],
    );

    // `plan` takes the knee as its calibration, and warns when given one run instead.
    let design = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scenarios/load/design-point.toml"
    );
    let planned = loadgen(&["plan", design, "--calibration", dir.to_str().unwrap()]);
    assert_eq!(
        planned.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&planned.stderr)
    );
    let plan = String::from_utf8_lossy(&planned.stdout);
    assert!(
        plan.contains("the knee of a capacity search of `cap`: 40 msgs/s"),
        "{plan}"
    );
    assert!(
        plan.contains("bounded by search_limit") && !plan.contains("Warning"),
        "{plan}"
    );
    let one_run = steps_run(&s);
    let planned = loadgen(&["plan", design, "--calibration", one_run.to_str().unwrap()]);
    assert_eq!(planned.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&planned.stderr).contains("not a capacity"));
    assert!(String::from_utf8_lossy(&planned.stdout).contains("one run of `cap` at 20 msgs/s"));
}

/// The run folder of the server search's first step.
fn steps_run(capacity: &Value) -> PathBuf {
    PathBuf::from(capacity["server"]["steps"][0]["run"].as_str().unwrap())
}

/// The browser check itself can fail: a page whose script throws is reported.
#[test]
fn browser_check_sees_script_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let page = tmp.path().join("broken.html");
    std::fs::write(
        &page,
        "<!doctype html><html><body><p>x</p><script>undefinedFunction();</script></body></html>",
    )
    .unwrap();
    let Some(r) = browser::render(&page) else {
        return;
    };
    assert!(r.dom.contains("<p>x</p>"), "{}", r.dom);
    assert!(!r.script_errors.is_empty(), "the thrown error is seen");
}

/// `GET path` on `addr` over plain HTTP/1.1: status and body, or `None` if it cannot connect.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text.split_once("\r\n\r\n")?.1.to_owned()))
}

/// Metric names in a Prometheus text exposition.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Every `chatproof_*` metric the queries of a Grafana dashboard name.
fn dashboard_metrics(file: &str) -> std::collections::BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/grafana")
        .join(file);
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut names = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("chatproof_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                names.insert(name);
            }
        }
    }
    assert!(!names.is_empty(), "{file} queries nothing");
    names
}

/// `run --metrics-listen` serves the generator's live figures while it runs; together
/// with the server's `/metrics` they hold every metric the dashboards in docs/grafana/
/// query.
#[test]
fn dashboards_query_only_metrics_that_exist() {
    let tmp = tempfile::tempdir().unwrap();
    let secret = "dashboard-test-secret-0123456789";
    let mut server = Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
        .args([
            "serve-reference",
            "--listen",
            "127.0.0.1:0",
            "--secret",
            secret,
        ])
        .arg("--data-dir")
        .arg(tmp.path().join("data"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    // Kept open to the end: the server may print more.
    let mut server_stdout = std::io::BufReader::new(server.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut server_stdout, &mut line).unwrap();
    let server_addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect(&line)
        .to_owned();
    let live_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().to_string()
    };
    let scenario = scenario(tmp.path(), "live", 500.0);
    let mut run = Command::new(env!("CARGO_BIN_EXE_chatproof-loadgen"))
        .arg("run")
        .arg(&scenario)
        .args([
            "--target",
            &format!("ws://{server_addr}/v1/ws"),
            "--secret",
            secret,
        ])
        .args(["--metrics-listen", &live_addr])
        .arg("--out-dir")
        .arg(tmp.path().join("reports"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Scrape while the run goes on, until something was acknowledged.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let live = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no live metrics within 60 s"
        );
        assert!(
            run.try_wait().unwrap().is_none(),
            "the run ended before it was scraped"
        );
        if let Some((200, body)) = http_get(&live_addr, "/metrics") {
            let acked = body
                .lines()
                .find_map(|l| l.strip_prefix("chatproof_loadgen_acked_total "))
                .and_then(|v| v.trim().parse::<u64>().ok());
            if acked.is_some_and(|n| n > 0) {
                break body;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(http_get(&live_addr, "/other").map(|r| r.0), Some(404));
    let (status, server_text) = http_get(&server_addr, "/metrics").expect("server /metrics");
    assert_eq!(status, 200);
    for (file, text) in [
        ("chatproof-loadgen.json", &live),
        ("chatproof-server.json", &server_text),
    ] {
        let served = metric_names(text);
        let missing: Vec<String> = dashboard_metrics(file)
            .into_iter()
            .filter(|m| !served.contains(m))
            .collect();
        assert!(
            missing.is_empty(),
            "{file} queries metrics nobody serves: {missing:?}\n{text}"
        );
    }
    assert_eq!(run.wait().unwrap().code(), Some(0), "the run passes");
    let _ = server.kill();
    let _ = server.wait();
}
