//! Numerical parity of the tch Mllama with transformers 5.24 (+ peft 0.21) on the tiny fixtures in
//! tests/fixtures/mllama_tiny (made by tests/fixtures/make_mllama_fixtures.py), fp32 on CPU:
//! logits within 1e-4 relative (max-abs diff / max-abs), loss within 1e-5 relative, generated ids equal.
use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};
use trainer::model::{AttentionImpl, Batch, GenerateOptions, Images, LoadOptions, MllamaModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    let p = fixtures().join(format!("golden_{name}.safetensors"));
    Tensor::read_safetensors(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .collect()
}

fn load(layout: &str, attention: AttentionImpl) -> MllamaModel {
    let opts = LoadOptions {
        attention,
        ..Default::default()
    };
    MllamaModel::load(&fixtures().join(format!("model_{layout}")), opts).unwrap()
}

fn batch(g: &HashMap<String, Tensor>) -> Batch {
    let images = g.get("pixel_values").map(|pv| Images {
        pixel_values: pv.shallow_clone(),
        aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
        aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
        cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
    });
    Batch {
        input_ids: g["input_ids"].shallow_clone(),
        attention_mask: g.get("attention_mask").map(Tensor::shallow_clone),
        labels: g.get("labels").map(Tensor::shallow_clone),
        images,
    }
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let d = (a - b).abs().max().double_value(&[]);
    d / b.abs().max().double_value(&[])
}

/// Checks logits and loss of one golden case; returns (logits rel err, loss rel err).
fn check(model: &MllamaModel, case: &str) -> (f64, f64) {
    let g = golden(case);
    let b = batch(&g);
    let logits = tch::no_grad(|| model.forward(&b)).unwrap();
    let e_logits = rel(&logits, &g["logits"]);
    let (sum, count) = tch::no_grad(|| model.loss(&b)).unwrap();
    let loss = sum.double_value(&[]) / count as f64;
    let want = g["loss"].double_value(&[0]);
    let e_loss = (loss - want).abs() / want.abs();
    println!(
        "{case:>14} {:?}: logits rel {e_logits:.2e}, loss {loss:.6} vs {want:.6} rel {e_loss:.2e}",
        model.options.attention
    );
    assert!(e_logits < 1e-4, "{case}: logits rel err {e_logits}");
    assert!(e_loss < 1e-5, "{case}: loss rel err {e_loss}");
    (e_logits, e_loss)
}

const CASES: [&str; 5] = ["text", "image1", "image2", "image4", "batch2"];

#[test]
fn parity_eager_legacy_layout() {
    let m = load("legacy", AttentionImpl::Eager);
    for c in CASES {
        check(&m, c);
    }
}

#[test]
fn parity_sdpa_hf5_layout() {
    let m = load("hf5", AttentionImpl::Sdpa);
    for c in CASES {
        check(&m, c);
    }
}

#[test]
fn parity_eager_hf5_and_sdpa_legacy() {
    check(&load("hf5", AttentionImpl::Eager), "batch2");
    check(&load("legacy", AttentionImpl::Sdpa), "batch2");
}

#[test]
fn parity_with_peft_adapter_both_namings() {
    for (layout, adapter, attn) in [
        ("legacy", "adapter_hf5", AttentionImpl::Eager),
        ("hf5", "adapter_hf4", AttentionImpl::Sdpa),
    ] {
        let mut m = load(layout, attn);
        let cfg = m.load_adapter(&fixtures().join(adapter)).unwrap();
        assert_eq!((cfg.r, cfg.alpha), (4, 8.0));
        // q_proj and v_proj of 4 text layers (self and cross attention) and 6 vision layers
        assert_eq!(m.trainable_parameters().len(), 40);
        check(&m, "text_lora");
        check(&m, "batch2_lora");
    }
}

fn gen(m: &MllamaModel, case: &str, use_cache: bool) -> (Tensor, Tensor) {
    let g = golden(case);
    let mut b = batch(&g);
    b.labels = None;
    let opts = GenerateOptions {
        max_new_tokens: 20,
        min_new_tokens: 20,
        eos_token_ids: m.config.text.eos_token_ids.clone(),
        pad_token_id: m.config.text.pad_token_id.unwrap_or(0),
        use_cache,
    };
    let out = tch::no_grad(|| m.generate(&b, &opts)).unwrap();
    (out, g["generated"].to_kind(Kind::Int64))
}

#[test]
fn greedy_generation_with_kv_cache_matches_transformers() {
    for attn in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let m = load("hf5", attn);
        for case in ["generate_image", "generate_text"] {
            let (cached, want) = gen(&m, case, true);
            assert_eq!(
                Vec::<i64>::try_from(cached.view(-1)).unwrap(),
                Vec::<i64>::try_from(want.view(-1)).unwrap(),
                "{case} {attn:?} with cache"
            );
        }
    }
    let m = load("legacy", AttentionImpl::Eager);
    let (nocache, want) = gen(&m, "generate_image", false);
    assert_eq!(
        Vec::<i64>::try_from(nocache.view(-1)).unwrap(),
        Vec::<i64>::try_from(want.view(-1)).unwrap(),
        "no cache"
    );
}
