//! Atomic sharded save, synchronous (`save`) or in the background (`begin`, then
//! `PendingSave::finish` later on the training thread). Every rank copies its state to host memory,
//! writes its file into `step-N.partial/` (on a writer thread) and fsyncs it; the ranks exchange (size, sha256) by an all-gather (which is also the barrier); rank 0 writes and
//! fsyncs `manifest.json`, renames the folder to `step-N`, fsyncs the parent, then applies
//! `keep_last` and removes leftover `.partial` folders; a final barrier makes the save complete
//! on every rank when `save` returns. A crash at any point leaves earlier checkpoints intact.
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::manifest::{
    DataPosition, FileEntry, Manifest, ShardEntry, TensorEntry, FORMAT, STATES, VERSION,
};
use super::{flat_states, fsync_dir, identity, identity_hash, list_dir, rank_file_name, Progress};
use crate::config::Config;
use crate::dist::ProcessGroup;
use crate::fsdp::Trainable;
use crate::optim::{AdamW, LrSchedule};

/// Test hook: `TRAINER_CHECKPOINT_CRASH_AT=N` exits the process (code 86, every rank) after the
/// data files of step N's checkpoint are written and before its manifest, on the first attempt
/// only (`TORCHELASTIC_RESTART_COUNT` unset or 0), so that a launcher restart gets past it.
pub const CRASH_ENV: &str = "TRAINER_CHECKPOINT_CRASH_AT";

/// Saves the trainable state at `progress` into `checkpoint.dir/step-<N>/` and waits until it
/// is complete; every rank must call it. Returns the checkpoint folder.
#[allow(clippy::too_many_arguments)]
pub fn save(
    pg: &ProcessGroup,
    device: Device,
    config: &Config,
    trainable: &Trainable,
    opt: &AdamW,
    schedule: &LrSchedule,
    progress: &Progress,
) -> Result<PathBuf> {
    begin(pg, config, trainable, opt, schedule, progress, false)?.finish(pg, device)
}

/// A save whose rank file is being written by a background thread. `finish` (on the training
/// thread: it runs collectives) waits for the file, then publishes the checkpoint.
pub struct PendingSave {
    started: Instant,
    step: u64,
    root: PathBuf,
    partial: PathBuf,
    final_dir: PathBuf,
    keep_last: usize,
    /// Rank 0: the manifest without `files`.
    manifest: Option<Manifest>,
    writer: std::thread::JoinHandle<Result<(u64, Vec<u8>)>>,
    /// Seconds the training thread spent in `begin` (snapshot to host memory).
    pub blocked_s: f64,
    background: bool,
}

/// Starts a save: creates `step-N.partial/` (rank 0; barrier), copies this rank's state to host
/// memory, and writes its file on a background thread. Every rank must call it. `background`:
/// whether training goes on before `finish` (only changes the log line).
pub fn begin(
    pg: &ProcessGroup,
    config: &Config,
    trainable: &Trainable,
    opt: &AdamW,
    schedule: &LrSchedule,
    progress: &Progress,
    background: bool,
) -> Result<PendingSave> {
    let started = Instant::now();
    let (rank, world) = (pg.rank(), pg.world_size());
    let root = config.checkpoint.dir.clone();
    let name = super::step_dir_name(progress.step);
    let final_dir = root.join(&name);
    let partial = root.join(format!("{name}.partial"));
    if rank == 0 {
        std::fs::create_dir_all(&root)
            .with_context(|| format!("creating checkpoint.dir {}", root.display()))?;
        if partial.exists() {
            std::fs::remove_dir_all(&partial)
                .with_context(|| format!("removing stale {}", partial.display()))?;
        }
        std::fs::create_dir(&partial).with_context(|| format!("creating {}", partial.display()))?;
    }
    pg.barrier()?;
    let states = flat_states(trainable, opt);
    // snapshot: (name, values) in file order
    let mut host: Vec<(String, Vec<f32>)> = vec![];
    for s in states.iter().filter(|s| s.end > s.start) {
        let n = s.end - s.start;
        for (state, t) in STATES.iter().zip(&s.tensors) {
            let t = t
                .narrow(0, 0, n)
                .to_device(Device::Cpu)
                .to_kind(Kind::Float)
                .contiguous();
            host.push((format!("{}/{state}", s.group), Vec::<f32>::try_from(&t)?));
        }
    }
    let manifest = (rank == 0)
        .then(|| build_manifest(config, &states, schedule, opt, progress, world, vec![]));
    let path = partial.join(rank_file_name(rank, world));
    let step = progress.step;
    let writer = std::thread::Builder::new()
        .name("checkpoint-writer".into())
        .spawn(move || {
            write_rank_file(&path, &host, rank, world, step)
                .with_context(|| format!("writing {}", path.display()))
        })?;
    Ok(PendingSave {
        started,
        step,
        root,
        partial,
        final_dir,
        keep_last: config.checkpoint.keep_last,
        manifest,
        writer,
        blocked_s: started.elapsed().as_secs_f64(),
        background,
    })
}

impl PendingSave {
    /// Whether this rank's file is written (then `finish` does not wait for the disk).
    pub fn is_written(&self) -> bool {
        self.writer.is_finished()
    }

    /// Waits for this rank's file, exchanges sizes and checksums (an all-gather, which is also
    /// the barrier after the data files), and on rank 0 writes the manifest, renames the folder
    /// and applies retention; a final barrier. Every rank must call it.
    pub fn finish(self, pg: &ProcessGroup, device: Device) -> Result<PathBuf> {
        let (rank, world) = (pg.rank(), pg.world_size());
        let written = self
            .writer
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the checkpoint writer thread panicked")));
        // (bytes or -1 on failure, sha256 as 4 x i64)
        let mut mine = vec![-1i64, 0, 0, 0, 0];
        if let Ok((bytes, digest)) = &written {
            mine[0] = *bytes as i64;
            for (i, c) in digest.chunks(8).enumerate() {
                mine[1 + i] = i64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        let input = Tensor::from_slice(&mine).to_device(device); // (5,)
        let all = Tensor::zeros([5 * world as i64], (Kind::Int64, device)); // (W*5,)
        pg.all_gather_into(&all, &input)?;
        let all: Vec<i64> = Vec::try_from(&all.to_device(Device::Cpu))?;
        written?;
        if let Some(r) = (0..world).find(|r| all[r * 5] < 0) {
            anyhow::bail!(
                "rank {r} could not write its file of checkpoint step {} (its error is above)",
                self.step
            );
        }
        let first_attempt = std::env::var("TORCHELASTIC_RESTART_COUNT").map_or(true, |c| c == "0");
        if first_attempt
            && std::env::var(CRASH_ENV)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                == Some(self.step)
        {
            tracing::warn!("{CRASH_ENV}={}: exiting before the manifest", self.step);
            std::process::exit(86);
        }
        if rank == 0 {
            let mut manifest = self.manifest.expect("rank 0 builds the manifest");
            manifest.files = (0..world)
                .map(|r| {
                    let row = &all[r * 5..r * 5 + 5];
                    let digest: Vec<u8> = row[1..].iter().flat_map(|v| v.to_le_bytes()).collect();
                    FileEntry {
                        file: rank_file_name(r, world),
                        bytes: row[0] as u64,
                        sha256: super::hex(&digest),
                    }
                })
                .collect();
            let (partial, final_dir, root) = (&self.partial, &self.final_dir, &self.root);
            let mpath = partial.join("manifest.json");
            let mut f = std::fs::File::create(&mpath)
                .with_context(|| format!("creating {}", mpath.display()))?;
            f.write_all(serde_json::to_string_pretty(&manifest)?.as_bytes())?;
            f.sync_all()?;
            drop(f);
            fsync_dir(partial)?;
            if final_dir.exists() {
                // the same step saved again (e.g. after resuming from it): replace it
                std::fs::remove_dir_all(final_dir)
                    .with_context(|| format!("replacing {}", final_dir.display()))?;
            }
            std::fs::rename(partial, final_dir).with_context(|| {
                format!("renaming {} to {}", partial.display(), final_dir.display())
            })?;
            fsync_dir(root)?;
            retain(root, self.keep_last)?;
            let total: u64 = manifest.files.iter().map(|f| f.bytes).sum();
            let how = if self.background {
                format!(
                    "in the background, {:.3} s blocking training",
                    self.blocked_s
                )
            } else {
                "synchronously".into()
            };
            tracing::info!(
                "checkpoint {} saved: {:.1} MB in {:.2} s ({how})",
                final_dir.display(),
                total as f64 / 1e6,
                self.started.elapsed().as_secs_f64(),
            );
        }
        pg.barrier()?;
        Ok(self.final_dir)
    }
}

/// Writes the safetensors file of this rank's ranges (`tensors` in file order); returns
/// (bytes, sha256).
fn write_rank_file(
    path: &Path,
    tensors: &[(String, Vec<f32>)],
    rank: usize,
    world: usize,
    step: u64,
) -> Result<(u64, Vec<u8>)> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": FORMAT, "version": VERSION.to_string(), "rank": rank.to_string(),
               "world_size": world.to_string(), "step": step.to_string()}),
    );
    let mut offset = 0usize;
    for (name, v) in tensors {
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": [v.len()], "data_offsets": [offset * 4, (offset + v.len()) * 4]}),
        );
        offset += v.len();
    }
    let mut head = serde_json::to_vec(&Value::Object(header))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let file = std::fs::File::create(path)?;
    let mut w = HashingWriter {
        inner: BufWriter::with_capacity(8 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    w.write_all(&(head.len() as u64).to_le_bytes())?;
    w.write_all(&head)?;
    let mut buf = Vec::with_capacity(4 << 20);
    for (_, v) in tensors {
        for chunk in v.chunks(1 << 20) {
            buf.clear();
            for x in chunk {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            w.write_all(&buf)?;
        }
    }
    let HashingWriter { inner, hash, bytes } = w;
    let file = inner.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok((bytes, hash.finalize().to_vec()))
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn build_manifest(
    config: &Config,
    states: &[super::FlatState],
    schedule: &LrSchedule,
    opt: &AdamW,
    p: &Progress,
    world: usize,
    files: Vec<FileEntry>,
) -> Manifest {
    let mut tensors = vec![];
    for s in states {
        let shards: Vec<ShardEntry> = (0..world)
            .map(|r| (r, s.range_of(r)))
            .filter(|(_, (a, b))| b > a)
            .map(|(r, (start, end))| ShardEntry {
                file: rank_file_name(r, world),
                start,
                end,
            })
            .collect();
        for state in STATES {
            tensors.push(TensorEntry {
                name: format!("{}/{state}", s.group),
                group: s.group.clone(),
                state: state.into(),
                dtype: "F32".into(),
                shape: vec![s.numel],
                params: s.params.clone(),
                shards: shards.clone(),
            });
        }
    }
    let id = identity(config);
    let t = &config.train;
    Manifest {
        format: FORMAT.into(),
        version: VERSION,
        step: p.step,
        optimizer_step: opt.step,
        epoch: p.epoch,
        data: DataPosition {
            epoch: p.data_epoch,
            batch: p.data_batch,
            global_batch: t.global_batch(world),
        },
        world_size: world,
        seed: t.seed,
        skipped_nonfinite: p.skipped_nonfinite,
        scheduler: json!({
            "base_lr": schedule.base_lr,
            "total_steps": schedule.total_steps,
            "schedule": serde_json::to_value(&schedule.schedule).unwrap_or(Value::Null),
        }),
        rng: "dropout is reseeded from train.seed and the step number each step; no other random state".into(),
        model_path: config.model.path.display().to_string(),
        config_hash: identity_hash(&id),
        config: id,
        peft: serde_json::to_value(&config.peft).unwrap_or(Value::Null),
        tensors,
        files,
    }
}

/// Deletes all but the newest `keep` complete checkpoints (0: keep all) and every `.partial`
/// folder (only called right after a successful save, when no other save is in flight).
fn retain(root: &Path, keep: usize) -> Result<()> {
    let (complete, partial) = list_dir(root)?;
    for p in partial {
        tracing::info!("removing incomplete checkpoint {}", p.display());
        std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
    }
    if keep > 0 && complete.len() > keep {
        for (_, p) in &complete[..complete.len() - keep] {
            std::fs::remove_dir_all(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    fsync_dir(root)?;
    Ok(())
}
