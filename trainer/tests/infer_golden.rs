//! `trainer infer`'s generation engine (`Session::generate_batch`: KV cache, left-padded batches,
//! per-row cross-attention masks) against transformers' `generate`: 32 greedy tokens on the tiny
//! fixture model for three prompts of different lengths, without and with the PEFT adapter
//! (goldens from tests/fixtures/make_mllama_fixtures.py, golden_generate32.safetensors).
use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};
use trainer::data::image::{ImageProcessorConfig, Pixels, ProcessedImage};
use trainer::data::tokenize::TextProcessor;
use trainer::infer::{sampling::Sampler, Prompt, Session};
use trainer::model::{AttentionImpl, LoadOptions, MllamaModel};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ids(t: &Tensor) -> Vec<i64> {
    Vec::try_from(t.view([-1]).to_kind(Kind::Int64)).unwrap()
}

struct Case {
    ids: Vec<i64>,
    image: Option<ProcessedImage>,
    base: Vec<i64>,
    lora: Vec<i64>,
}

/// The golden prompts; images padded to the model's 4 tiles as the processor packs them.
fn cases() -> Vec<Case> {
    let p = repo().join("tests/fixtures/mllama_tiny/golden_generate32.safetensors");
    let g: HashMap<String, Tensor> = Tensor::read_safetensors(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .collect();
    ["a", "b", "c"]
        .iter()
        .map(|n| {
            let image = g.get(&format!("{n}.pixel_values")).map(|pv| {
                let used = pv.size()[0];
                let padded = Tensor::cat(
                    &[
                        pv,
                        &pv.zeros_like().narrow(0, 0, 1).repeat([4 - used, 1, 1, 1]),
                    ],
                    0,
                );
                ProcessedImage {
                    pixels: Pixels::Values(Vec::try_from(padded.view([-1])).unwrap()),
                    tile: pv.size()[2] as usize,
                    max_image_tiles: 4,
                    num_tiles: used as usize,
                    aspect_ratio: (1, used as usize),
                    aspect_ratio_id: ids(&g[&format!("{n}.aspect_ratio_ids")])[0],
                    aspect_ratio_mask: (0..4).map(|i| (i < used) as i64).collect(),
                }
            });
            Case {
                ids: ids(&g[&format!("{n}.input_ids")]),
                image,
                base: ids(&g[&format!("{n}.base")]),
                lora: ids(&g[&format!("{n}.lora")]),
            }
        })
        .collect()
}

fn check(adapter: bool) {
    let dir = repo().join("tests/fixtures/mllama_tiny");
    let cases = cases();
    for attention in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let opts = LoadOptions {
            attention,
            ..Default::default()
        };
        let mut model = MllamaModel::load(&dir.join("model_hf5"), opts).unwrap();
        if adapter {
            model.load_adapter(&dir.join("adapter_hf5")).unwrap();
        }
        // the data fixtures' tokenizer detokenizes; the tiny model's image token and tiles replace its own
        let mut text =
            TextProcessor::from_model_dir(&repo().join("tests/fixtures/data/tok"), false).unwrap();
        text.ids.image = model.config.image_token_index;
        let mut image_config =
            ImageProcessorConfig::from_model_dir(&repo().join("tests/fixtures/data/tok")).unwrap();
        (image_config.tile, image_config.max_image_tiles) = (28, 4);
        let session = Session {
            model: &model,
            text: &text,
            image_config: &image_config,
        };
        let eos = model.config.text.eos_token_ids.clone();
        // transformers' generate ends a row that stops early with its end token (32 tokens
        // otherwise); our token_ids leave the end token out
        let want = |c: &Case| {
            let ids = if adapter { &c.lora } else { &c.base };
            assert!(
                ids.len() == 32 || ids.last().is_some_and(|t| eos.contains(t)),
                "{ids:?}"
            );
            ids.iter()
                .copied()
                .take_while(|t| !eos.contains(t))
                .collect::<Vec<i64>>()
        };
        let run = |group: &[&Case]| {
            let prompts: Vec<Prompt> = group
                .iter()
                .map(|c| Prompt {
                    ids: c.ids.clone(),
                    image: c.image.as_ref(),
                })
                .collect();
            let mut samplers = vec![Sampler::new(0.0, 1.0, 0); group.len()];
            tch::no_grad(|| {
                session.generate_batch(&prompts, &eos, &mut samplers, 32, &mut |_, _| {})
            })
            .unwrap()
        };
        // each prompt alone, then the two image prompts (lengths 14 and 5) as one left-padded batch
        // (with the adapter the first stops after 14 tokens while the second runs to 32)
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(
                run(&[c])[0].token_ids,
                want(c),
                "prompt {i} alone, {attention:?}, adapter {adapter}"
            );
        }
        let both = run(&[&cases[0], &cases[1]]);
        for (i, g) in both.iter().enumerate() {
            assert_eq!(
                g.token_ids,
                want(&cases[i]),
                "prompt {i} in a batch, {attention:?}, adapter {adapter}"
            );
        }
    }
}

#[test]
fn greedy_32_tokens_match_transformers_generate() {
    check(false);
}

#[test]
fn greedy_32_tokens_with_the_peft_adapter_match_transformers_generate() {
    check(true);
}
