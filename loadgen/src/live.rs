//! `run --metrics-listen ADDR`: the generator's live figures in the Prometheus text
//! format at `GET /metrics` while the run goes on (for Grafana: `docs/grafana/`). Each
//! scrape reads the run's counters and merges its latency histograms; nothing here
//! slows the schedule down.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::metrics::Measure;
use crate::run::state::{Count, RunState};

/// The figures in the Prometheus text format (version 0.0.4).
pub fn exposition(state: &RunState) -> String {
    let devices = state.devices();
    let (mut connected, mut received, mut violations, mut refused) = (0u64, 0u64, 0u64, 0u64);
    for device in &devices {
        let state = device.state.lock().expect("device state");
        connected += u64::from(state.connected);
        received += state.received;
        violations += state.violations.total();
        refused += state.send_errors;
    }
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "chatproof_loadgen_scheduled_total",
        "counter",
        "Sends the schedule made due so far (the offered load).",
        state.counters.get(Count::Scheduled),
    );
    metric(
        "chatproof_loadgen_sent_total",
        "counter",
        "Sends written to a socket.",
        state.counters.get(Count::Sent),
    );
    metric(
        "chatproof_loadgen_acked_total",
        "counter",
        "Acknowledgements received.",
        state.histograms.acked_so_far(),
    );
    metric(
        "chatproof_loadgen_refused_total",
        "counter",
        "Sends the server answered with an error.",
        refused,
    );
    metric(
        "chatproof_loadgen_deliveries_total",
        "counter",
        "Messages received by recipient devices.",
        received,
    );
    metric(
        "chatproof_loadgen_violations_total",
        "counter",
        "Delivery-contract violations seen so far (lost messages are counted at the end).",
        violations,
    );
    metric(
        "chatproof_loadgen_devices_connected",
        "gauge",
        "Devices with an open connection.",
        connected,
    );
    metric(
        "chatproof_loadgen_devices_planned",
        "gauge",
        "Devices this process drives.",
        state.config.devices_planned(),
    );
    let histograms = state.histograms.merged();
    for (name, help, m) in [
        (
            "chatproof_loadgen_delivery_latency_ms",
            "Delivery latency to online devices from the scheduled send time, ms.",
            Measure::Delivery,
        ),
        (
            "chatproof_loadgen_ack_latency_ms",
            "Send-to-ack latency from the scheduled send time, ms.",
            Measure::SendAck,
        ),
    ] {
        let h = &histograms[m];
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} summary\n"));
        for q in [0.5, 0.9, 0.99, 0.999] {
            let ms = if h.is_empty() {
                0.0
            } else {
                h.value_at_quantile(q) as f64 / 1000.0
            };
            out.push_str(&format!("{name}{{quantile=\"{q}\"}} {ms}\n"));
        }
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {}\n",
            h.mean() * h.len() as f64 / 1000.0,
            h.len()
        ));
    }
    out
}

/// Answers `GET /metrics` on `listener` with [`exposition`] (anything else: 404) until
/// the task is aborted. One request per connection; a client that sends nothing for
/// 5 s is dropped.
pub async fn serve(listener: TcpListener, state: Arc<RunState>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            // Out of file descriptors, say: wait rather than spin beside the schedule.
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            if read != Ok(true) {
                return;
            }
            let line = String::from_utf8_lossy(&request);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let (status, body) =
                if line.starts_with("GET ") && path.split('?').next() == Some("/metrics") {
                    ("200 OK", exposition(&state))
                } else {
                    ("404 Not Found", "GET /metrics\n".to_owned())
                };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
