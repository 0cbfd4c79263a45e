//! Generation with self-correction turns (`trainer infer`), on top of the model's KV cache.
//!
//! Turn 0 answers the question. Each further turn appends the earlier answer as the assistant's
//! message and the correction prompt as a new user message (the format `data build-sco` trains
//! on, with the one default prompt `data::records::DEFAULT_CORRECTION_PROMPT`), then generates
//! again. `Position::AfterReasoning` cuts the earlier answer after `</REASONING>` before asking
//! for the correction (the seed's open question of where the stage belongs).
pub mod batch;
pub mod checkpoint;
pub mod item_id;
pub mod questions;
pub mod sampling;
pub mod stages;

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};
use tch::{Device, Tensor};

pub use crate::checkpoint::PromptSettings;
use crate::data::image::{process, ImageProcessorConfig, ProcessedImage, RgbImage};
use crate::data::tokenize::{build_string_from_input, cross_attention_token_mask, TextProcessor};
use crate::model::{Images, MllamaModel, ModelError};
pub use batch::{Generated, Prompt};
pub use checkpoint::CheckpointWeights;
use sampling::Sampler;
pub use stages::Stages;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    AfterAnswer,
    AfterReasoning,
}

#[derive(Debug, Clone, Serialize)]
pub struct InferOptions {
    /// Total turns: 1 = the answer only, 2 = answer + one correction, ...
    pub turns: usize,
    pub correction_prompt: String,
    pub position: Position,
    pub temperature: f64,
    /// 0 = no top-k filter (transformers' default is 50, `sampling::DEFAULT_TOP_K`).
    pub top_k: usize,
    pub top_p: f64,
    /// transformers' `repetition_penalty` (1 = off; recorded only when set, so settings.json of
    /// evaluations without it stay as they were).
    #[serde(skip_serializing_if = "is_one")]
    pub repetition_penalty: f64,
    /// transformers' `stop_strings`: a turn ends once its text holds one (recorded only when set).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    pub max_new_tokens: usize,
    pub seed: u64,
    /// Keep a LLaVA `<image>` marker at the question's start or end as text (a model trained with
    /// `data.image_placeholder: keep`); by default it is removed, as training removes it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub keep_image_placeholder: bool,
    /// Prompts start with two `<|begin_of_text|>` (a model trained with `data.double_bos: true`).
    /// The tokenizer applies it (`TextProcessor::from_model_dir`); here it is recorded, so an
    /// eval resumed with the other setting is refused (its settings.json differs).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub double_bos: bool,
    /// `--date` (YYYY-MM-DD): the chat template's "Today Date" of text-only prompts, pinned
    /// (`data::template::use_template_clock`) before anything is rendered (unset: today's, as
    /// transformers' strftime_now). Not recorded here: the date a run's text-only prompts
    /// carried is (`template_date` in eval's settings.json and `infer --questions` lines).
    #[serde(skip)]
    pub date: Option<String>,
    /// generation_config.json's `eos_token_id`, which ends a turn besides the model config's and
    /// the Llama 3 stop tokens (transformers' `generate` stops at it). Not recorded: an eval
    /// compares that file's sha256 (`eval::made_with`).
    #[serde(skip)]
    pub eos_token_ids: Vec<i64>,
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// Llama 3's end tokens: the assistant turn ends with `<|eot_id|>`; `<|eom_id|>` (end of a
/// message that expects a tool reply) and `<|end_of_text|>` end generation too, as the Instruct
/// models' generation_config.json lists all three for transformers' `generate`.
pub const LLAMA3_STOP_TOKENS: [&str; 3] = ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"];

/// The ids generation stops at: the model config's eos ids, the chat template's end of turn and
/// whichever of `LLAMA3_STOP_TOKENS` the tokenizer has.
pub fn stop_ids(config_eos: &[i64], text: &TextProcessor) -> Vec<i64> {
    let mut ids = config_eos.to_vec();
    ids.push(text.ids.eot);
    ids.extend(
        LLAMA3_STOP_TOKENS
            .iter()
            .filter_map(|t| text.tokenizer.token_to_id(t).map(|i| i as i64)),
    );
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TurnOutput {
    pub text: String,
    /// The generated token ids (end-of-turn token excluded).
    #[serde(skip)]
    pub token_ids: Vec<i64>,
    pub stages: Stages,
    /// Tokens of the prompt this turn was generated from (for compute accounting).
    pub prompt_tokens: usize,
    /// Tiles of the image the vision tower encoded for this turn (0: none).
    pub tiles: usize,
    pub tokens: usize,
    /// Ended by itself (end of turn or a stop string), not cut off at max_new_tokens.
    pub finished: bool,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum InferError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Input(String),
}

/// Everything needed to answer questions about images with one model.
pub struct Session<'a> {
    pub model: &'a MllamaModel,
    pub text: &'a TextProcessor,
    pub image_config: &'a ImageProcessorConfig,
}

/// (user, assistant) messages so far; the last user message is still unanswered. Earlier answers
/// and the correction prompt lose surrounding whitespace, as training's turns do
/// (`data::records`: a turn cut off at max_new_tokens often ends in "\n\n", which the training
/// data never has before `<|eot_id|>`).
fn messages(question: &str, has_image: bool, answers: &[String], opts: &InferOptions) -> Value {
    let mut first = Vec::new();
    if has_image {
        first.push(json!({"type": "image"}));
    }
    first.push(json!({"type": "text", "text": question}));
    let mut msgs = vec![json!({"role": "user", "content": first})];
    for a in answers {
        let shown = match opts.position {
            Position::AfterAnswer => a.as_str(),
            Position::AfterReasoning => stages::through_reasoning(a),
        };
        msgs.push(
            json!({"role": "assistant", "content": [{"type": "text", "text": shown.trim()}]}),
        );
        msgs.push(
            json!({"role": "user", "content": [{"type": "text", "text": opts.correction_prompt.trim()}]}),
        );
    }
    Value::Array(msgs)
}

impl Session<'_> {
    /// The prompt's token ids for the conversation so far (one BOS, generation prompt added).
    pub fn prompt_ids(
        &self,
        question: &str,
        has_image: bool,
        answers: &[String],
        opts: &InferOptions,
    ) -> Result<Vec<i64>, InferError> {
        // a literal image token in the user's text would be a second image slot (MllamaProcessor
        // refuses the mismatch, as training's encode does); generated answers are not checked
        let literal = &self.text.ids.image_token;
        for (what, t) in [
            ("the question", question),
            ("the correction prompt", opts.correction_prompt.as_str()),
        ] {
            if t.contains(literal.as_str()) {
                return Err(InferError::Input(format!(
                    "{what} holds a literal {literal}, which would be a second image slot: remove it (the image goes in with --image)"
                )));
            }
        }
        // the question as training reads a human turn (`data::records`)
        let question = match opts.keep_image_placeholder {
            true => question.trim().to_string(),
            false => crate::data::records::strip_placeholder(question),
        };
        // an earlier answer that spells the image token (a model can write it as text) would be
        // a second image slot when re-tokenized: the literal is dropped from it, said once (the
        // processor would refuse the prompt, ending the conversation or a whole eval)
        let answers: Vec<String> = answers
            .iter()
            .map(|a| match a.contains(literal.as_str()) {
                true => {
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| tracing::warn!("an answer holds a literal {literal}; it is dropped from the answer when the next turn's prompt is built (it would be a second image slot)"));
                    a.replace(literal.as_str(), "")
                }
                false => a.clone(),
            })
            .collect();
        let text = self
            .text
            .template
            .render(&messages(&question, has_image, &answers, opts), true, None)
            .map_err(InferError::Input)?;
        let text =
            build_string_from_input(&text, &self.text.ids.bos_token, &self.text.ids.image_token);
        let ids = self.text.tokenize(&text).map_err(InferError::Input)?;
        // one image slot per image, as MllamaProcessor requires: a template that drops the image
        // part would have the model answer without seeing the image, without a word
        let slots = ids.iter().filter(|&&t| t == self.text.ids.image).count();
        if slots != usize::from(has_image) {
            return Err(InferError::Input(format!(
                "the prompt holds {slots} {literal} token(s) for {} image(s): check the model folder's chat template (its image part of a user message must place {literal})",
                usize::from(has_image)
            )));
        }
        Ok(ids)
    }

    /// Cross-attention mask rows (S, T) of one prompt with one image, as MllamaProcessor builds
    /// them: from the image token on, each row sees the image's real tiles.
    pub fn cross_attention_rows(&self, ids: &[i64], image: &ProcessedImage) -> Vec<i64> {
        let t = self.image_config.max_image_tiles as i64;
        let s = ids.len() as i64;
        let mut cam = vec![0i64; (s * t) as usize]; // (S, T)
        for (start, end) in cross_attention_token_mask(ids, self.text.ids.image) {
            let end = if end < 0 { s } else { end.min(s) };
            for row in start as i64..end {
                for tile_i in 0..image.num_tiles as i64 {
                    cam[(row * t + tile_i) as usize] = 1;
                }
            }
        }
        cam
    }

    /// The model's image inputs for a prompt: pixels, aspect ratio ids/mask, and the cross-attention
    /// mask (1, S, 1, T) from the image token's position, as MllamaProcessor builds it.
    pub fn images(&self, ids: &[i64], image: &ProcessedImage, device: Device) -> Images {
        let (t, tile) = (
            self.image_config.max_image_tiles as i64,
            self.image_config.tile as i64,
        );
        let s = ids.len() as i64;
        let cam = self.cross_attention_rows(ids, image);
        Images {
            pixel_values: Tensor::from_slice(&image.pixel_values())
                .view([1, 1, t, 3, tile, tile])
                .to_device(device),
            aspect_ratio_ids: Tensor::from_slice(&[image.aspect_ratio_id])
                .view([1, 1])
                .to_device(device),
            aspect_ratio_mask: Tensor::from_slice(&image.aspect_ratio_mask)
                .view([1, 1, t])
                .to_device(device),
            cross_attention_mask: Tensor::from_slice(&cam)
                .view([1, s, 1, t])
                .to_device(device),
        }
    }

    /// Runs `opts.turns` turns; `on_piece(turn, text)` receives the text as it is generated.
    pub fn run(
        &self,
        image: Option<&RgbImage>,
        question: &str,
        opts: &InferOptions,
        on_piece: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<TurnOutput>, InferError> {
        let mut outs = self.run_batch(&[(image, question)], opts, &mut |_, turn, piece| {
            on_piece(turn, piece)
        })?;
        Ok(outs.pop().unwrap_or_default())
    }

    /// Runs `opts.turns` turns for several questions at once (one batch per turn; questions with
    /// and without an image go in separate batches). Each question has its own sampler seeded with
    /// `opts.seed`, so its turns are those [`Session::run`] gives it alone (up to the rounding of
    /// batched kernels, see `generate_batch`). `on_piece(item, turn,
    /// text)` receives the text as it is generated. A turn's `seconds` is its batch's wall time
    /// divided by the batch size.
    pub fn run_batch(
        &self,
        items: &[(Option<&RgbImage>, &str)],
        opts: &InferOptions,
        on_piece: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<Vec<Vec<TurnOutput>>, InferError> {
        let seeds = vec![opts.seed; items.len()];
        self.run_batch_seeded(items, &seeds, opts, on_piece)
    }

    /// [`Session::run_batch`] with question i's sampler seeded with `seeds[i]` (eval seeds each
    /// question from its id: sampled runs then draw independently per question, and a question's
    /// draws do not depend on its batch or rank).
    pub fn run_batch_seeded(
        &self,
        items: &[(Option<&RgbImage>, &str)],
        seeds: &[u64],
        opts: &InferOptions,
        on_piece: &mut dyn FnMut(usize, usize, &str),
    ) -> Result<Vec<Vec<TurnOutput>>, InferError> {
        if seeds.len() != items.len() {
            return Err(InferError::Input(format!(
                "{} seeds for {} questions",
                seeds.len(),
                items.len()
            )));
        }
        if opts.turns == 0 {
            return Err(InferError::Input("--turns must be at least 1".into()));
        }
        let processed: Vec<Option<ProcessedImage>> = items
            .iter()
            .map(|(im, _)| im.map(|im| process(self.image_config, im)))
            .collect();
        let eos = [
            &self.model.config.text.eos_token_ids[..],
            &opts.eos_token_ids,
        ];
        let eos = stop_ids(&eos.concat(), self.text);
        let mut samplers: Vec<Sampler> = seeds
            .iter()
            .map(|&seed| {
                Sampler::new(opts.temperature, opts.top_p, seed)
                    .with_top_k(opts.top_k)
                    .with_repetition_penalty(opts.repetition_penalty)
                    .with_stop_strings(opts.stop.clone())
            })
            .collect();
        let mut answers: Vec<Vec<String>> = vec![Vec::new(); items.len()];
        let mut outputs: Vec<Vec<TurnOutput>> = (0..items.len()).map(|_| Vec::new()).collect();
        let groups: [Vec<usize>; 2] = [true, false].map(|with_image| {
            (0..items.len())
                .filter(|&i| processed[i].is_some() == with_image)
                .collect()
        });
        for turn in 0..opts.turns {
            for group in groups.iter().filter(|g| !g.is_empty()) {
                let started = Instant::now();
                let prompts = group
                    .iter()
                    .map(|&i| {
                        let ids =
                            self.prompt_ids(items[i].1, processed[i].is_some(), &answers[i], opts)?;
                        Ok(Prompt {
                            ids,
                            image: processed[i].as_ref(),
                        })
                    })
                    .collect::<Result<Vec<_>, InferError>>()?;
                let mut group_samplers: Vec<Sampler> =
                    group.iter().map(|&i| samplers[i].clone()).collect();
                let generated = tch::no_grad(|| {
                    self.generate_batch(
                        &prompts,
                        &eos,
                        &mut group_samplers,
                        opts.max_new_tokens,
                        &mut |r, piece| on_piece(group[r], turn, piece),
                    )
                })?;
                let seconds = started.elapsed().as_secs_f64() / group.len() as f64;
                for (k, (&i, g)) in group.iter().zip(generated).enumerate() {
                    samplers[i] = group_samplers[k].clone();
                    // the next turn's prompt holds the answer as generated: decoded without the
                    // tokenizer's space clean-up (" ." -> "."), which would change its tokens
                    answers[i].push(
                        self.text
                            .decode_exact(&g.token_ids)
                            .map_err(InferError::Input)?,
                    );
                    outputs[i].push(TurnOutput {
                        stages: Stages::parse(&g.text),
                        text: g.text,
                        prompt_tokens: prompts[k].ids.len(),
                        tiles: prompts[k].image.map_or(0, |im| im.num_tiles),
                        tokens: g.token_ids.len(),
                        token_ids: g.token_ids,
                        finished: g.ended,
                        seconds,
                    });
                }
            }
        }
        Ok(outputs)
    }

    /// One prompt: the prompt runs once (images through the vision tower once), then one token per
    /// step from the cache. Returns the text and the generated ids (end-of-turn excluded).
    pub fn generate(
        &self,
        ids: &[i64],
        image: Option<&ProcessedImage>,
        eos: &[i64],
        sampler: &mut Sampler,
        max_new: usize,
        on_piece: &mut dyn FnMut(&str),
    ) -> Result<(String, Vec<i64>), InferError> {
        let prompt = Prompt {
            ids: ids.to_vec(),
            image,
        };
        let g = self
            .generate_batch(
                &[prompt],
                eos,
                std::slice::from_mut(sampler),
                max_new,
                &mut |_, piece| on_piece(piece),
            )?
            .pop()
            .unwrap_or(Generated {
                text: String::new(),
                token_ids: vec![],
                ended: false,
            });
        Ok((g.text, g.token_ids))
    }
}
