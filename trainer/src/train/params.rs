//! What a run trains, in PEFT's words: `print_trainable_parameters`' line (llama-recipes prints it
//! as training starts), from the model the run built or, for `trainer config check`, from the
//! base's skeleton with the config's adapter layout (weights left unread).
use std::collections::BTreeSet;

use anyhow::{Context, Result};
use tch::Device;

use crate::config::Config;
use crate::fsdp::kind_of;
use crate::model::{AttentionImpl, LoadOptions, MllamaConfig, MllamaModel, WeightSource};

/// `{what}: trainable params: N || all params: M || trainable%: P` (N, M with thousands
/// separators, P to 4 decimals, as peft prints them). With LoRA, `what` names the layers it wraps
/// and their ranks; `count_dora`: count a DoRA magnitude (out,) per wrapped layer even where the
/// model holds none (the config check's layout, built without reading weights).
pub fn trainable_summary(model: &mut MllamaModel, count_dora: bool) -> String {
    // (peft counts a module to save twice in all params: the base module and its trained copy)
    let (mut all, mut full, mut saved) = (0i64, 0i64, 0i64);
    model.visit_params(&mut |name, t| {
        let n = t.numel() as i64;
        all += n;
        if model.full_finetune_trains(name) {
            full += n;
        }
        if model.saved_params.iter().any(|s| s == name) {
            saved += n;
        }
    });
    let (what, trainable) = if model.lora.is_some() {
        let (mut layers, mut lora, mut ranks, mut dora) = (0, 0i64, BTreeSet::new(), false);
        model.visit_linears(&mut |l| {
            if let Some(br) = &l.lora {
                layers += 1;
                lora += (br.a.numel() + br.b.numel()) as i64;
                let magnitudes = br.magnitude.is_some() || count_dora;
                if magnitudes {
                    lora += l.out_features();
                }
                dora |= magnitudes;
                ranks.insert(br.a.size()[0]);
            }
        });
        all += lora + saved;
        let ranks = match (ranks.first(), ranks.last()) {
            (Some(lo), Some(hi)) if lo != hi => format!("ranks {lo}-{hi}"),
            (Some(r), _) => format!("rank {r}"),
            _ => "no layer".into(),
        };
        let method = if dora { "DoRA" } else { "LoRA" };
        let modules = match saved {
            0 => String::new(),
            _ => format!(" and modules_to_save {:?}", model.saved_modules),
        };
        (
            format!("{method} on {layers} linear layers ({ranks}){modules}"),
            lora + saved,
        )
    } else if model.freeze_llm {
        (
            "full finetuning of the vision tower, the projector and the cross-attention layers"
                .into(),
            full,
        )
    } else {
        ("full finetuning".into(), full)
    };
    format!(
        "{what}: trainable params: {} || all params: {} || trainable%: {:.4}",
        thousands(trainable),
        thousands(all),
        100.0 * trainable as f64 / all.max(1) as f64
    )
}

/// What the `peft` section's per-layer options choose nothing of in `model` (a pattern key, an
/// `exclude_modules` entry: `AdapterLayout::unmatched`), as peft warns of it; empty without LoRA.
pub fn layout_warnings(model: &mut MllamaModel, config: &Config) -> Result<Vec<String>> {
    if !config.peft.is_lora() {
        return Ok(vec![]);
    }
    let layout = super::setup::adapter_config(&config.peft).training_layout()?;
    let mut paths = vec![];
    model.visit_linears(&mut |l| paths.push(l.path.clone()));
    Ok((layout.unmatched(&paths).into_iter())
        .map(|w| format!("peft.{w}: check its spelling"))
        .collect())
}

/// `n` as Python's `{:,d}` writes it.
fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    match n < 0 {
        true => format!("-{out}"),
        false => out,
    }
}

/// `config check`'s look at the model: `model.path`'s skeleton (config.json and the weight files'
/// headers: names and shapes checked, nothing read) with the config's LoRA layout applied, so a
/// `target_modules` that matches nothing or overlapping patterns stop here rather than on every
/// rank; returns `trainable_summary`'s line and `layout_warnings`.
pub fn check_model(config: &Config) -> Result<(String, Vec<String>)> {
    let dir = &config.model.path;
    let what = || format!("loading model.path {}", dir.display());
    let mc = MllamaConfig::from_file(&dir.join("config.json")).with_context(what)?;
    let src = WeightSource::open_dir(dir).with_context(what)?;
    let opts = LoadOptions {
        dtype: kind_of(config.model.dtype),
        device: Device::Cpu,
        // (the structure is the same with any attention; fused would want a GPU here)
        attention: AttentionImpl::Sdpa,
    };
    let mut model = MllamaModel::skeleton(mc, &src, opts).with_context(what)?;
    model.freeze_llm = config.peft.freeze_llm_only;
    let p = &config.peft;
    if p.is_lora() {
        // (DoRA's magnitudes would read the weights: counted instead)
        let mut adapter = super::setup::adapter_config(p);
        adapter.use_dora = false;
        model.apply_adapter(&adapter, 0, None).context("peft")?;
        // (an adapter to start from: its config against the section, as the run checks it)
        if let Some(dir) = &p.init_from {
            super::setup::check_init_from(dir, &mut model, p)?;
        }
    }
    let warnings = layout_warnings(&mut model, config)?;
    Ok((
        trainable_summary(&mut model, p.is_lora() && p.use_dora),
        warnings,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped_as_python_groups_them() {
        for (n, s) in [
            (0, "0"),
            (999, "999"),
            (1000, "1,000"),
            (3276800, "3,276,800"),
            (-12345, "-12,345"),
        ] {
            assert_eq!(thousands(n), s);
        }
    }
}
