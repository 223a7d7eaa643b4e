//! One SVG page summarising a set of reports (`bench plot a.json b.json ... --out x.svg`):
//!
//! * top: p50 (dashed) and p99 (solid) latency in ms on a log scale against the delivered
//!   message rate, one colour per report label (`target.label`), using a report's sweep steps when
//!   it has them, else its single run;
//! * bottom: the highest rate each configuration held. When some reports carry a `shards`
//!   parameter, one bar per shard count (best report of that count) annotated with the scaling
//!   efficiency against the smallest shard count (`rate(n)/n ÷ rate(m)/m`); otherwise one bar per
//!   report label.
//!
//! Empty or degenerate inputs give a chart with a note, never a panic.

use crate::report::Report;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::Path;

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 1000;
/// Latencies under 1 µs (and zero) are drawn at 1 µs so the log axis stays finite.
const MIN_MS: f64 = 0.001;

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}

/// One point of the latency panel: delivered msgs/s, p50 ms, p99 ms.
type LatencyPoint = (f64, f64, f64);

/// A report's latency points: its sweep steps in order, or its run as one point. Steps without
/// samples are skipped.
fn latency_points(report: &Report) -> Vec<LatencyPoint> {
    let ms = |us: u64| (us as f64 / 1000.0).max(MIN_MS);
    let mut points: Vec<LatencyPoint> = if report.sweep.is_empty() {
        vec![(
            report.rates.delivered_msgs_per_second,
            report.latency_us.samples,
            report.latency_us.p50,
            report.latency_us.p99,
        )]
    } else {
        report
            .sweep
            .iter()
            .map(|s| {
                (
                    s.delivered_msgs_per_second,
                    s.latency_us.samples,
                    s.latency_us.p50,
                    s.latency_us.p99,
                )
            })
            .collect()
    }
    .into_iter()
    .filter(|&(rate, samples, _, _)| samples > 0 && rate.is_finite() && rate >= 0.0)
    .map(|(rate, _, p50, p99)| (rate, ms(p50), ms(p99)))
    .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// The `shards` parameter as a positive integer (number or numeric string), if present.
pub fn shards_of(report: &Report) -> Option<u64> {
    match report.parameters.get("shards")? {
        serde_json::Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as u64)),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|&n| n > 0)
}

/// A bar of the scaling panel: its name, the rate held, and an annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub name: String,
    pub rate: f64,
    pub note: String,
}

/// Bars for the scaling panel (see the module doc).
pub fn scaling_bars(reports: &[Report]) -> Vec<Bar> {
    let mut by_shards: BTreeMap<u64, f64> = BTreeMap::new();
    for r in reports {
        if let Some(n) = shards_of(r) {
            let rate = r.max_held_rate();
            let best = by_shards.entry(n).or_insert(0.0);
            if rate.is_finite() && rate > *best {
                *best = rate;
            }
        }
    }
    if let Some((&base_n, &base_rate)) = by_shards.iter().next() {
        let base_per_shard = base_rate / base_n as f64;
        return by_shards
            .iter()
            .map(|(&n, &rate)| {
                let note = if base_per_shard > 0.0 {
                    let efficiency = rate / n as f64 / base_per_shard * 100.0;
                    format!("{rate:.0}/s, {efficiency:.0}% of {base_n}-shard per shard")
                } else {
                    format!("{rate:.0}/s")
                };
                Bar {
                    name: format!("{n} shard{}", if n == 1 { "" } else { "s" }),
                    rate,
                    note,
                }
            })
            .collect();
    }
    reports
        .iter()
        .map(|r| {
            let rate = r.max_held_rate();
            let rate = if rate.is_finite() { rate.max(0.0) } else { 0.0 };
            Bar {
                name: r.label(),
                rate,
                note: format!("{rate:.0}/s"),
            }
        })
        .collect()
}

fn note(area: &DrawingArea<SVGBackend, Shift>, title: &str, text: &str) -> anyhow::Result<()> {
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        title.to_string(),
        (20, 20),
        ("sans-serif", 24).into_font(),
    ))
    .map_err(err)?;
    area.draw(&Text::new(
        text.to_string(),
        (w as i32 / 2 - 120, h as i32 / 2),
        ("sans-serif", 20).into_font().color(&RGBColor(90, 90, 90)),
    ))
    .map_err(err)?;
    Ok(())
}

fn latency_panel(area: &DrawingArea<SVGBackend, Shift>, reports: &[Report]) -> anyhow::Result<()> {
    const TITLE: &str = "Latency against delivered rate (p50 dashed, p99 solid)";
    let series: Vec<(String, Vec<LatencyPoint>)> = reports
        .iter()
        .map(|r| (r.label(), latency_points(r)))
        .filter(|(_, p)| !p.is_empty())
        .collect();
    if series.is_empty() {
        return note(area, TITLE, "no latency samples in these reports");
    }
    let all = series.iter().flat_map(|(_, p)| p.iter());
    let x_max = all.clone().map(|p| p.0).fold(0.0, f64::max);
    let y_lo = all.clone().map(|p| p.1.min(p.2)).fold(f64::MAX, f64::min);
    let y_hi = all.map(|p| p.1.max(p.2)).fold(MIN_MS, f64::max);
    let x_max = if x_max > 0.0 { x_max * 1.1 } else { 1.0 };
    let (y_lo, y_hi) = ((y_lo / 2.0).max(MIN_MS), y_hi * 2.0);

    let mut chart = ChartBuilder::on(area)
        .caption(TITLE, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, (y_lo..y_hi).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("delivered messages per second")
        .y_desc("latency (ms, log)")
        .y_labels(20)
        .max_light_lines(2)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y}"))
        .draw()
        .map_err(err)?;

    for (i, (label, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let p99: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.2)).collect();
        let p50: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1)).collect();
        chart
            .draw_series(LineSeries::new(p99.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{label} p99"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(p99.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
        chart
            .draw_series(DashedLineSeries::new(
                p50.clone(),
                6,
                4,
                color.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("{label} p50"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 8, y)], color.stroke_width(1))
            });
        chart
            .draw_series(
                p50.iter()
                    .map(|&p| Circle::new(p, 3, color.stroke_width(1))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    Ok(())
}

fn scaling_panel(area: &DrawingArea<SVGBackend, Shift>, reports: &[Report]) -> anyhow::Result<()> {
    let bars = scaling_bars(reports);
    let by_shards = reports.iter().any(|r| shards_of(r).is_some());
    let title = if by_shards {
        "Highest rate held by shard count (efficiency per shard)"
    } else {
        "Highest rate held per configuration"
    };
    if bars.is_empty() {
        return note(area, title, "no reports to compare");
    }
    let y_max = bars.iter().map(|b| b.rate).fold(0.0, f64::max);
    let y_max = if y_max > 0.0 { y_max * 1.2 } else { 1.0 };
    let names: Vec<String> = bars.iter().map(|b| b.name.clone()).collect();
    // Bars at most ~220 px wide, whatever their number.
    let segment = area.dim_in_pixel().0.saturating_sub(120) / bars.len() as u32;
    // plotters applies the margin on both sides of a bar; keep at least a third of the segment.
    let margin = (segment.saturating_sub(220) / 2).clamp(4, segment / 3);

    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        // Integer ranges include their end: `0..n - 1` gives exactly n segments.
        .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .y_max_light_lines(1)
        .x_labels(bars.len() + 1)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_desc("messages per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(Palette99::pick(0).mix(0.7).filled())
                .margin(margin)
                .data(bars.iter().enumerate().map(|(i, b)| (i, b.rate))),
        )
        .map_err(err)?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, b)| {
            Text::new(
                b.note.clone(),
                (SegmentValue::CenterOf(i), b.rate + y_max * 0.03),
                TextStyle::from(("sans-serif", 15).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Bottom)),
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// Renders `reports` into one SVG at `out` (see the module doc).
pub fn plot(reports: &[Report], out: &Path) -> anyhow::Result<()> {
    let svg = render_svg(reports)?;
    std::fs::write(out, svg).map_err(|e| anyhow::anyhow!("writing {}: {e}", out.display()))
}

/// The SVG text `plot` writes.
pub fn render_svg(reports: &[Report]) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically(HEIGHT * 3 / 5);
        latency_panel(&top, reports)?;
        scaling_panel(&bottom, reports)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::tests::filled;

    #[test]
    fn plots_two_reports_into_an_svg_file() {
        let reports = vec![filled("gateway 1 shard", 1), filled("gateway 2 shards", 2)];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.svg");
        plot(&reports, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
        for label in ["gateway 1 shard", "gateway 2 shards"] {
            assert!(svg.contains(label), "no {label:?} in the SVG");
        }
        // Both held 3996/s per shard at their best step: 100% efficiency.
        assert!(svg.contains("100% of 1-shard per shard"));
        // Every bar is drawn: a margin wider than half the segment once gave negative widths,
        // which SVG viewers draw as nothing.
        assert!(!svg.contains("width=\"-"), "a rect with negative width");
    }

    #[test]
    fn two_bars_without_shard_counts_are_visible() {
        // Goal: the fallback panel (one bar per label, no `shards` parameter) draws its bars.
        // Method: two reports without shards; every <rect> of the bar colour has a positive width.
        let mut a = filled("gateway", 1);
        let mut b = filled("ejabberd", 1);
        a.parameters.remove("shards");
        b.parameters.remove("shards");
        let svg = render_svg(&[a, b]).unwrap();
        let bars: Vec<&str> = svg
            .match_indices("<rect")
            .map(|(i, _)| &svg[i..])
            .filter(|r| r.contains("opacity=\"0.7\""))
            .collect();
        assert!(bars.len() >= 2, "bars drawn: {}", bars.len());
        assert!(!svg.contains("width=\"-"), "a rect with negative width");
    }

    #[test]
    fn empty_and_degenerate_inputs_do_not_panic() {
        let svg = render_svg(&[]).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("no latency samples"));
        assert!(svg.contains("no reports to compare"));

        let mut blank = crate::report::Report::new(
            "idle",
            crate::report::Target::default(),
            serde_json::Map::new(),
        );
        blank.rates.delivered_msgs_per_second = f64::NAN;
        let mut single = filled("single point", 1);
        single.sweep.clear();
        single.parameters.remove("shards");
        let mut zero = filled("zero rate", 1);
        zero.sweep.clear();
        zero.parameters.remove("shards");
        zero.rates.delivered_msgs_per_second = 0.0;
        zero.latency_us.p50 = 0;
        let svg = render_svg(&[blank, single.clone(), zero]).unwrap();
        assert!(svg.contains("single point") && svg.contains("zero rate"));
        let svg = render_svg(&[single]).unwrap();
        assert!(svg.contains("single point"));
    }

    #[test]
    fn scaling_bars_by_shard_count() {
        let mut one = filled("a", 1);
        one.sweep.clear();
        one.rates.delivered_msgs_per_second = 1000.0;
        let mut four = filled("b", 4);
        four.sweep.clear();
        four.rates.delivered_msgs_per_second = 3000.0;
        let mut four_text = four.clone();
        four_text
            .parameters
            .insert("shards".into(), serde_json::Value::String("4".into()));
        four_text.rates.delivered_msgs_per_second = 2500.0;
        let bars = scaling_bars(&[four, one, four_text]);
        assert_eq!(bars.len(), 2);
        assert_eq!(bars[0].name, "1 shard");
        assert_eq!(bars[1].name, "4 shards");
        assert_eq!(bars[1].rate, 3000.0);
        assert!(bars[1].note.contains("75%"), "{}", bars[1].note);
    }
}
