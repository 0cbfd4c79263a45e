//! Atomic sharded save, synchronous (`save`) or in the background (`begin`, then
//! `PendingSave::finish` later on the training thread). Every rank copies its state to host memory,
//! writes its file into `step-N.partial/` (on a writer thread) and fsyncs it; the ranks exchange (size, sha256) by an all-gather (which is also the barrier); rank 0 writes and
//! fsyncs `manifest.json`, renames the folder to `step-N`, fsyncs the parent, then applies
//! `keep_last` and removes leftover `.partial` folders; a final barrier makes the save complete
//! on every rank when `save` returns. A crash at any point leaves earlier checkpoints intact.
use std::io::Write;
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
/// whether training goes on before `finish`; when false the caller must not change the state
/// before `finish` returns (CPU fp32 state is then written from its own memory, without a copy).
pub fn begin(
    pg: &ProcessGroup,
    config: &Config,
    trainable: &Trainable,
    opt: &AdamW,
    schedule: &LrSchedule,
    progress: &Progress,
    background: bool,
) -> Result<PendingSave> {
    begin_states(
        pg,
        config,
        flat_states(trainable, opt),
        opt.step,
        schedule,
        progress,
        background,
    )
}

/// `begin` over this rank's flat states (`trainable` + optimizer moments, or synthetic ones in
/// `trainer bench checkpoint`); `optimizer_step`: AdamW's step count.
pub(crate) fn begin_states(
    pg: &ProcessGroup,
    config: &Config,
    states: Vec<super::FlatState>,
    optimizer_step: u64,
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
    // snapshot: (name, values) in file order. A synchronous save of CPU fp32 state writes from
    // the state's own memory (the caller waits in `finish` before touching it again); a background
    // save copies it first, since training goes on.
    let mut host: Vec<(String, Host)> = vec![];
    for s in states.iter().filter(|s| s.end > s.start) {
        let n = s.end - s.start;
        for (state, t) in STATES.iter().zip(&s.tensors) {
            let t = t.narrow(0, 0, n); // (n,)
            let data = if !background
                && t.device() == Device::Cpu
                && t.kind() == Kind::Float
                && t.is_contiguous()
            {
                Host::InPlace(t.detach())
            } else {
                let t = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
                Host::Copy(Vec::<f32>::try_from(&t)?)
            };
            host.push((format!("{}/{state}", s.group), data));
        }
    }
    tracing::debug!(
        "rank {rank}: state copied to host memory in {:.3} s",
        started.elapsed().as_secs_f64()
    );
    let manifest = (rank == 0).then(|| {
        build_manifest(
            config,
            &states,
            schedule,
            optimizer_step,
            progress,
            world,
            vec![],
        )
    });
    let path = partial.join(rank_file_name(rank, world));
    let step = progress.step;
    let writer = std::thread::Builder::new()
        .name("checkpoint-writer".into())
        .spawn(move || {
            let t = Instant::now();
            let r = write_rank_file(&path, &host, rank, world, step)
                .with_context(|| format!("writing {}", path.display()));
            tracing::debug!(
                "rank {rank}: checkpoint file written in {:.3} s",
                t.elapsed().as_secs_f64()
            );
            r
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
            let publish = Instant::now();
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
            let published = Instant::now();
            retain(root, self.keep_last)?;
            tracing::debug!(
                "checkpoint step {}: manifest + rename {:.3} s, retention {:.3} s",
                self.step,
                (published - publish).as_secs_f64(),
                published.elapsed().as_secs_f64()
            );
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
    tensors: &[(String, Host)],
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
    let len = (head.len() as u64).to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![&len, &head];
    parts.extend(tensors.iter().map(|(_, v)| v.bytes()));
    let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
    let mut file = std::fs::File::create(path)?;
    // The sha256 runs on a second thread over the same memory while this one writes: the
    // checksum costs max(hash, write) instead of their sum. The data is written straight from the
    // snapshot (no staging buffer), then fsynced once, as `dd conv=fdatasync` does.
    let digest = std::thread::scope(|s| -> Result<Vec<u8>> {
        let hasher = s.spawn(|| {
            let mut h = Sha256::new();
            for p in &parts {
                h.update(p);
            }
            h.finalize().to_vec()
        });
        let written = parts
            .iter()
            .try_for_each(|p| file.write_all(p))
            .and_then(|()| file.sync_all());
        let digest = hasher
            .join()
            .map_err(|_| anyhow::anyhow!("the checksum thread panicked"))?;
        written?;
        Ok(digest)
    })?;
    Ok((bytes, digest))
}

/// One state tensor's values for the writer thread.
enum Host {
    /// A copy in host memory (background saves, GPU state).
    Copy(Vec<f32>),
    /// The state itself: a contiguous CPU fp32 tensor nobody changes until `finish` returns.
    InPlace(Tensor),
}

impl Host {
    fn bytes(&self) -> &[u8] {
        match self {
            Host::Copy(v) => f32_bytes(v),
            // SAFETY: a contiguous CPU fp32 tensor of numel() elements starts at data_ptr() (the
            // narrowed view's offset included) and is kept alive by `self`; nothing writes to it
            // while a synchronous save is in progress (see `begin_states`).
            Host::InPlace(t) => unsafe {
                std::slice::from_raw_parts(t.data_ptr() as *const u8, t.numel() * 4)
            },
        }
    }

    fn len(&self) -> usize {
        self.bytes().len() / 4
    }
}

/// The little-endian bytes of `v` (safetensors' byte order) without a copy.
fn f32_bytes(v: &[f32]) -> &[u8] {
    #[cfg(not(target_endian = "little"))]
    compile_error!("checkpoint files are little-endian: add a byte-swapping path for this target");
    // SAFETY: f32 has no padding or invalid bit patterns as bytes; the slice covers exactly `v`'s
    // memory and borrows it for the same lifetime.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

fn build_manifest(
    config: &Config,
    states: &[super::FlatState],
    schedule: &LrSchedule,
    optimizer_step: u64,
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
        optimizer_step,
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
    // No fsync of `root` here: a removal lost in a crash only leaves an older checkpoint behind
    // (removed by the next save), and on a busy disk that fsync took ~1 s of training time.
    Ok(())
}
