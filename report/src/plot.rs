//! SVG charts drawn as text: scales with "nice" ticks, lines, markers, stacked step areas,
//! vertical markers, and hover tooltips. The SVG is meant to be inlined in an HTML page
//! (no namespace declaration, no external references); callers pass plain text, which is
//! escaped here.

use std::fmt::Write as _;

use super::page::escape;

/// The drawing's size in SVG units (it scales to the page's width).
pub const WIDTH: f64 = 1130.0;
pub const HEIGHT: f64 = 300.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 46.0;
const LEFT: f64 = 74.0;
/// The same with or without a right-hand axis, so that the plots of a page line up by step.
const RIGHT: f64 = 74.0;

/// An axis: its range and tick values.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    pub lo: f64,
    pub hi: f64,
    pub step: f64,
    pub ticks: Vec<f64>,
}

impl Scale {
    /// A range covering `values` (non-finite ones ignored) with about `target` ticks at 1, 2
    /// or 5 times a power of ten; from zero when `zero`, and at whole numbers when `integer`.
    pub fn nice(
        values: impl IntoIterator<Item = f64>,
        target: usize,
        zero: bool,
        integer: bool,
    ) -> Scale {
        let (mut lo, mut hi) = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            });
        if lo > hi {
            (lo, hi) = (0.0, 1.0);
        }
        if zero {
            lo = lo.min(0.0);
            hi = hi.max(0.0);
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.1 };
            if zero && lo >= 0.0 {
                hi += pad;
            } else {
                lo -= pad;
                hi += pad;
            }
        }
        let raw = (hi - lo) / target.max(1) as f64;
        let magnitude = 10f64.powf(raw.log10().floor());
        let norm = raw / magnitude;
        let mut step = magnitude
            * if norm <= 1.0 {
                1.0
            } else if norm <= 2.0 {
                2.0
            } else if norm <= 5.0 {
                5.0
            } else {
                10.0
            };
        if integer {
            step = step.max(1.0).round();
        }
        let first = (lo / step + 1e-9).floor() as i64;
        let last = (hi / step - 1e-9).ceil() as i64;
        let ticks: Vec<f64> = (first..=last).map(|k| k as f64 * step).collect();
        Scale {
            lo: first as f64 * step,
            hi: last as f64 * step,
            step,
            ticks,
        }
    }

    /// A range from zero covering `values` in exactly `intervals` ticks steps of 1, 2, 2.5
    /// or 5 times a power of ten: a second axis whose ticks fall on the first one's grid.
    pub fn aligned(values: impl IntoIterator<Item = f64>, intervals: usize) -> Scale {
        let max = values
            .into_iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        let n = intervals.max(1);
        let raw = if max > 0.0 {
            max / n as f64
        } else {
            1.0 / n as f64
        };
        let magnitude = 10f64.powf(raw.log10().floor());
        let step = [1.0, 2.0, 2.5, 5.0, 10.0]
            .iter()
            .map(|m| m * magnitude)
            .find(|s| *s >= raw * (1.0 - 1e-9))
            .unwrap_or(10.0 * magnitude);
        Scale {
            lo: 0.0,
            hi: step * n as f64,
            step,
            ticks: (0..=n).map(|k| k as f64 * step).collect(),
        }
    }

    /// Where `v` falls between the pixel positions `a` (at `lo`) and `b` (at `hi`).
    fn map(&self, v: f64, a: f64, b: f64) -> f64 {
        a + (v - self.lo) / (self.hi - self.lo) * (b - a)
    }

    /// A tick value as text (see [`format_tick`]).
    pub fn label(&self, v: f64) -> String {
        format_tick(v, self.step, self.lo.abs().max(self.hi.abs()))
    }
}

/// A tick value with as many decimals as the tick `step` needs; on an axis reaching `max`
/// of 10,000 or more, in thousands (`k`), millions (`M`) or billions (`G`).
pub fn format_tick(v: f64, step: f64, max: f64) -> String {
    if v.abs() < step * 1e-6 {
        return "0".into();
    }
    for (unit, threshold, suffix) in [(1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e3, 1e4, "k")] {
        if max >= threshold {
            return format!("{}{suffix}", format_tick(v / unit, step / unit, 0.0));
        }
    }
    // The fewest decimals that show every multiple of the step exactly.
    let decimals = (0..9)
        .find(|&d| {
            let scaled = step * 10f64.powi(d);
            (scaled - scaled.round()).abs() < 1e-6 * scaled.max(1.0)
        })
        .unwrap_or(9) as usize;
    format!("{v:.decimals$}")
}

/// Which vertical axis a series is drawn against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Side {
    Left,
    Right,
}

/// A chart under construction: axes fixed first, then series added in drawing order.
pub struct Plot {
    x: Scale,
    y: Scale,
    y2: Option<Scale>,
    x_title: String,
    y_title: String,
    y2_title: String,
    body: String,
}

impl Plot {
    pub fn new(x: Scale, x_title: &str, y: Scale, y_title: &str) -> Plot {
        Plot {
            x,
            y,
            y2: None,
            x_title: x_title.into(),
            y_title: y_title.into(),
            y2_title: String::new(),
            body: String::new(),
        }
    }

    /// Adds a right-hand axis.
    pub fn with_right_axis(mut self, y2: Scale, title: &str) -> Plot {
        self.y2 = Some(y2);
        self.y2_title = title.into();
        self
    }

    fn px(&self, x: f64) -> f64 {
        self.x.map(x, LEFT, WIDTH - RIGHT)
    }

    fn py(&self, y: f64, side: Side) -> f64 {
        let scale = match (side, &self.y2) {
            (Side::Right, Some(y2)) => y2,
            _ => &self.y,
        };
        scale.map(y, HEIGHT - BOTTOM, TOP)
    }

    /// A line through the points in order; a non-finite value leaves a gap. Each segment is
    /// one `<polyline>` tagged with `data-series="{series}"`.
    pub fn line(
        &mut self,
        series: &str,
        color: &str,
        points: &[(f64, f64)],
        side: Side,
        dashed: bool,
    ) {
        let mut runs: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for &(x, y) in points {
            if x.is_finite() && y.is_finite() {
                runs.last_mut().expect("never empty").push((x, y));
            } else if !runs.last().expect("never empty").is_empty() {
                runs.push(Vec::new());
            }
        }
        let dash = if dashed {
            " stroke-dasharray=\"6 4\""
        } else {
            ""
        };
        for run in runs.iter().filter(|r| !r.is_empty()) {
            let mut pts = String::new();
            for (i, &(x, y)) in run.iter().enumerate() {
                if i > 0 {
                    pts.push(' ');
                }
                let _ = write!(pts, "{:.1},{:.1}", self.px(x), self.py(y, side));
            }
            let _ = writeln!(
                self.body,
                "<polyline data-series=\"{}\" points=\"{pts}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\" stroke-linejoin=\"round\" stroke-linecap=\"round\"{dash}/>",
                escape(series),
                escape(color),
            );
        }
    }

    /// A dot per point, each with a tooltip.
    pub fn markers(&mut self, color: &str, points: &[(f64, f64, String)], side: Side, radius: f64) {
        for (x, y, title) in points {
            if !(x.is_finite() && y.is_finite()) {
                continue;
            }
            let _ = writeln!(
                self.body,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"{radius}\" fill=\"{}\" stroke=\"#fff\" stroke-width=\"1\"><title>{}</title></circle>",
                self.px(*x),
                self.py(*y, side),
                escape(color),
                escape(title),
            );
        }
    }

    /// Stacked areas over intervals: `spans[i] = (x0, x1)` holds `layers[k][i]` of layer
    /// `k`, stacked bottom to top in the order given (each layer is a step shape).
    pub fn stacked(&mut self, spans: &[(f64, f64)], layers: &[(String, String, Vec<f64>)]) {
        let mut base = vec![0.0; spans.len()];
        for (series, color, values) in layers {
            let top: Vec<f64> = base.iter().zip(values).map(|(b, v)| b + v).collect();
            let mut pts = String::new();
            for (i, &(x0, x1)) in spans.iter().enumerate() {
                let y = self.py(top[i], Side::Left);
                let _ = write!(pts, "{:.1},{y:.1} {:.1},{y:.1} ", self.px(x0), self.px(x1));
            }
            for (i, &(x0, x1)) in spans.iter().enumerate().rev() {
                let y = self.py(base[i], Side::Left);
                let _ = write!(pts, "{:.1},{y:.1} {:.1},{y:.1} ", self.px(x1), self.px(x0));
            }
            let _ = writeln!(
                self.body,
                "<polygon data-series=\"{}\" points=\"{}\" fill=\"{}\" fill-opacity=\"0.85\" stroke=\"{}\" stroke-width=\"0.5\"/>",
                escape(series),
                pts.trim_end(),
                escape(color),
                escape(color),
            );
            base = top;
        }
    }

    /// Invisible columns over intervals that show a tooltip on hover.
    pub fn hover(&mut self, spans: &[(f64, f64)], titles: &[String]) {
        for (&(x0, x1), title) in spans.iter().zip(titles) {
            let (a, b) = (self.px(x0), self.px(x1));
            let _ = writeln!(
                self.body,
                "<rect class=\"hover\" x=\"{a:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{:.1}\"><title>{}</title></rect>",
                (b - a).max(1.0),
                HEIGHT - BOTTOM - TOP,
                escape(title),
            );
        }
    }

    /// A labelled vertical line at `x`.
    pub fn vline(&mut self, x: f64, label: &str, title: &str) {
        if !(x.is_finite() && x >= self.x.lo && x <= self.x.hi) {
            return;
        }
        let px = self.px(x);
        let _ = writeln!(
            self.body,
            "<g class=\"marker\"><line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text><title>{}</title></g>",
            HEIGHT - BOTTOM,
            px + 4.0,
            TOP + 12.0,
            escape(label),
            escape(title),
        );
    }

    /// The finished `<svg>` element; `label` is its accessible name.
    pub fn finish(self, label: &str) -> String {
        let (l, r, t, b) = (LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM);
        let mut s = format!(
            "<svg viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{}\">\n",
            escape(label)
        );
        // Grid and tick labels.
        for &v in &self.y.ticks {
            let y = self.py(v, Side::Left);
            let _ = writeln!(
                s,
                "<line class=\"grid\" x1=\"{l}\" y1=\"{y:.1}\" x2=\"{r}\" y2=\"{y:.1}\"/><text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                l - 8.0,
                y + 4.0,
                escape(&self.y.label(v)),
            );
        }
        if let Some(y2) = &self.y2 {
            for &v in &y2.ticks {
                let y = self.py(v, Side::Right);
                let _ = writeln!(
                    s,
                    "<text class=\"tick\" x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                    r + 8.0,
                    y + 4.0,
                    escape(&y2.label(v)),
                );
            }
        }
        for &v in &self.x.ticks {
            let x = self.px(v);
            let _ = writeln!(
                s,
                "<line class=\"grid\" x1=\"{x:.1}\" y1=\"{t}\" x2=\"{x:.1}\" y2=\"{b}\"/><text class=\"tick\" x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                b + 18.0,
                escape(&self.x.label(v)),
            );
        }
        s.push_str(&self.body);
        // Axes and titles on top.
        let _ = writeln!(
            s,
            "<path class=\"axis\" d=\"M{l},{t} V{b} H{r}{}\" fill=\"none\"/>",
            if self.y2.is_some() {
                format!(" V{t}")
            } else {
                String::new()
            }
        );
        let _ = writeln!(
            s,
            "<text class=\"title\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            (l + r) / 2.0,
            HEIGHT - 6.0,
            escape(&self.x_title),
        );
        let _ = writeln!(
            s,
            "<text class=\"title\" transform=\"translate(16 {:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            (t + b) / 2.0,
            escape(&self.y_title),
        );
        if self.y2.is_some() {
            let _ = writeln!(
                s,
                "<text class=\"title\" transform=\"translate({:.1} {:.1}) rotate(90)\" text-anchor=\"middle\">{}</text>",
                WIDTH - 14.0,
                (t + b) / 2.0,
                escape(&self.y2_title),
            );
        }
        s.push_str("</svg>");
        s
    }
}

/// An empty chart frame with a message, for a log without the data a plot needs.
pub fn empty(label: &str, message: &str) -> String {
    format!(
        "<svg viewBox=\"0 0 {WIDTH} 120\" role=\"img\" aria-label=\"{}\"><rect x=\"1\" y=\"1\" width=\"{}\" height=\"118\" rx=\"6\" fill=\"#f8f9fb\" stroke=\"#dde1e6\"/><text class=\"empty\" x=\"{}\" y=\"64\" text-anchor=\"middle\">{}</text></svg>",
        escape(label),
        WIDTH - 2.0,
        WIDTH / 2.0,
        escape(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_scales() {
        let s = Scale::nice([0.0, 200.0], 10, true, true);
        assert_eq!((s.lo, s.hi, s.step), (0.0, 200.0, 20.0));
        assert_eq!(s.ticks.len(), 11);
        let s = Scale::nice([5.36, 10.8], 6, false, false);
        assert_eq!((s.lo, s.hi, s.step), (5.0, 11.0, 1.0));
        let s = Scale::nice([1.0, 12.0], 8, true, true);
        assert_eq!((s.lo, s.hi, s.step), (0.0, 12.0, 2.0));
        // Integer axes never tick between whole numbers.
        let s = Scale::nice([1.0, 2.0], 8, false, true);
        assert_eq!(s.step, 1.0);
        // A single value gets a range around it; nothing gets 0..1.
        let s = Scale::nice([3.0], 5, false, false);
        assert!(s.lo < 3.0 && s.hi > 3.0);
        let s = Scale::nice([f64::NAN], 5, true, false);
        assert_eq!((s.lo, s.hi), (0.0, 1.0));
        let s = Scale::nice([0.0, 0.0], 5, true, false);
        assert_eq!((s.lo, s.hi), (0.0, 1.0));
        let s = Scale::aligned([10.0, 68.0], 3);
        assert_eq!((s.lo, s.hi, s.step), (0.0, 75.0, 25.0));
        assert_eq!(s.label(25.0), "25");
        let s = Scale::aligned([0.43], 4);
        assert_eq!((s.hi, s.step), (0.8, 0.2));
        assert_eq!(s.label(0.6000000000000001), "0.6");
        let s = Scale::aligned([9.0], 4);
        assert_eq!((s.hi, s.step), (10.0, 2.5));
        assert_eq!(s.label(7.5), "7.5");
        let s = Scale::aligned([f64::NAN], 4);
        assert_eq!(s.ticks.len(), 5);
    }

    #[test]
    fn tick_labels() {
        assert_eq!(format_tick(0.0, 0.2, 1.0), "0");
        assert_eq!(format_tick(0.4, 0.2, 1.0), "0.4");
        assert_eq!(format_tick(0.05, 0.05, 1.0), "0.05");
        assert_eq!(format_tick(7.0, 1.0, 10.0), "7");
        assert_eq!(format_tick(1500.0, 500.0, 2000.0), "1500");
        assert_eq!(format_tick(5000.0, 5000.0, 15000.0), "5k");
        assert_eq!(format_tick(12500.0, 2500.0, 15000.0), "12.5k");
        assert_eq!(format_tick(2_000_000.0, 500_000.0, 2e6), "2.0M");
        assert_eq!(format_tick(3e10, 1e10, 4e10), "30G");
        let s = Scale::nice([0.0, 18_000.0], 5, true, false);
        assert_eq!(s.label(s.ticks[1]), "5k");
    }

    #[test]
    fn lines_break_at_missing_values_and_text_is_escaped() {
        let x = Scale::nice([0.0, 4.0], 4, true, true);
        let y = Scale::nice([0.0, 1.0], 4, true, false);
        let mut p = Plot::new(x, "step", y, "<loss>");
        p.line(
            "loss",
            "#000",
            &[(1.0, 0.5), (2.0, f64::NAN), (3.0, 0.2), (4.0, 0.1)],
            Side::Left,
            false,
        );
        p.markers("#000", &[(1.0, 0.5, "a & b".into())], Side::Left, 3.0);
        let svg = p.finish("\"chart\"");
        assert_eq!(svg.matches("<polyline data-series=\"loss\"").count(), 2);
        assert!(svg.contains("&lt;loss&gt;") && svg.contains("a &amp; b"));
        assert!(svg.contains("aria-label=\"&quot;chart&quot;\""));
        assert!(!svg.contains("<loss>"));
    }
}
