//! The report page: one HTML document with its style and its SVG plots inline, nothing
//! loaded from elsewhere. Every piece of text from the log or the caller is escaped.

use std::fmt::Write as _;

use super::log::{finite, RunLog, Step, PHASES};
use super::plot::{self, Plot, Scale, Side};

/// What the page says about where the log came from.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// The job's name, when the job file is known.
    pub job: Option<String>,
    /// Where the log was read, for the page's subtitle.
    pub source: String,
}

/// Text made safe for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const LOSS: &str = "#0072b2";
const VAL_LOSS: &str = "#d55e00";
const TOKENS: &str = "#009e73";
const MFU: &str = "#cc79a7";
const STEP_TIME: &str = "#323f4b";

/// A phase's label and color.
fn phase_style(name: &str, index: usize) -> (String, &'static str) {
    let color = match name {
        "data_wait" => "#e69f00",
        "compute" => "#7fb8e0",
        "forward" => "#56b4e9",
        "backward" => "#0072b2",
        "collective" => "#d55e00",
        "optimizer" => "#009e73",
        "checkpoint" => "#cc79a7",
        _ => ["#999999", "#f0e442", "#8c6d31", "#393b79"][index % 4],
    };
    let label = PHASES
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, l)| l.to_string())
        .unwrap_or_else(|| name.replace('_', " "));
    (label, color)
}

const STYLE: &str = r#"
:root { color-scheme: light; }
* { box-sizing: border-box; }
body { margin: 0; background: #f4f5f7; color: #1f2933;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 28px 28px 36px; }
h1 { font-size: 26px; margin: 0 0 2px; letter-spacing: -0.01em; }
h2 { font-size: 17px; margin: 0 0 2px; }
.sub { color: #616e7c; margin: 0 0 18px; overflow-wrap: anywhere; }
.stats { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 10px; }
.stat { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 10px 14px; }
.stat .k { color: #616e7c; font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.stat .v { font-size: 20px; font-weight: 600; font-variant-numeric: tabular-nums;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.stat .n { color: #7b8794; font-size: 12px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 16px 20px 10px;
  margin-top: 18px; }
.card .what { color: #616e7c; font-size: 13px; margin: 0 0 8px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 20px; font-size: 13px; color: #323f4b;
  margin: 0 0 6px; }
.legend .item { display: inline-flex; align-items: center; gap: 7px; }
.sw { display: inline-block; width: 16px; height: 11px; border-radius: 2px; }
.sw.line { height: 0; border-top: 3px solid; border-radius: 0; }
.sw.dash { height: 0; border-top: 2px dashed; border-radius: 0; }
.sw.dot { width: 9px; height: 9px; border-radius: 50%; }
svg { display: block; width: 100%; height: auto; }
svg text { font-size: 12px; fill: #52606d; font-variant-numeric: tabular-nums; }
svg text.title { font-size: 12.5px; fill: #323f4b; }
svg text.empty { font-size: 14px; fill: #7b8794; }
svg .grid { stroke: #e9ecef; stroke-width: 1; }
svg .axis { stroke: #9aa5b1; stroke-width: 1; }
svg rect.hover { fill: #1f2933; fill-opacity: 0; }
svg rect.hover:hover { fill-opacity: 0.07; }
svg .marker line { stroke: #7b8794; stroke-dasharray: 3 3; }
svg .marker text { font-size: 11px; fill: #616e7c; }
table { border-collapse: collapse; min-width: 640px; font-variant-numeric: tabular-nums; margin: 4px 0 8px; }
th, td { padding: 6px 16px; border-bottom: 1px solid #eceef1; text-align: right; }
th { font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; color: #616e7c;
  font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
.none { color: #7b8794; margin: 4px 0 10px; }
ul.events { margin: 4px 0 10px; padding-left: 20px; }
footer { color: #7b8794; font-size: 12px; margin-top: 18px; }
"#;

/// The whole page.
pub fn render(log: &RunLog, meta: &Meta) -> String {
    let title = meta.job.as_deref().unwrap_or("Kiln run");
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{} \u{b7} Kiln report</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<header>\n<h1>{}</h1>\n<p class=\"sub\">Metrics log {}</p>",
        escape(title),
        escape(title),
        escape(&meta.source),
    );
    s.push_str(&summary(log));
    s.push_str("</header>\n");
    s.push_str(&loss_section(log));
    s.push_str(&throughput_section(log));
    s.push_str(&step_time_section(log));
    s.push_str(&checkpoint_section(log));
    let _ = writeln!(
        s,
        "<footer>Written by kiln report {} from {} lines of the metrics log. Hover over a plot for the values of each logged step.</footer>\n</main>\n</body>\n</html>",
        escape(env!("CARGO_PKG_VERSION")),
        log.lines,
    );
    s
}

fn stat(label: &str, value: &str, note: &str) -> String {
    format!(
        "<div class=\"stat\"><div class=\"k\">{}</div><div class=\"v\" title=\"{}\">{}</div><div class=\"n\" title=\"{}\">{}</div></div>\n",
        escape(label),
        escape(value),
        escape(value),
        escape(note),
        if note.is_empty() {
            "&nbsp;".to_owned()
        } else {
            escape(note)
        },
    )
}

/// Plots of more logged steps than this have no tooltips (the page stays small).
const HOVER_MAX: usize = 3000;

const NONE: &str = "\u{2014}";

fn summary(log: &RunLog) -> String {
    let start = log.start.clone().unwrap_or_default();
    let mut s = String::from("<div class=\"stats\">\n");
    s.push_str(&stat(
        "Parameters",
        &start.params.map_or(NONE.into(), |p| count(p as f64)),
        &start.params.map_or(String::new(), |p| {
            format!("{} exactly", thousands(p as f64))
        }),
    ));
    let mesh_note = match (start.dp, start.tp) {
        (Some(dp), Some(tp)) => format!(
            "dp {dp} \u{d7} tp {tp}{}{}",
            match (start.fsdp, start.shard) {
                (Some(true), Some(shard)) if shard > 0 => {
                    format!(", fully sharded in groups of {shard}, replicated across them")
                }
                (Some(true), _) => ", fully sharded".into(),
                _ if start.zero1 == Some(true) => ", ZeRO-1".into(),
                _ => String::new(),
            },
            match start.activation_checkpointing.as_deref() {
                Some(ac @ ("mlp" | "block")) => format!(", recomputing each {ac}"),
                _ => String::new(),
            }
        ),
        _ => String::new(),
    };
    let mesh = start.world.map_or(NONE.into(), |w| {
        format!("{w} rank{}", if w == 1 { "" } else { "s" })
    });
    let restarts = log.starts.saturating_sub(1);
    let mesh_note = if restarts > 0 {
        format!(
            "{mesh_note}{}{restarts} restart{}",
            if mesh_note.is_empty() { "" } else { "; " },
            if restarts == 1 { "" } else { "s" }
        )
    } else {
        mesh_note
    };
    s.push_str(&stat("Mesh", &mesh, &mesh_note));
    s.push_str(&stat(
        "Device",
        start.device.as_deref().unwrap_or(NONE),
        &match (start.bf16, start.precision.as_deref()) {
            (Some(true), p) => format!("{} autocast", p.unwrap_or("bf16")),
            (Some(false), p) => p.unwrap_or("fp32").to_owned(),
            (None, p) => p.unwrap_or("").to_owned(),
        },
    ));
    let last = log.last_step().map(|s| s.step);
    let planned = log.planned_steps();
    let steps = match (last, planned) {
        (Some(l), Some(p)) => format!("{} / {}", thousands(l as f64), thousands(p as f64)),
        (Some(l), None) => thousands(l as f64),
        _ => NONE.into(),
    };
    let steps_note = if log.saved {
        "finished, model saved".to_owned()
    } else {
        match (last, planned) {
            (Some(l), Some(p)) if p > 0 => {
                format!(
                    "{:.0}% done, no final weights yet",
                    100.0 * l as f64 / p as f64
                )
            }
            _ => "no step logged yet".into(),
        }
    };
    s.push_str(&stat("Steps", &steps, &steps_note));
    let at_step = |x: Option<(i64, f64)>, none: &str| match x {
        Some((step, v)) => (
            format!("{v:.4}"),
            format!("at step {}", thousands(step as f64)),
        ),
        None => (NONE.into(), none.into()),
    };
    let (v, n) = at_step(log.final_loss(), "no loss logged");
    s.push_str(&stat("Final loss", &v, &n));
    let (v, n) = at_step(log.final_val_loss(), "no evaluation logged");
    s.push_str(&stat("Final val loss", &v, &n));
    s.push_str(&stat(
        "Mean tokens/s",
        &log.mean_tokens_per_s().map_or(NONE.into(), thousands),
        "over the logged windows",
    ));
    s.push_str(&stat(
        "Mean MFU",
        &log.mean_mfu()
            .map_or(NONE.into(), |m| format!("{:.1}%", m * 100.0)),
        &start
            .peak_flops
            .filter(|p| p.is_finite() && *p > 0.0)
            .map_or(String::new(), |p| format!("of {}FLOP/s peak", si(p))),
    ));
    let (wall, wall_note) = match log.wall_time_s() {
        Some(w) => (duration(w), "first to last logged step"),
        None => (NONE.into(), "no timestamps in this log"),
    };
    s.push_str(&stat("Wall time", &wall, wall_note));
    let (n, note) = match log.checkpoints.last() {
        Some(c) => (
            log.checkpoints.len().to_string(),
            format!("last at step {}", thousands(c.step as f64)),
        ),
        None => ("0".into(), "none committed".into()),
    };
    s.push_str(&stat("Checkpoints", &n, &note));
    s.push_str("</div>\n");
    s
}

fn legend(items: &[(&str, &str, &str)]) -> String {
    let mut s = String::from("<div class=\"legend\">");
    for (label, color, kind) in items {
        let style = if *kind == "line" || *kind == "dash" {
            format!("border-color:{}", escape(color))
        } else {
            format!("background:{}", escape(color))
        };
        let _ = write!(
            s,
            "<span class=\"item\"><span class=\"sw {}\" style=\"{style}\"></span>{}</span>",
            escape(kind),
            escape(label)
        );
    }
    s.push_str("</div>\n");
    s
}

fn card(title: &str, what: &str, body: &str) -> String {
    format!(
        "<section class=\"card\">\n<h2>{}</h2>\n<p class=\"what\">{}</p>\n{body}\n</section>\n",
        escape(title),
        escape(what)
    )
}

/// The x range of every plot: from 0 to the last step logged.
fn x_scale(log: &RunLog) -> Scale {
    let steps = log
        .steps
        .iter()
        .map(|s| s.step as f64)
        .chain(log.evals.iter().map(|e| e.step as f64))
        .chain(log.checkpoints.iter().map(|c| c.step as f64));
    Scale::nice(steps, 10, true, true)
}

/// The steps each logged window covers: from the previous window's step (or `window_steps`
/// before, for the first) to its own.
fn spans(steps: &[Step]) -> Vec<(f64, f64)> {
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let x1 = s.step as f64;
            let width = if i > 0 {
                (s.step - steps[i - 1].step) as f64
            } else if let Some(w) = s.window_steps.filter(|w| *w > 0) {
                w as f64
            } else if let Some(next) = steps.get(1) {
                (next.step - s.step) as f64
            } else {
                x1
            };
            let x0 = (x1 - width).max(0.0);
            (if x0 < x1 { x0 } else { x1 - 1.0 }, x1)
        })
        .collect()
}

fn loss_section(log: &RunLog) -> String {
    let what = "Training loss of each logged step and validation loss of each evaluation (mean next-token cross-entropy, nats).";
    let train: Vec<(f64, f64)> = log
        .steps
        .iter()
        .map(|s| (s.step as f64, finite(s.loss).unwrap_or(f64::NAN)))
        .collect();
    let val: Vec<(f64, f64)> = log
        .evals
        .iter()
        .map(|e| (e.step as f64, finite(e.val_loss).unwrap_or(f64::NAN)))
        .collect();
    if !train.iter().chain(&val).any(|(_, y)| y.is_finite()) {
        return card("Loss", what, &plot::empty("loss", "No loss logged yet."));
    }
    let y = Scale::nice(train.iter().chain(&val).map(|p| p.1), 6, false, false);
    let mut p = Plot::new(x_scale(log), "step", y, "loss");
    let resumes: Vec<_> = log.resumed.iter().filter(|r| r.step > 0).collect();
    for r in &resumes {
        p.vline(
            r.step as f64,
            "resumed",
            &format!(
                "resumed at step {} from {}",
                r.step,
                r.from.as_deref().unwrap_or("a checkpoint")
            ),
        );
    }
    p.line("loss", LOSS, &train, Side::Left, false);
    if train.len() <= 500 {
        let dots: Vec<_> = train
            .iter()
            .map(|&(x, y)| (x, y, format!("step {x}: loss {y:.4}")))
            .collect();
        p.markers(LOSS, &dots, Side::Left, 2.5);
    }
    p.line("val_loss", VAL_LOSS, &val, Side::Left, true);
    let dots: Vec<_> = val
        .iter()
        .map(|&(x, y)| (x, y, format!("step {x}: validation loss {y:.4}")))
        .collect();
    p.markers(VAL_LOSS, &dots, Side::Left, 4.0);
    let mut items = vec![
        ("training loss", LOSS, "line"),
        ("validation loss", VAL_LOSS, "dot"),
    ];
    if !resumes.is_empty() {
        items.push(("resumed from a checkpoint", "#7b8794", "dash"));
    }
    card("Loss", what, &(legend(&items) + &p.finish("loss by step")))
}

fn throughput_section(log: &RunLog) -> String {
    let what = "Training tokens per second over all ranks (left axis) and model FLOPs utilization against the device's peak (right axis), per logged window.";
    let tokens: Vec<(f64, f64)> = log
        .steps
        .iter()
        .map(|s| (s.step as f64, finite(s.tokens_per_s).unwrap_or(f64::NAN)))
        .collect();
    let mfu: Vec<(f64, f64)> = log
        .steps
        .iter()
        .map(|s| (s.step as f64, finite(s.mfu).map_or(f64::NAN, |m| m * 100.0)))
        .collect();
    if !tokens.iter().chain(&mfu).any(|(_, y)| y.is_finite()) {
        return card(
            "Throughput",
            what,
            &plot::empty("throughput", "No throughput logged yet."),
        );
    }
    let y = Scale::nice(tokens.iter().map(|p| p.1), 5, true, false);
    let y2 = Scale::aligned(mfu.iter().map(|p| p.1), y.ticks.len() - 1);
    let mut p = Plot::new(x_scale(log), "step", y, "tokens/s").with_right_axis(y2, "MFU (%)");
    let spans = spans(&log.steps);
    let titles: Vec<String> = log
        .steps
        .iter()
        .map(|s| {
            format!(
                "step {}: {} tokens/s, MFU {}",
                s.step,
                finite(s.tokens_per_s).map_or("?".into(), thousands),
                finite(s.mfu).map_or("?".into(), |m| format!("{:.1}%", m * 100.0))
            )
        })
        .collect();
    if titles.len() <= HOVER_MAX {
        p.hover(&spans, &titles);
    }
    p.line("tokens_per_s", TOKENS, &tokens, Side::Left, false);
    p.line("mfu", MFU, &mfu, Side::Right, false);
    let items = [
        ("tokens/s (left)", TOKENS, "line"),
        ("MFU % (right)", MFU, "line"),
    ];
    card(
        "Throughput",
        what,
        &(legend(&items) + &p.finish("throughput by step")),
    )
}

fn step_time_section(log: &RunLog) -> String {
    let names = log.phase_names();
    let old = names.iter().any(|n| n == "compute");
    let what = if old {
        "Seconds per step by phase, averaged over each logged window. This log predates per-phase timing: compute is forward, backward and optimizer together, the waits come from their shares of the step time."
    } else {
        "Seconds per step by phase, averaged over each logged window, stacked; the dashed line is the step time (the phases apart from checkpoint add up to about it)."
    };
    if names.is_empty() {
        return card(
            "Step time",
            what,
            &plot::empty("step time", "No step time logged yet."),
        );
    }
    let per_step: Vec<Vec<(String, f64)>> = log.steps.iter().map(Step::phase_seconds).collect();
    let layers: Vec<(String, String, Vec<f64>)> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let values = per_step
                .iter()
                .map(|phases| {
                    phases
                        .iter()
                        .find(|(k, _)| k == name)
                        .map_or(0.0, |(_, v)| *v)
                })
                .collect();
            (name.clone(), phase_style(name, i).1.to_owned(), values)
        })
        .collect();
    let totals = per_step
        .iter()
        .map(|p| p.iter().map(|(_, v)| v).sum::<f64>());
    let step_s: Vec<f64> = log
        .steps
        .iter()
        .map(|s| finite(s.step_s).unwrap_or(f64::NAN))
        .collect();
    let y = Scale::nice(totals.chain(step_s.iter().copied()), 5, true, false);
    let mut p = Plot::new(x_scale(log), "step", y, "seconds per step");
    let spans = spans(&log.steps);
    p.stacked(&spans, &layers);
    let shape: Vec<(f64, f64)> = spans
        .iter()
        .zip(&step_s)
        .flat_map(|(&(x0, x1), &s)| [(x0, s), (x1, s)])
        .collect();
    p.line("step_s", STEP_TIME, &shape, Side::Left, true);
    let titles: Vec<String> = log
        .steps
        .iter()
        .zip(&spans)
        .zip(&per_step)
        .map(|((s, &(x0, x1)), phases)| {
            let mut t = if x1 - x0 > 1.0 {
                format!("steps {}\u{2013}{}:", x0 as i64 + 1, s.step)
            } else {
                format!("step {}:", s.step)
            };
            for name in &names {
                if let Some((_, v)) = phases.iter().find(|(k, _)| k == name) {
                    let _ = write!(t, "\n{} {}", phase_style(name, 0).0, seconds(*v));
                }
            }
            if let Some(v) = finite(s.step_s) {
                let _ = write!(t, "\nstep time {}", seconds(v));
            }
            t
        })
        .collect();
    if titles.len() <= HOVER_MAX {
        p.hover(&spans, &titles);
    }
    let styles: Vec<(String, &str)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| phase_style(n, i))
        .collect();
    let mut items: Vec<(&str, &str, &str)> = styles
        .iter()
        .map(|(l, c)| (l.as_str(), *c, "area"))
        .collect();
    items.push(("step time", STEP_TIME, "dash"));
    card(
        "Step time",
        what,
        &(legend(&items) + &p.finish("step time by phase")),
    )
}

fn checkpoint_section(log: &RunLog) -> String {
    let what = "Committed checkpoints: how long each save took from start to commit, how long training was held for it, and the size of rank 0's shard.";
    let mut body = String::new();
    if log.checkpoints.is_empty() {
        body.push_str("<p class=\"none\">No checkpoint was committed in this log.</p>\n");
    } else {
        body.push_str("<table>\n<thead><tr><th>Step</th><th>Save</th><th>Training paused</th><th>Size (rank 0)</th></tr></thead>\n<tbody>\n");
        for c in &log.checkpoints {
            let _ = writeln!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&thousands(c.step as f64)),
                escape(&finite(c.save_s).map_or(NONE.into(), seconds)),
                escape(&finite(c.pause_s).map_or(NONE.into(), seconds)),
                escape(&c.bytes.map_or(NONE.into(), bytes)),
            );
        }
        body.push_str("</tbody>\n</table>\n");
    }
    let resumes: Vec<_> = log.resumed.iter().filter(|r| r.step > 0).collect();
    if !resumes.is_empty() {
        body.push_str("<ul class=\"events\">\n");
        for r in resumes {
            let _ = write!(
                body,
                "<li>Resumed at step {} from {}",
                escape(&thousands(r.step as f64)),
                escape(r.from.as_deref().unwrap_or("a checkpoint")),
            );
            if !r.rejected.is_empty() {
                let _ = write!(
                    body,
                    " (newer checkpoints rejected: {})",
                    escape(&r.rejected.join("; "))
                );
            }
            body.push_str("</li>\n");
        }
        body.push_str("</ul>\n");
    }
    card("Checkpoints", what, &body)
}

/// `1234567.8` as `1,234,568`.
fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

/// A count in thousands, millions, billions or trillions, three digits: `7.22 M`.
fn count(v: f64) -> String {
    for (unit, suffix) in [(1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")] {
        if v >= unit {
            let x = v / unit;
            let decimals = if x >= 100.0 {
                0
            } else if x >= 10.0 {
                1
            } else {
                2
            };
            return format!("{x:.decimals$} {suffix}");
        }
    }
    format!("{v:.0}")
}

/// FLOP/s and the like with an SI prefix: `93.2 G`.
fn si(v: f64) -> String {
    for (unit, suffix) in [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")] {
        if v >= unit {
            return format!("{:.1} {suffix}", v / unit);
        }
    }
    format!("{v:.0} ")
}

/// Seconds in the unit that suits them: `1.16 s`, `41.3 ms`, `12 µs`.
fn seconds(v: f64) -> String {
    if v >= 1.0 {
        format!("{v:.2} s")
    } else if v >= 1e-3 {
        format!("{:.1} ms", v * 1e3)
    } else if v > 0.0 {
        format!("{:.0} \u{b5}s", v * 1e6)
    } else {
        "0".into()
    }
}

/// A long time in its largest units: `4 m 14 s`, `3 h 05 m`.
fn duration(s: f64) -> String {
    let total = s.round() as u64;
    let (d, h, m, sec) = (
        total / 86400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    if s < 60.0 {
        format!("{s:.1} s")
    } else if total < 3600 {
        format!("{m} m {sec:02} s")
    } else if total < 86400 {
        format!("{h} h {m:02} m")
    } else {
        format!("{d} d {h:02} h")
    }
}

/// Bytes in binary units: `41.5 MiB`.
fn bytes(b: u64) -> String {
    let v = b as f64;
    for (unit, suffix) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if b >= unit {
            return format!("{:.1} {suffix}", v / unit as f64);
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests;
