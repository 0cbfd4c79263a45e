//! `trainer bench checkpoint`: the real checkpoint save and load paths (`checkpoint::save`,
//! `checkpoint::load`) on synthetic state: `groups` flat fp32 tensors whose master weights and two
//! AdamW moments total `total_bytes` over all ranks, each rank holding its 1/W element range, as
//! FSDP does. Run one per rank under the launcher (CPU backend); rank 0 reports medians of `reps`.
//! - `save`: a synchronous save (rank files written + fsynced, manifest, rename, retention);
//! - `async_block`: the time a background save keeps the training thread (the copy to host
//!   memory; once every rank's file is written: manifest, rename, barriers), median over reps;
//!   `async_block_first`: the first one (its snapshot buffers were reserved before the timing,
//!   as `trainer train` does in the background after its first step; later saves reuse them);
//! - `load`: every rank restores its ranges (sha256 of each file it reads, mmap, copy). The files
//!   were just written, so this reads from the page cache: hashing and copying, not the disk.
//!
//! `bytes` is the size of all rank files together; GB/s = bytes / seconds / 1e9.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{self, manifest::ParamEntry, FlatState, Progress};
use crate::dist::{ProcessGroup, ReduceOp};
use crate::optim::LrSchedule;

pub struct Measurement {
    pub op: &'static str,
    pub bytes: u64,
    pub seconds: f64,
}

impl Measurement {
    pub fn gbps(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// The `--json` line.
    pub fn json_line(&self, world: usize, reps: usize) -> String {
        // (the peer, torch DCP, runs in its own process: scripts/bench-checkpoint.sh sets them
        // side by side)
        let gbps = (self.gbps() * 1000.0).round() / 1000.0;
        json!({"bench": "checkpoint", "name": format!("checkpoint/{}/world{world}", self.op),
               "op": self.op, "bytes": self.bytes, "seconds": self.seconds, "gbps": gbps,
               "figure": gbps, "unit": "GB/s", "peer": null, "ratio": null,
               "world": world, "reps": reps})
        .to_string()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// This rank's synthetic flat states: `groups` tensors of `numel` elements each, as 3 states.
fn synthetic_states(rank: usize, world: usize, groups: usize, numel: i64) -> Vec<FlatState> {
    let shard_len = (numel + world as i64 - 1) / world as i64;
    let s = (shard_len * rank as i64).min(numel);
    let e = (s + shard_len).min(numel);
    (0..groups)
        .map(|g| {
            let t = || Tensor::rand([shard_len], (Kind::Float, Device::Cpu));
            FlatState {
                group: format!("unit{g}/0"),
                numel,
                shard_len,
                shard_world: world,
                replicas: 1,
                params: vec![ParamEntry {
                    name: format!("unit{g}.weight"),
                    shape: vec![numel],
                    offset: 0,
                }],
                start: s,
                end: e,
                tensors: [t(), t(), t()],
                optimizer_steps: None,
            }
        })
        .collect()
}

/// Runs the benchmark in `dir` (created; its checkpoints are removed at the end).
pub fn run(
    pg: &ProcessGroup,
    dir: &Path,
    total_bytes: u64,
    groups: usize,
    reps: usize,
) -> Result<Vec<Measurement>> {
    let (rank, world) = (pg.rank(), pg.world_size());
    let yaml = format!(
        "model: {{path: bench-synthetic-model, dtype: fp32}}\n\
         peft: {{method: none}}\n\
         data: {{train: none.jsonl, image_root: .}}\n\
         train: {{batch_size: 1}}\n\
         checkpoint: {{dir: {}, keep_last: 1, resume: never, async: true}}\n",
        // (a JSON string is a YAML scalar: a path with `: ` or `, ` stays one)
        serde_json::Value::String(dir.display().to_string())
    );
    let config = crate::config::parse(&yaml, &[]).context("bench config")?;
    let schedule = LrSchedule::new(config.train.lr, &config.train.schedule, 1000);
    let numel = (total_bytes / 12 / groups as u64) as i64; // 3 fp32 states per element
    let states = || synthetic_states(rank, world, groups, numel);
    let mine = states();
    let copy = |s: &[FlatState]| -> Vec<FlatState> {
        s.iter()
            .map(|f| FlatState {
                group: f.group.clone(),
                numel: f.numel,
                shard_len: f.shard_len,
                shard_world: f.shard_world,
                replicas: f.replicas,
                params: f.params.clone(),
                start: f.start,
                end: f.end,
                tensors: [
                    f.tensors[0].shallow_clone(),
                    f.tensors[1].shallow_clone(),
                    f.tensors[2].shallow_clone(),
                ],
                optimizer_steps: f.optimizer_steps.clone(),
            })
            .collect()
    };
    let mut step = 0u64;
    let mut progress = || {
        step += 1;
        Progress {
            step,
            ..Default::default()
        }
    };
    let file_bytes = |ckpt: &Path| -> Result<u64> {
        Ok(checkpoint::load::read_manifest(ckpt)?
            .files
            .iter()
            .map(|f| f.bytes)
            .sum())
    };
    let (mut save_s, mut block_s, mut load_s) = (vec![], vec![], vec![]);
    let mut bytes = 0;
    // one Checkpointer, as in a training run: background saves reuse their snapshot buffers and
    // retention runs on rank 0's background thread
    let mut saves = checkpoint::Checkpointer::new();
    // as `trainer train` does after its first step: the background saves' host buffers are
    // allocated (untimed here; in training, while steps go on)
    saves.reserve_states(&mine);
    saves.wait_reserved();
    for _ in 0..reps {
        // in training, saves are steps apart: the previous one's retention (rank 0 deleting the
        // checkpoint before it, in the background) is over before the next save
        saves.close(pg, Device::Cpu)?;
        // synchronous save
        pg.barrier()?;
        let t = Instant::now();
        let p = progress();
        let ckpt = saves
            .save_states(
                pg,
                Device::Cpu,
                &config,
                copy(&mine),
                0,
                &schedule,
                &p,
                false,
            )?
            .context("a synchronous save returns its folder")?;
        save_s.push(t.elapsed().as_secs_f64());
        bytes = file_bytes(&ckpt)?;
        // its retention (deleting the previous rep's checkpoint, in the background) ends before
        // the timed load, as the peer's rmtree is outside its timing
        saves.close(pg, Device::Cpu)?;

        // load into other tensors, checked against the saved ones
        let target = states();
        pg.barrier()?;
        let t = Instant::now();
        let m = checkpoint::load::read_manifest(&ckpt)?;
        checkpoint::load::fill_states(&ckpt, &m, &target)?;
        pg.barrier()?;
        load_s.push(t.elapsed().as_secs_f64());
        for (a, b) in target.iter().zip(&mine) {
            let n = b.end - b.start; // the padded tail of the last rank's buffer is not saved
            for (x, y) in a.tensors.iter().zip(&b.tensors) {
                anyhow::ensure!(
                    x.narrow(0, 0, n).equal(&y.narrow(0, 0, n)),
                    "bench: loaded state of {} differs from the saved one",
                    b.group
                );
            }
        }
        drop(target);

        // background save: what the training thread waits for
        pg.barrier()?;
        let t = Instant::now();
        let p = progress();
        saves.save_states(
            pg,
            Device::Cpu,
            &config,
            copy(&mine),
            0,
            &schedule,
            &p,
            true,
        )?;
        let mut blocked = t.elapsed().as_secs_f64();
        // "training" goes on until every rank's file is written (train.rs publishes then)
        loop {
            let busy = Tensor::from_slice(&[!saves.is_written() as i64]);
            pg.all_reduce(&busy, ReduceOp::Max)?;
            if busy.int64_value(&[0]) == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let t = Instant::now();
        saves.finish(pg, Device::Cpu)?;
        let fin = t.elapsed().as_secs_f64();
        tracing::debug!("async save: begin {blocked:.3} s, finish {fin:.3} s");
        blocked += fin;
        block_s.push(blocked);
    }
    saves.close(pg, Device::Cpu)?;
    pg.barrier()?;
    if rank == 0 {
        let _ = std::fs::remove_dir_all(dir);
    }
    let first_block = block_s[0];
    Ok(vec![
        Measurement {
            op: "save",
            bytes,
            seconds: median(save_s),
        },
        Measurement {
            op: "load",
            bytes,
            seconds: median(load_s),
        },
        Measurement {
            op: "async_block",
            bytes,
            seconds: median(block_s),
        },
        // the first background save (its buffers were reserved before, as in training)
        Measurement {
            op: "async_block_first",
            bytes,
            seconds: first_block,
        },
    ])
}

/// `trainer bench checkpoint`: sets up the CPU process group from the launcher's environment
/// (world 1 without it), runs, and prints on rank 0 a table or (`json`) one line per measurement.
pub fn main(dir: &Path, mib: u64, groups: usize, reps: usize, json: bool) -> Result<()> {
    use crate::dist::Backend;
    let pg = ProcessGroup::from_env(Backend::Cpu, Duration::from_secs(600))
        .context("setting up the process group")?;
    let (world, reps) = (pg.world_size(), reps.max(1));
    let results = run(&pg, dir, mib << 20, groups.max(1), reps)?;
    if pg.rank() == 0 {
        if !json {
            println!(
                "{:<12} {:>12} {:>10} {:>8}   (world {world}, median of {reps}, {})",
                "op",
                "bytes",
                "seconds",
                "GB/s",
                dir.display()
            );
        }
        for m in &results {
            if json {
                println!("{}", m.json_line(world, reps));
            } else {
                println!(
                    "{:<12} {:>12} {:>10.3} {:>8.3}",
                    m.op,
                    m.bytes,
                    m.seconds,
                    m.gbps()
                );
            }
        }
    }
    Ok(())
}
