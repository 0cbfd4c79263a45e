//! The demo's model folder: a byte-level BPE tokenizer trained on the demo corpus (Llama 3 special
//! tokens after the BPE vocabulary, `<|image|>` last, a post-processor that prepends
//! `<|begin_of_text|>`), `tokenizer_config.json` with the Llama 3.2 Vision chat template,
//! `preprocessor_config.json` with the demo's tile size, and a tiny random Mllama
//! (`config.json` + `model.safetensors`), i.e. the shape of a released Llama 3.2 Vision folder.
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::model::{KeyLayout, LoadOptions, MllamaConfig, MllamaModel};

/// The Llama 3.2 Vision chat template (the one in the released tokenizer_config.json).
pub const CHAT_TEMPLATE: &str =
    include_str!("../../../tests/fixtures/data/llama32_vision_chat_template.jinja");

/// Llama 3's pre-tokenizer split (as in the released tokenizer.json).
const SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens in Llama 3's order; reserved ones fill up to 256, then `<|image|>`.
fn special_tokens() -> Vec<String> {
    let mut v: Vec<String> = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let first = v.len();
    for i in 2..2 + 256 - first {
        v.push(format!("<|reserved_special_token_{i}|>"));
    }
    v.push("<|image|>".into());
    v
}

/// Sizes of the tiny model.
#[derive(Debug, Clone, Copy)]
pub struct ModelSizes {
    /// Image tile side (pixels, a multiple of the 14-pixel patch).
    pub tile: u32,
    /// BPE vocabulary before the 257 special tokens.
    pub bpe_vocab: usize,
}

/// Trains the tokenizer on `corpus` and returns it (with specials and post-processor) and the
/// text vocabulary size (= the id of `<|image|>`).
pub fn train_tokenizer(corpus: &[String], bpe_vocab: usize) -> Result<(Tokenizer, usize)> {
    let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_REGEX}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]
    }))
    .context("building the pre-tokenizer")?;
    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(pre));
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(bpe_vocab)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build()
        .into();
    tok.train(&mut trainer, corpus.iter())
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    let n = tok.get_vocab_size(false);
    let specials = special_tokens();
    let added: Vec<AddedToken> = specials
        .iter()
        .map(|s| AddedToken::from(s.clone(), true).normalized(false))
        .collect();
    tok.add_special_tokens(&added);
    let bos_id = tok.token_to_id("<|begin_of_text|>").context("bos id")? as usize;
    let image_id = tok.token_to_id("<|image|>").context("image id")? as usize;
    anyhow::ensure!(
        bos_id == n && image_id == n + 256,
        "special token layout: bos {bos_id}, image {image_id}, BPE vocab {n}"
    );
    // decoder and post-processor as in the released tokenizer.json: patch the JSON and reload
    let mut v: Value = serde_json::from_str(
        &tok.to_string(false)
            .map_err(|e| anyhow::anyhow!("serializing the tokenizer: {e}"))?,
    )?;
    v["decoder"] = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    v["post_processor"] = json!({
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos_id], "tokens": ["<|begin_of_text|>"]}}}
        ]
    });
    let tok: Tokenizer = v
        .to_string()
        .parse()
        .map_err(|e| anyhow::anyhow!("reloading the tokenizer: {e}"))?;
    Ok((tok, image_id))
}

/// Vision tower width and heads: the capacity goes where the task is hard (seeing shapes, colors
/// and positions); the vision tower runs on 65 tokens per image, the text model on ~150.
const VISION_WIDTH: usize = 192;
const VISION_HEADS: usize = 6;

/// config.json of the tiny Mllama (transformers-5 form) for a text vocabulary of `vocab` tokens.
pub fn config_json(vocab: usize, tile: u32) -> Value {
    json!({
        "architectures": ["MllamaForConditionalGeneration"],
        "dtype": "float32",
        "image_token_index": vocab,
        "model_type": "mllama",
        "text_config": {
            // the Llama 3 specials follow the BPE vocabulary (vocab - 256 = <|begin_of_text|>)
            "bos_token_id": vocab - 256,
            "cross_attention_layers": [1, 3],
            "dropout": 0.0,
            "eos_token_id": vocab - 256 + 9,
            "hidden_act": "silu",
            "hidden_size": 192,
            "initializer_range": 0.02,
            "intermediate_size": 512,
            "max_position_embeddings": 1024,
            "model_type": "mllama_text_model",
            "num_attention_heads": 6,
            "num_hidden_layers": 5,
            "num_key_value_heads": 2,
            "pad_token_id": vocab - 256 + 4,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {
                "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 1024, "rope_theta": 500000.0, "rope_type": "llama3"
            },
            "tie_word_embeddings": false,
            "use_cache": true,
            "vocab_size": vocab
        },
        "transformers_version": "5.24.0",
        "vision_config": {
            "attention_heads": VISION_HEADS,
            "hidden_act": "gelu",
            "hidden_size": VISION_WIDTH,
            "image_size": tile,
            "initializer_range": 0.02,
            "intermediate_layers_indices": [2, 5],
            "intermediate_size": 512,
            // one tile per image: the scenes are tile-sized squares, so more tiles would only be
            // zero padding that the vision tower still runs through (4x the work for nothing)
            "max_num_tiles": 1,
            "model_type": "mllama_vision_model",
            "norm_eps": 1e-05,
            "num_channels": 3,
            "num_global_layers": 2,
            "num_hidden_layers": 6,
            "patch_size": 14,
            "supported_aspect_ratios": [[1, 1]],
            "vision_output_dim": VISION_WIDTH * 3
        }
    })
}

const PATCH: i64 = 14;

/// 2D sine-cosine table for a `grid` x `grid` patch grid: (grid * grid, dim), row-major patches;
/// the first half of the features encodes the column (x), the second half the row (y), each as
/// sin/cos pairs at `dim / 4` frequencies from 1 down to 1/100 rad per patch (the slowest ones
/// are nearly linear in the position, which is what "left of" needs).
pub fn sincos_2d(grid: i64, dim: i64) -> Vec<f32> {
    let quarter = dim / 4;
    let mut v = vec![0f32; (grid * grid * dim) as usize];
    for row in 0..grid {
        for col in 0..grid {
            let base = ((row * grid + col) * dim) as usize;
            for (half, pos) in [(0, col), (1, row)] {
                for k in 0..quarter {
                    let omega = 100f64.powf(-(k as f64) / quarter as f64);
                    let a = pos as f64 * omega;
                    let i = base + (half * 2 * quarter + 2 * k) as usize;
                    v[i] = a.sin() as f32;
                    v[i + 1] = a.cos() as f32;
                }
            }
        }
    }
    v
}

/// Replaces the random (std 0.02) patch position embedding by a 2D sine-cosine table. At 0.02 the
/// positions are ~2% of a patch embedding's size, so identical background patches stay nearly
/// identical after `layernorm_pre` and the tower needs many steps to discover where a shape is;
/// at unit scale positions are as visible as colors from the first step (the class token's row
/// stays random). Real ViT trainings get away with a small init because they train for days.
fn init_positions(model: &MllamaModel, grid: i64) {
    model.visit_params(&mut |name, t| {
        if name.ends_with("gated_positional_embedding.embedding") {
            let (p1, dim) = (t.size()[0], t.size()[1]);
            if p1 != grid * grid + 1 {
                return;
            }
            let table = tch::Tensor::from_slice(&sincos_2d(grid, dim))
                .reshape([grid * grid, dim])
                .to_kind(t.kind());
            let mut rows = t.narrow(0, 1, grid * grid);
            tch::no_grad(|| rows.copy_(&table));
        }
    });
}

/// Writes the whole model folder into `dir` (created). Returns the parameter count.
pub fn write_model_folder(
    dir: &Path,
    corpus: &[String],
    sizes: ModelSizes,
    seed: i64,
) -> Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (tok, vocab) = train_tokenizer(corpus, sizes.bpe_vocab)?;
    tok.save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    let tc = json!({
        "backend": "tokenizers",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "model_max_length": 131072,
        "pad_token": "<|finetune_right_pad_id|>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "image_token": "<|image|>",
        "chat_template": CHAT_TEMPLATE,
        "padding_side": "right"
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    let pp = json!({
        "do_convert_rgb": true,
        "do_normalize": true,
        "do_pad": true,
        "do_rescale": true,
        "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "MllamaImageProcessor",
        "max_image_tiles": 1,
        "processor_class": "MllamaProcessor",
        "resample": 2,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": sizes.tile, "width": sizes.tile}
    });
    std::fs::write(
        dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pp)?,
    )?;
    let text = serde_json::to_string_pretty(&config_json(vocab, sizes.tile))?;
    std::fs::write(dir.join("config.json"), &text)?;
    let config = MllamaConfig::from_json_str(&text).context("the demo config.json")?;
    // (random holds libtorch's global generator for the whole seeded initialization)
    let model = MllamaModel::random(config, LoadOptions::default(), seed)
        .context("initializing the demo model")?;
    init_positions(&model, sizes.tile as i64 / PATCH);
    let mut params = 0usize;
    model.visit_params(&mut |_, t| params += t.numel());
    model
        .save_safetensors(&dir.join("model.safetensors"), KeyLayout::ModulePaths)
        .context("writing model.safetensors")?;
    Ok(params)
}
