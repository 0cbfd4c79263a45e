//! `fsdp.enabled: false`: the whole model on one process, ordinary autograd (the baseline the
//! FSDP tests compare against). Trainable parameters get fp32 master copies when the model is
//! not fp32, so the optimizer always updates fp32 tensors.
//!
//! Gradients are taken with `run_backward` (what `torch.autograd.grad` is) instead of being
//! accumulated into `.grad`: the first micro-batch's gradients are kept as they come and later
//! ones added, as PyTorch's `zero_grad(set_to_none=True)` does. Zeroing `.grad` and letting
//! backward add into it (tch has no way to reset `.grad` to None) costs a memset and an add pass
//! over every trainable parameter per step: 2 x 460 MB for full finetuning of a 115M model.
use tch::{Kind, Tensor};

use crate::model::{Batch, MllamaModel};

use super::{mark_trainable, FsdpError};

#[derive(Debug)]
pub struct PlainModel {
    pub model: MllamaModel,
    /// (name, parameter in the model).
    pub params: Vec<(String, Tensor)>,
    /// fp32 masters (the parameters themselves when they are fp32).
    masters: Vec<Tensor>,
    /// Gradients summed over this step's micro-batches (None before the first backward), in the
    /// parameters' dtype.
    acc: Option<Vec<Tensor>>,
    /// fp32 gradients handed to the optimizer.
    grad_buf: Vec<Tensor>,
}

/// Gradients as `.grad` would hold them: contiguous, and no two sharing memory (autograd may hand
/// the same tensor to two leaves, e.g. both operands of an add; accumulating or clipping in place
/// would then hit it twice). Copies only in those cases, as PyTorch's `AccumulateGrad` does.
fn own_grads(grads: Vec<Tensor>) -> Vec<Tensor> {
    let mut seen = std::collections::HashSet::new();
    grads
        .into_iter()
        .map(|g| {
            if !g.defined() {
                g
            } else if !g.is_contiguous() {
                g.contiguous() // a new tensor
            } else if !seen.insert(g.data_ptr() as usize) {
                g.copy() // contiguous, as its source
            } else {
                g
            }
        })
        .collect()
}

impl PlainModel {
    pub fn new(mut model: MllamaModel) -> Self {
        let params = mark_trainable(&mut model);
        let masters = params
            .iter()
            .map(|(_, p)| {
                if p.kind() == Kind::Float {
                    p.shallow_clone()
                } else {
                    p.detach().to_kind(Kind::Float)
                }
            })
            .collect();
        model.set_training(true);
        Self {
            model,
            params,
            masters,
            acc: None,
            grad_buf: vec![],
        }
    }

    pub fn forward_backward(&mut self, batch: &Batch, loss_scale: f64) -> Result<f64, FsdpError> {
        let (sum, _) = self.model.loss(batch)?;
        let root = &sum * loss_scale;
        let params: Vec<&Tensor> = self.params.iter().map(|(_, p)| p).collect();
        // an undefined gradient: the parameter took no part (e.g. cross-attention on text only);
        // none took part when the loss has no graph (LoRA only on the projector or the
        // cross-attention, a text-only micro-batch): libtorch's backward would dereference the
        // missing graph (a segfault), so there is nothing to run
        let grads = if root.requires_grad() {
            own_grads(Tensor::f_run_backward(&[root], &params, false, false)?)
        } else {
            params.iter().map(|_| Tensor::new()).collect()
        };
        match &mut self.acc {
            None => self.acc = Some(grads),
            Some(acc) => {
                for (a, g) in acc.iter_mut().zip(grads) {
                    if !a.defined() {
                        *a = g;
                    } else if g.defined() {
                        let _ = a.f_add_(&g)?;
                    }
                }
            }
        }
        Ok(sum.double_value(&[]))
    }

    pub fn forward_loss(&mut self, batch: &Batch) -> Result<f64, FsdpError> {
        self.model.set_training(false);
        let r = tch::no_grad(|| self.model.loss(batch));
        self.model.set_training(true);
        Ok(r?.0.double_value(&[]))
    }

    pub fn master_params(&self) -> Vec<Tensor> {
        self.masters.iter().map(Tensor::shallow_clone).collect()
    }

    pub fn grads(&mut self) -> Vec<Tensor> {
        let none = vec![];
        let acc = self.acc.as_ref().unwrap_or(&none);
        self.grad_buf = self
            .params
            .iter()
            .enumerate()
            .map(|(i, (_, p))| {
                let g = acc.get(i).map_or_else(Tensor::new, Tensor::shallow_clone);
                if !g.defined() {
                    p.zeros_like().to_kind(Kind::Float)
                } else if g.kind() == Kind::Float {
                    g
                } else {
                    g.to_kind(Kind::Float)
                }
            })
            .collect();
        self.grad_buf.iter().map(Tensor::shallow_clone).collect()
    }

    /// Per parameter: whether a micro-batch since `zero_grads` gave it a gradient.
    pub fn grad_present(&self) -> Vec<bool> {
        (0..self.params.len())
            .map(|i| {
                self.acc
                    .as_ref()
                    .and_then(|a| a.get(i))
                    .is_some_and(Tensor::defined)
            })
            .collect()
    }

    pub fn after_update(&mut self) {
        tch::no_grad(|| {
            for ((_, p), m) in self.params.iter().zip(&self.masters) {
                if p.kind() != Kind::Float {
                    p.shallow_clone().copy_(m);
                }
            }
        });
    }

    pub fn zero_grads(&mut self) {
        self.acc = None;
        self.grad_buf.clear();
    }

    pub fn resident_param_bytes(&self) -> i64 {
        let mut total = 0i64;
        self.model.visit_params(&mut |_, t| {
            total += t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
        });
        if self.model.lora.is_some() {
            // (the factors: parameters of modules to save were counted above)
            for (n, p) in &self.params {
                if !self.model.saved_params.contains(n) {
                    total += p.numel() as i64 * p.kind().elt_size_in_bytes() as i64;
                }
            }
        }
        total
    }

    pub fn trainable_full(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .map(|(n, p)| {
                (
                    n.clone(),
                    p.detach()
                        .to_kind(Kind::Float)
                        .to_device(tch::Device::Cpu)
                        .copy(),
                )
            })
            .collect()
    }
}
