//! Model FLOPs per step, achieved TFLOP/s and MFU.
//!
//! Model FLOPs follow the MFU convention (PaLM, torchtitan): the work the model needs, not what
//! the engine executes, so the recompute of activation checkpointing is not counted. Per token a
//! parameter costs 2 FLOPs in the forward, 2 in the backward for the gradient of its input (the
//! chain rule runs through frozen layers too), and 2 more for its own gradient when it trains:
//!
//! ```text
//! FLOPs per step = sum over parameters p of  tokens(p) x (4 + 2 x [p trains])
//!   full finetuning:  6 x N x tokens
//!   LoRA:             (4 x N_base + 6 x N_lora) x tokens   (frozen weights need no weight gradient)
//! ```
//!
//! (For LoRA this counts the input-gradient backward of the frozen weights, 2 x N_base, which a
//! `2 x N_total + 4 x N_trainable` count would leave out although the engine must do it.)
//! `tokens(p)` is what the parameter is applied to: text positions (B x S, padding included) for
//! the language model and lm_head; vision tokens (real tiles x patches per tile) for the vision
//! tower, the projector and the cross-attention k/v projections. The embedding table is a lookup
//! (0 FLOPs).
//!
//! Attention's score and value products add PaLM's and torchtitan's `12 x L x H x D x T` per query
//! (4 in the forward, 8 in the backward; causal masks not halved, as there), with T the keys it
//! sees: S text positions for each self-attention layer, the sample's vision tokens for each
//! cross-attention layer, and each image's vision tokens for each vision layer (tiles attend
//! jointly). They are not optional for LoRA: the backward through frozen attention still runs.
//!
//! DoRA adds, in every forward, work that does not scale with the tokens: each wrapped weight
//! W + s B A and its row norms, (2 r + 3) FLOPs per weight element (no backward: the norm is
//! detached); per micro-batch, and again in the recompute.
//!
//! Executed FLOPs add what the engine really runs on top: with activation checkpointing each unit's
//! forward runs twice, so `+ 2 x N x tokens` (every parameter, trainable or not). They give
//! `hw_tflops` (hardware FLOP/s, PaLM's HFU numerator) next to the model `tflops`.
//!
//! MFU = (model FLOPs per rank per step / step time) / the device's peak dense FLOP/s in the
//! compute dtype: `train.peak_tflops`, else [`device_peak_tflops`] from the GPU's name; on a
//! CPU (or an unknown GPU) MFU is null and only the achieved TFLOP/s is reported.
use tch::{Device, Kind};

use crate::data::dataset::MicroBatch;
use crate::model::lora::LoraBranch;
use crate::model::{text_layer, MllamaModel};

/// FLOPs per text token and per vision token of a forward + backward step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FlopCount {
    per_text_token: f64,
    per_vision_token: f64,
    /// Forward FLOPs per token (2 per parameter): the recompute of activation checkpointing.
    forward_per_text_token: f64,
    forward_per_vision_token: f64,
    /// Parts of `forward_per_text_token` that generation does not apply to every text token:
    /// the LM head (logits for the generated positions only) and the cross-attention layers'
    /// text-side weights (skipped without an image).
    forward_lm_head: f64,
    forward_cross_layers: f64,
    /// Vision tokens per tile (patches + class token).
    patches_per_tile: f64,
    /// Attention FLOPs per (query, key) pair of forward + backward, summed over the layers: text
    /// self-attention, text cross-attention, vision (local + global).
    self_attn_per_pair: f64,
    cross_attn_per_pair: f64,
    vision_attn_per_pair: f64,
    /// DoRA's work in every forward that does not scale with the tokens: each wrapped weight
    /// W + s B A (2 r + 1 FLOPs per element) and its row norms (2 per element); no backward (the
    /// norm is detached, as in peft).
    dora_per_forward: f64,
}

/// Whether a parameter is applied to vision tokens (else to text tokens).
fn sees_vision_tokens(name: &str) -> bool {
    name.contains("vision_model")
        || name.contains("multi_modal_projector")
        || name.contains("cross_attn.k_proj")
        || name.contains("cross_attn.v_proj")
}

impl FlopCount {
    /// From the model with LoRA applied (or not: full finetuning trains every base parameter).
    pub(crate) fn of(m: &mut MllamaModel) -> Self {
        let lora: Option<Vec<(String, i64)>> = m.lora.is_some().then(|| {
            m.trainable_parameters()
                .into_iter()
                .map(|(n, t)| (n, t.numel() as i64))
                .collect()
        });
        let mut dora = 0.0;
        m.visit_linears(&mut |l| {
            let computes_norm = |b: &&LoraBranch| b.magnitude.is_some() && b.dora_scale.is_none();
            if let Some(b) = l.lora.as_ref().filter(computes_norm) {
                // (the factors' shapes: A (r, in), B (out, r))
                let (a, out) = (b.a.size(), b.b.size()[0]);
                dora += (out * a[1]) as f64 * (2.0 * a[0] as f64 + 3.0);
            }
        });
        Self {
            dora_per_forward: dora,
            ..Self::count(m, lora.as_deref())
        }
    }

    /// For inference: the base model's parameters (an adapter's LoRA factors, r x (in + out) per
    /// target, are left out: ~0.1 % at r 8).
    pub(crate) fn of_base(m: &MllamaModel) -> Self {
        Self::count(m, None)
    }

    /// `lora`: the LoRA parameters (name, elements) when training them over a frozen base.
    fn count(m: &MllamaModel, lora_params: Option<&[(String, i64)]>) -> Self {
        let lora = lora_params.is_some();
        let (mut text, mut vision) = (0.0, 0.0);
        let (mut fwd_text, mut fwd_vision) = (0.0, 0.0);
        let (mut fwd_head, mut fwd_cross) = (0.0, 0.0);
        let cross_layers = m.config.text.cross_attention_layers.clone();
        let mut add = |name: &str, numel: f64, trains: bool| {
            if name.contains("embed_tokens") {
                return; // a lookup
            }
            let f = numel * if trains { 6.0 } else { 4.0 };
            if sees_vision_tokens(name) {
                vision += f;
                fwd_vision += 2.0 * numel;
            } else {
                text += f;
                fwd_text += 2.0 * numel;
                if name.starts_with("lm_head") {
                    fwd_head += 2.0 * numel;
                } else if text_layer(name).is_some_and(|k| cross_layers.contains(&k)) {
                    fwd_cross += 2.0 * numel;
                }
            }
        };
        // (LoRA: only the parameters of modules to save, beside the factors)
        let trains = |n: &str| match lora {
            true => m.saved_params.iter().any(|s| s == n),
            false => m.full_finetune_trains(n),
        };
        m.visit_params(&mut |n, t| add(n, t.numel() as f64, trains(n)));
        let c = &m.config.text;
        if m.lm_head_tied {
            // lm_head is the embedding (not visited twice) but is a matmul
            add(
                "lm_head.weight",
                (c.vocab_size * c.hidden_size) as f64,
                trains("lm_head.weight"),
            );
        }
        for (n, numel) in lora_params.unwrap_or_default() {
            if !m.saved_params.contains(n) {
                add(n, *numel as f64, true);
            }
        }
        let (t, v) = (&m.config.text, &m.config.vision);
        let text_hd = (t.num_attention_heads * t.head_dim()) as f64;
        let n_cross = t.cross_attention_layers.len() as f64;
        let n_self = t.num_hidden_layers as f64 - n_cross;
        let n_vision = (v.num_hidden_layers + v.num_global_layers) as f64;
        Self {
            per_text_token: text,
            per_vision_token: vision,
            forward_per_text_token: fwd_text,
            forward_per_vision_token: fwd_vision,
            forward_lm_head: fwd_head,
            forward_cross_layers: fwd_cross,
            patches_per_tile: m.config.vision.num_patches() as f64,
            self_attn_per_pair: 12.0 * n_self * text_hd,
            cross_attn_per_pair: 12.0 * n_cross * text_hd,
            vision_attn_per_pair: 12.0 * n_vision * v.hidden_size as f64,
            dora_per_forward: 0.0,
        }
    }

    /// Attention FLOPs (forward + backward) of one micro-batch ([`FlopCount`]'s doc).
    fn attention_flops(&self, mb: &MicroBatch) -> f64 {
        let s = mb.batch.input_ids.size();
        let (b, seq) = (s[0] as f64, s[1] as f64);
        let mut f = self.self_attn_per_pair * b * seq * seq;
        for sample in seen_tiles(mb) {
            let n_sample: f64 = sample
                .iter()
                .map(|&t| t as f64 * self.patches_per_tile)
                .sum();
            f += self.cross_attn_per_pair * seq * n_sample;
            for &t in &sample {
                let n = t as f64 * self.patches_per_tile;
                f += self.vision_attn_per_pair * n * n;
            }
        }
        f
    }

    /// Forward FLOPs of one generation turn: T = `prompt` + `new` positions, each through the
    /// text weights once (prefill, then one decode step per token from the cache; the LM head
    /// only for the `new` positions' logits; the cross-attention layers only with an image), each
    /// attending to the positions up to itself (T (T + 1) / 2 pairs) and to the image's `tiles`
    /// x patches vision tokens, which run through the vision tower once.
    pub(crate) fn inference_flops(&self, prompt: usize, new: usize, tiles: usize) -> f64 {
        let t = (prompt + new) as f64;
        let v = tiles as f64 * self.patches_per_tile;
        let skipped = match tiles {
            0 => self.forward_cross_layers,
            _ => 0.0,
        };
        let per_text_token = self.forward_per_text_token - self.forward_lm_head - skipped;
        // (the forward's share of attention: 4 of its 12 FLOPs per pair)
        per_text_token * t
            + self.forward_lm_head * new as f64
            + self.forward_per_vision_token * v
            + (self.self_attn_per_pair * t * (t + 1.0) / 2.0
                + self.cross_attn_per_pair * t * v
                + self.vision_attn_per_pair * v * v)
                / 3.0
    }

    /// (model FLOPs, executed FLOPs) of forward + backward over `batches` (one rank's
    /// micro-batches); executed adds the forward recompute when `recompute` (activation
    /// checkpointing) is on.
    pub(crate) fn step_flops(&self, batches: &[MicroBatch], recompute: bool) -> (f64, f64) {
        let (mut model, mut executed) = (0.0, 0.0);
        for mb in batches {
            let text_tokens = mb.batch.input_ids.numel() as f64;
            let tiles: i64 = seen_tiles(mb).iter().flatten().sum();
            let vision_tokens = tiles as f64 * self.patches_per_tile;
            let attention = self.attention_flops(mb);
            let m = self.per_text_token * text_tokens
                + self.per_vision_token * vision_tokens
                + attention
                + self.dora_per_forward;
            model += m;
            executed += m;
            if recompute {
                // (the forward's share of attention: 4 of its 12)
                executed += self.forward_per_text_token * text_tokens
                    + self.forward_per_vision_token * vision_tokens
                    + attention / 3.0
                    + self.dora_per_forward;
            }
        }
        (model, executed)
    }
}

/// Real tiles of each image of each sample of `mb` (per sample, per image slot): an image slot
/// no text row sees (a text-only sample's padding slot, whose tile 0 is marked) has none.
fn seen_tiles(mb: &MicroBatch) -> Vec<Vec<i64>> {
    let Some(images) = &mb.batch.images else {
        return vec![];
    };
    let seen = images
        .cross_attention_mask
        .ne(0)
        .sum_dim_intlist([1i64, 3].as_slice(), false, Kind::Int64)
        .gt(0); // (B, M) from (B, S, M, T)
    let tiles = images
        .aspect_ratio_mask
        .sum_dim_intlist([-1i64].as_slice(), false, Kind::Int64)
        * seen; // (B, M)
    let per_image = images.aspect_ratio_mask.size()[1].max(1) as usize;
    let flat: Vec<i64> = Vec::<i64>::try_from(tiles.reshape([-1])).unwrap_or_default();
    flat.chunks(per_image).map(<[i64]>::to_vec).collect()
}

/// Peak dense TFLOP/s of a known GPU in the compute dtype (bf16/fp16 on tensor cores; fp32
/// without TF32, which libtorch leaves off for matmuls). None: a CPU or a GPU not in the table
/// (set `train.peak_tflops`).
pub(crate) fn device_peak_tflops(device: Device, compute: Kind) -> Option<(f64, String)> {
    let Device::Cuda(ordinal) = device else {
        return None;
    };
    kernels::cuda_libs::ensure_driver().ok()?;
    let name = cudarc::driver::CudaContext::new(ordinal)
        .ok()?
        .name()
        .ok()?;
    let half = matches!(compute, Kind::BFloat16 | Kind::Half);
    Some((peak_for_name(&name, half)?, name))
}

/// Dense bf16/fp16 (`half`) or fp32 peak TFLOP/s of a GPU by its name.
fn peak_for_name(name: &str, half: bool) -> Option<f64> {
    // (name contains, dense bf16/fp16, fp32), most specific first: "H200 NVL" before "H200",
    // "L40S" before "L40" before "L4"
    const TABLE: &[(&str, f64, f64)] = &[
        ("GH200", 989.4, 66.9),
        ("H200 NVL", 835.0, 60.0),
        ("H200", 989.4, 66.9),
        ("H100 PCIe", 756.0, 51.2),
        ("H100 NVL", 835.0, 60.0),
        ("H100", 989.4, 66.9),
        ("A100", 312.0, 19.5),
        ("L40S", 362.1, 91.6),
        ("L40", 181.0, 90.5),
        ("L4", 121.0, 30.3),
    ];
    let (_, bf16, fp32) = TABLE.iter().find(|(k, _, _)| name.contains(k))?;
    Some(if half { *bf16 } else { *fp32 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_peaks_match_the_most_specific_name() {
        let peak = |name: &str| peak_for_name(name, true);
        assert_eq!(peak("NVIDIA H200"), Some(989.4));
        assert_eq!(peak("NVIDIA H200 NVL"), Some(835.0));
        assert_eq!(peak("NVIDIA H100 80GB HBM3"), Some(989.4));
        assert_eq!(peak("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(peak("NVIDIA L40S"), Some(362.1));
        assert_eq!(peak("NVIDIA L40"), Some(181.0));
        assert_eq!(peak("NVIDIA L4"), Some(121.0));
        assert_eq!(peak_for_name("NVIDIA A100-SXM4-80GB", false), Some(19.5));
        assert_eq!(peak("Tesla V100-SXM2-16GB"), None);
    }

    #[test]
    fn vision_side_parameters() {
        assert!(sees_vision_tokens(
            "model.vision_model.transformer.layers.0.self_attn.q_proj.weight"
        ));
        assert!(sees_vision_tokens(
            "model.language_model.layers.3.cross_attn.v_proj.lora_A.weight"
        ));
        assert!(!sees_vision_tokens(
            "model.language_model.layers.3.cross_attn.q_proj.weight"
        ));
        assert!(!sees_vision_tokens("lm_head.weight"));
    }

    /// Full finetuning counts 6 FLOPs per parameter and token, LoRA 4 per frozen base
    /// parameter and 6 per LoRA parameter (the embedding table is a lookup: 0).
    #[test]
    fn full_is_6n_and_lora_is_4n_base_plus_6n_lora() {
        use crate::model::{LoadOptions, LoraConfig, TargetModules};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mllama_tiny/model_hf5");
        let mut m = MllamaModel::load(&dir, LoadOptions::default()).unwrap();
        let (mut n, mut embed) = (0.0, 0.0);
        m.visit_params(&mut |name, t| {
            if name.contains("embed_tokens") {
                embed += t.numel() as f64
            } else {
                n += t.numel() as f64
            }
        });
        assert!(embed > 0.0);
        let full = FlopCount::of(&mut m);
        assert_eq!(full.per_text_token + full.per_vision_token, 6.0 * n);
        assert_eq!(
            full.forward_per_text_token + full.forward_per_vision_token,
            2.0 * n
        );
        assert!(full.per_vision_token > 0.0 && full.per_text_token > 0.0);
        // freeze_llm_only: the language model outside its cross-attention layers is frozen (4
        // FLOPs per parameter and token, not 6); the vision side trains as before
        let mut frozen_text = 0.0;
        m.freeze_llm = true;
        m.visit_params(&mut |name, t| {
            if !name.contains("embed_tokens") && !m.full_finetune_trains(name) {
                frozen_text += t.numel() as f64
            }
        });
        assert!(frozen_text > 0.0);
        let freeze = FlopCount::of(&mut m);
        assert_eq!(freeze.per_vision_token, full.per_vision_token);
        assert_eq!(
            freeze.per_text_token,
            full.per_text_token - 2.0 * frozen_text
        );
        m.freeze_llm = false;
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        };
        m.apply_lora(&cfg, 1).unwrap();
        let n_lora: f64 = m
            .trainable_parameters()
            .iter()
            .map(|(_, t)| t.numel() as f64)
            .sum();
        let lora = FlopCount::of(&mut m);
        assert_eq!(
            lora.per_text_token + lora.per_vision_token,
            4.0 * n + 6.0 * n_lora
        );
        assert_eq!(lora.dora_per_forward, 0.0);
    }

    /// DoRA adds, per forward, W + s B A and the row norms of every wrapped weight: (2 r + 3)
    /// FLOPs per weight element, whatever the tokens; none once the norms are fixed (inference).
    #[test]
    fn dora_adds_its_per_forward_weight_work() {
        use crate::model::adapter_config::AdapterConfig;
        use crate::model::{LoadOptions, LoraConfig, TargetModules};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mllama_tiny/model_hf5");
        let mut m = MllamaModel::load(&dir, LoadOptions::default()).unwrap();
        let mut cfg = AdapterConfig::plain(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        });
        cfg.use_dora = true;
        m.apply_adapter(&cfg, 1, None).unwrap();
        let mut elements = 0.0;
        m.visit_linears(&mut |l| {
            if l.lora.is_some() {
                elements += (l.weight.size()[0] * l.weight.size()[1]) as f64;
            }
        });
        assert!(elements > 0.0);
        let f = FlopCount::of(&mut m);
        assert_eq!(f.dora_per_forward, elements * (2.0 * 4.0 + 3.0));
        m.fix_dora();
        assert_eq!(FlopCount::of(&mut m).dora_per_forward, 0.0);
    }

    /// Attention adds 12 x H x D FLOPs per (query, key) pair and layer: text self-attention over
    /// S x S, cross-attention over S x the sample's vision tokens, vision layers over each image's
    /// vision tokens squared (real tiles only).
    #[test]
    fn attention_is_counted_per_query_key_pair() {
        use crate::data::sampler::Position;
        use crate::model::{Batch, Images};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mllama_tiny/model_hf5");
        let mut m = MllamaModel::load(&dir, crate::model::LoadOptions::default()).unwrap();
        let f = FlopCount::of(&mut m);
        let (t, v) = (&m.config.text, &m.config.vision);
        let hd = (t.num_attention_heads * t.head_dim()) as f64;
        let cross = t.cross_attention_layers.len() as f64;
        let p1 = v.num_patches() as f64;
        let ids = tch::Tensor::zeros([2, 5], (Kind::Int64, Device::Cpu));
        // sample 0: 2 real tiles, sample 1: 1 (of 4)
        let mask = tch::Tensor::from_slice(&[1i64, 1, 0, 0, 1, 0, 0, 0]).view([2, 1, 4]);
        let mb = |images: Option<Images>| MicroBatch {
            position: Position { epoch: 0, batch: 0 },
            micro_step: 0,
            batch: Batch {
                input_ids: ids.shallow_clone(),
                attention_mask: None,
                labels: None,
                images,
            },
            supervised_tokens: 0,
            sample_indices: vec![],
            filler_rows: 0,
            replaced: 0,
        };
        let self_attn = 12.0 * (t.num_hidden_layers as f64 - cross) * hd * 2.0 * 25.0;
        assert_eq!(f.attention_flops(&mb(None)), self_attn);
        // (B, S, M, T): every text row of both samples sees its image
        let cam = tch::Tensor::ones([2, 5, 1, 4], (Kind::Int64, Device::Cpu));
        let images = |cam: tch::Tensor| Images {
            pixel_values: tch::Tensor::zeros([1], (Kind::Float, Device::Cpu)),
            aspect_ratio_ids: tch::Tensor::zeros([2, 1], (Kind::Int64, Device::Cpu)),
            aspect_ratio_mask: mask.shallow_clone(),
            cross_attention_mask: cam,
        };
        let vision_layers = (v.num_hidden_layers + v.num_global_layers) as f64;
        let want = self_attn
            + 12.0 * cross * hd * 5.0 * (3.0 * p1)
            + 12.0 * vision_layers * v.hidden_size as f64 * ((2.0 * p1).powi(2) + p1.powi(2));
        let got = f.attention_flops(&mb(Some(images(cam.shallow_clone()))));
        assert!((got - want).abs() <= 1e-9 * want);
        // sample 1 text-only (its image slot unseen): only sample 0's image counts
        let _ = cam.get(1).fill_(0);
        let want = self_attn
            + 12.0 * cross * hd * 5.0 * (2.0 * p1)
            + 12.0 * vision_layers * v.hidden_size as f64 * (2.0 * p1).powi(2);
        let got = f.attention_flops(&mb(Some(images(cam))));
        assert!((got - want).abs() <= 1e-9 * want);
    }

    /// One generation turn (inference) of 7 prompt and 3 new tokens: 2 FLOPs per weight and
    /// token on the text side (the LM head only for the 3 new positions; the cross-attention
    /// layers only with an image), per vision token on the vision side (the embedding a lookup,
    /// LoRA factors left out), and the forward's 4 x H x D per (query, key) pair: causal
    /// self-attention over the cache (10 x 11 / 2 pairs), cross-attention to every vision token,
    /// vision layers over the image's.
    #[test]
    fn a_generation_turn_counts_weights_cache_attention_and_the_vision_tower() {
        use crate::model::{LoraConfig, TargetModules};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/mllama_tiny/model_hf5");
        let mut m = MllamaModel::load(&dir, crate::model::LoadOptions::default()).unwrap();
        let (t, v) = (&m.config.text, &m.config.vision);
        let cross_prefixes: Vec<String> = (t.cross_attention_layers.iter())
            .map(|k| format!("model.language_model.layers.{k}."))
            .collect();
        let (mut text_n, mut vision_n, mut cross_n) = (0.0, 0.0, 0.0);
        m.visit_params(&mut |name, p| {
            let n = p.numel() as f64;
            match () {
                _ if name.contains("embed_tokens") => {}
                _ if sees_vision_tokens(name) => vision_n += n,
                _ if cross_prefixes.iter().any(|c| name.starts_with(c)) => cross_n += n,
                _ => text_n += n,
            }
        });
        let head_n = (t.vocab_size * t.hidden_size) as f64;
        if !m.lm_head_tied {
            text_n -= head_n; // visited as lm_head.weight
        }
        let hd = (t.num_attention_heads * t.head_dim()) as f64;
        let cross = t.cross_attention_layers.len() as f64;
        let self_layers = t.num_hidden_layers as f64 - cross;
        let vision_layers = (v.num_hidden_layers + v.num_global_layers) as f64;
        let vt = 3.0 * v.num_patches() as f64; // 3 tiles
        let text_only = 2.0 * text_n * 10.0 + 2.0 * head_n * 3.0 + 4.0 * self_layers * hd * 55.0;
        let want = text_only
            + 2.0 * cross_n * 10.0
            + 2.0 * vision_n * vt
            + 4.0 * cross * hd * 10.0 * vt
            + 4.0 * vision_layers * v.hidden_size as f64 * vt * vt;
        assert!(cross_n > 0.0 && head_n > 0.0);
        let f = FlopCount::of_base(&m);
        let got = f.inference_flops(7, 3, 3);
        assert!((got - want).abs() <= 1e-9 * want, "{got} vs {want}");
        let got = f.inference_flops(7, 3, 0);
        assert!(
            (got - text_only).abs() <= 1e-9 * text_only,
            "{got} vs {text_only}"
        );
        // an adapter does not change the count
        let lora = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into()]),
            use_rslora: false,
        };
        let before = f.inference_flops(7, 3, 3);
        m.apply_lora(&lora, 1).unwrap();
        assert_eq!(FlopCount::of_base(&m).inference_flops(7, 3, 3), before);
    }

    #[test]
    fn no_peak_on_cpu() {
        assert!(device_peak_tflops(Device::Cpu, Kind::BFloat16).is_none());
    }
}
