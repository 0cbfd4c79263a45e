//! PNG plots of an evaluation report, next to report.md: `accuracy.png` (accuracy per turn, overall
//! and per category) and `transitions.png` (right/wrong transition counts per consecutive turn
//! pair). Charts are drawn with plotters into an RGB buffer, labels with the built-in bitmap font
//! (`font`), and the buffer is written as PNG by the `image` crate: no font files, no system
//! libraries.
use std::path::Path;

use plotters::prelude::*;

use super::font;
use super::report::Report;

/// Every plot's size in pixels (width, height).
pub const SIZE: (u32, u32) = (720, 440);
/// Plot file names, as report.md links them.
pub const ACCURACY: &str = "accuracy.png";
pub const TRANSITIONS: &str = "transitions.png";

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];
const INK: [u8; 3] = [20, 20, 20];
/// Margins around the plotting area: left, right, top, bottom.
const MARGIN: (i32, i32, i32, i32) = (70, 20, 60, 50);

fn rgb(c: &RGBColor) -> [u8; 3] {
    [c.0, c.1, c.2]
}

fn plot_err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing the plot: {e:?}")
}

/// A label to draw after the chart (the chart borrows the buffer while it draws).
struct Label {
    at: (i32, i32),
    text: String,
    rgb: [u8; 3],
    /// 0 = left-aligned at `at`, 1 = centred, 2 = right-aligned.
    align: u8,
}

impl Label {
    fn new(at: (i32, i32), text: impl Into<String>, align: u8) -> Self {
        Self {
            at,
            text: text.into(),
            rgb: INK,
            align,
        }
    }
}

/// Draws the labels (scale 1, vertically centred on `at.1`) and writes the PNG.
fn finish(buf: &mut [u8], labels: &[Label], path: &Path) -> Result<(), String> {
    let (w, h) = SIZE;
    for l in labels {
        let tw = font::text_width(&l.text, 1) as i32;
        let x = l.at.0 - tw * l.align as i32 / 2;
        let y = l.at.1 - font::HEIGHT as i32 / 2;
        font::draw_text(buf, w, h, (x, y), &l.text, 1, l.rgb);
    }
    let img = image::RgbImage::from_raw(w, h, buf.to_vec())
        .ok_or_else(|| "plot buffer has the wrong size".to_string())?;
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The plotting area in pixels: (x0, y0, x1, y1).
fn area() -> (i32, i32, i32, i32) {
    let (w, h) = (SIZE.0 as i32, SIZE.1 as i32);
    (MARGIN.0, MARGIN.2, w - MARGIN.1, h - MARGIN.3)
}

/// Where legend entry `k` of accuracy.png goes (its left end, vertical centre): two rows of four
/// between the title and the chart, 150 px apart (a colour box and 16 characters).
fn legend_slot(k: usize) -> (i32, i32) {
    (
        area().0 + 10 + 150 * (k % 4) as i32,
        36 + 14 * (k / 4) as i32,
    )
}

/// accuracy.png: accuracy (%) per turn, overall (thick, drawn over the others) and per category
/// (the largest first), each named with its number of questions.
pub fn accuracy(report: &Report, path: &Path) -> Result<(), String> {
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let mut labels = vec![Label::new((w as i32 / 2, 20), "Accuracy per turn", 1)];
    let n = report.turns.len().max(1);
    let line = |name: &str, turns: &[super::report::TurnScore]| {
        let questions = turns.first().map_or(0, |t| t.total);
        let name: String = name.chars().take(10).collect();
        let ys = turns
            .iter()
            .map(|t| 100.0 * t.accuracy)
            .collect::<Vec<f64>>();
        (format!("{name} ({questions})"), ys, questions)
    };
    let mut categories: Vec<(String, Vec<f64>, usize)> = (report.by_category.iter())
        .map(|(cat, b)| line(cat, &b.turns))
        .collect();
    categories.sort_by_key(|c| std::cmp::Reverse(c.2));
    let mut series: Vec<(String, Vec<f64>)> = vec![];
    for (name, ys, _) in std::iter::once(line("all", &report.turns)).chain(categories) {
        series.push((name, ys));
    }
    // one colour per series; with more categories than colours, the last legend slot says how
    // many are left out (report.md's table has them all)
    if series.len() > PALETTE.len() {
        series.truncate(PALETTE.len() - 1);
    }
    let left_out = 1 + report.by_category.len() - series.len();
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        let (x0, y0, x1, y1) = area();
        let plot = root.margin(y0 as u32, h - y1 as u32, x0 as u32, w - x1 as u32);
        let mut chart = ChartBuilder::on(&plot)
            .build_cartesian_2d(-0.25f64..(n as f64 - 0.75), 0f64..100f64)
            .map_err(plot_err)?;
        for pct in [0.0, 25.0, 50.0, 75.0, 100.0] {
            let style = if pct == 0.0 {
                BLACK
            } else {
                RGBColor(220, 220, 220)
            };
            chart
                .draw_series(LineSeries::new(
                    [(-0.25, pct), (n as f64 - 0.75, pct)],
                    style,
                ))
                .map_err(plot_err)?;
            let (_, y) = chart.backend_coord(&(0.0, pct));
            labels.push(Label::new((x0 - 8, y), format!("{pct:.0}%"), 2));
        }
        for t in 0..n {
            let (x, _) = chart.backend_coord(&(t as f64, 0.0));
            labels.push(Label::new((x, y1 + 14), format!("turn {t}"), 1));
        }
        // (drawn last to first: the overall line on top)
        for (k, (name, ys)) in series.iter().enumerate().rev() {
            let color = PALETTE[k];
            let width = if k == 0 { 3 } else { 1 };
            let pts: Vec<(f64, f64)> = ys.iter().enumerate().map(|(t, &y)| (t as f64, y)).collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(width)))
                .map_err(plot_err)?;
            chart
                .draw_series(
                    pts.iter()
                        .map(|&p| Circle::new(p, 3 + width, color.filled())),
                )
                .map_err(plot_err)?;
            // legend: two rows of four above the chart
            let (lx, ly) = legend_slot(k);
            root.draw(&Rectangle::new(
                [(lx, ly - 4), (lx + 14, ly + 4)],
                color.filled(),
            ))
            .map_err(plot_err)?;
            let mut l = Label::new((lx + 18, ly), name.clone(), 0);
            l.rgb = rgb(&color);
            labels.push(l);
        }
        if left_out > 0 {
            let (lx, ly) = legend_slot(series.len());
            labels.push(Label::new(
                (lx, ly),
                format!("+{left_out} more (report.md)"),
                0,
            ));
        }
        root.present().map_err(plot_err)?;
    }
    finish(&mut buf, &labels, path)
}

/// transitions.png: per consecutive turn pair, bars of right->right, right->wrong, wrong->right and
/// wrong->wrong counts.
pub fn transitions(report: &Report, path: &Path) -> Result<(), String> {
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let mut labels = vec![Label::new(
        (w as i32 / 2, 20),
        "Transitions between consecutive turns",
        1,
    )];
    const KINDS: [&str; 4] = [
        "right->right",
        "right->wrong",
        "wrong->right",
        "wrong->wrong",
    ];
    let colors = [PALETTE[2], PALETTE[3], PALETTE[0], PALETTE[7]];
    let pairs = report.transitions.len().max(1);
    let max = report
        .transitions
        .iter()
        .flat_map(|t| [t.right_right, t.right_wrong, t.wrong_right, t.wrong_wrong])
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        let (x0, y0, x1, y1) = area();
        let plot = root.margin(y0 as u32, h - y1 as u32, x0 as u32, w - x1 as u32);
        let mut chart = ChartBuilder::on(&plot)
            .build_cartesian_2d(0f64..pairs as f64, 0f64..max * 1.12)
            .map_err(plot_err)?;
        chart
            .draw_series(LineSeries::new([(0.0, 0.0), (pairs as f64, 0.0)], BLACK))
            .map_err(plot_err)?;
        for (p, t) in report.transitions.iter().enumerate() {
            let counts = [t.right_right, t.right_wrong, t.wrong_right, t.wrong_wrong];
            for (k, &c) in counts.iter().enumerate() {
                let left = p as f64 + 0.1 + 0.2 * k as f64;
                chart
                    .draw_series([Rectangle::new(
                        [(left, 0.0), (left + 0.18, c as f64)],
                        colors[k].filled(),
                    )])
                    .map_err(plot_err)?;
                let (x, y) = chart.backend_coord(&(left + 0.09, c as f64));
                labels.push(Label::new((x, y - 9), c.to_string(), 1));
            }
            let (x, _) = chart.backend_coord(&(p as f64 + 0.5, 0.0));
            labels.push(Label::new(
                (x, y1 + 14),
                format!("turn {} -> {}", t.from, t.to),
                1,
            ));
        }
        for (k, kind) in KINDS.iter().enumerate() {
            let lx = x0 + 10 + 150 * k as i32;
            root.draw(&Rectangle::new(
                [(lx, 38), (lx + 14, 46)],
                colors[k].filled(),
            ))
            .map_err(plot_err)?;
            labels.push(Label::new((lx + 18, 42), *kind, 0));
        }
        let (_, ytop) = chart.backend_coord(&(0.0, max));
        labels.push(Label::new((x0 - 8, ytop), format!("{max:.0}"), 2));
        labels.push(Label::new((x0 - 8, y1), "0", 2));
        root.present().map_err(plot_err)?;
    }
    if report.transitions.is_empty() {
        labels.push(Label::new(
            (w as i32 / 2, h as i32 / 2),
            "one turn only: no transitions",
            1,
        ));
    }
    finish(&mut buf, &labels, path)
}

/// Writes both plots into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Result<(), String> {
    accuracy(report, &dir.join(ACCURACY))?;
    transitions(report, &dir.join(TRANSITIONS))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every legend entry (a colour box, 16 characters; the last slot's "+N more (report.md)")
    /// lies inside the image, between the title and the chart.
    #[test]
    fn the_legend_fits_above_the_chart() {
        let text_w = |chars: usize| (chars as u32 * font::WIDTH) as i32;
        for k in 0..PALETTE.len() {
            let (x, y) = legend_slot(k);
            assert!(
                x + 18 + text_w(16) <= SIZE.0 as i32,
                "entry {k} ends past the image"
            );
            assert!(x + text_w("+99 more (report.md)".len()) <= SIZE.0 as i32);
            let half = font::HEIGHT as i32 / 2;
            assert!(
                y - half > 20 + half && y + half < area().1,
                "entry {k} row {y}"
            );
        }
    }
}
