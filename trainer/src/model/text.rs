//! Text decoder (transformers `MllamaTextModel`): embeddings (vocab + 8 rows), self-attention decoder layers
//! (RMSNorm, GQA attention with llama3 RoPE, SwiGLU MLP) and cross-attention decoder layers at
//! `cross_attention_layers` (q_norm/k_norm, no RoPE, tanh gates, `full_text_row_masked_out_mask`).
//! Canonical weight prefix: `model.language_model.`.
use tch::{Device, Kind, Tensor};

use super::cache::{KvCache, LayerCache};
use super::config::{Activation, RopeScaling, TextConfig};
use super::lora::Linear;
use super::ops::{attend, dtype_min, merge_heads, project_heads, AttentionImpl, AttnMask, RmsNorm};
use super::weights::Loader;
use super::ModelError;

pub(crate) fn linear(ld: &mut Loader, path: &str, out: i64, inp: i64, bias: bool) -> Linear {
    let weight = ld.get(&format!("{path}.weight"), &[out, inp]);
    let bias = bias.then(|| ld.get(&format!("{path}.bias"), &[out]));
    Linear {
        path: path.to_string(),
        weight,
        bias,
        lora: None,
    }
}

fn rms(ld: &mut Loader, path: &str, n: i64, eps: f64) -> RmsNorm {
    RmsNorm {
        weight: ld.get(&format!("{path}.weight"), &[n]),
        eps,
    }
}

/// Visits parameters as (canonical name, tensor).
pub type ParamVisitor<'a> = dyn FnMut(&str, &Tensor) + 'a;
/// Visits linear layers mutably (LoRA, merge).
pub type LinearVisitor<'a> = dyn FnMut(&mut Linear) + 'a;

pub(crate) fn visit_linear(l: &Linear, f: &mut ParamVisitor) {
    f(&format!("{}.weight", l.path), &l.weight);
    if let Some(b) = &l.bias {
        f(&format!("{}.bias", l.path), b);
    }
}

/// RoPE inverse frequencies (with llama3 scaling) and cos/sin tables.
#[derive(Debug)]
pub struct Rotary {
    pub inv_freq: Tensor, // (D/2,) f32
}

impl Rotary {
    pub fn new(cfg: &TextConfig, device: Device) -> Self {
        let dim = cfg.head_dim();
        let base = cfg.rope_theta;
        // As transformers: inv_freq = 1 / base^(arange(0, dim, 2) / dim) in fp32.
        let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
            .to_kind(Kind::Float)
            / dim as f64;
        let inv_freq = Tensor::from(base as f32).pow(&exps).reciprocal(); // (D/2,)
        let inv_freq = match cfg.rope_scaling {
            RopeScaling::Default => inv_freq,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_freq_wavelen = old / low_freq_factor;
                let high_freq_wavelen = old / high_freq_factor;
                let wavelen = inv_freq.reciprocal() * (2.0 * std::f64::consts::PI);
                let scaled =
                    (&inv_freq / factor).where_self(&wavelen.gt(low_freq_wavelen), &inv_freq);
                let smooth = (wavelen.reciprocal() * old - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                let smoothed =
                    (smooth.ones_like() - &smooth) * &scaled / factor + &smooth * &scaled;
                let is_medium = wavelen
                    .lt(high_freq_wavelen)
                    .logical_not()
                    .logical_and(&wavelen.gt(low_freq_wavelen).logical_not());
                smoothed.where_self(&is_medium, &scaled)
            }
        };
        Self {
            inv_freq: inv_freq.to_device(device),
        }
    }

    /// position_ids (B, S) -> (cos, sin), each (B, S, D) in `kind`.
    pub fn cos_sin(&self, position_ids: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let freqs = position_ids.to_kind(Kind::Float).unsqueeze(-1) * &self.inv_freq; // (B, S, D/2)
        let emb = Tensor::cat(&[&freqs, &freqs], -1); // (B, S, D)
        (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[x.dim() - 1];
    let x1 = x.narrow(-1, 0, d / 2);
    let x2 = x.narrow(-1, d / 2, d - d / 2);
    Tensor::cat(&[&(-x2), &x1], -1)
}

/// q/k (B, H, S, D), cos/sin (B, S, D).
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (c, s) = (cos.unsqueeze(1), sin.unsqueeze(1)); // (B, 1, S, D)
    x * c + rotate_half(x) * s
}

/// Everything a decoder layer needs besides its hidden states.
pub struct TextContext {
    pub cos: Tensor, // (B, S, D)
    pub sin: Tensor, // (B, S, D)
    /// Causal + padding mask over (S, S_past + S).
    pub self_mask: AttnMask,
    /// Projected vision states (B, images * tiles * patches, H), when this step brings images.
    pub cross_states: Option<Tensor>,
    /// Cross-attention mask over (S, images * tiles * patches).
    pub cross_mask: Option<AttnMask>,
    /// (B, 1, S, 1): 0 for text rows that see no image tile.
    pub full_text_row_mask: Option<Tensor>,
    /// (B, 1, 1): 0 for a sample without an image in a batch whose other samples have one (`None`
    /// when every sample has one). transformers skips the cross-attention layers for text-only
    /// input (its processor refuses mixed batches); here such a sample gets their zero update, so
    /// it trains and generates as it does alone instead of attending to a blank image.
    pub image_samples: Option<Tensor>,
}

#[derive(Debug)]
pub struct SelfAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub attention: AttentionImpl,
}

/// q/k/v/o projections of a text attention layer (self- or cross-): GQA shapes from the config, no bias.
fn attention_projections(ld: &mut Loader, p: &str, c: &TextConfig) -> [Linear; 4] {
    let (h, d) = (c.hidden_size, c.head_dim());
    let (q, kv) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    [
        ("q_proj", q, h),
        ("k_proj", kv, h),
        ("v_proj", kv, h),
        ("o_proj", h, q),
    ]
    .map(|(name, out, inp)| linear(ld, &format!("{p}.{name}"), out, inp, false))
}

impl SelfAttention {
    fn load(ld: &mut Loader, p: &str, c: &TextConfig, attention: AttentionImpl) -> Self {
        let d = c.head_dim();
        let [q_proj, k_proj, v_proj, o_proj] = attention_projections(ld, p, c);
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: d,
            attention,
        }
    }

    /// x (B, S, H) -> (B, S, H); appends this step's K/V to `cache` when given.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &TextContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, ModelError> {
        let q = project_heads(&self.q_proj, x, self.num_heads, self.head_dim); // (B, H, S, D)
        let k = project_heads(&self.k_proj, x, self.num_kv_heads, self.head_dim); // (B, Hk, S, D)
        let v = project_heads(&self.v_proj, x, self.num_kv_heads, self.head_dim); // (B, Hk, S, D)
        let q = apply_rope(&q, &ctx.cos, &ctx.sin);
        let k = apply_rope(&k, &ctx.cos, &ctx.sin);
        let (k, v) = match cache {
            Some(c) => c.append(k, v), // (B, Hk, S_past + S, D)
            None => (k, v),
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let o = attend(self.attention, &q, &k, &v, &ctx.self_mask, scale)?; // (B, H, S, D)
        Ok(self.o_proj.forward(&merge_heads(&o))) // (B, S, H*D) -> (B, S, H)
    }

    fn visit(&self, f: &mut ParamVisitor) {
        for l in [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj] {
            visit_linear(l, f);
        }
    }
    fn visit_linears(&mut self, f: &mut LinearVisitor) {
        for l in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ] {
            f(l);
        }
    }
}

#[derive(Debug)]
pub struct CrossAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: RmsNorm,
    pub k_norm: RmsNorm,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
    pub attention: AttentionImpl,
}

impl CrossAttention {
    fn load(ld: &mut Loader, p: &str, c: &TextConfig, attention: AttentionImpl) -> Self {
        let d = c.head_dim();
        let [q_proj, k_proj, v_proj, o_proj] = attention_projections(ld, p, c);
        Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            q_norm: rms(ld, &format!("{p}.q_norm"), d, c.rms_norm_eps),
            k_norm: rms(ld, &format!("{p}.k_norm"), d, c.rms_norm_eps),
            num_heads: c.num_attention_heads,
            num_kv_heads: c.num_key_value_heads,
            head_dim: d,
            attention,
        }
    }

    /// x (B, S, H) -> (B, S, H). K/V come from `ctx.cross_states` (stored into `cache` when given) or, when this
    /// step brings no image, from `cache`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &TextContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, ModelError> {
        let q = project_heads(&self.q_proj, x, self.num_heads, self.head_dim); // (B, H, S, D)
        let q = self.q_norm.forward(&q);
        let (k, v) = match (&ctx.cross_states, cache) {
            (Some(cs), cache) => {
                let k = project_heads(&self.k_proj, cs, self.num_kv_heads, self.head_dim); // (B, Hk, N, D)
                let v = project_heads(&self.v_proj, cs, self.num_kv_heads, self.head_dim); // (B, Hk, N, D)
                let k = self.k_norm.forward(&k);
                if let Some(c) = cache {
                    // (transformers appends a later image's K/V to the cached ones and extends
                    // the mask; replacing them would drop the earlier image without a word)
                    if c.get().is_some() {
                        return Err(ModelError::Input(
                            "images given to a step whose cache already holds an earlier image's cross-attention K/V (appending them is not supported): pass a conversation's images at its first step, or start a new cache".into(),
                        ));
                    }
                    c.set(k.shallow_clone(), v.shallow_clone());
                }
                (k, v)
            }
            (None, Some(c)) => c.get().ok_or_else(|| {
                ModelError::Input(
                    "cross-attention layer has neither vision states nor cached K/V".into(),
                )
            })?,
            (None, None) => {
                return Err(ModelError::Input(
                    "cross-attention layer called without vision states".into(),
                ))
            }
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let none = AttnMask::default();
        let o = attend(
            self.attention,
            &q,
            &k,
            &v,
            ctx.cross_mask.as_ref().unwrap_or(&none),
            scale,
        )?; // (B, H, S, D)
        Ok(self.o_proj.forward(&merge_heads(&o))) // (B, S, H*D) -> (B, S, H)
    }

    fn visit(&self, f: &mut ParamVisitor) {
        for l in [&self.q_proj, &self.k_proj, &self.v_proj, &self.o_proj] {
            visit_linear(l, f);
        }
        f(
            &format!("{}.weight", self.q_proj.path.replace("q_proj", "q_norm")),
            &self.q_norm.weight,
        );
        f(
            &format!("{}.weight", self.q_proj.path.replace("q_proj", "k_norm")),
            &self.k_norm.weight,
        );
    }
    fn visit_linears(&mut self, f: &mut LinearVisitor) {
        for l in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
        ] {
            f(l);
        }
    }
}

/// SwiGLU MLP: down(act(gate(x)) * up(x)).
#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    fn load(ld: &mut Loader, p: &str, c: &TextConfig) -> Self {
        Self {
            gate_proj: linear(
                ld,
                &format!("{p}.gate_proj"),
                c.intermediate_size,
                c.hidden_size,
                false,
            ),
            up_proj: linear(
                ld,
                &format!("{p}.up_proj"),
                c.intermediate_size,
                c.hidden_size,
                false,
            ),
            down_proj: linear(
                ld,
                &format!("{p}.down_proj"),
                c.hidden_size,
                c.intermediate_size,
                false,
            ),
            act: c.hidden_act,
        }
    }
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let g = self.act.apply(&self.gate_proj.forward(x)); // (B, S, I)
        self.down_proj.forward(&(g * self.up_proj.forward(x)))
    }
    fn visit(&self, f: &mut ParamVisitor) {
        for l in [&self.gate_proj, &self.up_proj, &self.down_proj] {
            visit_linear(l, f);
        }
    }
    fn visit_linears(&mut self, f: &mut LinearVisitor) {
        for l in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            f(l);
        }
    }
}

/// `MllamaSelfAttentionDecoderLayer`.
#[derive(Debug)]
pub struct SelfAttentionDecoderLayer {
    pub prefix: String,
    pub self_attn: SelfAttention,
    pub mlp: Mlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl SelfAttentionDecoderLayer {
    /// hidden (B, S, H) -> (B, S, H).
    pub fn forward(
        &self,
        hidden: &Tensor,
        ctx: &TextContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, ModelError> {
        let h = hidden
            + self
                .self_attn
                .forward(&self.input_layernorm.forward(hidden), ctx, cache)?;
        Ok(&h + self.mlp.forward(&self.post_attention_layernorm.forward(&h)))
    }
}

/// `MllamaCrossAttentionDecoderLayer`.
#[derive(Debug)]
pub struct CrossAttentionDecoderLayer {
    pub prefix: String,
    pub cross_attn: CrossAttention,
    pub input_layernorm: RmsNorm,
    pub cross_attn_attn_gate: Tensor, // (1,)
    pub mlp: Mlp,
    pub post_attention_layernorm: RmsNorm,
    pub cross_attn_mlp_gate: Tensor, // (1,)
}

impl CrossAttentionDecoderLayer {
    /// hidden (B, S, H) -> (B, S, H).
    pub fn forward(
        &self,
        hidden: &Tensor,
        ctx: &TextContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, ModelError> {
        let a = self
            .cross_attn
            .forward(&self.input_layernorm.forward(hidden), ctx, cache)?; // (B, S, H)
        let a = match &ctx.image_samples {
            Some(keep) => a * keep, // (B, S, H) * (B, 1, 1)
            None => a,
        };
        let h = hidden + self.cross_attn_attn_gate.tanh() * a;
        let mut m = self.mlp.forward(&self.post_attention_layernorm.forward(&h)); // (B, S, H)
        if let Some(row) = &ctx.full_text_row_mask {
            m = row.select(1, 0) * m; // (B, S, 1) * (B, S, H)
        }
        Ok(&h + self.cross_attn_mlp_gate.tanh() * m)
    }
}

#[derive(Debug)]
pub enum DecoderLayer {
    SelfAttn(SelfAttentionDecoderLayer),
    CrossAttn(CrossAttentionDecoderLayer),
}

impl DecoderLayer {
    pub fn forward(
        &self,
        hidden: &Tensor,
        ctx: &TextContext,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor, ModelError> {
        match self {
            Self::SelfAttn(l) => l.forward(hidden, ctx, cache),
            Self::CrossAttn(l) => l.forward(hidden, ctx, cache),
        }
    }

    pub fn is_cross(&self) -> bool {
        matches!(self, Self::CrossAttn(_))
    }

    pub fn visit(&self, f: &mut ParamVisitor) {
        match self {
            Self::SelfAttn(l) => {
                l.self_attn.visit(f);
                l.mlp.visit(f);
                f(
                    &format!("{}.input_layernorm.weight", l.prefix),
                    &l.input_layernorm.weight,
                );
                f(
                    &format!("{}.post_attention_layernorm.weight", l.prefix),
                    &l.post_attention_layernorm.weight,
                );
            }
            Self::CrossAttn(l) => {
                l.cross_attn.visit(f);
                l.mlp.visit(f);
                f(
                    &format!("{}.input_layernorm.weight", l.prefix),
                    &l.input_layernorm.weight,
                );
                f(
                    &format!("{}.post_attention_layernorm.weight", l.prefix),
                    &l.post_attention_layernorm.weight,
                );
                f(
                    &format!("{}.cross_attn_attn_gate", l.prefix),
                    &l.cross_attn_attn_gate,
                );
                f(
                    &format!("{}.cross_attn_mlp_gate", l.prefix),
                    &l.cross_attn_mlp_gate,
                );
            }
        }
    }

    pub fn visit_linears(&mut self, f: &mut LinearVisitor) {
        match self {
            Self::SelfAttn(l) => {
                l.self_attn.visit_linears(f);
                l.mlp.visit_linears(f);
            }
            Self::CrossAttn(l) => {
                l.cross_attn.visit_linears(f);
                l.mlp.visit_linears(f);
            }
        }
    }
}

/// `MllamaTextModel` (without the LM head).
#[derive(Debug)]
pub struct TextModel {
    pub config: TextConfig,
    pub embed_tokens: Tensor, // (V + 8, H)
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    pub rotary: Rotary,
}

pub const PREFIX: &str = "model.language_model";

impl TextModel {
    pub fn load(ld: &mut Loader, c: &TextConfig, attention: AttentionImpl) -> Self {
        let embed_tokens = ld.get(
            &format!("{PREFIX}.embed_tokens.weight"),
            &[c.vocab_size + 8, c.hidden_size],
        );
        let mut layers = vec![];
        for i in 0..c.num_hidden_layers {
            let p = format!("{PREFIX}.layers.{i}");
            let input_layernorm = rms(
                ld,
                &format!("{p}.input_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            );
            let post_attention_layernorm = rms(
                ld,
                &format!("{p}.post_attention_layernorm"),
                c.hidden_size,
                c.rms_norm_eps,
            );
            let mlp = Mlp::load(ld, &format!("{p}.mlp"), c);
            layers.push(if c.is_cross_attention_layer(i) {
                DecoderLayer::CrossAttn(CrossAttentionDecoderLayer {
                    cross_attn: CrossAttention::load(ld, &format!("{p}.cross_attn"), c, attention),
                    cross_attn_attn_gate: ld.get(&format!("{p}.cross_attn_attn_gate"), &[1]),
                    cross_attn_mlp_gate: ld.get(&format!("{p}.cross_attn_mlp_gate"), &[1]),
                    prefix: p,
                    input_layernorm,
                    mlp,
                    post_attention_layernorm,
                })
            } else {
                DecoderLayer::SelfAttn(SelfAttentionDecoderLayer {
                    self_attn: SelfAttention::load(ld, &format!("{p}.self_attn"), c, attention),
                    prefix: p,
                    mlp,
                    input_layernorm,
                    post_attention_layernorm,
                })
            });
        }
        let norm = rms(ld, &format!("{PREFIX}.norm"), c.hidden_size, c.rms_norm_eps);
        let rotary = Rotary::new(c, ld.device());
        Self {
            config: c.clone(),
            embed_tokens,
            layers,
            norm,
            rotary,
        }
    }

    /// input_ids (B, S) -> (B, S, H).
    pub fn embed(&self, input_ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed_tokens, input_ids, -1, false, false)
    }

    /// Runs the decoder stack. hidden (B, S, H) -> normed (B, S, H). Cross-attention layers are skipped when this
    /// step brings no vision states and the cache holds none (text-only input), as transformers does.
    pub fn forward_layers(
        &self,
        mut hidden: Tensor,
        ctx: &TextContext,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        for (i, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            if layer.is_cross()
                && ctx.cross_states.is_none()
                && !slot.as_ref().is_some_and(|s| s.is_set())
            {
                continue;
            }
            hidden = layer.forward(&hidden, ctx, slot)?;
        }
        Ok(self.norm.forward(&hidden))
    }

    pub fn visit(&self, f: &mut ParamVisitor) {
        f(&format!("{PREFIX}.embed_tokens.weight"), &self.embed_tokens);
        for l in &self.layers {
            l.visit(f);
        }
        f(&format!("{PREFIX}.norm.weight"), &self.norm.weight);
    }
}

/// Additive causal + padding mask (B, 1, S, S_past + S): query i (cache position past + i) sees key j when
/// j <= past + i and `attention_mask[b, j]` is 1 (transformers' `create_causal_mask`).
/// attention_mask (B, S_past + S) of 0/1, or None for no padding.
pub fn causal_mask(
    attention_mask: Option<&Tensor>,
    b: i64,
    s: i64,
    past: i64,
    kind: Kind,
    device: Device,
) -> Tensor {
    let kv = past + s;
    let q_idx = Tensor::arange_start(past, past + s, (Kind::Int64, device)).view([s, 1]); // (S, 1)
    let k_idx = Tensor::arange(kv, (Kind::Int64, device)).view([1, kv]); // (1, KV)
    let mut allowed = k_idx
        .le_tensor(&q_idx)
        .view([1, 1, s, kv])
        .expand([b, 1, s, kv], false); // (B, 1, S, KV)
    if let Some(am) = attention_mask {
        allowed = allowed.logical_and(&am.ne(0).view([b, 1, 1, kv]));
    }
    Tensor::zeros([b, 1, s, kv], (kind, device))
        .masked_fill(&allowed.logical_not(), dtype_min(kind))
}

/// The self-attention mask for `imp`: dense [`causal_mask`] for eager (and sdpa with padding or a cache); for sdpa
/// without padding or cache only the causal flag, as transformers' `sdpa_mask` does (libtorch's flash kernel then
/// skips the future blocks and reads no mask); causal + key_keep for fused (rows that see no key, i.e. padded
/// queries under left padding, give 0 there instead of transformers' uniform average).
pub fn self_attention_mask(
    imp: AttentionImpl,
    attention_mask: Option<&Tensor>,
    b: i64,
    s: i64,
    past: i64,
    kind: Kind,
    device: Device,
) -> AttnMask {
    match imp {
        AttentionImpl::Fused => AttnMask {
            causal: true,
            key_keep: attention_mask.map(|a| a.ne(0).view([b, past + s])),
            ..Default::default()
        },
        AttentionImpl::Sdpa
            if past == 0 && attention_mask.is_none_or(|a| a.ne(0).all().int64_value(&[]) != 0) =>
        {
            AttnMask {
                causal: true,
                ..Default::default()
            }
        }
        _ => AttnMask::dense(causal_mask(attention_mask, b, s, past, kind, device)),
    }
}
