//! Model measurements (ignored by default; run with
//! `cargo test -p trainer --test model_bench -- --ignored --nocapture --test-threads 1`):
//! parameter count, load time and forward time of the tiny fixture (2 threads); load time and peak RSS of a
//! synthetic ~1.2B-parameter bf16 checkpoint written to a temporary folder (loaded in a child process).
use std::path::PathBuf;
use std::time::Instant;

use tch::{Kind, Tensor};
use trainer::model::{
    AttentionImpl, Batch, Images, KeyLayout, LoadOptions, MllamaConfig, MllamaModel,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn vm_hwm_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map_or(0.0, |k| k / 1024.0)
}

#[test]
#[ignore]
fn bench_tiny_fixture() {
    tch::set_num_threads(2);
    for layout in ["legacy", "hf5"] {
        let t = Instant::now();
        let n = 5;
        for _ in 0..n {
            MllamaModel::load(
                &fixtures().join(format!("model_{layout}")),
                LoadOptions::default(),
            )
            .unwrap();
        }
        println!(
            "tiny load ({layout}): {:.2} ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
    }
    let g: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join("golden_batch2.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let b = Batch {
        input_ids: g["input_ids"].shallow_clone(),
        attention_mask: Some(g["attention_mask"].shallow_clone()),
        labels: None,
        images: Some(Images {
            pixel_values: g["pixel_values"].shallow_clone(),
            aspect_ratio_ids: g["aspect_ratio_ids"].shallow_clone(),
            aspect_ratio_mask: g["aspect_ratio_mask"].shallow_clone(),
            cross_attention_mask: g["cross_attention_mask"].shallow_clone(),
        }),
    };
    for attention in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        let m = MllamaModel::load(
            &fixtures().join("model_hf5"),
            LoadOptions {
                attention,
                ..Default::default()
            },
        )
        .unwrap();
        let params: i64 = m
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        for _ in 0..3 {
            let _ = tch::no_grad(|| m.forward(&b)).unwrap();
        }
        let mut best = f64::MAX;
        for _ in 0..30 {
            let t = Instant::now();
            let _ = tch::no_grad(|| m.forward(&b)).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "tiny ({params} params) forward batch2 {attention:?}: {:.2} ms (best of 30, 2 threads)",
            best * 1e3
        );
    }
}

const CONFIG_1B: &str = r#"{
  "image_token_index": 128256, "dtype": "bfloat16",
  "vision_config": {"hidden_size": 768, "attention_heads": 12, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_global_layers": 4, "intermediate_layers_indices": [3, 7, 11],
    "vision_output_dim": 3072, "image_size": 448, "patch_size": 14, "max_num_tiles": 4},
  "text_config": {"vocab_size": 128256, "hidden_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 16,
    "num_key_value_heads": 4, "intermediate_size": 5632, "cross_attention_layers": [2, 6, 10],
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
}"#;

#[test]
#[ignore]
fn bench_synthetic_1b_load() {
    let dir = std::env::temp_dir().join(format!("model_bench_1b_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG_1B).unwrap();
    {
        let cfg = MllamaConfig::from_json_str(CONFIG_1B).unwrap();
        let opts = LoadOptions {
            dtype: Kind::BFloat16,
            ..Default::default()
        };
        let t = Instant::now();
        let m = MllamaModel::random(cfg, opts, 0).unwrap();
        let params: i64 = m
            .parameter_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<i64>())
            .sum();
        m.save_safetensors(&dir.join("model.safetensors"), KeyLayout::Legacy)
            .unwrap();
        println!(
            "1b: {params} params, random init + write {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "synthetic_1b_child", "--nocapture"])
        .env("MODEL_BENCH_1B_DIR", &dir)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore]
fn synthetic_1b_child() {
    let Ok(dir) = std::env::var("MODEL_BENCH_1B_DIR") else {
        return;
    };
    let before = vm_hwm_mib();
    let t = Instant::now();
    let opts = LoadOptions {
        dtype: Kind::BFloat16,
        ..Default::default()
    };
    let m = MllamaModel::load(std::path::Path::new(&dir), opts).unwrap();
    let secs = t.elapsed().as_secs_f64();
    let bytes: i64 = m
        .parameter_shapes()
        .iter()
        .map(|(_, s)| s.iter().product::<i64>() * 2)
        .sum();
    println!(
        "1b load: {secs:.2} s, weights {:.0} MiB, peak RSS {:.0} MiB (before load {before:.0} MiB)",
        bytes as f64 / 1048576.0,
        vm_hwm_mib()
    );
}
