//! Shared building blocks: attention implementations, RMSNorm, LayerNorm, additive-mask helpers.
use tch::{Kind, Tensor};

use super::lora::Linear;
use super::ModelError;

/// Attention implementation (`model.attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    /// matmul + softmax in fp32 (transformers' `eager_attention_forward`): the reference.
    Eager,
    /// libtorch `scaled_dot_product_attention` (GQA without copying K/V, except for masked calls
    /// on CUDA: see `sdpa_call`).
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
    /// Sdpa: (R,) i64, the only query rows where `dense` masks anything (in any batch entry); the other rows run
    /// without the mask (see [`AttnMask::dense_rows`]).
    pub masked_rows: Option<Tensor>,
    /// Key j visible to query i iff j <= i + (Sk - Sq). Fused; and eager/sdpa when `dense` is None.
    pub causal: bool,
    /// Fused: (B, Sk) keys kept.
    pub key_keep: Option<Tensor>,
    /// Fused: (B, Sq) rows to which `key_keep` applies (others see every key).
    pub query_flags: Option<Tensor>,
    /// Fused: ((B, Sq, nblk) allowed blocks, block size).
    pub block: Option<(Tensor, i64)>,
    /// Sdpa and fused: bool broadcastable to (B, 1, Sq, 1), the rows whose every key is masked
    /// (a vision image without one real tile: the padding image slot of a sample with fewer
    /// images, or of a text-only sample in an image batch; every image when the patch count is a
    /// multiple of 8, through transformers' `[-0:]`). Their output is the mean of V, which is what
    /// the masked softmax gives (uniform weights), computed so that no gradient reaches Q or K
    /// through them: the forward does not depend on Q or K there, yet libtorch's CPU sdpa backward
    /// gives such rows gradients 40-260x eager's (its saved logsumexp absorbs log(Sk) into
    /// finfo.min), and the fused kernels give them zeros. Set by [`AttnMask::dense_rows`] and the
    /// vision tower's fused mask; eager keeps transformers' arithmetic.
    pub fully_masked: Option<Tensor>,
}

impl AttnMask {
    pub fn dense(t: Tensor) -> Self {
        Self {
            dense: Some(t),
            ..Default::default()
        }
    }

    /// The additive mask `t` (B, 1, Sq, Sk) with the query rows that mask anything listed, for sdpa: the vision
    /// tower's aspect-ratio mask masks only its padding rows (28 of 1056 for four real tiles), and the
    /// cross-attention mask only rows that miss a tile, yet a dense mask makes libtorch's CPU flash kernel read
    /// and add it for every row (~8% of the vision attention's time). No row masked: no mask at all. Most rows
    /// masked: the plain dense mask (splitting would not pay). Eager ignores the list and adds `t` as before.
    pub fn dense_rows(t: Tensor) -> Self {
        let sq = t.size()[2];
        // one pass over the mask: its entries are 0 (attend) or dtype min (masked)
        let masked = t.ne(0); // (B, 1, Sq, Sk)
        let full = masked.all_dim(3, true); // (B, 1, Sq, 1)
        let fully_masked = bool::try_from(full.any()).unwrap_or(true).then_some(full);
        let rows = masked
            .any_dim(3, false)
            .any_dim(1, false)
            .any_dim(0, false)
            .nonzero()
            .squeeze_dim(1); // (R,)
        let r = rows.size()[0];
        if r == 0 {
            Self::default()
        } else if 2 * r > sq {
            Self {
                fully_masked,
                ..Self::dense(t)
            }
        } else {
            Self {
                dense: Some(t),
                masked_rows: Some(rows),
                fully_masked,
                ..Default::default()
            }
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
                None if mask.causal => {
                    let (sq, sk) = (q.size()[2], k.size()[2]);
                    let future = Tensor::ones([sq, sk], (Kind::Bool, q.device())).triu(sk - sq + 1); // (Sq, Sk)
                    w.masked_fill(&future, dtype_min(w.kind()))
                }
                None => w,
            };
            let p = w.softmax(-1, Kind::Float).to_kind(q.kind());
            Ok(p.matmul(&v))
        }
        AttentionImpl::Sdpa => {
            let avoid_gqa = avoid_gqa_with_mask(q.device());
            let sdpa = |q: &Tensor, m: Option<&Tensor>, causal: bool| {
                sdpa_call(q, k, v, m, causal, scale, avoid_gqa)
            };
            let out = match (&mask.dense, &mask.masked_rows) {
                // every row without the mask, then the masked rows again with their mask rows
                (Some(m), Some(rows)) => {
                    let all = sdpa(q, None, false); // (B, H, Sq, D)
                    let q_rows = q.index_select(2, rows); // (B, H, R, D)
                    let m_rows = m.index_select(2, rows); // (B, 1, R, Sk)
                    all.index_copy(2, rows, &sdpa(&q_rows, Some(&m_rows), false))
                }
                (Some(m), None) => sdpa(q, Some(m), false),
                // libtorch's causal flag is top-left aligned: the same as ours only when Sq == Sk
                (None, _) if mask.causal && q.size()[2] != k.size()[2] => {
                    return Err(ModelError::Attention(format!(
                        "a causal mask without a dense mask needs as many queries as keys (found {} and {}); \
                         build the mask with text::causal_mask",
                        q.size()[2],
                        k.size()[2]
                    )))
                }
                (None, _) => sdpa(q, None, mask.causal),
            };
            Ok(mean_v_where_fully_masked(out, mask, v, h / hk))
        }
        AttentionImpl::Fused => {
            let m = kernels::attention::AttentionMask {
                causal: mask.causal,
                key_keep: mask.key_keep.as_ref(),
                query_flags: mask.query_flags.as_ref(),
                block_mask: mask.block.as_ref().map(|(t, n)| (t, *n)),
            };
            // with a gradient: the output becomes a leaf on the FSDP schedule's tape (attn_tape.rs)
            let out = super::attn_tape::attend(q, k, v, &m, scale)?;
            Ok(mean_v_where_fully_masked(out, mask, v, h / hk))
        }
    }
}

/// Whether masked calls with grouped K/V heads avoid libtorch's sdpa `enable_gqa` (see
/// `sdpa_call`). On CUDA, libtorch's flash kernel takes no mask and its memory-efficient kernel no
/// grouped heads, so such a call falls to the math kernel, which repeats K/V internally and
/// materializes the (B, H, Sq, Sk) scores (the cross-attention layers always have a mask, and
/// padded batches a self-attention one). libtorch's CPU kernels take both.
fn avoid_gqa_with_mask(device: tch::Device) -> bool {
    device.is_cuda()
}

/// Query rows times query heads per K/V head up to which `sdpa_call` computes a masked
/// grouped-head call as [`grouped_attention`] instead of repeating K/V: decode steps (one row per
/// sequence) and short prefixes, whose scores are small, where repeating the whole K/V cache (4x
/// for Llama 3's 32 / 8 heads) in every layer for every token would move more bytes than the
/// attention itself reads.
const GROUPED_ROWS_MAX: i64 = 64;

/// libtorch sdpa over q (B, H, Sq, D), k/v (B, Hk, Sk, D): grouped heads without copying K/V
/// (`enable_gqa`), except for a masked call when `avoid_gqa` (`avoid_gqa_with_mask`): a few rows
/// go through [`grouped_attention`], more with K/V repeated to the query heads as transformers'
/// sdpa path does (`repeat_kv`), which the memory-efficient kernel takes. The same result each way.
fn sdpa_call(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    causal: bool,
    scale: f64,
    avoid_gqa: bool,
) -> Tensor {
    let (h, hk) = (q.size()[1], k.size()[1]);
    if let (Some(m), true) = (mask, h != hk && avoid_gqa && !causal) {
        if q.size()[2] * (h / hk) <= GROUPED_ROWS_MAX {
            return grouped_attention(q, k, v, m, scale);
        }
        let (k, v) = (repeat_kv(k, h / hk), repeat_kv(v, h / hk)); // (B, H, Sk, D)
        return Tensor::scaled_dot_product_attention(q, &k, &v, mask, 0.0, false, scale, false);
    }
    Tensor::scaled_dot_product_attention(q, k, v, mask, 0.0, causal, scale, h != hk)
}

/// Attention over q (B, H, Sq, D) and k/v (B, Hk, Sk, D) with the additive `mask` (B, 1, Sq, Sk)
/// for a few query rows: the G = H / Hk query heads of each K/V head as G * Sq rows of one matmul
/// against that head's keys (query head i reads K/V head i / G, as `repeat_kv` and `enable_gqa`),
/// so K and V are read in place. Q K^T in the model dtype, then cast, masked and softmaxed in fp32,
/// as eager. `mask` has one head (its dimension 1 is broadcast). Returns (B, H, Sq, D).
fn grouped_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
    let (b, h, sq, d) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
    let (hk, sk) = (k.size()[1], k.size()[2]);
    let g = h / hk;
    let rows = q.reshape([b, hk, g * sq, d]); // head hk * g + j's rows at j * Sq ..
    let scores = (rows.matmul(&k.transpose(-2, -1)).to_kind(Kind::Float) * scale)
        .reshape([b, hk, g, sq, sk])
        + mask.to_kind(Kind::Float).unsqueeze(1); // (B, Hk, G, Sq, Sk)
    let p = scores.softmax(-1, Kind::Float).to_kind(q.kind());
    p.reshape([b, hk, g * sq, sk])
        .matmul(v)
        .reshape([b, h, sq, d])
}

/// `out` (B, H, Sq, D) with the rows of `mask.fully_masked` replaced by the mean of V (B, Hk, Sk,
/// D) over the keys: what the masked softmax gives them, with no gradient into Q or K (sdpa's
/// backward there is garbage; the fused kernels' own output there is zeros).
fn mean_v_where_fully_masked(out: Tensor, mask: &AttnMask, v: &Tensor, groups: i64) -> Tensor {
    match &mask.fully_masked {
        // (B, H, 1, D) broadcast over the fully masked rows
        Some(full) => out.where_self(
            &full.logical_not(),
            &repeat_kv(&v.mean_dim(2, true, None), groups),
        ),
        None => out,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// (output, dq, dk, dv) of `attend` with `mask` on fresh leaves.
    fn run(imp: AttentionImpl, qkv: [&Tensor; 3], mask: &AttnMask) -> [Tensor; 4] {
        let [q, k, v] = qkv.map(|t| t.detach().set_requires_grad(true));
        let o = attend(imp, &q, &k, &v, mask, 0.125).unwrap();
        (&o * o.ones_like().cumsum(-1, Kind::Float))
            .sum(Kind::Float)
            .backward();
        [o.detach(), q.grad(), k.grad(), v.grad()]
    }

    fn assert_close(a: &[Tensor; 4], b: &[Tensor; 4], what: &str) {
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let err = (x - y).abs().max().double_value(&[]);
            assert!(err <= 1e-5, "{what}: tensor {i} differs by {err}");
        }
    }

    fn qkv(sq: i64, sk: i64) -> [Tensor; 3] {
        let opts = (Kind::Float, Device::Cpu);
        // 4 query heads over 2 key/value heads (GQA)
        [
            Tensor::randn([2, 4, sq, 8], opts),
            Tensor::randn([2, 2, sk, 8], opts),
            Tensor::randn([2, 2, sk, 8], opts),
        ]
    }

    /// The CUDA forms of a masked grouped-head call give what `enable_gqa` gives, forward and
    /// backward (query head i reads K/V head i / (H / Hk) in each): 6 rows x 2 heads per K/V head
    /// through `grouped_attention`, 40 x 2 with K/V repeated.
    #[test]
    fn sdpa_with_a_mask_and_grouped_heads_matches_enable_gqa_in_its_cuda_forms() {
        tch::manual_seed(5);
        for sq in [6, 40] {
            let [q, k, v] = qkv(sq, 9);
            let keep = Tensor::rand([2, 1, sq, 9], (Kind::Float, Device::Cpu)).gt(0.3);
            let mask = keep.logical_not().to_kind(Kind::Float) * dtype_min(Kind::Float); // (2, 1, Sq, 9)
            let grads = |avoid_gqa: bool| {
                let [q, k, v] = [&q, &k, &v].map(|t| t.detach().set_requires_grad(true));
                let o = sdpa_call(&q, &k, &v, Some(&mask), false, 0.125, avoid_gqa);
                (&o * o.ones_like().cumsum(-1, Kind::Float))
                    .sum(Kind::Float)
                    .backward();
                [o.detach(), q.grad(), k.grad(), v.grad()]
            };
            // relative: with 40 rows the summed gradients reach ~100, fp32 sums in another order
            for (i, (x, y)) in grads(true).iter().zip(grads(false).iter()).enumerate() {
                let scale = y.abs().max().double_value(&[]).max(1.0);
                let err = (x - y).abs().max().double_value(&[]) / scale;
                assert!(
                    err <= 1e-6,
                    "sq {sq}: CUDA form vs enable_gqa, tensor {i}: {err} relative"
                );
            }
        }
        // (the two sizes take the two forms)
        const _: () = assert!(6 * 2 <= GROUPED_ROWS_MAX && 40 * 2 > GROUPED_ROWS_MAX);
        assert!(avoid_gqa_with_mask(Device::Cuda(0)) && !avoid_gqa_with_mask(Device::Cpu));
    }

    #[test]
    fn sdpa_with_masked_rows_listed_matches_the_dense_mask() {
        tch::manual_seed(0);
        let [q, k, v] = qkv(12, 12);
        // as the vision tower's mask: (query, key) masked when both are flagged; batch entries differ
        let flags = Tensor::from_slice(&[0f32, 0., 1., 0., 0., 0., 0., 0., 0., 0., 1., 1.])
            .view([1, 12, 1])
            .repeat([2, 1, 1]);
        let _ = flags.get(1).narrow(0, 4, 1).fill_(1.0);
        let t = (flags.matmul(&flags.transpose(1, 2)) * dtype_min(Kind::Float)).unsqueeze(1); // (2, 1, 12, 12)
        let split = AttnMask::dense_rows(t.copy());
        let rows = Vec::<i64>::try_from(split.masked_rows.as_ref().unwrap()).unwrap();
        assert_eq!(rows, [2, 4, 10, 11]);
        let reference = run(
            AttentionImpl::Sdpa,
            [&q, &k, &v],
            &AttnMask::dense(t.copy()),
        );
        assert_close(
            &run(AttentionImpl::Sdpa, [&q, &k, &v], &split),
            &reference,
            "sdpa, masked rows",
        );
        assert_close(
            &run(AttentionImpl::Eager, [&q, &k, &v], &split),
            &reference,
            "eager, masked rows",
        );
        // nothing masked: no mask at all; most rows masked: the plain dense mask
        assert!(AttnMask::dense_rows(t.zeros_like()).dense.is_none());
        let most = AttnMask::dense_rows(t.full_like(dtype_min(Kind::Float)));
        assert!(most.dense.is_some() && most.masked_rows.is_none());
    }

    /// A batch entry whose every position is padding (a vision image without one real patch):
    /// sdpa gives the masked softmax's forward there (the mean of V) and the gradient of what it
    /// computes, which does not depend on Q or K on those rows (libtorch's sdpa backward alone
    /// gives large garbage). Reference: eager with those rows replaced by the mean of V.
    #[test]
    fn sdpa_rows_with_every_key_masked_give_the_mean_of_v_and_no_q_gradient() {
        tch::manual_seed(2);
        let [q, k, v] = qkv(12, 12);
        // entry 0: positions 2, 10, 11 are padding; entry 1: every position is
        let flags = Tensor::from_slice(&[0f32, 0., 1., 0., 0., 0., 0., 0., 0., 0., 1., 1.])
            .view([1, 12, 1])
            .repeat([2, 1, 1]);
        let _ = flags.get(1).fill_(1.0);
        let t = (flags.matmul(&flags.transpose(1, 2)) * dtype_min(Kind::Float)).unsqueeze(1);
        let m = AttnMask::dense_rows(t.copy());
        let full = m.fully_masked.as_ref().expect("entry 1 is fully masked");
        let rows = Vec::<bool>::try_from(full.flatten(0, -1)).unwrap();
        assert_eq!(rows, [vec![false; 12], vec![true; 12]].concat());
        let got = run(AttentionImpl::Sdpa, [&q, &k, &v], &m);
        let reference = {
            let [q, k, v] = [&q, &k, &v].map(|t| t.detach().set_requires_grad(true));
            let o = attend(
                AttentionImpl::Eager,
                &q,
                &k,
                &v,
                &AttnMask::dense(t.copy()),
                0.125,
            )
            .unwrap();
            let mean_v = repeat_kv(&v.mean_dim(2, true, None), 2);
            let o = o.where_self(&full.logical_not(), &mean_v);
            (&o * o.ones_like().cumsum(-1, Kind::Float))
                .sum(Kind::Float)
                .backward();
            [o.detach(), q.grad(), k.grad(), v.grad()]
        };
        assert_close(&got, &reference, "sdpa, fully masked rows");
        // the forward is the masked softmax's (eager's own output)
        let eager = run(AttentionImpl::Eager, [&q, &k, &v], &AttnMask::dense(t));
        let err = (&got[0] - &eager[0]).abs().max().double_value(&[]);
        assert!(err <= 1e-5, "forward differs from eager by {err}");
        assert_eq!(
            got[1].get(1).abs().max().double_value(&[]),
            0.0,
            "dQ of entry 1"
        );
    }

    #[test]
    fn causal_flag_matches_the_dense_causal_mask() {
        tch::manual_seed(1);
        let [q, k, v] = qkv(9, 9);
        let dense = AttnMask::dense(super::super::text::causal_mask(
            None,
            2,
            9,
            0,
            Kind::Float,
            Device::Cpu,
        ));
        let flag = AttnMask {
            causal: true,
            ..Default::default()
        };
        for imp in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
            assert_close(
                &run(imp, [&q, &k, &v], &flag),
                &run(AttentionImpl::Eager, [&q, &k, &v], &dense),
                &format!("{imp:?}, causal flag"),
            );
        }
        // libtorch's flag is top-left aligned: refused when queries and keys differ in number
        let [q, k, v] = qkv(3, 9);
        assert!(attend(AttentionImpl::Sdpa, &q, &k, &v, &flag, 0.125).is_err());
    }
}
