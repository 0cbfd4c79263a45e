//! Every rank trains with rank 0's settings. Ranks on other nodes read their own config file and
//! `--set` arguments (the launcher checks the config on each node, not across them), and a node
//! given another `train.lr` or `peft.dropout` would train silently apart while the run records
//! rank 0's (torchrun leaves this to the script). Paths may differ between nodes (each node's
//! mounts), and so may settings of a node's own (`data.num_workers`).
use std::collections::BTreeMap;

use anyhow::{anyhow, Result};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::config::Config;
use crate::dist::ProcessGroup;

/// Keys that may differ between ranks: paths, and what only shapes a node's own work.
const PER_NODE: &[&str] = &[
    "model.path",
    "peft.init_from",
    "data.train",
    "data.eval",
    "data.image_root",
    "data.num_workers",
    "train.output_dir",
    "train.tensorboard",
    "train.peak_tflops",
    "checkpoint.dir",
    "checkpoint.resume",
];

/// Stops every rank when one's settings differ from rank 0's: that rank's error names the keys
/// and both values, the others say another rank's differ.
pub(super) fn agree_settings(pg: &ProcessGroup, device: Device, config: &Config) -> Result<()> {
    if pg.world_size() == 1 {
        return Ok(());
    }
    let mine = settings(config);
    let text = serde_json::to_string(&mine)?;
    let rank0 = broadcast_text(pg, device, &text)?;
    let local = match serde_json::from_str::<BTreeMap<String, Value>>(&rank0) {
        Ok(theirs) => match differences(&theirs, &mine) {
            d if d.is_empty() => Ok(()),
            d => Err(anyhow!(
                "this rank's training settings differ from rank 0's: {}; each node reads its own \
                 config file and --set arguments: give every node the same (paths may differ)",
                d.join(", ")
            )),
        },
        Err(e) => Err(anyhow!("rank 0's settings did not arrive whole ({e})")),
    };
    crate::checkpoint::agree(pg, device, local, || {
        "another rank's training settings differ from rank 0's (its error names them)".into()
    })
}

/// The config as dotted keys and values, less the keys that may differ between ranks.
fn settings(config: &Config) -> BTreeMap<String, Value> {
    let mut flat = BTreeMap::new();
    flatten(
        "",
        &serde_json::to_value(config).unwrap_or(Value::Null),
        &mut flat,
    );
    flat.retain(|k, _| {
        !PER_NODE
            .iter()
            .any(|p| k == p || k.starts_with(&format!("{p}.")))
    });
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
        let other = settings(&parse(&["train.lr=0.5", "peft.dropout=0.1"]));
        let d = differences(&rank0, &other);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("peft.dropout: rank 0 has 0.05, this rank 0.1"),
            "{d:?}"
        );
        assert!(d[1].starts_with("train.lr: rank 0 has "), "{d:?}");
        assert!(d[1].ends_with("this rank 0.5"), "{d:?}");
        assert!(rank0.contains_key("train.lr") && !rank0.contains_key("model.path"));
    }
}
