use super::*;

fn shape(preset: &str, seq: i64, batch: i64, bf16: bool) -> Shape {
    Shape {
        model: LlamaConfig::preset(preset).unwrap(),
        seq_len: seq,
        batch_size: batch,
        bf16,
        bucket_mb: 25.0,
    }
}

fn h100(n: usize) -> Hardware {
    Hardware {
        device: "cuda".into(),
        devices: n,
        memory_bytes: 80.0 * GIB,
        peak_tflops: 989.0,
        mfu: 0.4,
        link_gbps: 3600.0,
    }
}

fn layout(dp: usize, tp: usize, zero1: bool, ac: &str, micro: i64) -> Layout {
    Layout {
        dp,
        tp,
        zero1,
        fsdp: false,
        shard: 0,
        reshard_after_forward: true,
        activation_checkpointing: ac.into(),
        micro_batch_size: micro,
    }
}

#[test]
fn the_static_state_is_twenty_bytes_a_parameter_and_zero1_divides_the_optimizer() {
    let s = shape("125m", 256, 8, false);
    let cpu = Hardware {
        device: "cpu".into(),
        memory_bytes: 64.0 * GIB,
        ..h100(2)
    };
    let plain = estimate(&s, &layout(2, 1, false, "none", 4), &cpu).memory;
    let p = s.model.num_params() as f64;
    assert_eq!(plain.parameters, 4.0 * p);
    assert_eq!(plain.optimizer_state, 8.0 * p);
    assert_eq!(plain.optimizer_scratch, 4.0 * p);
    let z = estimate(&s, &layout(2, 1, true, "none", 4), &cpu).memory;
    // Each rank owns half of every bucket (rounded up).
    assert!((z.optimizer_state - 4.0 * p).abs() < 8.0 * 16.0, "{z:?}");
    assert!(z.optimizer_scratch < plain.optimizer_scratch / 2.0);
    assert_eq!(z.activations, plain.activations);
}

#[test]
fn recomputation_keeps_less_and_runs_more() {
    let s = shape("8b", 8192, 64, true);
    let e = |ac| estimate(&s, &layout(8, 1, true, ac, 1), &h100(8));
    let (none, mlp, block) = (e("none"), e("mlp"), e("block"));
    assert!(none.memory.activations > mlp.memory.activations);
    assert!(mlp.memory.activations > block.memory.activations);
    assert_eq!(
        none.memory.activations_without_recompute,
        block.memory.activations_without_recompute
    );
    assert!(block.executed_flops_per_token > mlp.executed_flops_per_token);
    assert!(mlp.executed_flops_per_token > none.executed_flops_per_token);
    assert_eq!(none.executed_flops_per_token, none.flops_per_token);
    assert!(block.step_s > none.step_s);
}

#[test]
fn the_large_presets_fit_where_the_arithmetic_says() {
    // 8b at 16 bytes a parameter plus scratch needs tensor parallelism on 8 x 80 GB.
    let s = shape("8b", 8192, 64, true);
    let job = JobConfig::parse(
        "name = \"p\"\n[model]\npreset = \"8b\"\n[data]\npath = \"d\"\n[train]\nseq_len = 8192\nbatch_size = 64\nmicro_batch_size = 1\nsteps = 1\n[output]\ndir = \"o\"\n",
        std::path::Path::new("p.toml"),
    )
    .unwrap();
    let p = plan(&job, s.clone(), layout(8, 1, false, "none", 1), h100(8));
    assert!(!p.estimate.fits);
    assert!(
        p.meshes.iter().any(|e| e.fits && e.layout.tp > 1),
        "{}",
        p.render()
    );
    assert!(p.suggestion.is_some());
    // 405b fits on no mesh of 8, nor of 512: its state alone is 20 bytes a parameter
    // over at most 8 tensor-parallel ranks.
    let s = shape("405b", 8192, 512, true);
    let p = plan(&job, s, layout(8, 8, true, "block", 1), h100(8));
    assert!(p.meshes.iter().all(|e| !e.fits));
    let why = p.suggestion.unwrap();
    assert!(why.contains("nothing Kiln runs today"), "{why}");
    // Fully sharded and recomputing, what is left is the block inputs it keeps.
    assert!(why.contains("the most of it activations"), "{why}");
    // 70b does fit on 64: fully sharded with block recomputation.
    let s = shape("70b", 8192, 128, true);
    let p = plan(&job, s, layout(8, 8, true, "block", 1), h100(64));
    let best = p
        .meshes
        .iter()
        .find(|e| e.fits)
        .expect("a mesh of 64 fits 70b");
    assert!(best.layout.fsdp, "{}", p.render());
}

#[test]
fn full_sharding_divides_the_state_and_holds_what_is_gathered() {
    let s = shape("8b", 8192, 64, true);
    let fsdp = |ac: &str| Layout {
        zero1: false,
        fsdp: true,
        ..layout(8, 1, false, ac, 1)
    };
    let p = s.model.num_params() as f64;
    let none = estimate(&s, &fsdp("none"), &h100(8));
    let kept = estimate(
        &s,
        &Layout {
            reshard_after_forward: false,
            ..fsdp("none")
        },
        &h100(8),
    );
    let block = estimate(&s, &fsdp("block"), &h100(8));
    let zero1 = estimate(&s, &layout(8, 1, true, "block", 1), &h100(8));
    // AdamW's state is an eighth of 8 bytes a parameter, as with ZeRO-1.
    assert!((block.memory.optimizer_state - p).abs() / p < 0.01);
    assert!((block.memory.optimizer_state - zero1.memory.optimizer_state).abs() / p < 0.01);
    // Gathered blocks kept from forward to backward: the whole model's 4 bytes a parameter,
    // and the shard.
    assert!(kept.memory.parameters > 4.0 * p);
    // Resharded after forward, or recomputed: the shard, the embedding, the head and two
    // blocks (for 8b's 128k vocabulary, the embedding and the head are 13% of the model).
    for e in [&none, &block] {
        assert!(
            e.memory.parameters < kept.memory.parameters / 3.0,
            "{:?}",
            e.memory
        );
    }
    // bf16 copies: every block's, kept by the linear layers, unless blocks are recomputed.
    assert_eq!(
        none.memory.low_precision_weights,
        kept.memory.low_precision_weights
    );
    assert!(block.memory.low_precision_weights < none.memory.low_precision_weights / 3.0);
    // Gradients: the shard and at most a few whole segments, far below ZeRO-1's whole.
    assert!(block.memory.gradients < zero1.memory.gradients / 4.0);
    // 8b fits on 8 GPUs fully sharded, without tensor parallelism.
    assert!(block.fits, "{:?}", block.memory);
    assert!(!zero1.fits);
    // Gathering again for the backward pass costs traffic, not compute.
    assert!(none.dp_comm_s >= kept.dp_comm_s);
    assert_eq!(none.compute_s, kept.compute_s);
}

/// Hybrid sharding divides the state by the shard group, not the data-parallel group. (Its
/// traffic at one link speed is about full sharding's: a gather over 8 ranks and an
/// all-reduce of an eighth over 2 move 7/8 + 1/8 of the bytes one over 16 moves as 15/16.)
#[test]
fn hybrid_sharding_divides_by_the_shard_group() {
    let s = shape("8b", 8192, 64, true);
    let fsdp = |shard: usize| Layout {
        fsdp: true,
        shard,
        ..layout(16, 1, false, "block", 1)
    };
    let p = s.model.num_params() as f64;
    let full = estimate(&s, &fsdp(0), &h100(16));
    let hybrid = estimate(&s, &fsdp(8), &h100(16));
    // AdamW's 8 bytes a parameter over 16 ranks, or over the 8 of a shard group.
    assert!((full.memory.optimizer_state - p / 2.0).abs() / p < 0.01);
    assert!((hybrid.memory.optimizer_state - p).abs() / p < 0.01);
    assert!(hybrid.memory.total > full.memory.total);
    assert_eq!(
        describe(&hybrid.layout),
        "dp 16 x tp 1, fully sharded in groups of 8, recompute block, micro-batch 1"
    );
    // A shard group that does not divide the data-parallel size is no layout.
    assert!(!valid(&s, &fsdp(3)));
    assert!(valid(&s, &fsdp(4)));
}
