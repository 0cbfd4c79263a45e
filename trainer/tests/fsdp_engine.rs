//! In-process FSDP engine checks at world size 1 (the same code as multi-rank, trivial collectives):
//! the unit schedule (forward without a graph, recompute backward) gives the plain autograd loss
//! and gradients, for full finetuning and for LoRA, on the tiny fixture model.
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use tch::{Kind, Tensor};
use trainer::dist::{Backend, ProcessGroup};
use trainer::fsdp::{FsdpModel, PlainModel, Trainable, WrapOptions};
use trainer::model::{
    AttentionImpl, Batch, Images, LoadOptions, LoraConfig, MllamaModel, TargetModules,
};
use trainer::optim::{clip_grad_norm, AdamW, AdamWConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn golden_batch(case: &str) -> Batch {
    let p = fixtures().join(format!("golden_{case}.safetensors"));
    let g: HashMap<String, Tensor> = Tensor::read_safetensors(&p).unwrap().into_iter().collect();
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

fn load(lora: bool) -> MllamaModel {
    let opts = LoadOptions {
        attention: AttentionImpl::Sdpa,
        ..Default::default()
    };
    let mut m = MllamaModel::load(&fixtures().join("model_hf5"), opts).unwrap();
    if lora {
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        };
        m.apply_lora(&cfg, Some(7)).unwrap();
        // B starts at zero: give it values so that A's gradient is not zero either
        tch::manual_seed(3);
        tch::no_grad(|| {
            for (n, t) in m.trainable_parameters() {
                if n.contains("lora_B") {
                    let _ = t.shallow_clone().uniform_(-0.1, 0.1);
                }
            }
        });
    }
    m
}

fn compare(lora: bool, prefetch: bool) {
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(30)).unwrap();
    let mut plain = Trainable::Plain(Box::new(PlainModel::new(load(lora))));
    let mut fsdp = Trainable::Fsdp(Box::new(
        FsdpModel::wrap(
            load(lora),
            &pg,
            WrapOptions {
                compute: Kind::Float,
                prefetch,
            },
        )
        .unwrap(),
    ));
    let params_p = plain.master_params();
    let params_f = fsdp.master_params();
    let cfg = AdamWConfig {
        weight_decay: 0.1,
        ..Default::default()
    };
    let mut opt_p = AdamW::new(cfg, &params_p);
    let mut opt_f = AdamW::new(cfg, &params_f);
    for case in ["batch2", "image1", "text", "image4"] {
        let batch = golden_batch(case);
        plain.zero_grads();
        fsdp.zero_grads();
        let scale = 1.0 / 7.0;
        let lp = plain.forward_backward(&pg, &batch, scale, 1).unwrap();
        let lf = fsdp.forward_backward(&pg, &batch, scale, 1).unwrap();
        let e_loss = (lp - lf).abs() / lp.abs();
        let gp = plain.grads();
        let gf = fsdp.grads();
        let np = clip_grad_norm(&gp, Some(0.5), Some(&pg)).unwrap();
        let nf = clip_grad_norm(&gf, Some(0.5), Some(&pg)).unwrap();
        opt_p.step(&params_p, &gp, 1e-4);
        opt_f.step(&params_f, &gf, 1e-4);
        plain.after_update();
        fsdp.after_update();
        let wp: HashMap<String, Tensor> =
            plain.gather_trainable(&pg).unwrap().into_iter().collect();
        let wf: Vec<(String, Tensor)> = fsdp.gather_trainable(&pg).unwrap();
        assert_eq!(wp.len(), wf.len());
        let mut e_w = 0.0f64;
        for (n, t) in &wf {
            let d = (t - &wp[n]).abs().max().double_value(&[]);
            e_w = e_w.max(d);
        }
        let e_norm = (np - nf).abs() / np;
        println!("{case} lora={lora} prefetch={prefetch}: loss {lp:.6} vs {lf:.6} rel {e_loss:.2e}, grad norm {np:.6} rel {e_norm:.2e}, weights max abs diff {e_w:.2e}");
        assert!(e_loss < 1e-6, "{case}: loss {lp} vs {lf}");
        assert!(e_norm < 1e-5, "{case}: grad norm {np} vs {nf}");
        assert!(e_w < 1e-5, "{case}: weights differ by {e_w}");
    }
}

#[test]
fn world1_full_finetune_matches_autograd() {
    compare(false, true);
}

#[test]
fn world1_lora_matches_autograd() {
    compare(true, false);
}
