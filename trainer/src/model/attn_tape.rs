//! Training through the fused attention kernels, which have no autograd (tch has no custom
//! autograd functions): the FSDP schedule runs a stage's recompute inside [`record`], where each
//! fused attention call returns its output as a fresh *leaf* and writes an [`Entry`] on a tape.
//! The stage's backward is then cut at those leaves ([`backward`]):
//!   1. autograd from the stage output down to its inputs, parameters and the attention leaves
//!      (everything after each attention: output projection, residuals, MLP);
//!   2. per attention call, newest first: the kernels' explicit backward turns the leaf's gradient
//!      into dq, dk, dv; autograd then carries `sum(q dq + k dk + v dv)` to the inputs and
//!      parameters (norms, q/k/v projections, LoRA), and to the leaves of earlier calls.
//!
//! The sums over the passes are the stage's gradients: each pass walks a disjoint part of the
//! graph. On CPU, with [`set_reference`] (tests) or `LLAVA_SCO_FUSED_REFERENCE=1`, the same
//! plumbing runs `kernels::attention::reference` in place of the CUDA kernels, so it is tested
//! without a GPU.
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

use kernels::attention::{self, AttentionMask, Forward};
use tch::Tensor;

use super::ModelError;

/// One fused attention call recorded for the explicit backward.
pub struct Entry {
    /// The call's inputs, still attached to the stage's graph: (B, H, Sq, D), (B, Hk, Sk, D).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// The leaf returned in place of the output (B, H, Sq, D); its gradient is the kernel's dout.
    leaf: Tensor,
    /// The kernel's forward (output and log-sum-exp); `None` in reference mode.
    fwd: Option<Forward>,
    mask: OwnedMask,
    scale: f64,
}

/// `kernels::attention::AttentionMask` with owned tensors (the tape outlives the model's masks).
struct OwnedMask {
    causal: bool,
    key_keep: Option<Tensor>,
    query_flags: Option<Tensor>,
    block: Option<(Tensor, i64)>,
}

impl OwnedMask {
    fn of(m: &AttentionMask) -> Self {
        Self {
            causal: m.causal,
            key_keep: m.key_keep.map(Tensor::shallow_clone),
            query_flags: m.query_flags.map(Tensor::shallow_clone),
            block: m.block_mask.map(|(t, n)| (t.shallow_clone(), n)),
        }
    }
    fn borrow(&self) -> AttentionMask<'_> {
        AttentionMask {
            causal: self.causal,
            key_keep: self.key_keep.as_ref(),
            query_flags: self.query_flags.as_ref(),
            block_mask: self.block.as_ref().map(|(t, n)| (t, *n)),
        }
    }
}

thread_local! {
    static TAPE: RefCell<Option<Vec<Entry>>> = const { RefCell::new(None) };
}
static REFERENCE: AtomicBool = AtomicBool::new(false);

/// Tests: fused attention on CPU runs the tch reference through the same plumbing.
pub fn set_reference(on: bool) {
    REFERENCE.store(on, Ordering::Relaxed);
}

/// Reference mode: [`set_reference`] or `LLAVA_SCO_FUSED_REFERENCE=1` (for tests in subprocesses;
/// read once: this runs on every attention call).
pub fn reference_mode() -> bool {
    static FROM_ENV: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    REFERENCE.load(Ordering::Relaxed)
        || *FROM_ENV
            .get_or_init(|| std::env::var("LLAVA_SCO_FUSED_REFERENCE").is_ok_and(|v| v == "1"))
}

/// Runs `f` with a fresh tape and returns its result and the fused attention calls it recorded.
pub fn record<R>(f: impl FnOnce() -> R) -> (R, Vec<Entry>) {
    let outer = TAPE.with(|t| t.borrow_mut().replace(Vec::new()));
    let r = f();
    let entries = TAPE.with(|t| std::mem::replace(&mut *t.borrow_mut(), outer));
    (r, entries.unwrap_or_default())
}

/// Fused attention for `attend`: the kernels' forward (or the reference), and, when q, k or v
/// need a gradient, the output as a leaf recorded on the tape. Returns (B, H, Sq, D).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &AttentionMask,
    scale: f64,
) -> Result<Tensor, ModelError> {
    let grad = q.requires_grad() || k.requires_grad() || v.requires_grad();
    let recording = TAPE.with(|t| t.borrow().is_some());
    if grad && !recording {
        return Err(ModelError::Attention(
            "model.attention=fused has no autograd backward in the plain model; train through the FSDP \
             unit schedule (fsdp.enabled: true, which calls kernels::attention::fused_backward) or use sdpa"
                .into(),
        ));
    }
    let err = |e: kernels::KernelError| ModelError::Attention(format!("fused attention: {e}"));
    let (out, fwd) = if reference_mode() && !q.device().is_cuda() {
        let out = tch::no_grad(|| attention::reference(q, k, v, mask, scale));
        (out, None)
    } else {
        let f = attention::fused_forward(q, k, v, mask, scale).map_err(err)?;
        (f.out.shallow_clone(), Some(f))
    };
    if !grad {
        return Ok(out);
    }
    let leaf = out.detach().set_requires_grad(true);
    let entry = Entry {
        q: q.shallow_clone(),
        k: k.shallow_clone(),
        v: v.shallow_clone(),
        leaf: leaf.shallow_clone(),
        fwd,
        mask: OwnedMask::of(mask),
        scale,
    };
    TAPE.with(|t| t.borrow_mut().as_mut().map(|tape| tape.push(entry)));
    Ok(leaf)
}

/// dq, dk, dv of one call from its output gradient `dout` (B, H, Sq, D).
fn call_backward(e: &Entry, dout: &Tensor) -> Result<[Tensor; 3], ModelError> {
    let mask = e.mask.borrow();
    let (q, k, v) = (e.q.detach(), e.k.detach(), e.v.detach());
    match &e.fwd {
        Some(fwd) => {
            let g = attention::fused_backward(dout, &q, &k, &v, fwd, &mask, e.scale)
                .map_err(|err| ModelError::Attention(format!("fused attention backward: {err}")))?;
            Ok([g.dq, g.dk, g.dv])
        }
        None => {
            // reference: autograd through the slow attention on leaf copies
            let (q, k, v) = (
                q.set_requires_grad(true),
                k.set_requires_grad(true),
                v.set_requires_grad(true),
            );
            let o = attention::reference(&q, &k, &v, &mask, e.scale);
            let root = (o * dout.to_kind(q.kind())).sum(q.kind());
            let g = Tensor::f_run_backward(&[root], &[&q, &k, &v], false, false)?;
            let mut g = g.into_iter();
            let mut next = || g.next().unwrap_or_else(|| Tensor::zeros_like(&q));
            Ok([next(), next(), next()])
        }
    }
}

/// The gradients of `targets` from `root` (a scalar) through a graph cut at the tape's leaves
/// (see the module doc); `None` where a target is not reached. With an empty tape this is one
/// `run_backward`.
pub fn backward(
    root: &Tensor,
    targets: &[Tensor],
    tape: &[Entry],
) -> Result<Vec<Option<Tensor>>, ModelError> {
    let n = targets.len();
    // gradient slots: targets, then each call's leaf
    let mut slots: Vec<Option<Tensor>> = (0..n + tape.len()).map(|_| None).collect();
    // pass 1: the stage output down to targets and every leaf (graphs kept for the later passes)
    pass(root, targets, tape, &mut slots, !tape.is_empty())?;
    // passes 2..: each call, newest first (its leaf gradient is then complete)
    for c in (0..tape.len()).rev() {
        let Some(dout) = slots[n + c].take() else {
            continue; // the output was not used
        };
        let e = &tape[c];
        let [dq, dk, dv] = call_backward(e, &dout)?;
        let mut root = Tensor::zeros([], (tch::Kind::Float, e.q.device()));
        for (x, g) in [(&e.q, dq), (&e.k, dk), (&e.v, dv)] {
            if x.requires_grad() {
                root += (x * g.to_kind(x.kind())).sum(tch::Kind::Float);
            }
        }
        if root.requires_grad() {
            pass(&root, targets, &tape[..c], &mut slots, c > 0)?;
        }
    }
    slots.truncate(n);
    Ok(slots)
}

/// One autograd pass from `root` to `targets` and the leaves of `calls`, each gradient added to
/// its slot in `slots` (targets first, then the calls' leaves); `keep` keeps the graph.
fn pass(
    root: &Tensor,
    targets: &[Tensor],
    calls: &[Entry],
    slots: &mut [Option<Tensor>],
    keep: bool,
) -> Result<(), ModelError> {
    let mut all: Vec<&Tensor> = targets.iter().collect();
    all.extend(calls.iter().map(|e| &e.leaf));
    add_defined(slots, Tensor::f_run_backward(&[root], &all, keep, false)?);
    Ok(())
}

/// Adds each defined gradient of a `run_backward` result to its slot (an undefined one: the
/// target was not reached).
pub(crate) fn add_defined(slots: &mut [Option<Tensor>], grads: Vec<Tensor>) {
    for (slot, g) in slots.iter_mut().zip(grads) {
        if g.defined() {
            *slot = Some(match slot.take() {
                Some(a) => a + g,
                None => g,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// x -> q, k, v projections -> attention -> output projection, with the attention cut on the
    /// tape, against plain autograd through the reference attention.
    #[test]
    fn cut_backward_equals_plain_autograd() {
        set_reference(true);
        tch::manual_seed(5);
        let opts = (Kind::Float, Device::Cpu);
        let (b, s, h, hk, d) = (2, 7, 4, 2, 8);
        let x = Tensor::randn([b, s, h * d], opts).set_requires_grad(true);
        let wq = Tensor::randn([h * d, h * d], opts).set_requires_grad(true);
        let wk = Tensor::randn([h * d, hk * d], opts).set_requires_grad(true);
        let wv = Tensor::randn([h * d, hk * d], opts).set_requires_grad(true);
        let wo = Tensor::randn([h * d, h * d], opts).set_requires_grad(true);
        let mask = AttentionMask {
            causal: true,
            ..Default::default()
        };
        let heads = |t: Tensor, n: i64| t.view([b, s, n, d]).transpose(1, 2);
        let run = |cut: bool| -> Tensor {
            let q = heads(x.matmul(&wq), h);
            let k = heads(x.matmul(&wk), hk);
            let v = heads(x.matmul(&wv), hk);
            let o = if cut {
                attend(&q, &k, &v, &mask, 0.3).unwrap()
            } else {
                attention::reference(&q, &k, &v, &mask, 0.3)
            };
            // residual + output projection: x reaches y both around and through the attention
            (o.transpose(1, 2).reshape([b, s, h * d]).matmul(&wo) + &x)
                .square()
                .sum(Kind::Float)
        };
        let targets = [&x, &wq, &wk, &wv, &wo].map(Tensor::shallow_clone);
        let want = Tensor::run_backward(&[run(false)], &targets, false, false);
        let (y, tape) = record(|| run(true));
        assert_eq!(tape.len(), 1);
        let got = backward(&y, &targets, &tape).unwrap();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let g = g.as_ref().expect("every target has a gradient");
            let rel = (g - w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]);
            assert!(rel < 1e-5, "target {i}: rel {rel}");
        }
        assert!(
            attend(
                &x.view([b, s, h, d]).transpose(1, 2),
                &x.view([b, s, h, d]).transpose(1, 2),
                &x.view([b, s, h, d]).transpose(1, 2),
                &mask,
                0.3
            )
            .is_err(),
            "grad outside a recording must be refused"
        );
    }
}
