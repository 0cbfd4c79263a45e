//! Every rank trains with rank 0's settings. Ranks on other nodes read their own config file and
//! `--set` arguments (the launcher checks the config on each node, not across them), and a node
//! given another `train.lr` or `peft.dropout` would train silently apart while the run records
//! rank 0's (torchrun leaves this to the script). Paths may differ between nodes (each node's
//! mounts: whether one is set may not), and so may settings of a node's own (`data.num_workers`).
use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::dist::ProcessGroup;

/// Keys whose values are paths: compared as set or not (and `checkpoint.resume` as auto, never or
/// a folder), not by the path.
const PATHS: &[&str] = &[
    "model.path",
    "peft.init_from",
    "data.train",
    "data.eval",
    "data.image_root",
    "train.output_dir",
    "checkpoint.dir",
    "checkpoint.resume",
];

/// Keys that only shape a node's own work (or rank 0's), not compared.
const PER_NODE: &[&str] = &["data.num_workers", "train.tensorboard", "train.peak_tflops"];

/// Stops every rank when one's settings differ from rank 0's: that rank's error names the keys
/// and both values, the others say another rank's differ.
pub(super) fn agree_settings(pg: &ProcessGroup, device: Device, config: &Config) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let text = serde_json::to_string(&settings(config))?;
    let rank0 = broadcast_text(pg, device, &text)?;
    let local = match differences_in_text(&rank0, &text) {
        Ok(d) if d.is_empty() => Ok(()),
        Ok(d) => Err(anyhow!(
            "this rank's training settings differ from rank 0's: {}; each node reads its own \
             config file and --set arguments: give every node the same (paths may differ)",
            d.join(", ")
        )),
        Err(e) => Err(anyhow!("rank 0's settings did not arrive whole ({e})")),
    };
    crate::checkpoint::agree(pg, device, local, || {
        "another rank's training settings differ from rank 0's (its error names them)".into()
    })
}

/// The config as dotted keys and values, less a node's own settings, paths as set or not.
fn settings(config: &Config) -> BTreeMap<String, Value> {
    let mut flat = BTreeMap::new();
    let whole = serde_json::to_value(config).unwrap_or(Value::Null);
    flatten("", &whole, &mut flat);
    let under = |k: &str, keys: &[&str]| {
        keys.iter()
            .any(|p| k == *p || k.starts_with(&format!("{p}.")))
    };
    flat.retain(|k, _| !under(k, PER_NODE));
    for (k, v) in flat.iter_mut().filter(|(k, _)| under(k, PATHS)) {
        *v = match v {
            Value::Null => Value::Null,
            Value::String(s) if k == "checkpoint.resume" && (s == "auto" || s == "never") => {
                Value::String(s.clone())
            }
            _ => Value::String("(a path)".into()),
        };
    }
    flat
}

fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, v) in m {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                flatten(&key, v, out);
            }
        }
        v => {
            out.insert(prefix.to_string(), v.clone());
        }
    }
}

/// `differences` of two `settings` as JSON text, both parsed (a float parsed from text does not
/// always come back to the bits it was written from).
fn differences_in_text(rank0: &str, mine: &str) -> serde_json::Result<Vec<String>> {
    let parse = serde_json::from_str::<BTreeMap<String, Value>>;
    Ok(differences(&parse(rank0)?, &parse(mine)?))
}

/// "key: rank 0 has X, this rank Y" for each key whose values differ (at most 5 named).
fn differences(rank0: &BTreeMap<String, Value>, mine: &BTreeMap<String, Value>) -> Vec<String> {
    let keys: std::collections::BTreeSet<&String> = rank0.keys().chain(mine.keys()).collect();
    let mut out: Vec<String> = keys
        .into_iter()
        .filter(|k| rank0.get(*k) != mine.get(*k))
        .map(|k| {
            let show = |v: Option<&Value>| v.map_or("nothing".to_string(), Value::to_string);
            format!(
                "{k}: rank 0 has {}, this rank {}",
                show(rank0.get(k)),
                show(mine.get(k))
            )
        })
        .collect();
    if out.len() > 5 {
        let more = out.len() - 5;
        out.truncate(5);
        out.push(format!("and {more} more"));
    }
    out
}

/// Rank 0's `text` on every rank: its length, then its bytes (one per i64: a config is a few KB,
/// and every backend reduces and broadcasts i64).
fn broadcast_text(pg: &ProcessGroup, device: Device, text: &str) -> Result<String> {
    let rank0 = pg.rank() == 0;
    let len = Tensor::from_slice(&[text.len() as i64]).to_device(device);
    pg.broadcast(&len, 0)?;
    let n = len.to_device(Device::Cpu).int64_value(&[0]);
    let bytes: Vec<i64> = match rank0 {
        true => text.bytes().map(i64::from).collect(),
        false => vec![0; n as usize],
    };
    let t = Tensor::from_slice(&bytes)
        .to_kind(Kind::Int64)
        .to_device(device);
    pg.broadcast(&t, 0)?;
    let got = Vec::<i64>::try_from(t.to_device(Device::Cpu))?;
    let bytes: Vec<u8> = got.into_iter().map(|b| b as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sets: &[&str]) -> Config {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        crate::config::parse("model: {path: m}\ndata: {train: t.jsonl}\n", &sets).expect("config")
    }

    /// A node's own paths and loader threads are no difference; a learning rate or dropout is,
    /// named with both values.
    #[test]
    fn settings_differ_by_training_keys_not_paths() {
        let rank0 = settings(&parse(&[]));
        let paths = settings(&parse(&[
            "model.path=/other/m",
            "data.train=/other/t.jsonl",
            "data.num_workers=7",
            "checkpoint.dir=/other/ckpt",
            "train.output_dir=/other/out",
        ]));
        assert!(differences(&rank0, &paths).is_empty());
        // whether a path is set is a difference (another node would start from an adapter, or
        // not resume), which path is not
        for (a, b) in [
            ("checkpoint.resume=auto", "checkpoint.resume=never"),
            (
                "checkpoint.resume=never",
                "checkpoint.resume=/a/step-00000002",
            ),
            ("data.eval=e.jsonl", "data.eval=null"),
            ("peft.init_from=/a/adapter", "peft.init_from=null"),
        ] {
            let d = differences(&settings(&parse(&[a])), &settings(&parse(&[b])));
            assert_eq!(d.len(), 1, "{a} vs {b}: {d:?}");
        }
        let (a, b) = (
            "checkpoint.resume=/a/step-00000002",
            "checkpoint.resume=/b/step-00000002",
        );
        let d = differences(&settings(&parse(&[a])), &settings(&parse(&[b])));
        assert!(d.is_empty(), "{d:?}");
        let other = settings(&parse(&["train.lr=0.5", "peft.dropout=0.1"]));
        let d = differences(&rank0, &other);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("peft.dropout: rank 0 has 0.05, this rank 0.1"),
            "{d:?}"
        );
        assert!(d[1].starts_with("train.lr: rank 0 has "), "{d:?}");
        assert!(d[1].ends_with("this rank 0.5"), "{d:?}");
        assert!(rank0.contains_key("train.lr") && rank0.contains_key("model.path"));
        assert!(!rank0.contains_key("data.num_workers"));
    }

    /// The same settings compare equal through the text they travel as, a learning rate whose
    /// parse does not give back its bits included.
    #[test]
    fn the_same_settings_agree_through_their_text() {
        let lr = settings(&parse(&["train.lr=1.0477944722643715e-05"]));
        let text = serde_json::to_string(&lr).unwrap();
        let parsed: BTreeMap<String, Value> = serde_json::from_str(&text).unwrap();
        println!(
            "lr parsed back equal: {}",
            parsed["train.lr"] == lr["train.lr"]
        );
        assert!(differences_in_text(&text, &text).unwrap().is_empty());
    }
}
