//! Shared building blocks: attention implementations, RMSNorm, LayerNorm, additive-mask helpers.
use tch::{Kind, Tensor};

use super::lora::Linear;
use super::ModelError;

/// Attention implementation (`model.attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// matmul + softmax in fp32 (transformers' `eager_attention_forward`): the reference.
    Eager,
    /// libtorch `scaled_dot_product_attention` (GQA without copying K/V).
    #[default]
    Sdpa,
    /// The kernels crate's fused attention (CUDA only).
    Fused,
}

impl std::str::FromStr for AttentionImpl {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        match s {
            "eager" => Ok(Self::Eager),
            "sdpa" => Ok(Self::Sdpa),
            "fused" => Ok(Self::Fused),
            other => Err(ModelError::Config(format!(
                "model.attention: `{other}` (expected eager, sdpa or fused)"
            ))),
        }
    }
}

/// `torch.finfo(kind).min`: the additive "masked" value transformers uses.
pub fn dtype_min(kind: Kind) -> f64 {
    match kind {
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Half => -65504.0,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// A mask in the form the chosen implementation wants: an additive tensor for eager/sdpa (transformers' masks,
/// bit for bit), or the structured parts the fused kernel takes (`kernels::attention::AttentionMask`).
#[derive(Debug, Default)]
pub struct AttnMask {
    /// Additive (B, 1, Sq, Sk): 0 = attend, dtype min = masked (eager, sdpa).
    pub dense: Option<Tensor>,
    /// Fused: key j visible to query i iff j <= i + (Sk - Sq).
    pub causal: bool,
    /// Fused: (B, Sk) keys kept.
    pub key_keep: Option<Tensor>,
    /// Fused: (B, Sq) rows to which `key_keep` applies (others see every key).
    pub query_flags: Option<Tensor>,
    /// Fused: ((B, Sq, nblk) allowed blocks, block size).
    pub block: Option<(Tensor, i64)>,
}

impl AttnMask {
    pub fn dense(t: Tensor) -> Self {
        Self {
            dense: Some(t),
            ..Default::default()
        }
    }
}

/// x (B, S, in) through `proj`, split into heads: (B, heads, S, head_dim).
pub fn project_heads(proj: &Linear, x: &Tensor, heads: i64, head_dim: i64) -> Tensor {
    let b = x.size()[0];
    proj.forward(x)
        .view([b, -1, heads, head_dim])
        .transpose(1, 2)
}

/// Attention output (B, H, S, D) back to (B, S, H*D) for the output projection.
pub fn merge_heads(o: &Tensor) -> Tensor {
    let z = o.size(); // (B, H, S, D)
    o.transpose(1, 2).reshape([z[0], z[2], z[1] * z[3]])
}

/// Attention over q (B, H, Sq, D), k/v (B, Hk, Sk, D) with `mask`. Returns (B, H, Sq, D).
pub fn attend(
    imp: AttentionImpl,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttnMask,
    scale: f64,
) -> Result<Tensor, ModelError> {
    let (h, hk) = (q.size()[1], k.size()[1]);
    match imp {
        AttentionImpl::Eager => {
            let (k, v) = (repeat_kv(k, h / hk), repeat_kv(v, h / hk));
            let w = q.matmul(&k.transpose(2, 3)) * scale; // (B, H, Sq, Sk)
            let w = match &mask.dense {
                Some(m) => w + m,
                None => w,
            };
            let p = w.softmax(-1, Kind::Float).to_kind(q.kind());
            Ok(p.matmul(&v))
        }
        AttentionImpl::Sdpa => Ok(Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            mask.dense.as_ref(),
            0.0,
            false,
            scale,
            h != hk,
        )),
        AttentionImpl::Fused => {
            let m = kernels::attention::AttentionMask {
                causal: mask.causal,
                key_keep: mask.key_keep.as_ref(),
                query_flags: mask.query_flags.as_ref(),
                block_mask: mask.block.as_ref().map(|(t, n)| (t, *n)),
            };
            // with a gradient: the output becomes a leaf on the FSDP schedule's tape (attn_tape.rs)
            super::attn_tape::attend(q, k, v, &m, scale)
        }
    }
}

/// (B, Hk, S, D) -> (B, Hk * n, S, D), each kv head repeated n times (transformers' `repeat_kv`).
pub fn repeat_kv(x: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        return x.shallow_clone();
    }
    let s = x.size();
    x.unsqueeze(2)
        .expand([s[0], s[1], n, s[2], s[3]], false)
        .reshape([s[0], s[1] * n, s[2], s[3]])
}

/// Llama RMSNorm: computed in fp32, cast back, then scaled by the weight.
#[derive(Debug)]
pub struct RmsNorm {
    pub weight: Tensor, // (H,)
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let y = (xf * (var + self.eps).rsqrt()).to_kind(kind);
        &self.weight * y
    }
}

/// LayerNorm with weight and bias.
#[derive(Debug)]
pub struct LayerNorm {
    pub weight: Tensor, // (H,)
    pub bias: Tensor,   // (H,)
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.weight.size()[0];
        x.layer_norm([h], Some(&self.weight), Some(&self.bias), self.eps, false)
    }
}
