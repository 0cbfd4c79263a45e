//! The adapter `trainer export --format peft` wrote (tests/fixtures/peft_export/adapter, after 2
//! training steps of tests/fixtures/train) gives, on our model, the logits Python peft computes
//! with it on the same base (golden_logits.safetensors, made by make_peft_golden.py there):
//! within 1e-5 relative (max-abs diff / max-abs), fp32 on CPU.
mod common;

use std::collections::HashMap;

use common::ckpt::{probe_pixels, rel_err};
use common::repo;
use tch::Tensor;
use trainer::model::{Batch, Images, LoadOptions, MllamaModel};

#[test]
fn exported_adapter_matches_python_peft() {
    let fx = repo().join("tests/fixtures");
    let g: HashMap<String, Tensor> =
        Tensor::read_safetensors(fx.join("peft_export/golden_logits.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let batch = Batch {
        input_ids: g["input_ids"].shallow_clone(),
        attention_mask: Some(g["attention_mask"].shallow_clone()),
        labels: None,
        images: Some(Images {
            pixel_values: probe_pixels(1, 1, 4), // (1, 1, 4, 3, 56, 56), as the script makes them
            aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
            aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
            cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
        }),
    };
    let mut model = MllamaModel::load(&fx.join("train/model"), LoadOptions::default()).unwrap();
    let plain = tch::no_grad(|| model.forward(&batch)).unwrap();
    let cfg = model.load_adapter(&fx.join("peft_export/adapter")).unwrap();
    assert_eq!((cfg.lora.r, cfg.lora.alpha), (4, 8.0));
    let logits = tch::no_grad(|| model.forward(&batch)).unwrap(); // (1, S, 711)
    let err = rel_err(&logits, &g["logits"]);
    let effect = rel_err(&plain, &g["logits"]);
    println!("ours + exported adapter vs peft: rel {err:.2e} (without the adapter: {effect:.2e})");
    assert!(err < 1e-5, "logits differ from peft's: rel {err}");
    assert!(effect > 1e-3, "the adapter has no visible effect: {effect}");
}
