//! Charts for `report.html`, drawn as inline SVG with plotters (no font files needed).

use hdrhistogram::Histogram;
use plotters::prelude::*;

use crate::report::TimelinePoint;

const SIZE: (u32, u32) = (760, 340);

type Series<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);

fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    x_fmt: &dyn Fn(&f64) -> String,
) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        let _ = root.fill(&WHITE);
        let points = series.iter().flat_map(|s| s.2.iter());
        let (mut x_max, mut y_max) = (0f64, 0f64);
        for (x, y) in points {
            x_max = x_max.max(*x);
            y_max = y_max.max(*y);
        }
        let x_max = if x_max > 0.0 { x_max } else { 1.0 };
        let y_max = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max);
        let Ok(mut chart) = chart else {
            return svg_error(title);
        };
        let _ = chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(x_fmt)
            .draw();
        for (name, color, data) in series {
            let color = *color;
            if let Ok(drawn) =
                chart.draw_series(LineSeries::new(data.iter().copied(), color.stroke_width(2)))
            {
                drawn.label(*name).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
        }
        let _ = chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw();
        let _ = root.present();
    }
    svg
}

fn svg_error(title: &str) -> String {
    format!("<p>chart {title:?} could not be drawn</p>")
}

/// Latency by percentile: x is `log10(1 / (1 - q))` (1 = 90 %, 2 = 99 %, 3 = 99.9 %).
pub fn percentile_spectrum(delivery: &Histogram<u64>, ack: &Histogram<u64>) -> String {
    let spectrum = |h: &Histogram<u64>| -> Vec<(f64, f64)> {
        if h.is_empty() {
            return Vec::new();
        }
        h.iter_quantiles(4)
            .map(|v| v.quantile_iterated_to())
            .filter(|q| *q < 0.99999)
            .map(|q| {
                (
                    (1.0 / (1.0 - q)).log10(),
                    h.value_at_quantile(q) as f64 / 1000.0,
                )
            })
            .collect()
    };
    // 0 → 0 %, 1 → 90 %, 2 → 99 %, 3 → 99.9 %: as many decimals as the nines need.
    let label = |x: &f64| {
        let decimals = (x.ceil() as usize).saturating_sub(2);
        format!("{:.decimals$}%", 100.0 * (1.0 - 10f64.powf(-*x)))
    };
    line_chart(
        "Latency by percentile",
        "percentile",
        "ms",
        &[
            ("delivery", BLUE, spectrum(delivery)),
            ("send→ack", RED, spectrum(ack)),
        ],
        &label,
    )
}

/// Delivery latency (p50, p99 and max per second) over the run.
pub fn latency_over_time(timeline: &[TimelinePoint]) -> String {
    let series = |f: fn(&TimelinePoint) -> f64| timeline.iter().map(|p| (p.t_secs, f(p))).collect();
    line_chart(
        "Delivery latency over time",
        "seconds",
        "ms",
        &[
            ("p50", BLUE, series(|p| p.delivery_p50_ms)),
            ("p99", RED, series(|p| p.delivery_p99_ms)),
            (
                "max",
                RGBColor(150, 150, 150),
                series(|p| p.delivery_max_ms),
            ),
        ],
        &|x| format!("{x:.0}"),
    )
}

/// Messages per second over the run: offered by the schedule, sent, acknowledged.
pub fn messages_over_time(timeline: &[TimelinePoint]) -> String {
    let series =
        |f: fn(&TimelinePoint) -> u64| timeline.iter().map(|p| (p.t_secs, f(p) as f64)).collect();
    line_chart(
        "Messages per second",
        "seconds",
        "messages per second",
        &[
            ("offered", RGBColor(150, 150, 150), series(|p| p.offered)),
            ("sent", RED, series(|p| p.sent)),
            ("acknowledged", GREEN, series(|p| p.acked)),
        ],
        &|x| format!("{x:.0}"),
    )
}

/// Deliveries (message × recipient device) per second, on an axis of their own.
pub fn deliveries_over_time(timeline: &[TimelinePoint]) -> String {
    let delivered = timeline
        .iter()
        .map(|p| (p.t_secs, p.delivered as f64))
        .collect();
    line_chart(
        "Deliveries per second",
        "seconds",
        "deliveries per second",
        &[("delivered", BLUE, delivered)],
        &|x| format!("{x:.0}"),
    )
}

/// The servers' CPU (percent of one core) over the run; `None` without server figures.
pub fn server_cpu_over_time(timeline: &[TimelinePoint]) -> Option<String> {
    let cpu: Vec<(f64, f64)> = timeline
        .iter()
        .filter_map(|p| p.server_cpu_percent.map(|c| (p.t_secs, c)))
        .collect();
    (!cpu.is_empty()).then(|| {
        line_chart(
            "Server CPU",
            "seconds",
            "% of one core",
            &[("CPU", RED, cpu)],
            &|x| format!("{x:.0}"),
        )
    })
}

/// The servers' resident memory (MiB) over the run; `None` without server figures.
pub fn server_memory_over_time(timeline: &[TimelinePoint]) -> Option<String> {
    let rss: Vec<(f64, f64)> = timeline
        .iter()
        .filter_map(|p| p.server_rss_kib.map(|k| (p.t_secs, k as f64 / 1024.0)))
        .collect();
    (!rss.is_empty()).then(|| {
        line_chart(
            "Server memory",
            "seconds",
            "resident MiB",
            &[("RSS", BLUE, rss)],
            &|x| format!("{x:.0}"),
        )
    })
}

/// Connected devices over the run.
pub fn devices_over_time(timeline: &[TimelinePoint]) -> String {
    let connected = timeline
        .iter()
        .map(|p| (p.t_secs, p.devices_connected as f64))
        .collect();
    line_chart(
        "Connected devices",
        "seconds",
        "devices",
        &[("connected", GREEN, connected)],
        &|x| format!("{x:.0}"),
    )
}

/// `capacity`: delivery p50 and p99 against the offered rate, one point per valid step
/// (`(offered msgs/s, p50 ms, p99 ms)`, sorted by rate).
pub fn capacity_curve(title: &str, points: &[(f64, f64, f64)]) -> String {
    let p50 = points.iter().map(|p| (p.0, p.1)).collect();
    let p99 = points.iter().map(|p| (p.0, p.2)).collect();
    line_chart(
        title,
        "offered messages per second",
        "delivery latency, ms",
        &[("p50", BLUE, p50), ("p99", RED, p99)],
        &|x| format!("{x:.0}"),
    )
}

/// `capacity`: server CPU (percent of one core) against the offered rate, one point per
/// valid step (sorted by rate).
pub fn capacity_cpu(title: &str, points: &[(f64, f64)]) -> String {
    line_chart(
        title,
        "offered messages per second",
        "% of one core",
        &[("server CPU", GREEN, points.to_vec())],
        &|x| format!("{x:.0}"),
    )
}
