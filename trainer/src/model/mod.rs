//! Mllama (Llama 3.2 Vision) in tch, following transformers' `modeling_mllama.py`. Module index:
//! - `config`:  raw config.json (released or transformers-5 form) -> resolved [`MllamaConfig`]
//! - `weights`: memory-mapped safetensors [`WeightSource`], key layouts, shape-checked [`weights::Loader`]
//! - `ops`:     attention implementations (eager, sdpa, fused), RMSNorm, LayerNorm
//! - `vision`:  vision tower (local + global transformers, tile/positional embeddings)
//! - `text`:    text decoder (self-attention and cross-attention decoder layers, RoPE, masks)
//! - `lora`:    `Linear` with a PEFT-style LoRA branch, target-module matching
//! - `gemv`:    `Linear`'s decode-time fast path (few rows x large fp32 weight, bandwidth-bound)
//! - `adapter`: apply LoRA, read/write PEFT adapter folders, merge, trainable parameters
//! - `cache`:   KV cache for generation
//! - this file: [`MllamaModel`] (load, forward, loss, greedy generation), [`Batch`], errors
//!
//! Canonical parameter names are transformers-5 module paths (`model.language_model.layers.N...`,
//! `model.vision_model...`, `model.multi_modal_projector...`, `lm_head...`); both checkpoint key layouts load.
pub mod adapter;
pub mod adapter_config;
pub mod attn_tape;
pub mod cache;
pub mod config;
pub mod gemv;
pub mod lora;
pub mod ops;
pub mod text;
pub mod vision;
pub mod weights;

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

pub use cache::KvCache;
pub use config::MllamaConfig;
pub use lora::{Linear, LoraConfig, TargetModules};
pub use ops::AttentionImpl;
pub use weights::{KeyLayout, WeightSource};

use text::{
    linear, self_attention_mask, visit_linear, LinearVisitor, ParamVisitor, TextContext, TextModel,
};
use vision::VisionModel;

/// Errors of the model library; messages name the tensor, key or file and suggest the fix.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("config: {0}")]
    Config(String),
    /// (`error`, not `source`: the message holds it already, so it is not repeated as a cause)
    #[error("{path}: {error}{}", missing_hint(path, error))]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("weights: {0}")]
    Weights(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("input: {0}")]
    Input(String),
    #[error("{0}")]
    Attention(String),
    #[error(transparent)]
    Tch(#[from] tch::TchError),
}

impl ModelError {
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// For a missing config.json: what the folder should be.
fn missing_hint(path: &Path, error: &std::io::Error) -> &'static str {
    match error.kind() == std::io::ErrorKind::NotFound && path.ends_with("config.json") {
        true => {
            " (expected a Hugging Face model folder: config.json, *.safetensors, tokenizer files)"
        }
        false => "",
    }
}

/// How to materialize the model.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    pub dtype: Kind,
    pub device: Device,
    pub attention: AttentionImpl,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: Kind::Float,
            device: Device::Cpu,
            attention: AttentionImpl::Sdpa,
        }
    }
}

/// Image inputs as the Mllama processor makes them.
#[derive(Debug)]
pub struct Images {
    pub pixel_values: Tensor,         // (B, M, T, C, H, W) float
    pub aspect_ratio_ids: Tensor,     // (B, M) int64
    pub aspect_ratio_mask: Tensor,    // (B, M, T) int64
    pub cross_attention_mask: Tensor, // (B, S, M, T) int64
}

/// One model input.
#[derive(Debug)]
pub struct Batch {
    pub input_ids: Tensor,              // (B, S) int64
    pub attention_mask: Option<Tensor>, // (B, S) 0/1
    pub labels: Option<Tensor>,         // (B, S) int64, -100 = ignored
    pub images: Option<Images>,
}

/// Greedy decoding settings (transformers' `generate(do_sample=False)`).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were generated.
    pub min_new_tokens: usize,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: i64,
    pub use_cache: bool,
}

/// `MllamaForConditionalGeneration`.
#[derive(Debug)]
pub struct MllamaModel {
    pub config: MllamaConfig,
    pub options: LoadOptions,
    pub vision: VisionModel,
    pub multi_modal_projector: Linear,
    pub text: TextModel,
    pub lm_head: Linear,
    /// The LM head is the embedding's first `vocab_size` rows: `tie_word_embeddings` and no
    /// `lm_head.weight` in the weights (transformers 5.24 never ties Mllama and loads the file's
    /// `lm_head` whatever the flag says; a file without one has nothing else to use).
    pub lm_head_tied: bool,
    /// Set once LoRA is applied or loaded.
    pub lora: Option<LoraConfig>,
    /// The dtype of LoRA factors, when not the model's (`set_lora_kind`).
    pub lora_kind: Option<Kind>,
    /// Full finetuning trains the vision tower, the projector and the cross-attention layers
    /// only (`peft.freeze_llm_only`, llama-recipes' `freeze_LLM_only`).
    pub freeze_llm: bool,
    /// Base parameters a LoRA adapter trains in full, by name (peft's `modules_to_save`): listed
    /// by `trainable_parameters` after the factors.
    pub saved_params: Vec<String>,
    /// The modules those parameters belong to (`AdapterLayout::saved_modules`).
    pub saved_modules: Vec<String>,
    /// An FSDP skeleton's saved parameters that an adapter brings, left in its file for FSDP to
    /// read each rank's slice of (`load_adapter`).
    pub saved_in_adapter: Option<adapter::SavedInAdapter>,
}

/// The text decoder layer a parameter name belongs to (`...language_model.[model.]layers.N....`).
pub(crate) fn text_layer(name: &str) -> Option<usize> {
    let (_, rest) = name.split_once("language_model.")?;
    let rest = rest.strip_prefix("model.").unwrap_or(rest);
    rest.strip_prefix("layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// transformers' `_prepare_cross_attention_mask`: (B, S, M, T) 0/1 -> additive mask (B, 1, S, M*T*P1) and
/// `full_text_row_masked_out_mask` (B, 1, S, 1); rows that see no tile get a zero mask row.
pub fn prepare_cross_attention_mask(
    cam: &Tensor,
    num_vision_tokens: i64,
    kind: Kind,
) -> (Tensor, Tensor) {
    let s = cam.size();
    let (b, seq) = (s[0], s[1]);
    let m = cam
        .repeat_interleave_self_int(num_vision_tokens, 3, None)
        .view([b, seq, -1])
        .unsqueeze(1); // (B, 1, S, N)
    let inv = (m.ones_like() - m).to_kind(kind);
    let min = ops::dtype_min(kind);
    let mask = inv.masked_fill(&inv.to_kind(Kind::Bool), min);
    let row = mask.ne(min).any_dim(-1, false).to_kind(kind).unsqueeze(-1); // (B, 1, S, 1)
    (mask * &row, row)
}

/// Next-token targets of `labels` (B, S): labels shifted left by one, the last position -100 (ignored). (B, S) i64.
fn shifted_targets(labels: &Tensor) -> Tensor {
    let b = labels.size()[0];
    let pad = Tensor::full([b, 1], -100, (Kind::Int64, labels.device()));
    Tensor::cat(
        &[
            &labels
                .narrow(1, 1, labels.size()[1] - 1)
                .to_kind(Kind::Int64),
            &pad,
        ],
        1,
    ) // (B, S)
}

/// Causal-LM loss as transformers' `ForCausalLMLoss`: labels shifted left (last position ignored), fp32
/// cross-entropy summed over positions whose label is not -100. Returns (sum (scalar f32), token count), so callers
/// can normalize across micro-batches and ranks; `sum / count` is transformers' loss. The reference for
/// [`supervised_lm_loss`], which training uses.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> (Tensor, i64) {
    let v = logits.size()[2];
    let shift = shifted_targets(labels); // (B, S)
    let flat = logits.to_kind(Kind::Float).reshape([-1, v]); // (B*S, V)
    let sum = flat.cross_entropy_loss::<Tensor>(
        &shift.reshape([-1]),
        None,
        tch::Reduction::Sum,
        -100,
        0.0,
    );
    let count = shift.ne(-100).sum(Kind::Int64).int64_value(&[]);
    (sum, count)
}

/// [`causal_lm_loss`] of `lm_head(hidden)` without the logits of unsupervised positions: the LM head and the
/// softmax run only on the rows whose shifted label is not -100 (ignored rows add exactly 0 to the sum and to every
/// gradient, so only the matmul's row count changes; with the usual half-masked prompts that halves the LM head's
/// forward and backward, the largest matmul of a small model). hidden (B, S, H) after the final norm, labels
/// (B, S). Returns (sum (scalar f32), token count).
pub fn supervised_lm_loss(hidden: &Tensor, lm_head: &Linear, labels: &Tensor) -> (Tensor, i64) {
    let h = hidden.size()[2];
    let (rows, targets) = supervised_rows(labels); // (N,) supervised rows
    let x = hidden.reshape([-1, h]).index_select(0, &rows); // (N, H)
    (lm_chunk_loss(&x, lm_head, &targets), rows.size()[0])
}

/// Supervised rows per LM-head chunk when the loss is computed chunk by chunk
/// ([`lm_loss_chunked`], the FSDP schedule's out stage): about 2^26 logits (256 MB in
/// fp32) at a time, so a micro-batch's (N, vocab) fp32 logits, their softmax and their gradient
/// (3 x 1 GB for 2048 supervised tokens of Llama 3's 128k vocabulary) never exist at once.
pub fn lm_loss_chunk_rows(vocab: i64) -> i64 {
    ((1i64 << 26) / vocab.max(1)).max(1)
}

/// The supervised rows of `labels` (B, S) and their targets: (rows (N,) i64 into the flattened
/// (B*S) positions, targets (N,) i64), as [`supervised_lm_loss`] selects them.
pub fn supervised_rows(labels: &Tensor) -> (Tensor, Tensor) {
    let target = shifted_targets(labels).reshape([-1]); // (B*S,)
    let keep = target.ne(-100).nonzero().squeeze_dim(1); // (N,)
    let t = target.index_select(0, &keep);
    (keep, t)
}

/// Loss sum of one chunk: `x` (n, H) rows of the final hidden states, `t` (n,) their targets.
pub fn lm_chunk_loss(x: &Tensor, lm_head: &Linear, t: &Tensor) -> Tensor {
    let logits = lm_head.forward(x).to_kind(Kind::Float); // (n, V)
    logits.cross_entropy_loss::<Tensor>(t, None, tch::Reduction::Sum, -100, 0.0)
}

/// (start, length) of each chunk of `n` rows, `chunk` (at least 1) at a time.
pub fn row_chunks(n: i64, chunk: i64) -> impl Iterator<Item = (i64, i64)> {
    let chunk = chunk.max(1);
    (0..n)
        .step_by(chunk as usize)
        .map(move |start| (start, chunk.min(n - start)))
}

/// [`supervised_lm_loss`]'s sum from the supervised `rows` (N,) and their `targets` (N,) of
/// [`supervised_rows`], `chunk` rows at a time: the same sum up to fp32 summation order, and
/// differentiable (with a graph it keeps every chunk's, so it saves memory only under no_grad: the
/// FSDP schedule takes the value so and differentiates chunk by chunk itself,
/// `fsdp::schedule::out_backward`).
pub fn lm_loss_chunked(
    hidden: &Tensor,
    lm_head: &Linear,
    rows: &Tensor,
    targets: &Tensor,
    chunk: i64,
) -> Tensor {
    let flat = hidden.reshape([-1, hidden.size()[2]]); // (B*S, H)
    let mut sum = Tensor::zeros([], (Kind::Float, hidden.device()));
    for (start, len) in row_chunks(rows.size()[0], chunk) {
        let x = flat.index_select(0, &rows.narrow(0, start, len)); // (len, H)
        sum += lm_chunk_loss(&x, lm_head, &targets.narrow(0, start, len));
    }
    sum
}

/// `model.attention: fused` runs on CUDA only (on CPU in the tests' reference mode, `attn_tape`).
fn check_fused_device(options: &LoadOptions) -> Result<(), ModelError> {
    if options.attention == AttentionImpl::Fused
        && !options.device.is_cuda()
        && !attn_tape::reference_mode()
    {
        return Err(ModelError::Attention(
            "model.attention=fused needs a CUDA GPU; use sdpa".into(),
        ));
    }
    Ok(())
}

/// The vision tower's attention: `options.attention`, except that `fused` on a GPU runs libtorch's
/// SDPA there when it measured faster than the kernels at the tower's head dim
/// (`kernels::attention::sdpa_faster`: at 80, Llama 3.2 Vision's, the kernels of variants before
/// 19, the default included, ran 0.34-0.52x SDPA forward+backward; 19 ran 1.09x, so it keeps
/// them, as the text model's 128 does). Logged once.
fn vision_attention(config: &MllamaConfig, options: &LoadOptions) -> AttentionImpl {
    let (AttentionImpl::Fused, Device::Cuda(ordinal)) = (options.attention, options.device) else {
        return options.attention;
    };
    let d = config.vision.hidden_size / config.vision.attention_heads;
    // (an error here, a bad variant or no GPU, is reported by the first fused call)
    if !kernels::attention::sdpa_faster_on(ordinal as i32, d).unwrap_or(false) {
        return AttentionImpl::Fused;
    }
    static NOTED: std::sync::Once = std::sync::Once::new();
    NOTED.call_once(|| {
        tracing::info!(
            "model.attention: fused: the vision tower (head dim {d}) runs libtorch SDPA, which measured faster than the attention kernels there (kernels/BENCHMARKS.md); the text model runs the kernels"
        )
    });
    AttentionImpl::Sdpa
}

impl MllamaModel {
    /// Loads `dir` (config.json + safetensors in either key layout).
    pub fn load(dir: &Path, options: LoadOptions) -> Result<Self, ModelError> {
        check_fused_device(&options)?;
        let config = MllamaConfig::from_file(&dir.join("config.json"))?;
        let src = WeightSource::open_dir(dir)?;
        Self::from_source(config, &src, options)
    }

    /// Builds the model from a resolved config and a weight source.
    pub fn from_source(
        config: MllamaConfig,
        src: &WeightSource,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let ld = weights::Loader::new(src, options.dtype, options.device);
        Self::build(config, ld, options)
    }

    /// The model's structure with placeholder weights (see [`weights::Loader::shapes_only`]): names and shapes are
    /// checked against `src`, nothing is read. FSDP's sharded loading fills each rank's shards from `src`.
    pub fn skeleton(
        config: MllamaConfig,
        src: &WeightSource,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        let ld = weights::Loader::shapes_only(src, options.dtype, options.device);
        Self::build(config, ld, options)
    }

    fn build(
        config: MllamaConfig,
        mut ld: weights::Loader,
        options: LoadOptions,
    ) -> Result<Self, ModelError> {
        check_fused_device(&options)?;
        let vision =
            VisionModel::load(&mut ld, &config.vision, vision_attention(&config, &options));
        let multi_modal_projector = linear(
            &mut ld,
            "model.multi_modal_projector",
            config.text.hidden_size,
            config.vision.vision_output_dim,
            true,
        );
        let text = TextModel::load(&mut ld, &config.text, options.attention);
        let lm_head_tied = config.text.tie_word_embeddings && !ld.has("lm_head.weight");
        let lm_head = if lm_head_tied {
            let w = text.embed_tokens.narrow(0, 0, config.text.vocab_size);
            Linear {
                path: "lm_head".into(),
                weight: w,
                bias: None,
                lora: None,
            }
        } else {
            linear(
                &mut ld,
                "lm_head",
                config.text.vocab_size,
                config.text.hidden_size,
                false,
            )
        };
        ld.finish()?;
        Ok(Self {
            config,
            options,
            vision,
            multi_modal_projector,
            text,
            lm_head,
            lm_head_tied,
            lora: None,
            lora_kind: None,
            freeze_llm: false,
            saved_params: vec![],
            saved_modules: vec![],
            saved_in_adapter: None,
        })
    }

    /// A randomly initialised model (see [`weights::Loader::random`]) for tests and benchmarks; `seed` seeds
    /// libtorch's generator, so the same seed gives the same weights.
    pub fn random(
        config: MllamaConfig,
        options: LoadOptions,
        seed: i64,
    ) -> Result<Self, ModelError> {
        // libtorch's generator is process-global: models built at once on several threads (tests)
        // would interleave their draws, and their weights would depend on the scheduling
        static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = INIT.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let ld = weights::Loader::random(options.dtype, options.device);
        Self::build(config, ld, options)
    }

    /// Writes every base parameter to one safetensors file with `layout`'s names (a synthetic checkpoint, or merged
    /// weights after [`MllamaModel::merge_lora`]).
    pub fn save_safetensors(&self, path: &Path, layout: KeyLayout) -> Result<(), ModelError> {
        let mut v: Vec<(String, Tensor)> = vec![];
        self.visit_params(&mut |n, t| {
            v.push((
                layout.file_name(n),
                t.detach().to_device(Device::Cpu).contiguous(),
            ))
        });
        let refs: Vec<(&str, &Tensor)> = v.iter().map(|(n, t)| (n.as_str(), t)).collect();
        Tensor::write_safetensors(&refs, path)?;
        Ok(())
    }

    /// Vision tower + projector: (B, M, T, C, H, W) -> cross-attention states (B, M*T*P1, H_text).
    pub fn vision_states(&self, images: &Images) -> Result<Tensor, ModelError> {
        let v = self.vision.forward(
            &images.pixel_values,
            &images.aspect_ratio_ids,
            &images.aspect_ratio_mask,
        )?; // (B, M, T, P1, Dv)
        let b = v.size()[0];
        Ok(self
            .multi_modal_projector
            .forward(&v)
            .reshape([b, -1, self.config.text.hidden_size]))
    }

    /// One decoder pass. input_ids (B, S); attention_mask (B, S_past + S); position_ids (B, S) (default
    /// past..past+S); cross_attention_mask (B, S, M, T) for these S tokens. Returns logits (B, S, V).
    pub fn forward_step(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        images: Option<&Images>,
        cross_attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let hidden = self.decoder_hidden(
            input_ids,
            attention_mask,
            position_ids,
            images,
            cross_attention_mask,
            cache,
        )?;
        Ok(self.lm_head.forward(&hidden)) // (B, S, V)
    }

    /// [`MllamaModel::forward_step`] up to the final norm: hidden states (B, S, H) before the LM head.
    fn decoder_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        images: Option<&Images>,
        cross_attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        let device = self.options.device;
        let past = cache.as_ref().map_or(0, |c| c.seen);
        let cross_states = images.map(|im| self.vision_states(im)).transpose()?;
        let ctx = self.text_context(
            b,
            s,
            past,
            position_ids,
            attention_mask,
            cross_attention_mask,
            cross_states,
        );
        let hidden = self.text.embed(&input_ids.to_device(device)); // (B, S, H)
        let hidden = self
            .text
            .forward_layers(hidden, &ctx, cache.as_deref_mut())?; // (B, S, H) normed
        if let Some(c) = cache {
            c.seen += s;
        }
        Ok(hidden)
    }

    /// Everything the decoder layers need besides the hidden states, for `s` tokens after `past` cached ones:
    /// RoPE tables, the self-attention mask, the cross-attention mask (from cross_attention_mask (B, S, M, T)) and
    /// the vision states. Reads no parameter (FSDP builds it while the weights are sharded).
    #[allow(clippy::too_many_arguments)]
    pub fn text_context(
        &self,
        b: i64,
        s: i64,
        past: i64,
        position_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        cross_attention_mask: Option<&Tensor>,
        cross_states: Option<Tensor>,
    ) -> TextContext {
        let (kind, device) = (self.options.dtype, self.options.device);
        let imp = self.options.attention;
        let (cross_mask, full_text_row_mask, image_samples) = match cross_attention_mask {
            Some(cam) => {
                let has_image = cam.ne(0).view([b, -1]).any_dim(1, false); // (B,)

                // a mask on the CPU (training batches) is read to skip the multiply when every
                // sample has an image; one on the GPU (decode steps) is not read (a device sync
                // per token): the multiply is then always done, by ones where nothing is dropped
                let all_have = cam.device() == Device::Cpu && has_image.all().int64_value(&[]) != 0;
                let image_samples = (!all_have).then(|| {
                    has_image.to_device(device).to_kind(kind).view([b, 1, 1]) // (B, 1, 1)
                });
                let cam = cam.to_device(device);
                let p1 = self.config.vision.num_patches();
                let (m, r) = prepare_cross_attention_mask(&cam, p1, kind);
                let m = match imp {
                    AttentionImpl::Fused => {
                        // transformers zeroes the mask of rows that see no tile: they attend to every vision token
                        let allowed = cam.ne(0).view([b, s, -1]); // (B, S, M*T)
                        let row_any = allowed.any_dim(-1, true); // (B, S, 1)
                        let allowed = allowed.logical_or(&row_any.logical_not());
                        ops::AttnMask {
                            block: Some((allowed, p1)),
                            ..Default::default()
                        }
                    }
                    AttentionImpl::Sdpa => ops::AttnMask::dense_rows(m),
                    AttentionImpl::Eager => ops::AttnMask::dense(m),
                };
                (Some(m), Some(r), image_samples)
            }
            None => (None, None, None),
        };
        let pos = match position_ids {
            Some(p) => p.to_device(device),
            None => Tensor::arange_start(past, past + s, (Kind::Int64, device))
                .unsqueeze(0)
                .expand([b, s], false),
        };
        let (cos, sin) = self.text.rotary.cos_sin(&pos, kind); // (B, S, D)
        let am = attention_mask.map(|a| a.to_device(device));
        TextContext {
            cos,
            sin,
            self_mask: self_attention_mask(imp, am.as_ref(), b, s, past, kind, device),
            cross_states,
            cross_mask,
            full_text_row_mask,
            image_samples,
        }
    }

    /// Full forward of a batch (no cache): logits (B, S, V).
    pub fn forward(&self, batch: &Batch) -> Result<Tensor, ModelError> {
        self.forward_step(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            None,
            batch.images.as_ref(),
            batch.images.as_ref().map(|i| &i.cross_attention_mask),
            None,
        )
    }

    /// (loss sum, token count) of a batch with labels: [`causal_lm_loss`] of [`MllamaModel::forward`], computed
    /// by [`supervised_lm_loss`] (the LM head only where a label is supervised).
    pub fn loss(&self, batch: &Batch) -> Result<(Tensor, i64), ModelError> {
        let labels = batch
            .labels
            .as_ref()
            .ok_or_else(|| ModelError::Input("loss needs labels".into()))?;
        let hidden = self.decoder_hidden(
            &batch.input_ids,
            batch.attention_mask.as_ref(),
            None,
            batch.images.as_ref(),
            batch.images.as_ref().map(|i| &i.cross_attention_mask),
            None,
        )?; // (B, S, H)
        Ok(supervised_lm_loss(
            &hidden,
            &self.lm_head,
            &labels.to_device(self.options.device),
        ))
    }

    /// Greedy generation; returns the new tokens (B, N). With `use_cache` the prompt (and images) run once and each
    /// step feeds one token; without it every step reruns the whole sequence (the reference).
    pub fn generate(&self, batch: &Batch, opts: &GenerateOptions) -> Result<Tensor, ModelError> {
        let device = self.options.device;
        let mut ids = batch.input_ids.to_device(device);
        let b = ids.size()[0];
        let mut am = batch
            .attention_mask
            .as_ref()
            .map_or_else(|| ids.ones_like(), |a| a.to_device(device));
        let mut cam = batch
            .images
            .as_ref()
            .map(|i| i.cross_attention_mask.to_device(device));
        let mut cache = opts.use_cache.then(|| KvCache::new(self.text.layers.len()));
        let mut done = vec![false; b as usize];
        let mut out: Vec<Tensor> = vec![];
        for step in 0..opts.max_new_tokens {
            // position ids from the attention mask, as generate() does: cumsum - 1, 1 where masked
            let pos_all = (am.cumsum(-1, Kind::Int64) - 1).masked_fill(&am.eq(0), 1);
            let logits = match cache.as_mut() {
                Some(c) if step > 0 => {
                    let last = ids.narrow(1, ids.size()[1] - 1, 1);
                    let pos = pos_all.narrow(1, pos_all.size()[1] - 1, 1);
                    let cam_step = cam.as_ref().map(|c| c.narrow(1, c.size()[1] - 1, 1));
                    self.forward_step(
                        &last,
                        Some(&am),
                        Some(&pos),
                        None,
                        cam_step.as_ref(),
                        Some(c),
                    )?
                }
                c => self.forward_step(
                    &ids,
                    Some(&am),
                    Some(&pos_all),
                    batch.images.as_ref(),
                    cam.as_ref(),
                    c,
                )?,
            };
            let next_logits = logits.select(1, logits.size()[1] - 1).to_kind(Kind::Float); // (B, V)
            if step < opts.min_new_tokens {
                for &e in &opts.eos_token_ids {
                    if e < next_logits.size()[1] {
                        let _ = next_logits.narrow(1, e, 1).fill_(f64::NEG_INFINITY);
                    }
                }
            }
            let mut next: Vec<i64> =
                Vec::<i64>::try_from(next_logits.argmax(-1, false).to_device(Device::Cpu))?;
            for (i, t) in next.iter_mut().enumerate() {
                if done[i] {
                    *t = opts.pad_token_id;
                } else if opts.eos_token_ids.contains(t) {
                    done[i] = true;
                }
            }
            let next = Tensor::from_slice(&next).view([b, 1]).to_device(device);
            ids = Tensor::cat(&[&ids, &next], 1);
            am = Tensor::cat(&[&am, &am.ones_like().narrow(1, 0, 1)], 1);
            cam = cam.map(|c| {
                let last = c.narrow(1, c.size()[1] - 1, 1);
                Tensor::cat(&[&c, &last], 1)
            });
            out.push(next);
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(Tensor::cat(&out, 1))
    }

    /// Whether full finetuning trains parameter `name`: every one, or with `freeze_llm` those
    /// outside the language model and in its cross-attention layers (llama-recipes freezes
    /// `language_model` and unfreezes the layers in `cross_attention_layers`: embeddings, final
    /// norm, LM head and self-attention layers stay as they are).
    pub fn full_finetune_trains(&self, name: &str) -> bool {
        if !self.freeze_llm {
            return true;
        }
        if !name.contains("language_model.") {
            return !name.starts_with("lm_head");
        }
        text_layer(name)
            .is_some_and(|layer| self.config.text.cross_attention_layers.contains(&layer))
    }

    /// Visits every base parameter as (canonical name, tensor); LoRA tensors are not included (see
    /// `trainable_parameters`).
    pub fn visit_params(&self, f: &mut ParamVisitor) {
        self.vision.visit(f);
        visit_linear(&self.multi_modal_projector, f);
        self.text.visit(f);
        if !self.lm_head_tied {
            visit_linear(&self.lm_head, f);
        }
    }

    /// Names and shapes of every base parameter, in module order.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let mut v = vec![];
        self.visit_params(&mut |n, t| v.push((n.to_string(), t.size())));
        v
    }

    /// Visits every linear layer mutably (vision, projector, text, lm_head).
    pub fn visit_linears(&mut self, f: &mut LinearVisitor) {
        self.vision.visit_linears(f);
        f(&mut self.multi_modal_projector);
        for l in &mut self.text.layers {
            l.visit_linears(f);
        }
        f(&mut self.lm_head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (loss sum, count, d sum / d hidden, d sum / d weight) of `loss` on one (hidden, labels) pair.
    fn run(
        hidden: &Tensor,
        weight: &Tensor,
        labels: &Tensor,
        loss: &dyn Fn(&Tensor, &Linear, &Tensor) -> (Tensor, i64),
    ) -> (f64, i64, Tensor, Tensor) {
        let h = hidden.detach().set_requires_grad(true);
        let lm_head = Linear {
            path: "lm_head".into(),
            weight: weight.detach().set_requires_grad(true),
            bias: None,
            lora: None,
        };
        let (sum, count) = loss(&h, &lm_head, labels);
        sum.backward();
        (
            sum.double_value(&[]),
            count,
            h.grad(),
            lm_head.weight.grad(),
        )
    }

    fn reference(hidden: &Tensor, lm_head: &Linear, labels: &Tensor) -> (Tensor, i64) {
        causal_lm_loss(&lm_head.forward(hidden), labels)
    }

    #[test]
    fn supervised_loss_matches_the_full_logits_reference() {
        tch::manual_seed(0);
        let (b, s, h, v) = (3, 9, 16, 40);
        let hidden = Tensor::randn([b, s, h], (Kind::Float, Device::Cpu));
        let weight = Tensor::randn([v, h], (Kind::Float, Device::Cpu)) * 0.3;
        let labels = Tensor::randint(v, [b, s], (Kind::Int64, Device::Cpu));
        // a prompt half, a padded tail and one row without any supervised token
        let _ = labels.narrow(1, 0, 4).fill_(-100);
        let _ = labels.narrow(0, 1, 1).narrow(1, 6, 3).fill_(-100);
        let _ = labels.narrow(0, 2, 1).fill_(-100);
        let all_ignored = labels.full_like(-100);
        for labels in [&labels, &all_ignored] {
            let (l0, c0, gh0, gw0) = run(&hidden, &weight, labels, &reference);
            let (l1, c1, gh1, gw1) = run(&hidden, &weight, labels, &supervised_lm_loss);
            assert_eq!(c0, c1);
            assert!((l0 - l1).abs() <= 1e-6 * l0.abs().max(1.0), "{l0} vs {l1}");
            for (a, b) in [(&gh0, &gh1), (&gw0, &gw1)] {
                let err = (a - b).abs().max().double_value(&[]);
                assert!(err <= 1e-6, "gradient differs by {err}");
            }
        }
        // chunk by chunk (2 and 5 rows, and one chunk of all): the same sum and gradients
        for chunk in [2, 5, 1000] {
            let chunked = |h: &Tensor, l: &Linear, y: &Tensor| {
                let (rows, targets) = supervised_rows(y);
                (
                    lm_loss_chunked(h, l, &rows, &targets, chunk),
                    rows.size()[0],
                )
            };
            let (l0, c0, gh0, gw0) = run(&hidden, &weight, &labels, &reference);
            let (l1, c1, gh1, gw1) = run(&hidden, &weight, &labels, &chunked);
            assert_eq!(c0, c1);
            assert!(
                (l0 - l1).abs() <= 1e-6 * l0.abs().max(1.0),
                "chunk {chunk}: {l0} vs {l1}"
            );
            for (a, b) in [(&gh0, &gh1), (&gw0, &gw1)] {
                let err = (a - b).abs().max().double_value(&[]);
                assert!(err <= 1e-6, "chunk {chunk}: gradient differs by {err}");
            }
        }
        let (sum, count) = tch::no_grad(|| {
            let head = Linear {
                path: "lm_head".into(),
                weight: weight.shallow_clone(),
                bias: None,
                lora: None,
            };
            let (rows, targets) = supervised_rows(&all_ignored);
            (
                lm_loss_chunked(&hidden, &head, &rows, &targets, 3),
                rows.size()[0],
            )
        });
        assert_eq!((sum.double_value(&[]), count), (0.0, 0));
    }

    #[test]
    fn lm_loss_chunks_hold_about_2_pow_26_logits() {
        assert_eq!(lm_loss_chunk_rows(128_256), 523); // Llama 3's vocabulary
        assert_eq!(lm_loss_chunk_rows(1 << 30), 1);
        assert_eq!(lm_loss_chunk_rows(0), 1 << 26);
    }
}
