//! PEFT adapters beyond plain LoRA on whole modules (tests/fixtures/peft_variants, made by Python
//! peft with make_peft_variants_golden.py there): `dora` (DoRA on attention and a biased vision
//! MLP layer, layers_to_transform + layers_pattern, rank_pattern, alpha_pattern, a regex
//! exclude_modules, a targeted module saved whole) and `patterns` (regex target_modules, regex
//! pattern keys, a list exclude_modules, modules_to_save with biases and lm_head). Each loads onto
//! our model on the layers peft wraps, with the saved modules' parameters, and gives peft's logits
//! (fp32 within 1e-5 relative; DoRA over a bf16 base as close as the two bf16 models are to each
//! other), and `export --format merged` writes the weights peft's merge_and_unload computes.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use common::ckpt::{probe_pixels, rel_err};
use common::repo;
use tch::{Kind, Tensor};
use trainer::checkpoint::merged::{export_merged, MergeSource};
use trainer::model::weights::{canonical_to_legacy, legacy_to_canonical};
use trainer::model::{Batch, Images, LoadOptions, MllamaModel};

struct Golden {
    tensors: HashMap<String, Tensor>,
    /// Module paths peft wrapped.
    wrapped: BTreeSet<String>,
    /// Parameters of modules_to_save.
    saved: BTreeSet<String>,
}

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

fn golden(name: &str) -> Golden {
    let path = fixtures().join(format!("peft_variants/{name}_golden.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    Golden {
        tensors: Tensor::read_safetensors(&path)
            .unwrap()
            .into_iter()
            .collect(),
        wrapped: serde_json::from_str(&meta["wrapped"]).unwrap(),
        saved: serde_json::from_str(&meta["saved"]).unwrap(),
    }
}

fn batch(g: &Golden, kind: Kind) -> Batch {
    let t = &g.tensors;
    Batch {
        input_ids: t["input_ids"].shallow_clone(),
        attention_mask: Some(t["attention_mask"].shallow_clone()),
        labels: None,
        images: Some(Images {
            pixel_values: probe_pixels(1, 1, 4).to_kind(kind), // (1, 1, 4, 3, 56, 56), as the script makes them
            aspect_ratio_ids: t["aspect_ratio_ids"].shallow_clone(),
            aspect_ratio_mask: t["aspect_ratio_mask"].shallow_clone(),
            cross_attention_mask: t["cross_attention_mask"].shallow_clone(),
        }),
    }
}

fn base(dtype: Kind) -> MllamaModel {
    let opts = LoadOptions {
        dtype,
        ..LoadOptions::default()
    };
    MllamaModel::load(&fixtures().join("train/model"), opts).unwrap()
}

fn logits(model: &mut MllamaModel, batch: &Batch) -> Tensor {
    tch::no_grad(|| model.forward(batch))
        .unwrap()
        .to_kind(Kind::Float) // (1, S, 711)
}

fn wrapped_layers(model: &mut MllamaModel) -> BTreeSet<String> {
    let mut v = BTreeSet::new();
    model.visit_linears(&mut |l| {
        if l.lora.is_some() {
            v.insert(l.path.clone());
        }
    });
    v
}

/// fp32: the layers peft wraps, and peft's logits.
fn loads_as_peft_loads(name: &str) {
    let g = golden(name);
    let b = batch(&g, Kind::Float);
    let mut model = base(Kind::Float);
    model.set_lora_kind(Kind::Float);
    let plain = logits(&mut model, &b);
    assert!(rel_err(&plain, &g.tensors["plain_logits"]) < 1e-5);
    let dir = fixtures().join("peft_variants").join(name);
    model.load_adapter(&dir).unwrap();
    assert_eq!(wrapped_layers(&mut model), g.wrapped);
    let mut saved = BTreeSet::new();
    model.visit_params(&mut |n, t| {
        if let Some(want) = g.tensors.get(&format!("merged.{n}")) {
            if !g.wrapped.contains(n.trim_end_matches(".weight")) {
                assert!(t.equal(want), "{n} is not the adapter's");
                saved.insert(n.to_string());
            }
        }
    });
    assert_eq!(saved, g.saved);
    let err = rel_err(&logits(&mut model, &b), &g.tensors["logits"]);
    let effect = rel_err(&plain, &g.tensors["logits"]);
    println!("{name}: ours vs peft rel {err:.2e} (without the adapter: {effect:.2e})");
    assert!(err < 1e-5, "{name}: logits differ from peft's: rel {err}");
    assert!(
        effect > 1e-2,
        "{name}: the adapter has no visible effect: {effect}"
    );
}

/// `export --format merged`: every weight peft's merge_and_unload changed, as it computed it, the
/// others as they were; and the merged folder gives peft's logits.
fn merges_as_peft_merges(name: &str) {
    let g = golden(name);
    let out = std::env::temp_dir().join(format!("peft-variants-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let dir = fixtures().join("peft_variants").join(name);
    let model_dir = fixtures().join("train/model");
    let s = export_merged(MergeSource::Adapter(&dir), &out, Some(&model_dir), u64::MAX).unwrap();
    assert_eq!((s.merged, s.replaced), (g.wrapped.len(), g.saved.len()));
    let merged: HashMap<String, Tensor> = Tensor::read_safetensors(out.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, t)| (legacy_to_canonical(&n), t))
        .collect();
    let original: HashMap<String, Tensor> =
        Tensor::read_safetensors(model_dir.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| (legacy_to_canonical(&n), t))
            .collect();
    let mut worst: f64 = 0.0;
    for (n, t) in &merged {
        match g.tensors.get(&format!("merged.{n}")) {
            Some(want) => worst = worst.max(rel_err(t, want)),
            None => assert!(t.equal(&original[n]), "{n} changed"),
        }
    }
    println!("{name}: merged weights vs peft's: rel {worst:.2e}");
    assert!(
        worst < 1e-6,
        "{name}: merged weights differ from peft's: rel {worst}"
    );
    let mut m = MllamaModel::load(&out, LoadOptions::default()).unwrap();
    let err = rel_err(
        &logits(&mut m, &batch(&g, Kind::Float)),
        &g.tensors["logits"],
    );
    assert!(
        err < 1e-5,
        "{name}: the merged model's logits differ from peft's: rel {err}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn dora_adapter_loads_as_peft_loads() {
    loads_as_peft_loads("dora");
}

#[test]
fn pattern_adapter_loads_as_peft_loads() {
    loads_as_peft_loads("patterns");
}

#[test]
fn dora_adapter_merges_as_peft_merges() {
    merges_as_peft_merges("dora");
}

#[test]
fn pattern_adapter_merges_as_peft_merges() {
    merges_as_peft_merges("patterns");
}

/// DoRA over a bf16 base with fp32 adapter tensors (peft's autocast_adapter_dtype, as `infer
/// --adapter` loads on a GPU): as close to peft's as our bf16 model is to transformers' without it.
#[test]
fn dora_over_a_bf16_base_is_as_close_as_the_bases_are() {
    let g = golden("dora");
    let b = batch(&g, Kind::BFloat16);
    let mut model = base(Kind::BFloat16);
    model.set_lora_kind(Kind::Float);
    let plain = rel_err(&logits(&mut model, &b), &g.tensors["bf16_plain_logits"]);
    model
        .load_adapter(&fixtures().join("peft_variants/dora"))
        .unwrap();
    let err = rel_err(&logits(&mut model, &b), &g.tensors["bf16_logits"]);
    let fp32 = rel_err(&g.tensors["bf16_logits"], &g.tensors["logits"]);
    println!(
        "bf16 DoRA: ours vs peft rel {err:.2e}; bases {plain:.2e}; peft bf16 vs fp32 {fp32:.2e}"
    );
    assert!(err < (3.0 * plain).max(1e-3), "rel {err} (bases: {plain})");
}

/// A copy of adapter `name` with its config edited by `edit` and its tensors renamed by `rename`
/// (None: left out).
fn edited(
    name: &str,
    tag: &str,
    edit: impl Fn(&mut serde_json::Value),
    rename: impl Fn(&str) -> Option<String>,
) -> PathBuf {
    let src = fixtures().join("peft_variants").join(name);
    let dir = std::env::temp_dir().join(format!("peft-variants-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let tensors: Vec<(String, Tensor)> =
        Tensor::read_safetensors(src.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .filter_map(|(n, t)| Some((rename(&n)?, t)))
            .collect();
    Tensor::write_safetensors(&tensors, dir.join("adapter_model.safetensors")).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let e = base(Kind::Float).load_adapter(dir).unwrap_err().to_string();
    let _ = std::fs::remove_dir_all(dir);
    e
}

/// A DoRA adapter without a magnitude, magnitudes without use_dora, ranks that the rank_pattern
/// does not give, a saved module's parameter missing or not asked for: each an error that names
/// the tensor and says why.
#[test]
fn adapters_that_do_not_fit_their_config_name_the_tensor() {
    let q0 = "base_model.model.model.language_model.layers.0.self_attn.q_proj";
    let e = load_error(&edited(
        "dora",
        "no-magnitude",
        |_| {},
        |n| (!n.starts_with(&format!("{q0}.lora_magnitude_vector"))).then(|| n.into()),
    ));
    assert!(
        e.contains(&format!(
            "missing    {q0}.lora_magnitude_vector: expected [64]"
        )),
        "{e}"
    );
    let e = load_error(&edited(
        "dora",
        "no-dora",
        |c| c["use_dora"] = false.into(),
        |n| Some(n.into()),
    ));
    assert!(
        e.contains(&format!(
            "unexpected {q0}.lora_magnitude_vector: a DoRA magnitude, but use_dora is false"
        )),
        "{e}"
    );
    let e = load_error(&edited(
        "patterns",
        "no-rank-pattern",
        |c| c["rank_pattern"] = serde_json::json!({}),
        |n| Some(n.into()),
    ));
    assert!(
        e.contains(&format!(
            "mis-shaped {q0}.lora_A.weight: expected [4, 64], found [7, 64]"
        )),
        "{e}"
    );
    // a saved module's parameter missing from the file
    let e = load_error(&edited(
        "patterns",
        "no-lm-head",
        |_| {},
        |n| (n != "base_model.model.lm_head.weight").then(|| n.into()),
    ));
    assert!(
        e.contains(
            "missing    base_model.model.lm_head.weight: expected [711, 64] (a parameter of a \
             module in modules_to_save"
        ),
        "{e}"
    );
    // ... or present without modules_to_save
    let e = load_error(&edited(
        "patterns",
        "no-modules-to-save",
        |c| c["modules_to_save"] = serde_json::Value::Null,
        |n| Some(n.into()),
    ));
    assert!(
        e.contains(
            "unexpected base_model.model.lm_head.weight: not a LoRA factor, nor a parameter"
        ),
        "{e}"
    );
    // ... and a merge into the base: every layer the config chooses must have its factors
    let dir = edited(
        "patterns",
        "merge-missing",
        |_| {},
        |n| (!n.starts_with(&format!("{q0}.lora_"))).then(|| n.into()),
    );
    let out = dir.join("merged");
    let model_dir = fixtures().join("train/model");
    let e = export_merged(MergeSource::Adapter(&dir), &out, Some(&model_dir), u64::MAX)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "the adapter config chooses the base's layer of {q0}.lora_A.weight, but the adapter lacks it"
        )),
        "{e}"
    );
    assert!(!out.join("model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&dir);
    // without exclude_modules peft would wrap layer 2's v_proj too, and finds no factors for it
    let e = load_error(&edited(
        "patterns",
        "no-exclude",
        |c| c["exclude_modules"] = serde_json::Value::Null,
        |n| Some(n.into()),
    ));
    assert!(
        e.contains(
            "missing    base_model.model.model.language_model.layers.2.self_attn.v_proj.lora_A.weight"
        ),
        "{e}"
    );
}

/// A folder holding an adapter only in a subfolder (peft saves an adapter not named `default`
/// under its name), or only as adapter_model.bin (older peft's pickle): the error says where the
/// adapter is, or how to convert it.
#[test]
fn adapter_folders_saved_otherwise_say_where_the_adapter_is() {
    let src = fixtures().join("peft_variants/patterns");
    let parent = std::env::temp_dir().join(format!("peft-variants-parent-{}", std::process::id()));
    let named = parent.join("sco");
    std::fs::create_dir_all(&named).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), named.join(f)).unwrap();
    }
    let e = base(Kind::Float)
        .load_adapter(&parent)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no adapter_config.json, but its subfolders hold adapters")
            && e.contains(&named.display().to_string()),
        "{e}"
    );
    base(Kind::Float).load_adapter(&named).unwrap();
    std::fs::rename(
        named.join("adapter_model.safetensors"),
        named.join("adapter_model.bin"),
    )
    .unwrap();
    let e = base(Kind::Float)
        .load_adapter(&named)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("the adapter's weights are in adapter_model.bin")
            && e.contains("save_file(torch.load("),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&parent);
}

/// The DoRA adapter with transformers-4 tensor names (as an adapter made for the seed's stack
/// names them): the same layers, logits and merged weights.
#[test]
fn a_transformers4_named_adapter_loads_and_merges_the_same() {
    let g = golden("dora");
    let dir = edited(
        "dora",
        "hf4",
        |_| {},
        |n| {
            let rest = n.strip_prefix("base_model.model.").unwrap();
            Some(format!("base_model.model.{}", canonical_to_legacy(rest)))
        },
    );
    let names: Vec<String> = Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names
        .iter()
        .all(|n| !n.starts_with("base_model.model.model.")));
    let mut model = base(Kind::Float);
    model.set_lora_kind(Kind::Float);
    model.load_adapter(&dir).unwrap();
    assert_eq!(wrapped_layers(&mut model), g.wrapped);
    let err = rel_err(
        &logits(&mut model, &batch(&g, Kind::Float)),
        &g.tensors["logits"],
    );
    assert!(err < 1e-5, "rel {err}");
    let out = dir.join("merged");
    let model_dir = fixtures().join("train/model");
    let s = export_merged(MergeSource::Adapter(&dir), &out, Some(&model_dir), u64::MAX).unwrap();
    assert_eq!((s.merged, s.replaced), (g.wrapped.len(), g.saved.len()));
    let _ = std::fs::remove_dir_all(&dir);
}
