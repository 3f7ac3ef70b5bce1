use super::*;
use crate::log::parse;

fn sample_log() -> RunLog {
    let mut lines = vec![
        r#"{"type":"start","params":7220480,"world":2,"dp":2,"tp":1,"zero1":true,"device":"Cpu","bf16":false,"flops_per_token":1.0,"peak_flops":9.3e10,"train_sequences":10,"validation_sequences":5}"#.to_owned(),
    ];
    for step in 1..=12 {
        lines.push(format!(
            r#"{{"type":"step","step":{step},"steps":20,"loss":{},"lr":0.003,"grad_norm":1.0,"tokens_per_s":1800.0,"mfu":0.4,"step_s":0.5,"data_wait":0.01,"collective_wait":0.02,"phases":{{"data_wait":0.005,"forward":0.15,"backward":0.25,"collective":0.01,"optimizer":0.05,"checkpoint":0.0}},"window_steps":1,"time":{}}}"#,
            10.0 - step as f64 * 0.3,
            1.79e9 + step as f64 * 0.5,
        ));
    }
    lines.push(r#"{"type":"eval","step":6,"val_loss":8.5,"tokens":100}"#.into());
    lines.push(r#"{"type":"checkpoint","step":6,"url":"s3://b/run/step-6/manifest.json","pause_s":0.01,"save_s":0.3,"bytes":43323256,"deleted":[]}"#.into());
    lines.push(r#"{"type":"resumed","step":6,"from":"s3://b/run/step-6/","rejected":["step-9: <damaged>"]}"#.into());
    parse(&lines.join("\n")).unwrap()
}

#[test]
fn escaping() {
    assert_eq!(
        escape(r#"<a href="x">Tom & 'Jerry'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
    );
    let log = sample_log();
    let meta = Meta {
        job: Some("<script>alert('x')</script>".into()),
        source: "/runs/a&b/\"out\"".into(),
    };
    let html = render(&log, &meta);
    assert!(!html.contains("<script"), "unescaped job name");
    assert!(html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(html.contains("/runs/a&amp;b/&quot;out&quot;"));
    assert!(html.contains("step-9: &lt;damaged&gt;"));
    assert!(!html.contains("<damaged>"));
}

#[test]
fn the_page_is_self_contained() {
    let html = render(&sample_log(), &Meta::default());
    let lower = html.to_lowercase();
    for external in [
        "http://", "https://", "//cdn", "<script", "<link", "<img", "<iframe", "src=", "href=",
        "@import", "url(", "xmlns",
    ] {
        assert!(!lower.contains(external), "the page contains {external:?}");
    }
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert_eq!(html.matches("<svg").count(), 3);
    assert_eq!(html.matches("</svg>").count(), 3);
}

#[test]
fn plots_hold_every_step_and_the_summary_its_numbers() {
    let log = sample_log();
    let html = render(&log, &Meta::default());
    let points: usize = html
        .split("<polyline data-series=\"loss\" points=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().split(' ').count())
        .sum();
    assert_eq!(points, 12);
    for series in ["val_loss", "tokens_per_s", "mfu", "step_s"] {
        assert!(
            html.contains(&format!("data-series=\"{series}\"")),
            "{series}"
        );
    }
    for phase in kiln_proto::control::PHASES {
        assert!(
            html.contains(&format!("<polygon data-series=\"{phase}\"")),
            "{phase}"
        );
    }
    for text in [
        "7.22 M",
        "2 ranks",
        "dp 2 \u{d7} tp 1, ZeRO-1",
        "12 / 20",
        "6.4000",
        "8.5000",
        "1,800",
        "40.0%",
        "6.0 s",
        "41.3 MiB",
        "300.0 ms",
        "Resumed at step 6",
        "training loss",
        "collective wait",
    ] {
        assert!(html.contains(text), "{text:?} missing");
    }
}

#[test]
fn old_and_sparse_logs_still_render() {
    let log = parse(concat!(
        r#"{"type":"step","step":10,"steps":200,"loss":9.6,"tokens_per_s":1758.0,"mfu":0.41,"step_s":1.0,"data_wait":0.25,"collective_wait":0.25}"#,
        "\n"
    ))
    .unwrap();
    let html = render(&log, &Meta::default());
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("predates per-phase timing"));
    assert!(html.contains("<polygon data-series=\"compute\""));
    assert!(html.contains("no timestamps in this log"));
    let log = parse("{\"type\":\"saved\",\"path\":\"x\"}\n").unwrap();
    let html = render(&log, &Meta::default());
    assert_eq!(html.matches("<svg").count(), 3);
    assert!(html.contains("No loss logged yet."));
}

#[test]
fn spans_cover_each_window() {
    let step = |step, window| Step {
        step,
        window_steps: window,
        ..Step::default()
    };
    assert_eq!(
        spans(&[step(10, Some(10)), step(20, Some(10))]),
        [(0.0, 10.0), (10.0, 20.0)]
    );
    assert_eq!(
        spans(&[step(10, None), step(20, None)]),
        [(0.0, 10.0), (10.0, 20.0)]
    );
    assert_eq!(spans(&[step(1, None)]), [(0.0, 1.0)]);
    assert_eq!(spans(&[step(0, None)]), [(-1.0, 0.0)]);
}

#[test]
fn number_formats() {
    assert_eq!(thousands(1845.4), "1,845");
    assert_eq!(thousands(999.0), "999");
    assert_eq!(thousands(1234567.0), "1,234,567");
    assert_eq!(count(7_220_480.0), "7.22 M");
    assert_eq!(count(124_000_000.0), "124 M");
    assert_eq!(count(1_500_000_000.0), "1.50 B");
    assert_eq!(count(512.0), "512");
    assert_eq!(duration(254.0), "4 m 14 s");
    assert_eq!(duration(7500.0), "2 h 05 m");
    assert_eq!(duration(12.34), "12.3 s");
    assert_eq!(bytes(43_323_256), "41.3 MiB");
    assert_eq!(bytes(100), "100 B");
    assert_eq!(seconds(0.0413), "41.3 ms");
    assert_eq!(seconds(1.164), "1.16 s");
    assert_eq!(seconds(0.000012), "12 \u{b5}s");
    assert_eq!(si(9.3e10), "93.0 G");
}
