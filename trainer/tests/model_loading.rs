//! Mllama loading, config resolution, weight-error reporting, LoRA (PEFT semantics), adapter round trip and merge,
//! on the tiny fixtures in tests/fixtures/mllama_tiny.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use trainer::model::config::RopeScaling;
use trainer::model::{
    AttentionImpl, Batch, Images, LoadOptions, LoraConfig, MllamaConfig, MllamaModel, ModelError,
    TargetModules,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("model_loading_{}_{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(layout: &str) -> MllamaModel {
    MllamaModel::load(
        &fixtures().join(format!("model_{layout}")),
        LoadOptions::default(),
    )
    .unwrap()
}

fn golden_batch(name: &str) -> Batch {
    let g: HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join(format!("golden_{name}.safetensors")))
            .unwrap()
            .into_iter()
            .collect();
    Batch {
        input_ids: g["input_ids"].shallow_clone(),
        attention_mask: Some(g["attention_mask"].shallow_clone()),
        labels: Some(g["labels"].shallow_clone()),
        images: g.get("pixel_values").map(|pv| Images {
            pixel_values: pv.shallow_clone(),
            aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
            aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
            cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
        }),
    }
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

#[test]
fn both_config_forms_resolve_to_the_same_config() {
    let a = MllamaConfig::from_file(&fixtures().join("model_legacy/config.json")).unwrap();
    let b = MllamaConfig::from_file(&fixtures().join("model_hf5/config.json")).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.dtype.as_deref(), Some("float32"));
    assert_eq!(a.text.rope_theta, 500000.0);
    assert_eq!(
        a.text.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0
        }
    );
    assert_eq!(
        (a.image_token_index, a.text.vocab_size, a.text.pad_token_id),
        (300, 300, Some(0))
    );
    assert_eq!(a.text.cross_attention_layers, vec![1, 3]);
    assert_eq!(
        (a.vision.num_patches(), a.vision.max_aspect_ratio_id()),
        (5, 8)
    );
    // transformers' defaults when a key is absent (Llama 3.2 11B sizes)
    let d = MllamaConfig::from_json_str("{}").unwrap();
    assert_eq!(
        (
            d.text.hidden_size,
            d.vision.vision_output_dim,
            d.image_token_index
        ),
        (4096, 7680, 128256)
    );
    let err = MllamaConfig::from_json_str(
        r#"{"text_config": {"rope_parameters": {"rope_type": "yarn"}}}"#,
    );
    assert!(matches!(err, Err(ModelError::Config(m)) if m.contains("yarn")));
}

#[test]
fn zero_or_negative_sizes_in_config_json_are_errors_not_panics() {
    let text = std::fs::read_to_string(fixtures().join("model_legacy/config.json")).unwrap();
    let base: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (section, key, value, want) in [
        (
            "vision_config",
            "attention_heads",
            0,
            "vision_config.attention_heads must be >= 1 (got 0)",
        ),
        (
            "text_config",
            "num_key_value_heads",
            0,
            "text_config.num_key_value_heads must be >= 1",
        ),
        (
            "vision_config",
            "patch_size",
            0,
            "vision_config.patch_size must be >= 1",
        ),
        (
            "text_config",
            "hidden_size",
            -1,
            "text_config.hidden_size must be >= 1 (got -1)",
        ),
        (
            "vision_config",
            "patch_size",
            100_000,
            "is larger than image_size",
        ),
        // sizes whose products would overflow, a head dim RoPE cannot rotate, ids outside the
        // embedding, no intermediate layer to concatenate
        (
            "text_config",
            "vocab_size",
            i64::MAX,
            "text_config.vocab_size must be at most 2^24",
        ),
        (
            "text_config",
            "num_attention_heads",
            i64::MAX,
            "num_attention_heads must be at most 2^24",
        ),
        (
            "text_config",
            "num_attention_heads",
            64,
            "head dim hidden_size / num_attention_heads = 1 must be even",
        ),
    ] {
        let mut v = base.clone();
        v[section][key] = value.into();
        let result = std::panic::catch_unwind(|| MllamaConfig::from_json_str(&v.to_string()));
        let err = result
            .unwrap_or_else(|_| panic!("{section}.{key} = {value} panicked"))
            .expect_err(&format!("{section}.{key} = {value} accepted"));
        assert!(err.to_string().contains(want), "{section}.{key}: {err}");
    }
    // special ids outside the embedding: loaded (training reads none), refused for generation
    for (id, want) in [
        (-1, "text_config.pad_token_id -1 is not a token"),
        (100_000, "pad_token_id 100000 is not a token"),
    ] {
        let mut v = base.clone();
        v["text_config"]["pad_token_id"] = id.into();
        let cfg = MllamaConfig::from_json_str(&v.to_string()).expect("loads");
        let err = cfg.check_special_ids().expect_err("refused for generation");
        assert!(err.to_string().contains(want), "{err}");
    }
    MllamaConfig::from_json_str(&text)
        .unwrap()
        .check_special_ids()
        .unwrap();
    let mut v = base.clone();
    v["vision_config"]["intermediate_layers_indices"] = serde_json::json!([]);
    let err = MllamaConfig::from_json_str(&v.to_string()).expect_err("no intermediate layer");
    assert!(
        err.to_string()
            .contains("vision_config.intermediate_layers_indices is empty"),
        "{err}"
    );
}

#[test]
fn both_key_layouts_load_identical_parameters() {
    let (a, b) = (load("legacy"), load("hf5"));
    let (pa, pb) = (a.parameter_shapes(), b.parameter_shapes());
    assert_eq!(pa, pb);
    assert_eq!(pa.len(), 138);
    assert!(pa
        .iter()
        .any(|(n, _)| n == "model.language_model.layers.1.cross_attn.q_norm.weight"));
    let mut wa = vec![];
    a.visit_params(&mut |_, t| wa.push(t.shallow_clone()));
    let mut i = 0;
    b.visit_params(&mut |n, t| {
        assert!(t.equal(&wa[i]), "{n}");
        i += 1;
    });
    let params: i64 = pa.iter().map(|(_, s)| s.iter().product::<i64>()).sum();
    println!("tiny fixture: {params} parameters");
}

/// A config that says `tie_word_embeddings: true` over weights that hold `lm_head.weight` (what
/// transformers 5.24 saves: it never ties Mllama): the file's LM head is used, as 5.24 does, not
/// refused as unexpected or replaced by the embedding.
#[test]
fn a_tied_flag_over_a_saved_lm_head_uses_the_saved_head() {
    let src = fixtures().join("model_hf5");
    let dir = tmpdir("tied_flag");
    for f in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(f.path(), dir.join(f.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["text_config"]["tie_word_embeddings"] = true.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let flagged = MllamaModel::load(&dir, LoadOptions::default()).unwrap();
    let plain = load("hf5");
    assert!(flagged.config.text.tie_word_embeddings && !flagged.lm_head_tied);
    assert!(flagged.lm_head.weight.equal(&plain.lm_head.weight));
    assert_eq!(flagged.parameter_shapes(), plain.parameter_shapes());
    let batch = golden_batch("text");
    let (a, b) = (
        flagged.forward(&batch).unwrap(),
        plain.forward(&batch).unwrap(),
    );
    assert!(a.equal(&b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn weight_problems_are_listed_in_one_error() {
    let src: Vec<(String, Tensor)> =
        Tensor::read_safetensors(fixtures().join("model_legacy/model.safetensors")).unwrap();
    let mut kept: Vec<(String, Tensor)> = src
        .into_iter()
        .filter(|(n, _)| n != "language_model.model.norm.weight")
        .map(|(n, t)| {
            if n == "vision_model.class_embedding" {
                (n, Tensor::zeros([33], (Kind::Float, tch::Device::Cpu)))
            } else {
                (n, t)
            }
        })
        .collect();
    kept.push((
        "language_model.model.extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, tch::Device::Cpu)),
    ));
    let d = tmpdir("bad_weights");
    std::fs::copy(
        fixtures().join("model_legacy/config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let refs: Vec<(&str, &Tensor)> = kept.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, d.join("model.safetensors")).unwrap();
    let err = MllamaModel::load(&d, LoadOptions::default())
        .unwrap_err()
        .to_string();
    println!("{err}");
    assert!(err.contains("3 problems"), "{err}");
    assert!(
        err.contains("missing    language_model.model.norm.weight: expected [64]"),
        "{err}"
    );
    assert!(
        err.contains("mis-shaped vision_model.class_embedding: expected [32], found [33]"),
        "{err}"
    );
    assert!(
        err.contains("unexpected language_model.model.extra.weight: found [2]"),
        "{err}"
    );
}

/// Pixel values whose tiles are not the vision config's image_size are an input error saying
/// so, not a panic deep in a reshape.
#[test]
fn pixel_tiles_of_another_size_are_an_input_error() {
    let m = load("hf5");
    let mut b = golden_batch("image2");
    let images = b.images.as_mut().unwrap();
    let s = images.pixel_values.size();
    images.pixel_values = images.pixel_values.narrow(5, 0, s[5] - 1);
    let err = m.forward(&b).unwrap_err();
    assert!(matches!(err, ModelError::Input(_)), "{err}");
    assert!(err.to_string().contains("image_size"), "{err}");
}

#[test]
fn loads_in_bf16_converting_on_load() {
    let opts = LoadOptions {
        dtype: Kind::BFloat16,
        ..Default::default()
    };
    let m = MllamaModel::load(&fixtures().join("model_legacy"), opts).unwrap();
    assert_eq!(m.text.embed_tokens.kind(), Kind::BFloat16);
    let b = golden_batch("image2");
    let logits = tch::no_grad(|| m.forward(&b)).unwrap();
    let want = tch::no_grad(|| load("legacy").forward(&b)).unwrap();
    assert!(max_rel(&logits.to_kind(Kind::Float), &want) < 0.1);
}

#[test]
fn fused_attention_on_cpu_is_a_clear_error() {
    let opts = LoadOptions {
        attention: AttentionImpl::Fused,
        ..Default::default()
    };
    let err = MllamaModel::load(&fixtures().join("model_legacy"), opts)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "model.attention=fused needs a CUDA GPU; use sdpa");
}

fn lora_cfg(targets: TargetModules) -> LoraConfig {
    LoraConfig {
        r: 8,
        alpha: 32.0,
        dropout: 0.05,
        target_modules: targets,
        use_rslora: false,
    }
}

#[test]
fn lora_targets_match_as_peft_does() {
    let mut m = load("hf5");
    // suffix match: q_proj/v_proj in vision attention (6 layers), text self-attention and cross-attention (4)
    assert_eq!(
        m.apply_lora(
            &lora_cfg(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])),
            0
        )
        .unwrap(),
        20
    );
    let mut m = load("hf5");
    let re = TargetModules::Regex(r".*language_model.*\.(q_proj|v_proj)".into());
    assert_eq!(m.apply_lora(&lora_cfg(re), 0).unwrap(), 8);
    let mut m = load("hf5");
    // a name must match a whole path component: "proj" matches nothing
    assert!(m
        .apply_lora(&lora_cfg(TargetModules::Names(vec!["proj".into()])), 0)
        .is_err());
}

#[test]
fn fresh_lora_is_peft_initialised_and_seeded() {
    let targets = TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]);
    let mut m = load("hf5");
    let base = tch::no_grad(|| m.forward(&golden_batch("batch2"))).unwrap();
    m.apply_lora(&lora_cfg(targets.clone()), 7).unwrap();
    let p = m.trainable_parameters();
    assert_eq!(
        p[0].0,
        "base_model.model.model.vision_model.transformer.layers.0.self_attn.q_proj.lora_A.weight"
    );
    for (n, t) in &p {
        assert!(t.requires_grad(), "{n}");
        if n.ends_with("lora_B.weight") {
            assert_eq!(t.abs().max().double_value(&[]), 0.0, "{n}");
        } else {
            // kaiming-uniform(a = sqrt(5)) on (r, in): U(-1/sqrt(in), 1/sqrt(in))
            let bound = 1.0 / (t.size()[1] as f64).sqrt();
            let mx = t.abs().max().double_value(&[]);
            assert!(mx <= bound && mx > 0.8 * bound, "{n}: {mx} vs {bound}");
        }
    }
    // B = 0: the model computes exactly the base function
    let after = tch::no_grad(|| m.forward(&golden_batch("batch2"))).unwrap();
    assert_eq!(max_rel(&after, &base), 0.0);
    let mut m2 = load("hf5");
    m2.apply_lora(&lora_cfg(targets), 7).unwrap();
    for ((_, a), (_, b)) in p.iter().zip(m2.trainable_parameters()) {
        assert!(a.equal(&b));
    }
}

#[test]
fn lora_gradients_flow_only_to_the_factors() {
    let mut m = load("hf5");
    // no dropout: its draws from libtorch's global generator would race with the seeded init of
    // fresh_lora_is_peft_initialised_and_seeded in the next thread
    let cfg = LoraConfig {
        dropout: 0.0,
        ..lora_cfg(TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]))
    };
    m.apply_lora(&cfg, 0).unwrap();
    m.set_training(true);
    let (sum, count) = m.loss(&golden_batch("batch2")).unwrap();
    assert!(count > 0);
    let params = m.trainable_parameters();
    let tensors: Vec<&Tensor> = params.iter().map(|(_, t)| t).collect();
    let grads = Tensor::run_backward(&[sum / count as f64], &tensors, false, false);
    // B starts at zero, so A's gradient is zero and B's is not
    let gb: f64 = grads
        .iter()
        .skip(1)
        .step_by(2)
        .map(|g| g.abs().sum(Kind::Float).double_value(&[]))
        .sum();
    assert!(gb > 0.0);
}

/// A model that trains modules in full beside its LoRA is not written by `save_adapter` (their
/// tensors would go unnamed and unlisted, and the adapter would not load back): the checkpoint's
/// PEFT export writes them.
#[test]
fn save_adapter_refuses_modules_trained_in_full() {
    let mut m = load("hf5");
    m.apply_lora(&lora_cfg(TargetModules::Names(vec!["q_proj".into()])), 0)
        .unwrap();
    m.saved_params = vec!["lm_head.weight".into()];
    m.saved_modules = vec!["lm_head".into()];
    let d = tmpdir("save_saved_modules");
    let err = m.save_adapter(&d, None).unwrap_err().to_string();
    assert!(
        err.contains("modules_to_save [\"lm_head\"]") && err.contains("export --format peft"),
        "{err}"
    );
    assert!(!d.join("adapter_model.safetensors").exists());
}

fn adapter_roundtrip(dir: &Path) {
    let b = golden_batch("batch2");
    let mut m = load("legacy");
    m.load_adapter(&fixtures().join("adapter_hf5")).unwrap();
    let want = tch::no_grad(|| m.forward(&b)).unwrap();
    m.save_adapter(dir, Some("tiny")).unwrap();
    let written: Vec<(String, Tensor)> =
        Tensor::read_safetensors(dir.join("adapter_model.safetensors")).unwrap();
    assert!(written.iter().any(|(n, _)| n
        == "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"));
    let mut m2 = load("hf5");
    m2.load_adapter(dir).unwrap();
    let got = tch::no_grad(|| m2.forward(&b)).unwrap();
    assert_eq!(max_rel(&got, &want), 0.0);
    // merged weights compute the same function
    m2.merge_lora();
    assert!(m2.trainable_parameters().is_empty());
    let merged = tch::no_grad(|| m2.forward(&b)).unwrap();
    let e = max_rel(&merged, &want);
    println!("merged vs unmerged logits: rel {e:.2e}");
    assert!(e < 1e-5, "{e}");
}

#[test]
fn adapter_save_load_and_merge() {
    adapter_roundtrip(&tmpdir("adapter"));
}

#[test]
fn adapter_mismatch_is_listed() {
    let d = tmpdir("bad_adapter");
    std::fs::copy(
        fixtures().join("adapter_hf5/adapter_config.json"),
        d.join("adapter_config.json"),
    )
    .unwrap();
    let mut t: Vec<(String, Tensor)> =
        Tensor::read_safetensors(fixtures().join("adapter_hf5/adapter_model.safetensors")).unwrap();
    t.retain(|(n, _)| {
        n != "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight"
    });
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, d.join("adapter_model.safetensors")).unwrap();
    let err = load("hf5").load_adapter(&d).unwrap_err().to_string();
    assert!(err.contains("missing    base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight: expected [64, 4]"), "{err}");
}

#[test]
fn weight_source_reads_flat_ranges_for_sharding() {
    let src = trainer::model::WeightSource::open_dir(&fixtures().join("model_hf5")).unwrap();
    assert_eq!(src.names_and_shapes().count(), 138);
    let name = "model.language_model.layers.0.mlp.gate_proj.weight";
    let full = src.get(name, Kind::Float).unwrap(); // (128, 64)
    let part = src.get_flat_range(name, 1000, 500, Kind::BFloat16).unwrap();
    assert!(part.equal(
        &full
            .reshape([-1])
            .narrow(0, 1000, 500)
            .to_kind(Kind::BFloat16)
    ));
    assert!(src.get_flat_range(name, 8000, 500, Kind::Float).is_err());
}

/// An adapter in transformers-4 naming (what peft writes on the seed's stack, and
/// `trainer export --naming hf4`) with LoRA on the projector and the LM head loads and computes
/// what it computed when saved: their module paths (`multi_modal_projector`,
/// `language_model.lm_head`, no trailing name) map to this model's.
#[test]
fn hf4_adapter_on_the_projector_and_lm_head_loads() {
    let b = golden_batch("batch2");
    let mut m = load("hf5");
    let targets = ["q_proj", "multi_modal_projector", "lm_head"];
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(targets.iter().map(|t| t.to_string()).collect()),
        use_rslora: false,
    };
    m.apply_lora(&cfg, 3).unwrap();
    let params = m.trainable_parameters();
    assert!(params
        .iter()
        .any(|(n, _)| n.contains("multi_modal_projector")));
    assert!(params.iter().any(|(n, _)| n.contains("lm_head")));
    tch::no_grad(|| {
        for (_, t) in &params {
            t.shallow_clone().copy_(&(t.randn_like() * 0.05));
        }
    });
    let want = tch::no_grad(|| m.forward(&b)).unwrap();
    let hf5 = tmpdir("adapter_hf5_projector");
    m.save_adapter(&hf5, Some("tiny")).unwrap();
    let hf4 = tmpdir("adapter_hf4_projector");
    std::fs::copy(
        hf5.join("adapter_config.json"),
        hf4.join("adapter_config.json"),
    )
    .unwrap();
    let renamed: Vec<(String, Tensor)> =
        Tensor::read_safetensors(hf5.join("adapter_model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, t)| {
                let module = n.strip_prefix("base_model.model.").unwrap();
                let legacy = trainer::model::weights::canonical_to_legacy(module);
                (format!("base_model.model.{legacy}"), t)
            })
            .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "base_model.model.multi_modal_projector.lora_A.weight"));
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "base_model.model.language_model.lm_head.lora_B.weight"));
    let refs: Vec<(&str, &Tensor)> = renamed.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, hf4.join("adapter_model.safetensors")).unwrap();
    let mut m2 = load("hf5");
    m2.load_adapter(&hf4).unwrap();
    let got = tch::no_grad(|| m2.forward(&b)).unwrap();
    assert_eq!(max_rel(&got, &want), 0.0);
}

/// adapter_config.json settings that change what LoRA computes in ways not supported are refused
/// by name (loaded as plain LoRA they would be wrong, or fail with a list of missing keys that
/// does not say why), and so is a layers_pattern without layer indices (as peft refuses it);
/// their defaults (null, false, empty) load. (DoRA, the patterns, the layer choices and
/// modules_to_save load: tests/peft_variants_golden.rs.)
#[test]
fn adapter_settings_plain_lora_cannot_honour_are_refused_by_name() {
    let cases = [
        ("layers_pattern", serde_json::json!("layers")),
        ("lora_bias", serde_json::json!(true)),
        ("trainable_token_indices", serde_json::json!([1, 2])),
        ("layer_replication", serde_json::json!([[0, 1]])),
        (
            "target_parameters",
            serde_json::json!(["mlp.experts.gate_up_proj"]),
        ),
        ("alora_invocation_tokens", serde_json::json!([1, 2])),
        ("arrow_config", serde_json::json!({"top_k": 3})),
        ("use_bdlora", serde_json::json!(true)),
        ("use_qalora", serde_json::json!(true)),
    ];
    for (key, value) in cases {
        let d = fixture_adapter_copy(&format!("adapter_setting_{key}"));
        fixture_adapter_config_with(&d, key, value);
        let err = load("hf5").load_adapter(&d).unwrap_err().to_string();
        assert!(err.contains(&format!("`{key}`")), "{key}: {err}");
        // the default of the same key loads
        fixture_adapter_config_with(&d, key, serde_json::Value::Null);
        load("hf5").load_adapter(&d).unwrap();
    }
}

/// A fresh folder `name` holding the fixture adapter's weights (its config written apart).
fn fixture_adapter_copy(name: &str) -> PathBuf {
    let d = tmpdir(name);
    let weights = "adapter_model.safetensors";
    std::fs::copy(
        fixtures().join("adapter_hf5").join(weights),
        d.join(weights),
    )
    .unwrap();
    d
}

/// Writes the fixture adapter's adapter_config.json into `dir` with `key` set to `value`.
fn fixture_adapter_config_with(dir: &Path, key: &str, value: serde_json::Value) {
    let src = fixtures().join("adapter_hf5/adapter_config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(dir.join("adapter_config.json"), c.to_string()).unwrap();
}

/// Settings PEFT loads as plain LoRA on these layers load alike: `fan_in_fan_out` (PEFT sets it
/// back to false for Linear layers), `bias: lora_only` / `all` without bias tensors in the file
/// (the targeted projections have no bias); a bias tensor in the file is refused. The same
/// logits as the plain adapter.
#[test]
fn adapter_settings_peft_reads_as_plain_lora_load_alike() {
    let src = fixtures().join("adapter_hf5");
    let batch = golden_batch("text");
    let logits = |dir: &Path| {
        let mut m = load("hf5");
        m.load_adapter(dir).map(|_| m.forward(&batch).unwrap())
    };
    let plain = logits(&src).unwrap();
    for (key, value) in [
        ("fan_in_fan_out", serde_json::json!(true)),
        ("bias", serde_json::json!("lora_only")),
        ("bias", serde_json::json!("all")),
    ] {
        let d = fixture_adapter_copy(&format!("adapter_alike_{key}"));
        fixture_adapter_config_with(&d, key, value.clone());
        match logits(&d) {
            Ok(l) => assert!(l.equal(&plain), "{key} = {value}"),
            Err(e) => panic!("{key} = {value}: {e}"),
        }
    }
    // a bias PEFT trained is in the file: refused, naming it
    let d = tmpdir("adapter_alike_bias_tensor");
    let mut tensors = Tensor::read_safetensors(src.join("adapter_model.safetensors")).unwrap();
    let bias = "base_model.model.model.multi_modal_projector.bias";
    tensors.push((
        bias.into(),
        Tensor::zeros([4], (Kind::Float, tch::Device::Cpu)),
    ));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, d.join("adapter_model.safetensors")).unwrap();
    fixture_adapter_config_with(&d, "bias", serde_json::json!("all"));
    let err = logits(&d).unwrap_err().to_string();
    assert!(err.contains(bias), "{err}");
}

/// A tensor stored in two shards of a model folder is an error naming both files (which copy
/// loaded used to depend on the file order).
#[test]
fn a_tensor_in_two_shards_is_an_error_naming_both() {
    let d = tmpdir("dup_shards");
    let all: Vec<(String, Tensor)> = ["00001", "00002"]
        .iter()
        .flat_map(|k| {
            let f = fixtures().join(format!("model_hf5/model-{k}-of-00002.safetensors"));
            Tensor::read_safetensors(f).unwrap()
        })
        .collect();
    let dup = "model.language_model.norm.weight";
    let one: Vec<(&str, &Tensor)> = all.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let two: Vec<(&str, &Tensor)> = one.iter().filter(|(n, _)| *n == dup).copied().collect();
    Tensor::write_safetensors(&one, d.join("model-00001-of-00002.safetensors")).unwrap();
    Tensor::write_safetensors(&two, d.join("model-00002-of-00002.safetensors")).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = all
        .iter()
        .map(|(n, _)| {
            let file = match n.as_str() == dup {
                true => "model-00002-of-00002.safetensors",
                false => "model-00001-of-00002.safetensors",
            };
            (n.clone(), serde_json::json!(file))
        })
        .collect();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let Err(e) = trainer::model::WeightSource::open_dir(&d) else {
        panic!("opened");
    };
    let err = e.to_string();
    assert!(
        err.contains(dup)
            && err.contains("model-00001-of-00002")
            && err.contains("model-00002-of-00002"),
        "{err}"
    );
}

/// A llama3 RoPE table missing a field names it under the key the file uses (`rope_scaling` in
/// the released layout, `rope_parameters` in transformers 5's).
#[test]
fn a_missing_rope_field_is_named_under_the_files_own_key() {
    for (layout, section) in [("legacy", "rope_scaling"), ("hf5", "rope_parameters")] {
        let path = fixtures().join(format!("model_{layout}/config.json"));
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let table = v["text_config"][section].as_object_mut().unwrap();
        table.remove("original_max_position_embeddings").unwrap();
        let d = tmpdir(&format!("rope_{layout}"));
        std::fs::write(d.join("config.json"), v.to_string()).unwrap();
        let err = MllamaConfig::from_file(&d.join("config.json"))
            .unwrap_err()
            .to_string();
        let want = format!("text_config.{section}.original_max_position_embeddings");
        assert!(err.contains(&want), "{layout}: {err}");
    }
}
