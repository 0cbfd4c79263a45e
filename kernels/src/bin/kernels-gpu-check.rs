//! `make gpu-check` (on a GPU host): every fused kernel against its fp64 reference on fresh random
//! inputs, then TFLOP/s and GB/s next to libtorch (SDPA, rms_norm) in the same run. Attention runs
//! every kernel variant in `--variants` (default: all of them, v2 ... v18) through the same
//! checks, then times a baseline and every passing variant listed after it: `--baseline vN`, else
//! (without `--variants`) the default variant; without a passing baseline, the newest passing
//! variant against the passing one listed before it (`--time v13,v16` names the timed variants
//! instead). So one call says whether the new variants are correct and how much each is faster
//! than the default and than the one before it. v19 and v20 are also compared with v15 on the
//! same inputs, row by row (they change which tiles skip masking, not the arithmetic). The
//! timings: a sweep of head dims and lengths without masks (`--sweep-time`: only some of the
//! timed variants), then the model's own three attention calls with their masks (`model ...`
//! rows: what `model.attention: fused` gains over `sdpa` in Llama 3.2 Vision's training step). Prints a table last; with `--out DIR` also writes
//! DIR/kernels-gpu.jsonl (kernels-gpu-<variants>.jsonl with `--variants`).
//! Without a GPU it prints `SKIP (no GPU)`.
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use kernels::attention::{self, AttentionMask, Variant};
use kernels::rmsnorm;
use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug)]
enum MaskKind {
    None,
    Causal,
    KeyPadding,
    Vision,
    CrossBlocks(i64),
    /// Mllama's vision mask over tiles of this many positions: the last 7 of each padded, and the
    /// first sample's second half of tiles all padding, so most 64 x 128 tiles are whole (what
    /// variant 19's mask cells skip the per-element masking on; `Vision` has none).
    VisionTiles(i64),
    /// Mllama's cross-attention mask over tiles of this many image tokens: rows 0-2 see no tile
    /// (zeros), the first sample's rows see the first half of the tiles, the second's all.
    CrossTiles(i64),
    /// CrossTiles with rows 0-159 seeing no tile (text before the image), so a whole 128-row
    /// query tile has no key at all: every key tile of it empty but the partial last one (never
    /// marked empty), zeros and no NaN out; v20 skips the empty ones' mask loads.
    CrossTilesTextFirst(i64),
    /// Causal text self-attention of a right-padded batch: the first sample's last this many
    /// positions are padding keys (the model's key mask), so most tiles below the diagonal are
    /// whole and the diagonal and padded ones partial.
    CausalPadded(i64),
}

struct Case {
    kind: Kind,
    d: i64,
    b: i64,
    h: i64,
    hk: i64,
    sq: i64,
    sk: i64,
    mask: MaskKind,
}

/// A case as (dtype, head dim, batch, query heads, KV heads, Sq, Sk, mask).
#[allow(clippy::too_many_arguments)]
const fn case(
    kind: Kind,
    d: i64,
    b: i64,
    h: i64,
    hk: i64,
    sq: i64,
    sk: i64,
    mask: MaskKind,
) -> Case {
    Case {
        kind,
        d,
        b,
        h,
        hk,
        sq,
        sk,
        mask,
    }
}

/// The correctness cases, each run by every variant checked.
fn attention_cases() -> Vec<Case> {
    use MaskKind::*;
    // the model's cross-attention shape: 300 text rows, 32 / 8 heads of 128, 4 tiles of 1601
    let cross = |b, mask| case(Kind::BFloat16, 128, b, 32, 8, 300, 4 * 1601, mask);
    vec![
        case(Kind::BFloat16, 64, 2, 4, 4, 1, 1, Causal),
        case(Kind::BFloat16, 128, 1, 8, 2, 17, 17, Causal),
        case(Kind::Half, 128, 2, 4, 1, 127, 127, Causal),
        case(Kind::BFloat16, 80, 2, 4, 4, 1000, 1000, Vision),
        case(Kind::Half, 80, 1, 2, 2, 127, 127, None),
        case(Kind::BFloat16, 128, 2, 8, 2, 300, 4 * 17, CrossBlocks(17)),
        case(Kind::Half, 64, 1, 8, 2, 4097, 4097, Causal),
        case(Kind::BFloat16, 128, 2, 8, 2, 1, 1000, Causal),
        case(Kind::BFloat16, 64, 2, 4, 4, 1000, 1000, KeyPadding),
        case(Kind::Half, 128, 1, 4, 4, 4097, 4097, None),
        // whole 64-row tiles with key padding, and causal with fewer queries than keys (the
        // diagonal offset), both through variant 10's TMA backward
        case(Kind::BFloat16, 128, 2, 8, 2, 256, 256, KeyPadding),
        case(Kind::BFloat16, 128, 1, 4, 4, 128, 384, Causal),
        // causal with more queries than keys: rows 0..700 see no key (zeros, no NaN), and
        // variant 12's first five query tiles have no key tile at all
        case(Kind::BFloat16, 128, 4, 16, 4, 1000, 300, Causal),
        // more work units than SMs, so variant 12's persistent blocks walk several query tiles
        // (Q, the K/V rings and the ping-pong token carried across): causal with an odd tile count
        // (a lone middle tile) and GQA, and without a mask
        case(Kind::BFloat16, 128, 4, 16, 4, 640, 640, Causal),
        case(Kind::Half, 64, 4, 16, 16, 300, 300, None),
        // the model's cross-attention: 32/8 heads over 4 tiles of 1601 vision tokens with the
        // per-tile block mask, long enough for variant 7's TMA forward (the case above is not)
        cross(1, CrossBlocks(1601)),
        // the same masks with whole tiles (variant 19's mask cells: most tiles skip per-element
        // masking, the rest do not), at head dims 80 (padded) and 128
        case(Kind::BFloat16, 80, 2, 4, 4, 800, 800, VisionTiles(200)),
        case(Kind::Half, 128, 2, 4, 2, 1000, 1000, VisionTiles(250)),
        cross(2, CrossTiles(1601)),
        cross(2, CrossTilesTextFirst(1601)),
        case(Kind::BFloat16, 128, 2, 8, 2, 1000, 1000, CausalPadded(300)),
    ]
}

/// ||a - ref|| / max(||ref||, 1e-3 * sqrt(n)): relative error, with an RMS floor of 1e-3 so that
/// references that are exactly zero (dq, dk with a single key) are judged by absolute error.
fn rel_err(a: &Tensor, reference: &Tensor) -> f64 {
    let a = a.to_kind(Kind::Double);
    let num = (&a - reference).norm().double_value(&[]);
    let den = reference
        .norm()
        .double_value(&[])
        .max(1e-3 * (reference.numel() as f64).sqrt());
    if a.isnan().any().int64_value(&[]) != 0 {
        return f64::NAN;
    }
    num / den
}

struct Masks {
    key_keep: Option<Tensor>,
    q_flags: Option<Tensor>,
    block: Option<(Tensor, i64)>,
    causal: bool,
}

impl Masks {
    fn new(c: &Case, dev: Device) -> Masks {
        let mut m = Masks {
            key_keep: None,
            q_flags: None,
            block: None,
            causal: false,
        };
        match c.mask {
            MaskKind::None => {}
            MaskKind::Causal => m.causal = true,
            MaskKind::KeyPadding => {
                m.key_keep = Some(Tensor::rand([c.b, c.sk], (Kind::Float, dev)).gt(0.2))
            }
            MaskKind::Vision => {
                // the last 7 of every 64 positions are padding (as Mllama pads each tile's patches)
                let pad = |s: i64| {
                    (Tensor::arange(s, (Kind::Int64, dev)).remainder(64).ge(57))
                        .unsqueeze(0)
                        .expand([c.b, s], true)
                };
                m.key_keep = Some(pad(c.sk).logical_not());
                m.q_flags = Some(pad(c.sq));
            }
            MaskKind::VisionTiles(per_tile) => {
                let pos = Tensor::arange(c.sq.max(c.sk), (Kind::Int64, dev));
                let pad = pos
                    .remainder(per_tile)
                    .ge(per_tile - 7)
                    .unsqueeze(0)
                    .repeat([c.b, 1]);
                let tiles = (c.sq.max(c.sk) + per_tile - 1) / per_tile;
                let half = (tiles / 2) * per_tile;
                let _ = pad.get(0).narrow(0, half, c.sq.max(c.sk) - half).fill_(1);
                m.key_keep = Some(pad.narrow(1, 0, c.sk).logical_not());
                m.q_flags = Some(pad.narrow(1, 0, c.sq));
            }
            MaskKind::CrossTiles(kb) | MaskKind::CrossTilesTextFirst(kb) => {
                let blind = match c.mask {
                    MaskKind::CrossTilesTextFirst(_) => 160,
                    _ => 3,
                };
                let nblk = (c.sk + kb - 1) / kb;
                let bm = Tensor::ones([c.b, c.sq, nblk], (Kind::Bool, dev));
                let _ = bm.get(0).narrow(1, nblk / 2, nblk - nblk / 2).fill_(0);
                let _ = bm.narrow(1, 0, c.sq.min(blind)).fill_(0);
                m.block = Some((bm, kb));
            }
            MaskKind::CausalPadded(pad) => {
                m.causal = true;
                let keep = Tensor::ones([c.b, c.sk], (Kind::Bool, dev));
                let pad = pad.min(c.sk);
                let _ = keep.get(0).narrow(0, c.sk - pad, pad).fill_(0);
                m.key_keep = Some(keep);
            }
            MaskKind::CrossBlocks(kb) => {
                let nblk = (c.sk + kb - 1) / kb;
                let bm = Tensor::rand([c.b, c.sq, nblk], (Kind::Float, dev)).gt(0.3);
                // the first rows see no tile at all (text before the image): output must be 0, not NaN
                let _ = bm.narrow(1, 0, c.sq.min(3)).fill_(0);
                m.block = Some((bm, kb));
            }
        }
        m
    }
    fn view(&self) -> AttentionMask<'_> {
        AttentionMask {
            causal: self.causal,
            key_keep: self.key_keep.as_ref(),
            query_flags: self.q_flags.as_ref(),
            block_mask: self.block.as_ref().map(|(t, k)| (t, *k)),
        }
    }
}

/// Where `got` (B, H, S, D) differs from `reference`: how many (b, h, s) rows are off (relative
/// error above 5 %, or not finite), the first few, the 128-row tiles and 16-column groups that hold
/// them, so a failed GPU run already points at the tile, stage or column block at fault.
fn mismatch_summary(got: &Tensor, reference: &Tensor) -> String {
    let got = got.to_kind(Kind::Double).to_device(Device::Cpu);
    let want = reference.detach().to_device(Device::Cpu);
    let sq = (&got - &want).square();
    let row_err = sq.sum_dim_intlist(&[-1i64][..], false, Kind::Double); // (B, H, S)
    let row_norm = want
        .square()
        .sum_dim_intlist(&[-1i64][..], false, Kind::Double);
    let bad = row_err
        .gt_tensor(&(row_norm * 0.0025 + 1e-12))
        .logical_or(&row_err.isfinite().logical_not()); // (B, H, S)
    let n_bad = bad.sum(Kind::Int64).int64_value(&[]);
    if n_bad == 0 {
        return "no row off by more than 5 %".into();
    }
    let idx = bad.nonzero(); // (n_bad, 3): b, h, s
    let first: Vec<String> = (0..n_bad.min(4))
        .map(|i| {
            let r = idx.get(i);
            format!(
                "({},{},{})",
                r.int64_value(&[0]),
                r.int64_value(&[1]),
                r.int64_value(&[2])
            )
        })
        .collect();
    let tiles: Vec<i64> = Vec::try_from(
        idx.select(1, 2)
            .divide_scalar_mode(128, "floor")
            .unique_dim(0, true, false, false)
            .0,
    )
    .unwrap_or_default();
    let d = got.size()[3];
    let groups: Vec<String> = (0..(d + 15) / 16)
        .filter(|g| {
            let w = (16).min(d - g * 16);
            let e = sq.narrow(3, g * 16, w).sum(Kind::Double).double_value(&[]);
            let n = want
                .narrow(3, g * 16, w)
                .square()
                .sum(Kind::Double)
                .double_value(&[]);
            e.is_nan() || e > 0.0025 * n + 1e-12
        })
        .map(|g| format!("{}..{}", g * 16, (g * 16 + 16).min(d)))
        .collect();
    let rows = row_err.size();
    format!(
        "{n_bad} of {} rows off, first (b,h,s) {}; 128-row tiles {:?}{}; columns {}",
        rows.iter().product::<i64>(),
        first.join(" "),
        &tiles[..tiles.len().min(12)],
        if tiles.len() > 12 { " ..." } else { "" },
        groups.join(" ")
    )
}

/// One case's random inputs: q as the model makes it (a strided view), k, v, the output's
/// gradient and the mask.
struct Inputs {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dout: Tensor,
    masks: Masks,
    scale: f64,
}

impl Inputs {
    fn new(c: &Case) -> Inputs {
        let dev = Device::Cuda(0);
        Inputs {
            q: Tensor::randn([c.b, c.sq, c.h, c.d], (c.kind, dev)).permute([0, 2, 1, 3]),
            k: Tensor::randn([c.b, c.hk, c.sk, c.d], (c.kind, dev)),
            v: Tensor::randn([c.b, c.hk, c.sk, c.d], (c.kind, dev)),
            dout: Tensor::randn([c.b, c.h, c.sq, c.d], (c.kind, dev)),
            masks: Masks::new(c, dev),
            scale: 1.0 / (c.d as f64).sqrt(),
        }
    }

    /// The variant in use's forward (into outputs poisoned with NaN) and backward.
    fn run_fused(&self) -> Result<(attention::Forward, attention::Backward), String> {
        let mask = self.masks.view();
        let mut fwd = attention::forward_outputs(&self.q).expect("q is (B, H, Sq, D)");
        let _ = fwd.out.fill_(f64::NAN);
        let _ = fwd.lse.fill_(f64::NAN);
        attention::fused_forward_into(&fwd, &self.q, &self.k, &self.v, &mask, self.scale)
            .map_err(|e| e.to_string())?;
        let grads = attention::fused_backward(
            &self.dout, &self.q, &self.k, &self.v, &fwd, &mask, self.scale,
        )
        .map_err(|e| e.to_string())?;
        if fwd.lse.isnan().any().int64_value(&[]) != 0 {
            return Err("lse has unwritten (NaN) elements".into());
        }
        Ok((fwd, grads))
    }
}

/// The largest absolute difference of a saved lse (B, H, Sq) from `reference` over the rows that
/// see a key (log2 domain), and the rows that see no key and are not -inf, or see keys and are
/// (infinite error, with a note).
fn lse_error(lse: &Tensor, reference: &Tensor) -> (f64, Option<String>) {
    let got = lse.to_kind(Kind::Double);
    let no_key = reference.isneginf();
    let wrong = got.isneginf().not_equal_tensor(&no_key);
    let n_wrong = wrong.sum(Kind::Int64).int64_value(&[]);
    if n_wrong > 0 {
        let missed = wrong.logical_and(&no_key).sum(Kind::Int64).int64_value(&[]);
        return (
            f64::INFINITY,
            Some(format!(
                "lse: {missed} rows that see no key are not -inf, {} rows that see keys are -inf",
                n_wrong - missed
            )),
        );
    }
    let diff = (&got - reference)
        .abs()
        .masked_select(&no_key.logical_not());
    match diff.numel() {
        0 => (0.0, None),
        _ => (diff.max().double_value(&[]), None),
    }
}

/// The largest absolute lse error (log2 domain) a case passes with: fp32 scores from exact
/// bf16/fp16 products are off by ~1e-5; one 32-key cell of 3200 dropped moves lse by 1.4e-2.
const LSE_TOL: f64 = 5e-3;

/// Returns (fwd err, dq err, dk err, dv err, lse err) and, for each above its tolerance (`tol`,
/// `LSE_TOL`), where it is off.
fn check_attention(c: &Case, tol: f64) -> Result<([f64; 5], Vec<String>), String> {
    let dev = Device::Cuda(0);
    let x = Inputs::new(c);
    let mask = x.masks.view();
    let (fwd, grads) = x.run_fused()?;

    let q64 = x.q.to_kind(Kind::Double).detach().set_requires_grad(true);
    let k64 = x.k.to_kind(Kind::Double).detach().set_requires_grad(true);
    let v64 = x.v.to_kind(Kind::Double).detach().set_requires_grad(true);
    let out64 = attention::reference(&q64, &k64, &v64, &mask, x.scale);
    let loss = (&out64 * x.dout.to_kind(Kind::Double)).sum(Kind::Double);
    let g = Tensor::run_backward(&[loss], &[&q64, &k64, &v64], false, false);
    let pairs = [
        ("out", &fwd.out, &out64),
        ("dq", &grads.dq, &g[0]),
        ("dk", &grads.dk, &g[1]),
        ("dv", &grads.dv, &g[2]),
    ];
    let e = pairs.map(|(_, got, want)| rel_err(got, want));
    let mut notes: Vec<String> = pairs
        .iter()
        .zip(e)
        .filter(|(_, e)| e.is_nan() || *e >= tol)
        .map(|((what, got, want), _)| format!("{what}: {}", mismatch_summary(got, want)))
        .collect();
    let lse64 = attention::reference_lse(&q64.detach(), &k64.detach(), &mask, x.scale);
    let (lse_err, lse_note) = lse_error(&fwd.lse, &lse64);
    notes.extend(lse_note);
    if lse_err.is_finite() && lse_err >= LSE_TOL {
        notes.push(format!("lse: off by up to {lse_err:.2e} (log2 domain)"));
    }
    // how much of the case the whole (v19, v20) and empty (v20) tile paths cover (none: only
    // the per-element path ran)
    let variant = attention::variant().ok();
    let cells = matches!(variant, Some(Variant::V19 | Variant::V20))
        .then(|| {
            let mark_empty = variant == Some(Variant::V20);
            kernels::mask_cells::classify(&mask, c.b, c.sq, c.sk, dev, mark_empty)
        })
        .flatten();
    if let Some(cells) = cells {
        let count = |state: u8| cells.eq(state as i64).sum(Kind::Int64).int64_value(&[]);
        notes.push(format!(
            "mask cells (64 x 32): {} whole, {} empty of {}",
            count(kernels::mask_cells::WHOLE),
            count(kernels::mask_cells::EMPTY),
            cells.numel()
        ));
    }
    Ok(([e[0], e[1], e[2], e[3], lse_err], notes))
}

/// The worst (b, h, s) row of `got` against `base` (both (B, H, S, D)): the row's difference
/// norm over the base row's, with an RMS floor of 1e-3 (rows that are zero: zeros must stay
/// zeros). A misjudged 32-key cell moves its rows by ~10% where the tensor's norm moves < 1%.
fn worst_row(got: &Tensor, base: &Tensor) -> f64 {
    let got = got.to_kind(Kind::Double);
    let base = base.to_kind(Kind::Double);
    if got.isnan().any().int64_value(&[]) != 0 {
        return f64::NAN;
    }
    let d = base.size()[3] as f64;
    let num = (&got - &base).norm_scalaropt_dim(2.0, [-1i64].as_slice(), false);
    let den = base
        .norm_scalaropt_dim(2.0, [-1i64].as_slice(), false)
        .clamp_min(1e-3 * d.sqrt());
    (num / den).max().double_value(&[])
}

/// The per-row difference a variant that only skips masking work may have from its base: dQ's
/// atomic adds may sum in another order (bf16 rounding of a few elements, < 4e-3 per row).
const AGREE_TOL: f64 = 2e-2;

/// `variant` against `base` on the same inputs: the worst row's relative difference of out, dq,
/// dk, dv, lse's largest absolute difference (infinite where -inf rows differ), and which of
/// the five are bitwise equal.
fn agreement(c: &Case, base: Variant, variant: Variant) -> Result<([f64; 5], [bool; 5]), String> {
    let x = Inputs::new(c);
    attention::set_variant(base);
    let (bf, bg) = x.run_fused()?;
    attention::set_variant(variant);
    let (vf, vg) = x.run_fused()?;
    let pairs = [
        (&vf.out, &bf.out),
        (&vg.dq, &bg.dq),
        (&vg.dk, &bg.dk),
        (&vg.dv, &bg.dv),
    ];
    let w = pairs.map(|(a, b)| worst_row(a, b));
    let (lse_diff, _) = lse_error(&vf.lse, &bf.lse.to_kind(Kind::Double));
    let same = [
        vf.out.equal(&bf.out),
        vg.dq.equal(&bg.dq),
        vg.dk.equal(&bg.dk),
        vg.dv.equal(&bg.dv),
        vf.lse.equal(&bf.lse),
    ];
    Ok(([w[0], w[1], w[2], w[3], lse_diff], same))
}

fn check_rmsnorm(kind: Kind, n: i64, c: i64) -> Result<[f64; 3], String> {
    let dev = Device::Cuda(0);
    let x = Tensor::randn([n, c], (kind, dev));
    let w = (Tensor::randn([c], (kind, dev)) * 0.1 + 1.0).to_kind(kind);
    let dy = Tensor::randn([n, c], (kind, dev));
    let (y, rstd) = rmsnorm::fused_forward(&x, &w, 1e-5).map_err(|e| e.to_string())?;
    let (dx, dw) = rmsnorm::fused_backward(&dy, &x, &w, &rstd).map_err(|e| e.to_string())?;
    let x64 = x.to_kind(Kind::Double).set_requires_grad(true);
    let w64 = w.to_kind(Kind::Double).set_requires_grad(true);
    let y64 = rmsnorm::reference(&x64, &w64, 1e-5);
    let g = Tensor::run_backward(
        &[(&y64 * dy.to_kind(Kind::Double)).sum(Kind::Double)],
        &[&x64, &w64],
        false,
        false,
    );
    Ok([rel_err(&y, &y64), rel_err(&dx, &g[0]), rel_err(&dw, &g[1])])
}

/// Median seconds per call of `f` (synchronized; warm-up first).
fn time_it(mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    tch::Cuda::synchronize(0);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        tch::Cuda::synchronize(0);
        samples.push(t.elapsed().as_secs_f64() / 5.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// The JSON lines, each written (and flushed) to the `--out` file as soon as it is made, so a
/// run killed by the script's time limit leaves the lines it got to. A value that is not finite
/// (a NaN error, a timing that failed) is written as null, which strict parsers accept.
struct JsonLines(Option<std::fs::File>);

impl JsonLines {
    fn push(&mut self, line: String) {
        if let Some(f) = &mut self.0 {
            let _ = writeln!(f, "{}", json_safe(&line));
            let _ = f.flush();
        }
    }
}

/// `line` with Rust's spellings of non-finite numbers after `:`, `,` or `[` made null.
fn json_safe(line: &str) -> String {
    let mut out = line.to_string();
    for open in [':', ',', '['] {
        for bad in ["NaN", "-inf", "inf"] {
            out = out.replace(&format!("{open}{bad}"), &format!("{open}null"));
        }
    }
    out
}

/// Whether the CUDA context still runs work: a kernel that trapped (a barrier watchdog) or
/// faulted poisons it, and every later call fails, so the variants after it would all ERROR.
fn cuda_alive() -> bool {
    guarded(|| {
        let t = Tensor::ones([1], (Kind::Float, Device::Cuda(0)));
        let v = (&t + 1.0).double_value(&[0]);
        if v == 2.0 {
            Ok(())
        } else {
            Err(format!("1 + 1 = {v}"))
        }
    })
    .is_ok()
}

/// One benchmark line: the timed variants' figures in timing order, oldest first (one figure
/// for kernels with one variant), and the libtorch peer's.
struct Row {
    name: String,
    ours: Vec<f64>,
    peer: f64,
    unit: &'static str,
}

/// How libtorch's SDPA is called on a case, as the model calls it (`sdpa_call` in
/// trainer/src/model/ops.rs): a dense additive bf16 mask (0 or bf16's lowest, `additive`) or none,
/// the causal flag, grouped
/// heads either native (`enable_gqa`) or with K/V repeated to the query heads first (a masked
/// grouped call on CUDA, where the flash kernel takes no mask and the memory-efficient one no
/// grouped heads).
struct SdpaCall {
    mask: Option<Tensor>,
    causal: bool,
    gqa: bool,
    repeat_kv: i64,
}

impl SdpaCall {
    fn plain(causal: bool) -> Self {
        SdpaCall {
            mask: None,
            causal,
            gqa: false,
            repeat_kv: 1,
        }
    }

    /// (k, v) as SDPA gets them.
    fn kv(&self, k: &Tensor, v: &Tensor) -> (Tensor, Tensor) {
        match self.repeat_kv {
            1 => (k.shallow_clone(), v.shallow_clone()),
            r => (
                k.repeat_interleave_self_int(r, 1, None),
                v.repeat_interleave_self_int(r, 1, None),
            ),
        }
    }

    fn run(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Tensor {
        let (k, v) = self.kv(k, v);
        Tensor::scaled_dot_product_attention(
            q,
            &k,
            &v,
            self.mask.as_ref(),
            0.0,
            self.causal,
            scale,
            self.gqa,
        )
    }

    /// Which backend libtorch's SDPA dispatches these inputs to (`at::_fused_sdp_choice`, the
    /// `SDPBackend` enum of torch 2.11).
    fn backend(&self, q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> String {
        let (k, v) = self.kv(k, v);
        let choice = Tensor::f_internal_fused_sdp_choice(
            q,
            &k,
            &v,
            self.mask.as_ref(),
            0.0,
            self.causal,
            scale,
            self.gqa,
        );
        match choice {
            Ok(0) => "math".into(),
            Ok(1) => "flash".into(),
            Ok(2) => "efficient".into(),
            Ok(3) => "cudnn".into(),
            Ok(n) => format!("#{n}"),
            Err(_) => "unknown".into(),
        }
    }
}

/// One timed attention problem: q (B, H, Sq, D) and k, v (B, Hk, Sk, D) over (B, S, H, D) memory
/// as the model's projections give them, its mask, and the FLOPs of its forward (FlashAttention's
/// count: 4 B Sq Sk H D, halved when causal; masked pairs count, both sides compute them).
struct BenchCase<'a> {
    tag: String,
    /// the shape's JSON fields
    shape: String,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: AttentionMask<'a>,
    sdpa: SdpaCall,
    flops_fwd: f64,
}

/// The model's additive mask for SDPA from a bool one (true = attend): 0 where allowed, bf16's
/// lowest value elsewhere (transformers' `finfo.min`), built once as the model builds it per step.
fn additive(allowed: &Tensor) -> Tensor {
    const BF16_LOWEST: f64 = -3.389_531_389_251_535_5e38;
    Tensor::zeros(allowed.size(), (Kind::BFloat16, allowed.device()))
        .masked_fill(&allowed.logical_not(), BF16_LOWEST)
}

/// Random bf16 (B, H, S, D) over (B, S, H, D) memory.
fn bshd(b: i64, h: i64, s: i64, d: i64) -> Tensor {
    Tensor::randn([b, s, h, d], (Kind::BFloat16, Device::Cuda(0))).permute([0, 2, 1, 3])
}

/// Times a case's forward and forward+backward with each of `timed` (at least one, each one of
/// `columns`, the table's variant columns: the others' figures are NaN), and SDPA's, into a row
/// pair and JSON lines. Several variants are timed in their order and again in reverse, each
/// figure the mean of its two medians: later ones read a few % low on identical kernels
/// (BENCHMARKS.md), which a one-way order counts against the newest.
/// A timing that fails (a panic: CUDA error, out of memory) is NaN in the row and null in JSON;
/// when the CUDA context is lost with it, Err: nothing after it can run.
fn time_case(
    rows: &mut Vec<Row>,
    json: &mut JsonLines,
    c: &BenchCase,
    timed: &[Variant],
    columns: &[Variant],
) -> Result<(), String> {
    let (q, k, v, mask) = (&c.q, &c.k, &c.v, &c.mask);
    let d = q.size()[3];
    let scale = 1.0 / (d as f64).sqrt();
    let dout = Tensor::randn(q.size(), (Kind::BFloat16, q.device()));
    let mut fwd = || {
        attention::fused_forward(q, k, v, mask, scale).expect("fused forward");
    };
    let mut fwd_bwd = || {
        let fwd = attention::fused_forward(q, k, v, mask, scale).expect("fused forward");
        attention::fused_backward(&dout, q, k, v, &fwd, mask, scale).expect("fused backward");
    };
    // a failed timing: NaN, unless it took the CUDA context with it
    let timing = |what: &str, f: &mut dyn FnMut()| -> Result<f64, String> {
        match guarded(|| Ok(time_it(&mut *f))) {
            Ok(t) => Ok(t),
            Err(e) => {
                println!("{}: {what} timing ERROR {e}", c.tag);
                match cuda_alive() {
                    true => Ok(f64::NAN),
                    false => Err(format!(
                        "the CUDA context is lost after {what} on {}",
                        c.tag
                    )),
                }
            }
        }
    };
    let (qg, kg, vg) = (
        q.detach().set_requires_grad(true),
        k.detach().set_requires_grad(true),
        v.detach().set_requires_grad(true),
    );
    let mut sdpa_fwd = || {
        let _ = c.sdpa.run(q, k, v, scale);
    };
    // The backward from `o` itself: autograd seeds it with ones_like(o) (one fill kernel), where
    // a scalar loss such as (o * dout).sum() would add three elementwise passes over (B, H, S, D)
    // that are not SDPA's cost (~5 % of its forward+backward at s2048; the tables measured before
    // session 10 include them).
    let mut sdpa_fwd_bwd = || {
        let o = c.sdpa.run(&qg, &kg, &vg, scale);
        let _ = Tensor::run_backward(&[o], &[&qg, &kg, &vg], false, false);
    };
    // [forward, forward+backward] seconds per timed variant, and SDPA's last: each timed in the
    // order variants-then-SDPA and again in reverse, the mean of the two (a later slot reads a
    // few per cent slower on identical kernels, so no side keeps the last one)
    let n = timed.len();
    let mut times: Vec<[f64; 2]> = vec![[0.0; 2]; n + 1];
    let forth = (0..=n).collect::<Vec<_>>();
    let back = forth.iter().rev().copied().collect::<Vec<_>>();
    for order in [forth, back] {
        for i in order {
            let (what, f, fb): (&str, &mut dyn FnMut(), &mut dyn FnMut()) = match timed.get(i) {
                Some(&variant) => {
                    attention::set_variant(variant);
                    (variant.name(), &mut fwd, &mut fwd_bwd)
                }
                None => ("SDPA", &mut sdpa_fwd, &mut sdpa_fwd_bwd),
            };
            times[i][0] += timing(what, f)? / 2.0;
            times[i][1] += timing(what, fb)? / 2.0;
        }
    }
    let [sdpa_f, sdpa_fb] = times[n];
    let ours = &times[..n];
    // (its checks depend on requires_grad: asked with the tensors each timing used)
    let backends = [
        c.sdpa.backend(q, k, v, scale),
        c.sdpa.backend(&qg, &kg, &vg, scale),
    ];
    println!(
        "{}: libtorch SDPA runs its {} backend (forward), {} (forward+backward)",
        c.tag, backends[0], backends[1]
    );
    for (pass, what, peer, fl, backend) in [
        (0, "fwd", sdpa_f, c.flops_fwd, &backends[0]),
        (1, "fwd+bwd", sdpa_fb, c.flops_fwd * 3.5, &backends[1]),
    ] {
        let tflops: Vec<f64> = ours.iter().map(|t| fl / t[pass] / 1e12).collect();
        let t_peer = fl / peer / 1e12;
        // the newest timed variant against SDPA and against the first (the baseline)
        let last = timed.len() - 1;
        let (new, t_new, t_old) = (timed[last], tflops[last], tflops[0]);
        let per_variant: Vec<String> = timed
            .iter()
            .zip(&tflops)
            .map(|(v, t)| format!("\"{}\":{t:.2}", v.name()))
            .collect();
        json.push(format!(
            "{{\"bench\":\"attention\",\"case\":\"{}\",\"pass\":\"{what}\",{},\"variant\":\"{}\",\"seconds\":{:.6e},\"tflops\":{t_new:.2},\"prev_variant\":\"{}\",\"prev_seconds\":{:.6e},\"prev_tflops\":{t_old:.2},\"variants_tflops\":{{{}}},\"sdpa_backend\":\"{backend}\",\"sdpa_seconds\":{peer:.6e},\"sdpa_tflops\":{t_peer:.2},\"ratio\":{:.3},\"speedup_vs_prev\":{:.3}}}",
            c.tag,
            c.shape,
            new.name(),
            ours[last][pass],
            timed[0].name(),
            ours[0][pass],
            per_variant.join(","),
            t_new / t_peer,
            t_new / t_old
        ));
        let in_columns = columns
            .iter()
            .map(|col| match timed.iter().position(|t| t == col) {
                Some(i) => tflops[i],
                None => f64::NAN,
            })
            .collect();
        rows.push(Row {
            name: format!("{} {what}", c.tag),
            ours: in_columns,
            peer: t_peer,
            unit: "TFLOP/s",
        });
    }
    Ok(())
}

/// Times `timed` (the baseline first) against SDPA: the sweep with `sweep` of them (variants
/// that differ only on masked calls run the same kernels there), the model's calls with all.
fn bench_attention(
    rows: &mut Vec<Row>,
    json: &mut JsonLines,
    timed: &[Variant],
    sweep: &[Variant],
) -> Result<(), String> {
    // d80 is the vision tower's (1280 / 16), non-causal: s4096 is ~2/3 of one image's 4 tiles of
    // 1608 padded patches, s1024 under one tile. Up to v13 every variant runs v3's forward and the
    // generic backward there (their rows differ only by noise); v14 on pads it to d128.
    // KERNELS_BENCH=quick: two lengths only, no model shapes (a device call with little time
    // left); KERNELS_BENCH=model: the model's calls only (where v19 and v20 differ from v15)
    let mode = std::env::var("KERNELS_BENCH").unwrap_or_default();
    let quick = mode == "quick";
    let sweep_dims: &[(i64, i64)] = match mode.as_str() {
        "model" => &[],
        _ => &[(128, 16), (64, 32), (80, 16)],
    };
    for &(d, h) in sweep_dims {
        let lengths: &[i64] = if d == 80 {
            &[1024, 4096]
        } else if quick {
            &[2048, 8192]
        } else {
            &[512, 1024, 2048, 4096, 8192]
        };
        let masks: &[bool] = if d == 80 { &[false] } else { &[false, true] };
        for &s in lengths {
            for &causal in masks {
                let b = 16384 / s;
                let case = BenchCase {
                    tag: format!("attn d{d} s{s} {}", if causal { "causal" } else { "full" }),
                    shape: format!(
                        "\"d\":{d},\"heads\":{h},\"seq\":{s},\"batch\":{b},\"causal\":{causal}"
                    ),
                    q: bshd(b, h, s, d),
                    k: bshd(b, h, s, d),
                    v: bshd(b, h, s, d),
                    mask: AttentionMask {
                        causal,
                        ..Default::default()
                    },
                    sdpa: SdpaCall::plain(causal),
                    flops_fwd: 4.0 * (b * s * s * h * d) as f64 / if causal { 2.0 } else { 1.0 },
                };
                if !sweep.is_empty() {
                    time_case(rows, json, &case, sweep, timed)?;
                }
            }
        }
    }
    if !quick {
        bench_model_shapes(rows, json, timed)?;
    }
    Ok(())
}

/// The three attention calls of Llama 3.2 11B Vision's training step at its own shapes, each with
/// the mask the model passes and SDPA called as the model's `sdpa` path calls it, so the rows say
/// what `model.attention: fused` gains over `sdpa` there (two samples, one 4-tile image each,
/// 2048 text tokens):
/// - vision: 16 heads of 80 over 4 x 1608 patches (1601 real per tile; the first image has 2 real
///   tiles), padded queries not seeing padded keys (Mllama's mask);
/// - text self-attention: 32 query heads over 8 KV heads of 128, causal (8 unpadded sequences:
///   SDPA's flash path with grouped heads; padded batches take a dense mask instead);
/// - cross-attention: the text's 32 / 8 heads over 4 x 1601 image tokens, each text row seeing
///   the real tiles of its image.
///
/// One configuration each: with 4 real tiles in every image, say, the model's SDPA path splits
/// the vision call into an unmasked one and a few masked rows (`AttnMask::dense_rows`).
fn bench_model_shapes(
    rows: &mut Vec<Row>,
    json: &mut JsonLines,
    timed: &[Variant],
) -> Result<(), String> {
    let dev = Device::Cuda(0);
    let b = 2;
    // vision
    let (tiles, per_tile, real) = (4i64, 1608i64, 1601i64);
    let s = tiles * per_tile;
    let pad = Tensor::zeros([b, tiles, per_tile], (Kind::Bool, dev));
    let _ = pad.narrow(2, real, per_tile - real).fill_(1);
    let _ = pad.get(0).narrow(0, 2, 2).fill_(1);
    let pad = pad.view([b, s]);
    let keep = pad.logical_not();
    let mask = AttentionMask {
        key_keep: Some(&keep),
        query_flags: Some(&pad),
        ..Default::default()
    };
    let dense = additive(&attention::dense_mask(&mask, b, s, s, dev));
    let (h, d) = (16, 80);
    let vision = BenchCase {
        tag: format!("model vision d{d} s{s}"),
        shape: format!("\"d\":{d},\"heads\":{h},\"seq\":{s},\"batch\":{b},\"causal\":false"),
        q: bshd(b, h, s, d),
        k: bshd(b, h, s, d),
        v: bshd(b, h, s, d),
        mask,
        sdpa: SdpaCall {
            mask: Some(dense),
            causal: false,
            gqa: false,
            repeat_kv: 1,
        },
        flops_fwd: 4.0 * (b * s * s * h * d) as f64,
    };
    time_case(rows, json, &vision, timed, timed)?;
    // text self-attention
    let (bt, st, h, hk, d) = (8i64, 2048i64, 32i64, 8i64, 128i64);
    let text = BenchCase {
        tag: format!("model text d{d} s{st} causal"),
        shape: format!(
            "\"d\":{d},\"heads\":{h},\"kv_heads\":{hk},\"seq\":{st},\"batch\":{bt},\"causal\":true"
        ),
        q: bshd(bt, h, st, d),
        k: bshd(bt, hk, st, d),
        v: bshd(bt, hk, st, d),
        mask: AttentionMask {
            causal: true,
            ..Default::default()
        },
        sdpa: SdpaCall {
            mask: None,
            causal: true,
            gqa: true,
            repeat_kv: 1,
        },
        flops_fwd: 4.0 * (bt * st * st * h * d) as f64 / 2.0,
    };
    time_case(rows, json, &text, timed, timed)?;
    // cross-attention
    let (sq, sk) = (2048i64, tiles * 1601);
    let blocks = Tensor::ones([b, sq, tiles], (Kind::Bool, dev));
    let _ = blocks.get(0).narrow(1, 2, 2).fill_(0);
    let mask = AttentionMask {
        block_mask: Some((&blocks, 1601)),
        ..Default::default()
    };
    let dense = additive(&attention::dense_mask(&mask, b, sq, sk, dev));
    let cross = BenchCase {
        tag: format!("model cross d{d} q{sq} k{sk}"),
        shape: format!(
            "\"d\":{d},\"heads\":{h},\"kv_heads\":{hk},\"seq\":{sq},\"keys\":{sk},\"batch\":{b},\"causal\":false"
        ),
        q: bshd(b, h, sq, d),
        k: bshd(b, hk, sk, d),
        v: bshd(b, hk, sk, d),
        mask,
        sdpa: SdpaCall {
            mask: Some(dense),
            causal: false,
            gqa: false,
            repeat_kv: h / hk,
        },
        flops_fwd: 4.0 * (b * sq * sk * h * d) as f64,
    };
    time_case(rows, json, &cross, timed, timed)
}

fn bench_rmsnorm(rows: &mut Vec<Row>, json: &mut JsonLines) {
    let dev = Device::Cuda(0);
    let (n, c) = (16384i64, 4096i64);
    let x = Tensor::randn([n, c], (Kind::BFloat16, dev));
    let w = Tensor::randn([c], (Kind::BFloat16, dev));
    let bytes = (2 * n * c * 2) as f64; // read x, write y
    let ours = time_it(|| {
        let _ = rmsnorm::fused_forward(&x, &w, 1e-5).expect("rmsnorm");
    });
    let peer = time_it(|| {
        let _ = x.rms_norm([c], Some(&w), 1e-5);
    });
    let (g_ours, g_peer) = (bytes / ours / 1e9, bytes / peer / 1e9);
    rows.push(Row {
        name: format!("rmsnorm fwd {n}x{c} bf16"),
        ours: vec![g_ours],
        peer: g_peer,
        unit: "GB/s",
    });
    json.push(format!("{{\"bench\":\"rmsnorm\",\"pass\":\"fwd\",\"rows\":{n},\"cols\":{c},\"seconds\":{ours:.6e},\"gbps\":{g_ours:.1},\"torch_seconds\":{peer:.6e},\"torch_gbps\":{g_peer:.1},\"ratio\":{:.3}}}", g_ours / g_peer));
}

/// The benchmark table, printed last: one column per timed variant (a kernel with one variant in the last), then
/// libtorch's figure, the last column's ratio to it, and per variant after the first its ratio to
/// the one before it and (from the third) to the first.
fn table(rows: &[Row], timed: &[Variant], gpu: &str, seconds: f64) -> String {
    let names: Vec<&str> = if timed.is_empty() {
        vec!["ours"]
    } else {
        timed.iter().map(|v| v.name()).collect()
    };
    let n = names.len();
    let mut ratio_names = Vec::new();
    for i in 1..n {
        ratio_names.push(format!("{}/{}", names[i], names[i - 1]));
        if i >= 2 {
            ratio_names.push(format!("{}/{}", names[i], names[0]));
        }
    }
    let mut header = format!("{:<38}", "benchmark");
    for name in &names {
        header += &format!(" {name:>8}");
    }
    header += &format!(" {:>9} {:>7}", "libtorch", "ratio");
    for r in &ratio_names {
        header += &format!(" {r:>8}");
    }
    let mut out = format!("{header}  unit   ({gpu}, {seconds:.0} s)\n");
    for r in rows {
        let mut line = format!("{:<38}", r.name);
        // a figure, or "-" for a NaN (a variant not timed on this row, or a failed timing)
        let cell = |x: f64, width: usize, prec: usize| match x.is_nan() {
            true => format!(" {:>width$}", "-"),
            false => format!(" {x:>width$.prec$}"),
        };
        for i in 0..n {
            // a row with fewer figures (one kernel) fills the last columns
            match (i + r.ours.len()).checked_sub(n) {
                Some(j) => line += &cell(r.ours[j], 8, 1),
                None => line += &format!(" {:>8}", "-"),
            }
        }
        // (the ratio of the last variant timed on the row)
        let last = r.ours.iter().rev().find(|x| !x.is_nan()).copied();
        line += &format!(" {:>9.1}", r.peer);
        line += &cell(last.unwrap_or(f64::NAN) / r.peer, 7, 2);
        for i in 1..n {
            let pairs: &[usize] = if i >= 2 { &[i - 1, 0] } else { &[i - 1] };
            for &j in pairs {
                line += &match r.ours.len() == n {
                    true => cell(r.ours[i] / r.ours[j], 8, 2),
                    false => format!(" {:>8}", "-"),
                };
            }
        }
        out += &format!("{line}  {}\n", r.unit);
    }
    out
}

/// Whether `c` is one of the cases made for v19's and v20's whole- and empty-tile paths.
fn tile_paths_case(variant: Variant, c: &Case) -> bool {
    matches!(variant, Variant::V19 | Variant::V20)
        && matches!(
            c.mask,
            MaskKind::VisionTiles(_)
                | MaskKind::CrossTiles(_)
                | MaskKind::CrossTilesTextFirst(_)
                | MaskKind::CausalPadded(_)
        )
}

fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panic".into())),
    }
}

/// The value after `flag` on the command line.
fn arg(flag: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != flag).nth(1)
}

/// The variants to check, oldest first: `--variants v5,v7`, else all (`Variant::ALL`).
fn variants_arg() -> Result<Vec<Variant>, String> {
    let Some(list) = arg("--variants") else {
        return Ok(Variant::ALL.to_vec());
    };
    list.split(',')
        .map(|v| Variant::parse(v).map_err(|e| e.to_string()))
        .collect()
}

/// The variants to time, the baseline first, among those whose cases all passed (a broken
/// kernel's speed means nothing): `requested` (`--time`) where given, in its order; else
/// `baseline` and every passing variant listed after it when it passed and is not the newest;
/// else the newest passing variant after the passing one listed before it (alone when it is the
/// only one). Empty when none passed.
fn timed_variants(
    variants: &[Variant],
    failures: &[usize],
    baseline: Option<Variant>,
    requested: Option<&[Variant]>,
) -> Vec<Variant> {
    let passing: Vec<Variant> = variants
        .iter()
        .zip(failures)
        .filter(|(_, &n)| n == 0)
        .map(|(v, _)| *v)
        .collect();
    if let Some(list) = requested {
        return list
            .iter()
            .copied()
            .filter(|v| passing.contains(v))
            .collect();
    }
    if let Some(at) = baseline.and_then(|b| passing.iter().position(|&v| v == b)) {
        if at + 1 < passing.len() {
            return passing[at..].to_vec();
        }
    }
    passing[passing.len().saturating_sub(2)..].to_vec()
}

/// `--time v13,v16` (or `--sweep-time v15`: those of the timed variants the unmasked sweep
/// times): the variants to time, each one of the checked `variants`.
fn time_arg(flag: &str, variants: &[Variant]) -> Result<Option<Vec<Variant>>, String> {
    let Some(list) = arg(flag) else {
        return Ok(None);
    };
    let timed = list
        .split(',')
        .map(|v| Variant::parse(v).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    match timed.iter().find(|v| !variants.contains(v)) {
        Some(v) => Err(format!(
            "{} is not checked in this run (an unchecked kernel may hang or be wrong): add it to --variants",
            v.name()
        )),
        None => Ok(Some(timed)),
    }
}

/// `--baseline vN`, else the default variant when `--variants` is not given.
fn baseline_arg() -> Result<Option<Variant>, String> {
    match arg("--baseline") {
        Some(v) => Variant::parse(&v).map(Some).map_err(|e| e.to_string()),
        None if arg("--variants").is_none() => Ok(Some(attention::DEFAULT_VARIANT)),
        None => Ok(None),
    }
}

fn main() -> std::process::ExitCode {
    let out_dir = arg("--out");
    let variants = match variants_arg() {
        Ok(v) => v,
        Err(e) => {
            println!("FAIL: --variants: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let baseline = match baseline_arg() {
        Ok(b) => b,
        Err(e) => {
            println!("FAIL: --baseline: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let (requested, sweep_requested) = match (
        time_arg("--time", &variants),
        time_arg("--sweep-time", &variants),
    ) {
        (Ok(t), Ok(s)) => (t, s),
        (Err(e), _) => {
            println!("FAIL: --time: {e}");
            return std::process::ExitCode::FAILURE;
        }
        (_, Err(e)) => {
            println!("FAIL: --sweep-time: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    if !kernels::runtime::cuda_available() {
        println!("SKIP (no GPU): libtorch sees no CUDA device or the driver is missing");
        return std::process::ExitCode::SUCCESS;
    }
    let gpu = match kernels::runtime::gpu(0) {
        Ok(g) => g,
        Err(e) => {
            println!("FAIL: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!(
        "device: {} ({}, {} SMs)",
        gpu.name, gpu.arch, gpu.multiprocessors
    );
    tch::manual_seed(0);
    let t0 = Instant::now();
    let mut failures = 0;
    let mut json = JsonLines(out_dir.as_ref().and_then(|dir| {
        let file = match arg("--variants") {
            Some(list) => format!("kernels-gpu-{}.jsonl", list.replace(',', "-")),
            Option::None => "kernels-gpu.jsonl".into(),
        };
        std::fs::File::create(std::path::Path::new(dir).join(file)).ok()
    }));
    let cases = attention_cases();
    println!(
        "{:<49} {:>9} {:>9} {:>9} {:>9} {:>9}  result",
        "attention case", "out", "dq", "dk", "dv", "lse"
    );
    // Oldest first: if a newer variant is broken badly enough to kill the CUDA context, the older
    // verdicts are already out. v4-v7 (wgmma) run only on compute capability 9.0.
    let mut variant_failures = vec![0usize; variants.len()];
    // one case of one variant: prints and records its verdict; whether it passed
    let mut check = |variant: Variant, c: &Case, tag: &str| -> bool {
        attention::set_variant(variant);
        let tol = if c.kind == Kind::BFloat16 { 1e-2 } else { 2e-3 };
        let name = format!(
            "{}{tag} {:?} d{} b{} h{}/{} sq{} sk{} {:?}",
            variant.name(),
            c.kind,
            c.d,
            c.b,
            c.h,
            c.hk,
            c.sq,
            c.sk,
            c.mask
        );
        match guarded(|| check_attention(c, tol)) {
            Ok((errs, notes)) => {
                // a launch-time fallback (TMA-unaddressable view, register count) ran another
                // variant's kernels: say so, or the verdict and timings are not this variant's;
                // on the cases with whole and empty tiles v19's and v20's verdict is about their
                // tile paths, which a fallback did not run, so there it fails the case
                let launched = attention::last_launched();
                let (pf, pb) = attention::planned(variant, &gpu.arch, c.d);
                let fell_back = launched != (Some(pf), Some(pb));
                let ok = errs[..4].iter().all(|e| *e < tol)
                    && errs[4] < LSE_TOL
                    && !(fell_back && tile_paths_case(variant, c));
                println!(
                    "{name:<49} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e}  {}",
                    errs[0],
                    errs[1],
                    errs[2],
                    errs[3],
                    errs[4],
                    if ok { "PASS" } else { "FAIL" }
                );
                for n in &notes {
                    println!("    {n}");
                }
                if fell_back {
                    let name = |v: Option<Variant>| v.map_or("none", |v| v.name());
                    println!(
                        "    ran forward {} / backward {} (planned {} / {}): a launch-time fallback{}",
                        name(launched.0),
                        name(launched.1),
                        pf.name(),
                        pb.name(),
                        if tile_paths_case(variant, c) {
                            " (FAIL: the tile paths this case is for did not run)"
                        } else {
                            ""
                        }
                    );
                }
                json.push(format!("{{\"check\":\"attention\",\"case\":\"{name}\",\"errors\":[{:e},{:e},{:e},{:e},{:e}],\"tol\":{tol},\"lse_tol\":{LSE_TOL},\"fallback\":{fell_back},\"pass\":{ok}}}", errs[0], errs[1], errs[2], errs[3], errs[4]));
                ok
            }
            Err(e) => {
                println!("{name:<49} ERROR {e}");
                false
            }
        }
    };
    // (a variant that failed may have taken the CUDA context with it: then every later call
    // fails, so the run ends here with the variants not checked named, for the script's
    // fallback, which checks them in processes of their own)
    let mut lost: Option<usize> = Option::None;
    for (vi, &variant) in variants.iter().enumerate() {
        for c in &cases {
            if !check(variant, c, "") {
                failures += 1;
                variant_failures[vi] += 1;
            }
        }
        if variant_failures[vi] > 0 && !cuda_alive() {
            lost = Some(vi);
            break;
        }
    }
    if let Some(vi) = lost {
        let rest: Vec<&str> = variants[vi + 1..].iter().map(|v| v.name()).collect();
        println!(
            "CUDA context lost during {}'s checks; not checked: {}",
            variants[vi].name(),
            if rest.is_empty() {
                "-".to_string()
            } else {
                rest.join(",")
            }
        );
        println!("SOME CHECKS FAILED");
        return std::process::ExitCode::FAILURE;
    }
    // v17's and v18's longest-first block order over several groups of 3 (batch, head) pairs,
    // the last one partial where the pairs do not divide by 3 (each problem above fits one group)
    attention::set_longest_first_group(Some(3));
    for (vi, &variant) in variants.iter().enumerate() {
        if !matches!(variant, Variant::V17 | Variant::V18) {
            continue;
        }
        for c in cases.iter().filter(|c| matches!(c.mask, MaskKind::Causal)) {
            if !check(variant, c, " groups3") {
                failures += 1;
                variant_failures[vi] += 1;
            }
        }
    }
    attention::set_longest_first_group(Option::None);
    // v19 and v20 change which tiles skip per-element masking, not the arithmetic: on the same
    // inputs their out, lse, dK and dV should be v15's bit for bit (dQ's atomic adds may sum in
    // another order), so a tile misjudged as whole or empty shows here even where the reference
    // error hides it (one 32-key cell of 3200 moves its rows by ~10%, the tensor by < 1%)
    let base = Variant::V15;
    let base_passed = variants
        .iter()
        .zip(&variant_failures)
        .any(|(v, &n)| *v == base && n == 0);
    for (vi, &variant) in variants.iter().enumerate() {
        if !matches!(variant, Variant::V19 | Variant::V20) {
            continue;
        }
        if !base_passed {
            // (a failure of the variant's: its verdict and the default it may become rest on
            // the agreement)
            println!(
                "{} against {}: not compared ({} not checked in this run, or failed): counted as a failed case",
                variant.name(),
                base.name(),
                base.name()
            );
            failures += 1;
            variant_failures[vi] += 1;
            continue;
        }
        for c in cases.iter().filter(|c| !matches!(c.mask, MaskKind::None)) {
            let name = format!(
                "{}={} {:?} d{} sq{} sk{} {:?}",
                variant.name(),
                base.name(),
                c.kind,
                c.d,
                c.sq,
                c.sk,
                c.mask
            );
            let ok = match guarded(|| agreement(c, base, variant)) {
                Ok((worst, same)) => {
                    let ok = worst[..4].iter().all(|w| *w < AGREE_TOL) && worst[4] < LSE_TOL;
                    let equal: Vec<&str> = ["out", "dq", "dk", "dv", "lse"]
                        .iter()
                        .zip(same)
                        .filter(|(_, s)| *s)
                        .map(|(n, _)| *n)
                        .collect();
                    println!(
                        "{name:<49} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e} {:>9.2e}  {}  (bitwise equal: {})",
                        worst[0],
                        worst[1],
                        worst[2],
                        worst[3],
                        worst[4],
                        if ok { "PASS" } else { "FAIL" },
                        if equal.is_empty() { "none".to_string() } else { equal.join(",") }
                    );
                    json.push(format!("{{\"check\":\"agreement\",\"case\":\"{name}\",\"worst_rows\":[{:e},{:e},{:e},{:e},{:e}],\"bitwise\":[{},{},{},{},{}],\"tol\":{AGREE_TOL},\"pass\":{ok}}}", worst[0], worst[1], worst[2], worst[3], worst[4], same[0], same[1], same[2], same[3], same[4]));
                    ok
                }
                Err(e) => {
                    println!("{name:<49} ERROR {e}");
                    false
                }
            };
            if !ok {
                failures += 1;
                variant_failures[vi] += 1;
            }
        }
    }
    attention::set_variant(Variant::V3);
    for &(kind, n, c) in &[
        (Kind::BFloat16, 1i64, 8i64),
        (Kind::BFloat16, 37, 4096),
        (Kind::Half, 1000, 1280),
    ] {
        let tol = if kind == Kind::BFloat16 { 1e-2 } else { 2e-3 };
        let name = format!("rmsnorm {kind:?} {n}x{c}");
        match guarded(|| check_rmsnorm(kind, n, c)) {
            Ok(errs) => {
                let ok = errs.iter().all(|e| *e < tol);
                failures += usize::from(!ok);
                println!(
                    "{name:<49} {:>9.2e} {:>9.2e} {:>9.2e} {:>9}  {}",
                    errs[0],
                    errs[1],
                    errs[2],
                    "",
                    if ok { "PASS" } else { "FAIL" }
                );
            }
            Err(e) => {
                failures += 1;
                println!("{name:<49} ERROR {e}");
            }
        }
    }
    println!(
        "checks done in {:.1} s; benchmarking",
        t0.elapsed().as_secs_f64()
    );
    let mut rows = Vec::new();
    let timed = timed_variants(&variants, &variant_failures, baseline, requested.as_deref());
    if timed.is_empty() {
        println!("no attention variant to time passed every case: attention is not timed");
    }
    if let Some(skipped) = requested.as_ref().filter(|r| r.len() > timed.len()) {
        let names: Vec<&str> = skipped
            .iter()
            .filter(|v| !timed.contains(v))
            .map(|v| v.name())
            .collect();
        println!("not timed (failed a check): {}", names.join(", "));
    }
    if let Err(e) = guarded(|| {
        if !timed.is_empty() {
            let sweep: Vec<Variant> = match &sweep_requested {
                Some(list) => timed.iter().copied().filter(|v| list.contains(v)).collect(),
                None => timed.clone(),
            };
            bench_attention(&mut rows, &mut json, &timed, &sweep)?;
        }
        bench_rmsnorm(&mut rows, &mut json);
        Ok(())
    }) {
        println!("benchmark ERROR {e}");
        failures += 1;
    }
    print!(
        "\n{}",
        table(&rows, &timed, &gpu.name, t0.elapsed().as_secs_f64())
    );
    for (v, n) in variants.iter().zip(variant_failures) {
        println!(
            "attention variant {}: {}",
            v.name(),
            if n == 0 {
                "all correctness cases PASS".to_string()
            } else {
                format!("{n} correctness case(s) FAILED (DEFAULT_VARIANT in kernels/src/attention.rs must not be this one)")
            }
        );
    }
    println!(
        "{}",
        if failures == 0 {
            "ALL CHECKS PASSED"
        } else {
            "SOME CHECKS FAILED"
        }
    );
    if failures == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use Variant::*;

    /// The tile-structured mask cases give variants 19 and 20 whole tiles, empty ones (v20) and
    /// partial ones, at the 128 x 128 tiles of the Hopper kernels (decided as the kernels do).
    #[test]
    fn the_tiled_mask_cases_cover_whole_empty_and_partial_tiles() {
        let mut tiled = 0;
        let mut blind_tiles = 0;
        for c in attention_cases() {
            if !tile_paths_case(V19, &c) {
                continue;
            }
            tiled += 1;
            let masks = Masks::new(&c, Device::Cpu);
            let cells =
                kernels::mask_cells::classify(&masks.view(), c.b, c.sq, c.sk, Device::Cpu, true)
                    .expect("a masked case");
            let states = kernels::mask_cells::tile_states(&cells);
            let (mut whole, mut empty, mut partial) = (0, 0, 0);
            for b in 0..c.b {
                for q0 in (0..c.sq).step_by(128) {
                    let mut all_empty = true;
                    for k0 in (0..c.sk).step_by(128) {
                        let is_empty = kernels::mask_cells::tile_empty(&states, b, q0, k0);
                        // (a partial last key cell is never marked empty: conservative)
                        all_empty &= is_empty || k0 + 128 > c.sk;
                        if kernels::mask_cells::tile_whole(&states, b, q0, k0, 128, c.sk) {
                            whole += 1;
                        } else if is_empty {
                            empty += 1;
                        } else {
                            partial += 1;
                        }
                    }
                    blind_tiles += usize::from(all_empty);
                }
            }
            assert!(
                whole > 10 && empty > 5 && partial > 5,
                "{:?}: {whole} whole, {empty} empty, {partial} partial",
                c.mask
            );
        }
        assert_eq!(tiled, 5);
        // CrossTilesTextFirst: the first 128-row tile of each sample sees no whole key tile
        assert_eq!(blind_tiles, 2);
    }

    #[test]
    fn the_newest_passing_variant_is_timed_against_the_passing_one_before_it() {
        let all = [V2, V3, V4, V5, V6];
        assert_eq!(timed_variants(&all, &[0, 0, 0, 0, 0], None, None), [V5, V6]);
        assert_eq!(timed_variants(&all, &[0, 0, 0, 0, 3], None, None), [V4, V5]);
        assert_eq!(timed_variants(&all, &[0, 0, 0, 1, 0], None, None), [V4, V6]);
        let pair = [V5, V7];
        assert_eq!(timed_variants(&pair, &[0, 0], None, None), [V5, V7]);
        assert_eq!(timed_variants(&pair, &[0, 2], None, None), [V5]);
        assert!(timed_variants(&pair, &[1, 2], None, None).is_empty());
    }

    #[test]
    fn a_passing_baseline_is_timed_with_every_passing_variant_after_it() {
        let all = [V3, V4, V5, V6];
        let b = Some(V4);
        assert_eq!(timed_variants(&all, &[0, 0, 0, 0], b, None), [V4, V5, V6]);
        assert_eq!(timed_variants(&all, &[0, 0, 1, 0], b, None), [V4, V6]);
        // a failed baseline, or one that is the newest itself, falls back to the one before
        assert_eq!(timed_variants(&all, &[0, 1, 0, 0], b, None), [V5, V6]);
        assert_eq!(
            timed_variants(&all, &[0, 0, 0, 0], Some(V6), None),
            [V5, V6]
        );
        assert_eq!(timed_variants(&all, &[0, 0, 0, 2], b, None), [V4, V5]);
        assert!(timed_variants(&all, &[1, 1, 1, 1], b, None).is_empty());
    }

    #[test]
    fn the_table_has_a_column_per_timed_variant_and_their_ratios() {
        let rows = [
            Row {
                name: "attn d128 s2048 full fwd".into(),
                ours: vec![400.0, 440.0, 500.0],
                peer: 500.0,
                unit: "TFLOP/s",
            },
            Row {
                name: "rmsnorm fwd".into(),
                ours: vec![3000.0],
                peer: 2000.0,
                unit: "GB/s",
            },
        ];
        let t = table(&rows, &[V13, V15, V16], "H200", 9.0);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0][..9],
            [
                "benchmark",
                "v13",
                "v15",
                "v16",
                "libtorch",
                "ratio",
                "v15/v13",
                "v16/v15",
                "v16/v13"
            ]
        );
        assert_eq!(
            lines[1][5..],
            ["400.0", "440.0", "500.0", "500.0", "1.00", "1.10", "1.14", "1.25", "TFLOP/s"]
        );
        // one kernel: its figure in the last variant's column, no ratios between variants
        assert_eq!(
            lines[2][2..],
            ["-", "-", "3000.0", "2000.0", "1.50", "-", "-", "-", "GB/s"]
        );
        // a sweep row timed with the baseline only: "-" for the others, its ratio to libtorch
        let sweep = [Row {
            name: "attn d128 s4096 full fwd".into(),
            ours: vec![450.0, f64::NAN, f64::NAN],
            peer: 500.0,
            unit: "TFLOP/s",
        }];
        let t = table(&sweep, &[V15, V19, V20], "H200", 9.0);
        let line: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            line[5..],
            ["450.0", "-", "-", "500.0", "0.90", "-", "-", "-", "TFLOP/s"]
        );
    }

    #[test]
    fn non_finite_numbers_are_written_as_null() {
        let line = format!(
            "{{\"case\":\"v13 inf NaN\",\"errors\":[{:e},{:e},{:e}],\"t\":{:.2}}}",
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN
        );
        let safe = json_safe(&line);
        assert_eq!(
            safe,
            "{\"case\":\"v13 inf NaN\",\"errors\":[null,null,null],\"t\":null}"
        );
    }

    #[test]
    fn requested_variants_are_timed_in_their_order_when_they_passed() {
        let all = [V3, V4, V5, V6];
        let asked = [V6, V3, V5];
        let b = Some(V4);
        assert_eq!(timed_variants(&all, &[0, 0, 0, 0], b, Some(&asked)), asked);
        assert_eq!(
            timed_variants(&all, &[0, 0, 1, 0], b, Some(&asked)),
            [V6, V3]
        );
        assert!(timed_variants(&all, &[1, 0, 0, 1], b, Some(&[V3, V6])).is_empty());
    }
}

#[cfg(test)]
mod summary_tests {
    use super::*;

    #[test]
    fn mismatch_summary_names_rows_tiles_and_columns() {
        let want = Tensor::ones([1, 2, 300, 80], (Kind::Double, Device::Cpu));
        let got = want.copy();
        // head 1, rows 130 and 131 (tile 1), columns 64..80 wrong; one NaN in head 0 row 5
        let _ = got
            .narrow(1, 1, 1)
            .narrow(2, 130, 2)
            .narrow(3, 64, 16)
            .fill_(9.0);
        let _ = got
            .narrow(2, 5, 1)
            .narrow(1, 0, 1)
            .narrow(3, 0, 1)
            .fill_(f64::NAN);
        let s = mismatch_summary(&got, &want);
        assert!(s.starts_with("3 of 600 rows off"), "{s}");
        assert!(s.contains("(0,0,5) (0,1,130) (0,1,131)"), "{s}");
        assert!(s.contains("128-row tiles [0, 1]"), "{s}");
        assert!(s.contains("columns 0..16 64..80"), "{s}");
        assert_eq!(
            mismatch_summary(&want, &want),
            "no row off by more than 5 %"
        );
    }
}
