//! AdamW on flat fp32 tensors, step for step `torch.optim.AdamW` (foreach=False, amsgrad=False):
//! ```text
//! p *= 1 - lr * wd
//! m = lerp(m, g, 1 - b1)             v = v * b2 + (1 - b2) g^2
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! The state is one (m, v) pair per parameter tensor, same shape; for FSDP the tensors are this
//! rank's flat shards, so optimizer state is sharded like the parameters. On the CPU the update is
//! one fused pass per element (the tensor-op form stays as the reference and the GPU path).
use tch::{Kind, Tensor};

/// Hyper-parameters (torch defaults except `lr`/`weight_decay`, which the config sets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
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

/// Optimizer state: step count and the first/second moments of every parameter tensor.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Optimizer steps taken so far (torch's `state['step']`, shared by all tensors here).
    pub step: u64,
    /// (exp_avg, exp_avg_sq) per parameter tensor, fp32, same shapes as the parameters.
    pub moments: Vec<(Tensor, Tensor)>,
}

impl AdamW {
    /// Zero moments for `params` (fp32 tensors).
    pub fn new(config: AdamWConfig, params: &[Tensor]) -> Self {
        let moments = params
            .iter()
            .map(|p| (p.zeros_like(), p.zeros_like()))
            .collect();
        Self {
            config,
            step: 0,
            moments,
        }
    }

    /// One update of every `params[i]` (in place) from `grads[i]` at learning rate `lr`.
    /// Contiguous fp32 CPU tensors take the fused loop (`fused_update`: one pass over p, g, m, v
    /// instead of torch's eight, and no temporaries); anything else (CUDA shards) the tensor ops of
    /// `reference_update`.
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
        self.step_with(params, grads, lr, true)
    }

    fn step_with(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64, fused: bool) {
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
        let h = Hyper::new(&self.config, self.step, lr);
        tch::no_grad(|| {
            for ((p, g), (m, v)) in params.iter().zip(grads).zip(&mut self.moments) {
                debug_assert_eq!(p.kind(), Kind::Float);
                if !(fused && fused_update(&h, p, g, m, v)) {
                    reference_update(&h, p, g, m, v);
                }
            }
        });
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
            fused.step_with(&[pf.shallow_clone()], &[g.shallow_clone()], 1e-3, true);
            reference.step_with(&[pr.shallow_clone()], &[g], 1e-3, false);
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
        r.step_with(&[want.shallow_clone()], &[g.tr().contiguous()], 0.1, false);
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
}
