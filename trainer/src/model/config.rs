//! Mllama config: raw `config.json` (released form with `rope_theta` + `rope_scaling` and `torch_dtype`, or the
//! transformers-5 form with `rope_parameters` and `dtype`) -> [`MllamaConfig`], every size and id resolved.
//! Defaults are transformers' `configuration_mllama.py` defaults; nothing else is assumed.
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// Activation named by `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact (erf) GELU.
    Gelu,
    /// `gelu_pytorch_tanh` / `gelu_new`: tanh approximation.
    GeluTanh,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    fn parse(s: &str, key: &str) -> Result<Self, ModelError> {
        match s {
            "gelu" => Ok(Self::Gelu),
            "gelu_pytorch_tanh" | "gelu_new" => Ok(Self::GeluTanh),
            "silu" | "swish" => Ok(Self::Silu),
            other => Err(ModelError::Config(format!(
                "{key}: unsupported activation `{other}` (supported: gelu, gelu_pytorch_tanh, gelu_new, silu)"
            ))),
        }
    }

    pub fn apply(self, x: &tch::Tensor) -> tch::Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Silu => x.silu(),
        }
    }
}

/// RoPE frequency scaling (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Llama 3.1 scaling (`rope_type: llama3`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    pub hidden_size: i64,
    pub hidden_act: Activation,
    pub num_hidden_layers: usize,
    pub num_global_layers: usize,
    pub attention_heads: i64,
    pub num_channels: i64,
    pub intermediate_size: i64,
    pub vision_output_dim: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub norm_eps: f64,
    pub max_num_tiles: i64,
    pub intermediate_layers_indices: Vec<usize>,
    pub supported_aspect_ratios: Vec<[i64; 2]>,
}

impl VisionConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.attention_heads
    }
    /// Patches per tile including the class token: (image_size / patch_size)^2 + 1.
    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2) + 1
    }
    pub fn max_aspect_ratio_id(&self) -> i64 {
        self.supported_aspect_ratios.len() as i64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub hidden_act: Activation,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub intermediate_size: i64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    pub cross_attention_layers: Vec<usize>,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
}

impl TextConfig {
    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_attention_heads
    }
    pub fn is_cross_attention_layer(&self, idx: usize) -> bool {
        self.cross_attention_layers.contains(&idx)
    }
}

/// Resolved Mllama config.
#[derive(Debug, Clone, PartialEq)]
pub struct MllamaConfig {
    pub vision: VisionConfig,
    pub text: TextConfig,
    pub image_token_index: i64,
    /// `dtype` / `torch_dtype` of the checkpoint, if given (e.g. "bfloat16").
    pub dtype: Option<String>,
}

#[derive(Deserialize)]
struct RawVision {
    #[serde(default = "d_v_hidden")]
    hidden_size: i64,
    #[serde(default = "d_gelu")]
    hidden_act: String,
    #[serde(default = "d_v_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_v_global")]
    num_global_layers: usize,
    #[serde(default = "d_v_heads", alias = "num_attention_heads")]
    attention_heads: i64,
    #[serde(default = "d_channels")]
    num_channels: i64,
    #[serde(default = "d_v_inter")]
    intermediate_size: i64,
    #[serde(default = "d_v_out")]
    vision_output_dim: i64,
    #[serde(default = "d_image")]
    image_size: Value,
    #[serde(default = "d_patch")]
    patch_size: Value,
    #[serde(default = "d_eps")]
    norm_eps: f64,
    #[serde(default = "d_tiles")]
    max_num_tiles: i64,
    intermediate_layers_indices: Option<Vec<usize>>,
    supported_aspect_ratios: Option<Vec<[i64; 2]>>,
}

#[derive(Deserialize)]
struct RawText {
    #[serde(default = "d_vocab")]
    vocab_size: i64,
    #[serde(default = "d_t_hidden")]
    hidden_size: i64,
    #[serde(default = "d_silu")]
    hidden_act: String,
    #[serde(default = "d_t_layers")]
    num_hidden_layers: usize,
    #[serde(default = "d_t_heads")]
    num_attention_heads: i64,
    #[serde(default = "d_t_kv")]
    num_key_value_heads: i64,
    #[serde(default = "d_t_inter")]
    intermediate_size: i64,
    rope_parameters: Option<Value>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    #[serde(default = "d_eps")]
    rms_norm_eps: f64,
    #[serde(default = "d_max_pos")]
    max_position_embeddings: i64,
    #[serde(default)]
    tie_word_embeddings: bool,
    cross_attention_layers: Option<Vec<usize>>,
    #[serde(default = "d_bos")]
    bos_token_id: Option<i64>,
    #[serde(default = "d_eos")]
    eos_token_id: Option<Value>,
    #[serde(default = "d_pad")]
    pad_token_id: Option<i64>,
}

fn d_v_hidden() -> i64 {
    1280
}
fn d_gelu() -> String {
    "gelu".into()
}
fn d_silu() -> String {
    "silu".into()
}
fn d_v_layers() -> usize {
    32
}
fn d_v_global() -> usize {
    8
}
fn d_v_heads() -> i64 {
    16
}
fn d_channels() -> i64 {
    3
}
fn d_v_inter() -> i64 {
    5120
}
fn d_v_out() -> i64 {
    7680
}
fn d_image() -> Value {
    Value::from(448)
}
fn d_patch() -> Value {
    Value::from(14)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_tiles() -> i64 {
    4
}
fn d_vocab() -> i64 {
    128256
}
fn d_t_hidden() -> i64 {
    4096
}
fn d_t_layers() -> usize {
    40
}
fn d_t_heads() -> i64 {
    32
}
fn d_t_kv() -> i64 {
    8
}
fn d_t_inter() -> i64 {
    14336
}
fn d_max_pos() -> i64 {
    131072
}
fn d_bos() -> Option<i64> {
    Some(128000)
}
fn d_eos() -> Option<Value> {
    Some(Value::from(128001))
}
fn d_pad() -> Option<i64> {
    Some(128004)
}

/// `image_size` / `patch_size` may be an int or a square [h, w] pair.
fn square(v: &Value, key: &str) -> Result<i64, ModelError> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| ModelError::Config(format!("{key}: expected an integer"))),
        Value::Array(a) if a.len() == 2 && a[0] == a[1] => square(&a[0], key),
        other => Err(ModelError::Config(format!(
            "{key}: expected an integer or a square [h, w] pair, got {other}"
        ))),
    }
}

/// `section.key` as a number (`section`: the RoPE table the file uses, for the message).
fn num(v: &Value, section: &str, key: &str) -> Result<f64, ModelError> {
    v.get(key).and_then(Value::as_f64).ok_or_else(|| {
        ModelError::Config(format!(
            "text_config.{section}.{key}: missing or not a number"
        ))
    })
}

impl MllamaConfig {
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            ModelError::Config(m) => ModelError::Config(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    pub fn from_json_str(s: &str) -> Result<Self, ModelError> {
        let root: Value = serde_json::from_str(s).map_err(|e| ModelError::Config(e.to_string()))?;
        let sub = |k: &str| {
            root.get(k)
                .cloned()
                .unwrap_or(Value::Object(Default::default()))
        };
        let rv: RawVision = serde_json::from_value(sub("vision_config"))
            .map_err(|e| ModelError::Config(format!("vision_config: {e}")))?;
        let rt: RawText = serde_json::from_value(sub("text_config"))
            .map_err(|e| ModelError::Config(format!("text_config: {e}")))?;

        // RoPE: transformers 5 `rope_parameters` (theta inside) or released `rope_theta` + `rope_scaling`.
        let section = match rt.rope_parameters {
            Some(_) => "rope_parameters",
            None => "rope_scaling",
        };
        let (rope_theta, scaling) = match (&rt.rope_parameters, rt.rope_theta) {
            (Some(p), _) => {
                let theta = p
                    .get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(rt.rope_theta)
                    .unwrap_or(500000.0);
                (theta, Some(p.clone()))
            }
            (None, theta) => (theta.unwrap_or(500000.0), rt.rope_scaling.clone()),
        };
        let rope_scaling = match scaling.filter(|v| !v.is_null()) {
            None => RopeScaling::Default,
            Some(p) => {
                let kind = p
                    .get("rope_type")
                    .or_else(|| p.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                match kind {
                    "default" => RopeScaling::Default,
                    "llama3" => RopeScaling::Llama3 {
                        factor: num(&p, section, "factor")?,
                        low_freq_factor: num(&p, section, "low_freq_factor")?,
                        high_freq_factor: num(&p, section, "high_freq_factor")?,
                        original_max_position_embeddings: num(
                            &p,
                            section,
                            "original_max_position_embeddings",
                        )?,
                    },
                    other => {
                        return Err(ModelError::Config(format!(
                            "text_config.rope_type `{other}` is not supported (supported: default, llama3)"
                        )))
                    }
                }
            }
        };
        let eos_token_ids = match &rt.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_i64).collect(),
            Some(v) => v.as_i64().into_iter().collect(),
        };
        let vision = VisionConfig {
            hidden_size: rv.hidden_size,
            hidden_act: Activation::parse(&rv.hidden_act, "vision_config.hidden_act")?,
            num_hidden_layers: rv.num_hidden_layers,
            num_global_layers: rv.num_global_layers,
            attention_heads: rv.attention_heads,
            num_channels: rv.num_channels,
            intermediate_size: rv.intermediate_size,
            vision_output_dim: rv.vision_output_dim,
            image_size: square(&rv.image_size, "vision_config.image_size")?,
            patch_size: square(&rv.patch_size, "vision_config.patch_size")?,
            norm_eps: rv.norm_eps,
            max_num_tiles: rv.max_num_tiles,
            intermediate_layers_indices: rv
                .intermediate_layers_indices
                .unwrap_or_else(|| vec![3, 7, 15, 23, 30]),
            supported_aspect_ratios: rv.supported_aspect_ratios.unwrap_or_else(|| {
                vec![
                    [1, 1],
                    [1, 2],
                    [1, 3],
                    [1, 4],
                    [2, 1],
                    [2, 2],
                    [3, 1],
                    [4, 1],
                ]
            }),
        };
        let text = TextConfig {
            vocab_size: rt.vocab_size,
            hidden_size: rt.hidden_size,
            hidden_act: Activation::parse(&rt.hidden_act, "text_config.hidden_act")?,
            num_hidden_layers: rt.num_hidden_layers,
            num_attention_heads: rt.num_attention_heads,
            num_key_value_heads: rt.num_key_value_heads,
            intermediate_size: rt.intermediate_size,
            rope_theta,
            rope_scaling,
            rms_norm_eps: rt.rms_norm_eps,
            max_position_embeddings: rt.max_position_embeddings,
            tie_word_embeddings: rt.tie_word_embeddings,
            cross_attention_layers: rt
                .cross_attention_layers
                .unwrap_or_else(|| vec![3, 8, 13, 18, 23, 28, 33, 38]),
            bos_token_id: rt.bos_token_id,
            eos_token_ids,
            pad_token_id: rt.pad_token_id,
        };
        let image_token_index = root
            .get("image_token_index")
            .or_else(|| root.get("image_token_id"))
            .and_then(Value::as_i64)
            .unwrap_or(128256);
        let dtype = root
            .get("dtype")
            .or_else(|| root.get("torch_dtype"))
            .and_then(Value::as_str)
            .map(String::from);
        let cfg = MllamaConfig {
            vision,
            text,
            image_token_index,
            dtype,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The special ids generation embeds (pad for left-padded batches) and stops at (eos) are
    /// tokens of the embedding (an id past it was a panic on the CPU, a device-side assert on a
    /// GPU). Checked by `infer` and `eval`, not at load: training reads none of them, and a small
    /// model saved with transformers' default ids (128000...) over a small vocabulary trains.
    pub fn check_special_ids(&self) -> Result<(), ModelError> {
        let t = &self.text;
        let rows = t.vocab_size + 8;
        let bad: Vec<String> = [
            ("text_config.pad_token_id", t.pad_token_id),
            ("text_config.bos_token_id", t.bos_token_id),
        ]
        .into_iter()
        .chain(
            t.eos_token_ids
                .iter()
                .map(|&i| ("text_config.eos_token_id", Some(i))),
        )
        .filter_map(|(key, id)| {
            let id = id.filter(|&i| !(0..rows).contains(&i))?;
            Some(format!(
                "{key} {id} is not a token of the embedding (0..{rows}: vocab_size + 8)"
            ))
        })
        .collect();
        match bad.is_empty() {
            true => Ok(()),
            false => Err(ModelError::Config(bad.join("; "))),
        }
    }

    fn validate(&self) -> Result<(), ModelError> {
        let (v, t) = (&self.vision, &self.text);
        // sizes first: the divisibility checks below divide by them, and the model builds
        // tensors of these sizes (0 or negative panicked there)
        let sizes = [
            ("vision_config.hidden_size", v.hidden_size),
            ("vision_config.attention_heads", v.attention_heads),
            ("vision_config.num_channels", v.num_channels),
            ("vision_config.intermediate_size", v.intermediate_size),
            ("vision_config.vision_output_dim", v.vision_output_dim),
            ("vision_config.image_size", v.image_size),
            ("vision_config.patch_size", v.patch_size),
            ("vision_config.max_num_tiles", v.max_num_tiles),
            ("text_config.vocab_size", t.vocab_size),
            ("text_config.hidden_size", t.hidden_size),
            ("text_config.num_attention_heads", t.num_attention_heads),
            ("text_config.num_key_value_heads", t.num_key_value_heads),
            ("text_config.intermediate_size", t.intermediate_size),
            (
                "text_config.max_position_embeddings",
                t.max_position_embeddings,
            ),
        ];
        // (and at most 2^24: products of these sizes must not overflow)
        const MAX: i64 = 1 << 24;
        let not_positive: Vec<String> = sizes
            .iter()
            .filter(|(_, n)| *n < 1 || *n > MAX)
            .map(|(k, n)| match *n < 1 {
                true => format!("{k} must be >= 1 (got {n})"),
                false => format!("{k} must be at most 2^24 (got {n})"),
            })
            .collect();
        if !not_positive.is_empty() {
            return Err(ModelError::Config(not_positive.join("; ")));
        }
        let mut bad = vec![];
        if v.patch_size > v.image_size {
            bad.push(format!(
                "vision_config.patch_size {} is larger than image_size {}",
                v.patch_size, v.image_size
            ));
        }
        if v.hidden_size % v.attention_heads != 0 {
            bad.push("vision_config.hidden_size must be divisible by attention_heads".to_string());
        }
        if t.hidden_size % t.num_attention_heads != 0 {
            bad.push(
                "text_config.hidden_size must be divisible by num_attention_heads".to_string(),
            );
        }
        if t.hidden_size % t.num_attention_heads == 0
            && (t.hidden_size / t.num_attention_heads) % 2 != 0
        {
            bad.push(format!(
                "text_config: head dim hidden_size / num_attention_heads = {} must be even (rotary embeddings rotate pairs)",
                t.hidden_size / t.num_attention_heads
            ));
        }
        if v.intermediate_layers_indices.is_empty() {
            bad.push(
                "vision_config.intermediate_layers_indices is empty: Mllama concatenates at least one intermediate layer's output (Llama 3.2 Vision: [3, 7, 15, 23, 30])"
                    .to_string(),
            );
        }
        if t.num_attention_heads % t.num_key_value_heads != 0 {
            bad.push(
                "text_config.num_attention_heads must be divisible by num_key_value_heads"
                    .to_string(),
            );
        }
        if let Some(i) = v
            .intermediate_layers_indices
            .iter()
            .find(|&&i| i >= v.num_hidden_layers)
        {
            bad.push(format!(
                "vision_config.intermediate_layers_indices: {i} >= num_hidden_layers"
            ));
        }
        if v.vision_output_dim != v.hidden_size * (v.intermediate_layers_indices.len() as i64 + 1) {
            bad.push(format!(
                "vision_config.vision_output_dim {} != hidden_size x (1 + len(intermediate_layers_indices)) = {}",
                v.vision_output_dim,
                v.hidden_size * (v.intermediate_layers_indices.len() as i64 + 1)
            ));
        }
        if let Some(i) = t
            .cross_attention_layers
            .iter()
            .find(|&&i| i >= t.num_hidden_layers)
        {
            bad.push(format!(
                "text_config.cross_attention_layers: {i} >= num_hidden_layers"
            ));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(ModelError::Config(bad.join("; ")))
        }
    }
}
