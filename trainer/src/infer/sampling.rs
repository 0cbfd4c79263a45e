//! Next-token choice: greedy at temperature 0, else temperature + top-p (nucleus) sampling with a
//! seeded generator, so the same seed gives the same text.
use tch::{Kind, Tensor};

/// SplitMix64: small, fast, and fully determined by its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f64,
    pub top_p: f64,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_p,
            rng: Rng::new(seed),
        }
    }

    /// The tokens top-p keeps for `probs` (sorted by probability, descending): the smallest prefix
    /// whose mass reaches `top_p` (at least one token), as transformers' TopPLogitsWarper.
    pub fn nucleus(probs: &[(usize, f64)], top_p: f64) -> usize {
        let mut mass = 0.0;
        for (i, (_, p)) in probs.iter().enumerate() {
            mass += p;
            if mass >= top_p {
                return i + 1;
            }
        }
        probs.len().max(1)
    }

    /// Picks the next token from logits (V) of the last position.
    pub fn pick(&mut self, logits: &Tensor) -> i64 {
        if self.temperature <= 0.0 {
            return logits.argmax(-1, false).int64_value(&[]);
        }
        let probs = (logits.to_kind(Kind::Double) / self.temperature).softmax(-1, Kind::Double);
        let probs: Vec<f64> = Vec::try_from(probs).unwrap_or_default();
        if probs.is_empty() || !probs.iter().all(|p| p.is_finite()) {
            // NaN / inf logits (an overflow upstream) give no distribution: the argmax, not
            // whichever token the failed comparisons below would land on
            return logits.argmax(-1, false).int64_value(&[]);
        }
        let mut sorted: Vec<(usize, f64)> = probs.into_iter().enumerate().collect();
        sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let keep = Self::nucleus(&sorted, self.top_p);
        let kept = &sorted[..keep];
        let total: f64 = kept.iter().map(|(_, p)| p).sum();
        let mut u = self.rng.next_f64() * total;
        for &(id, p) in kept {
            if u < p {
                return id as i64;
            }
            u -= p;
        }
        kept[keep - 1].0 as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_choices() {
        let logits = Tensor::from_slice(&[0.1f32, 0.5, 0.2, 1.0, -0.3]);
        let run = |seed| {
            let mut s = Sampler::new(0.7, 0.9, seed);
            (0..50).map(|_| s.pick(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_p_mass_is_respected() {
        // probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two tokens only
        let p = [0.5f64, 0.3, 0.15, 0.05];
        let logits = Tensor::from_slice(&p.map(|x| x.ln() as f32));
        let mut s = Sampler::new(1.0, 0.75, 1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[s.pick(&logits) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        let share = counts[0] as f64 / 4000.0; // 0.5 / 0.8 = 0.625 after renormalizing
        assert!((share - 0.625).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn temperature_zero_is_greedy() {
        let logits = Tensor::from_slice(&[0.1f32, 2.5, 0.2]);
        assert_eq!(Sampler::new(0.0, 0.9, 3).pick(&logits), 1);
    }

    #[test]
    fn logits_without_a_distribution_give_the_argmax() {
        // an inf logit makes the softmax NaN: every sampled pick used to be the last kept id
        let logits = Tensor::from_slice(&[0.1f32, f32::INFINITY, 0.2, 0.3]);
        for seed in 0..5 {
            assert_eq!(Sampler::new(0.7, 0.9, seed).pick(&logits), 1);
        }
    }
}
