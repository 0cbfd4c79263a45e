//! `trainer bench decode`: greedy decoding speed of `trainer infer`'s engine
//! (`infer::Session::generate_batch`, KV cache, batch 1) on random-weight Mllama models written to
//! a temp folder, next to transformers' `generate` (scripts/bench_decode.py, from .venv) on the
//! same folder and the same inputs, in the same run.
//!
//! Models: `tiny` (the fixture model's config, tests/fixtures/mllama_tiny) and `100m` (a ~100M
//! parameter Llama-3.2-Vision shape: 12 text layers of width 768, 2 of them cross-attention, a
//! small vision tower at 224-px tiles). Prompt: BOS, the image token, random text; one 4-tile
//! image of random pixels. Both sides, fp32 on the CPU:
//! - time to first token (TTFT) = the median time of a 1-token generation (vision tower, prefill,
//!   first pick);
//! - decode rate = (N - 1) / (median time of an N-token generation - TTFT), tokens/s.
//!
//! Each of `reps` rounds times one repetition of ours and then one of the peer (a fresh process
//! that warms up first), so a busy machine's load drifts over both alike; the figures are medians
//! over rounds and the ratio is the median of the per-round ratios.
//!
//! The peer gets the exact tensors our engine feeds the model (inputs.safetensors) and returns its
//! generated ids, so the table also says whether both produced the same tokens.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tch::{Kind, Tensor};

use crate::data::image::{process, ImageProcessorConfig, RgbImage};
use crate::data::tokenize::TextProcessor;
use crate::infer::{sampling::Sampler, Prompt, Session};
use crate::model::{KeyLayout, LoadOptions, MllamaConfig, MllamaModel};

/// The fixture model's config (transformers 5 form) that both bench models start from.
const TINY_CONFIG: &str = include_str!("../../../tests/fixtures/mllama_tiny/model_hf5/config.json");
/// The data fixtures' tokenizer, so the bench folders are complete model folders (our engine
/// detokenizes as it generates; ids past its vocabulary decode to nothing).
const TOKENIZER: &str = include_str!("../../../tests/fixtures/data/tok/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../../tests/fixtures/data/tok/tokenizer_config.json");
const PREPROCESSOR: &str =
    include_str!("../../../tests/fixtures/data/tok/preprocessor_config.json");

pub struct DecodeOptions {
    /// `tiny` and/or `100m`.
    pub models: Vec<String>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub reps: usize,
    /// Where the model folders and inputs are written (removed afterwards).
    pub dir: PathBuf,
    /// Python with torch + transformers for the peer, and its script; None = no peer.
    pub peer: Option<(PathBuf, PathBuf)>,
    /// CPU threads of both sides (libtorch's intra-op pool); 0 = libtorch's default.
    pub threads: usize,
}

/// One side's figures.
#[derive(Debug, Clone)]
pub struct Speed {
    pub ttft_s: f64,
    pub decode_tok_s: f64,
    pub ids: Vec<i64>,
    pub threads: i64,
}

pub struct Measurement {
    pub model: String,
    pub parameters: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub reps: usize,
    pub ours: Speed,
    pub peer: Option<Speed>,
    /// Median over rounds of our decode rate / the peer's in the same round.
    pub ratio: Option<f64>,
}

impl Measurement {
    pub fn json(&self) -> Value {
        json!({
            "bench": "decode", "name": format!("decode/{}", self.model), "model": self.model,
            "parameters": self.parameters, "prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
            "reps": self.reps, "threads": self.ours.threads,
            "ttft_s": self.ours.ttft_s, "decode_tok_s": self.ours.decode_tok_s, "unit": "tokens/s",
            "peer": self.peer.as_ref().map(|p| json!({"name": "transformers generate", "ttft_s": p.ttft_s,
                "decode_tok_s": p.decode_tok_s, "threads": p.threads})),
            "ratio": self.ratio,
            "same_tokens": self.peer.as_ref().map(|p| p.ids == self.ours.ids),
        })
    }
}

impl Speed {
    /// Medians over rounds (the ids of the last round).
    fn median_of(rounds: Vec<Speed>) -> Speed {
        Speed {
            ttft_s: median(rounds.iter().map(|r| r.ttft_s).collect()),
            decode_tok_s: median(rounds.iter().map(|r| r.decode_tok_s).collect()),
            threads: rounds.last().map_or(0, |r| r.threads),
            ids: rounds.into_iter().last().map(|r| r.ids).unwrap_or_default(),
        }
    }
}

/// The median of the finite values (a round too short to time is NaN and left out); NaN when
/// none is.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The config.json of a bench model.
pub fn model_config(name: &str) -> Result<Value> {
    let mut c: Value = serde_json::from_str(TINY_CONFIG).context("the embedded fixture config")?;
    match name {
        "tiny" => {}
        "100m" => {
            let t = &mut c["text_config"];
            t["vocab_size"] = 16000.into();
            t["hidden_size"] = 768.into();
            t["num_hidden_layers"] = 12.into();
            t["num_attention_heads"] = 12.into();
            t["num_key_value_heads"] = 4.into();
            t["intermediate_size"] = 2304.into();
            t["cross_attention_layers"] = json!([3, 8]);
            t["max_position_embeddings"] = 4096.into();
            let v = &mut c["vision_config"];
            v["hidden_size"] = 256.into();
            v["attention_heads"] = 4.into();
            v["intermediate_size"] = 1024.into();
            v["num_hidden_layers"] = 4.into();
            v["num_global_layers"] = 2.into();
            v["intermediate_layers_indices"] = json!([1, 3]);
            v["vision_output_dim"] = (256 * 3).into();
            v["image_size"] = 224.into();
        }
        other => bail!("--models: unknown model `{other}` (expected tiny or 100m)"),
    }
    // the image token sits past the LM head, as in the released checkpoints
    c["image_token_index"] = c["text_config"]["vocab_size"].clone();
    Ok(c)
}

/// Writes a random-weight model folder (config, safetensors, tokenizer, processor config).
fn write_model(dir: &Path, config: &Value, seed: i64) -> Result<MllamaModel> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let text = serde_json::to_string_pretty(config)?;
    let cfg = MllamaConfig::from_json_str(&text)?;
    let model = MllamaModel::random(cfg, LoadOptions::default(), seed)?;
    model.save_safetensors(&dir.join("model.safetensors"), KeyLayout::ModulePaths)?;
    for (name, body) in [
        ("config.json", text.as_str()),
        ("tokenizer.json", TOKENIZER),
        ("tokenizer_config.json", TOKENIZER_CONFIG),
        ("preprocessor_config.json", PREPROCESSOR),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(model)
}

/// One side's timings from the generation function `gen(max_new) -> ids`.
fn time_side(
    reps: usize,
    new_tokens: usize,
    gen: &mut dyn FnMut(usize) -> Result<Vec<i64>>,
) -> Result<Speed> {
    gen(new_tokens)?; // warm-up (allocator, thread pool)
    let mut first = vec![];
    let mut full = vec![];
    let mut ids = vec![];
    for _ in 0..reps {
        let t = Instant::now();
        gen(1)?;
        first.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        ids = gen(new_tokens)?;
        full.push(t.elapsed().as_secs_f64());
    }
    let (ttft, total) = (median(first), median(full));
    Ok(Speed {
        ttft_s: ttft,
        // the tokens it generated (an EOS before new_tokens stops ours; the peer is held to
        // new_tokens, and "same tokens" compares them); NaN (JSON null) where the decode was too
        // short to time apart from the first token (it read 3e9 tokens/s)
        decode_tok_s: match total - ttft {
            span if span > 0.0 => ids.len().saturating_sub(1) as f64 / span,
            _ => f64::NAN,
        },
        ids,
        threads: tch::get_num_threads() as i64,
    })
}

/// Runs the peer script on the folder and inputs; it prints one JSON object.
fn run_peer(
    python: &Path,
    script: &Path,
    model: &Path,
    inputs: &Path,
    o: &DecodeOptions,
) -> Result<Speed> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .args([
            "--new-tokens",
            &o.new_tokens.to_string(),
            "--reps",
            "1",
            "--threads",
            &o.threads.to_string(),
        ]);
    let v = super::peer_json(cmd, script)?;
    let f = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("peer JSON lacks {k}: {v}"))
    };
    Ok(Speed {
        ttft_s: f("ttft_s")?,
        // null where the peer's decode was too short to time apart from its first token
        decode_tok_s: match v.get("decode_tok_s") {
            Some(Value::Null) => f64::NAN,
            _ => f("decode_tok_s")?,
        },
        ids: v["ids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default(),
        threads: v["threads"].as_i64().unwrap_or(0),
    })
}

/// Measures one model: ours, then the peer on the same folder and inputs.
pub fn measure(name: &str, o: &DecodeOptions) -> Result<Measurement> {
    if o.new_tokens < 2 || o.reps == 0 || o.prompt_tokens < 3 {
        bail!("--new-tokens must be at least 2, --reps at least 1, --prompt-tokens at least 3");
    }
    if o.threads > 0 {
        tch::set_num_threads(o.threads as i32);
    }
    let config = model_config(name)?;
    let dir = o.dir.join(name);
    let model = write_model(&dir, &config, 7)?;
    let mut text = TextProcessor::from_model_dir(&dir, false).map_err(anyhow::Error::msg)?;
    text.ids.image = model.config.image_token_index;
    let mut image_config =
        ImageProcessorConfig::from_model_dir(&dir).map_err(anyhow::Error::msg)?;
    image_config.tile = model.config.vision.image_size as usize;
    image_config.max_image_tiles = model.config.vision.max_num_tiles as usize;
    let session = Session {
        model: &model,
        text: &text,
        image_config: &image_config,
    };
    // the prompt: BOS, the image token, random text; a 4-tile image of random pixels
    tch::manual_seed(3);
    let vocab = model.config.text.vocab_size;
    let mut ids = vec![
        model.config.text.bos_token_id.unwrap_or(1),
        model.config.image_token_index,
    ];
    ids.extend(Vec::<i64>::try_from(Tensor::randint_low(
        3,
        vocab,
        [o.prompt_tokens as i64 - 2],
        (Kind::Int64, tch::Device::Cpu),
    ))?);
    let tile = image_config.tile;
    // a random 2x2-tile image (every tile real), processed as a loaded one would be
    let side = 2 * tile;
    let noise = Vec::<i64>::try_from(Tensor::randint(
        256,
        [(side * side * 3) as i64],
        (Kind::Int64, tch::Device::Cpu),
    ))?;
    let rgb = RgbImage {
        width: side,
        height: side,
        data: noise.into_iter().map(|v| v as u8).collect(),
    };
    let image = process(&image_config, &rgb);
    // the exact tensors our engine feeds the model, for the peer
    let images = session.images(&ids, &image, tch::Device::Cpu);
    let inputs = dir.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[
            ("input_ids", &Tensor::from_slice(&ids).view([1, -1])),
            ("pixel_values", &images.pixel_values),
            ("aspect_ratio_ids", &images.aspect_ratio_ids),
            ("aspect_ratio_mask", &images.aspect_ratio_mask),
            ("cross_attention_mask", &images.cross_attention_mask),
        ],
        &inputs,
    )?;
    let mut gen = |max_new: usize| -> Result<Vec<i64>> {
        let prompt = Prompt {
            ids: ids.clone(),
            image: Some(&image),
        };
        let mut sampler = [Sampler::new(0.0, 1.0, 0)];
        let out = tch::no_grad(|| {
            session.generate_batch(&[prompt], &[], &mut sampler, max_new, &mut |_, _| {})
        })?;
        Ok(out
            .into_iter()
            .next()
            .map(|g| g.token_ids)
            .unwrap_or_default())
    };
    // rounds alternate ours and the peer (one timed repetition each), so both see the same load on
    // a shared machine; figures are medians over rounds, the ratio the median of per-round ratios
    let mut ours_rounds = vec![];
    let mut peer_rounds = vec![];
    for _ in 0..o.reps {
        ours_rounds.push(time_side(1, o.new_tokens, &mut gen)?);
        if let Some((python, script)) = &o.peer {
            peer_rounds.push(run_peer(python, script, &dir, &inputs, o)?);
        }
    }
    let ratio = (!peer_rounds.is_empty()).then(|| {
        median(
            ours_rounds
                .iter()
                .zip(&peer_rounds)
                .map(|(a, b)| a.decode_tok_s / b.decode_tok_s)
                .collect(),
        )
    });
    let ours = Speed::median_of(ours_rounds);
    let peer = (!peer_rounds.is_empty()).then(|| Speed::median_of(peer_rounds));
    let parameters = model
        .parameter_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() as usize)
        .sum();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Measurement {
        model: name.to_string(),
        parameters,
        prompt_tokens: ids.len(),
        new_tokens: o.new_tokens,
        reps: o.reps,
        ours,
        peer,
        ratio,
    })
}

/// The table `trainer bench decode` prints without --json.
pub fn table(ms: &[Measurement]) -> String {
    let mut s = format!(
        "{:<6} {:>7} {:>7} {:>5} {:>10} {:>10} {:>11} {:>11} {:>7} {:>6}\n",
        "model",
        "params",
        "prompt",
        "new",
        "TTFT ms",
        "peer TTFT",
        "decode t/s",
        "peer t/s",
        "ratio",
        "same"
    );
    for m in ms {
        let p = m.peer.as_ref();
        let opt = |v: Option<f64>, scale: f64, prec: usize| {
            v.map_or("-".into(), |v| format!("{:.prec$}", v * scale))
        };
        s += &format!(
            "{:<6} {:>6.1}M {:>7} {:>5} {:>10.1} {:>10} {:>11.1} {:>11} {:>7} {:>6}\n",
            m.model,
            m.parameters as f64 / 1e6,
            m.prompt_tokens,
            m.new_tokens,
            m.ours.ttft_s * 1e3,
            opt(p.map(|p| p.ttft_s), 1e3, 1),
            m.ours.decode_tok_s,
            opt(p.map(|p| p.decode_tok_s), 1.0, 1),
            opt(m.ratio, 1.0, 2),
            p.map_or("-".into(), |p| (p.ids == m.ours.ids).to_string()),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_100m_config_has_about_100m_parameters() {
        let c = model_config("100m").unwrap();
        let cfg = MllamaConfig::from_json_str(&c.to_string()).unwrap();
        let m = MllamaModel::random(
            cfg,
            LoadOptions {
                dtype: Kind::BFloat16,
                ..Default::default()
            },
            0,
        )
        .unwrap();
        let n: i64 = m
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        assert!((80_000_000..130_000_000).contains(&n), "{n}");
        assert!(model_config("huge").is_err());
    }

    /// A peer whose decode was too short to time says null, read as NaN (no made-up rate).
    #[test]
    fn a_peer_decode_too_short_to_time_reads_as_nan() {
        let dir = std::env::temp_dir().join(format!("decode-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("peer.sh");
        let line = r#"{"ttft_s": 0.5, "decode_tok_s": null, "ids": [1, 2], "threads": 2}"#;
        std::fs::write(&script, format!("echo '{line}'\n")).unwrap();
        let o = DecodeOptions {
            models: vec![],
            prompt_tokens: 4,
            new_tokens: 2,
            reps: 1,
            dir: dir.clone(),
            peer: None,
            threads: 1,
        };
        let sh = Path::new("/bin/sh");
        let s = run_peer(sh, &script, &dir, &dir, &o).unwrap();
        assert!(s.decode_tok_s.is_nan());
        assert_eq!((s.ttft_s, s.ids, s.threads), (0.5, vec![1, 2], 2));
        let line = line.replace("null", "12.5");
        std::fs::write(&script, format!("echo '{line}'\n")).unwrap();
        let s = run_peer(sh, &script, &dir, &dir, &o).unwrap();
        assert_eq!(s.decode_tok_s, 12.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
