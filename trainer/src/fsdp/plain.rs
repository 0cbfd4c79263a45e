//! `fsdp.enabled: false`: the whole model on one process, ordinary autograd (the baseline the
//! FSDP tests compare against). Trainable parameters get fp32 master copies when the model is
//! not fp32, so the optimizer always updates fp32 tensors.
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
    /// fp32 gradients handed to the optimizer.
    grad_buf: Vec<Tensor>,
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
            grad_buf: vec![],
        }
    }

    pub fn forward_backward(&mut self, batch: &Batch, loss_scale: f64) -> Result<f64, FsdpError> {
        let (sum, _) = self.model.loss(batch)?;
        (&sum * loss_scale).backward();
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
        self.grad_buf = self
            .params
            .iter()
            .map(|(_, p)| {
                let g = p.grad();
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
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn resident_param_bytes(&self) -> i64 {
        let mut total = 0i64;
        self.model.visit_params(&mut |_, t| {
            total += t.numel() as i64 * t.kind().elt_size_in_bytes() as i64
        });
        if self.model.lora.is_some() {
            for (_, p) in &self.params {
                total += p.numel() as i64 * p.kind().elt_size_in_bytes() as i64;
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
