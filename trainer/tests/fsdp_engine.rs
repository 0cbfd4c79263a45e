//! In-process FSDP engine checks at world size 1 (the same code as multi-rank, trivial collectives):
//! the unit schedule (forward without a graph, recompute backward) gives the plain autograd loss
//! and gradients, for full finetuning and for LoRA, on the tiny fixture model; and without
//! activation checkpointing (graphs kept from the forward) it gives the recompute path's numbers.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use tch::{Kind, Tensor};
use trainer::config::ShardingStrategy;
use trainer::dist::{Backend, ProcessGroup};
use trainer::fsdp::{FsdpModel, PlainModel, Trainable, WrapOptions};
use trainer::model::{
    AttentionImpl, Batch, Images, LoadOptions, LoraConfig, MllamaModel, TargetModules,
};
use trainer::optim::{clip_grad_norm, AdamW, AdamWConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn golden_batch(case: &str) -> Batch {
    let p = fixtures().join(format!("golden_{case}.safetensors"));
    let g: HashMap<String, Tensor> = Tensor::read_safetensors(&p).unwrap().into_iter().collect();
    let images = g.get("pixel_values").map(|pv| Images {
        pixel_values: pv.shallow_clone(),
        aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
        aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
        cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
    });
    Batch {
        input_ids: g["input_ids"].shallow_clone(),
        attention_mask: g.get("attention_mask").map(Tensor::shallow_clone),
        labels: g.get("labels").map(Tensor::shallow_clone),
        images,
    }
}

/// LoRA init and dropout draw from libtorch's global generator, which every forward reseeds:
/// the tests (threads of one process) take turns.
static RNG: Mutex<()> = Mutex::new(());

fn load(lora: bool) -> MllamaModel {
    load_with(lora, AttentionImpl::Sdpa)
}

fn load_with(lora: bool, attention: AttentionImpl) -> MllamaModel {
    load_targets(lora, attention, &["q_proj", "v_proj"])
}

fn load_targets(lora: bool, attention: AttentionImpl, targets: &[&str]) -> MllamaModel {
    let opts = LoadOptions {
        attention,
        ..Default::default()
    };
    let mut m = MllamaModel::load(&fixtures().join("model_hf5"), opts).unwrap();
    if lora {
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(targets.iter().map(|t| t.to_string()).collect()),
            use_rslora: false,
        };
        m.apply_lora(&cfg, 7).unwrap();
        // B starts at zero: give it values so that A's gradient is not zero either
        tch::manual_seed(3);
        tch::no_grad(|| {
            for (n, t) in m.trainable_parameters() {
                if n.contains("lora_B") {
                    let _ = t.shallow_clone().uniform_(-0.1, 0.1);
                }
            }
        });
    }
    m
}

fn fsdp(
    pg: &ProcessGroup,
    lora: bool,
    prefetch: bool,
    activation_checkpointing: bool,
) -> Trainable {
    fsdp_with(pg, load(lora), prefetch, activation_checkpointing)
}

fn fsdp_with(
    pg: &ProcessGroup,
    model: MllamaModel,
    prefetch: bool,
    activation_checkpointing: bool,
) -> Trainable {
    let opts = WrapOptions {
        compute: Kind::Float,
        prefetch,
        activation_checkpointing,
        sharding: ShardingStrategy::FullShard,
        sharding_group_size: 1, // (read by hybrid_shard only)
    };
    Trainable::Fsdp(Box::new(FsdpModel::wrap(model, pg, opts).unwrap()))
}

fn compare(lora: bool, prefetch: bool) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let plain = Trainable::Plain(Box::new(PlainModel::new(load(lora))));
    let fsdp = fsdp(&pg, lora, prefetch, true);
    let tag = format!("lora={lora} prefetch={prefetch}");
    compare_steps(&pg, plain, fsdp, &tag, (1e-6, 1e-5, 1e-5));
}

/// Four optimizer steps of `a` and `b` on the golden batches; losses, gradient norms (relative)
/// and updated weights (max abs) must agree within `tol`.
fn compare_steps(
    pg: &ProcessGroup,
    mut a: Trainable,
    mut b: Trainable,
    tag: &str,
    tol: (f64, f64, f64),
) {
    let params_p = a.master_params();
    let params_f = b.master_params();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt_p = AdamW::with_segments(cfg, &params_p, a.optimizer_segments());
    let mut opt_f = AdamW::with_segments(cfg, &params_f, b.optimizer_segments());
    for case in ["batch2", "image1", "text", "image4"] {
        let batch = golden_batch(case);
        a.zero_grads();
        b.zero_grads();
        let scale = 1.0 / 7.0;
        let lp = a.forward_backward(pg, &batch, scale, 1).unwrap();
        let lf = b.forward_backward(pg, &batch, scale, 1).unwrap();
        let e_loss = (lp - lf).abs() / lp.abs();
        let gp = a.grads();
        let gf = b.grads();
        let np = clip_grad_norm(&gp, Some(0.5), Some(pg)).unwrap();
        let nf = clip_grad_norm(&gf, Some(0.5), Some(pg)).unwrap();
        let before: HashMap<String, Tensor> = b.gather_trainable(pg).unwrap().into_iter().collect();
        // tensors without a gradient (cross-attention on text) are skipped, as torch skips None
        opt_p.step_present(&params_p, &gp, &a.grad_present(), 1e-4);
        opt_f.step_present(&params_f, &gf, &b.grad_present(), 1e-4);
        a.after_update();
        b.after_update();
        let wp: HashMap<String, Tensor> = a.gather_trainable(pg).unwrap().into_iter().collect();
        let wf: Vec<(String, Tensor)> = b.gather_trainable(pg).unwrap();
        assert_eq!(wp.len(), wf.len());
        let mut e_w = 0.0f64;
        let mut unchanged = vec![];
        for (n, t) in &wf {
            let d = (t - &wp[n]).abs().max().double_value(&[]);
            e_w = e_w.max(d);
            if t.equal(&before[n]) {
                unchanged.push(n.as_str());
            }
        }
        if case == "text" && tag.contains("projector") {
            // (the projector takes no part without an image)
            assert!(
                !unchanged.is_empty(),
                "{case} {tag}: weights without a gradient were updated"
            );
        } else if case == "text" {
            assert!(
                unchanged.iter().any(|n| n.contains("cross_attn")),
                "{case} {tag}: cross-attention weights without a gradient were updated"
            );
        } else {
            assert!(
                unchanged.is_empty(),
                "{case} {tag}: not updated: {unchanged:?}"
            );
        }
        let e_norm = if np == nf { 0.0 } else { (np - nf).abs() / np }; // (0 and 0: no gradient at all)
        println!("{case} {tag}: loss {lp:.6} vs {lf:.6} rel {e_loss:.2e}, grad norm {np:.6} vs {nf:.6} rel {e_norm:.2e}, weights max abs diff {e_w:.2e}, {} of {} tensors without a gradient kept", unchanged.len(), wf.len());
        assert!(e_loss < tol.0, "{case} {tag}: loss {lp} vs {lf}");
        assert!(e_norm < tol.1, "{case} {tag}: grad norm {np} vs {nf}");
        assert!(e_w < tol.2, "{case} {tag}: weights differ by {e_w}");
    }
}

/// `b.activation_checkpointing: false` (graphs kept from the forward) against the recompute
/// path: the same numbers within 1e-6 relative (losses, norms) and 1e-6 absolute (weights).
fn keep_graphs_matches_recompute(lora: bool) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let recompute = fsdp(&pg, lora, true, true);
    let keep = fsdp(&pg, lora, true, false);
    let tag = format!("lora={lora} keep graphs vs recompute");
    compare_steps(&pg, recompute, keep, &tag, (1e-6, 1e-6, 1e-6));
}

#[test]
fn world1_lora_without_activation_checkpointing_matches_recompute() {
    keep_graphs_matches_recompute(true);
}

#[test]
fn world1_full_without_activation_checkpointing_matches_recompute() {
    keep_graphs_matches_recompute(false);
}

#[test]
fn world1_full_finetune_matches_autograd() {
    compare(false, true);
}

#[test]
fn world1_lora_matches_autograd() {
    compare(true, false);
}

/// The loss's LM head and cross-entropy 3 supervised rows at a time (the out stage's chunks; by
/// default ~2^26 logits each, one chunk on the fixtures): the same losses, gradient norms and
/// updates as plain autograd over the whole logits.
fn chunked_lm_loss_matches_autograd(lora: bool, activation_checkpointing: bool) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let plain = Trainable::Plain(Box::new(PlainModel::new(load(lora))));
    let mut fsdp = fsdp(&pg, lora, false, activation_checkpointing);
    if let Trainable::Fsdp(m) = &mut fsdp {
        assert!(m.lm_loss_chunk >= 1 << 16, "{}", m.lm_loss_chunk); // the fixture's small vocabulary
        m.lm_loss_chunk = 3;
    }
    // each golden batch needs several chunks for this to test them
    for case in ["batch2", "image1", "text", "image4"] {
        let labels = golden_batch(case).labels.unwrap();
        let rows = trainer::model::supervised_rows(&labels).0.size()[0];
        assert!(rows > 2 * 3, "{case}: {rows} supervised rows");
    }
    let tag =
        format!("lora={lora} checkpointing={activation_checkpointing} LM loss in chunks of 3");
    compare_steps(&pg, plain, fsdp, &tag, (1e-6, 1e-5, 1e-5));
}

#[test]
fn world1_full_finetune_with_the_lm_loss_in_chunks_matches_autograd() {
    chunked_lm_loss_matches_autograd(false, true);
}

#[test]
fn world1_lora_with_the_lm_loss_in_chunks_without_checkpointing_matches_autograd() {
    chunked_lm_loss_matches_autograd(true, false);
}

/// `model.attention: fused` trains through the schedule's explicit attention backward (the graph
/// cut at each attention call, `model::attn_tape`). On CPU the fused kernels are replaced by their
/// tch reference (`attn_tape::set_reference`), so this checks the cutting and the gradient sums
/// against eager attention (matmul + softmax) with plain autograd through the same schedule; the
/// kernels themselves are checked on a GPU (kernels-gpu-check, model_gpu).
/// Not against sdpa: on rows whose every key is masked (the vision rows of `batch2`'s padding
/// image slot, which has no real tile) eager's gradient into Q and K is an artifact of autograd
/// through a softmax whose output does not depend on them, which our sdpa deliberately does not
/// reproduce (`AttnMask::fully_masked`; libtorch's CPU sdpa backward alone gave such rows
/// gradients 40-260x eager's).
fn fused_matches_eager(lora: bool, activation_checkpointing: bool) {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    trainer::model::attn_tape::set_reference(true);
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let eager = fsdp_with(
        &pg,
        load_with(lora, AttentionImpl::Eager),
        true,
        activation_checkpointing,
    );
    let fused = fsdp_with(
        &pg,
        load_with(lora, AttentionImpl::Fused),
        true,
        activation_checkpointing,
    );
    let tag =
        format!("lora={lora} checkpointing={activation_checkpointing} fused (reference) vs eager");
    // The first step agrees to 1e-5 (loss) and 1e-4 (gradient norm) relative. AdamW moves every
    // parameter by ~lr (1e-4) whatever its gradient's size, so near-zero gradients of opposite
    // sign leave weights 2 lr apart after a step and later steps start from slightly different
    // models (full finetuning's gradient norm then drifts to 8e-4): loss 3e-5, norm 2e-3,
    // weights 1e-3.
    compare_steps(&pg, eager, fused, &tag, (3e-5, 2e-3, 1e-3));
}

/// The fused path (the tch reference in place of the kernels) gives the vision rows of `batch2`'s
/// padding image slot, which see no key, the mean of V as eager's masked softmax does (the kernels
/// alone give zeros there): the projected vision states of every image slot agree.
#[test]
fn fused_vision_rows_without_a_key_match_eager() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    trainer::model::attn_tape::set_reference(true);
    let batch = golden_batch("batch2");
    let images = batch.images.as_ref().unwrap();
    let empty_slots = images
        .aspect_ratio_mask
        .sum_dim_intlist(-1, false, tch::Kind::Int64)
        .eq(0)
        .sum(tch::Kind::Int64)
        .int64_value(&[]);
    assert!(empty_slots > 0, "batch2 has a padding image slot");
    let states =
        |attention| tch::no_grad(|| load_with(false, attention).vision_states(images)).unwrap();
    let (eager, fused) = (states(AttentionImpl::Eager), states(AttentionImpl::Fused));
    let err = (&eager - &fused).abs().max().double_value(&[]);
    assert!(err < 1e-5, "vision states differ by {err}");
}

#[test]
fn world1_lora_fused_attention_trains_like_eager() {
    fused_matches_eager(true, true);
}

#[test]
fn world1_full_fused_attention_without_checkpointing_trains_like_eager() {
    fused_matches_eager(false, false);
}

/// The fixture model with `tie_word_embeddings: true` (its lm_head weights dropped from the files
/// and the index), in a fresh folder.
fn tied_fixture() -> PathBuf {
    let src = fixtures().join("model_hf5");
    let dir = std::env::temp_dir().join(format!("fsdp_engine_tied_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["tie_word_embeddings"] = true.into();
    cfg["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let mut index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(src.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object_mut().unwrap();
    map.retain(|k, _| !k.contains("lm_head"));
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let kept: Vec<(String, Tensor)> = Tensor::read_safetensors(src.join(f))
            .unwrap()
            .into_iter()
            .filter(|(n, _)| !n.contains("lm_head"))
            .collect();
        let refs: Vec<(&str, &Tensor)> = kept.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, dir.join(f)).unwrap();
    }
    dir
}

/// Tied embeddings (lm_head a view of the embedding): FSDP full finetuning matches plain
/// autograd, and between steps the view no longer holds the freed root unit's gathered buffer.
#[test]
fn tied_embeddings_train_like_autograd_and_release_the_root_buffer() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let dir = tied_fixture();
    let load_tied = || MllamaModel::load(&dir, LoadOptions::default()).unwrap();
    assert!(load_tied().config.text.tie_word_embeddings && load_tied().lm_head_tied);
    let plain = Trainable::Plain(Box::new(PlainModel::new(load_tied())));
    let mut fsdp = fsdp_with(&pg, load_tied(), false, true);
    if let Trainable::Fsdp(m) = &fsdp {
        // sharded: the tied view does not hold the whole unsharded embedding until step 1
        assert_eq!(m.model.lm_head.weight.numel(), 0);
    }
    let batch = golden_batch("text");
    fsdp.zero_grads();
    fsdp.forward_backward(&pg, &batch, 1.0, 1).unwrap();
    match &mut fsdp {
        Trainable::Fsdp(m) => {
            assert_eq!(m.model.lm_head.weight.numel(), 0);
            // the LM head (the embedding's view) in chunks: its gradient summed over them
            m.lm_loss_chunk = 3;
        }
        Trainable::Plain(_) => unreachable!(),
    }
    compare_steps(
        &pg,
        plain,
        fsdp,
        "tied, LM loss in chunks of 3",
        (1e-6, 1e-5, 1e-5),
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// LoRA on the projector alone (only the root unit's head stage trains, so the vision tower is
/// run without gradients): the same losses, norms and updates as plain autograd.
#[test]
fn world1_lora_on_the_projector_alone_matches_autograd() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let load = || load_targets(true, AttentionImpl::Sdpa, &["multi_modal_projector"]);
    let plain = Trainable::Plain(Box::new(PlainModel::new(load())));
    let fsdp = fsdp_with(&pg, load(), true, true);
    compare_steps(
        &pg,
        plain,
        fsdp,
        "LoRA on the projector",
        (1e-6, 1e-5, 1e-5),
    );
}
