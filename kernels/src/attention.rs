//! Fused attention (FlashAttention-2 style, `cuda/attention.cu`) and its slow fp64 reference.
//!
//! Shapes: q (B, H, Sq, D), k/v (B, Hk, Sk, D) with H % Hk == 0 (GQA without copying K/V); any
//! strides with D contiguous. Outputs are (B, H, Sq, D) views of (B, Sq, H, D) memory, the layout the
//! model transposes back to (B, Sq, H*D) for free. Masks: see `AttentionMask`.
use std::ffi::c_void;
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};

use cudarc::driver::sys;
use tch::{Device, Kind, Tensor};

use crate::runtime::{self, Gpu};
use crate::{tma, KernelError, Result};

/// Which (query, key) pairs may attend; all parts are optional and combined with AND.
#[derive(Default, Clone, Copy)]
pub struct AttentionMask<'a> {
    /// Key j visible to query i iff j <= i + (Sk - Sq) (bottom-right aligned, as with a KV cache).
    pub causal: bool,
    /// (B, Sk) bool/u8: false = key masked.
    pub key_keep: Option<&'a Tensor>,
    /// (B, Sq) bool/u8: when given, `key_keep` applies only to rows whose flag is set (Mllama's
    /// vision mask: padded queries do not see padded keys; real queries see every key).
    pub query_flags: Option<&'a Tensor>,
    /// ((B, Sq, nblk) bool/u8, block size): query i sees keys of block j/kblock only when set
    /// (Mllama's cross-attention: text token x image tile).
    pub block_mask: Option<(&'a Tensor, i64)>,
}

/// Forward result: `out` (B, H, Sq, D) and `lse` (B, H, Sq) fp32, log2-domain logsumexp of the
/// scaled scores (-inf for rows that see no key; their output is 0).
pub struct Forward {
    pub out: Tensor,
    pub lse: Tensor,
}

/// Gradients of q, k, v (same shapes as the inputs).
pub struct Backward {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Mirrors `AttnParams` in attention.cu field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    dout: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dq_acc: u64,
    delta: u64,
    key_keep: u64,
    q_flags: u64,
    block_mask: u64,
    mask_cells: u64,
    q_bs: i64,
    q_ss: i64,
    q_hs: i64,
    k_bs: i64,
    k_ss: i64,
    k_hs: i64,
    v_bs: i64,
    v_ss: i64,
    v_hs: i64,
    o_bs: i64,
    o_ss: i64,
    o_hs: i64,
    do_bs: i64,
    do_ss: i64,
    do_hs: i64,
    b: i32,
    h: i32,
    hk: i32,
    sq: i32,
    sk: i32,
    causal: i32,
    kblock: i32,
    nblk: i32,
    scale: f32,
    scale_log2: f32,
    lpt_group: i32,
}

const TILE: i64 = 64;
const THREADS: u32 = 128;

/// Which generation of the kernels runs (kernels/BENCHMARKS.md has each one's measurements).
/// `V3` uses FlashAttention-2's tile shapes with mma.sync (128-row forward tiles, 8-warp backward);
/// `V2` is the previous 64x64 / 4-warp version, kept for A/B timing in `kernels-gpu-check` and as a
/// fallback (`LLAVA_SCO_ATTN_VARIANT=v2`). `V4` is Hopper wgmma kernels (`cuda/attention_sm90.cu`)
/// on compute capability 9.0: forward at head dims 64 and 128, backward at 128; everything else
/// runs V3. `V5` is V4 with the pipelined forward. `V6` is V5 with a backward whose dQ goes out as
/// bulk reduce-adds from shared memory instead of scalar atomics. `V7` is V5 with a
/// warp-specialized forward (TMA loads, mbarriers, ping-pong; `cuda/attention_fwd_ws.cu`). `V8`
/// to `V10` pair V7's forward with newer backwards. `V12` is V10 with a
/// persistent forward; `V13` pairs V7's forward with V12's backward; `V14` is V13
/// with head dim 80 (and 64 in the backward) zero-padded to 128 on Hopper; `V15` is V14 with dQ
/// added from registers in the backward (the default); `V16` is V15 with a third of the
/// backward's exp2s on the FMA pipe; `V17` is V13 with causal blocks started longest first, `V18` V16 with that order;
/// `V19` is V15 with the masks' whole tiles found from per-call cells (`mask_cells`), `V20` V19
/// with their empty tiles too.
/// (There is no
/// `V11`: that number went to an experiment that was measured and removed, see
/// kernels/BENCHMARKS.md.)
/// (Each variant's discriminant is its number.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Variant {
    V2 = 2,
    V3 = 3,
    V4 = 4,
    /// V4 with FA3's intra-warpgroup overlap in the forward (the next tile's Q K^T and this tile's
    /// P V in flight while the softmax runs).
    V5 = 5,
    /// V5's forward; the backward stages dQ in shared memory and adds it to global memory with the
    /// copy engine's bulk reduce (`cp.reduce.async.bulk`), its dQ product issued behind dV/dK.
    V6 = 6,
    /// V5's backward; the forward is FlashAttention-3's structure: a producer warp issuing TMA
    /// loads, mbarrier stage hand-off, the two math warpgroups taking turns on the tensor cores.
    /// Views the TMA unit cannot address run V5's forward.
    V7 = 7,
    /// V7's forward and V6's backward.
    V8 = 8,
    /// V7's forward; V6's backward with FlashAttention-3's order of the dV, dQ, dK products (dV
    /// before the dS^T barrier, dQ staged while dK runs) and dQ added as one bulk reduce per
    /// warpgroup and tile.
    V9 = 9,
    /// V9 with TMA loads: thread 0 issues the next tile's Q, dO, lse, delta onto an mbarrier, so no
    /// block barrier and no cp.async wait at the top of each tile. Views the TMA unit cannot
    /// address, and sequences shorter than 64, run V9's backward.
    V10 = 10,
    /// V7's forward made persistent: one block per SM walks a static schedule of query tiles
    /// (causal: the longest paired with the shortest), its producer loading the next tile while
    /// the math warpgroups finish this one. V10's backward with the next tile's S^T issued before
    /// this tile's dQ is staged, and 3 load stages. Falls back as V7 and V10 do. (H200: the
    /// persistent forward wins below 2k keys without a mask, loses at longer or causal ones.)
    V12 = 12,
    /// V7's forward and V12's backward, the fastest of each measured (H200, 2026-11-27). Falls
    /// back as V7 and V12 do.
    V13 = 13,
    /// V13, with head dim 80 (the vision tower's) zero-padded to 128 in both passes and 64 in the
    /// backward, so they run the Hopper kernels instead of variants 3 and 2 (see
    /// `kernel_head_dim`). Measured on an H200 (2026-11-28): d80 forward+backward 1.35-2.24x V13.
    V14 = 14,
    /// V14 with its own backward: V12's with dQ added to the fp32 accumulator by vector
    /// reductions straight from the registers instead of staged in shared memory for a bulk
    /// reduce. Falls back as V14 does. (H200, 2026-11-28: forward+backward 1.00-1.05x V13 at d128.)
    V15 = 15,
    /// V15 with every third exp2 of the backward's P^T computed by a polynomial on the FMA pipe
    /// instead of the MUFU unit. (H200, 2026-11-28: 0.91-1.05x V15; not kept.)
    V16 = 16,
    /// V13's kernels with causal blocks started longest first, in groups of (batch, head) pairs
    /// (`lpt_group`): in grid order the last head's longest tiles start a fraction of a wave
    /// before the end. Falls back as V13. (H200, 2026-11-28: causal forward 0.90-1.01x V13 at
    /// d128; not kept.)
    V17 = 17,
    /// V16 with V17's block order. Falls back as V16. (H200, 2026-11-28: no faster than V15.)
    V18 = 18,
    /// V15's kernels, told which tiles of a masked call (key padding, Mllama's vision and
    /// cross-attention masks) need no per-element masking: the host computes the 64 x 32 cells the
    /// masks allow completely (`mask_cells::classify`), where before every tile of a call with
    /// any mask part loaded the mask per element. H200, 2026-11-28: the model's cross-attention
    /// 2.2x V15 forward+backward, its vision attention 2.2x; unmasked calls run V15 unchanged.
    /// Not the default yet: the correctness cases of that run had no whole masked tile (only its
    /// partial path was checked); the tile-structured cases added since check the rest. Falls
    /// back as V15.
    V19 = 19,
    /// V19 with the cells the masks allow no pair of marked too (`mask_cells::EMPTY`): such tiles
    /// are masked whole (scores -inf, P 0) without per-element loads. From V19's cross row, if its
    /// whole tiles ran at V15's unmasked rate, its per-element tiles ran ~9x slower; a quarter of
    /// that row's tiles are empty (its first sample sees 2 of 4 image tiles). Prepared without a
    /// GPU (session 22). Falls back as V15.
    V20 = 20,
}

/// The variant used when neither `set_variant` nor the environment chose one: the fastest that
/// passed every GPU check (kernels/BENCHMARKS.md, H200, 2026-11-28).
pub const DEFAULT_VARIANT: Variant = Variant::V15;

/// The head dims the kernels take.
pub const HEAD_DIMS: [i64; 3] = [64, 80, 128];
/// Environment variable read once on first use: `v2` ... `v10`, `v12` ... `v20`.
pub const VARIANT_ENV: &str = "LLAVA_SCO_ATTN_VARIANT";

// 0 = not chosen yet, else the variant's number.
static VARIANT: AtomicU8 = AtomicU8::new(0);

impl Variant {
    /// Every variant, oldest first.
    pub const ALL: [Variant; 18] = [
        Variant::V2,
        Variant::V3,
        Variant::V4,
        Variant::V5,
        Variant::V6,
        Variant::V7,
        Variant::V8,
        Variant::V9,
        Variant::V10,
        Variant::V12,
        Variant::V13,
        Variant::V14,
        Variant::V15,
        Variant::V16,
        Variant::V17,
        Variant::V18,
        Variant::V19,
        Variant::V20,
    ];

    /// Parses `v2` ... `v10`, `v12` ... `v20` (case-insensitive); the error names the variable and the
    /// accepted values.
    pub fn parse(s: &str) -> Result<Variant> {
        let s = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
                let (last, rest) = names.split_last().unwrap_or((&"", &[]));
                KernelError::Invalid(format!(
                    "{VARIANT_ENV}={s:?}: expected {} or {last}",
                    rest.join(", ")
                ))
            })
    }

    /// The variant's number (2 for `V2` ...).
    fn number(self) -> u8 {
        self as u8
    }

    /// The variant's short name (`v2` ...), as the environment variable takes it.
    pub fn name(self) -> &'static str {
        match self {
            Variant::V2 => "v2",
            Variant::V3 => "v3",
            Variant::V4 => "v4",
            Variant::V5 => "v5",
            Variant::V6 => "v6",
            Variant::V7 => "v7",
            Variant::V8 => "v8",
            Variant::V9 => "v9",
            Variant::V10 => "v10",
            Variant::V12 => "v12",
            Variant::V13 => "v13",
            Variant::V14 => "v14",
            Variant::V15 => "v15",
            Variant::V16 => "v16",
            Variant::V17 => "v17",
            Variant::V18 => "v18",
            Variant::V19 => "v19",
            Variant::V20 => "v20",
        }
    }
}

// The variants the last fused forward and backward launched (their numbers; 0 = none yet).
static LAUNCHED: [AtomicU8; 2] = [AtomicU8::new(0), AtomicU8::new(0)];

/// Kernel development: the (forward, backward) variants the last fused forward and backward in
/// this process launched, after the launch-time fallbacks (a view the TMA unit cannot address,
/// a register count the driver chose), so a check can tell a variant that ran from one that fell
/// back. Compare with `planned`.
pub fn last_launched() -> (Option<Variant>, Option<Variant>) {
    let get = |i: usize| {
        let n = LAUNCHED[i].load(Ordering::Relaxed);
        Variant::ALL.into_iter().find(|v| v.number() == n)
    };
    (get(0), get(1))
}

/// The (forward, backward) variants `variant` runs on a device of `arch` (`compute_90` ...) at
/// head dim `d`, before the launch-time fallbacks.
pub fn planned(variant: Variant, arch: &str, d: i64) -> (Variant, Variant) {
    let at = |pass| kernel_head_dim(variant, arch, d, pass);
    (
        v4_forward(variant, arch, at(Pass::Forward)),
        v4_backward(variant, arch, at(Pass::Backward)),
    )
}

/// Which pass a head-dim choice is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// The head dim the kernels run at for a call at head dim `d`. V14 (and V15, V16, V18) on Hopper zero-pads q, k, v
/// (and out, dout) from 80 to 128 in both passes, and from 64 to 128 in the backward: the wgmma
/// kernels take 64 and 128 only (the backward 128), and what ran instead measured 0.57-0.60x SDPA
/// forward and 0.34-0.39x forward+backward at d80, 0.37-0.41x forward+backward at d64 (H200,
/// 2026-11-27). Padding costs 1.6x (2x) the tensor work at 2-3x the rate. Zero columns change
/// no score, add zero output columns, and their gradients are dropped; the caller's scale stays.
fn kernel_head_dim(variant: Variant, arch: &str, d: i64, pass: Pass) -> i64 {
    match (variant, arch, d, pass) {
        (
            Variant::V14 | Variant::V15 | Variant::V16 | Variant::V18 | Variant::V19 | Variant::V20,
            "compute_90",
            80,
            _,
        )
        | (
            Variant::V14 | Variant::V15 | Variant::V16 | Variant::V18 | Variant::V19 | Variant::V20,
            "compute_90",
            64,
            Pass::Backward,
        ) => 128,
        _ => d,
    }
}

/// Whether libtorch's SDPA measured faster than the kernels `variant` runs at head dim `d` on a
/// device of `arch`, forward+backward at the model's shape and mask. At 80 (Llama 3.2 Vision's
/// tower, 1280 / 16) unpadded (variant 3's forward, variant 2's backward: everything but Hopper,
/// and up to V13 there) the kernels ran 0.57-0.60x SDPA forward and 0.34-0.39x
/// forward+backward (H200, 2026-11-27); zero-padded to 128 (V14-V18) 0.52x forward+backward at
/// the tower's shape and mask, every tile masked per element. V19, padded and told which tiles
/// the mask leaves whole, ran 1.09x there (0.85x forward only; H200, 2026-11-28,
/// kernels/BENCHMARKS.md); V20 is V19 with more. A model may run SDPA where this says so (the
/// vision tower does).
pub fn sdpa_faster(variant: Variant, arch: &str, d: i64) -> bool {
    let cells = matches!(variant, Variant::V19 | Variant::V20);
    d == 80 && !(cells && kernel_head_dim(variant, arch, d, Pass::Forward) != d)
}

/// `sdpa_faster` for the variant in use on GPU `ordinal`.
pub fn sdpa_faster_on(ordinal: i32, d: i64) -> Result<bool> {
    Ok(sdpa_faster(variant()?, &runtime::gpu(ordinal)?.arch, d))
}

/// `t` (B, H, S, d) in the first d columns of a (B, H, S, to) tensor (`empty_bhsd`) whose other
/// columns are zero. (Detached: the kernels sit outside autograd, their backward is called
/// explicitly.)
fn zero_padded(t: &Tensor, to: i64) -> Tensor {
    let d = t.size()[3];
    let padded = empty_bhsd(t, to);
    padded.narrow(3, 0, d).copy_(&t.detach());
    let _ = padded.narrow(3, d, to - d).zero_();
    padded
}

/// Chooses the kernel variant for every later call in this process.
pub fn set_variant(v: Variant) {
    VARIANT.store(v.number(), Ordering::Relaxed);
}

/// The kernel variant in use: `set_variant`, else `LLAVA_SCO_ATTN_VARIANT`, else `DEFAULT_VARIANT`.
pub fn variant() -> Result<Variant> {
    let chosen = VARIANT.load(Ordering::Relaxed);
    match Variant::ALL.into_iter().find(|v| v.number() == chosen) {
        Some(v) => Ok(v),
        None => {
            let v = match std::env::var(VARIANT_ENV) {
                Ok(s) => Variant::parse(&s)?,
                Err(_) => DEFAULT_VARIANT,
            };
            set_variant(v);
            Ok(v)
        }
    }
}

/// Variant 3 forward: 128 query rows per block, 4 warps; keys per step as instantiated in
/// attention.cu (`ATTN3_FWD`): 32 at d128 (register budget), else 64.
const FWD3_BLOCK_M: i64 = 128;
const FWD3_THREADS: u32 = 128;
fn fwd3_block_n(d: i64) -> i64 {
    if d == 128 {
        32
    } else {
        64
    }
}
/// Variant 3 backward: 64-key blocks, 8 warps, head dims whose quarter is a multiple of 16.
const BWD3_THREADS: u32 = 256;
fn bwd3_supported(d: i64) -> bool {
    d == 64 || d == 128
}

/// Variant 4 forward (wgmma): 128 query rows and 128 keys per step, 2 warpgroups; shared memory
/// Q + 2 stages of K and V, plus 1 KB to align the swizzled tiles to 1024 bytes.
const FWD4_BLOCK: i64 = 128;
const FWD4_THREADS: u32 = 256;
fn fwd4_smem(d: i64) -> i64 {
    5 * FWD4_BLOCK * d * 2 + 1024
}

/// Query rows per step of the wgmma backward (V4, V6, V9, V10, V12, V15, V16).
const BWD4_BLOCK_M: i64 = 64;
/// Variant 4 backward (wgmma): 128-key blocks of 2 warpgroups, 64 queries per step; shared memory
/// K, V (128 x D), Q, dO (64 x D), dS^T (128 x 64), lse and delta (64 floats each), + 1 KB alignment.
const BWD4_BLOCK_N: i64 = 128;
fn bwd4_smem(d: i64) -> i64 {
    (2 * BWD4_BLOCK_N * d + 2 * 64 * d + BWD4_BLOCK_N * 64) * 2 + 2 * 64 * 4 + 1024
}
/// Variant 6 backward: K, V (128 x D), dS^T (128 x 64), two stages of Q, dO (64 x D) and of lse,
/// delta (64 floats each), each warpgroup's dQ staging tile (64 rows of 64 floats, rows
/// `BWD6_DQ_STRIDE` bytes apart as in attention_sm90.cu), + 1 KB alignment.
const BWD6_DQ_STRIDE: i64 = 288;
fn bwd6_smem(d: i64) -> i64 {
    (2 * BWD4_BLOCK_N * d + BWD4_BLOCK_N * 64 + 4 * 64 * d) * 2
        + 4 * 64 * 4
        + 2 * 64 * BWD6_DQ_STRIDE
        + 1024
}
/// Variant 10 backward: variant 6's shared memory with two stages of dS^T, 64 x 64 floats of dQ
/// staging per warpgroup (no padding: fragment order), and 2 mbarriers (in a 128-byte slot).
fn bwd10_smem(d: i64) -> i64 {
    (2 * BWD4_BLOCK_N * d + 2 * BWD4_BLOCK_N * 64 + 4 * 64 * d) * 2
        + 4 * 64 * 4
        + 2 * 64 * 64 * 4
        + 128
        + 1024
}

/// Variant 12 backward: variant 10's shared memory with a third stage of Q, dO (64 x D) and of
/// lse, delta (64 floats each).
fn bwd12_smem(d: i64) -> i64 {
    bwd10_smem(d) + 2 * 64 * d * 2 + 2 * 64 * 4
}

/// Variant 7 forward: 3 warpgroups (producer + 2 math), tiles as variant 4; shared memory as
/// variant 4 plus 10 mbarriers (8 bytes each, in a 128-byte slot). Variant 12 has the same.
const FWD7_THREADS: u32 = 384;
/// The registers per thread variant 7 must start with: the producer warpgroup gives up all but
/// 24 and the math warpgroups take 240 (setmaxnreg), 128 x 24 + 256 x 240 = 384 x 168. With fewer
/// the math warpgroups would wait forever for registers the block does not own.
const FWD7_ENTRY_REGISTERS: i32 = (128 * 24 + 256 * 240) / FWD7_THREADS as i32;
fn fwd7_smem(d: i64) -> i64 {
    fwd4_smem(d) + 128
}

/// The forward variant that runs for `variant` on a device of `arch` at head dim `d`:
/// V4/V5/V7/V12 only on compute_90 with d 64 or 128 (else V3); V6 runs V5's forward, V8-V10 and
/// V13-V18 V7's (V14-V16 and V18 at the head dim `kernel_head_dim` gives).
/// (V7 and V12 also fall back to V5 for views the TMA unit cannot address, decided at launch.)
fn v4_forward(variant: Variant, arch: &str, d: i64) -> Variant {
    match variant {
        Variant::V6 => v4_forward(Variant::V5, arch, d),
        Variant::V8
        | Variant::V9
        | Variant::V10
        | Variant::V13
        | Variant::V14
        | Variant::V15
        | Variant::V16
        | Variant::V17
        | Variant::V18
        | Variant::V19
        | Variant::V20 => v4_forward(Variant::V7, arch, d),
        Variant::V4 | Variant::V5 | Variant::V7 | Variant::V12
            if arch == "compute_90" && (d == 64 || d == 128) =>
        {
            variant
        }
        Variant::V4 | Variant::V5 | Variant::V7 | Variant::V12 => Variant::V3,
        v => v,
    }
}

/// The backward variant: V4 only on compute_90 at d128 (at d64 the wgmma backward measured
/// 0.85-0.89x V3's on an H200, see kernels/BENCHMARKS.md), else V3; V6, V9, V10 and V12 have their
/// own, as do V15 and V16 (same limits); V8 runs V6's, V13, V14 and V17 V12's, V18 V16's.
fn v4_backward(variant: Variant, arch: &str, d: i64) -> Variant {
    match variant {
        Variant::V8 => v4_backward(Variant::V6, arch, d),
        Variant::V13 | Variant::V14 | Variant::V17 => v4_backward(Variant::V12, arch, d),
        Variant::V18 => v4_backward(Variant::V16, arch, d),
        Variant::V19 | Variant::V20 => v4_backward(Variant::V15, arch, d),
        Variant::V6 | Variant::V9 | Variant::V10 | Variant::V12 | Variant::V15 | Variant::V16
            if arch == "compute_90" && d == 128 =>
        {
            variant
        }
        Variant::V4 | Variant::V5 | Variant::V7 if arch == "compute_90" && d == 128 => Variant::V4,
        Variant::V4
        | Variant::V5
        | Variant::V6
        | Variant::V7
        | Variant::V9
        | Variant::V10
        | Variant::V12
        | Variant::V15
        | Variant::V16 => Variant::V3,
        v => v,
    }
}

/// Kernel development: `LLAVA_SCO_ATTN_BWD_PROFILE=1` makes variants 6, 9, 10, 12, 15 and 16
/// (and 13, 14, 17 through 12, 18 through 16) launch their backward's profiling build (`attn_bwd6p_*` ...
/// `attn_bwd16p_*`), which leaves the clock
/// cycles each step takes per tile in two blocks in a device array; each backward then waits for
/// it and prints them on stdout (`print_backward_profile`).
pub const BWD_PROFILE_ENV: &str = "LLAVA_SCO_ATTN_BWD_PROFILE";
fn backward_profile() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(BWD_PROFILE_ENV).is_ok_and(|v| v == "1"))
}

/// The forward kernel's name (in attention.cu, or attention_sm90a.cu for V4).
fn fwd_kernel(variant: Variant, dtype: &str, d: i64) -> String {
    match variant {
        Variant::V2 => format!("attn_fwd_{dtype}_d{d}"),
        Variant::V3 => format!("attn_fwd3_{dtype}_d{d}"),
        Variant::V4 => format!("attn_fwd4_{dtype}_d{d}"),
        Variant::V5 | Variant::V6 => format!("attn_fwd5_{dtype}_d{d}"),
        Variant::V12 => format!("attn_fwd12_{dtype}_d{d}"),
        // V7, and V8-V10 and V13 on, which run V7's forward (`v4_forward`)
        _ => format!("attn_fwd7_{dtype}_d{d}"),
    }
}

/// Every kernel name variant 4 may launch from attention_sm90a.cu.
pub fn sm90a_kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in ["bf16", "f16"] {
        for v in [Variant::V4, Variant::V5, Variant::V7, Variant::V12] {
            names.push(fwd_kernel(v, dtype, 64));
            names.push(fwd_kernel(v, dtype, 128));
        }
        names.push(bwd_kernel(Variant::V4, dtype, 128));
        names.push(bwd_kernel(Variant::V6, dtype, 128));
        names.push(bwd_kernel(Variant::V9, dtype, 128));
        names.push(format!("attn_bwd6p_{dtype}_d128"));
        names.push(format!("attn_bwd9p_{dtype}_d128"));
        names.push(bwd_kernel(Variant::V10, dtype, 128));
        names.push(format!("attn_bwd10p_{dtype}_d128"));
        names.push(bwd_kernel(Variant::V12, dtype, 128));
        names.push(format!("attn_bwd12p_{dtype}_d128"));
        names.push(bwd_kernel(Variant::V15, dtype, 128));
        names.push(format!("attn_bwd15p_{dtype}_d128"));
        names.push(bwd_kernel(Variant::V16, dtype, 128));
        names.push(format!("attn_bwd16p_{dtype}_d128"));
        names.push(format!("attn_bwd_dq9_{dtype}"));
    }
    names
}

/// The main backward kernel's name; d80 stays on variant 2 (its 80 columns do not split into
/// four 16-column warp slices).
fn bwd_kernel(variant: Variant, dtype: &str, d: i64) -> String {
    match variant {
        Variant::V4
        | Variant::V6
        | Variant::V9
        | Variant::V10
        | Variant::V12
        | Variant::V15
        | Variant::V16 => {
            format!("attn_bwd{}_{dtype}_d{d}", variant.number())
        }
        Variant::V3 if bwd3_supported(d) => format!("attn_bwd3_{dtype}_d{d}"),
        _ => format!("attn_bwd_{dtype}_d{d}"),
    }
}

/// Every kernel name the wrappers here may launch (`kernels-check` asserts each is in the PTX).
pub fn kernel_names() -> Vec<String> {
    let mut names = Vec::new();
    for dtype in ["bf16", "f16"] {
        for d in [64, 80, 128] {
            for v in [Variant::V2, Variant::V3] {
                names.push(fwd_kernel(v, dtype, d));
                names.push(bwd_kernel(v, dtype, d));
            }
            names.push(format!("attn_bwd_delta_{dtype}_d{d}"));
        }
        names.push(format!("attn_bwd_dq_{dtype}"));
    }
    names.sort();
    names.dedup();
    names
}

fn dtype_name(kind: Kind) -> Result<&'static str> {
    match kind {
        Kind::BFloat16 => Ok("bf16"),
        Kind::Half => Ok("f16"),
        other => Err(KernelError::Unsupported(format!(
            "fused attention takes bf16 or fp16, got {other:?}"
        ))),
    }
}

/// Strides as (batch, seq, head) of a (B, H, S, D) tensor, after making it loadable with 16-byte
/// vector loads (D contiguous, strides multiple of 8 elements, aligned base) -- copying if needed.
fn loadable(t: &Tensor) -> (Tensor, [i64; 3]) {
    let ok = |t: &Tensor| {
        let s = t.stride();
        s[3] == 1 && s[..3].iter().all(|x| x % 8 == 0) && (t.data_ptr() as usize).is_multiple_of(16)
    };
    let t = if ok(t) {
        t.shallow_clone()
    } else {
        crate::contiguous_aligned(t)
    };
    let s = t.stride();
    (t, [s[0], s[2], s[1]])
}

fn mask_ptr(
    t: Option<&Tensor>,
    shape: &[i64],
    what: &str,
    device: Device,
) -> Result<(Option<Tensor>, u64)> {
    let Some(t) = t else { return Ok((None, 0)) };
    if t.size() != shape {
        return Err(KernelError::Invalid(format!(
            "{what} has shape {:?}, expected {shape:?}",
            t.size()
        )));
    }
    // keep/allow flags; an additive float mask (0 / -inf) cast to bytes would mean the opposite
    if !matches!(t.kind(), Kind::Bool | Kind::Uint8) {
        return Err(KernelError::Invalid(format!(
            "{what} must be bool (true = attend) or uint8 0/1, got {:?}; for an additive mask m use m.eq(0)",
            t.kind()
        )));
    }
    let t = t.to_device(device).to_kind(Kind::Uint8).contiguous();
    let p = t.data_ptr() as u64;
    Ok((Some(t), p))
}

/// Checked problem sizes of one call.
struct Dims {
    b: i64,
    h: i64,
    hk: i64,
    sq: i64,
    sk: i64,
    d: i64,
}

fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Dims> {
    let (qs, ks, vs) = (q.size(), k.size(), v.size());
    if qs.len() != 4 || ks.len() != 4 || ks != vs {
        return Err(KernelError::Invalid(format!(
            "expected q (B,H,Sq,D) and k, v (B,Hk,Sk,D); got q {qs:?}, k {ks:?}, v {vs:?}"
        )));
    }
    let d = Dims {
        b: qs[0],
        h: qs[1],
        hk: ks[1],
        sq: qs[2],
        sk: ks[2],
        d: qs[3],
    };
    if ks[0] != d.b || ks[3] != d.d || d.hk == 0 || d.h < d.hk || d.h % d.hk != 0 {
        return Err(KernelError::Invalid(format!(
            "q {qs:?} and k {ks:?} disagree (batch, head dim, or H not a positive multiple of Hk)"
        )));
    }
    check_head_dim(d.d)?;
    // grid y and z carry heads and batch (CUDA caps both at 65535); the backward's delta kernel
    // takes 4 rows of B x H x Sq per block along x (capped at 2^31 - 1)
    if d.b > 65_535 || d.h > 65_535 || (d.b * d.h).saturating_mul(d.sq) / 4 >= i32::MAX as i64 {
        return Err(KernelError::Unsupported(format!(
            "batch {} x heads {} x queries {} exceed CUDA's grid limits (batch and heads at most 65535, their product with the queries below 2^33); split the batch",
            d.b, d.h, d.sq
        )));
    }
    if q.kind() != k.kind() || q.kind() != v.kind() {
        return Err(KernelError::Invalid(format!(
            "q, k, v dtypes differ: {:?} {:?} {:?}",
            q.kind(),
            k.kind(),
            v.kind()
        )));
    }
    if d.sq > i32::MAX as i64 || d.sk > i32::MAX as i64 {
        return Err(KernelError::Unsupported("sequence longer than 2^31".into()));
    }
    Ok(d)
}

/// The kernels fold the scale into exp2 after taking row maxima, which needs scale > 0.
fn check_scale(scale: f64) -> Result<()> {
    if scale.is_finite() && scale > 0.0 {
        Ok(())
    } else {
        Err(KernelError::Invalid(format!(
            "softmax scale must be finite and positive, got {scale} (usually 1/sqrt(head_dim))"
        )))
    }
}

fn device_gpu(q: &Tensor) -> Result<&'static Gpu> {
    match q.device() {
        Device::Cuda(i) => runtime::gpu(i as i32),
        other => Err(KernelError::Unsupported(format!(
            "fused attention needs CUDA tensors, got {other:?} (use attention: sdpa on CPU)"
        ))),
    }
}

/// Compiles and loads the kernels the selected variant runs on GPU `ordinal` for `dtype` at head
/// dim `d` (its forward, and the backward's first kernel, which loads the other module), so that
/// a missing NVRTC, a GPU older than compute capability 8.0 or a compile error shows before a
/// model loads, not at its first attention call; the PTX cache is then warm.
pub fn prepare(ordinal: i32, dtype: Kind, d: i64) -> Result<()> {
    let name = dtype_name(dtype)?;
    check_head_dim(d)?;
    let gpu = runtime::gpu(ordinal)?;
    let variant = variant()?;
    let (fd, bd) = (
        kernel_head_dim(variant, &gpu.arch, d, Pass::Forward),
        kernel_head_dim(variant, &gpu.arch, d, Pass::Backward),
    );
    let forward = v4_forward(variant, &gpu.arch, fd);
    gpu.function(source_of(forward), &fwd_kernel(forward, name, fd))?;
    gpu.function("attention.cu", &delta_kernel(name, bd))?;
    Ok(())
}

/// The source file of a variant's kernels: the Hopper ones (V4 on) in the sm_90a source.
fn source_of(variant: Variant) -> &'static str {
    match variant {
        Variant::V2 | Variant::V3 => "attention.cu",
        _ => crate::SM90A_ATTENTION,
    }
}

/// The backward's delta kernel (every variant's; in attention.cu).
fn delta_kernel(dtype_name: &str, d: i64) -> String {
    format!("attn_bwd_delta_{dtype_name}_d{d}")
}

fn check_head_dim(d: i64) -> Result<()> {
    match HEAD_DIMS.contains(&d) {
        true => Ok(()),
        false => Err(KernelError::Unsupported(format!(
            "fused attention supports head dims {}; got {d}",
            HEAD_DIMS.map(|d| d.to_string()).join(", ")
        ))),
    }
}

/// Base parameters shared by forward and backward; masks are kept alive in `keep`.
fn base_params(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
    keep: &mut Vec<Tensor>,
) -> Result<(Dims, AttnParams)> {
    let d = dims(q, k, v)?;
    let device = q.device();
    crate::same_device(device, &[("k", k), ("v", v)])?;
    let (q, qs) = loadable(q);
    let (k, ks) = loadable(k);
    let (v, vs) = loadable(v);
    let (kk, kk_p) = mask_ptr(mask.key_keep, &[d.b, d.sk], "key_keep", device)?;
    let (qf, qf_p) = mask_ptr(mask.query_flags, &[d.b, d.sq], "query_flags", device)?;
    let (kblock, nblk) = match mask.block_mask {
        // (both go to the kernel as i32: a block size that wrapped would divide by zero there)
        Some((t, kb)) if kb > 0 && kb <= i32::MAX as i64 => {
            (kb, t.size().get(2).copied().unwrap_or(0))
        }
        Some((_, kb)) => {
            return Err(KernelError::Invalid(format!(
                "block size must be in 1..2^31, got {kb}"
            )))
        }
        None => (1, 0),
    };
    if nblk > i32::MAX as i64 {
        return Err(KernelError::Invalid(format!(
            "block_mask has {nblk} blocks, more than 2^31"
        )));
    }
    if mask.block_mask.is_some() && nblk.saturating_mul(kblock) < d.sk {
        return Err(KernelError::Invalid(format!(
            "block_mask covers {} keys ({nblk} blocks of {kblock}) but Sk = {}",
            nblk * kblock,
            d.sk
        )));
    }
    let (bm, bm_p) = mask_ptr(
        mask.block_mask.map(|(t, _)| t),
        &[d.b, d.sq, nblk],
        "block_mask",
        device,
    )?;
    let p = AttnParams {
        q: q.data_ptr() as u64,
        k: k.data_ptr() as u64,
        v: v.data_ptr() as u64,
        o: 0,
        lse: 0,
        dout: 0,
        dq: 0,
        dk: 0,
        dv: 0,
        dq_acc: 0,
        delta: 0,
        key_keep: kk_p,
        q_flags: qf_p,
        block_mask: bm_p,
        mask_cells: 0,
        q_bs: qs[0],
        q_ss: qs[1],
        q_hs: qs[2],
        k_bs: ks[0],
        k_ss: ks[1],
        k_hs: ks[2],
        v_bs: vs[0],
        v_ss: vs[1],
        v_hs: vs[2],
        o_bs: 0,
        o_ss: 0,
        o_hs: 0,
        do_bs: 0,
        do_ss: 0,
        do_hs: 0,
        b: d.b as i32,
        h: d.h as i32,
        hk: d.hk as i32,
        sq: d.sq as i32,
        sk: d.sk as i32,
        causal: mask.causal as i32,
        kblock: kblock as i32,
        nblk: nblk as i32,
        scale: scale as f32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
        lpt_group: 0,
    };
    keep.extend([q, k, v]);
    keep.extend([kk, qf, bm].into_iter().flatten());
    Ok((d, p))
}

/// Allocates the forward outputs: out (B, H, Sq, D) over (B, Sq, H, D) memory, lse (B, H, Sq).
pub fn forward_outputs(q: &Tensor) -> Result<Forward> {
    let s = q.size();
    let [b, h, sq, d] = s[..] else {
        return Err(KernelError::Invalid(format!(
            "expected q (B,H,Sq,D), got {s:?}"
        )));
    };
    let lse = Tensor::empty([b, h, sq], (Kind::Float, q.device()));
    Ok(Forward {
        out: empty_bhsd(q, d),
        lse,
    })
}

/// An empty (B, H, S, d) tensor of `like`'s (B, H, S) and dtype over (B, S, H, d) memory, the
/// layout the model's projections give.
fn empty_bhsd(like: &Tensor, d: i64) -> Tensor {
    let s = like.size();
    Tensor::empty([s[0], s[2], s[1], d], (like.kind(), like.device())).permute([0, 2, 1, 3])
}

/// Fused forward. `scale` is the softmax scale (usually 1/sqrt(D)).
pub fn fused_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Forward> {
    dims(q, k, v)?;
    let fwd = forward_outputs(q)?;
    fused_forward_into(&fwd, q, k, v, mask, scale)?;
    Ok(fwd)
}

/// Fused forward into preallocated outputs from `forward_outputs` (tests poison them first).
pub fn fused_forward_into(
    outputs: &Forward,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<()> {
    dims(q, k, v)?;
    check_scale(scale)?;
    // (the arguments first, the device after: a bad call is the same error on every machine)
    let mut keep = Vec::new();
    let (d, mut p) = base_params(q, k, v, mask, scale, &mut keep)?;
    let gpu = device_gpu(q)?;
    let variant = variant()?;
    let os = outputs.out.stride();
    if outputs.out.size() != q.size()
        || outputs.out.kind() != q.kind()
        || os[3] != 1
        || os.iter().any(|s| s % 8 != 0 && *s != 1)
        || !(outputs.out.data_ptr() as usize).is_multiple_of(16)
        || outputs.lse.size() != [d.b, d.h, d.sq]
        || outputs.lse.kind() != Kind::Float
        || !outputs.lse.is_contiguous()
    {
        return Err(KernelError::Invalid(
            "forward outputs must come from forward_outputs(q)".into(),
        ));
    }
    crate::same_device(q.device(), &[("out", &outputs.out), ("lse", &outputs.lse)])?;
    let kd = kernel_head_dim(variant, &gpu.arch, d.d, Pass::Forward);
    if kd != d.d {
        // zero-padded copies at head dim kd; lse is the same, out the first d.d columns
        let (qp, kp, vp) = (zero_padded(q, kd), zero_padded(k, kd), zero_padded(v, kd));
        let padded = Forward {
            out: empty_bhsd(&qp, kd),
            lse: outputs.lse.shallow_clone(),
        };
        fused_forward_into(&padded, &qp, &kp, &vp, mask, scale)?;
        outputs
            .out
            .shallow_clone()
            .copy_(&padded.out.narrow(3, 0, d.d));
        return Ok(());
    }
    p.o = outputs.out.data_ptr() as u64;
    p.lse = outputs.lse.data_ptr() as u64;
    (p.o_bs, p.o_ss, p.o_hs) = (os[0], os[2], os[1]);
    if d.sq == 0 || d.b == 0 || d.h == 0 {
        return Ok(());
    }
    let name = dtype_name(q.kind())?;
    attach_mask_cells(variant, mask, &d, q.device(), &mut p, &mut keep);
    let longest_first = longest_first(variant, mask);
    let mut variant = v4_forward(variant, &gpu.arch, d.d);
    let mut maps = None;
    if matches!(variant, Variant::V7 | Variant::V12) {
        maps = fwd7_maps(&p, &d, q.kind() == Kind::BFloat16)?;
        if maps.is_none() {
            variant = Variant::V5; // a view the TMA unit cannot address
        } else if !fwd7_registers_fit(gpu, &fwd_kernel(variant, name, d.d))? {
            variant = Variant::V5;
            maps = None;
        }
    }
    // (query rows per block, threads, shared bytes: Q + 2 stages of K and V)
    let (rows, threads, smem) = match variant {
        Variant::V2 => (TILE, THREADS, 5 * TILE * (d.d + 8) * 2),
        Variant::V3 => (
            FWD3_BLOCK_M,
            FWD3_THREADS,
            (FWD3_BLOCK_M + 4 * fwd3_block_n(d.d)) * (d.d + 8) * 2,
        ),
        Variant::V4 | Variant::V5 | Variant::V6 => (FWD4_BLOCK, FWD4_THREADS, fwd4_smem(d.d)),
        // V7 and V12 (v4_forward maps V8-V10 and V13 on to V7)
        _ => (FWD4_BLOCK, FWD7_THREADS, fwd7_smem(d.d)),
    };
    let source = source_of(variant);
    let f = gpu.function(source, &fwd_kernel(variant, name, d.d))?;
    LAUNCHED[0].store(variant.number(), Ordering::Relaxed);
    let grid = if variant == Variant::V12 {
        // persistent: one block per SM at most (its shared memory and registers fill one)
        (
            fwd12_units(&d, mask.causal).min(gpu.multiprocessors as i64) as u32,
            1,
            1,
        )
    } else {
        (((d.sq + rows - 1) / rows) as u32, d.h as u32, d.b as u32)
    };
    if longest_first && variant == Variant::V7 {
        // blocks over (batch, head) pairs, each reading K and V, shared by a KV head's group
        p.lpt_group = lpt_group(grid.0 as i64, d.h * d.b, gpu, 4 * d.sk * d.d / (d.h / d.hk));
    }
    let p_arg: *mut c_void = &mut p as *mut AttnParams as *mut c_void;
    let mut args = match maps.as_mut() {
        Some(m) => vec![m as *mut Fwd7Maps as *mut c_void, p_arg],
        None => vec![p_arg],
    };
    // SAFETY: the arguments match the kernel's (Fwd7Maps for V7 and V12, then AttnParams);
    // tensors kept alive in `keep`/`outputs` until the launch is queued on their stream.
    unsafe { gpu.launch(f, grid, (threads, 1, 1), smem as u32, &mut args) }
}

/// V19: the tiles the masks allow completely, V20 also those they allow not at all
/// (`mask_cells::tile_states`), kept alive in `keep` until the launch is queued, so the kernels
/// skip per-element masking on those tiles.
fn attach_mask_cells(
    variant: Variant,
    mask: &AttentionMask,
    d: &Dims,
    device: Device,
    p: &mut AttnParams,
    keep: &mut Vec<Tensor>,
) {
    if !matches!(variant, Variant::V19 | Variant::V20) {
        return;
    }
    let mark_empty = variant == Variant::V20;
    if let Some(cells) = crate::mask_cells::classify(mask, d.b, d.sq, d.sk, device, mark_empty) {
        let states = crate::mask_cells::tile_states(&cells);
        p.mask_cells = states.data_ptr() as u64;
        keep.push(states);
    }
}

/// Whether `variant` starts this call's blocks longest first (V17, V18: causal calls).
fn longest_first(variant: Variant, mask: &AttentionMask) -> bool {
    matches!(variant, Variant::V17 | Variant::V18) && mask.causal
}

/// Kernel development: the group size of variant 17's longest-first order instead of
/// `lpt_group`'s choice (0: its choice), for every later call in this process.
/// `kernels-gpu-check` sets 3 to run the order over several groups and a partial last one, which
/// its small problems (one group each) never reach otherwise.
pub fn set_longest_first_group(pairs: Option<i32>) {
    LPT_GROUP.store(pairs.unwrap_or(0).max(0), Ordering::Relaxed);
}
static LPT_GROUP: AtomicI32 = AtomicI32::new(0);

/// Variant 17: the (batch, head) pairs per group of its longest-first block order (`lpt_block` in
/// cuda/attention_sm90.cu) for a grid of `tiles` x `pairs` blocks: enough pairs that a group's
/// longest tiles start two waves (of `gpu`'s SM count) before the group's last block, and more
/// where half the L2 holds the data of more pairs (`pair_bytes` each); at most `pairs`.
fn lpt_group(tiles: i64, pairs: i64, gpu: &Gpu, pair_bytes: i64) -> i32 {
    let forced = LPT_GROUP.load(Ordering::Relaxed);
    if forced > 0 {
        return forced.min(pairs.clamp(1, i32::MAX as i64) as i32);
    }
    lpt_group_for(
        tiles,
        pairs,
        gpu.multiprocessors as i64,
        gpu.l2_bytes,
        pair_bytes,
    )
}
fn lpt_group_for(tiles: i64, pairs: i64, sms: i64, l2_bytes: i64, pair_bytes: i64) -> i32 {
    let two_waves = (2 * sms + tiles.max(1) - 1) / tiles.max(1);
    let cached = l2_bytes / 2 / pair_bytes.max(1);
    two_waves
        .max(cached)
        .clamp(1, pairs.max(1))
        .min(i32::MAX as i64) as i32
}

/// The CPU twin of `lpt_block` (cuda/attention_sm90.cu): (level, pair) of the block with linear
/// index `linear` in a grid of `tiles` x `pairs` blocks, pairs in groups of `group`.
#[cfg(test)]
fn lpt_block(linear: i64, tiles: i64, pairs: i64, group: i64) -> (i64, i64) {
    let first = linear / (group * tiles) * group;
    let size = group.min(pairs - first);
    let r = linear - first * tiles;
    (r / size, first + r % size)
}

/// Variant 12's work units (`fwd12_schedule` in cuda/attention_fwd_ws.cu): its 128-row query
/// tiles, paired when causal (the longest with the shortest, a middle one alone).
fn fwd12_units(d: &Dims, causal: bool) -> i64 {
    let tiles = (d.sq + FWD4_BLOCK - 1) / FWD4_BLOCK;
    let per_head = if causal { (tiles + 1) / 2 } else { tiles };
    per_head * d.h * d.b
}

/// Whether the forward `name` of variant 7 or 12 was compiled to exactly `FWD7_ENTRY_REGISTERS`
/// registers per thread: its setmaxnreg hand-off needs that many (with any other count it would
/// hang). The PTX is compiled by the driver, so another driver may allocate differently; then
/// variant 5's forward runs instead, with a warning. Asked of the driver once per kernel and
/// device.
fn fwd7_registers_fit(gpu: &'static Gpu, name: &str) -> Result<bool> {
    type Key = (usize, String); // (the device's Gpu, kernel name)
    static FIT: std::sync::Mutex<Vec<(Key, bool)>> = std::sync::Mutex::new(Vec::new());
    let key = (gpu as *const Gpu as usize, name.to_string());
    if let Some((_, fit)) = FIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(k, _)| *k == key)
    {
        return Ok(*fit);
    }
    let name = &key.1;
    let regs = gpu.registers(gpu.function(crate::SM90A_ATTENTION, name)?)?;
    let fit = regs == FWD7_ENTRY_REGISTERS;
    if !fit {
        tracing::warn!(
            "{name} was compiled to {regs} registers per thread; its setmaxnreg hand-off needs exactly {FWD7_ENTRY_REGISTERS}: variant 5's forward runs instead"
        );
    }
    FIT.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((key, fit));
    Ok(fit)
}

/// Variant 7's first kernel argument (`Fwd7Maps` in cuda/attention_fwd_ws.cu): the Q, K, V tensor
/// maps and, per tensor, the map dimension of its sequence, head and batch index.
#[repr(C)]
struct Fwd7Maps {
    q: sys::CUtensorMap,
    k: sys::CUtensorMap,
    v: sys::CUtensorMap,
    q_pos: [i32; 3],
    k_pos: [i32; 3],
    v_pos: [i32; 3],
}

/// One tensor's map and the map dimension of its (sequence, head, batch) for a view of `seq` x
/// `heads` x `d.b` x `d.d` with element `strides` (sequence, head, batch) and boxes of `rows` rows,
/// or None when the TMA unit cannot address it (see `tma::layout`). An encoder error is returned:
/// it means a layout this module thought valid was refused, which the GPU checks should show.
fn tma_view(
    ptr: u64,
    seq: i64,
    heads: i64,
    d: &Dims,
    strides: [i64; 3],
    rows: u32,
    bf16: bool,
) -> Result<Option<(sys::CUtensorMap, [i32; 3])>> {
    match tma::layout(seq, heads, d.b, d.d, strides, rows) {
        Some(l) => Ok(Some((tma::encode(ptr, &l, bf16)?, l.pos))),
        None => Ok(None),
    }
}

/// The tensor maps for variant 7, or None when a view cannot be addressed by the TMA unit (the
/// caller runs variant 5's forward instead).
fn fwd7_maps(p: &AttnParams, d: &Dims, bf16: bool) -> Result<Option<Fwd7Maps>> {
    let rows = FWD4_BLOCK as u32;
    let q = tma_view(p.q, d.sq, d.h, d, [p.q_ss, p.q_hs, p.q_bs], rows, bf16)?;
    let k = tma_view(p.k, d.sk, d.hk, d, [p.k_ss, p.k_hs, p.k_bs], rows, bf16)?;
    let v = tma_view(p.v, d.sk, d.hk, d, [p.v_ss, p.v_hs, p.v_bs], rows, bf16)?;
    let (Some((q, q_pos)), Some((k, k_pos)), Some((v, v_pos))) = (q, k, v) else {
        return Ok(None);
    };
    Ok(Some(Fwd7Maps {
        q,
        k,
        v,
        q_pos,
        k_pos,
        v_pos,
    }))
}

/// Variant 10's first kernel argument (`Bwd10Maps` in cuda/attention_sm90.cu): the tensor maps
/// of Q and dO with 64-row boxes, and per tensor the map dimension of its sequence, head and batch.
#[repr(C)]
struct Bwd10Maps {
    q: sys::CUtensorMap,
    dout: sys::CUtensorMap,
    q_pos: [i32; 3],
    do_pos: [i32; 3],
}

/// The tensor maps for variant 10, or None when a view cannot be addressed by the TMA unit or is
/// shorter than one box (the caller runs variant 9's backward).
fn bwd10_maps(p: &AttnParams, d: &Dims, bf16: bool) -> Result<Option<Bwd10Maps>> {
    let rows = BWD4_BLOCK_M as u32;
    let q = tma_view(p.q, d.sq, d.h, d, [p.q_ss, p.q_hs, p.q_bs], rows, bf16)?;
    let dout = tma_view(
        p.dout,
        d.sq,
        d.h,
        d,
        [p.do_ss, p.do_hs, p.do_bs],
        rows,
        bf16,
    )?;
    let (Some((q, q_pos)), Some((dout, do_pos))) = (q, dout) else {
        return Ok(None);
    };
    Ok(Some(Bwd10Maps {
        q,
        dout,
        q_pos,
        do_pos,
    }))
}

/// Fused backward: recomputes P from `lse`; returns dq, dk, dv shaped like q, k, v.
pub fn fused_backward(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    fwd: &Forward,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Backward> {
    dims(q, k, v)?;
    check_scale(scale)?;
    let gpu = device_gpu(q)?;
    let variant = variant()?;
    let mut keep = Vec::new();
    let (d, mut p) = base_params(q, k, v, mask, scale, &mut keep)?;
    if dout.size() != q.size() || dout.kind() != q.kind() {
        return Err(KernelError::Invalid(format!(
            "dout {:?} {:?} must match q {:?} {:?}",
            dout.size(),
            dout.kind(),
            q.size(),
            q.kind()
        )));
    }
    if fwd.out.size() != q.size()
        || fwd.out.kind() != q.kind()
        || fwd.lse.size() != [d.b, d.h, d.sq]
        || fwd.lse.kind() != Kind::Float
    {
        return Err(KernelError::Invalid(format!(
            "fwd must be this q's forward (out {:?} {:?}, lse {:?} fp32); got out {:?} {:?}, lse {:?} {:?}",
            q.size(),
            q.kind(),
            [d.b, d.h, d.sq],
            fwd.out.size(),
            fwd.out.kind(),
            fwd.lse.size(),
            fwd.lse.kind()
        )));
    }
    crate::same_device(
        q.device(),
        &[("dout", dout), ("fwd.out", &fwd.out), ("fwd.lse", &fwd.lse)],
    )?;
    let kd = kernel_head_dim(variant, &gpu.arch, d.d, Pass::Backward);
    if kd != d.d {
        // zero-padded copies at head dim kd (out's zero columns add nothing to delta); the
        // gradients' first d.d columns are the answer
        let padded = Forward {
            out: zero_padded(&fwd.out, kd),
            lse: fwd.lse.shallow_clone(),
        };
        let pad = |t: &Tensor| zero_padded(t, kd);
        let g = fused_backward(&pad(dout), &pad(q), &pad(k), &pad(v), &padded, mask, scale)?;
        let cut = |t: Tensor| t.narrow(3, 0, d.d);
        return Ok(Backward {
            dq: cut(g.dq),
            dk: cut(g.dk),
            dv: cut(g.dv),
        });
    }
    let (dout, ds) = loadable(dout);
    let (out, os) = loadable(&fwd.out);
    let opts = (q.kind(), q.device());
    let dq = Tensor::empty([d.b, d.sq, d.h, d.d], opts);
    let dk = Tensor::empty([d.b, d.sk, d.hk, d.d], opts);
    let dv = Tensor::empty([d.b, d.sk, d.hk, d.d], opts);
    attach_mask_cells(variant, mask, &d, q.device(), &mut p, &mut keep);
    let longest_first = longest_first(variant, mask);
    let variant = v4_backward(variant, &gpu.arch, d.d);
    let sq_pad = (d.sq + BWD4_BLOCK_M - 1) / BWD4_BLOCK_M * BWD4_BLOCK_M;
    // fp32 dQ accumulator: (B, Sq, H, D), or for V9, V10, V12, V15 and V16 tiles of 64 queries x 64
    // columns in the order their threads hold them (attn_bwd_dq9 in attention_sm90.cu reads them;
    // the fallback of V10, V12, V15 and V16 below, V9, is tiled too)
    let tiled_dq = matches!(
        variant,
        Variant::V9 | Variant::V10 | Variant::V12 | Variant::V15 | Variant::V16
    );
    let dq_acc_shape = if tiled_dq {
        [d.b, d.h, sq_pad, d.d]
    } else {
        [d.b, d.sq, d.h, d.d]
    };
    let dq_acc = Tensor::zeros(dq_acc_shape, (Kind::Float, q.device()));
    let delta = Tensor::empty([d.b, d.h, d.sq], (Kind::Float, q.device()));
    let lse = fwd.lse.contiguous();
    p.o = out.data_ptr() as u64;
    (p.o_bs, p.o_ss, p.o_hs) = (os[0], os[1], os[2]);
    p.dout = dout.data_ptr() as u64;
    (p.do_bs, p.do_ss, p.do_hs) = (ds[0], ds[1], ds[2]);
    p.lse = lse.data_ptr() as u64;
    p.dq = dq.data_ptr() as u64;
    p.dk = dk.data_ptr() as u64;
    p.dv = dv.data_ptr() as u64;
    p.dq_acc = dq_acc.data_ptr() as u64;
    p.delta = delta.data_ptr() as u64;
    // V10, V12, V15, V16: tensor maps of Q and dO (else V9's backward), lse and delta padded to 64-row
    // tiles
    let mut bwd10 = None;
    // (other dtypes are refused below)
    if matches!(
        variant,
        Variant::V10 | Variant::V12 | Variant::V15 | Variant::V16
    ) && dtype_name(q.kind()).is_ok()
    {
        if let Some(maps) = bwd10_maps(&p, &d, q.kind() == Kind::BFloat16)? {
            let f32s = (Kind::Float, q.device());
            let lse_pad = Tensor::zeros([d.b, d.h, sq_pad], f32s);
            lse_pad.narrow(2, 0, d.sq).copy_(&lse);
            bwd10 = Some((maps, lse_pad, Tensor::zeros([d.b, d.h, sq_pad], f32s)));
        }
    }
    let variant = match (variant, &bwd10) {
        (Variant::V10 | Variant::V12 | Variant::V15 | Variant::V16, None) => Variant::V9,
        (v, _) => v,
    };
    let mut result = Backward {
        dq: dq.permute([0, 2, 1, 3]),
        dk: dk.permute([0, 2, 1, 3]),
        dv: dv.permute([0, 2, 1, 3]),
    };
    if d.b == 0 || d.h == 0 || (d.sq == 0 && d.sk == 0) {
        return Ok(result);
    }
    if d.sk > 0 && d.sq == 0 {
        let _ = result.dk.zero_();
        let _ = result.dv.zero_();
        return Ok(result);
    }
    let name = dtype_name(q.kind())?;
    let mut arg: *mut c_void = &mut p as *mut AttnParams as *mut c_void;
    let rows = (d.b * d.h * d.sq) as u64; // one warp per row
    let f_delta = gpu.function("attention.cu", &delta_kernel(name, d.d))?;
    // (keys per block, threads, shared bytes): K, V, Q, dO tiles, dS^T (v2, v4) or P^T and dS^T
    // (v3), lse, delta.
    let (key_block, main_threads, smem) = match variant {
        Variant::V4 => (BWD4_BLOCK_N, FWD4_THREADS, bwd4_smem(d.d)),
        Variant::V6 | Variant::V9 => (BWD4_BLOCK_N, FWD4_THREADS, bwd6_smem(d.d)),
        Variant::V10 => (BWD4_BLOCK_N, FWD4_THREADS, bwd10_smem(d.d)),
        // (V15 and V16 do not use the dQ staging tiles; same layout)
        Variant::V12 | Variant::V15 | Variant::V16 => (BWD4_BLOCK_N, FWD4_THREADS, bwd12_smem(d.d)),
        Variant::V3 if bwd3_supported(d.d) => (
            TILE,
            BWD3_THREADS,
            (4 * TILE * (d.d + 8) + 2 * TILE * (TILE + 8)) * 2 + 2 * TILE * 4,
        ),
        _ => (
            TILE,
            THREADS,
            (4 * TILE * (d.d + 8) + TILE * (TILE + 8)) * 2 + 2 * TILE * 4,
        ),
    };
    let source = source_of(variant);
    let mut main_name = bwd_kernel(variant, name, d.d);
    let profiled = matches!(
        variant,
        Variant::V6 | Variant::V9 | Variant::V10 | Variant::V12 | Variant::V15 | Variant::V16
    ) && backward_profile();
    if profiled {
        main_name = main_name.replacen(&format!("_{name}_"), &format!("p_{name}_"), 1);
    }
    let f_main = gpu.function(source, &main_name)?;
    // (variant 3 has no backward for every head dim: `bwd_kernel` then names variant 2's)
    let ran = match variant {
        Variant::V3 if !bwd3_supported(d.d) => Variant::V2,
        v => v,
    };
    LAUNCHED[1].store(ran.number(), Ordering::Relaxed);
    let mut d_arg = d.d as i32;
    let mut dq_args: Vec<*mut c_void> = vec![&mut p as *mut AttnParams as *mut c_void];
    // (kernel, elements per thread)
    let (f_dq, per_thread) = if tiled_dq {
        (gpu.function(source, &format!("attn_bwd_dq9_{name}"))?, 4)
    } else {
        dq_args.push(&mut d_arg as *mut i32 as *mut c_void);
        (
            gpu.function("attention.cu", &format!("attn_bwd_dq_{name}"))?,
            1,
        )
    };
    let n = dq_acc.numel() as u64 / per_thread;
    let dq_blocks = n.div_ceil(256).min(65_535 * 8) as u32;
    // SAFETY: argument lists match the kernels; every tensor outlives the launches (same stream).
    unsafe {
        gpu.launch(
            f_delta,
            (rows.div_ceil(4) as u32, 1, 1),
            (THREADS, 1, 1),
            0,
            std::slice::from_mut(&mut arg),
        )?;
        if d.sk > 0 {
            let grid = (
                ((d.sk + key_block - 1) / key_block) as u32,
                d.hk as u32,
                d.b as u32,
            );
            // V10, V12, V15 and V16 read lse and delta from their padded copies (same stream: after the delta
            // kernel) and takes its tensor maps first
            let mut p_main = p;
            if longest_first {
                // blocks over (batch, KV head) pairs, each reading its query heads' Q and dO
                // (and lse, delta) over every query tile
                let group = d.h / d.hk;
                p_main.lpt_group =
                    lpt_group(grid.0 as i64, d.hk * d.b, gpu, group * d.sq * (4 * d.d + 8));
            }
            let mut maps_arg = None;
            if let Some((maps, lse_pad, delta_pad)) = bwd10.as_mut() {
                delta_pad.narrow(2, 0, d.sq).copy_(&delta);
                p_main.lse = lse_pad.data_ptr() as u64;
                p_main.delta = delta_pad.data_ptr() as u64;
                maps_arg = Some(maps as *mut Bwd10Maps as *mut c_void);
            }
            let mut main_args: Vec<*mut c_void> = maps_arg.into_iter().collect();
            main_args.push(&mut p_main as *mut AttnParams as *mut c_void);
            gpu.launch(
                f_main,
                grid,
                (main_threads, 1, 1),
                smem as u32,
                &mut main_args,
            )?;
        }
        gpu.launch(f_dq, (dq_blocks, 1, 1), (256, 1, 1), 0, &mut dq_args)?;
    }
    if profiled && d.sk > 0 {
        print_backward_profile(gpu, variant, mask, d.sk)?;
    }
    drop(keep);
    Ok(result)
}

/// Prints what a profiling build of the backward left in `attn_bwd_prof` (attention_sm90.cu):
/// clock cycles per 64-query tile of each step, for each warpgroup of block 0 and of the middle
/// block along the keys. One line per warpgroup, `bwd<N>-prof ...`, as scripts/gpu-check.sh greps.
fn print_backward_profile(
    gpu: &Gpu,
    variant: Variant,
    mask: &AttentionMask,
    sk: i64,
) -> Result<()> {
    const SPANS: usize = 8; // BWD_PROF_SPANS
    let mut raw = [0i64; 4 * (SPANS + 2)];
    gpu.read_global_i64(crate::SM90A_ATTENTION, "attn_bwd_prof", &mut raw)?;
    for (slot, r) in raw.chunks(SPANS + 2).enumerate() {
        let tiles = r[SPANS];
        if tiles == 0 {
            continue;
        }
        println!(
            "bwd{}-prof sk{sk} causal{} block{} wg{} tiles {tiles} cycles/tile: load+bar {} S {} P {} dP+dS+pack {} to-bar {} dV+dQ {} dQ-out {} dK {}",
            variant.number(),
            u8::from(mask.causal),
            r[SPANS + 1],
            slot % 2,
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            r[5],
            r[6],
            r[7]
        );
    }
    Ok(())
}

/// Dense (B, 1, Sq, Sk) bool mask of allowed pairs, the meaning of `AttentionMask` spelled out.
pub fn dense_mask(mask: &AttentionMask, b: i64, sq: i64, sk: i64, device: Device) -> Tensor {
    let mut allowed = Tensor::ones([b, 1, sq, sk], (Kind::Bool, device));
    if mask.causal {
        let i = Tensor::arange(sq, (Kind::Int64, device)).view([sq, 1]);
        let j = Tensor::arange(sk, (Kind::Int64, device)).view([1, sk]);
        allowed = allowed.logical_and(&j.le_tensor(&(i + (sk - sq))));
    }
    if let Some(keep) = mask.key_keep {
        let keep = keep
            .to_device(device)
            .to_kind(Kind::Bool)
            .view([b, 1, 1, sk]);
        let rule = match mask.query_flags {
            // flagged rows need the key kept; other rows see every key
            Some(f) => keep.logical_or(
                &f.to_device(device)
                    .to_kind(Kind::Bool)
                    .logical_not()
                    .view([b, 1, sq, 1]),
            ),
            None => keep,
        };
        allowed = allowed.logical_and(&rule);
    }
    if let Some((bm, kblock)) = mask.block_mask {
        let per_key = bm
            .to_device(device)
            .to_kind(Kind::Bool)
            .repeat_interleave_self_int(kblock, 2, None)
            .narrow(2, 0, sk);
        allowed = allowed.logical_and(&per_key.view([b, 1, sq, sk]));
    }
    allowed
}

/// The slow reference: matmul + softmax in fp64, GQA by repeating K/V heads, rows that see no
/// key give 0. Returns fp64 (B, H, Sq, D); differentiable (use it for reference gradients).
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, mask: &AttentionMask, scale: f64) -> Tensor {
    let (b, h, sq) = (q.size()[0], q.size()[1], q.size()[2]);
    let (hk, sk) = (k.size()[1], k.size()[2]);
    let rep = h / hk;
    let k = k.repeat_interleave_self_int(rep, 1, None);
    let v = v.repeat_interleave_self_int(rep, 1, None);
    let scores = q.matmul(&k.transpose(-2, -1)) * scale; // (B, H, Sq, Sk)
    let allowed = dense_mask(mask, b, sq, sk, q.device());
    let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
    let any = allowed.any_dim(-1, true); // (B, 1, Sq, 1)
    let zero = Tensor::zeros([1], (q.kind(), q.device()));
    // Rows that see no key: softmax over zeros (finite, so gradients stay finite), then output 0.
    let probs = scores
        .where_self(&any, &zero)
        .softmax(-1, q.kind())
        .where_self(&any, &zero);
    probs.matmul(&v)
}

/// The log2-domain logsumexp the forward saves (`Forward::lse`), from the same dense mask as
/// [`reference`]: (B, H, Sq) in q's kind, log2(sum over allowed keys of exp(scale * q.k)), -inf
/// for rows that see no key.
pub fn reference_lse(q: &Tensor, k: &Tensor, mask: &AttentionMask, scale: f64) -> Tensor {
    let (b, h, sq) = (q.size()[0], q.size()[1], q.size()[2]);
    let (hk, sk) = (k.size()[1], k.size()[2]);
    let k = k.repeat_interleave_self_int(h / hk, 1, None);
    let scores = q.matmul(&k.transpose(-2, -1)) * scale; // (B, H, Sq, Sk)
    let allowed = dense_mask(mask, b, sq, sk, q.device());
    // (logsumexp over only -inf is -inf)
    let lse = scores
        .masked_fill(&allowed.logical_not(), f64::NEG_INFINITY)
        .logsumexp([-1i64].as_slice(), false); // (B, H, Sq)
    lse / std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_parses_and_names_the_variable_on_error() {
        assert_eq!(Variant::parse("v2").unwrap(), Variant::V2);
        assert_eq!(Variant::parse(" V3 ").unwrap(), Variant::V3);
        let err = Variant::parse("fast").unwrap_err().to_string();
        assert!(
            err.contains(VARIANT_ENV)
                && err.contains(
                    "v2, v3, v4, v5, v6, v7, v8, v9, v10, v12, v13, v14, v15, v16, v17, v18, v19 or v20"
                ),
            "{err}"
        );
        for v in Variant::ALL {
            assert_eq!(Variant::parse(v.name()).unwrap(), v);
            assert_eq!(v.name(), format!("v{}", v.number()));
        }
        // numbers are unique, so `variant()` finds back the one `set_variant` stored
        let numbers: Vec<u8> = Variant::ALL.iter().map(|v| v.number()).collect();
        assert_eq!(
            numbers,
            [2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17, 18, 19, 20]
        );
    }

    #[test]
    fn v12_units_pair_causal_tiles_and_fill_at_most_one_block_per_sm() {
        let dims = |sq: i64, h: i64, b: i64| Dims {
            b,
            h,
            hk: h,
            sq,
            sk: sq,
            d: 128,
        };
        // 640 rows: 5 tiles of 128, causal pairs (4, 0), (3, 1) and the lone middle tile 2
        assert_eq!(fwd12_units(&dims(640, 16, 4), false), 5 * 64);
        assert_eq!(fwd12_units(&dims(640, 16, 4), true), 3 * 64);
        assert_eq!(fwd12_units(&dims(1, 1, 1), true), 1);
        assert_eq!(fwd12_units(&dims(4096, 16, 4), true), 16 * 64);
        // every V12 kernel is in the sm_90a source's kernel list (kernels-check compiles them)
        for dtype in ["bf16", "f16"] {
            for d in [64, 128] {
                assert!(sm90a_kernel_names().contains(&fwd_kernel(Variant::V12, dtype, d)));
            }
        }
        assert_eq!(v4_backward(Variant::V12, "compute_90", 128), Variant::V12);
        assert_eq!(v4_backward(Variant::V12, "compute_90", 64), Variant::V3);
        assert_eq!(
            bwd_kernel(Variant::V12, "bf16", 128),
            "attn_bwd12_bf16_d128"
        );
        assert_eq!(v4_forward(Variant::V12, "compute_90", 80), Variant::V3);
        assert_eq!(v4_forward(Variant::V12, "compute_80", 128), Variant::V3);
    }

    #[test]
    fn v17_runs_v13s_kernels_unpadded() {
        for (arch, d) in [("compute_90", 128), ("compute_90", 64), ("compute_80", 128)] {
            assert_eq!(
                planned(Variant::V17, arch, d),
                planned(Variant::V13, arch, d)
            );
        }
        assert_eq!(planned(Variant::V17, "compute_90", 80).0, Variant::V3);
        assert_eq!(Variant::parse("V17").unwrap(), Variant::V17);
        // v18: v16's kernels (padded) with v17's order
        for (arch, d) in [("compute_90", 128), ("compute_90", 80), ("compute_90", 64)] {
            assert_eq!(
                planned(Variant::V18, arch, d),
                planned(Variant::V16, arch, d)
            );
        }
        let causal = AttentionMask {
            causal: true,
            ..Default::default()
        };
        assert!(longest_first(Variant::V18, &causal) && longest_first(Variant::V17, &causal));
        assert!(!longest_first(Variant::V16, &causal));
        assert!(!longest_first(Variant::V18, &AttentionMask::default()));
    }

    /// `lpt_block` (the CPU twin of the kernels' block order): every block of the grid gets one
    /// (level, pair) and every (level, pair) one block; inside a group of pairs the levels run
    /// longest (0) first; the grid ends with the last group's shortest tiles.
    #[test]
    fn longest_first_order_is_a_permutation_of_the_grid_by_groups() {
        for (tiles, pairs, group) in [
            (16, 128, 25),
            (16, 64, 17),
            (3, 7, 3),
            (5, 4, 4),
            (1, 9, 2),
            (7, 1, 1),
        ] {
            let mut seen = vec![false; (tiles * pairs) as usize];
            let mut last_level = vec![-1i64; pairs as usize];
            let mut previous = (0, -1i64); // (group, level)
            for linear in 0..tiles * pairs {
                let (level, pair) = lpt_block(linear, tiles, pairs, group);
                assert!((0..tiles).contains(&level) && (0..pairs).contains(&pair));
                let slot = &mut seen[(level * pairs + pair) as usize];
                assert!(
                    !*slot,
                    "({level}, {pair}) twice in {tiles} x {pairs} / {group}"
                );
                *slot = true;
                // each pair's tiles longest first; groups one after another
                assert_eq!(level, last_level[pair as usize] + 1);
                last_level[pair as usize] = level;
                let g = pair / group;
                assert!(
                    (g, level) >= previous,
                    "{linear}: group {g} level {level} after {previous:?}"
                );
                previous = (g, level);
            }
            assert!(seen.iter().all(|&b| b));
            let end = lpt_block(tiles * pairs - 1, tiles, pairs, group);
            assert_eq!(end.0, tiles - 1);
        }
    }

    #[test]
    fn longest_first_groups_start_two_waves_early_or_fill_half_the_l2() {
        let (sms, l2) = (132, 50 << 20);
        // forward, d128 s2048 causal, 16 heads x batch 8: K and V of a head are 1 MB
        assert_eq!(lpt_group_for(16, 128, sms, l2, 4 * 2048 * 128), 25);
        // backward, the text model's GQA (4 query heads per KV head): 4.3 MB of Q, dO per pair,
        // so two waves decide: 17 pairs x 16 key tiles = 272 blocks
        assert_eq!(lpt_group_for(16, 64, sms, l2, 4 * 2048 * (4 * 128 + 8)), 17);
        // at most every pair; at least one
        assert_eq!(lpt_group_for(16, 4, sms, l2, 1 << 20), 4);
        assert_eq!(lpt_group_for(4096, 2, sms, 0, 1 << 30), 1);
    }

    #[test]
    fn v13_runs_v7s_forward_and_v12s_backward_on_hopper() {
        assert_eq!(
            planned(Variant::V13, "compute_90", 128),
            (Variant::V7, Variant::V12)
        );
        assert_eq!(
            planned(Variant::V13, "compute_90", 64),
            (Variant::V7, Variant::V3)
        );
        assert_eq!(
            planned(Variant::V13, "compute_90", 80),
            (Variant::V3, Variant::V3)
        );
        assert_eq!(
            planned(Variant::V13, "compute_80", 128),
            (Variant::V3, Variant::V3)
        );
        assert_eq!(
            fwd_kernel(Variant::V13, "f16", 128),
            fwd_kernel(Variant::V7, "f16", 128)
        );
        assert_eq!(Variant::parse("V13").unwrap(), Variant::V13);
    }

    #[test]
    fn v14_pads_d80_both_ways_and_d64_in_the_backward_on_hopper_only() {
        let at = |v, arch, d, pass| kernel_head_dim(v, arch, d, pass);
        assert_eq!(at(Variant::V14, "compute_90", 80, Pass::Forward), 128);
        assert_eq!(at(Variant::V14, "compute_90", 80, Pass::Backward), 128);
        assert_eq!(at(Variant::V14, "compute_90", 64, Pass::Forward), 64);
        assert_eq!(at(Variant::V14, "compute_90", 64, Pass::Backward), 128);
        assert_eq!(at(Variant::V14, "compute_90", 128, Pass::Backward), 128);
        assert_eq!(at(Variant::V14, "compute_80", 80, Pass::Forward), 80);
        assert_eq!(at(Variant::V13, "compute_90", 80, Pass::Forward), 80);
        assert_eq!(at(Variant::V13, "compute_90", 64, Pass::Backward), 64);
        assert_eq!(
            planned(Variant::V14, "compute_90", 80),
            (Variant::V7, Variant::V12)
        );
        assert_eq!(
            planned(Variant::V14, "compute_90", 64),
            (Variant::V7, Variant::V12)
        );
        assert_eq!(
            planned(Variant::V14, "compute_90", 128),
            (Variant::V7, Variant::V12)
        );
        assert_eq!(
            planned(Variant::V14, "compute_80", 80),
            (Variant::V3, Variant::V3)
        );
        assert_eq!(
            planned(Variant::V13, "compute_90", 80),
            (Variant::V3, Variant::V3)
        );
    }

    /// What V14's padding relies on, in fp64 through the reference: zero columns in q, k, v change
    /// no score (the caller's scale kept), add zero output columns, leave delta = rowsum(out dout)
    /// as it was, and the gradients' first d columns are the unpadded gradients.
    #[test]
    fn zero_padding_the_head_dim_changes_no_output_or_gradient() {
        tch::manual_seed(3);
        let opts = (Kind::Double, Device::Cpu);
        let (b, h, hk, sq, sk, d) = (2, 4, 2, 9, 13, 80);
        let leaf = |t: Tensor| t.set_requires_grad(true);
        let q = leaf(Tensor::randn([b, h, sq, d], opts));
        let k = leaf(Tensor::randn([b, hk, sk, d], opts));
        let v = leaf(Tensor::randn([b, hk, sk, d], opts));
        let keep = Tensor::ones([b, sk], (Kind::Bool, Device::Cpu));
        let _ = keep.get(1).narrow(0, 10, 3).fill_(0);
        let mask = AttentionMask {
            causal: true,
            key_keep: Some(&keep),
            ..Default::default()
        };
        let scale = 1.0 / (d as f64).sqrt();
        let out = reference(&q, &k, &v, &mask, scale);
        let dout = Tensor::randn_like(&out);
        (&out * &dout).sum(Kind::Double).backward();

        let pad = |t: &Tensor| leaf(zero_padded(&t.detach(), 128));
        let (qp, kp, vp, dout_p) = (pad(&q), pad(&k), pad(&v), zero_padded(&dout, 128));
        assert_eq!(qp.size(), [b, h, sq, 128]);
        assert_eq!(qp.stride(), [sq * h * 128, 128, h * 128, 1]); // (B, S, H, D) memory
        let out_p = reference(&qp, &kp, &vp, &mask, scale);
        (&out_p * &dout_p).sum(Kind::Double).backward();
        let close = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) < 1e-12;
        assert!(close(&out_p.narrow(3, 0, d), &out));
        assert_eq!(
            out_p.narrow(3, d, 128 - d).abs().max().double_value(&[]),
            0.0
        );
        let delta = |o: &Tensor, g: &Tensor| (o * g).sum_dim_intlist(-1, false, Kind::Double);
        assert!(close(&delta(&out_p, &dout_p), &delta(&out, &dout)));
        for (padded, plain) in [(&qp, &q), (&kp, &k), (&vp, &v)] {
            assert!(close(&padded.grad().narrow(3, 0, d), &plain.grad()));
        }
    }

    #[test]
    fn v15_and_v16_pad_as_v14_and_run_their_own_backward() {
        for v in [Variant::V15, Variant::V16] {
            for (d, arch, want) in [
                (80, "compute_90", (Variant::V7, v)),
                (64, "compute_90", (Variant::V7, v)),
                (128, "compute_90", (Variant::V7, v)),
                (128, "compute_80", (Variant::V3, Variant::V3)),
            ] {
                assert_eq!(planned(v, arch, d), want, "{v:?} d{d} {arch}");
            }
            for dtype in ["bf16", "f16"] {
                let bwd = bwd_kernel(v, dtype, 128);
                assert_eq!(bwd, format!("attn_bwd{}_{dtype}_d128", v.number()));
                assert!(sm90a_kernel_names().contains(&bwd));
                let profiled = format!("attn_bwd{}p_{dtype}_d128", v.number());
                assert!(sm90a_kernel_names().contains(&profiled));
            }
        }
    }

    #[test]
    fn v15_is_the_default_and_v19_runs_its_kernels() {
        assert_eq!(DEFAULT_VARIANT, Variant::V15);
        for d in [64, 80, 128] {
            for arch in ["compute_90", "compute_80"] {
                for v in [Variant::V19, Variant::V20] {
                    assert_eq!(
                        planned(v, arch, d),
                        planned(Variant::V15, arch, d),
                        "d{d} {arch}"
                    );
                    for pass in [Pass::Forward, Pass::Backward] {
                        assert_eq!(
                            kernel_head_dim(v, arch, d, pass),
                            kernel_head_dim(Variant::V15, arch, d, pass)
                        );
                    }
                }
            }
        }
        assert_eq!(Variant::parse("v19").unwrap(), Variant::V19);
        assert_eq!(Variant::parse("v20").unwrap(), Variant::V20);
    }

    /// `exp2_fma` in cuda/attention_sm90.cu, step by step in f32: its constants give 2^x within
    /// 1e-4 relative for x in [-125, 1] and a tiny positive number (never NaN, inf or a negative)
    /// below.
    #[test]
    #[allow(clippy::excessive_precision)] // the constants as the CUDA source writes them
    fn the_fma_exp2_polynomial_is_within_1e_4() {
        fn exp2_fma(x: f32) -> f32 {
            let x = x.max(-125.0);
            let r = x + 12582912.0;
            let f = x - (r - 12582912.0);
            let p = 0.055171482f32
                .mul_add(f, 0.24261090)
                .mul_add(f, 0.69326097)
                .mul_add(f, 0.99992812);
            f32::from_bits(p.to_bits().wrapping_add(r.to_bits() << 23))
        }
        let mut worst = 0.0f64;
        for i in 0..=1_260_000 {
            let x = -125.0 + i as f32 * 1e-4;
            let want = (x as f64).exp2();
            worst = worst.max((exp2_fma(x) as f64 - want).abs() / want);
        }
        assert!(worst < 1e-4, "worst relative error {worst:e}");
        for x in [-125.5f32, -126.0, -1e30, f32::NEG_INFINITY] {
            let y = exp2_fma(x);
            assert!(y.is_finite() && y > 0.0 && y < 1e-37, "2^{x} gave {y}");
        }
    }

    #[test]
    fn sdpa_is_preferred_at_d80_unless_v19_pads_it() {
        for v in [Variant::V3, Variant::V13, Variant::V15, Variant::V18] {
            assert!(sdpa_faster(v, "compute_90", 80), "{v:?}");
            assert!(sdpa_faster(v, "compute_80", 80), "{v:?}");
        }
        for v in [Variant::V19, Variant::V20] {
            assert!(!sdpa_faster(v, "compute_90", 80), "{v:?}");
            assert!(sdpa_faster(v, "compute_80", 80), "{v:?}");
        }
        for d in [64, 128] {
            assert!(!sdpa_faster(Variant::V19, "compute_90", d));
            assert!(!sdpa_faster(Variant::V13, "compute_90", d));
        }
    }

    #[test]
    fn v4_runs_only_on_hopper_forward_at_d64_and_d128_backward_at_d128() {
        assert_eq!(v4_forward(Variant::V4, "compute_90", 128), Variant::V4);
        assert_eq!(v4_forward(Variant::V4, "compute_90", 64), Variant::V4);
        assert_eq!(v4_forward(Variant::V4, "compute_90", 80), Variant::V3);
        assert_eq!(v4_forward(Variant::V4, "compute_80", 128), Variant::V3);
        assert_eq!(v4_forward(Variant::V2, "compute_90", 128), Variant::V2);
        assert_eq!(v4_backward(Variant::V4, "compute_90", 128), Variant::V4);
        assert_eq!(v4_backward(Variant::V4, "compute_90", 64), Variant::V3);
        assert_eq!(v4_backward(Variant::V4, "compute_80", 128), Variant::V3);
        assert_eq!(v4_backward(Variant::V3, "compute_90", 128), Variant::V3);
        // Q + 2 stages of K and V at d128 must fit one block's 227 KB
        assert!(fwd4_smem(128) <= 227 * 1024, "{}", fwd4_smem(128));
        assert!(bwd4_smem(128) <= 227 * 1024, "{}", bwd4_smem(128));
        assert!(bwd6_smem(128) <= 227 * 1024, "{}", bwd6_smem(128));
        assert!(bwd12_smem(128) <= 227 * 1024, "{}", bwd12_smem(128));
        assert_eq!(sm90a_kernel_names().len(), 44);
        assert_eq!(v4_forward(Variant::V5, "compute_90", 128), Variant::V5);
        assert_eq!(v4_forward(Variant::V5, "compute_80", 64), Variant::V3);
        assert_eq!(v4_backward(Variant::V5, "compute_90", 128), Variant::V4);
        assert_eq!(v4_forward(Variant::V6, "compute_90", 128), Variant::V5);
        assert_eq!(v4_forward(Variant::V6, "compute_90", 80), Variant::V3);
        assert_eq!(v4_backward(Variant::V6, "compute_90", 128), Variant::V6);
        assert_eq!(v4_backward(Variant::V6, "compute_90", 64), Variant::V3);
        assert_eq!(v4_backward(Variant::V6, "compute_80", 128), Variant::V3);
        // V7: its own forward where V5's runs, V5's backward
        assert_eq!(v4_forward(Variant::V7, "compute_90", 64), Variant::V7);
        assert_eq!(v4_forward(Variant::V7, "compute_90", 80), Variant::V3);
        assert_eq!(v4_forward(Variant::V7, "compute_80", 128), Variant::V3);
        assert_eq!(v4_backward(Variant::V7, "compute_90", 128), Variant::V4);
        assert_eq!(v4_backward(Variant::V7, "compute_90", 64), Variant::V3);
        // V8: V7's forward, V6's backward, with their fallbacks
        assert_eq!(v4_forward(Variant::V8, "compute_90", 128), Variant::V7);
        assert_eq!(v4_forward(Variant::V8, "compute_90", 80), Variant::V3);
        assert_eq!(v4_backward(Variant::V8, "compute_90", 128), Variant::V6);
        assert_eq!(v4_backward(Variant::V8, "compute_80", 128), Variant::V3);
        // V9: V7's forward, its own backward at d128 on Hopper
        assert_eq!(v4_forward(Variant::V9, "compute_90", 64), Variant::V7);
        assert_eq!(v4_backward(Variant::V9, "compute_90", 128), Variant::V9);
        assert_eq!(v4_backward(Variant::V9, "compute_90", 64), Variant::V3);
        assert_eq!(bwd_kernel(Variant::V9, "bf16", 128), "attn_bwd9_bf16_d128");
        // V10: V7's forward, its own backward at d128 on Hopper (V9's for views TMA cannot load)
        assert_eq!(v4_forward(Variant::V10, "compute_90", 128), Variant::V7);
        assert_eq!(v4_backward(Variant::V10, "compute_90", 128), Variant::V10);
        assert_eq!(v4_backward(Variant::V10, "compute_80", 128), Variant::V3);
        assert!(bwd10_smem(128) <= 227 * 1024, "{}", bwd10_smem(128));
        assert!(fwd7_smem(128) <= 227 * 1024, "{}", fwd7_smem(128));
        assert_eq!(FWD7_ENTRY_REGISTERS, 168); // what ptxas gives 384 threads at 1 block/SM
    }

    #[test]
    fn kernel_names_cover_both_variants_and_keep_d80_backward_on_v2() {
        let names = kernel_names();
        for n in [
            "attn_fwd_bf16_d128",
            "attn_fwd3_bf16_d128",
            "attn_fwd3_f16_d80",
            "attn_bwd_f16_d80",
            "attn_bwd3_bf16_d64",
            "attn_bwd3_f16_d128",
            "attn_bwd_dq_bf16",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
        }
        assert!(!names
            .iter()
            .any(|x| x.starts_with("attn_bwd3_") && x.ends_with("_d80")));
        assert_eq!(bwd_kernel(Variant::V3, "bf16", 80), "attn_bwd_bf16_d80");
    }

    #[test]
    fn forward_key_tiles_match_the_cuda_instantiations() {
        // `fwd3_block_n` sizes shared memory; a mismatch with ATTN3_FWD(.., D, BN, ..) in
        // attention.cu would overrun it on the GPU, so the two are compared here.
        let src = include_str!("../cuda/attention.cu");
        let mut seen = 0;
        for line in src.lines().filter(|l| l.starts_with("ATTN3_FWD(")) {
            let args: Vec<i64> = line
                .trim_start_matches("ATTN3_FWD(")
                .split(',')
                .filter_map(|a| a.trim().parse().ok())
                .collect();
            assert_eq!(args.len(), 2, "{line}: expected D and BN");
            assert_eq!(fwd3_block_n(args[0]), args[1], "{line}");
            seen += 1;
        }
        assert_eq!(seen, 6, "one instantiation per dtype and head dim");
    }

    #[test]
    fn shared_memory_fits_two_blocks_per_sm_at_d128() {
        // 228 KB per SM on H100/H200 (227 KB usable per block); both v3 kernels plan on 2 blocks/SM.
        let fwd = (FWD3_BLOCK_M + 4 * fwd3_block_n(128)) * (128 + 8) * 2;
        let bwd = (4 * TILE * (128 + 8) + 2 * TILE * (TILE + 8)) * 2 + 2 * TILE * 4;
        assert!(2 * fwd <= 227 * 1024, "{fwd}");
        assert!(2 * bwd <= 227 * 1024, "{bwd}");
    }

    #[test]
    fn non_positive_scale_is_refused() {
        assert!(check_scale(0.125).is_ok());
        for bad in [0.0, -0.5, f64::NAN, f64::INFINITY] {
            let err = check_scale(bad).unwrap_err().to_string();
            assert!(err.contains("finite and positive"), "{err}");
        }
    }
}
