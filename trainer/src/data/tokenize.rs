//! Tokenization of a rendered dialog, BOS handling, the seed's label masking, the length policy.
//!
//! BOS: the template writes `<|begin_of_text|>`; MllamaProcessor leaves a prompt that already
//! holds the BOS text alone, and the seed then tokenizes with special tokens on, so the Llama 3
//! post-processor adds a second BOS. `double_bos: false` (default) tokenizes without special
//! tokens (one BOS, as at inference); `true` reproduces the seed.
use std::path::Path;

use tokenizers::Tokenizer;

use super::records::Turn;
use super::template::{dialog_messages, token_string, ChatTemplate};
use crate::config::LengthPolicy;

/// Ignored label value (PyTorch's cross-entropy `ignore_index`).
pub const IGNORE: i64 = -100;

/// Token ids the pipeline needs, all read from the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: i64,
    pub bos_token: String,
    pub eot: i64,
    pub pad: i64,
    pub image: i64,
    pub image_token: String,
    /// `<|start_header_id|>system<|end_header_id|>` etc., tokenized.
    pub system_header: Vec<i64>,
    pub user_header: Vec<i64>,
    pub assistant_header: Vec<i64>,
}

/// Template + tokenizer + ids: text side of the processor.
pub struct TextProcessor {
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub ids: SpecialIds,
    pub double_bos: bool,
    /// tokenizer_config.json's `clean_up_tokenization_spaces` (Llama 3's sets it): `decode`
    /// removes the space before punctuation and contractions, as transformers' decode does.
    pub clean_up_spaces: bool,
    /// The LM head's rows (`text_config.vocab_size`), once the model's config is read: a
    /// supervised token at or above it (an id added to tokenizer.json beyond the model's
    /// vocabulary) is the record's error, not an out-of-range target inside the loss.
    pub label_limit: Option<i64>,
    /// Supervise the last assistant turn only (`data.supervise: last`).
    pub last_turn_only: bool,
}

/// One tokenized sample (unpadded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub input_ids: Vec<i64>,
    /// Same length as `input_ids`, unshifted; `IGNORE` where not supervised.
    pub labels: Vec<i64>,
}

impl Encoded {
    pub fn supervised(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// Llama 3's reserved padding token.
const LLAMA3_PAD: &str = "<|finetune_right_pad_id|>";

impl TextProcessor {
    /// For training: the pad token must not be `<|eot_id|>`. Padding is left out of the loss, so
    /// every `<|eot_id|>` would be too and the model would never learn to stop. (Generation does
    /// not care: fine-tunes that set pad = eos load for infer and eval.)
    pub fn check_pad_for_training(&self, dir: &Path) -> Result<(), String> {
        if self.ids.pad == self.ids.eot {
            return Err(format!(
                "{}: the pad token is {:?}, the same id as <|eot_id|>: padding is left out of the loss, so every <|eot_id|> would be too and the model would never learn to stop; set \"pad_token\" to another token (Llama 3.x has {LLAMA3_PAD})",
                dir.join("tokenizer_config.json").display(),
                self.tokenizer.id_to_token(self.ids.pad as u32).unwrap_or_default()
            ));
        }
        Ok(())
    }

    /// Load `tokenizer.json`, the chat template and the special ids of a model folder.
    pub fn from_model_dir(dir: &Path, double_bos: bool) -> Result<Self, String> {
        let tpath = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tpath)
            .map_err(|e| format!("{}: cannot load tokenizer: {e}", tpath.display()))?;
        // a tokenizer.json saved with truncation or padding on: Hugging Face's tokenizer resets
        // both per call (the processor's own arguments decide), so the stored ones never apply
        tokenizer
            .with_truncation(None)
            .map_err(|e| format!("{}: {e}", tpath.display()))?;
        tokenizer.with_padding(None);
        let template = ChatTemplate::from_model_dir(dir)?;
        let tc_path = dir.join("tokenizer_config.json");
        let tc: serde_json::Value = std::fs::read_to_string(&tc_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let id = |tok: &str| -> Result<i64, String> {
            tokenizer.token_to_id(tok).map(|i| i as i64).ok_or_else(|| {
                format!(
                    "{}: token {tok:?} is not in the vocabulary",
                    tpath.display()
                )
            })
        };
        let bos_token =
            token_string(tc.get("bos_token")).unwrap_or_else(|| "<|begin_of_text|>".into());
        // without a pad_token: Llama 3.x's reserved pad token, else eos (as llama-recipes does)
        let pad_token = token_string(tc.get("pad_token"))
            .or_else(|| {
                tokenizer
                    .token_to_id(LLAMA3_PAD)
                    .map(|_| LLAMA3_PAD.to_string())
            })
            .or_else(|| token_string(tc.get("eos_token")))
            .ok_or_else(|| {
                format!(
                    "{}: neither pad_token nor eos_token is set",
                    tc_path.display()
                )
            })?;
        let image_token = tc
            .get("image_token")
            .and_then(|v| v.as_str())
            .unwrap_or("<|image|>")
            .to_string();
        let header = |role: &str| -> Result<Vec<i64>, String> {
            let enc = tokenizer
                .encode(format!("<|start_header_id|>{role}<|end_header_id|>"), false)
                .map_err(|e| e.to_string())?;
            Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
        };
        let ids = SpecialIds {
            bos: id(&bos_token)?,
            bos_token,
            eot: id("<|eot_id|>")?,
            pad: id(&pad_token)?,
            image: id(&image_token)?,
            image_token,
            system_header: header("system")?,
            user_header: header("user")?,
            assistant_header: header("assistant")?,
        };
        let clean_up_spaces = tc
            .get("clean_up_tokenization_spaces")
            .and_then(|v| v.as_bool())
            .unwrap_or(false);
        Ok(Self {
            tokenizer,
            template,
            ids,
            double_bos,
            clean_up_spaces,
            label_limit: None,
            last_turn_only: false,
        })
    }

    /// Generated ids as text, special tokens skipped, as transformers' `decode(ids,
    /// skip_special_tokens=True)`: with `clean_up_spaces`, its `clean_up_tokenization` too.
    pub fn decode(&self, ids: &[i64]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        let text = self
            .tokenizer
            .decode(&ids, true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// `ids` as text without the clean-up [`TextProcessor::decode`] applies (special tokens
    /// skipped): re-tokenizing it gives the ids back where the tokenizer round-trips.
    pub fn decode_exact(&self, ids: &[i64]) -> Result<String, String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, true)
            .map_err(|e| format!("tokenizer: {e}"))
    }

    /// What a stream of `ids` held back: the end of their [`TextProcessor::decode_exact`] text
    /// past `streamed` (the pieces a `decode_stream` gave), or None when nothing is left. A stream
    /// gives a piece only once it ends on a whole character, so bytes a generation cut off in the
    /// middle of one stay in it until flushed, as transformers' `TextStreamer.end()` flushes its
    /// cache (they decode as U+FFFD, as the whole text has them).
    pub fn stream_rest(&self, ids: &[i64], streamed: &str) -> Result<Option<String>, String> {
        let whole = self.decode_exact(ids)?;
        // (past the streamed length, as TextStreamer.end() slices at what it printed, should the
        // whole decode not start with the pieces)
        let n = streamed.len();
        Ok(match whole.get(n..) {
            Some(rest) if !rest.is_empty() => Some(rest.to_string()),
            _ => None,
        })
    }

    /// The text the seed tokenizes for these turns.
    pub fn render(&self, turns: &[Turn], has_image: bool) -> Result<String, String> {
        self.render_dialog(None, turns, has_image)
    }

    /// [`Self::render`] after a system message (a record's leading "system" turn).
    pub fn render_dialog(
        &self,
        system: Option<&str>,
        turns: &[Turn],
        has_image: bool,
    ) -> Result<String, String> {
        let text = self
            .template
            .render(&dialog_messages(system, turns, has_image), false, None)?;
        Ok(build_string_from_input(
            &text,
            &self.ids.bos_token,
            &self.ids.image_token,
        ))
    }

    /// Tokenize rendered text (one or two BOS as configured).
    pub fn tokenize(&self, text: &str) -> Result<Vec<i64>, String> {
        let enc = self
            .tokenizer
            .encode(text, self.double_bos)
            .map_err(|e| format!("tokenizer: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// The first `<|...|>` in `text` that the tokenizer reads as one token (Llama 3's
    /// `<|eot_id|>`, `<|start_header_id|>`, ...), the image token aside (counted by `encode`).
    fn special_token_in<'t>(&self, text: &'t str) -> Option<&'t str> {
        text.match_indices("<|").find_map(|(at, _)| {
            let end = text[at..].find("|>").filter(|&e| e <= 64)? + at + 2;
            let token = &text[at..end];
            (token != self.ids.image_token && self.tokenizer.token_to_id(token).is_some())
                .then_some(token)
        })
    }

    /// Render, tokenize and mask one record's turns.
    pub fn encode(&self, turns: &[Turn], has_image: bool) -> Result<Encoded, String> {
        self.encode_dialog(None, turns, has_image)
    }

    /// [`Self::encode`] after a system message (masked from the labels, as the system block
    /// every text-only record has).
    pub fn encode_dialog(
        &self,
        system: Option<&str>,
        turns: &[Turn],
        has_image: bool,
    ) -> Result<Encoded, String> {
        let texts = turns
            .iter()
            .flat_map(|t| [t.user.as_str(), t.assistant.as_str()]);
        if let Some(token) = system
            .into_iter()
            .chain(texts)
            .find_map(|t| self.special_token_in(t))
        {
            return Err(format!(
                "the record's text holds {token}, a special token of the tokenizer: it would be read as that token, not as text (a turn boundary of its own; is the text already formatted with a chat template?): give each turn's plain text"
            ));
        }
        let text = self.render_dialog(system, turns, has_image)?;
        let input_ids = self.tokenize(&text)?;
        // a literal image token in the text would be a second image slot (MllamaProcessor refuses
        // the mismatch; the cross-attention mask would end the real image's span there)
        let slots = input_ids.iter().filter(|&&t| t == self.ids.image).count();
        if slots != usize::from(has_image) {
            return Err(format!(
                "the text holds {slots} {} token(s) for {} image(s): remove the literal {} from the record's text",
                self.ids.image_token,
                usize::from(has_image),
                self.ids.image_token
            ));
        }
        let mut labels = seed_labels(&input_ids, &self.ids);
        if self.last_turn_only {
            keep_last_turn(&mut labels, &input_ids, &self.ids);
        }
        if let Some(limit) = self.label_limit {
            if let Some(&id) = labels.iter().find(|&&l| l != IGNORE && l >= limit) {
                let token = self.tokenizer.id_to_token(id as u32).unwrap_or_default();
                return Err(format!(
                    "the answer holds token {token:?} (id {id}), beyond the model's output vocabulary (text_config.vocab_size {limit}): the LM head cannot predict it; remove it from the text, or use this model's tokenizer files"
                ));
            }
        }
        Ok(Encoded { input_ids, labels })
    }
}

/// transformers' `PreTrainedTokenizerBase.clean_up_tokenization`: the spaces a word-piece
/// tokenizer puts before punctuation and English contractions, removed.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// MllamaProcessor's `build_string_from_input`: add the BOS text unless present, after any
/// leading image tokens.
pub fn build_string_from_input(prompt: &str, bos: &str, image: &str) -> String {
    if prompt.contains(bos) {
        return prompt.to_string();
    }
    let mut rest = prompt;
    let mut n = 0;
    while let Some(r) = rest.strip_prefix(image) {
        rest = r;
        n += 1;
    }
    format!("{}{bos}{rest}", image.repeat(n))
}

fn contains_at_any(seq: &[i64], target: &[i64]) -> bool {
    // the seed scans `range(len(seq) - 3)`: the last possible start is skipped; kept as is
    let n = target.len();
    seq.len() > n && (0..seq.len() - n).any(|i| &seq[i..i + n] == target)
}

/// The seed's label masking (cot_dataset.py `tokenize_dialogs`), ids from the tokenizer:
/// every `<|eot_id|>`-terminated segment that holds a system or user header is ignored; the
/// assistant header tokens are ignored; pad and image tokens are ignored. What remains is the
/// assistant turns (with the `\n\n` after their header) and their `<|eot_id|>`.
pub fn seed_labels(input_ids: &[i64], ids: &SpecialIds) -> Vec<i64> {
    let mut labels = input_ids.to_vec();
    let mut last = 0usize;
    let eots: Vec<usize> = labels
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == ids.eot)
        .map(|(i, _)| i)
        .collect();
    for idx in eots {
        let seg = &labels[last..=idx];
        if contains_at_any(seg, &ids.system_header) || contains_at_any(seg, &ids.user_header) {
            for l in &mut labels[last..=idx] {
                *l = IGNORE;
            }
        } else {
            last = idx + 1;
        }
    }
    let a = &ids.assistant_header;
    let n = a.len();
    if labels.len() > n {
        for i in 0..labels.len() - n {
            if &labels[i..i + n] == a.as_slice() {
                for l in &mut labels[i..i + n] {
                    *l = IGNORE;
                }
            }
        }
    }
    for l in labels.iter_mut() {
        if *l == ids.pad || *l == ids.image {
            *l = IGNORE;
        }
    }
    labels
}

/// `data.supervise: last`: labels before the last assistant header ignored, so only the last
/// answer (and its `<|eot_id|>`) is supervised.
pub fn keep_last_turn(labels: &mut [i64], input_ids: &[i64], ids: &SpecialIds) {
    let a = &ids.assistant_header;
    if a.is_empty() {
        return;
    }
    if let Some(start) = input_ids.windows(a.len()).rposition(|w| w == a.as_slice()) {
        for l in &mut labels[..start] {
            *l = IGNORE;
        }
    }
}

/// What the length policy did to one sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LengthOutcome {
    Fits,
    Truncated {
        from: usize,
    },
    /// Dropped: too long under `skip`, or nothing supervised left after truncation.
    Skipped {
        reason: String,
    },
}

/// Apply `data.max_seq_len` / `max_seq_len_policy`. `Err` under `error`.
pub fn apply_length_policy(
    enc: &mut Encoded,
    max_len: usize,
    policy: LengthPolicy,
) -> Result<LengthOutcome, String> {
    let n = enc.input_ids.len();
    if n <= max_len {
        return Ok(LengthOutcome::Fits);
    }
    match policy {
        LengthPolicy::Error => Err(format!(
            "{n} tokens > data.max_seq_len {max_len} (set data.max_seq_len_policy to truncate or skip, or raise data.max_seq_len)"
        )),
        LengthPolicy::Skip => Ok(LengthOutcome::Skipped {
            reason: format!("{n} tokens > data.max_seq_len {max_len}"),
        }),
        LengthPolicy::Truncate => {
            enc.input_ids.truncate(max_len);
            enc.labels.truncate(max_len);
            if enc.supervised() == 0 {
                Ok(LengthOutcome::Skipped {
                    reason: format!(
                        "no supervised token left after truncating {n} tokens to {max_len}"
                    ),
                })
            } else {
                Ok(LengthOutcome::Truncated { from: n })
            }
        }
    }
}

/// MllamaProcessor's `get_cross_attention_token_mask`: per image token, the `[start, end)`
/// token range that attends to it; `end == -1` means "to the end of the (padded) sequence".
pub fn cross_attention_token_mask(input_ids: &[i64], image_id: i64) -> Vec<(usize, i64)> {
    let locs: Vec<usize> = input_ids
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == image_id)
        .map(|(i, _)| i)
        .collect();
    match locs.len() {
        0 => vec![],
        1 => vec![(locs[0], -1)],
        _ => {
            let mut m: Vec<(usize, i64)> = locs.windows(2).map(|w| (w[0], w[1] as i64)).collect();
            m.push((*locs.last().unwrap(), input_ids.len() as i64));
            let mut last_end = m.last().unwrap().1;
            for v in m.iter_mut().rev() {
                if v.0 as i64 == v.1 - 1 {
                    v.1 = last_end;
                }
                last_end = v.1;
            }
            m
        }
    }
}
