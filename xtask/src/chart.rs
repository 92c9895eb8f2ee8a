//! The bench report as a picture: an SVG beside the JSON (plotters, SVG
//! backend only; text is left to the viewer's sans-serif font).
//!
//! - one panel per data-path suite (any suite with `setups`): per metric, each
//!   setup's median over the suite's first setup's (the physical limit, 1.00)
//!   as grouped bars, whiskers from min to max over that same median, and the
//!   ratio targets as short lines across the bar they hold (green met, red
//!   short); a target against another setup is drawn at its level on the
//!   limit's scale (target x that setup's ratio);
//! - ns/packet per program path, min..max whiskers, the ns/packet targets;
//! - every target, met or short, as text.
//!
//! Anything missing or zero is skipped, never an error: smoke runs and
//! `--suite` runs chart what they have.

use std::path::Path;

use plotters::{
    coord::Shift,
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde_json::Value;

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;

const WIDTH: u32 = 1400;
const LEGEND_WIDTH: u32 = 290;
const FONT: &str = "sans-serif";

/// (JSON key, label, unit).
const METRICS: [(&str, &str, &str); 3] = [
    ("tcp_rr_tps", "TCP_RR", "trans/s"),
    ("tcp_crr_tps", "TCP_CRR", "trans/s"),
    ("tcp_stream_gbps", "TCP stream", "Gbit/s"),
];

const LIMIT_GREY: RGBColor = RGBColor(150, 150, 150);
const OURS: [RGBColor; 3] = [RGBColor(31, 119, 180), RGBColor(23, 190, 207), RGBColor(44, 62, 140)];
const THEIRS: [RGBColor; 3] = [RGBColor(255, 127, 14), RGBColor(214, 39, 40), RGBColor(188, 110, 60)];
const MET: RGBColor = RGBColor(0, 140, 60);
const SHORT: RGBColor = RGBColor(205, 20, 20);

#[derive(Clone, Copy)]
struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

/// Category axes count in thousandths (plotters formats custom key points of
/// integer axes only): category `k` is at `k * 1000`.
fn at(x: f64) -> i32 {
    (x * 1000.0).round() as i32
}

fn category(x: i32) -> i64 {
    (f64::from(x) / 1000.0).round() as i64
}

fn spread(v: &Value) -> Option<Spread> {
    let f = |k: &str| v[k].as_f64().filter(|x| x.is_finite());
    Some(Spread { min: f("min")?, median: f("median")?, max: f("max")? })
}

/// Ratio of `s` to `base`, when `base` can divide.
fn over(s: Spread, base: f64) -> Option<Spread> {
    (base.is_finite() && base > 0.0).then(|| Spread {
        min: s.min / base,
        median: s.median / base,
        max: s.max / base,
    })
}

struct Target {
    what: String,
    value: f64,
    target: f64,
    at_least: bool,
    met: bool,
    /// (suite, setup, versus, metric key) for ratio targets.
    ratio_of: Option<(String, String, String, String)>,
}

fn targets(report: &Value) -> Vec<Target> {
    let all = suites(report).filter_map(|s| s["targets"].as_array()).flatten();
    all.filter_map(|t| {
        let what = t["what"].as_str()?.to_owned();
        let r = &t["ratio_of"];
        let field = |k: &str| r[k].as_str().map(str::to_owned);
        // Reports from before `ratio_of` was written: the bench's own table.
        let ratio_of = match (field("suite"), field("setup"), field("versus"), field("metric")) {
            (Some(a), Some(b), Some(c), Some(d)) => Some((a, b, c, d)),
            _ => crate::bench::RATIO_TARGETS
                .iter()
                .find(|r| r.what == what)
                .map(|r| (r.suite.to_owned(), r.setup.to_owned(), r.versus.to_owned(), r.metric.to_owned())),
        };
        Some(Target {
            what,
            value: t["value"].as_f64().unwrap_or(f64::NAN),
            target: t["target"].as_f64()?,
            at_least: t["at_least"].as_bool().unwrap_or(false),
            met: t["met"].as_bool().unwrap_or(false),
            ratio_of,
        })
    })
    .collect()
}

fn suites(report: &Value) -> impl Iterator<Item = &Value> {
    report["suites"].as_array().into_iter().flatten()
}

/// Draw `report` (as `cargo xtask bench` writes it) into the SVG at `path`.
pub(crate) fn draw(report: &Value, path: &Path) -> anyhow::Result<()> {
    let data_paths: Vec<&Value> =
        suites(report).filter(|s| s["setups"].as_array().is_some_and(|a| !a.is_empty())).collect();
    let programs: Vec<(String, Spread)> = suites(report)
        .filter_map(|s| s["ns_per_packet"].as_array())
        .flatten()
        .filter_map(|p| Some((p["path"].as_str()?.to_owned(), spread(&p["stats"])?)))
        .collect();
    let targets = targets(report);

    const TITLE: u32 = 50;
    const SUITE: u32 = 470;
    let programs_height = if programs.is_empty() { 0 } else { 110 + 46 * programs.len() as u32 };
    let targets_height = if targets.is_empty() { 0 } else { 50 + 24 * targets.len().div_ceil(2) as u32 };
    let empty_height =
        if data_paths.is_empty() && programs.is_empty() && targets.is_empty() { 80 } else { 0 };
    let height = TITLE + SUITE * data_paths.len() as u32 + programs_height + targets_height + empty_height;

    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut rest = root.titled(&title(report), (FONT, 22).into_font().style(FontStyle::Bold))?;
    for suite in data_paths {
        let (panel, below) = rest.split_vertically(SUITE);
        suite_panel(&panel, suite, &targets)?;
        rest = below;
    }
    if !programs.is_empty() {
        let (panel, below) = rest.split_vertically(programs_height);
        programs_panel(&panel, &programs, &targets)?;
        rest = below;
    }
    if !targets.is_empty() {
        targets_panel(&rest, &targets)?;
    } else if empty_height > 0 {
        rest.draw(&Text::new("no suites in this report", (40, 20), (FONT, 20)))?;
    }
    root.present()?;
    Ok(())
}

fn title(report: &Value) -> String {
    let m = &report["machine"];
    let mut title = String::from("cargo xtask bench");
    if let Some(kernel) = m["kernel"].as_str() {
        title += &format!(" \u{2014} kernel {kernel}");
    }
    if let Some(cpus) = m["cpus"].as_u64() {
        title += &format!(", {cpus} CPUs");
    }
    if let Some(model) = m["cpu_model"].as_str() {
        title += &format!(" ({model})");
    }
    if m["smoke"].as_bool() == Some(true) {
        title += " \u{2014} SMOKE RUN (figures mean nothing)";
    }
    title
}

/// `40016` as "40.0k", `30.68` as "30.7".
fn short_number(x: f64) -> String {
    if x.abs() >= 1e6 {
        format!("{:.1}M", x / 1e6)
    } else if x.abs() >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.1}")
    }
}

/// "Linux bridge (flannel)" as "bridge", "flannel host-gw" as "host-gw".
fn short_setup(name: &str) -> &str {
    let name = name.split(" (").next().unwrap_or(name).trim();
    name.rsplit(' ').next().unwrap_or(name)
}

fn colors(setups: &[&str]) -> Vec<RGBColor> {
    let (mut ours, mut theirs) = (0, 0);
    setups
        .iter()
        .enumerate()
        .map(|(i, name)| {
            if i == 0 {
                LIMIT_GREY
            } else if name.starts_with("ours") {
                ours += 1;
                OURS[(ours - 1) % OURS.len()]
            } else {
                theirs += 1;
                THEIRS[(theirs - 1) % THEIRS.len()]
            }
        })
        .collect()
}

fn suite_panel(area: &Area, suite: &Value, targets: &[Target]) -> anyhow::Result<()> {
    let name = suite["suite"].as_str().unwrap_or("?");
    let setups: Vec<&Value> = suite["setups"].as_array().map(|a| a.iter().collect()).unwrap_or_default();
    let names: Vec<&str> = setups.iter().map(|s| s["setup"].as_str().unwrap_or("?")).collect();
    let colors = colors(&names);
    let baseline: Vec<Option<f64>> =
        METRICS.iter().map(|(key, ..)| spread(&setups[0][key]).map(|s| s.median)).collect();
    // ratios[setup][metric]
    let ratios: Vec<Vec<Option<Spread>>> = setups
        .iter()
        .map(|s| {
            METRICS.iter().zip(&baseline).map(|((key, ..), base)| over(spread(&s[key])?, (*base)?)).collect()
        })
        .collect();
    // Target lines: (setup index, metric index, level on the limit's scale, target).
    let lines: Vec<(usize, usize, f64, &Target)> = targets
        .iter()
        .filter_map(|t| {
            let (t_suite, setup, versus, metric) = t.ratio_of.as_ref()?;
            if t_suite != name {
                return None;
            }
            let i = names.iter().position(|n| n == setup)?;
            let m = METRICS.iter().position(|(key, ..)| key == metric)?;
            let v = names.iter().position(|n| n == versus)?;
            let level = t.target * ratios[v][m]?.median;
            level.is_finite().then_some((i, m, level, t))
        })
        .collect();

    let top = ratios
        .iter()
        .flatten()
        .flatten()
        .map(|r| r.max)
        .chain(lines.iter().map(|l| l.2))
        .fold(1.0f64, f64::max);
    let y_max = (top * 1.08 * 10.0).ceil() / 10.0;

    let (plot, legend) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let count = |key: &str| suite[key].as_u64().map_or("?".into(), |n| n.to_string());
    let caption = format!(
        "{name}: median / {} median, whiskers min..max ({} repeat{} x {} s)",
        names[0],
        count("repeats"),
        if suite["repeats"].as_u64() == Some(1) { "" } else { "s" },
        count("duration_s"),
    );
    let x_labels: Vec<String> = METRICS
        .iter()
        .zip(&baseline)
        .map(|((_, label, unit), base)| match base {
            Some(b) if *b > 0.0 => format!("{label} (limit {} {unit})", short_number(*b)),
            _ => format!("{label} (no limit figure)"),
        })
        .collect();
    let mut chart = ChartBuilder::on(&plot)
        .caption(caption, (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(
            (at(-0.5)..at(2.5)).with_key_points(vec![at(0.0), at(1.0), at(2.0)]),
            0f64..y_max,
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&|x| {
            usize::try_from(category(*x)).ok().and_then(|k| x_labels.get(k)).cloned().unwrap_or_default()
        })
        .y_label_formatter(&|y| format!("{y:.1}"))
        .y_desc("ratio to the limit's median")
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 15))
        .draw()?;

    let group = 0.84;
    let bar = group / setups.len() as f64;
    let bar_x = |i: usize, m: usize| {
        let x0 = m as f64 - group / 2.0 + i as f64 * bar;
        (at(x0 + bar * 0.06), at(x0 + bar * 0.94))
    };
    let value_style = TextStyle::from((FONT, 13).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    for (i, per_metric) in ratios.iter().enumerate() {
        for (m, r) in per_metric.iter().enumerate() {
            let (x0, x1) = bar_x(i, m);
            let xc = (x0 + x1) / 2;
            let Some(r) = r else {
                chart
                    .plotting_area()
                    .draw(&(EmptyElement::at((xc, 0.0)) + Text::new("n/a", (0, -4), value_style.clone())))?;
                continue;
            };
            chart.plotting_area().draw(&Rectangle::new([(x0, 0.0), (x1, r.median)], colors[i].filled()))?;
            let cap = (x1 - x0) / 4;
            let whisker = ShapeStyle::from(&BLACK).stroke_width(2);
            for points in [
                vec![(xc, r.min), (xc, r.max)],
                vec![(xc - cap, r.min), (xc + cap, r.min)],
                vec![(xc - cap, r.max), (xc + cap, r.max)],
            ] {
                chart.plotting_area().draw(&PathElement::new(points, whisker))?;
            }
            // The median's ratio at the foot of the bar, out of the whiskers' way.
            chart.plotting_area().draw(
                &(EmptyElement::at((xc, 0.0))
                    + Text::new(format!("{:.2}", r.median), (0, -6), value_style.clone().color(&WHITE))),
            )?;
        }
    }
    chart.plotting_area().draw(&DashedPathElement::new(
        vec![(at(-0.5), 1.0), (at(2.5), 1.0)],
        6,
        4,
        ShapeStyle::from(&BLACK.mix(0.5)).stroke_width(1),
    ))?;
    // Each line's label on a white box: above its line, else below, else
    // further off, clear of the other lines and labels (in pixels of `plot`).
    let base = plot.get_base_pixel();
    let px = |x: i32, y: f64| {
        let (px, py) = chart.backend_coord(&(x, y));
        (px - base.0, py - base.1)
    };
    // Whiskers' caps stay visible.
    let mut taken: Vec<[i32; 4]> = Vec::new();
    for (i, per_metric) in ratios.iter().enumerate() {
        for (m, r) in per_metric.iter().enumerate() {
            let ((x0, x1), Some(r)) = (bar_x(i, m), r) else { continue };
            for y in [r.min, r.max] {
                let ((l, y), (r, _)) = (px(x0, y), px(x1, y));
                taken.push([l, y - 2, r, y + 2]);
            }
        }
    }
    for &(i, m, level, t) in &lines {
        let (x0, x1) = bar_x(i, m);
        let ext = (x1 - x0) / 8;
        let color = if t.met { MET } else { SHORT };
        chart
            .plotting_area()
            .draw(&PathElement::new(vec![(x0 - ext, level), (x1 + ext, level)], color.stroke_width(3)))?;
        let ((l, y), (r, _)) = (px(x0 - ext, level), px(x1 + ext, level));
        taken.push([l, y - 2, r, y + 2]);
    }
    const LABEL: i32 = 12;
    for &(i, m, level, t) in &lines {
        let (x0, x1) = bar_x(i, m);
        let (cx, y) = px((x0 + x1) / 2, level);
        let (_, _, versus, _) = t.ratio_of.as_ref().expect("lines are ratio targets");
        let label = if versus == names[0] {
            format!("\u{2265}{:.2}", t.target)
        } else {
            format!("\u{2265}{:.2}\u{00d7} {}", t.target, short_setup(versus))
        };
        let (w, h) = ((label.chars().count() as f64 * 0.56 * f64::from(LABEL)) as i32 + 6, LABEL + 4);
        let free =
            |b: &[i32; 4]| !taken.iter().any(|o| b[0] < o[2] && o[0] < b[2] && b[1] < o[3] && o[1] < b[3]);
        let (above, below) = (y - 3 - h, y + 3);
        let candidates = [0, w / 3, -w / 3, 2 * w / 3, -2 * w / 3]
            .into_iter()
            .flat_map(|dx| [(dx, above), (dx, below)])
            .chain([(0, above - h), (0, below + h), (0, above - 2 * h)]);
        let b = candidates
            .map(|(dx, top)| [cx + dx - w / 2, top, cx + dx + w / 2, top + h])
            .find(free)
            .unwrap_or([cx - w / 2, above, cx + w / 2, above + h]);
        taken.push(b);
        plot.draw(&Rectangle::new([(b[0], b[1]), (b[2], b[3])], WHITE.mix(0.85).filled()))?;
        plot.draw(&Text::new(
            label,
            ((b[0] + b[2]) / 2, b[1] + h / 2),
            TextStyle::from((FONT, LABEL).into_font()).pos(Pos::new(HPos::Center, VPos::Center)).color(&if t
                .met
            {
                MET
            } else {
                SHORT
            }),
        ))?;
    }

    legend_panel(&legend, &names, &colors, !lines.is_empty())
}

fn legend_panel(area: &Area, names: &[&str], colors: &[RGBColor], targets: bool) -> anyhow::Result<()> {
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let mut y = 60;
    for (name, color) in names.iter().zip(colors) {
        area.draw(&Rectangle::new([(4, y - 8), (24, y + 8)], color.filled()))?;
        area.draw(&Text::new(name.to_string(), (32, y), style.clone()))?;
        y += 28;
    }
    y += 10;
    let black = ShapeStyle::from(&BLACK).stroke_width(2);
    area.draw(&PathElement::new(vec![(14, y - 9), (14, y + 9)], black))?;
    area.draw(&PathElement::new(vec![(9, y - 9), (19, y - 9)], black))?;
    area.draw(&PathElement::new(vec![(9, y + 9), (19, y + 9)], black))?;
    area.draw(&Text::new("min..max over repeats", (32, y), style.clone()))?;
    y += 28;
    area.draw(&DashedPathElement::new(vec![(2, y), (26, y)], 6, 4, ShapeStyle::from(&BLACK.mix(0.5))))?;
    area.draw(&Text::new("the limit (1.00)", (32, y), style.clone()))?;
    if targets {
        for (color, what) in [(MET, "target, met"), (SHORT, "target, short")] {
            y += 28;
            area.draw(&PathElement::new(vec![(2, y), (26, y)], color.stroke_width(3)))?;
            area.draw(&Text::new(what, (32, y), style.clone()))?;
        }
        y += 24;
        for line in [
            "\u{2265}k: at least k (x the limit)",
            "\u{2265}k\u{00d7} X: at least k x setup X,",
            "drawn at that level here",
        ] {
            area.draw(&Text::new(line, (4, y), style.clone().color(&BLACK.mix(0.7))))?;
            y += 20;
        }
    }
    Ok(())
}

fn programs_panel(area: &Area, paths: &[(String, Spread)], targets: &[Target]) -> anyhow::Result<()> {
    let n = paths.len();
    let top = paths.iter().map(|(_, s)| s.max).chain(targets.iter().map(|t| t.target)).fold(1.0f64, f64::max);
    let x_max = (top * 1.15 / 10.0).ceil() * 10.0;
    // First path at the top.
    let row = |i: usize| at((n - 1 - i) as f64);
    let (plot, legend) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
    let mut chart = ChartBuilder::on(&plot)
        .caption("per-packet cost of each program path (BPF_PROG_TEST_RUN), ns/packet", (FONT, 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(250)
        .build_cartesian_2d(
            0f64..x_max,
            (at(-0.5)..at(n as f64 - 0.1)).with_key_points((0..n).map(row).collect()),
        )?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .light_line_style(TRANSPARENT)
        .y_label_formatter(&|y| {
            let i = n as i64 - 1 - category(*y);
            usize::try_from(i).ok().and_then(|i| paths.get(i)).map(|p| p.0.clone()).unwrap_or_default()
        })
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc("ns/packet (median; whiskers min..max)")
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 15))
        .draw()?;
    let color = OURS[0];
    let value_style = TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let whisker = ShapeStyle::from(&BLACK).stroke_width(2);
    for (i, (name, s)) in paths.iter().enumerate() {
        let y = row(i);
        chart
            .plotting_area()
            .draw(&Rectangle::new([(0.0, y - at(0.32)), (s.median, y + at(0.32))], color.filled()))?;
        for points in [
            vec![(s.min, y), (s.max, y)],
            vec![(s.min, y - at(0.15)), (s.min, y + at(0.15))],
            vec![(s.max, y - at(0.15)), (s.max, y + at(0.15))],
        ] {
            chart.plotting_area().draw(&PathElement::new(points, whisker))?;
        }
        chart.plotting_area().draw(
            &(EmptyElement::at((s.max, y))
                + Text::new(format!("{:.0}", s.median), (8, 0), value_style.clone())),
        )?;
        for t in targets.iter().filter(|t| t.what.strip_suffix(" ns/packet") == Some(name)) {
            let c = if t.met { MET } else { SHORT };
            chart.plotting_area().draw(&PathElement::new(
                vec![(t.target, y - at(0.45)), (t.target, y + at(0.45))],
                c.stroke_width(3),
            ))?;
            let sign = if t.at_least { '\u{2265}' } else { '\u{2264}' };
            chart.plotting_area().draw(
                &(EmptyElement::at((t.target, y + at(0.45)))
                    + Text::new(
                        format!("target {sign}{}", t.target),
                        (0, -2),
                        TextStyle::from((FONT, 13).into_font())
                            .pos(Pos::new(HPos::Center, VPos::Bottom))
                            .color(&c),
                    )),
            )?;
        }
    }
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    legend.draw(&Rectangle::new([(4, 52), (24, 68)], color.filled()))?;
    legend.draw(&Text::new("median (label: ns)", (32, 60), style.clone()))?;
    Ok(())
}

fn targets_panel(area: &Area, targets: &[Target]) -> anyhow::Result<()> {
    let met = targets.iter().filter(|t| t.met).count();
    area.draw(&Text::new(
        format!("targets: {met} met, {} short (ratios are of medians)", targets.len() - met),
        (20, 14),
        (FONT, 20).into_font().style(FontStyle::Bold),
    ))?;
    let style = TextStyle::from((FONT, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let rows = targets.len().div_ceil(2);
    for (k, t) in targets.iter().enumerate() {
        let (x, y) = (20 + (k / rows) as i32 * (WIDTH as i32 / 2), 56 + (k % rows) as i32 * 24);
        let (mark, color) = if t.met { ("met", MET) } else { ("SHORT", SHORT) };
        area.draw(&Text::new(mark, (x, y), style.clone().color(&color)))?;
        let sign = if t.at_least { '\u{2265}' } else { '\u{2264}' };
        area.draw(&Text::new(
            format!("{}: {:.2} ({sign} {})", t.what, t.value, t.target),
            (x + 62, y),
            style.clone(),
        ))?;
    }
    Ok(())
}
