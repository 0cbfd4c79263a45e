//! Which unit a parameter belongs to. Units are the granularity of sharding, all-gather and
//! recompute: each vision encoder layer (local and global), each text decoder layer (self- or
//! cross-attention), and the root (everything else: vision stem and norms, projector,
//! embeddings, final norm, lm_head). Unit indices: root 0, then local layers, global layers,
//! text layers, in forward order.
use crate::model::MllamaConfig;

pub const ROOT: usize = 0;

/// Unit index layout for one model config.
#[derive(Debug, Clone, Copy)]
pub struct UnitLayout {
    pub local: usize,
    pub global: usize,
    pub text: usize,
}

impl UnitLayout {
    pub fn new(c: &MllamaConfig) -> Self {
        Self {
            local: c.vision.num_hidden_layers,
            global: c.vision.num_global_layers,
            text: c.text.num_hidden_layers,
        }
    }
    pub fn count(&self) -> usize {
        1 + self.local + self.global + self.text
    }
    pub fn local(&self, i: usize) -> usize {
        1 + i
    }
    pub fn global(&self, j: usize) -> usize {
        1 + self.local + j
    }
    pub fn text(&self, k: usize) -> usize {
        1 + self.local + self.global + k
    }

    /// The unit of a canonical parameter name (a PEFT key `base_model.model.<name>` works too).
    pub fn unit_of(&self, name: &str) -> usize {
        let name = name.strip_prefix("base_model.model.").unwrap_or(name);
        let layer = |prefix: &str| -> Option<usize> {
            let rest = name.strip_prefix(prefix)?;
            rest.split('.').next()?.parse().ok()
        };
        if let Some(i) = layer("model.vision_model.transformer.layers.") {
            self.local(i)
        } else if let Some(j) = layer("model.vision_model.global_transformer.layers.") {
            self.global(j)
        } else if let Some(k) = layer("model.language_model.layers.") {
            self.text(k)
        } else {
            ROOT
        }
    }

    /// A readable unit name for logs and errors.
    pub fn name(&self, unit: usize) -> String {
        if unit == ROOT {
            "root".into()
        } else if unit <= self.local {
            format!("vision.local.{}", unit - 1)
        } else if unit <= self.local + self.global {
            format!("vision.global.{}", unit - 1 - self.local)
        } else {
            format!("text.{}", unit - 1 - self.local - self.global)
        }
    }
}
