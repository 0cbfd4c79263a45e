//! AdamW on flat fp32 tensors, step for step `torch.optim.AdamW` (foreach=False, amsgrad=False):
//! ```text
//! p *= 1 - lr * wd
//! m = lerp(m, g, 1 - b1)             v = v * b2 + (1 - b2) g^2
//! p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//! The state is one (m, v) pair per parameter tensor, same shape; for FSDP the tensors are this
//! rank's flat shards, so optimizer state is sharded like the parameters.
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
    pub fn step(&mut self, params: &[Tensor], grads: &[Tensor], lr: f64) {
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
        let c = self.config;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bc1;
        tch::no_grad(|| {
            for ((p, g), (m, v)) in params.iter().zip(grads).zip(&mut self.moments) {
                debug_assert_eq!(p.kind(), Kind::Float);
                let mut p = p.shallow_clone();
                if c.weight_decay != 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * c.weight_decay);
                }
                let _ = m.lerp_(g, 1.0 - c.beta1);
                let _ = v.g_mul_scalar_(c.beta2);
                let _ = v.addcmul_(&(g * (1.0 - c.beta2)), g);
                let denom = v.sqrt() / bc2_sqrt + c.eps;
                let _ = p.addcdiv_(&(&*m * -step_size), &denom);
            }
        });
    }
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
