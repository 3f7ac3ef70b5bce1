use super::*;
use kiln_proto::run::{Event, Phases};

const START: &str = r#"{"type":"start","params":3315072,"world":2,"dp":2,"tp":1,"zero1":false,"device":"Cpu","bf16":false,"flops_per_token":19988736.0,"peak_flops":1e11,"train_sequences":2060,"validation_sequences":769}"#;

fn step(step: i64, loss: f64) -> String {
    format!(
        r#"{{"type":"step","step":{step},"steps":20,"loss":{loss},"lr":0.003,"grad_norm":1.2,"tokens_per_s":1000.0,"mfu":0.2,"step_s":0.5,"data_wait":0.1,"collective_wait":0.2,"phases":{{"data_wait":0.05,"forward":0.15,"backward":0.2,"collective":0.05,"optimizer":0.04,"checkpoint":0.0}},"window_steps":2,"time":{}}}"#,
        1_790_000_000.0 + step as f64
    )
}

#[test]
fn a_log_reads_into_steps_evals_and_checkpoints() {
    let text = [
        START.to_owned(),
        step(2, 9.0),
        step(4, 8.0),
        r#"{"type":"eval","step":4,"val_loss":8.5,"tokens":1024}"#.into(),
        r#"{"type":"checkpoint","step":4,"url":"/x/step-4/manifest.json","pause_s":0.01,"save_s":0.3,"bytes":123456,"deleted":[]}"#.into(),
        r#"{"type":"saved","path":"/x/model"}"#.into(),
    ]
    .join("\n")
        + "\n";
    let log = parse(&text).unwrap();
    let start = log.start.as_ref().unwrap();
    assert_eq!(
        (start.params, start.world, start.dp),
        (Some(3315072), Some(2), Some(2))
    );
    assert_eq!(start.device.as_deref(), Some("Cpu"));
    assert_eq!(log.steps.len(), 2);
    assert_eq!(log.final_loss(), Some((4, 8.0)));
    assert_eq!(log.final_val_loss(), Some((4, 8.5)));
    assert_eq!(log.planned_steps(), Some(20));
    assert_eq!(log.checkpoints[0].bytes, Some(123456));
    assert!(log.saved);
    assert_eq!(log.lines, 6);
    assert_eq!(log.mean_tokens_per_s(), Some(1000.0));
    // From the start of the first window (2 steps of 0.5 s before step 2) to step 4.
    assert!((log.wall_time_s().unwrap() - 3.0).abs() < 1e-6);
    assert_eq!(
        log.phase_names(),
        [
            "data_wait",
            "forward",
            "backward",
            "collective",
            "optimizer",
            "checkpoint"
        ]
    );
    let phases = log.steps[0].phase_seconds();
    assert!(phases.contains(&("data_wait".into(), 0.05)), "{phases:?}");
    assert_eq!(phases.len(), 6);
}

#[test]
fn a_truncated_last_line_is_skipped() {
    let full = format!("{START}\n{}\n{}\n", step(1, 9.0), step(2, 8.0));
    let cut = &full[..full.len() - 20];
    let log = parse(cut).unwrap();
    assert_eq!(log.steps.len(), 1);
    assert_eq!(log.lines, 2);
    // Cut right after a complete value's closing brace: the line still counts.
    let log = parse(full.trim_end()).unwrap();
    assert_eq!(log.steps.len(), 2);
    // Cut inside the JSON even though a newline follows (EOF inside the value).
    let text = format!("{START}\n{{\"type\":\"step\",\"step\":3\n");
    assert_eq!(parse(&text).unwrap().steps.len(), 0);
    // Only a cut line: nothing was logged.
    assert_eq!(parse("{\"type\":\"st"), Err(ParseError::Empty));
}

#[test]
fn malformed_lines_are_named_by_number() {
    let text = format!("{START}\n\nnot json\n{}\n", step(1, 9.0));
    match parse(&text) {
        Err(ParseError::Line { line, message }) => {
            assert_eq!(line, 3);
            assert!(message.starts_with("not JSON"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let text = format!(
        "{START}\n{{\"type\":\"step\",\"loss\":1.0}}\n{}\n",
        step(1, 9.0)
    );
    let Err(ParseError::Line { line: 2, message }) = parse(&text) else {
        panic!("{:?}", parse(&text));
    };
    assert!(
        message.contains("\"step\" event") && message.contains("`step`"),
        "{message}"
    );
    let Err(ParseError::Line { line: 1, message }) = parse("[1]\n{}\n") else {
        panic!()
    };
    assert_eq!(message, "expected a JSON object, found an array");
    let Err(ParseError::Line { line: 1, message }) = parse("{\"step\":1}\n{}\n") else {
        panic!()
    };
    assert_eq!(message, "no \"type\" field");
    // A broken line that is not the last is an error even without a newline at the end.
    assert!(matches!(
        parse(&format!("{{\"type\":\n{}", step(1, 1.0))),
        Err(ParseError::Line { line: 1, .. })
    ));
}

#[test]
fn empty_logs_and_unknown_events() {
    assert_eq!(parse(""), Err(ParseError::Empty));
    assert_eq!(parse("\n \n"), Err(ParseError::Empty));
    let log = parse("{\"type\":\"telemetry\",\"gpu\":[1,2]}\n").unwrap();
    assert_eq!(log.lines, 1);
    assert!(log.steps.is_empty() && log.start.is_none());
}

#[test]
fn repeated_steps_keep_their_last_value() {
    let text = [
        START.to_owned(),
        step(1, 9.0),
        step(2, 8.0),
        step(3, 7.0),
        r#"{"type":"checkpoint","step":2,"pause_s":0.1,"save_s":1.0,"bytes":10}"#.into(),
        r#"{"type":"eval","step":2,"val_loss":8.9,"tokens":10}"#.into(),
        START.to_owned(),
        r#"{"type":"resumed","step":2,"from":"/x/step-2/","rejected":[]}"#.into(),
        r#"{"type":"checkpoint","step":2,"pause_s":0.2,"save_s":2.0,"bytes":10}"#.into(),
        r#"{"type":"eval","step":2,"val_loss":8.7,"tokens":10}"#.into(),
        step(3, 6.5),
        step(4, 6.0),
    ]
    .join("\n");
    let log = parse(&text).unwrap();
    let losses: Vec<_> = log
        .steps
        .iter()
        .map(|s| (s.step, s.loss.unwrap()))
        .collect();
    assert_eq!(losses, [(1, 9.0), (2, 8.0), (3, 6.5), (4, 6.0)]);
    assert_eq!(log.checkpoints.len(), 1);
    assert_eq!(log.checkpoints[0].save_s, Some(2.0));
    assert_eq!(log.final_val_loss(), Some((2, 8.7)));
    assert_eq!(log.starts, 2);
    assert_eq!(log.resumed[0].step, 2);
}

#[test]
fn old_logs_without_phases_or_times() {
    // As written before per-phase timing: no phases, window_steps or time.
    let text = concat!(
        r#"{"type":"start","params":7220480,"world":1,"dp":1,"tp":1,"zero1":false,"device":"Cpu","bf16":false,"flops_per_token":1.0,"peak_flops":1.0,"train_sequences":1,"validation_sequences":0}"#,
        "\n",
        r#"{"type":"step","step":10,"steps":200,"loss":9.6,"lr":0.0015,"grad_norm":1.6,"tokens_per_s":1758.0,"mfu":0.41,"step_s":1.0,"data_wait":0.25,"collective_wait":0.25}"#,
        "\n",
        r#"{"type":"step","step":20,"steps":200,"loss":null,"lr":0.0015,"grad_norm":null,"tokens_per_s":1800.0,"mfu":0.43,"step_s":1.0,"data_wait":0.0,"collective_wait":0.0}"#,
        "\n"
    );
    let log = parse(text).unwrap();
    assert_eq!(log.wall_time_s(), None);
    assert_eq!(log.final_loss(), Some((10, 9.6)));
    assert_eq!(log.steps[1].loss, None);
    assert_eq!(log.mean_tokens_per_s(), Some(1779.0));
    assert_eq!(log.phase_names(), ["data_wait", "compute", "collective"]);
    assert_eq!(
        log.steps[0].phase_seconds(),
        [
            ("data_wait".to_owned(), 0.25),
            ("compute".to_owned(), 0.5),
            ("collective".to_owned(), 0.25)
        ]
    );
}

#[test]
fn unknown_phases_stack_after_the_known_ones() {
    let text = r#"{"type":"step","step":1,"phases":{"zeta":0.1,"forward":0.2,"alpha":null}}"#;
    let log = parse(text).unwrap();
    assert_eq!(log.phase_names(), ["forward", "alpha", "zeta"]);
    assert_eq!(log.steps[0].phase_seconds()[0], ("alpha".into(), 0.0));
}

#[test]
fn the_phases_stack_in_the_one_order() {
    assert_eq!(
        PHASES,
        [
            ("data_wait", "data wait"),
            ("compute", "compute"),
            ("forward", "forward"),
            ("backward", "backward"),
            ("collective", "collective wait"),
            ("optimizer", "optimizer"),
            ("checkpoint", "checkpoint"),
        ]
    );
}

/// Every field of every event the trainer logs reaches the report. The events are
/// destructured whole (one check per event below), so that a field added to them must be
/// added here too.
#[test]
fn the_report_reads_every_field_the_trainer_writes() {
    let start = Event::Start {
        job: "tiny".into(),
        params: 3_315_072,
        world: 4,
        dp: 2,
        tp: 2,
        zero1: true,
        fsdp: true,
        shard: 2,
        activation_checkpointing: "block".into(),
        device: "Cuda(0)".into(),
        bf16: true,
        precision: "bf16".into(),
        flops_per_token: 19_988_736.0,
        peak_flops: 1e14,
        train_sequences: 2060,
        validation_sequences: 769,
    };
    let phases = Phases {
        data_wait: 0.005,
        forward: 0.15,
        backward: 0.25,
        collective: 0.01,
        optimizer: 0.05,
        checkpoint: 0.5,
    };
    let step = Event::Step {
        step: 20,
        steps: 200,
        loss: 7.25,
        lr: 3e-3,
        grad_norm: 1.5,
        tokens_per_s: 1800.0,
        mfu: 0.4,
        step_s: 0.5,
        data_wait: 0.01,
        collective_wait: 0.02,
        phases,
        window_steps: 10,
        time: 1_790_000_000.25,
    };
    let eval = Event::Eval {
        step: 20,
        val_loss: 7.5,
        tokens: 1024,
    };
    let resumed = Event::Resumed {
        step: 10,
        from: "s3://b/run/step-10/".into(),
        rejected: vec!["step-15: damaged".into()],
    };
    let checkpoint = Event::Checkpoint {
        step: 20,
        url: "s3://b/run/step-20/manifest.json".into(),
        pause_s: 0.01,
        save_s: 0.3,
        bytes: 123_456,
        deleted: vec![5, 10],
    };
    let saved = Event::Saved {
        path: "/runs/tiny/model".into(),
    };
    let events = [&start, &resumed, &step, &eval, &checkpoint, &saved];
    let text: String = events.iter().map(|e| e.to_line() + "\n").collect();
    let log = parse(&text).unwrap();
    assert_eq!((log.lines, log.starts, log.saved), (6, 1, true));

    check_start(start, &log);
    check_step(step, &log);
    check_eval(eval, &log);
    check_resumed(resumed, &log);
    check_checkpoint_and_saved(checkpoint, saved, &log);
}

fn check_start(event: Event, log: &RunLog) {
    let Event::Start {
        job,
        params,
        world,
        dp,
        tp,
        zero1,
        fsdp,
        shard,
        activation_checkpointing,
        device,
        bf16,
        precision,
        flops_per_token,
        peak_flops,
        train_sequences,
        validation_sequences,
    } = event
    else {
        unreachable!()
    };
    let read = log.start.clone().unwrap();
    assert_eq!(
        read,
        Start {
            job: Some(job),
            params: Some(params),
            world: Some(world as u64),
            dp: Some(dp as u64),
            tp: Some(tp as u64),
            zero1: Some(zero1),
            fsdp: Some(fsdp),
            shard: Some(shard as u64),
            activation_checkpointing: Some(activation_checkpointing),
            device: Some(device),
            bf16: Some(bf16),
            precision: Some(precision),
            flops_per_token: Some(flops_per_token),
            peak_flops: Some(peak_flops),
            train_sequences: Some(train_sequences as u64),
            validation_sequences: Some(validation_sequences as u64),
        }
    );
}

fn check_step(event: Event, log: &RunLog) {
    let Event::Step {
        step,
        steps,
        loss,
        lr,
        grad_norm,
        tokens_per_s,
        mfu,
        step_s,
        data_wait,
        collective_wait,
        phases,
        window_steps,
        time,
    } = event
    else {
        unreachable!()
    };
    assert_eq!(
        log.steps,
        [Step {
            step,
            steps: Some(steps),
            loss: Some(loss),
            lr: Some(lr),
            grad_norm: Some(grad_norm),
            tokens_per_s: Some(tokens_per_s),
            mfu: Some(mfu),
            step_s: Some(step_s),
            data_wait: Some(data_wait),
            collective_wait: Some(collective_wait),
            phases: Some(
                Phase::ALL
                    .iter()
                    .map(|p| (p.name().to_owned(), Some(phases.get(*p))))
                    .collect()
            ),
            window_steps: Some(window_steps),
            time: Some(time),
        }]
    );
    assert_eq!(log.phase_names(), kiln_proto::run::PHASE_NAMES);
}

fn check_eval(event: Event, log: &RunLog) {
    let Event::Eval {
        step,
        val_loss,
        tokens,
    } = event
    else {
        unreachable!()
    };
    assert_eq!(
        log.evals,
        [Eval {
            step,
            val_loss: Some(val_loss),
            tokens: Some(tokens),
        }]
    );
}

fn check_resumed(event: Event, log: &RunLog) {
    let Event::Resumed {
        step,
        from,
        rejected,
    } = event
    else {
        unreachable!()
    };
    assert_eq!(
        log.resumed,
        [Resumed {
            step,
            from: Some(from),
            rejected,
        }]
    );
}

fn check_checkpoint_and_saved(event: Event, saved: Event, log: &RunLog) {
    // `deleted` is the console's business; the report has no use for it.
    let Event::Checkpoint {
        step,
        url,
        pause_s,
        save_s,
        bytes,
        deleted: _,
    } = event
    else {
        unreachable!()
    };
    assert_eq!(
        log.checkpoints,
        [Checkpoint {
            step,
            url: Some(url),
            pause_s: Some(pause_s),
            save_s: Some(save_s),
            bytes: Some(bytes),
        }]
    );
    let Event::Saved { path: _ } = saved else {
        unreachable!()
    };
}
