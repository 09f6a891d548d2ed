//! Reports: HdrHistogram percentile distributions (`.hgrm`, the format plotted by the standard
//! HdrHistogram tools), a JSON summary, and a self-contained HTML page with a latency-percentile
//! plot and a throughput timeline.

use std::{fmt::Write as _, path::Path};

use hdrhistogram::Histogram;

/// The `.hgrm` text of a histogram recorded in microseconds, with values in milliseconds.
pub fn hgrm(h: &Histogram<u64>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    if h.is_empty() {
        return out;
    }
    for v in h.iter_quantiles(5) {
        let q = v.quantile_iterated_to();
        let inv = if q < 1.0 {
            format!("{:>14.2}", 1.0 / (1.0 - q))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:>12.3} {:>14.12} {:>10} {}",
            v.value_iterated_to() as f64 / 1000.0,
            q,
            v.count_since_last_iteration(),
            inv
        );
    }
    let _ = writeln!(
        out,
        "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]",
        h.mean() / 1000.0,
        h.stdev() / 1000.0
    );
    let _ = writeln!(
        out,
        "#[Max     = {:>12.3}, Total count    = {:>12}]",
        h.max() as f64 / 1000.0,
        h.len()
    );
    let _ = writeln!(
        out,
        "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
        h.buckets(),
        h.distinct_values()
    );
    out
}

/// A histogram as HdrHistogram V2 + DEFLATE, base64 (the `HistogramLogWriter` encoding).
pub fn histogram_base64(h: &Histogram<u64>) -> String {
    use base64::Engine as _;
    use hdrhistogram::serialization::{Serializer as _, V2DeflateSerializer};
    let mut bytes = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut bytes)
        .expect("serialising to a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes [`histogram_base64`] output.
pub fn histogram_from_base64(text: &str) -> Option<Histogram<u64>> {
    use base64::Engine as _;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .ok()
}

/// Parses the `(percentile, value_ms)` points back out of `.hgrm` text (for merged reports).
pub fn parse_hgrm(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let v: f64 = it.next()?.parse().ok()?;
            let q: f64 = it.next()?.parse().ok()?;
            Some((q, v))
        })
        .collect()
}

/// One run in an HTML report.
pub struct Series {
    /// Legend.
    pub label: String,
    /// `(percentile, latency ms)`.
    pub percentiles: Vec<(f64, f64)>,
    /// Deliveries per second.
    pub timeline: Vec<u64>,
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// A self-contained HTML page: summary JSON, latency by percentile (log scale of 1/(1-p)),
/// and deliveries per second.
pub fn html(title: &str, summaries: &[serde_json::Value], series: &[Series]) -> String {
    let (w, h, pad) = (760.0, 320.0, 50.0);
    let mut lat = String::new();
    let max_ms = series
        .iter()
        .flat_map(|s| s.percentiles.iter().map(|p| p.1))
        .fold(0.001f64, f64::max);
    let x_of = |q: f64| {
        let nines = (1.0 / (1.0 - q.min(0.99999))).log10(); // 0 .. 5
        pad + nines / 5.0 * (w - 2.0 * pad)
    };
    let y_of = |v: f64| h - pad - v / max_ms * (h - 2.0 * pad);
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .percentiles
            .iter()
            .map(|&(q, v)| format!("{:.1},{:.1}", x_of(q), y_of(v)))
            .collect();
        let _ = write!(
            lat,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            pts.join(" ")
        );
        let _ = write!(
            lat,
            r#"<text x="{}" y="{}" fill="{}" font-size="12">{}</text>"#,
            w - 200.0,
            20.0 + 16.0 * i as f64,
            COLORS[i % COLORS.len()],
            escape(&s.label)
        );
    }
    for (k, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = pad + k as f64 / 5.0 * (w - 2.0 * pad);
        let _ = write!(
            lat,
            r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" font-size="11" text-anchor="middle">{label}</text>"##,
            pad,
            h - pad,
            h - pad + 16.0
        );
    }
    let _ = write!(
        lat,
        r#"<text x="8" y="{}" font-size="11">{:.2} ms</text><text x="8" y="{}" font-size="11">0</text>"#,
        pad,
        max_ms,
        h - pad
    );
    let mut tl = String::new();
    let max_rate = series
        .iter()
        .flat_map(|s| s.timeline.iter().copied())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let max_len = series
        .iter()
        .map(|s| s.timeline.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .timeline
            .iter()
            .enumerate()
            .map(|(t, &r)| {
                format!(
                    "{:.1},{:.1}",
                    pad + t as f64 / max_len * (w - 2.0 * pad),
                    h - pad - r as f64 / max_rate * (h - 2.0 * pad)
                )
            })
            .collect();
        let _ = write!(
            tl,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[i % COLORS.len()],
            pts.join(" ")
        );
    }
    let _ = write!(
        tl,
        r#"<text x="8" y="{}" font-size="11">{:.0}/s</text><text x="{}" y="{}" font-size="11">{} s</text>"#,
        pad,
        max_rate,
        w - pad,
        h - pad + 16.0,
        max_len
    );
    let summary = escape(&serde_json::to_string_pretty(summaries).unwrap_or_default());
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>{t}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:900px}} svg{{border:1px solid #ccc;background:#fff}} pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>{t}</h1>
<h2>Latency by percentile</h2><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{lat}</svg>
<h2>Deliveries per second</h2><svg width="{w}" height="{h}" viewBox="0 0 {w} {h}">{tl}</svg>
<h2>Summary</h2><pre>{summary}</pre></body></html>"#,
        t = escape(title)
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes `summary.json`, `latency.hgrm` (and the other histograms) and `report.html` to `dir`.
pub fn write(
    dir: &Path,
    summary: &serde_json::Value,
    stats: &crate::stats::ThreadStats,
    label: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(summary)?,
    )?;
    std::fs::write(dir.join("latency.hgrm"), hgrm(&stats.latency))?;
    std::fs::write(dir.join("handshake.hgrm"), hgrm(&stats.handshake))?;
    std::fs::write(dir.join("publish.hgrm"), hgrm(&stats.publish))?;
    let timeline = summary["timeline"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    let mut series = vec![Series {
        label: format!("{label}: end to end (client)"),
        percentiles: parse_hgrm(&hgrm(&stats.latency)),
        timeline,
    }];
    // The server's publish-to-write histogram of the same run, when it exported one.
    if let Ok(text) = std::fs::read_to_string(dir.join("server-publish-to-write.hgrm")) {
        series.push(Series {
            label: format!("{label}: publish to write (server)"),
            percentiles: parse_hgrm(&text),
            timeline: Vec::new(),
        });
    }
    std::fs::write(
        dir.join("report.html"),
        html(
            &format!("ringcast-loadgen: {label}"),
            std::slice::from_ref(summary),
            &series,
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hgrm_round_trips_its_percentiles() {
        let mut h = crate::stats::histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let text = hgrm(&h);
        assert!(text.contains("#[Max     ="), "{text}");
        let points = parse_hgrm(&text);
        let median = points.iter().find(|(q, _)| *q >= 0.5).unwrap().1;
        assert!((4.9..5.1).contains(&median), "median {median} ms");
        assert_eq!(points.last().unwrap().0, 1.0);
        let page = html(
            "t",
            &[serde_json::json!({"a": "<b>"})],
            &[Series {
                label: "x".into(),
                percentiles: points,
                timeline: vec![1, 2],
            }],
        );
        assert!(page.contains("<polyline") && page.contains("&lt;b&gt;"));
    }
}
