//! FSDP end to end through the real launcher (CPU backend): `trainer train` at world 2 and 3
//! (batch b per rank) against `fsdp.enabled: false` at world 1 (batch b x W, the same global
//! batch), fp32, grad_accum 2, clipping on, 5 steps, for LoRA and full finetuning: per-step
//! losses within 1e-5 relative, final trainable weights within 1e-5. Also: parameter bytes per
//! rank about 1/W of the model, and two runs with one seed give identical metrics.
//!
//! The model is a tiny random Mllama sized to the data fixtures' tokenizer (vocab 711, image
//! token 711 in the embedding's extra rows) and image processor (56-px tiles).
mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{bin, repo, tiny_model_folder, write_train_records};
use serde_json::Value;
use tch::Tensor;

/// A temp folder with `model/` (tiny random Mllama + the fixture tokenizer) and `train.jsonl`.
fn setup() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("fsdp-parity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        tiny_model_folder(&dir.join("model"), 11, |_| {});
        write_train_records(&dir);
        dir
    })
}

struct Run {
    metrics: Vec<Value>,
    weights: HashMap<String, Tensor>,
}

/// How the ranks are started.
#[derive(Clone, Copy)]
enum Launch {
    /// `world` ranks through one launcher (the trainer alone for 1).
    OneNode(usize),
    /// Two launchers on this host as two nodes of `n` ranks each (the TCP transport between them).
    TwoNodes(usize),
}

/// `trainer train` at `world` ranks (through the launcher when world > 1).
fn train(name: &str, world: usize, sets: &[String]) -> Run {
    train_as(name, Launch::OneNode(world), sets)
}

/// `train` started as `launch` says.
fn train_as(name: &str, launch: Launch, sets: &[String]) -> Run {
    let (out, cfg) = run_folder(name);
    train_in(out, cfg, launch, sets)
}

/// A fresh folder `name` with the run's config.yaml: (folder, config).
fn run_folder(name: &str) -> (PathBuf, PathBuf) {
    let dir = setup();
    let out = dir.join(name);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let cfg = out.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {{path: {m}, dtype: fp32, attention: sdpa}}\n\
             data: {{train: {d}, image_root: {i}, num_workers: 1}}\n\
             train: {{epochs: 1, grad_accum: 2, lr: 1.0e-3, weight_decay: 0.01, grad_clip: 1.0, max_steps: 5, seed: 5, output_dir: {o}}}\n\
             fsdp: {{backend: cpu, mixed_precision: fp32}}\n\
             checkpoint: {{dir: {o}/ckpt, resume: never}}\n",
            m = dir.join("model").display(),
            d = dir.join("train.jsonl").display(),
            i = repo().join("tests/fixtures/data/images").display(),
            o = out.display()
        ),
    )
    .unwrap();
    (out, cfg)
}

/// `train_as` in `out` with config `cfg`.
fn train_in(out: PathBuf, cfg: PathBuf, launch: Launch, sets: &[String]) -> Run {
    let weights_file = out.join("weights.safetensors");
    let launcher = |args: &[&str]| {
        let mut c = common::launcher();
        c.args(args).arg("--").arg(bin("trainer"));
        c
    };
    let name = out.file_name().unwrap().to_string_lossy().into_owned();
    let mut commands = match launch {
        Launch::OneNode(1) => vec![Command::new(bin("trainer"))],
        Launch::OneNode(w) => vec![launcher(&[
            "--standalone",
            "--nproc-per-node",
            &w.to_string(),
        ])],
        Launch::TwoNodes(n) => {
            let port = common::free_port();
            let run_id = format!("fsdp-parity-{name}-{port}");
            let node = |rank: usize| {
                let args = common::two_node_args(rank, n, port, &run_id);
                let mut c = launcher(&args.iter().map(String::as_str).collect::<Vec<_>>());
                c.env(common::LOOPBACK_NODES_ENV.0, common::LOOPBACK_NODES_ENV.1);
                c
            };
            vec![node(0), node(1)]
        }
    };
    let children: Vec<_> = commands
        .iter_mut()
        .map(|cmd| {
            cmd.arg("train").arg(&cfg);
            for s in sets {
                cmd.args(["--set", s]);
            }
            cmd.env("TRAINER_DUMP_TRAINABLE", &weights_file)
                .env_remove("RANK")
                .env_remove("WORLD_SIZE")
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run trainer")
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().expect("trainer output");
        assert!(
            output.status.success(),
            "{name}: trainer failed\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let weights = Tensor::read_safetensors(&weights_file)
        .unwrap()
        .into_iter()
        .collect();
    Run { metrics, weights }
}

fn sets(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// FSDP at `world` with batch `b` vs plain at world 1 with batch b x world.
fn parity(peft: &[&str], world: usize, b: usize) -> (Run, Run) {
    parity_as(peft, "full_shard", world, b)
}

/// `parity` with `fsdp.sharding_strategy: strategy`.
fn parity_as(peft: &[&str], strategy: &str, world: usize, b: usize) -> (Run, Run) {
    parity_launched(peft, strategy, Launch::OneNode(world), b)
}

/// `parity_as` with the ranks started as `launch` says.
fn parity_launched(peft: &[&str], strategy: &str, launch: Launch, b: usize) -> (Run, Run) {
    let (world, nodes) = match launch {
        Launch::OneNode(w) => (w, ""),
        Launch::TwoNodes(n) => (2 * n, "-2nodes"),
    };
    // (each configuration its own folders: tests run in parallel)
    let kind = if peft.iter().any(|s| s.contains("freeze_llm_only")) {
        "freeze-llm"
    } else if peft.iter().any(|s| s.contains("none")) {
        "full"
    } else if peft.iter().any(|s| s.contains("cross_attn")) {
        "lora-cross"
    } else if peft.iter().any(|s| s.contains("use_dora")) {
        "dora"
    } else {
        "lora"
    };
    let tag = match strategy {
        "full_shard" => format!("{kind}{nodes}"),
        _ => format!("{kind}-{strategy}{nodes}"),
    };
    let mut base = sets(peft);
    base.push("fsdp.enabled=false".into());
    base.push(format!("train.batch_size={}", b * world));
    let mut sharded = sets(peft);
    sharded.push(format!("train.batch_size={b}"));
    sharded.push(format!("fsdp.sharding_strategy={strategy}"));
    let reference = train(&format!("{tag}-w1-b{}", b * world), 1, &base);
    let fsdp = train_as(&format!("{tag}-w{world}-b{b}"), launch, &sharded);
    assert_eq!(reference.metrics.len(), 5);
    same_run(&tag, world, b, &reference, &fsdp);
    (reference, fsdp)
}

/// Per-step losses within 1e-5 relative, the same tokens per step, final weights within 1e-5.
fn same_run(tag: &str, world: usize, b: usize, reference: &Run, fsdp: &Run) {
    assert_eq!(fsdp.metrics.len(), reference.metrics.len());
    let mut worst_loss = 0.0f64;
    for (r, f) in reference.metrics.iter().zip(&fsdp.metrics) {
        let (lr_, lf) = (r["loss"].as_f64().unwrap(), f["loss"].as_f64().unwrap());
        worst_loss = worst_loss.max((lr_ - lf).abs() / lr_.abs());
        assert_eq!(r["tokens"], f["tokens"], "same samples per step");
    }
    let mut worst_w = 0.0f64;
    assert_eq!(reference.weights.len(), fsdp.weights.len());
    for (n, t) in &fsdp.weights {
        let d = (t - &reference.weights[n]).abs().max().double_value(&[]);
        worst_w = worst_w.max(d);
    }
    println!("{tag} world {world} batch {b}: max loss rel diff {worst_loss:.2e}, max weight abs diff {worst_w:.2e}");
    assert!(
        worst_loss < 1e-5,
        "{tag} world {world}: losses differ (rel {worst_loss})"
    );
    assert!(
        worst_w < 1e-5,
        "{tag} world {world}: weights differ (abs {worst_w})"
    );
}

const LORA: &[&str] = &[
    "peft.method=lora",
    "peft.r=4",
    "peft.dropout=0.0",
    "peft.target_modules=[q_proj,v_proj]",
];
const FULL: &[&str] = &["peft.method=none"];

#[test]
fn lora_world2_matches_single_process() {
    let (reference, fsdp) = parity(LORA, 2, 2);
    // memory: parameter bytes per rank about 1/2 of the whole model (+ padding)
    let whole = reference.metrics[0]["param_bytes"].as_f64().unwrap();
    let per_rank = fsdp.metrics[0]["param_bytes"].as_f64().unwrap();
    println!("param bytes: world 1 {whole}, world 2 per rank {per_rank}");
    assert!(
        per_rank <= whole / 2.0 * 1.01 + 4096.0,
        "{per_rank} vs {whole}"
    );
    assert!(per_rank >= whole / 2.0 * 0.99);
}

/// A training file of the test set's first `n` records.
fn first_records(n: usize) -> PathBuf {
    let file = setup().join(format!("train-{n}.jsonl"));
    let lines: Vec<String> = std::fs::read_to_string(setup().join("train.jsonl"))
        .unwrap()
        .lines()
        .take(n)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&file, lines.concat()).unwrap();
    file
}

/// 11 samples in global batches of 4 (world 2 x batch 1 x grad_accum 2): each epoch's last step
/// trains the 3 left over (train.drop_last false), in two micro-steps, the second of them one
/// sample on rank 0 and a masked filler row on rank 1; the same losses and weights as one process
/// with batch 2, which needs no filler.
#[test]
fn a_partial_last_step_matches_single_process() {
    let file = first_records(11);
    let mut common = sets(LORA);
    common.extend(sets(&["train.epochs=2", "train.max_steps=0"]));
    common.push(format!("data.train={}", file.display()));
    let mut base = common.clone();
    base.extend(sets(&["fsdp.enabled=false", "train.batch_size=2"]));
    let mut sharded = common.clone();
    sharded.push("train.batch_size=1".into());
    let reference = train("partial-w1-b2", 1, &base);
    let fsdp = train("partial-w2-b1", 2, &sharded);
    assert_eq!(reference.metrics.len(), 6, "3 steps per epoch");
    same_run("partial", 2, 1, &reference, &fsdp);
    // with drop_last the 3 sit out: 2 steps per epoch
    base.push("train.drop_last=true".into());
    assert_eq!(train("partial-dropped-w1-b2", 1, &base).metrics.len(), 4);
}

/// LoRA dropout in an epoch's partial last step: 10 samples in global batches of 4 leave 2, one
/// slice of batch_size 2 at world 1 (grad_accum 2) and at world 2 (rank 0's, rank 1 a filler row),
/// so both draw the same masks (seeded by the slice): the same losses and weights (they differed
/// by ~2e-4 relative in loss when the 2 were spread 1 + 1 over the ranks).
#[test]
fn dropout_in_a_partial_last_step_is_the_same_at_another_world_size() {
    let file = first_records(10);
    let mut common: Vec<String> = sets(LORA)
        .into_iter()
        .filter(|s| !s.starts_with("peft.dropout"))
        .collect();
    common.extend(sets(&[
        "peft.dropout=0.1",
        "train.epochs=2",
        "train.max_steps=0",
        "train.batch_size=2",
    ]));
    common.push(format!("data.train={}", file.display()));
    let mut w1 = common.clone();
    w1.push("train.grad_accum=2".into());
    let mut w2 = common;
    w2.push("train.grad_accum=1".into());
    let reference = train("dropout-partial-w1", 1, &w1);
    let fsdp = train("dropout-partial-w2", 2, &w2);
    assert_eq!(reference.metrics.len(), 6, "3 steps per epoch");
    same_run("dropout-partial", 2, 2, &reference, &fsdp);
}

#[test]
fn lora_world3_matches_single_process() {
    parity(LORA, 3, 1);
}

/// A fresh DoRA adapter: each of the 3 ranks reads a third of the wrapped base weights for the
/// initial magnitudes (row norms) and the ranks add them up; the single process's losses and
/// weights.
#[test]
fn dora_world3_matches_single_process() {
    let dora: Vec<&str> = LORA.iter().copied().chain(["peft.use_dora=true"]).collect();
    parity(&dora, 3, 1);
}

#[test]
fn full_world2_matches_single_process() {
    parity(FULL, 2, 1);
}

#[test]
fn full_world3_matches_single_process_and_holds_a_third() {
    let (reference, fsdp) = parity(FULL, 3, 1);
    let whole = reference.metrics[0]["param_bytes"].as_f64().unwrap();
    let per_rank = fsdp.metrics[0]["param_bytes"].as_f64().unwrap();
    println!("param bytes: world 1 {whole}, world 3 per rank {per_rank}");
    assert!(
        per_rank <= whole / 3.0 * 1.01 + 4096.0,
        "{per_rank} vs {whole}"
    );
    assert!(per_rank >= whole / 3.0 * 0.99);
}

/// LoRA on the text cross-attention only: the vision tower and the self-attention layers before
/// the first cross-attention layer cannot get a gradient, so the backward skips their stages
/// (gathers included) on every rank; the result is still the single process's.
#[test]
fn lora_on_cross_attention_only_world2_matches_single_process() {
    let cross = [
        "peft.method=lora",
        "peft.r=4",
        "peft.dropout=0.0",
        "peft.target_modules=[cross_attn.q_proj,cross_attn.v_proj]",
    ];
    let (_, fsdp) = parity(&cross, 2, 2);
    assert!(fsdp.weights.keys().all(|k| k.contains("cross_attn")));
}

#[test]
fn same_seed_gives_identical_metrics() {
    let mut s = sets(LORA);
    s.push("peft.dropout=0.1".into());
    s.push("train.batch_size=1".into());
    let a = train("det-a", 2, &s);
    let b = train("det-b", 2, &s);
    let keys = ["step", "epoch", "loss", "lr", "grad_norm", "tokens"];
    for (x, y) in a.metrics.iter().zip(&b.metrics) {
        for k in keys {
            assert_eq!(x[k], y[k], "{k} differs between two runs with one seed");
        }
    }
    for (n, t) in &a.weights {
        assert!(t.equal(&b.weights[n]), "{n} differs between two runs");
    }
}

/// `fsdp.activation_checkpointing: false` (graphs and gathered units kept from the forward to the
/// backward) against the recompute path at world 2: losses within 1e-6 relative, final weights
/// within 1e-6 (dropout on for LoRA, so the kept graph must have drawn the recompute's masks).
fn keep_graphs_world2(peft: &[&str], tag: &str) {
    let mut s = sets(peft);
    s.push("train.batch_size=1".into());
    let recompute = train(&format!("{tag}-ac-on"), 2, &s);
    s.push("fsdp.activation_checkpointing=false".into());
    let keep = train(&format!("{tag}-ac-off"), 2, &s);
    assert_eq!(keep.metrics.len(), 5);
    for (r, k) in recompute.metrics.iter().zip(&keep.metrics) {
        let (a, b) = (r["loss"].as_f64().unwrap(), k["loss"].as_f64().unwrap());
        assert!((a - b).abs() / a.abs() < 1e-6, "{tag}: loss {a} vs {b}");
    }
    let mut worst = 0.0f64;
    for (n, t) in &keep.weights {
        worst = worst.max((t - &recompute.weights[n]).abs().max().double_value(&[]));
    }
    println!("{tag}: activation checkpointing off vs on, max weight diff {worst:.2e}");
    assert!(worst < 1e-6, "{tag}: weights differ by {worst}");
}

#[test]
fn lora_world2_without_activation_checkpointing_matches_recompute() {
    keep_graphs_world2(&[LORA, &["peft.dropout=0.1"]].concat(), "lora-keep");
}

#[test]
fn full_world2_without_activation_checkpointing_matches_recompute() {
    keep_graphs_world2(FULL, "full-keep");
}

/// `fsdp.sharding_strategy: no_shard` (DDP: whole replicas, gradients all-reduced) at world 2,
/// LoRA: the single process's losses and weights, with the whole model on each rank.
#[test]
fn lora_world2_no_shard_matches_single_process_and_holds_the_whole_model() {
    let (reference, replicas) = parity_as(LORA, "no_shard", 2, 2);
    let whole = reference.metrics[0]["param_bytes"].as_f64().unwrap();
    let per_rank = replicas.metrics[0]["param_bytes"].as_f64().unwrap();
    println!("param bytes: world 1 {whole}, world 2 no_shard per rank {per_rank}");
    assert!(
        (per_rank - whole).abs() <= whole * 0.01,
        "{per_rank} vs {whole}"
    );
}

/// no_shard, full finetuning: every trainable group's fp32 master is replicated and stepped on
/// every rank from all-reduced gradients; clipping uses the norm of the whole gradient (not summed
/// over ranks).
#[test]
fn full_world2_no_shard_matches_single_process() {
    parity_as(FULL, "no_shard", 2, 1);
}

/// `hybrid_shard` (HSDP) at world 4 in shard groups of 2: each pair of ranks holds a whole copy
/// of the model in halves; gradient shards are reduce-scattered within the pair and all-reduced
/// across the pairs. LoRA: the single process's losses and weights, half the model per rank.
#[test]
fn lora_world4_hybrid_shard_matches_single_process_and_holds_half() {
    let peft = [LORA, &["fsdp.sharding_group_size=2"]].concat();
    let (reference, hsdp) = parity_as(&peft, "hybrid_shard", 4, 1);
    let whole = reference.metrics[0]["param_bytes"].as_f64().unwrap();
    let per_rank = hsdp.metrics[0]["param_bytes"].as_f64().unwrap();
    println!(
        "param bytes: world 1 {whole}, world 4 hybrid_shard (groups of 2) per rank {per_rank}"
    );
    assert!(
        (per_rank - whole / 2.0).abs() <= whole * 0.02,
        "{per_rank} vs half of {whole}"
    );
}

/// hybrid_shard as it is meant: two nodes of two ranks, shard groups of a node's ranks (the
/// default; shared memory within the node) and copies across the nodes (TCP).
#[test]
fn lora_two_nodes_hybrid_shard_by_node_matches_single_process() {
    let (reference, hsdp) = parity_launched(LORA, "hybrid_shard", Launch::TwoNodes(2), 1);
    // a node's two ranks hold one copy: half of it each
    let whole = reference.metrics[0]["param_bytes"].as_f64().unwrap();
    let per_rank = hsdp.metrics[0]["param_bytes"].as_f64().unwrap();
    assert!(
        (per_rank - whole / 2.0).abs() <= whole * 0.02,
        "{per_rank} vs half of {whole}"
    );
}

/// Each node reads its own config and --set arguments: a node whose peft.dropout and train.lr
/// differ from rank 0's stops the run before training, its rank's error naming both keys and
/// values; another node's paths (its own output folder here) are no difference.
#[test]
fn a_node_with_other_settings_stops_the_run_before_training() {
    let (out, cfg) = run_folder("other-settings");
    let port = common::free_port();
    let run_id = format!("other-settings-{port}");
    let nodes: Vec<_> = [
        vec![format!("train.output_dir={}", out.join("node0").display())],
        vec![
            format!("train.output_dir={}", out.join("node1").display()),
            "train.lr=0.5".into(),
            "peft.dropout=0.1".into(),
        ],
    ]
    .into_iter()
    .enumerate()
    .map(|(node, sets)| {
        let mut c = common::launcher();
        c.args(common::two_node_args(node, 1, port, &run_id))
            .arg("--")
            .arg(bin("trainer"))
            .arg("train")
            .arg(&cfg)
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .env(common::LOOPBACK_NODES_ENV.0, common::LOOPBACK_NODES_ENV.1)
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("launcher")
    })
    .collect();
    let outputs: Vec<_> = (nodes.into_iter())
        .map(|c| c.wait_with_output().expect("launcher output"))
        .collect();
    let stderr: Vec<String> = (outputs.iter())
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .collect();
    assert!(outputs.iter().all(|o| !o.status.success()), "{stderr:?}");
    let all = stderr.join("\n");
    assert!(
        all.contains("this rank's training settings differ from rank 0's: peft.dropout: rank 0 has 0.05, this rank 0.1, train.lr: rank 0 has 0.001, this rank 0.5"),
        "{all}"
    );
    assert!(!out.join("node0/metrics.jsonl").exists(), "{all}");
}

/// hybrid_shard, full finetuning: the gradient norm for clipping adds up the shards of one
/// copy (the shard group), not of every rank.
#[test]
fn full_world4_hybrid_shard_matches_single_process() {
    let peft = [FULL, &["fsdp.replica_group_size=2"]].concat();
    parity_as(&peft, "hybrid_shard", 4, 1);
}

/// `hybrid_shard_zero2` (PyTorch's `_HYBRID_SHARD_ZERO2`): HSDP whose units stay gathered from
/// the forward to their backward; LoRA and full finetuning at world 4 in shard groups of 2 train
/// as the single process.
#[test]
fn world4_hybrid_shard_zero2_matches_single_process() {
    let peft = [LORA, &["fsdp.sharding_group_size=2"]].concat();
    parity_as(&peft, "hybrid_shard_zero2", 4, 1);
    let full = [FULL, &["fsdp.replica_group_size=2"]].concat();
    parity_as(&full, "hybrid_shard_zero2", 4, 1);
}

/// `shard_grad_op`: units stay gathered from the forward to their backward, which recomputes
/// them without a second gather.
#[test]
fn lora_world3_shard_grad_op_matches_single_process() {
    parity_as(LORA, "shard_grad_op", 3, 1);
}

#[test]
fn full_world2_shard_grad_op_matches_single_process() {
    parity_as(FULL, "shard_grad_op", 2, 1);
}

/// `peft.freeze_llm_only` (llama-recipes' freeze_LLM_only): full finetuning of the vision tower,
/// the projector and the cross-attention layers (1 and 3 of the tiny model's 4) only; FSDP at world 2
/// is the single process, and nothing of the rest of the language model is trained.
#[test]
fn freeze_llm_only_world2_matches_single_process() {
    let (_, fsdp) = parity(&["peft.method=none", "peft.freeze_llm_only=true"], 2, 1);
    let trained: Vec<&String> = fsdp.weights.keys().collect();
    assert!(
        trained.iter().any(|k| k.contains("vision_model")),
        "{trained:?}"
    );
    assert!(
        trained.iter().any(|k| k.contains("multi_modal_projector")),
        "{trained:?}"
    );
    assert!(
        trained.iter().any(|k| k.contains("layers.1.cross_attn")),
        "{trained:?}"
    );
    assert!(
        !trained
            .iter()
            .any(|k| k.contains("language_model.layers.0.")),
        "{trained:?}"
    );
    for k in &trained {
        assert!(
            !k.contains("language_model") || k.contains("layers.1.") || k.contains("layers.3."),
            "{k} is in the frozen language model"
        );
        assert!(!k.starts_with("lm_head"), "{k}");
    }
}
