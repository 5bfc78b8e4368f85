//! `--html FILE`: a self-contained report, viewable offline. Plots are drawn
//! with `plotters`' SVG backend and embedded inline: per group, open
//! connections over time, attempt/result rates over time, latency
//! percentiles over time, and results / reject reasons by count; then the
//! summary tables.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::report::{GroupReport, Percentiles, Report};

const W: u32 = 860;
const H: u32 = 300;

/// Series colours, distinguishable and printable.
const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Escapes text for HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

type Series = (String, Vec<(f64, f64)>);

/// A line chart over seconds as an SVG string; empty when there is nothing to draw.
fn line_chart(title: &str, y_desc: &str, series: &[Series]) -> String {
    xy_chart(title, "seconds", y_desc, series)
}

/// A line chart as an SVG string; empty when there is nothing to draw.
fn xy_chart(title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|(_, p)| p.iter());
    let (mut xmax, mut ymax) = (1.0f64, 0.0f64);
    let mut any = false;
    for &(x, y) in pts {
        any = true;
        xmax = xmax.max(x);
        ymax = ymax.max(y);
    }
    if !any {
        return String::new();
    }
    let ymax = if ymax <= 0.0 { 1.0 } else { ymax * 1.1 };
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (W, H)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..xmax, 0f64..ymax)?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .x_labels(10)
            .y_labels(6)
            .max_light_lines(2)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
        root.present()?;
        Ok(())
    })();
    match drawn {
        Ok(()) => svg,
        Err(e) => format!("<p>(plot failed: {})</p>", esc(&e.to_string())),
    }
}

/// A horizontal bar chart of labelled counts.
fn bar_chart(title: &str, items: &[(String, u64)]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let n = items.len();
    let max = items.iter().map(|(_, v)| *v).max().unwrap_or(1).max(1) as f64;
    let height = (60 + 26 * n as u32).max(140);
    let mut svg = String::new();
    let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
        let root = SVGBackend::with_string(&mut svg, (W, height)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..max * 1.05, -0.5f64..(n as f64 - 0.5))?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_desc("count")
            .x_labels(8)
            .max_light_lines(2)
            .light_line_style(RGBColor(240, 240, 240))
            .draw()?;
        for (i, (label, v)) in items.iter().enumerate() {
            let y = (n - 1 - i) as f64;
            let color = COLORS[i % COLORS.len()];
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, y - 0.38), (*v as f64, y + 0.38)],
                color.mix(0.35).filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                format!("{label}: {v}"),
                (max * 0.005, y + 0.2),
                ("sans-serif", 13).into_font().color(&BLACK),
            )))?;
        }
        root.present()?;
        Ok(())
    })();
    match drawn {
        Ok(()) => svg,
        Err(e) => format!("<p>(plot failed: {})</p>", esc(&e.to_string())),
    }
}

/// Per-second differences of a cumulative series.
fn rate(g: &GroupReport, f: impl Fn(&crate::report::Tick) -> u64) -> Vec<(f64, f64)> {
    let mut prev = (0u32, 0u64);
    g.timeline
        .iter()
        .map(|t| {
            let dt = (t.t - prev.0).max(1) as f64;
            let v = f(t).saturating_sub(prev.1) as f64 / dt;
            prev = (t.t, f(t));
            (t.t as f64, v)
        })
        .collect()
}

fn opt_series(
    g: &GroupReport,
    name: &str,
    f: impl Fn(&crate::report::Tick) -> Option<f64>,
) -> Option<Series> {
    let pts: Vec<(f64, f64)> = g.timeline.iter().filter_map(|t| f(t).map(|v| (t.t as f64, v))).collect();
    (!pts.is_empty()).then(|| (name.to_string(), pts))
}

fn pct_row(out: &mut String, label: &str, p: &Option<Percentiles>) {
    if let Some(p) = p {
        let _ = write!(
            out,
            "<tr><th>{}</th><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td></tr>",
            esc(label), p.count, p.min, p.p50, p.p90, p.p99, p.p999, p.max
        );
    }
}

fn map_table(out: &mut String, title: &str, m: &std::collections::BTreeMap<String, u64>) {
    if m.is_empty() {
        return;
    }
    let _ = write!(out, "<table><caption>{}</caption>", esc(title));
    for (k, v) in m {
        let _ = write!(out, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    }
    out.push_str("</table>");
}

/// Renders the whole report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>portcullis-loadtest: {sc}</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:900px}}table{{border-collapse:collapse;margin:.5em 1em .5em 0;display:inline-table;vertical-align:top}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}th{{text-align:left;font-weight:normal;background:#f6f6f6}}\
         caption{{font-weight:bold;text-align:left}}pre{{background:#f6f6f6;padding:.5em;overflow-x:auto}}svg{{display:block;margin:.5em 0}}</style></head><body>\
         <h1>portcullis-loadtest: {sc}</h1><p>target <code>{tg}</code> · {w} worker(s) · {el:.1} s · started {st} (Unix s) · {tool}</p>",
        sc = esc(&r.scenario),
        tg = esc(&r.target),
        w = r.workers,
        el = r.elapsed_s,
        st = r.started_unix_s,
        tool = esc(&r.tool),
    );
    for w in &r.warnings {
        let _ = write!(out, "<p style=\"color:#b00;font-weight:bold\">WARNING: {}</p>", esc(w));
    }
    if let Some(c) = &r.capacity {
        capacity_section(&mut out, c);
    }
    for (name, g) in &r.groups {
        let _ = write!(out, "<h2>{}</h2>", esc(name));
        out.push_str("<table><caption>summary</caption>");
        let mut kv = |k: &str, v: String| {
            let _ = write!(out, "<tr><th>{}</th><td>{}</td></tr>", esc(k), esc(&v));
        };
        kv("peak open", g.peak_open.to_string());
        kv("attempts/s", format!("{:.1}", g.attempts_per_s));
        kv("101/s", format!("{:.1}", g.upgraded_per_s));
        kv("messages/s", format!("{:.1}", g.messages_per_s));
        kv("MB/s received", format!("{:.2}", g.bytes_per_s / 1e6));
        if let Some(s) = g.success_ratio {
            kv("success ratio", format!("{s:.4}"));
        }
        out.push_str("</table>");
        if let Some(p) = &g.hs_p99_per_second {
            let _ = write!(
                out,
                "<p>handshake p99 per second over the whole run: worst {:.2} ms (t = {} s), median {:.2} ms, {} seconds</p>",
                p.worst_ms, p.worst_t, p.median_ms, p.seconds
            );
        }
        if g.handshake_ms.is_some() || g.rtt_ms.is_some() || g.lifetime_ms.is_some() {
            out.push_str("<table><caption>latency (ms)</caption><tr><th></th><th>n</th><th>min</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>");
            pct_row(&mut out, "handshake", &g.handshake_ms);
            pct_row(&mut out, "of which TLS", &g.tls_ms);
            pct_row(&mut out, "round trip", &g.rtt_ms);
            pct_row(&mut out, "lifetime (reaped)", &g.lifetime_ms);
            out.push_str("</table>");
        }
        map_table(&mut out, "results by status", &g.status);
        map_table(&mut out, "results by reason", &g.reasons);
        map_table(&mut out, "how connections ended", &g.ends);
        let mut extra = g.counters.clone();
        extra.extend(g.maxima.clone());
        map_table(&mut out, "counters", &extra);

        let open: Vec<(f64, f64)> = g.timeline.iter().map(|t| (t.t as f64, t.open as f64)).collect();
        out.push_str(&line_chart(
            &format!("{name}: open connections"),
            "connections",
            &[("open".into(), open)],
        ));
        let mut rates = vec![
            ("attempts/s".to_string(), rate(g, |t| t.attempts)),
            ("101/s".to_string(), rate(g, |t| t.upgraded)),
            ("failed/s".to_string(), rate(g, |t| t.failed)),
        ];
        if g.timeline.last().is_some_and(|t| t.messages > 0) {
            rates.push(("messages/s".to_string(), rate(g, |t| t.messages)));
        }
        if g.timeline.last().is_some_and(|t| t.attempts > 0 || t.messages > 0) {
            out.push_str(&line_chart(&format!("{name}: rates"), "per second", &rates));
        }
        let lat: Vec<Series> = [
            opt_series(g, "handshake p50", |t| t.hs_p50_ms),
            opt_series(g, "handshake p99", |t| t.hs_p99_ms),
            opt_series(g, "handshake p99.9", |t| t.hs_p999_ms),
            opt_series(g, "round trip p50", |t| t.rtt_p50_ms),
            opt_series(g, "round trip p99", |t| t.rtt_p99_ms),
            opt_series(g, "round trip p99.9", |t| t.rtt_p999_ms),
        ]
        .into_iter()
        .flatten()
        .collect();
        out.push_str(&line_chart(&format!("{name}: latency percentiles per second"), "ms", &lat));
        let mut results: Vec<(String, u64)> = g.reasons.iter().map(|(k, v)| (k.clone(), *v)).collect();
        results.extend(g.ends.iter().map(|(k, v)| (format!("end: {k}"), *v)));
        out.push_str(&bar_chart(&format!("{name}: results and reject reasons"), &results));
    }
    if let Some(p) = &r.gateway {
        gateway_section(&mut out, p);
    }
    if let Some(m) = &r.metrics {
        let _ =
            write!(out, "<h2>gateway metrics</h2><p><code>{}</code> change over the run</p>", esc(&m.url));
        if let Some(e) = &m.error {
            let _ = write!(out, "<p>error: {}</p>", esc(e));
        }
        out.push_str("<table><tr><th>series</th><th>change</th></tr>");
        for d in &m.delta {
            let labels: Vec<String> = d.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            let _ = write!(
                out,
                "<tr><th>{}{{{}}}</th><td>{}</td></tr>",
                esc(&d.name),
                esc(&labels.join(",")),
                d.value
            );
        }
        out.push_str("</table>");
    }
    let _ = writeln!(
        out,
        "<h2>parameters</h2><pre>{}</pre></body></html>",
        esc(&serde_json::to_string_pretty(&r.params).unwrap_or_default())
    );
    out
}

fn mib(b: f64) -> f64 {
    b / (1024.0 * 1024.0)
}

/// `capacity`: the sizing table (each figure with its measurement), the
/// steps, and RSS / descriptors against open connections.
fn capacity_section(out: &mut String, c: &crate::scenarios::capacity::Sizing) {
    let _ = write!(
        out,
        "<h2>capacity ({})</h2><p>readings from {}<br>stopped: {}</p>\
         <table><caption>sizing</caption><tr><th>figure</th><th>value</th><th>measurement</th></tr>",
        esc(&c.mode),
        esc(&c.source),
        esc(&c.stop_reason)
    );
    for f in &c.figures {
        let _ = write!(
            out,
            "<tr><th>{}</th><td>{:.2} {}</td><td style=\"text-align:left\">{}</td></tr>",
            esc(&f.name),
            f.value,
            esc(&f.unit),
            esc(&f.how)
        );
    }
    out.push_str("</table><table><caption>steps</caption><tr><th>open</th><th>RSS MiB</th><th>descriptors</th><th>CPU s</th><th>at s</th></tr>");
    for s in &c.steps {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{:.1}</td><td>{}</td><td>{:.2}</td><td>{:.1}</td></tr>",
            s.open,
            mib(s.reading.rss_bytes),
            s.reading.fds,
            s.reading.cpu_s,
            s.at_s
        );
    }
    out.push_str("</table>");
    let mut rss = vec![(0.0, mib(c.base.rss_bytes))];
    rss.extend(c.steps.iter().map(|s| (s.open as f64, mib(s.reading.rss_bytes))));
    out.push_str(&xy_chart("gateway RSS against open connections", "open", "MiB", &[("RSS".into(), rss)]));
}

/// The gateway's process over the run.
fn gateway_section(out: &mut String, p: &crate::procstat::ProcStats) {
    let _ = write!(
        out,
        "<h2>gateway process</h2><p>{}</p><table><tr><th>RSS MiB before / peak / after</th><td>{:.1} / {:.1} / {:.1}</td></tr>\
         <tr><th>CPU s (mean, peak cores)</th><td>{:.2} ({:.2}, {:.2})</td></tr><tr><th>descriptors before / peak</th><td>{} / {}</td></tr></table>",
        esc(&p.source),
        mib(p.before.rss_bytes),
        mib(p.peak_rss_bytes),
        mib(p.after.rss_bytes),
        p.cpu_s,
        p.mean_cpu_cores,
        p.peak_cpu_cores,
        p.before.fds,
        p.peak_fds
    );
    let rss: Vec<(f64, f64)> = p.timeline.iter().map(|t| (t.t as f64, mib(t.rss_bytes))).collect();
    out.push_str(&line_chart("gateway RSS", "MiB", &[("RSS".into(), rss)]));
    let cpu: Vec<(f64, f64)> = p.timeline.iter().map(|t| (t.t as f64, t.cpu_cores)).collect();
    out.push_str(&line_chart("gateway CPU", "cores", &[("CPU".into(), cpu)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg() {
        let s = line_chart("t", "y", &[("a".into(), vec![(0.0, 1.0), (1.0, 3.0)])]);
        assert!(s.starts_with("<svg") && s.contains("</svg>"), "{s}");
        assert!(line_chart("t", "y", &[("a".into(), vec![])]).is_empty());
        let b = bar_chart("r", &[("401 <x>".into(), 5), ("101".into(), 9)]);
        assert!(b.contains("</svg>") && b.contains("101: 9"), "{b}");
        assert!(b.contains("401 &lt;x&gt;: 5"), "labels are escaped by the backend: {b}");
    }
}
