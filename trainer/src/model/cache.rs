//! KV cache for generation: self-attention layers append each step's K/V; cross-attention layers hold the K/V of
//! the projected vision states, computed once per image (the step that brings `pixel_values`).
use tch::Tensor;

/// One layer's cached keys and values, (B, Hk, S, D) each.
#[derive(Debug, Default)]
pub struct LayerCache {
    kv: Option<(Tensor, Tensor)>,
}

impl LayerCache {
    /// Self-attention: appends k/v (B, Hk, S_new, D) and returns the whole (B, Hk, S_past + S_new, D).
    pub fn append(&mut self, k: Tensor, v: Tensor) -> (Tensor, Tensor) {
        let kv = match self.kv.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2), Tensor::cat(&[&pv, &v], 2)),
        };
        let out = (kv.0.shallow_clone(), kv.1.shallow_clone());
        self.kv = Some(kv);
        out
    }

    /// Cross-attention: replaces the cached vision K/V.
    pub fn set(&mut self, k: Tensor, v: Tensor) {
        self.kv = Some((k, v));
    }

    pub fn get(&self) -> Option<(Tensor, Tensor)> {
        self.kv
            .as_ref()
            .map(|(k, v)| (k.shallow_clone(), v.shallow_clone()))
    }

    pub fn is_set(&self) -> bool {
        self.kv.is_some()
    }

    /// Cached sequence length (dim 2), 0 when empty.
    pub fn len(&self) -> i64 {
        self.kv.as_ref().map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Cache of the whole decoder, one slot per layer (cross-attention layers included).
#[derive(Debug)]
pub struct KvCache {
    pub layers: Vec<LayerCache>,
    /// Text positions seen so far (the self-attention length).
    pub seen: i64,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            seen: 0,
        }
    }
}
