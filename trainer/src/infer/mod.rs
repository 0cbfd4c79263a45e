//! Generation with self-correction turns (`trainer infer`), on top of the model's KV cache.
//!
//! Turn 0 answers the question. Each further turn appends the earlier answer as the assistant's
//! message and the correction prompt as a new user message (the format `data build-sco` trains
//! on, with the one default prompt `data::records::DEFAULT_CORRECTION_PROMPT`), then generates
//! again. `Position::AfterReasoning` cuts the earlier answer after `</REASONING>` before asking
//! for the correction (the seed's open question of where the stage belongs).
pub mod sampling;
pub mod stages;

use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::data::image::{process, ImageProcessorConfig, ProcessedImage, RgbImage};
use crate::data::tokenize::{build_string_from_input, cross_attention_token_mask, TextProcessor};
use crate::model::{Images, KvCache, MllamaModel, ModelError};
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
    pub top_p: f64,
    pub max_new_tokens: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnOutput {
    pub text: String,
    /// The generated token ids (end-of-turn token excluded).
    #[serde(skip)]
    pub token_ids: Vec<i64>,
    pub stages: Stages,
    /// Tokens of the prompt this turn was generated from (for compute accounting).
    pub prompt_tokens: usize,
    pub tokens: usize,
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

/// (user, assistant) messages so far; the last user message is still unanswered.
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
        msgs.push(json!({"role": "assistant", "content": [{"type": "text", "text": shown}]}));
        msgs.push(
            json!({"role": "user", "content": [{"type": "text", "text": opts.correction_prompt}]}),
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
        let text = self
            .text
            .template
            .render(&messages(question, has_image, answers, opts), true, None)
            .map_err(InferError::Input)?;
        let text =
            build_string_from_input(&text, &self.text.ids.bos_token, &self.text.ids.image_token);
        self.text.tokenize(&text).map_err(InferError::Input)
    }

    /// The model's image inputs for a prompt: pixels, aspect ratio ids/mask, and the cross-attention
    /// mask (1, S, 1, T) from the image token's position, as MllamaProcessor builds it.
    pub fn images(&self, ids: &[i64], image: &ProcessedImage, device: Device) -> Images {
        let (t, tile) = (
            self.image_config.max_image_tiles as i64,
            self.image_config.tile as i64,
        );
        let s = ids.len() as i64;
        let mut cam = vec![0i64; (s * t) as usize]; // (S, T) for one image
        for (start, end) in cross_attention_token_mask(ids, self.text.ids.image) {
            let end = if end < 0 { s } else { end.min(s) };
            for row in start as i64..end {
                for tile_i in 0..image.num_tiles as i64 {
                    cam[(row * t + tile_i) as usize] = 1;
                }
            }
        }
        Images {
            pixel_values: Tensor::from_slice(&image.pixel_values)
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
        if opts.turns == 0 {
            return Err(InferError::Input("--turns must be at least 1".into()));
        }
        let device = self.model.options.device;
        let processed = image.map(|im| process(self.image_config, im));
        let mut eos: Vec<i64> = self.model.config.text.eos_token_ids.clone();
        eos.push(self.text.ids.eot);
        let mut sampler = Sampler::new(opts.temperature, opts.top_p, opts.seed);
        let mut answers: Vec<String> = Vec::new();
        let mut outputs = Vec::new();
        for turn in 0..opts.turns {
            let started = Instant::now();
            let ids = self.prompt_ids(question, processed.is_some(), &answers, opts)?;
            let images = processed.as_ref().map(|p| self.images(&ids, p, device));
            let (text, token_ids) = tch::no_grad(|| {
                self.generate(
                    &ids,
                    images.as_ref(),
                    &eos,
                    &mut sampler,
                    opts.max_new_tokens,
                    &mut |piece| on_piece(turn, piece),
                )
            })?;
            outputs.push(TurnOutput {
                stages: Stages::parse(&text),
                text: text.clone(),
                prompt_tokens: ids.len(),
                tokens: token_ids.len(),
                token_ids,
                seconds: started.elapsed().as_secs_f64(),
            });
            answers.push(text);
        }
        Ok(outputs)
    }

    /// Prompt once (images through the vision tower once), then one token per step from the cache.
    /// Returns the text and the generated ids (end-of-turn excluded).
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        ids: &[i64],
        images: Option<&Images>,
        eos: &[i64],
        sampler: &mut Sampler,
        max_new: usize,
        on_piece: &mut dyn FnMut(&str),
    ) -> Result<(String, Vec<i64>), InferError> {
        let device = self.model.options.device;
        let mut cache = KvCache::new(self.model.text.layers.len());
        let prompt = Tensor::from_slice(ids).view([1, -1]).to_device(device); // (1, S)
        let s = ids.len() as i64;
        let mut am = Tensor::ones([1, s], (Kind::Int64, device));
        // new tokens attend to the image like the prompt's last token (transformers' generate)
        let cam_last = images.map(|im| im.cross_attention_mask.narrow(1, s - 1, 1));
        let mut logits = self.model.forward_step(
            &prompt,
            Some(&am),
            None,
            images,
            images.map(|im| &im.cross_attention_mask),
            Some(&mut cache),
        )?;
        let mut new_ids: Vec<u32> = Vec::new();
        // incremental detokenization: each step decodes only what the new token adds
        let tok_err = |e: tokenizers::Error| InferError::Input(format!("tokenizer: {e}"));
        let mut stream = self.text.tokenizer.decode_stream(true);
        let mut text = String::new();
        for _ in 0..max_new {
            let last = logits
                .select(1, logits.size()[1] - 1)
                .squeeze_dim(0)
                .to_device(Device::Cpu); // (V)
            let next = sampler.pick(&last);
            if eos.contains(&next) {
                break;
            }
            new_ids.push(next as u32);
            if let Some(piece) = stream.step(next as u32).map_err(tok_err)? {
                on_piece(&piece);
                text.push_str(&piece);
            }
            am = Tensor::cat(&[&am, &Tensor::ones([1, 1], (Kind::Int64, device))], 1);
            let step = Tensor::from_slice(&[next]).view([1, 1]).to_device(device);
            logits = self.model.forward_step(
                &step,
                Some(&am),
                None,
                None,
                cam_last.as_ref(),
                Some(&mut cache),
            )?;
        }
        Ok((text, new_ids.iter().map(|&i| i as i64).collect()))
    }
}
