//! Batched generation: B prompts of different lengths decoded together through one KV cache.
//!
//! Prompts are left-padded to the longest one (pad id, attention mask 0). Position ids come from
//! the attention mask (cumsum - 1, as transformers' `generate`), so a padded row sees the same
//! positions and the same keys as it does alone; its cross-attention mask rows shift with it (pad
//! rows see no tile, so `full_text_row_mask` zeroes their cross-attention). Each row has its own
//! sampler and detokenizer. A row that reaches end-of-turn leaves the batch: its rows of the KV
//! cache, mask and positions are dropped, so the rest decode at the cost of the rows still live.
use tch::{Device, Kind, Tensor};

use super::sampling::{hits_stop, Sampler};
use super::{InferError, Session};
use crate::data::image::ProcessedImage;
use crate::model::{gemv, Images, KvCache, ModelError};

/// One prompt of a batch: token ids (one BOS, generation prompt added) and its image, if any.
pub struct Prompt<'a> {
    pub ids: Vec<i64>,
    pub image: Option<&'a ProcessedImage>,
}

/// What one row generated: the text and the ids (end-of-turn excluded).
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    pub token_ids: Vec<i64>,
    /// Ended by itself (an end token or a stop string), not cut at `max_new`.
    pub ended: bool,
}

/// A decode step's last logits as the host reads them.
enum StepLogits {
    /// Every live row greedy: the argmax per row (B').
    Greedy(Vec<i64>),
    /// Some row samples or penalizes repeats: the logits (B', V).
    Host(Tensor),
}

/// Keeps the rows `keep` (indices into dim 0) of every cached K/V.
fn keep_cache_rows(cache: &mut KvCache, keep: &Tensor) {
    for layer in &mut cache.layers {
        if let Some((k, v)) = layer.get() {
            layer.set(k.index_select(0, keep), v.index_select(0, keep)); // (B', Hk, S, D)
        }
    }
}

impl Session<'_> {
    /// `MllamaModel::forward_step` through the cache with the LM head on the last position only
    /// (transformers' `logits_to_keep=1` in generate): the prompt's other positions need no
    /// logits, which saves S x H x V multiply-adds per prompt. ids (B, S), mask (B, past + S),
    /// positions (B, S), cross-attention mask (B, S, 1, T). Returns the last logits (B, V).
    fn forward_last(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        positions: &Tensor,
        images: Option<&Images>,
        cross_attention_mask: Option<&Tensor>,
        cache: &mut KvCache,
    ) -> Result<Tensor, ModelError> {
        let m = self.model;
        let (b, s) = (ids.size()[0], ids.size()[1]);
        let cross_states = images.map(|im| m.vision_states(im)).transpose()?;
        let ctx = m.text_context(
            b,
            s,
            cache.seen,
            Some(positions),
            Some(attention_mask),
            cross_attention_mask,
            cross_states,
        );
        let hidden = m.text.embed(ids); // (B, S, H)
        let hidden = m.text.forward_layers(hidden, &ctx, Some(cache))?; // (B, S, H), normed
        cache.seen += s;
        Ok(m.lm_head.forward(&hidden.select(1, s - 1))) // (B, V)
    }

    /// The batch's model inputs: left-padded ids (B, S), attention mask (B, S), position ids
    /// (B, S), and the images with the cross-attention mask (B, S, 1, T) shifted like the ids.
    fn pad_batch(
        &self,
        prompts: &[Prompt],
        device: Device,
    ) -> Result<(Tensor, Tensor, Tensor, Option<Images>), InferError> {
        let b = prompts.len() as i64;
        let s = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) as i64;
        let pad = self.model.config.text.pad_token_id.unwrap_or(0);
        let mut ids = vec![pad; (b * s) as usize]; // (B, S)
        let mut am = vec![0i64; (b * s) as usize]; // (B, S)
        for (r, p) in prompts.iter().enumerate() {
            let off = r * s as usize + (s as usize - p.ids.len());
            ids[off..off + p.ids.len()].copy_from_slice(&p.ids);
            am[off..off + p.ids.len()].fill(1);
        }
        let ids = Tensor::from_slice(&ids).view([b, s]).to_device(device);
        let am = Tensor::from_slice(&am).view([b, s]).to_device(device);
        // transformers' generate: positions count real tokens only; pads get 1 (never attended)
        let pos = (am.cumsum(-1, Kind::Int64) - 1).masked_fill(&am.eq(0), 1); // (B, S)
        let with_image = prompts.iter().filter(|p| p.image.is_some()).count();
        if with_image == 0 {
            return Ok((ids, am, pos, None));
        }
        if with_image != prompts.len() {
            return Err(InferError::Input(
                "a batch mixes prompts with and without an image; generate them in separate batches".into(),
            ));
        }
        let (t, tile) = (
            self.image_config.max_image_tiles as i64,
            self.image_config.tile as i64,
        );
        let mut pixels = Vec::new(); // (B, 1, T, 3, tile, tile)
        let mut ar_ids = Vec::new(); // (B, 1)
        let mut ar_mask = Vec::new(); // (B, 1, T)
        let mut cam = vec![0i64; (b * s * t) as usize]; // (B, S, 1, T)
        for (r, p) in prompts.iter().enumerate() {
            let Some(image) = p.image else {
                continue; // unreachable: every prompt has an image (checked above)
            };
            pixels.extend_from_slice(&image.pixel_values());
            ar_ids.push(image.aspect_ratio_id);
            ar_mask.extend_from_slice(&image.aspect_ratio_mask);
            let row = self.cross_attention_rows(&p.ids, image); // (S_r, T)
            let off = (r as i64 * s + (s - p.ids.len() as i64)) * t;
            cam[off as usize..off as usize + row.len()].copy_from_slice(&row);
        }
        let images = Images {
            pixel_values: Tensor::from_slice(&pixels)
                .view([b, 1, t, 3, tile, tile])
                .to_device(device),
            aspect_ratio_ids: Tensor::from_slice(&ar_ids).view([b, 1]).to_device(device),
            aspect_ratio_mask: Tensor::from_slice(&ar_mask)
                .view([b, 1, t])
                .to_device(device),
            cross_attention_mask: Tensor::from_slice(&cam)
                .view([b, s, 1, t])
                .to_device(device),
        };
        Ok((ids, am, pos, Some(images)))
    }

    /// Generates for every prompt at once (at most `max_new` tokens each, stopping a row at any of
    /// `eos`); `samplers[r]` picks row r's tokens and `on_piece(r, text)` receives its text as it
    /// is decoded. Greedy rows give the same tokens as generating each prompt alone up to
    /// rounding: the batched matmuls and attention (a padded batch's mask, the gemv's row blocks)
    /// may sum in another order, so a near-tie between two tokens can go the other way, as in
    /// transformers' batched `generate`. Runs without
    /// autograd (as HF's `generate`), whatever the caller's mode: trainable LoRA factors would
    /// otherwise keep every step's activations alive through the cache.
    pub fn generate_batch(
        &self,
        prompts: &[Prompt],
        eos: &[i64],
        samplers: &mut [Sampler],
        max_new: usize,
        on_piece: &mut dyn FnMut(usize, &str),
    ) -> Result<Vec<Generated>, InferError> {
        let _no_grad = tch::no_grad_guard(); // until this returns
        if samplers.len() != prompts.len() {
            return Err(InferError::Input(format!(
                "{} prompts but {} samplers",
                prompts.len(),
                samplers.len()
            )));
        }
        if prompts.iter().any(|p| p.ids.is_empty()) {
            return Err(InferError::Input("an empty prompt".into()));
        }
        let mut out: Vec<Generated> = prompts
            .iter()
            .map(|_| Generated {
                text: String::new(),
                token_ids: vec![],
                ended: false,
            })
            .collect();
        if prompts.is_empty() || max_new == 0 {
            return Ok(out);
        }
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0) + max_new;
        let max_positions = self.model.config.text.max_position_embeddings;
        if longest as i64 > max_positions {
            // transformers' generate says the same and goes on (RoPE extrapolates; the model
            // was not trained there)
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("a prompt plus --max-new-tokens reaches {longest} positions, past the model's max_position_embeddings ({max_positions}): the text past it may degrade; lower --max-new-tokens or --turns"));
        }
        let device = self.model.options.device;
        let (ids, mut am, pos, images) = self.pad_batch(prompts, device)?;
        let s = ids.size()[1];
        let mut cache = KvCache::new(self.model.text.layers.len());
        // new tokens attend to the image like the prompt's last token (transformers' generate)
        let mut cam_last = images
            .as_ref()
            .map(|im| im.cross_attention_mask.narrow(1, s - 1, 1)); // (B, 1, 1, T)
        let mut next_pos = pos.narrow(1, s - 1, 1) + 1; // (B, 1)

        // (B, V): left padding puts every row's last token at position S - 1
        let mut last = self.forward_last(
            &ids,
            &am,
            &pos,
            images.as_ref(),
            images.as_ref().map(|im| &im.cross_attention_mask),
            &mut cache,
        )?;
        let tok_err = |e: tokenizers::Error| InferError::Input(format!("tokenizer: {e}"));
        let mut streams: Vec<_> = prompts
            .iter()
            .map(|_| self.text.tokenizer.decode_stream(true))
            .collect();
        let mut live: Vec<usize> = (0..prompts.len()).collect(); // batch row -> prompt index
        for step in 0..max_new {
            // greedy rows alone: their argmax on the logits' device, so a step copies B' ids to
            // the host, not (B', V) logits (the argmax of bf16 logits is that of their exact fp32
            // values, first index on ties, as `Sampler::pick` takes it)
            let picked = match live.iter().all(|&r| samplers[r].is_greedy()) {
                true => StepLogits::Greedy(
                    Vec::try_from(last.argmax(-1, false).to_device(Device::Cpu))
                        .map_err(ModelError::from)?, // (B',)
                ),
                false => StepLogits::Host(last.to_device(Device::Cpu)), // (B', V)
            };
            let mut keep = Vec::new(); // batch rows still generating
            let mut next = Vec::new(); // their new tokens
            for (k, &r) in live.iter().enumerate() {
                let token = match &picked {
                    StepLogits::Greedy(ids) => ids[k],
                    StepLogits::Host(last_cpu) => {
                        // fp32 before any processor, as transformers' generate takes the logits
                        // (a repetition penalty on bf16 logits would round them to 8 bits)
                        let logits = last_cpu.get(k as i64).to_kind(Kind::Float);
                        match samplers[r].repetition_penalty == 1.0 {
                            true => samplers[r].pick(&logits),
                            // the sequence so far, as transformers' input_ids: prompt and generated
                            false => {
                                let seen = [prompts[r].ids.as_slice(), &out[r].token_ids].concat();
                                samplers[r].pick_after(&logits, &seen)
                            }
                        }
                    }
                };
                if eos.contains(&token) {
                    out[r].ended = true;
                    self.flush_stream(r, &mut out[r], on_piece)?;
                    continue;
                }
                out[r].token_ids.push(token);
                if let Some(piece) = streams[r].step(token as u32).map_err(tok_err)? {
                    on_piece(r, &piece);
                    out[r].text.push_str(&piece);
                    if hits_stop(&out[r].text, piece.len(), &samplers[r].stop_strings) {
                        out[r].ended = true;
                        continue; // (a stop string ends the row, as its end-of-turn token would)
                    }
                }
                keep.push(k as i64);
                next.push(token);
            }
            if keep.is_empty() || step + 1 == max_new {
                break;
            }
            if keep.len() < live.len() {
                let idx = Tensor::from_slice(&keep).to_device(device);
                keep_cache_rows(&mut cache, &idx);
                am = am.index_select(0, &idx);
                next_pos = next_pos.index_select(0, &idx);
                cam_last = cam_last.map(|c| c.index_select(0, &idx));
                live = keep.iter().map(|&k| live[k as usize]).collect();
            }
            let b = live.len() as i64;
            am = Tensor::cat(&[&am, &Tensor::ones([b, 1], (Kind::Int64, device))], 1); // (B', past + 1)
            let step_ids = Tensor::from_slice(&next).view([b, 1]).to_device(device);
            last = gemv::decode_scope(device, live.len(), || {
                self.forward_last(
                    &step_ids,
                    &am,
                    &next_pos,
                    None,
                    cam_last.as_ref(),
                    &mut cache,
                )
            })?; // (B', V)
            next_pos += 1;
        }
        // the text as transformers' decode gives it: whole, and cleaned up where the tokenizer
        // config asks (the streamed pieces are not)
        for (r, o) in out.iter_mut().enumerate() {
            self.flush_stream(r, o, on_piece)?; // (rows cut off by max_new)
            o.text = self.text.decode(&o.token_ids).map_err(InferError::Input)?;
        }
        Ok(out)
    }

    /// Gives `on_piece` what row r's stream held back (the bytes of a character its last token
    /// left unfinished), so the pieces add up to the row's text before clean-up.
    fn flush_stream(
        &self,
        r: usize,
        row: &mut Generated,
        on_piece: &mut dyn FnMut(usize, &str),
    ) -> Result<(), InferError> {
        let rest = self.text.stream_rest(&row.token_ids, &row.text);
        if let Some(rest) = rest.map_err(InferError::Input)? {
            on_piece(r, &rest);
            row.text.push_str(&rest);
        }
        Ok(())
    }
}
