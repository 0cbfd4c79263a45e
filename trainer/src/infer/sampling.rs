//! Next-token choice: greedy at temperature 0, else temperature, top-k and top-p (nucleus)
//! sampling in transformers' order, with a seeded generator, so the same seed gives the same text.
use tch::{Kind, Tensor};

/// The seeded generator of a `Sampler` (SplitMix64, `crate::rng`).
pub use crate::rng::SplitMix64 as Rng;

/// transformers' `GenerationConfig.top_k` default, which sampling uses unless the model's
/// generation_config.json or the call sets another (Llama 3.2 Vision's sets none).
pub const DEFAULT_TOP_K: usize = 50;

/// The sampling defaults of a model folder's generation_config.json that the flags leave unset
/// (transformers' `generate` takes them from there when its call does not pass them; the seed's
/// call passed temperature and top_p, not these).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationDefaults {
    /// `do_sample` (transformers' default: false, greedy).
    pub do_sample: Option<bool>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    /// `eos_token_id`: one id or a list (none: empty).
    pub eos_token_ids: Vec<i64>,
}

impl GenerationDefaults {
    /// Reads `model_dir/generation_config.json` (none: no defaults); a value of the wrong type
    /// is an error naming the file and key.
    pub fn read(model_dir: &std::path::Path) -> Result<Self, super::InferError> {
        Self::read_file(model_dir).map_err(super::InferError::Input)
    }

    fn read_file(model_dir: &std::path::Path) -> Result<Self, String> {
        let path = model_dir.join("generation_config.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let bad = |key: &str, want: &str| {
            format!("{}: `{key}` must be {want}, not {}", path.display(), v[key])
        };
        let do_sample = match v.get("do_sample") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_bool()
                    .ok_or_else(|| bad("do_sample", "true or false"))?,
            ),
        };
        let top_k = match v.get("top_k") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_u64()
                    .map(|k| k as usize)
                    .ok_or_else(|| bad("top_k", "a whole number >= 0"))?,
            ),
        };
        let repetition_penalty = match v.get("repetition_penalty") {
            None | Some(serde_json::Value::Null) => None,
            Some(x) => Some(
                x.as_f64()
                    .filter(|p| p.is_finite() && *p > 0.0)
                    .ok_or_else(|| bad("repetition_penalty", "a number > 0"))?,
            ),
        };
        let eos_token_ids = match v.get("eos_token_id") {
            None | Some(serde_json::Value::Null) => vec![],
            Some(serde_json::Value::Array(ids)) => ids
                .iter()
                .map(|i| i.as_i64().filter(|&i| i >= 0))
                .collect::<Option<Vec<i64>>>()
                .ok_or_else(|| bad("eos_token_id", "a token id or a list of them"))?,
            Some(x) => vec![x
                .as_i64()
                .filter(|&i| i >= 0)
                .ok_or_else(|| bad("eos_token_id", "a token id or a list of them"))?],
        };
        Ok(Self {
            do_sample,
            top_k,
            repetition_penalty,
            eos_token_ids,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Sampler {
    pub temperature: f64,
    /// 0 = no top-k filter.
    pub top_k: usize,
    pub top_p: f64,
    /// transformers' `repetition_penalty` (1 = off), applied before greedy or sampling.
    pub repetition_penalty: f64,
    /// transformers' `stop_strings`: the row ends once its text holds one (kept in the text).
    pub stop_strings: Vec<String>,
    rng: Rng,
}

/// Whether `text`, whose last `new` bytes just arrived, now holds one of `stops` that it did not
/// hold before (a stop string may straddle pieces, and a piece may run on past it).
pub fn hits_stop(text: &str, new: usize, stops: &[String]) -> bool {
    stops.iter().any(|s| {
        // (it may start up to len - 1 bytes before the new piece)
        let mut from = text.len().saturating_sub(new + s.len().saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        !s.is_empty() && text[from..].contains(s.as_str())
    })
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: the logit (V) of every token already in the
/// sequence (`seen`: the prompt and what was generated) divided by `penalty` where positive,
/// multiplied where negative, so a penalty above 1 makes repeats less likely. Ids past the logits
/// (Mllama's `<|image|>` is one past the LM head's rows) are left out.
pub fn penalize(logits: &Tensor, seen: &[i64], penalty: f64) -> Tensor {
    let v = logits.size().first().copied().unwrap_or(0);
    let mut ids: Vec<i64> = seen
        .iter()
        .copied()
        .filter(|&i| (0..v).contains(&i))
        .collect();
    if penalty == 1.0 || ids.is_empty() {
        return logits.shallow_clone();
    }
    ids.sort_unstable();
    ids.dedup();
    let idx = Tensor::from_slice(&ids).to_device(logits.device());
    let picked = logits.index_select(0, &idx); // (K,)
    let scaled = (&picked * penalty).where_self(&picked.lt(0.0), &(&picked / penalty));
    logits.copy().index_copy(0, &idx, &scaled)
}

impl Sampler {
    /// Top-k is `DEFAULT_TOP_K`; `with_top_k` changes it.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler {
            temperature,
            top_k: DEFAULT_TOP_K,
            top_p,
            repetition_penalty: 1.0,
            stop_strings: Vec::new(),
            rng: Rng::new(seed),
        }
    }

    pub fn with_stop_strings(mut self, stops: Vec<String>) -> Sampler {
        self.stop_strings = stops;
        self
    }

    pub fn with_repetition_penalty(mut self, penalty: f64) -> Sampler {
        self.repetition_penalty = penalty;
        self
    }

    /// Picks the argmax of the raw logits: temperature 0 and no repetition penalty.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repetition_penalty == 1.0
    }

    /// [`Sampler::pick`] after the repetition penalty over `seen` (the sequence so far).
    pub fn pick_after(&mut self, logits: &Tensor, seen: &[i64]) -> i64 {
        let penalized = penalize(logits, seen, self.repetition_penalty);
        self.pick(&penalized)
    }

    pub fn with_top_k(mut self, top_k: usize) -> Sampler {
        self.top_k = top_k;
        self
    }

    /// The tokens top-p keeps for `probs` (sorted by probability, descending): the smallest prefix
    /// whose mass reaches `top_p` (at least one token), as transformers' TopPLogitsWarper; all of
    /// them at `top_p >= 1` (transformers then adds no warper: rounding must not cut the tail).
    pub fn nucleus(probs: &[(usize, f64)], top_p: f64) -> usize {
        if top_p >= 1.0 {
            return probs.len().max(1);
        }
        let mut mass = 0.0;
        for (i, (_, p)) in probs.iter().enumerate() {
            mass += p;
            if mass >= top_p {
                return i + 1;
            }
        }
        probs.len().max(1)
    }

    /// Picks the next token from logits (V) of the last position: temperature, then top-k (the
    /// logits at least the k-th largest, ties kept, as transformers' TopKLogitsWarper), then top-p
    /// on the renormalized rest (TopPLogitsWarper), then a draw.
    pub fn pick(&mut self, logits: &Tensor) -> i64 {
        if self.temperature <= 0.0 {
            return logits.argmax(-1, false).int64_value(&[]);
        }
        let scaled = logits.to_kind(Kind::Double) / self.temperature; // (V,)
        let v = scaled.size().first().copied().unwrap_or(0);
        if scaled.isnan().any().int64_value(&[]) != 0 {
            // NaN logits (an overflow upstream) give no distribution (top-k would drop them
            // silently): the argmax, as without top-k
            return logits.argmax(-1, false).int64_value(&[]);
        }
        // (vocabulary ids, their scaled logits): the top-k filter is a tensor op, so only the kept
        // entries (k, plus ties) become a Vec and get sorted, not the whole vocabulary
        // (a top_k past i64 keeps everything, as one past the vocabulary does)
        let (ids, kept) = if self.top_k > 0 && i64::try_from(self.top_k).is_ok_and(|k| k < v) {
            let (top, _) = scaled.topk(self.top_k as i64, -1, true, true);
            let kth = top.get(self.top_k as i64 - 1);
            let idx = scaled.ge_tensor(&kth).nonzero().view([-1]); // (K,)
            (
                Vec::<i64>::try_from(&idx).unwrap_or_default(),
                scaled.index_select(0, &idx),
            )
        } else {
            ((0..v).collect(), scaled)
        };
        let probs: Vec<f64> = Vec::try_from(kept.softmax(-1, Kind::Double)).unwrap_or_default();
        if probs.is_empty() || probs.len() != ids.len() || !probs.iter().all(|p| p.is_finite()) {
            // NaN / inf logits (an overflow upstream) give no distribution: the argmax, not
            // whichever token the failed comparisons below would land on
            return logits.argmax(-1, false).int64_value(&[]);
        }
        let mut sorted: Vec<(usize, f64)> = ids.iter().map(|&id| id as usize).zip(probs).collect();
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
        // `u` left over by rounding: the last kept token that can be drawn (sorted descending,
        // so never one of probability 0 while another has more)
        let drawable = kept.iter().rposition(|&(_, p)| p > 0.0).unwrap_or(0);
        kept[drawable].0 as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_across_pieces() {
        let stops = vec!["</CONCLUSION>".to_string()];
        // whole in the new piece, straddling two pieces, and a piece running on past it
        assert!(hits_stop("ab</CONCLUSION>", 13, &stops));
        assert!(hits_stop("ab</CONCLUSION>", 6, &stops)); // the new piece: "USION>"
        assert!(hits_stop("x</CONCLUSION>\n", 3, &stops));
        assert!(!hits_stop("ab</CONCL", 5, &stops));
        // one that was already there before the new piece does not count again
        assert!(!hits_stop("</CONCLUSION> and more text", 4, &stops));
        assert!(!hits_stop("é</CONCLUSION>é", 2, &stops));
        assert!(!hits_stop("anything", 3, &[]));
    }

    #[test]
    fn repetition_penalty_as_transformers() {
        let logits = Tensor::from_slice(&[2.0f32, -2.0, 1.0, 0.5]);
        // seen twice counts once; an id past the logits (the image token) is left out
        let p = penalize(&logits, &[0, 1, 1, 99], 2.0);
        assert_eq!(Vec::<f32>::try_from(&p).unwrap(), [1.0, -4.0, 1.0, 0.5]);
        assert!(penalize(&logits, &[0], 1.0).equal(&logits));
        // greedy picks the unrepeated token once the repeat's logit is halved
        let two = Tensor::from_slice(&[3.0f32, 2.0]);
        let mut s = Sampler::new(0.0, 1.0, 0).with_repetition_penalty(2.0);
        assert_eq!(s.pick_after(&two, &[0]), 1);
        assert_eq!(s.pick_after(&two, &[]), 0);
    }

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
    fn top_k_keeps_the_k_largest_and_their_ties_before_top_p() {
        // 60 tokens: ids 0..4 have logits 4, 3, 2, 2, 1; the rest -5
        let mut l = vec![-5.0f32; 60];
        l[..5].copy_from_slice(&[4.0, 3.0, 2.0, 2.0, 1.0]);
        let logits = Tensor::from_slice(&l);
        let draws = |top_k: usize, top_p: f64| {
            let mut s = Sampler::new(1.0, top_p, 5).with_top_k(top_k);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..3000 {
                seen.insert(s.pick(&logits));
            }
            seen.into_iter().collect::<Vec<_>>()
        };
        // k = 3: the third-largest logit is 2, shared by ids 2 and 3, so both stay
        assert_eq!(draws(3, 1.0), vec![0, 1, 2, 3]);
        assert_eq!(draws(1, 1.0), vec![0]);
        // top-p on what top-k kept: k = 2 leaves p(0) = e / (e + 1) = 0.73, so top-p 0.7 keeps id 0
        assert_eq!(draws(2, 0.7), vec![0]);
        // no top-k: the 55 small logits are drawn too
        assert!(draws(0, 1.0).len() > 5);
        assert_eq!(Sampler::new(1.0, 0.9, 0).top_k, DEFAULT_TOP_K);
    }

    /// The decode loop's greedy rows take the argmax of the (B, V) bf16 logits where they are;
    /// the same ids as `pick` on each row's fp32 values, ties (first index) included.
    #[test]
    fn batched_bf16_argmax_is_the_greedy_pick() {
        tch::manual_seed(3);
        let logits =
            Tensor::randn([4, 1000], (Kind::Float, tch::Device::Cpu)).to_kind(Kind::BFloat16);
        // row 1: the max at ids 10 and 900 (bf16 rounding makes near-ties exact ties too)
        let _ = logits.get(1).get(10).fill_(9.0);
        let _ = logits.get(1).get(900).fill_(9.0);
        let batched = Vec::<i64>::try_from(logits.argmax(-1, false)).unwrap();
        let mut greedy = Sampler::new(0.0, 0.9, 0);
        assert!(greedy.is_greedy());
        let one_by_one: Vec<i64> = (0..4)
            .map(|r| greedy.pick(&logits.get(r).to_kind(Kind::Float)))
            .collect();
        assert_eq!(batched, one_by_one);
        assert_eq!(batched[1], 10);
        assert!(!Sampler::new(0.0, 0.9, 0)
            .with_repetition_penalty(1.1)
            .is_greedy());
        assert!(!Sampler::new(0.7, 0.9, 0).is_greedy());
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
        // a NaN among 60 logits with top-k 3: no silent draw among the finite ones
        let mut l = vec![0.0f32; 60];
        l[7] = f32::NAN;
        l[9] = 5.0;
        let nan = Tensor::from_slice(&l);
        let want = nan.argmax(-1, false).int64_value(&[]);
        assert_eq!(Sampler::new(0.7, 0.9, 1).with_top_k(3).pick(&nan), want);
    }

    /// top_p = 1 keeps the whole vocabulary (rounding in the running mass must not cut the tail),
    /// and a draw never lands on a token of probability 0 (a -inf logit).
    #[test]
    fn top_p_one_keeps_everything_and_never_draws_impossible_tokens() {
        let probs: Vec<(usize, f64)> = (0..10).map(|i| (i, 0.1)).collect(); // sums to 0.9999999999999999
        assert_eq!(Sampler::nucleus(&probs, 1.0), 10);
        let tail = [(0, 1.0 - 1e-17), (1, 1e-17)];
        assert_eq!(Sampler::nucleus(&tail, 1.0), 2);
        let logits = Tensor::from_slice(&[0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY]);
        let mut s = Sampler::new(1.0, 1.0, 3).with_top_k(0);
        for _ in 0..2000 {
            let id = s.pick(&logits);
            assert!(id == 0 || id == 2, "{id}");
        }
    }
}
