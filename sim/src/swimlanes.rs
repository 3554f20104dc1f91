//! A seed's run as a picture (`replay --html`, and `run` for each failing seed): one
//! swimlane per server and per device on the simulated time axis, fault windows shaded,
//! sends, acknowledgements and deliveries (by seq) marked, every violation drawn where
//! it showed. One self-contained HTML file with inline SVG, no script, no network.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use crate::checker::Finding;
use crate::history::{DeviceKey, History, WindowKind};

/// Most device lanes drawn: devices with a violation first, then the rest in order.
pub const DEVICE_LANES_MAX: usize = 60;

const WIDTH: f64 = 1200.0;
const LABEL_W: f64 = 150.0;
const LANE_H: f64 = 30.0;
const AXIS_H: f64 = 30.0;

/// What the picture shows besides the history.
pub struct Picture<'a> {
    /// The seed.
    pub seed: u64,
    /// The options the seed derived (one line).
    pub options: String,
    /// The command that replays the seed.
    pub replay: String,
    /// The verdict, as the runner describes it.
    pub verdict: String,
    /// True when every promise held.
    pub pass: bool,
    /// Servers in the run.
    pub servers: u32,
    /// What the clients saw.
    pub history: &'a History,
    /// What the checker found.
    pub findings: &'a [Finding],
    /// How long the run lasted, simulated ms.
    pub sim_ms: u64,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One lane: its label and what it concerns.
enum Lane {
    Server(u32),
    Shared,
    Device(DeviceKey),
}

/// The HTML page for `p`.
pub fn render(p: &Picture<'_>) -> String {
    let h = p.history;
    let end_ms = p
        .sim_ms
        .max(h.received.iter().map(|r| r.t_ms).max().unwrap_or(0))
        .max(h.faults.iter().map(|f| f.end_ms).max().unwrap_or(0))
        .max(1);
    let x = |t_ms: u64| LABEL_W + (t_ms as f64 / end_ms as f64) * (WIDTH - LABEL_W - 20.0);

    // Lanes: servers, the shared network and backends, then devices (violations first).
    let mut devices: BTreeSet<DeviceKey> = BTreeSet::new();
    devices.extend(h.sent.iter().map(|s| s.device));
    devices.extend(h.received.iter().map(|r| r.device));
    devices.extend(h.faults.iter().filter_map(|f| f.device));
    devices.extend(p.findings.iter().filter_map(|f| f.device));
    let flagged: BTreeSet<DeviceKey> = p.findings.iter().filter_map(|f| f.device).collect();
    let mut ordered: Vec<DeviceKey> = flagged.iter().copied().collect();
    ordered.extend(devices.iter().filter(|d| !flagged.contains(d)));
    let omitted = ordered.len().saturating_sub(DEVICE_LANES_MAX);
    ordered.truncate(DEVICE_LANES_MAX);
    let mut lanes: Vec<Lane> = (0..p.servers).map(Lane::Server).collect();
    lanes.push(Lane::Shared);
    lanes.extend(ordered.iter().map(|d| Lane::Device(*d)));
    let lane_of_device: BTreeMap<DeviceKey, usize> = ordered
        .iter()
        .enumerate()
        .map(|(i, d)| (*d, p.servers as usize + 1 + i))
        .collect();
    let height = AXIS_H + LANE_H * lanes.len() as f64 + 10.0;
    let top = |lane: usize| AXIS_H + LANE_H * lane as f64;

    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    // Time axis.
    let step = [
        100u64, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000,
    ]
    .into_iter()
    .find(|s| end_ms / s <= 12)
    .unwrap_or(120_000);
    let mut t = 0;
    while t <= end_ms {
        let _ = write!(
            svg,
            "<line x1=\"{0:.1}\" y1=\"{1}\" x2=\"{0:.1}\" y2=\"{height}\" stroke=\"#eee\"/>\
             <text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{3} s</text>",
            x(t),
            AXIS_H - 6.0,
            AXIS_H - 12.0,
            t as f64 / 1000.0
        );
        t += step;
    }
    // Lane backgrounds and labels.
    for (i, lane) in lanes.iter().enumerate() {
        let label = match lane {
            Lane::Server(s) => format!("server {s}"),
            Lane::Shared => "network, store, router".to_owned(),
            Lane::Device(d) => format!("device {}/{}", d.0, d.1),
        };
        let _ = write!(
            svg,
            "<rect x=\"0\" y=\"{:.1}\" width=\"{WIDTH}\" height=\"{LANE_H}\" fill=\"{}\"/>\
             <text x=\"6\" y=\"{:.1}\">{}</text>",
            top(i),
            if i % 2 == 0 { "#fafafa" } else { "#f2f2f2" },
            top(i) + LANE_H / 2.0 + 4.0,
            escape(&label)
        );
    }
    // Fault windows, shaded on the lane they concern.
    for f in &h.faults {
        let lane = match (f.device, f.server) {
            (Some(d), _) => lane_of_device.get(&d).copied(),
            (None, Some(s)) => Some(s as usize),
            (None, None) => Some(p.servers as usize),
        };
        let Some(lane) = lane else { continue };
        let (name, colour) = match f.kind {
            WindowKind::Fault(kind) => (kind.name().to_owned(), "#f6c37a"),
            WindowKind::DeviceOffline => ("offline".to_owned(), "#c9d7ee"),
            WindowKind::Paging => ("paging".to_owned(), "#dfeecf"),
        };
        let w = (x(f.end_ms) - x(f.start_ms)).max(2.0);
        let _ = write!(
            svg,
            "<rect class=\"fault\" x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{}\" \
             fill=\"{colour}\" opacity=\"0.75\"><title>{} from {} ms to {} ms</title></rect>",
            x(f.start_ms),
            top(lane) + 2.0,
            LANE_H - 4.0,
            escape(&name),
            f.start_ms,
            f.end_ms
        );
    }
    // Sends (blue triangles), acks (green dots), deliveries (grey ticks, by seq).
    for s in &h.sent {
        if let Some(&lane) = lane_of_device.get(&s.device) {
            let (cx, y) = (x(s.t_ms), top(lane) + 8.0);
            let _ = write!(
                svg,
                "<path class=\"send\" d=\"M{:.1} {:.1} l4 -6 l-8 0 z\" fill=\"#2b6cc4\">\
                 <title>send {} in {} at {} ms</title></path>",
                cx,
                y,
                escape(&s.message_id),
                escape(&s.conv),
                s.t_ms
            );
        }
    }
    for a in &h.acked {
        if let Some(&lane) = lane_of_device.get(&a.device) {
            let _ = write!(
                svg,
                "<circle class=\"ack\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"#2f9e44\">\
                 <title>ack {} = seq {} of {} at {} ms</title></circle>",
                x(a.t_ms),
                top(lane) + 13.0,
                escape(&a.message_id),
                a.seq,
                escape(&a.conv),
                a.t_ms
            );
        }
    }
    for r in &h.received {
        if let Some(&lane) = lane_of_device.get(&r.device) {
            let _ = write!(
                svg,
                "<line class=\"delivery\" x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" \
                 stroke=\"#666\"><title>seq {3} of {4} ({5}) at {6} ms</title></line>",
                x(r.t_ms),
                top(lane) + 17.0,
                top(lane) + LANE_H - 3.0,
                r.seq,
                escape(&r.conv),
                escape(&r.message_id),
                r.t_ms
            );
        }
    }
    // Violations: a red cross where they showed (at the run's end when no moment did;
    // on the shared lane when no device did).
    for f in p.findings {
        let lane = f
            .device
            .and_then(|d| lane_of_device.get(&d).copied())
            .unwrap_or(p.servers as usize);
        let (cx, cy) = (x(f.t_ms.unwrap_or(end_ms)), top(lane) + LANE_H / 2.0);
        let _ = write!(
            svg,
            "<g class=\"violation\" data-kind=\"{}\"><path d=\"M{:.1} {:.1} l10 10 m0 -10 l-10 10\" \
             stroke=\"#d00\" stroke-width=\"3\"/><title>{}</title></g>",
            f.violation,
            cx - 5.0,
            cy - 5.0,
            escape(&f.to_string())
        );
    }
    svg.push_str("</svg>");

    let mut page = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>chatproof-sim seed {}</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:1.5em}}\
         .banner{{padding:.8em 1em;border-radius:6px;margin:1em 0}}\
         .pass{{background:#e3f6e6;border:1px solid #3a9d4f}}.fail{{background:#fde7e7;border:1px solid #c23b3b}}\
         pre{{white-space:pre-wrap;background:#f6f6f6;padding:.5em}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .5em;text-align:left}}\
         .legend span{{margin-right:1.5em}}</style></head><body>\n",
        p.seed
    );
    let _ = write!(
        page,
        "<h1>chatproof-sim seed {}</h1>\n<div class=\"banner {}\" data-verdict=\"{}\"><b>{}</b><pre>{}</pre></div>\n\
         <p>Replay: <code>{}</code></p>\n<p>Options: <code>{}</code></p>\n",
        p.seed,
        if p.pass { "pass" } else { "fail" },
        if p.pass { "PASS" } else { "FAIL" },
        if p.pass { "PASS" } else { "FAIL" },
        escape(&p.verdict),
        escape(&p.replay),
        escape(&p.options)
    );
    page.push_str(
        "<p class=\"legend\"><span style=\"color:#2b6cc4\">▼ send</span>\
         <span style=\"color:#2f9e44\">● ack</span><span style=\"color:#666\">| delivery (hover: seq)</span>\
         <span style=\"background:#f6c37a\">fault window</span> <span style=\"background:#c9d7ee\">device offline</span>\
         <span style=\"color:#d00\">✕ violation</span></p>\n",
    );
    let _ = writeln!(page, "<figure data-chart=\"swimlanes\">{svg}</figure>");
    if omitted > 0 {
        let _ = writeln!(
            page,
            "<p>{omitted} more device(s) without a violation are not drawn (at most {DEVICE_LANES_MAX} lanes).</p>"
        );
    }
    if !p.findings.is_empty() {
        page.push_str("<h2>Violations</h2>\n<table data-table=\"violations\"><tr><th>violation</th><th>conversation</th><th>device</th><th>at (ms)</th><th>detail</th></tr>\n");
        for f in p.findings {
            let _ = writeln!(
                page,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                f.violation,
                escape(&f.conv),
                f.device.map_or("—".into(), |d| format!("{}/{}", d.0, d.1)),
                f.t_ms.map_or("—".into(), |t| t.to_string()),
                escape(&f.detail)
            );
        }
        page.push_str("</table>\n");
    }
    page.push_str("</body></html>\n");
    page
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Acked, FaultWindow, Received, Sent};
    use chatproof_contract::Violation;

    /// Every event and the violation are drawn, each on its lane, text escaped.
    #[test]
    fn draws_lanes_events_faults_and_violations() {
        let mut h = History::default();
        h.sent.push(Sent {
            device: (0, 0),
            conv: "g:<1>".into(),
            message_id: "m1".into(),
            t_ms: 100,
        });
        h.acked.push(Acked {
            device: (0, 0),
            conv: "g:<1>".into(),
            message_id: "m1".into(),
            seq: 1,
            t_ms: 120,
        });
        h.received.push(Received {
            device: (1, 0),
            conv: "g:<1>".into(),
            seq: 1,
            message_id: "m1".into(),
            system: false,
            members: None,
            server_time_ms: 1_000,
            t_ms: 130,
        });
        h.faults.push(FaultWindow {
            kind: WindowKind::Fault(crate::options::FaultKind::ServerCrash),
            start_ms: 200,
            end_ms: 900,
            device: None,
            server: Some(0),
        });
        let findings = [Finding {
            violation: Violation::Lost,
            conv: "g:<1>".into(),
            detail: "acknowledged m1 (seq 1) never reached device (2, 0)".into(),
            device: Some((2, 0)),
            t_ms: Some(120),
        }];
        let page = render(&Picture {
            seed: 7,
            options: "seed=7".into(),
            replay: "scripts/sim.sh replay 7".into(),
            verdict: "1 violation(s)".into(),
            pass: false,
            servers: 1,
            history: &h,
            findings: &findings,
            sim_ms: 1_000,
        });
        assert!(page.contains("data-verdict=\"FAIL\""));
        assert!(page.contains("<code>scripts/sim.sh replay 7</code>"));
        for class in ["send", "ack", "delivery", "fault", "violation"] {
            assert_eq!(
                page.matches(&format!("class=\"{class}\"")).count(),
                1,
                "one {class}"
            );
        }
        assert!(page.contains("data-kind=\"lost\""));
        // Lanes: server 0, shared, then the flagged device first.
        let lanes: Vec<&str> = [
            "server 0",
            "network, store, router",
            "device 2/0",
            "device 0/0",
            "device 1/0",
        ]
        .into_iter()
        .collect();
        let mut at = 0;
        for lane in lanes {
            let found = page[at..]
                .find(&format!(">{lane}</text>"))
                .unwrap_or_else(|| panic!("lane {lane}"));
            at += found;
        }
        assert!(page.contains("g:&lt;1&gt;") && !page.contains("g:<1>"));
    }
}
