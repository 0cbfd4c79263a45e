//! What an evaluation's predictions are made with (OUT/settings.json): the model, adapter and
//! checkpoint with their files' fingerprints, the generation settings and the prompts' day; how
//! a resume and the other ranks compare them, and how a difference is named.
use std::path::Path;

use super::{EvalError, EvalOptions, Shard};
use crate::checkpoint::fingerprint;

/// What predictions are made with, for `EvalOptions::made_with`: the model and adapter folders
/// (canonical paths) and their contents' fingerprints: sha256 of the adapter's files, the model's
/// config.json content (compared as a resumed training run compares it: a copy re-indented or
/// re-saved by another transformers is the same model, `checkpoint::same_model_config`) and the
/// sha256 of its bytes (what older settings recorded), the names and sizes of its weight files
/// and a fingerprint of their content by samples of every tensor (hashing 20 GB would take
/// minutes; modification times differ between per-node copies), and the sha256 of its tokenizer,
/// chat template and image processor files ([`fingerprint`]). A resume with a retrained adapter in
/// the same folder, another merged export or an edited chat template in the model's is then
/// refused.
pub fn made_with(
    model: &Path,
    adapter: Option<&Path>,
    checkpoint: Option<&Path>,
) -> serde_json::Value {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or(p.to_path_buf());
    let sha = |p: &Path| {
        std::fs::read(p)
            .map(|b| crate::checkpoint::sha256_hex(&b))
            .unwrap_or_default()
    };
    let files = fingerprint::weight_files(model);
    let weights: Vec<serde_json::Value> = files
        .iter()
        .filter_map(|p| {
            // (through symlinks: a Hugging Face cache snapshot links its blobs)
            let m = std::fs::metadata(p).ok()?;
            let name = p.file_name()?.to_string_lossy();
            Some(serde_json::json!([name, m.len()]))
        })
        .collect();
    // (read once: its bytes' sha256 and its content are both recorded)
    let config = std::fs::read(model.join("config.json")).ok();
    let mut v = serde_json::json!({
        "model": canonical(model),
        "model_config_sha256": config.as_deref().map(crate::checkpoint::sha256_hex).unwrap_or_default(),
        "model_config": config.as_deref().and_then(crate::checkpoint::model_config_content),
        "model_weights": weights,
        "model_weights_sampled": fingerprint::sampled_weights(&files),
        "model_files": fingerprint::model_files(model),
        "model_processor_config": fingerprint::processor_config(model),
        "adapter": adapter.map(canonical),
        "adapter_sha256": adapter.map(|a| [sha(&a.join("adapter_config.json")), sha(&a.join("adapter_model.safetensors"))]),
    });
    // (only with one: settings.json of evaluations without a checkpoint stay as they were)
    if let Some(c) = checkpoint {
        // its manifest records every rank file's sha256
        v["checkpoint"] = serde_json::json!([canonical(c), sha(&c.join("manifest.json"))]);
    }
    v
}

/// What the predictions depend on (not --limit, --batch-size or the world size);
/// `template_date`: the day text-only questions' prompts carry, when there are any.
pub(super) fn settings(opts: &EvalOptions, template_date: Option<&str>) -> serde_json::Value {
    // prompt 2: questions lose a LLaVA `<image>` marker and surrounding whitespace; 3: so do
    // earlier answers and the correction prompt in later turns' prompts; seeds "id": each
    // question's sampler is seeded from its id (`BenchItem::seed`)
    let mut s = serde_json::json!({"model": opts.made_with, "infer": opts.infer, "prompt": 3, "seeds": "id"});
    if let Some(date) = template_date {
        s["template_date"] = date.into();
    }
    s
}

/// A resumed run must make its predictions as the stored ones were made: OUT/settings.json
/// records that; a mismatch is an error (mixing two adapters' or turn counts' predictions would
/// give a report of neither). Every rank checks before generating anything; returns whether the
/// file is to be (re)written, which rank 0 does (`write_settings`).
pub(super) fn check_settings(
    out: &Path,
    now: &serde_json::Value,
    resuming: bool,
) -> Result<bool, EvalError> {
    if !resuming {
        return Ok(true);
    }
    let path = out.join("settings.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        EvalError::Io(format!(
            "{}: {e}: {} holds predictions but not the settings they were made with, so this run \
             cannot tell whether they match; use another --out, or delete its predictions*.jsonl \
             to start over",
            path.display(),
            out.display()
        ))
    })?;
    let before: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| EvalError::Io(format!("{}: {e}", path.display())))?;
    if before.get("seeds").is_none() {
        return Err(EvalError::Io(format!(
            "{}: its predictions were made by an older trainer (settings.json without the per-question seeds and file fingerprints this one records), so this run cannot tell whether they match; use another --out, or delete its predictions*.jsonl to start over",
            out.display()
        )));
    }
    // (the config by content, fingerprints an older run did not record compared from the next
    // run on, the folders by their files' fingerprints where it recorded them all: a copy of the
    // model moved to local disk, another job's mount point, is the same model)
    let [mut there, mut here] = comparable(&before, now);
    // a folder whose questions so far all had an image recorded no date (their prompts have
    // none): text-only questions added since take this run's, recorded from now on
    let record_date = there.get("template_date").is_none() && here.get("template_date").is_some();
    // (and a run that asks none, a --limit that leaves them out, keeps the recorded day)
    if there.get("template_date").is_none() || here.get("template_date").is_none() {
        for v in [&mut there, &mut here] {
            v.as_object_mut().map(|o| o.remove("template_date"));
        }
    }
    if let Some(differ) = differences(&there, &here) {
        return Err(EvalError::Io(format!(
            "{}: the predictions there were made with other settings ({differ}): use \
             another --out, or delete its predictions*.jsonl to start over",
            out.display(),
        )));
    }
    Ok(record_date)
}

/// Where two settings differ, for a message ("infer.turns differ: infer.turns there 2, this
/// run 3"); None when they are equal.
pub(crate) fn differences(there: &serde_json::Value, here: &serde_json::Value) -> Option<String> {
    if there == here {
        return None;
    }
    let mut differ = differing_keys(there, here, "");
    if differ.is_empty() {
        differ.push("their fields".into());
    }
    let at = |v: &serde_json::Value, key: &str| {
        let pointer = format!("/{}", key.replace('.', "/"));
        v.pointer(&pointer)
            .map_or("(unset)".to_string(), |x| x.to_string())
    };
    let values: Vec<String> = differ
        .iter()
        .map(|k| format!("{k} there {}, this run {}", at(there, k), at(here, k)))
        .collect();
    Some(format!(
        "{} differ: {}",
        differ.join(", "),
        values.join("; ")
    ))
}

/// Every rank must predict as rank 0 does: a node with its own copy of the model or the adapter,
/// or of the `llava_sco_prompt.json` a rank reads its prompt settings from, that differs would mix
/// two setups' predictions into one report. Compares what the settings say about the files' content
/// and the generation (not folder paths, which may differ between nodes); a collective every rank
/// calls.
pub(super) fn agree_on_settings(shard: &Shard, now: &serde_json::Value) -> Result<(), EvalError> {
    let content = settings_content(now);
    let all = (shard.gather)(settings_hash(&content))
        .map_err(|e| EvalError::Io(format!("comparing settings with the other ranks: {e}")))?;
    let differ: Vec<String> = (0..all.len())
        .filter(|&r| all[r] != all[0])
        .map(|r| r.to_string())
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(EvalError::Io(format!(
        "rank(s) {} would predict with other settings than rank 0: the model, the adapter, their \
         llava_sco_prompt.json or the flags differ between the ranks (a node with its own copy of \
         a folder?); give every rank the same files and flags. Rank {} predicts with {content}",
        differ.join(", "),
        shard.rank
    )))
}

/// 60 bits of the sha256 of a JSON value's text.
fn settings_hash(v: &serde_json::Value) -> i64 {
    let hex = crate::checkpoint::sha256_hex(v.to_string().as_bytes());
    i64::from_str_radix(&hex[..15], 16).expect("hex digits")
}

fn config_content_recorded(settings: &serde_json::Value) -> bool {
    settings
        .pointer("/model/model_config")
        .is_some_and(|c| !c.is_null())
}

/// Drops the config fingerprint not compared: the bytes' sha256 when `by_content`, else the
/// content.
fn keep_one_config_fingerprint(settings: &mut serde_json::Value, by_content: bool) {
    if let Some(model) = settings.get_mut("model").and_then(|m| m.as_object_mut()) {
        model.remove(match by_content {
            true => "model_config_sha256",
            false => "model_config",
        });
    }
}

/// What predictions depend on, without the folders' paths (their files' fingerprints stay).
pub(super) fn settings_content(settings: &serde_json::Value) -> serde_json::Value {
    let mut v = what_predicts(settings);
    let by_content = config_content_recorded(&v);
    keep_one_config_fingerprint(&mut v, by_content);
    drop_paths(&mut v);
    v
}

/// What [`made_with`] says about the files' content, without the folders' paths, each part as
/// the sha256 of its JSON (`{"model_config": ..., "model_weights_sampled": ..., "model_files":
/// ..., "adapter_sha256": ..., "checkpoint": ...}`): the same for a copy of the model, adapter or
/// checkpoint in another folder, and a difference names the part (other weights, tokenizer or
/// config at the same path). What `infer --questions` records per line, short.
pub fn content_fingerprints(made_with: &serde_json::Value) -> serde_json::Value {
    let content = settings_content(&serde_json::json!({ "model": made_with }));
    let parts = content["model"].as_object().cloned().unwrap_or_default();
    parts
        .into_iter()
        .map(|(k, v)| {
            let sha = crate::checkpoint::sha256_hex(v.to_string().as_bytes());
            (k, serde_json::Value::from(sha))
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Two evaluations' settings reduced to what both can be compared by (a resume's check, `trainer
/// compare`): what predicts, the base's config by content where both recorded it (a re-saved copy
/// is the same model), else by its bytes' sha256, the fingerprints one of them did not record (an
/// older trainer's) left out of both, the folders' paths left out where both recorded their
/// files' fingerprints.
pub(super) fn comparable(a: &serde_json::Value, b: &serde_json::Value) -> [serde_json::Value; 2] {
    let (mut x, mut y) = (what_predicts(a), what_predicts(b));
    let by_content = config_content_recorded(&x) && config_content_recorded(&y);
    for v in [&mut x, &mut y] {
        keep_one_config_fingerprint(v, by_content);
    }
    for key in [
        "model_weights_sampled",
        "model_files",
        "model_processor_config",
    ] {
        let pointer = format!("/model/{key}");
        if x.pointer(&pointer).is_none() || y.pointer(&pointer).is_none() {
            for v in [&mut x, &mut y] {
                if let Some(m) = v.get_mut("model").and_then(|m| m.as_object_mut()) {
                    m.remove(key);
                }
            }
        }
    }
    if fingerprinted(&x) && fingerprinted(&y) {
        drop_paths(&mut x);
        drop_paths(&mut y);
    }
    [x, y]
}

/// Whether settings record every fingerprint of the model's files (weights sampled, tokenizer
/// and processor files; older trainers recorded sizes only), so its path need not stand for it.
fn fingerprinted(settings: &serde_json::Value) -> bool {
    ["model_weights_sampled", "model_files"]
        .iter()
        .all(|key| settings.pointer(&format!("/model/{key}")).is_some())
}

/// Drops the folders' paths from settings (the model's, the adapter's, the checkpoint's),
/// keeping their files' fingerprints.
fn drop_paths(settings: &mut serde_json::Value) {
    if let Some(model) = settings.get_mut("model").and_then(|m| m.as_object_mut()) {
        model.remove("model");
        model.remove("adapter");
        if let Some(c) = model.get_mut("checkpoint").and_then(|c| c.as_array_mut()) {
            c.remove(0);
        }
    }
}

/// The settings that change predictions: greedy decoding (temperature 0) reads no seed, top-k
/// or top-p, so those are left out of the comparison then.
pub(crate) fn what_predicts(settings: &serde_json::Value) -> serde_json::Value {
    let mut v = settings.clone();
    if let Some(infer) = v.get_mut("infer").and_then(|i| i.as_object_mut()) {
        if infer.get("temperature").and_then(|t| t.as_f64()) == Some(0.0) {
            for key in ["seed", "top_k", "top_p"] {
                infer.remove(key);
            }
        }
    }
    v
}

/// The keys (dotted paths) whose values differ between two settings objects.
pub(super) fn differing_keys(
    a: &serde_json::Value,
    b: &serde_json::Value,
    at: &str,
) -> Vec<String> {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter()
                .flat_map(|k| {
                    let path = if at.is_empty() {
                        k.clone()
                    } else {
                        format!("{at}.{k}")
                    };
                    let (u, w) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    differing_keys(u, w, &path)
                })
                .collect()
        }
        _ if a == b => vec![],
        _ => vec![at.to_string()],
    }
}

/// Writes OUT/settings.json whole (through a temporary file: another rank may read it).
pub(super) fn write_settings(out: &Path, now: &serde_json::Value) -> Result<(), EvalError> {
    let path = out.join("settings.json");
    let text = serde_json::to_string_pretty(now).unwrap_or_default();
    crate::checkpoint::replace_synced(&path, text.as_bytes())
        .map_err(|e| EvalError::Io(format!("{}: {e:#}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ranks whose settings differ in content (the adapter's fingerprint, a prompt setting) are
    /// named, on every rank; folder paths alone (a node's mount point) do not count.
    #[test]
    fn ranks_must_predict_with_the_same_settings() {
        let settings = |adapter_path: &str, adapter_sha: &str, prompt: &str| {
            serde_json::json!({"model": {"model": "/m", "adapter": adapter_path,
                "adapter_sha256": [adapter_sha], "checkpoint": ["/c", "abc"]},
                "infer": {"temperature": 0.0, "seed": 1, "correction_prompt": prompt},
                "prompt": 3, "seeds": "id"})
        };
        let fp = |v: &serde_json::Value| settings_hash(&settings_content(v));
        let ours = settings("/a", "s1", "Check.");
        let run = |others: Vec<serde_json::Value>| {
            let all: Vec<i64> = std::iter::once(&ours).chain(&others).map(fp).collect();
            let (barrier, any) = (|| Ok(()), |b| Ok(b));
            let gather = move |_| Ok(all.clone());
            let shard = Shard {
                rank: 0,
                world: 1 + others.len(),
                barrier: &barrier,
                any: &any,
                gather: &gather,
            };
            agree_on_settings(&shard, &ours).map_err(|e| e.to_string())
        };
        // another mount point, another seed under greedy decoding: the same predictions
        let other_path = settings("/mnt/node1/a", "s1", "Check.");
        let mut other_seed = ours.clone();
        other_seed["infer"]["seed"] = 2.into();
        run(vec![other_path, other_seed]).unwrap();
        let e = run(vec![
            ours.clone(),
            settings("/a", "s2", "Check."),
            settings("/a", "s1", "Look again."),
        ])
        .unwrap_err();
        assert!(
            e.contains("rank(s) 2, 3 would predict with other settings than rank 0"),
            "{e}"
        );
        assert!(
            e.contains("Rank 0 predicts with") && e.contains("Check."),
            "{e}"
        );
    }
}
