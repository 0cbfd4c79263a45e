//! AdamW on flat fp32 tensors, step for step `torch.optim.AdamW` (foreach=False, amsgrad=False):
//! ```text
//! p *= 1 - lr * wd
//! m = lerp(m, g, 1 - b1)             v = v * b2 + (1 - b2) g^2
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! The state is one (m, v) pair and one step count per parameter tensor; for FSDP the tensors are
//! this rank's flat shards, so optimizer state is sharded like the parameters. A tensor without a
//! gradient in a step (`step_present`) is left alone, as torch skips a parameter whose `.grad` is
//! None: no decay, no moment update, and its own step count (the bias correction) does not advance.
//! On the CPU the update is one fused pass per element (the tensor-op form stays as the reference
//! and the GPU path).
use tch::{Kind, Tensor};

/// Hyper-parameters (`train.weight_decay`, `adam_beta1`, `adam_beta2`, `adam_epsilon`; torch's
/// defaults otherwise; the learning rate comes per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// A training config's AdamW (`train.weight_decay`, `adam_beta1`, `adam_beta2`,
    /// `adam_epsilon`).
    pub fn for_training(config: &crate::config::Config) -> Self {
        let t = &config.train;
        Self {
            beta1: t.adam_beta1,
            beta2: t.adam_beta2,
            eps: t.adam_epsilon,
            weight_decay: t.weight_decay,
        }
    }

    /// As a checkpoint manifest records it (`optimizer`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "adamw",
            "betas": [self.beta1, self.beta2],
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        })
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The elements of one parameter inside an optimizer tensor: [start, start + len). A flat FSDP
/// shard holds several (len 0 for a parameter outside this rank's range: its step count is still
/// kept, so every rank knows every parameter's); a plain tensor is one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: i64,
    pub len: i64,
}

impl Segment {
    /// All of `t`: a tensor that is one parameter.
    pub fn whole(t: &Tensor) -> Segment {
        Segment {
            start: 0,
            len: t.numel() as i64,
        }
    }
}

/// Optimizer state: step counts and the first/second moments of every parameter tensor.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far (updates applied; a skipped non-finite step is not one).
    pub step: u64,
    /// Per tensor: its parameters' segments.
    pub segments: Vec<Vec<Segment>>,
    /// Per tensor and segment: the updates that parameter took part in (torch's per-parameter
    /// `state['step']`, its bias correction); below `step` for a parameter that had no gradient
    /// in some steps (cross-attention on text-only batches).
    pub steps: Vec<Vec<u64>>,
    /// (exp_avg, exp_avg_sq) per parameter tensor, fp32, same shapes as the parameters.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// Zero moments for `params` (fp32 tensors), each one parameter.
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        let segments = params.iter().map(|p| vec![Segment::whole(p)]).collect();
        Self::with_segments(config, params, segments)
    }

    /// Zero moments for `params`, whose parameters lie at `segments[i]` (1-D tensors when a
    /// tensor holds more than one).
    pub fn with_segments(
        config: AdamWConfig,
        params: &[Tensor],
        segments: Vec<Vec<Segment>>,
    ) -> Self {
        assert_eq!(segments.len(), params.len(), "AdamW: segments per tensor");
        let moments = params
            .iter()
            .map(|p| (p.zeros_like(), p.zeros_like()))
            .collect();
        Self {
            config,
            step: 0,
            steps: segments.iter().map(|s| vec![0; s.len()]).collect(),
            segments,
            moments,
        }
    }

    /// One update of every `params[i]` (in place) from `grads[i]` at learning rate `lr`.
    /// Contiguous fp32 CPU tensors take the fused loop (`fused_update`: one pass over p, g, m, v
    /// instead of torch's eight, and no temporaries); anything else (CUDA shards) the tensor ops of
    /// `reference_update`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        self.step_with(params, grads, None, lr, true)
    }

    /// `step` for the parameters (segments) with `present[i][j]` only: the others had no
    /// gradient (torch's `.grad is None`) and keep their values, moments and step counts.
    pub fn step_present(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        present: &[Vec<bool>],
        lr: f64,
    ) {
        let shape_ok = present.len() == self.segments.len()
            && present
                .iter()
                .zip(&self.segments)
                .all(|(p, s)| p.len() == s.len());
        assert!(shape_ok, "AdamW: one presence flag per parameter segment");
        self.step_with(params, grads, Some(present), lr, true)
    }

    fn step_with(
        &mut self,
        params: &[Tensor],
        grads: &[Tensor],
        present: Option<&[Vec<bool>]>,
        lr: f64,
        fused: bool,
    ) {
        assert_eq!(
            params.len(),
            self.moments.len(),
            "AdamW: parameter count changed"
        );
        assert_eq!(
            params.len(),
            grads.len(),
            "AdamW: one gradient per parameter"
        );
        self.step += 1;
        let config = self.config;
        tch::no_grad(|| {
            for (i, ((p, g), (m, v))) in params.iter().zip(grads).zip(&mut self.moments).enumerate()
            {
                debug_assert_eq!(p.kind(), Kind::Float);
                let segments = &self.segments[i];
                let steps = &mut self.steps[i];
                let is_present = |j: usize| present.is_none_or(|pr| pr[i][j]);
                if segments[..] == [Segment::whole(p)] {
                    if is_present(0) {
                        steps[0] += 1;
                        update(&Hyper::new(&config, steps[0], lr), p, g, m, v, fused);
                    }
                    continue;
                }
                // runs of adjacent present segments with one step count: one update each
                let mut j = 0;
                while j < segments.len() {
                    if !is_present(j) || segments[j].len == 0 {
                        steps[j] += is_present(j) as u64;
                        j += 1;
                        continue;
                    }
                    let (start, count) = (segments[j].start, steps[j]);
                    let mut end = j;
                    while end < segments.len()
                        && is_present(end)
                        && steps[end] == count
                        && (end == j
                            || segments[end].start
                                == segments[end - 1].start + segments[end - 1].len)
                    {
                        steps[end] += 1;
                        end += 1;
                    }
                    let last = segments[end - 1];
                    let len = last.start + last.len - start;
                    let view = |t: &Tensor| t.narrow(0, start, len);
                    let (mut mv, mut vv) = (view(m), view(v));
                    update(
                        &Hyper::new(&config, count + 1, lr),
                        &view(p),
                        &view(g),
                        &mut mv,
                        &mut vv,
                        fused,
                    );
                    j = end;
                }
            }
        });
    }
}

/// One tensor's update: the fused loop where it applies, else the tensor ops.
fn update(h: &Hyper, p: &Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor, fused: bool) {
    if !(fused && fused_update(h, p, g, m, v)) {
        reference_update(h, p, g, m, v);
    }
}

/// The scalars of one step.
struct Hyper {
    /// 1 - lr * weight_decay (1 when there is no decay).
    decay: f64,
    /// 1 - beta1: the lerp weight of m.
    w1: f64,
    beta2: f64,
    /// sqrt(1 - beta2^t).
    bc2_sqrt: f64,
    eps: f64,
    /// lr / (1 - beta1^t).
    step_size: f64,
}

impl Hyper {
    fn new(c: &AdamWConfig, step: u64, lr: f64) -> Self {
        let t = step as i32;
        Self {
            decay: 1.0 - lr * c.weight_decay,
            w1: 1.0 - c.beta1,
            beta2: c.beta2,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt(),
            eps: c.eps,
            step_size: lr / (1.0 - c.beta1.powi(t)),
        }
    }
}

/// torch's single-tensor AdamW with tensor ops (the reference; any device).
fn reference_update(h: &Hyper, p: &Tensor, g: &Tensor, m: &mut Tensor, v: &mut Tensor) {
    let mut p = p.shallow_clone();
    if h.decay != 1.0 {
        let _ = p.g_mul_scalar_(h.decay);
    }
    let _ = m.lerp_(g, h.w1);
    let _ = v.g_mul_scalar_(h.beta2);
    let _ = v.addcmul_(&(g * (1.0 - h.beta2)), g);
    let denom = v.sqrt() / h.bc2_sqrt + h.eps;
    let _ = p.addcdiv_(&(&*m * -h.step_size), &denom);
}

/// Tensors at least this large are updated by several threads.
const PARALLEL_MIN: usize = 1 << 20;

/// The same update as `reference_update` in one pass per element, in f32 as torch's CPU kernels
/// compute it (up to rounding: within a few ulps, see the test). Returns false (nothing done) unless
/// all four are contiguous fp32 CPU tensors of one size in distinct memory.
fn fused_update(h: &Hyper, p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let all = [p, g, m, v];
    let n = p.numel();
    let ok = all.iter().all(|t| {
        t.device() == tch::Device::Cpu
            && t.kind() == Kind::Float
            && t.is_contiguous()
            && t.numel() == n
    });
    let ptrs = all.map(|t| t.data_ptr() as usize);
    let distinct = (0..4).all(|i| (i + 1..4).all(|j| ptrs[i] != ptrs[j]));
    if !(ok && distinct) {
        return false;
    }
    if n == 0 {
        return true; // nothing to update
    }
    let (decay, w1, b2) = (h.decay as f32, h.w1 as f32, h.beta2 as f32);
    let (w2, bc2, eps, neg_step) = (
        (1.0 - h.beta2) as f32,
        h.bc2_sqrt as f32,
        h.eps as f32,
        -h.step_size as f32,
    );
    let run = |lo: usize, hi: usize| {
        // SAFETY: four distinct live fp32 buffers of n elements (checked above); each thread
        // touches only its own [lo, hi) range.
        let (p, g, m, v) = unsafe {
            (
                std::slice::from_raw_parts_mut((ptrs[0] as *mut f32).add(lo), hi - lo),
                std::slice::from_raw_parts((ptrs[1] as *const f32).add(lo), hi - lo),
                std::slice::from_raw_parts_mut((ptrs[2] as *mut f32).add(lo), hi - lo),
                std::slice::from_raw_parts_mut((ptrs[3] as *mut f32).add(lo), hi - lo),
            )
        };
        for i in 0..p.len() {
            let gi = g[i];
            let pi = if decay != 1.0 { p[i] * decay } else { p[i] };
            let mi = m[i] + w1 * (gi - m[i]); // torch's lerp for weights < 0.5
            let vi = v[i] * b2 + w2 * gi * gi;
            let denom = vi.sqrt() / bc2 + eps;
            p[i] = pi + neg_step * (mi / denom);
            m[i] = mi;
            v[i] = vi;
        }
    };
    let threads = (tch::get_num_threads().max(1) as usize).min(n.div_ceil(PARALLEL_MIN));
    if threads <= 1 {
        run(0, n);
    } else {
        let per = n.div_ceil(threads);
        std::thread::scope(|s| {
            for k in 0..threads {
                let (lo, hi) = (k * per, ((k + 1) * per).min(n));
                s.spawn(move || run(lo, hi));
            }
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scalar torch.optim.AdamW, written out (the formula of torch/optim/adamw.py, single-tensor path).
    fn reference(p0: f64, grads: &[f64], lr: f64, wd: f64) -> f64 {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
        for (i, g) in grads.iter().enumerate() {
            let t = (i + 1) as i32;
            p *= 1.0 - lr * wd;
            m += (g - m) * (1.0 - b1);
            v = v * b2 + (1.0 - b2) * g * g;
            let denom = v.sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
            p -= lr / (1.0 - b1.powi(t)) * m / denom;
        }
        p
    }

    #[test]
    fn matches_torch_formula() {
        let p0 = [0.5f32, -1.25, 2.0, 0.0];
        let grads = [
            [0.1f32, -0.2, 0.3, 1e-4],
            [-0.4, 0.5, 0.05, -2.0],
            [0.2, 0.2, -0.7, 0.3],
        ];
        let (lr, wd) = (1e-2, 0.1);
        let p = Tensor::from_slice(&p0);
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: wd,
                ..Default::default()
            },
            &[p.shallow_clone()],
        );
        for g in &grads {
            opt.step(&[p.shallow_clone()], &[Tensor::from_slice(g)], lr);
        }
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        for i in 0..4 {
            let gs: Vec<f64> = grads.iter().map(|g| g[i] as f64).collect();
            let want = reference(p0[i] as f64, &gs, lr, wd);
            assert!(
                (got[i] as f64 - want).abs() < 1e-6,
                "{i}: {} vs {want}",
                got[i]
            );
        }
        assert_eq!(opt.step, 3);
    }

    /// The fused loop against the tensor-op reference over several steps, with decay, on a tensor
    /// large enough for the threaded split; a non-contiguous gradient takes the reference path.
    #[test]
    fn fused_matches_reference() {
        tch::manual_seed(7);
        let n = PARALLEL_MIN as i64 * 2 + 13;
        let p0 = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
        let config = AdamWConfig {
            weight_decay: 0.05,
            ..Default::default()
        };
        let (pf, pr) = (p0.copy(), p0.copy());
        let mut fused = AdamW::new(config, &[pf.shallow_clone()]);
        let mut reference = AdamW::new(config, &[pr.shallow_clone()]);
        for step in 0..4 {
            let g = Tensor::randn([n], (Kind::Float, tch::Device::Cpu)) * (step + 1) as f64;
            fused.step_with(
                &[pf.shallow_clone()],
                &[g.shallow_clone()],
                None,
                1e-3,
                true,
            );
            reference.step_with(&[pr.shallow_clone()], &[g], None, 1e-3, false);
        }
        let close = |a: &Tensor, b: &Tensor| {
            let err = (a - b).abs().max().double_value(&[]);
            let scale = b.abs().max().double_value(&[]);
            assert!(err <= 1e-6 * scale, "max error {err} at scale {scale}");
        };
        close(&pf, &pr);
        close(&fused.moments[0].0, &reference.moments[0].0);
        close(&fused.moments[0].1, &reference.moments[0].1);
        assert!(!pf.equal(&p0), "the parameters moved");
        // a transposed (non-contiguous) gradient: the reference path, same result as the reference
        let p = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu));
        let g = Tensor::from_slice(&[1.0f32, -2.0, 3.0, 0.5, 0.25, -1.0]).view([2, 3]);
        let mut opt = AdamW::new(config, &[p.shallow_clone()]);
        opt.step(&[p.shallow_clone()], &[g.tr()], 0.1);
        let want = Tensor::ones([3, 2], (Kind::Float, tch::Device::Cpu));
        let mut r = AdamW::new(config, &[want.shallow_clone()]);
        r.step_with(
            &[want.shallow_clone()],
            &[g.tr().contiguous()],
            None,
            0.1,
            false,
        );
        close(&p, &want);
    }

    /// Known values of torch.optim.AdamW(lr=0.1, weight_decay=0.0) after one step: p - lr * sign(g) (up to eps).
    #[test]
    fn first_step_is_signed_lr() {
        let p = Tensor::from_slice(&[1.0f32, 1.0]);
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: 0.0,
                ..Default::default()
            },
            &[p.shallow_clone()],
        );
        opt.step(
            &[p.shallow_clone()],
            &[Tensor::from_slice(&[3.0f32, -0.5])],
            0.1,
        );
        let got: Vec<f32> = Vec::try_from(&p).unwrap();
        assert!(
            (got[0] - 0.9).abs() < 1e-6 && (got[1] - 1.1).abs() < 1e-6,
            "{got:?}"
        );
    }

    /// A tensor without a gradient in some steps: torch skips it there (no decay, no moment
    /// update, no step count), so its updates are those of a fresh AdamW fed only the steps it
    /// had a gradient in; the other tensor steps every time.
    #[test]
    fn a_tensor_without_gradient_is_skipped_as_torch_skips_grad_none() {
        let (lr, wd) = (1e-2, 0.1);
        let (a, b) = (
            Tensor::from_slice(&[0.5f32]),
            Tensor::from_slice(&[-1.5f32]),
        );
        let mut opt = AdamW::new(
            AdamWConfig {
                weight_decay: wd,
                ..Default::default()
            },
            &[a.shallow_clone(), b.shallow_clone()],
        );
        // b has no gradient in the first 5 steps (its gradient tensor is zeros, as FSDP fills it)
        let ga = [0.3f64, -0.1, 0.2, 0.4, -0.3, 0.25, 0.1, -0.2];
        let gb = [0.0f64, 0.0, 0.0, 0.0, 0.0, 0.7, 0.7, 0.7];
        for (i, (&x, &y)) in ga.iter().zip(&gb).enumerate() {
            let grads = [
                Tensor::from_slice(&[x as f32]),
                Tensor::from_slice(&[y as f32]),
            ];
            opt.step_present(
                &[a.shallow_clone(), b.shallow_clone()],
                &grads,
                &[vec![true], vec![i >= 5]],
                lr,
            );
            if i == 4 {
                assert_eq!(
                    b.double_value(&[0]),
                    -1.5,
                    "b untouched while it has no gradient"
                );
            }
        }
        assert_eq!((opt.step, opt.steps.clone()), (8, vec![vec![8], vec![3]]));
        let want_a = reference(0.5, &ga, lr, wd);
        let want_b = reference(-1.5, &gb[5..], lr, wd);
        assert!((a.double_value(&[0]) - want_a).abs() < 1e-6);
        assert!(
            (b.double_value(&[0]) - want_b).abs() < 1e-6,
            "{} vs {want_b}: bias correction from b's own first step",
            b.double_value(&[0])
        );
    }

    /// A flat tensor of three parameters (one outside this rank's range: length 0) steps each
    /// segment as its own tensor would, with its own step count and presence.
    #[test]
    fn segments_of_a_flat_tensor_step_like_separate_tensors() {
        let config = AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        };
        let values = [0.5f32, -1.0, 2.0, 0.25, 3.0, 0.0]; // a: 0..2, b: 2..5, padding: 5
        let flat = Tensor::from_slice(&values);
        let segments = vec![vec![
            Segment { start: 0, len: 2 },
            Segment { start: 0, len: 0 },
            Segment { start: 2, len: 3 },
        ]];
        let mut opt = AdamW::with_segments(config, &[flat.shallow_clone()], segments);
        let (a, b) = (
            Tensor::from_slice(&values[..2]),
            Tensor::from_slice(&values[2..5]),
        );
        let mut sep = AdamW::new(config, &[a.shallow_clone(), b.shallow_clone()]);
        for step in 0..6 {
            let g = Tensor::from_slice(&[0.3f32, -0.2, 0.1, 0.4, -0.5, 0.0]) * (step + 1) as f64;
            let b_present = step % 3 != 0;
            opt.step_present(
                &[flat.shallow_clone()],
                &[g.shallow_clone()],
                &[vec![true, true, b_present]],
                1e-2,
            );
            let ga = g.narrow(0, 0, 2);
            let gb = g.narrow(0, 2, 3);
            sep.step_present(
                &[a.shallow_clone(), b.shallow_clone()],
                &[ga, gb],
                &[vec![true], vec![b_present]],
                1e-2,
            );
        }
        assert_eq!(opt.steps, [vec![6, 6, 4]]);
        assert!(flat.narrow(0, 0, 2).allclose(&a, 1e-6, 1e-7, false));
        assert!(flat.narrow(0, 2, 3).allclose(&b, 1e-6, 1e-7, false));
        assert_eq!(flat.double_value(&[5]), 0.0, "padding is no parameter");
    }
}
