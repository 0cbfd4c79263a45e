//! `Linear` (weight, optional bias) with an optional LoRA branch, PEFT semantics:
//! y = x W^T + b + dropout(x) A^T B^T * scaling, scaling = alpha / r (alpha / sqrt(r) with rslora);
//! A (r, in) kaiming-uniform(a = sqrt(5)), B (out, r) zeros; target_modules matched as PEFT does.
//! DoRA: y = x W^T + b + (g - 1) (x W^T) + g (x A^T B^T) scaling, with g the learned magnitude m
//! over the row norms of W + scaling B A, that norm detached (PEFT's `DoraLinearLayer`).
use regex::Regex;
use tch::{Kind, Tensor};

use super::ModelError;
use crate::rng::SplitMix64;

/// LoRA branch of one linear layer.
#[derive(Debug)]
pub struct LoraBranch {
    pub a: Tensor, // (r, in)
    pub b: Tensor, // (out, r)
    pub scaling: f64,
    pub dropout: f64,
    /// Dropout is applied only while training.
    pub training: bool,
    /// DoRA: the learned magnitude m of each row of the adapted weight (out,), in the factors'
    /// dtype: a trainable parameter like A and B.
    pub magnitude: Option<Tensor>,
    /// DoRA's g = m / ||W + scaling B A|| (out,) computed once for weights that no longer change
    /// (`fix_dora`: inference, merging); None computes it in every forward, as training must.
    pub dora_scale: Option<Tensor>,
}

impl LoraBranch {
    /// A fresh branch of rank `r` on `lin` as PEFT initializes it, factors of `kind` (else the
    /// weight's): A (r, in) kaiming-uniform with a = sqrt(5), i.e. uniform in
    /// (-1/sqrt(in), 1/sqrt(in)), drawn from `rng`; B (out, r) zeros.
    pub fn init(
        lin: &Linear,
        r: i64,
        scaling: f64,
        dropout: f64,
        kind: Option<Kind>,
        rng: &mut SplitMix64,
    ) -> Self {
        let (out, inp) = (lin.out_features(), lin.in_features());
        let opts = (kind.unwrap_or(lin.weight.kind()), lin.weight.device());
        let bound = 1.0 / (inp as f64).sqrt();
        let v: Vec<f32> = (0..r * inp)
            .map(|_| (bound * (2.0 * rng.next_f64() - 1.0)) as f32)
            .collect();
        let a = Tensor::from_slice(&v)
            .view([r, inp])
            .to_kind(opts.0)
            .to_device(opts.1);
        Self::new(a, Tensor::zeros([out, r], opts), scaling, dropout)
    }

    /// A plain LoRA branch: A (r, in), B (out, r), inference mode.
    pub fn new(a: Tensor, b: Tensor, scaling: f64, dropout: f64) -> Self {
        Self {
            a,
            b,
            scaling,
            dropout,
            training: false,
            magnitude: None,
            dora_scale: None,
        }
    }

    /// Makes the branch DoRA with `magnitude` (out,) over base `weight` (out, in), its g fixed
    /// (`fix_dora`): the weights do not change from here (inference, merging).
    pub fn set_dora(&mut self, magnitude: &Tensor, weight: &Tensor) {
        self.magnitude = Some(magnitude.to_kind(self.a.kind()));
        self.fix_dora(weight);
    }

    /// Computes DoRA's g once, for factors, magnitude and `weight` that no longer change.
    pub fn fix_dora(&mut self, weight: &Tensor) {
        self.dora_scale = None;
        self.dora_scale = tch::no_grad(|| self.dora_factor(weight));
    }

    /// DoRA's g = m / ||W + scaling B A|| (out,) in the factors' dtype (fp32 over a bf16 model,
    /// as peft loads adapters), None without DoRA. PEFT's `get_weight_norm`, the norm of each
    /// row, detached (B A too): the gradient reaches m through the division only.
    pub fn dora_factor(&self, weight: &Tensor) -> Option<Tensor> {
        if let Some(g) = &self.dora_scale {
            return Some(g.shallow_clone());
        }
        let m = self.magnitude.as_ref()?;
        let kind = self.a.kind();
        let norm = tch::no_grad(|| {
            let delta = self.b.detach().matmul(&self.a.detach()) * self.scaling; // (out, in)
            let adapted = weight.detach().to_kind(kind) + delta;
            adapted.linalg_norm(2.0, [1i64].as_slice(), false, kind) // (out,)
        });
        Some(m.to_kind(kind).to_device(norm.device()) / norm)
    }

    /// PEFT's initial magnitude of a fresh branch (B zero): the norm of each row of `weight`
    /// (out, in) in its own dtype, as `get_weight_norm` computes it, then in the factors'.
    pub fn init_dora(&mut self, weight: &Tensor) {
        let m = tch::no_grad(|| {
            let w = weight.detach();
            w.linalg_norm(2.0, [1i64].as_slice(), false, w.kind()) // (out,)
        });
        let m = m.to_kind(self.a.kind()).to_device(self.a.device());
        self.magnitude = Some(m);
        self.dora_scale = None;
    }

    /// A fresh DoRA branch whose magnitude another rank computes (`DoraBase`): zeros (out,) for
    /// now, which the ranks' sum replaces.
    pub fn init_dora_elsewhere(&mut self) {
        let out = self.b.size()[0];
        self.magnitude = Some(Tensor::zeros([out], (self.a.kind(), self.a.device())));
        self.dora_scale = None;
    }
}

/// Linear layer named by its module path (transformers-5 naming, e.g. `model.language_model.layers.0.self_attn.q_proj`).
#[derive(Debug)]
pub struct Linear {
    pub path: String,
    pub weight: Tensor,       // (out, in)
    pub bias: Option<Tensor>, // (out,)
    pub lora: Option<LoraBranch>,
}

/// Whether multiplying by `s` is exact in every float format (a power of two, not too small): then the
/// order of the LoRA branch's products does not change a bit.
fn exact_scale(s: f64) -> bool {
    s > 0.0 && s.is_finite() && s.log2().fract() == 0.0 && s.log2().abs() <= 100.0
}

impl Linear {
    pub fn forward(&self, x: &Tensor) -> Tensor {
        // decode steps (a few rows, large fp32 weights, no autograd) take the bandwidth-bound fast path
        let y =
            super::gemv::try_linear(x, &self.weight, self.bias.as_ref(), super::gemv::threads())
                .unwrap_or_else(|| x.linear(&self.weight, self.bias.as_ref())); // (..., out)
        match &self.lora {
            None => y,
            Some(l) => {
                let xd = if l.training && l.dropout > 0.0 {
                    x.dropout(l.dropout, true)
                } else {
                    x.shallow_clone()
                };
                let xd = xd.to_kind(l.a.kind());
                let za = xd.linear::<Tensor>(&l.a, None); // (..., r)
                if let Some(g) = l.dora_factor(&self.weight) {
                    return self.dora_forward(y, &xd, za, &g, l);
                }

                // PEFT scales the (..., out) product. A power of two (16 / 8, 32 / 8) scales exactly, so it is
                // applied to the rank-r intermediate instead, one elementwise pass over r columns rather than
                // `out`, bitwise the same; any other scaling (alpha / r = 2.5, rslora's alpha / sqrt(r)) rounds
                // differently in bf16 there, so it is applied where PEFT applies it
                let z = if exact_scale(l.scaling) {
                    (za * l.scaling).linear::<Tensor>(&l.b, None)
                } else {
                    za.linear::<Tensor>(&l.b, None) * l.scaling
                }; // (..., out)
                if z.kind() == y.kind() {
                    y + z
                } else {
                    // factors kept in fp32 over a bf16 model (inference, as PEFT's from_pretrained with
                    // autocast_adapter_dtype): the branch in fp32, added in fp32, one rounding at the end
                    (y.to_kind(z.kind()) + z).to_kind(y.kind())
                }
            }
        }
    }

    /// PEFT's DoRA output: y + (g - 1) base + g (B A x) scaling, base = y less its bias (or,
    /// with dropout on, the weight alone on the dropped input), in the factors' dtype, rounded
    /// once to y's. `xd`: the input in the factors' dtype, `za`: A x (..., r), `g` (out,).
    fn dora_forward(
        &self,
        y: Tensor,
        xd: &Tensor,
        za: Tensor,
        g: &Tensor,
        l: &LoraBranch,
    ) -> Tensor {
        let lora = za.linear::<Tensor>(&l.b, None); // (..., out)
        let base = if l.training && l.dropout > 0.0 {
            xd.linear::<Tensor>(&self.weight.to_kind(xd.kind()), None)
        } else {
            match &self.bias {
                Some(b) => &y - b,
                None => y.shallow_clone(),
            }
        }; // (..., out)
        let z = (g - 1.0) * base + g * lora * l.scaling; // (..., out)
        (y.to_kind(z.kind()) + z).to_kind(y.kind())
    }

    pub fn in_features(&self) -> i64 {
        self.weight.size()[1]
    }
    pub fn out_features(&self) -> i64 {
        self.weight.size()[0]
    }

    /// W += scaling * B A, and with DoRA W = g (W + scaling B A) (PEFT's `merge`); removes the
    /// branch (export of merged weights).
    pub fn merge_lora(&mut self) {
        if let Some(l) = self.lora.take() {
            tch::no_grad(|| {
                let delta = l.b.to_kind(Kind::Float).matmul(&l.a.to_kind(Kind::Float)) * l.scaling; // (out, in)
                let mut merged = self.weight.to_kind(Kind::Float) + delta;
                if let Some(g) = l.dora_factor(&self.weight) {
                    merged = g.to_kind(Kind::Float).unsqueeze(1) * merged;
                }
                self.weight = merged.to_kind(self.weight.kind());
            });
        }
    }
}

/// PEFT's shorthand for every linear layer but the output one (`lm_head`), as a
/// `target_modules` string (PEFT resolves it when it injects an adapter, saved or fresh).
pub const ALL_LINEAR: &str = "all-linear";

/// PEFT `target_modules`: a list (exact name or `.`-suffix match of the module path) or one regex
/// (full match), or `all-linear`.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    Names(Vec<String>),
    Regex(String),
}

/// A JSON list of names, or the regex in quotes (as written, unescaped).
impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Names(n) => write!(f, "{}", serde_json::json!(n)),
            Self::Regex(r) => write!(f, "\"{r}\""),
        }
    }
}

impl TargetModules {
    /// The names as this model's (canonical) module paths: an adapter saved under transformers
    /// 4 may name modules in full as `language_model.model.layers.3.self_attn.q_proj`. Names
    /// already canonical, and bare suffixes, stay.
    pub fn canonical(&self) -> Self {
        match self {
            Self::Names(n) => Self::Names(
                n.iter()
                    .map(|n| super::weights::legacy_to_canonical(n))
                    .collect(),
            ),
            Self::Regex(r) => Self::Regex(r.clone()),
        }
    }

    pub fn compile(&self) -> Result<TargetMatcher, ModelError> {
        Ok(match self {
            Self::Names(n) => TargetMatcher::Names(n.clone()),
            // (PEFT lowercases it first: "ALL-LINEAR" too)
            Self::Regex(r) if r.eq_ignore_ascii_case(ALL_LINEAR) => TargetMatcher::AllLinear,
            Self::Regex(r) => TargetMatcher::Regex(
                full_match(r)
                    .map_err(|e| ModelError::Adapter(format!("target_modules regex `{r}`: {e}")))?,
            ),
        })
    }
}

/// `r` as Python's `re.fullmatch` uses it.
pub fn full_match(r: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{r})$"))
}

pub enum TargetMatcher {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

impl TargetMatcher {
    /// PEFT `check_target_module_exists`: a string is `re.fullmatch`ed against the module path; a list matches
    /// when the path equals a name or ends with `.` + name. A regex also sees the path in
    /// transformers-4 naming (`language_model.model...`), as a config written for it names them.
    pub fn matches(&self, path: &str) -> bool {
        self.matches_named(path, path)
            || matches!(self, Self::Regex(_))
                && self.matches_named(&super::weights::canonical_to_legacy(path), path)
    }

    /// The match in one naming: `name` is the module's path in it, `canonical` in this model's.
    pub fn matches_named(&self, name: &str, canonical: &str) -> bool {
        match self {
            Self::Names(names) => names
                .iter()
                .any(|n| name == n || name.ends_with(&format!(".{n}"))),
            Self::Regex(r) => r.is_match(name),
            // PEFT leaves out the model's output embedding (`get_output_embeddings`)
            Self::AllLinear => canonical != "lm_head",
        }
    }
}

/// PEFT's `scaling`, the factor on the update `B A x`: alpha / r, or alpha / sqrt(r) with rslora.
pub fn scaling(alpha: f64, r: f64, use_rslora: bool) -> f64 {
    match use_rslora {
        true => alpha / r.sqrt(),
        false => alpha / r,
    }
}

/// LoRA hyper-parameters (the PEFT `LoraConfig` fields we support).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: i64,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r as f64, self.use_rslora)
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp32_factors_over_a_bf16_layer_add_in_fp32_and_round_once() {
        let bf = (Kind::BFloat16, tch::Device::Cpu);
        let f32s = (Kind::Float, tch::Device::Cpu);
        tch::manual_seed(3);
        let x = Tensor::randn([5, 16], bf);
        let weight = Tensor::randn([8, 16], bf);
        let a = Tensor::randn([4, 16], f32s) * 0.1;
        let b = Tensor::randn([8, 4], f32s) * 0.1;
        let y_base = x.linear::<Tensor>(&weight, None);
        let branch =
            (x.to_kind(Kind::Float).linear::<Tensor>(&a, None) * 2.0).linear::<Tensor>(&b, None);
        let want = (y_base.to_kind(Kind::Float) + branch).to_kind(Kind::BFloat16);
        let layer = Linear {
            path: "q_proj".into(),
            weight,
            bias: None,
            lora: Some(LoraBranch::new(a, b, 2.0, 0.0)),
        };
        let got = layer.forward(&x);
        assert_eq!(got.kind(), Kind::BFloat16);
        assert!(got.equal(&want));
    }

    /// PEFT's `result + lora_B(lora_A(x)) * scaling` in bf16, bit for bit, for a scaling that is not a power of
    /// two (alpha / r = 2.5, rslora's 16 / sqrt(6)) and for one that is (applied to the intermediate).
    #[test]
    fn the_bf16_branch_rounds_as_peft_for_any_scaling() {
        let bf = (Kind::BFloat16, tch::Device::Cpu);
        tch::manual_seed(5);
        let x = Tensor::randn([7, 32], bf);
        let weight = Tensor::randn([24, 32], bf);
        let a = Tensor::randn([6, 32], bf) * 0.3;
        let b = Tensor::randn([24, 6], bf) * 0.3;
        let mut differs_if_reordered = false;
        for scaling in [2.5, 16.0 / 6f64.sqrt(), 2.0, 0.5] {
            let peft = x.linear::<Tensor>(&weight, None)
                + x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None) * scaling;
            let layer = Linear {
                path: "q_proj".into(),
                weight: weight.shallow_clone(),
                bias: None,
                lora: Some(LoraBranch::new(
                    a.shallow_clone(),
                    b.shallow_clone(),
                    scaling,
                    0.0,
                )),
            };
            assert!(layer.forward(&x).equal(&peft), "scaling {scaling}");
            let reordered = x.linear::<Tensor>(&weight, None)
                + (x.linear::<Tensor>(&a, None) * scaling).linear::<Tensor>(&b, None);
            differs_if_reordered |= !reordered.equal(&peft);
        }
        // the test can tell the orders apart (for the non-power-of-two scalings)
        assert!(differs_if_reordered);
    }

    #[test]
    fn full_transformers_4_names_read_as_canonical_paths() {
        let names = |v: &[&str]| TargetModules::Names(v.iter().map(|s| s.to_string()).collect());
        let t = names(&[
            "language_model.model.layers.0.self_attn.v_proj",
            "q_proj",
            "model.language_model.layers.1.self_attn.q_proj",
        ]);
        assert_eq!(
            t.canonical(),
            names(&[
                "model.language_model.layers.0.self_attn.v_proj",
                "q_proj",
                "model.language_model.layers.1.self_attn.q_proj",
            ])
        );
        // a list matches canonical paths only (what training and a transformers-5 PEFT see)
        let m = names(&["language_model.model.layers.0.self_attn.v_proj"])
            .compile()
            .unwrap();
        assert!(!m.matches("model.language_model.layers.0.self_attn.v_proj"));
    }

    #[test]
    fn regex_target_modules_match_either_naming() {
        let canonical = "model.language_model.layers.3.self_attn.q_proj";
        for (regex, want) in [
            (r".*language_model.*\.(q_proj|v_proj)", true),
            // transformers 4 module names (an adapter made then)
            (
                r"language_model\.model\.layers\.\d+\.self_attn\.(q|v)_proj",
                true,
            ),
            (
                r"model\.language_model\.layers\.\d+\.self_attn\.q_proj",
                true,
            ),
            (r"vision_model\..*q_proj", false),
        ] {
            let m = TargetModules::Regex(regex.into()).compile().unwrap();
            assert_eq!(m.matches(canonical), want, "{regex}");
        }
    }

    #[test]
    fn all_linear_is_every_linear_but_the_output_layer() {
        // (in any case, as PEFT lowercases it)
        let upper = TargetModules::Regex("ALL-Linear".into()).compile().unwrap();
        assert!(matches!(upper, TargetMatcher::AllLinear));
        let m = TargetModules::Regex(ALL_LINEAR.into()).compile().unwrap();
        for path in [
            "model.language_model.layers.3.mlp.down_proj",
            "model.vision_model.transformer.layers.0.mlp.fc1",
            "model.multi_modal_projector",
        ] {
            assert!(m.matches(path), "{path}");
        }
        assert!(!m.matches("lm_head"));
    }

    /// DoRA against its definition in fp64: y = b + g (x W^T + s x A^T B^T), g = m / ||W + s B A||
    /// per output row; the merged weight g (W + s B A) gives the same; and over a bf16 layer with
    /// fp32 factors, PEFT's order: the bf16 output, less its bias, scaled in fp32, one rounding.
    #[test]
    fn dora_is_the_magnitude_times_the_normalized_adapted_weight() {
        let f64s = (Kind::Double, tch::Device::Cpu);
        tch::manual_seed(7);
        let x = Tensor::randn([5, 16], f64s);
        let (w, bias) = (Tensor::randn([8, 16], f64s), Tensor::randn([8], f64s));
        let (a, b) = (
            Tensor::randn([4, 16], f64s) * 0.3,
            Tensor::randn([8, 4], f64s) * 0.3,
        );
        let m = Tensor::rand([8], f64s) + 0.5;
        let s = 2.5;
        let adapted = &w + b.matmul(&a) * s; // (out, in)
        let g = &m
            / adapted
                .square()
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
                .sqrt();
        let want = x.linear(&adapted, None::<Tensor>) * &g + &bias; // (5, out)
        let layer = |kind: Kind, lora_kind: Kind| {
            let mut br = LoraBranch::new(a.to_kind(lora_kind), b.to_kind(lora_kind), s, 0.0);
            br.set_dora(&m.to_kind(lora_kind), &w.to_kind(kind));
            Linear {
                path: "q_proj".into(),
                weight: w.to_kind(kind),
                bias: Some(bias.to_kind(kind)),
                lora: Some(br),
            }
        };
        let mut fp32 = layer(Kind::Float, Kind::Float);
        let got = fp32.forward(&x.to_kind(Kind::Float)).to_kind(Kind::Double);
        let rel = |t: &Tensor| {
            (t - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[])
        };
        assert!(rel(&got) < 1e-6, "forward rel {}", rel(&got));
        fp32.merge_lora();
        let merged = fp32.forward(&x.to_kind(Kind::Float)).to_kind(Kind::Double);
        assert!(rel(&merged) < 1e-6, "merged rel {}", rel(&merged));

        let bf = layer(Kind::BFloat16, Kind::Float);
        let xb = x.to_kind(Kind::BFloat16);
        let y = xb.linear(
            &w.to_kind(Kind::BFloat16),
            Some(&bias.to_kind(Kind::BFloat16)),
        ); // bf16
        let gf = bf
            .lora
            .as_ref()
            .unwrap()
            .dora_scale
            .as_ref()
            .unwrap()
            .shallow_clone();
        let lora = xb
            .to_kind(Kind::Float)
            .linear::<Tensor>(&a.to_kind(Kind::Float), None)
            .linear::<Tensor>(&b.to_kind(Kind::Float), None);
        let base = &y - bias.to_kind(Kind::BFloat16); // (rounded in bf16, as PEFT's)
        let peft = (y.to_kind(Kind::Float) + ((&gf - 1.0) * base + &gf * lora * s))
            .to_kind(Kind::BFloat16);
        assert!(bf.forward(&xb).equal(&peft));
        let close = rel(&bf.forward(&xb).to_kind(Kind::Double));
        assert!(close < 2e-2, "bf16 rel {close}");
    }

    /// Training DoRA: the gradients of A, B and m are those of PEFT's forward, whose norm of
    /// W + scaling B A is detached (fp64 reference written out); with the norm differentiated
    /// they would differ.
    #[test]
    fn dora_gradients_treat_the_weight_norm_as_a_constant() {
        let f64s = (Kind::Double, tch::Device::Cpu);
        tch::manual_seed(11);
        let x = Tensor::randn([6, 12], f64s);
        let w = Tensor::randn([10, 12], f64s);
        let bias = Tensor::randn([10], f64s);
        let (a0, b0) = (Tensor::randn([3, 12], f64s), Tensor::randn([10, 3], f64s));
        let m0 = Tensor::rand([10], f64s) + 0.5;
        let upstream = Tensor::randn([6, 10], f64s); // d loss / d y
        let s = 1.5;
        let leaf = |t: &Tensor| t.detach().copy().set_requires_grad(true);
        let grads = |detached: bool| {
            let (a, b, m) = (leaf(&a0), leaf(&b0), leaf(&m0));
            let adapted = &w + b.matmul(&a) * s; // (out, in)
            let norm = adapted
                .square()
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
                .sqrt();
            let norm = if detached { norm.detach() } else { norm };
            let g = &m / norm;
            let base = x.linear::<Tensor>(&w, None);
            let lora = x.linear::<Tensor>(&a, None).linear::<Tensor>(&b, None);
            let y = &base + &bias + (&g - 1.0) * &base + &g * lora * s;
            (y * &upstream).sum(Kind::Double).backward();
            [a.grad(), b.grad(), m.grad()]
        };
        let (peft, through_norm) = (grads(true), grads(false));
        let (a, b, m) = (leaf(&a0), leaf(&b0), leaf(&m0));
        let mut br = LoraBranch::new(a.shallow_clone(), b.shallow_clone(), s, 0.0);
        br.training = true;
        br.magnitude = Some(m.shallow_clone());
        let layer = Linear {
            path: "fc1".into(),
            weight: w.shallow_clone(),
            bias: Some(bias.shallow_clone()),
            lora: Some(br),
        };
        (layer.forward(&x) * &upstream).sum(Kind::Double).backward();
        let mut differs = false;
        for (i, (ours, (want, other))) in [a.grad(), b.grad(), m.grad()]
            .iter()
            .zip(peft.iter().zip(&through_norm))
            .enumerate()
        {
            let rel =
                (ours - want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
            assert!(rel < 1e-12, "gradient {i}: relative {rel}");
            differs |= !other.allclose(want, 1e-6, 1e-9, false);
        }
        assert!(differs, "the reference does not tell a detached norm apart");
    }
}
