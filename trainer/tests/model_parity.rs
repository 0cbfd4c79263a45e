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
        assert_eq!((cfg.lora.r, cfg.lora.alpha), (4, 8.0));
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

/// A text-only sample batched with an image sample (`data.text_only: keep`) gets the logits it gets
/// alone, where the cross-attention layers are skipped (transformers refuses such batches): it does
/// not attend to its blank image slot. The image sample is unchanged too.
#[test]
fn a_text_only_sample_in_an_image_batch_computes_as_alone() {
    let m = load("hf5", AttentionImpl::Sdpa);
    let (img, txt) = (golden("image1"), golden("text"));
    let (bi, bt) = (batch(&img), batch(&txt));
    let alone = |b: &Batch| tch::no_grad(|| m.forward(b)).unwrap(); // (1, S, V)
    let (li, lt) = (alone(&bi), alone(&bt));
    let (si, st) = (bi.input_ids.size()[1], bt.input_ids.size()[1]);
    let l = si.max(st);
    // right-pad both rows to l (pad id 0, attention mask 0)
    let pad = |t: &Tensor, n: i64| {
        let extra = Tensor::zeros([1, l - n], (t.kind(), t.device()));
        Tensor::cat(&[t, &extra], 1)
    };
    let ones = |n: i64| Tensor::ones([1, n], (Kind::Int64, tch::Device::Cpu));
    let images = bi.images.as_ref().unwrap();
    let cam = &images.cross_attention_mask; // (1, S, M, T)
    let cam_pad = Tensor::zeros(
        [1, l - si, cam.size()[2], cam.size()[3]],
        (cam.kind(), cam.device()),
    );
    let mixed = Batch {
        input_ids: Tensor::cat(&[pad(&bi.input_ids, si), pad(&bt.input_ids, st)], 0),
        attention_mask: Some(Tensor::cat(&[pad(&ones(si), si), pad(&ones(st), st)], 0)),
        labels: None,
        images: Some(Images {
            pixel_values: Tensor::cat(
                &[&images.pixel_values, &images.pixel_values.zeros_like()],
                0,
            ),
            aspect_ratio_ids: Tensor::cat(
                &[
                    &images.aspect_ratio_ids,
                    &images.aspect_ratio_ids.zeros_like(),
                ],
                0,
            ),
            aspect_ratio_mask: Tensor::cat(
                &[
                    &images.aspect_ratio_mask,
                    &images.aspect_ratio_mask.zeros_like(),
                ],
                0,
            ),
            cross_attention_mask: Tensor::cat(
                &[
                    Tensor::cat(&[cam, &cam_pad], 1),
                    Tensor::cat(&[cam, &cam_pad], 1).zeros_like(),
                ],
                0,
            ),
        }),
    };
    let lm = alone(&mixed); // (2, L, V)
    let e_text = rel(&lm.get(1).narrow(0, 0, st), &lt.get(0));
    let e_image = rel(&lm.get(0).narrow(0, 0, si), &li.get(0));
    println!("mixed batch: text row rel {e_text:.2e}, image row rel {e_image:.2e}");
    assert!(e_text < 1e-5, "text-only row: rel {e_text}");
    assert!(e_image < 1e-5, "image row: rel {e_image}");
}
