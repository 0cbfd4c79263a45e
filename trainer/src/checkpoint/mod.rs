//! Sharded checkpoints (DESIGN.md decision 6, issue 8; the format is docs/checkpoint-format.md).
//! Module index:
//! - `manifest`: the `manifest.json` schema (format version, progress, config identity, tensor ranges, checksums)
//! - `save`:     atomic save (`step-N.partial/` -> fsync -> barrier -> manifest -> rename), in
//!   the background or not; retention on a background thread
//! - `export`:   `trainer export --format peft`: a PEFT adapter folder from a checkpoint (tensor by tensor)
//! - `merged`:   `trainer export --format merged`: a full HF model folder (LoRA merged), streamed, sharded
//! - `load`:     finding the newest complete checkpoint, integrity checks, resharded loading (mmap ranges)
//! - `validation`: a checkpoint's validation record and the run's best validation loss
//! - this file:  the state a rank saves ([`FlatState`]), config identity, small file helpers
//!
//! A checkpoint holds the trainable fp32 master weights and the AdamW moments, each as one flat
//! 1-D tensor per trainable flat group (FSDP: `<unit>/<group>`; `fsdp.enabled: false`: one per
//! parameter), split over `rank-<r>-of-<W>.safetensors` files by element range. Frozen base
//! weights are not copied: they come from `model.path`, whose config.json hash is recorded.
//! Loading maps every parameter by name and offset, so any world size (or the plain trainer)
//! reads a checkpoint of any other.
pub mod export;
pub mod fingerprint;
pub mod load;
pub mod manifest;
pub mod merged;
pub mod prompt;
mod reader;
mod retention;
pub mod save;
pub mod validation;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::config::Config;
use crate::fsdp::Trainable;
use crate::model::adapter_config::is_set;
use crate::optim::AdamW;

pub use export::{export_peft, replace_adapter, AdapterNaming};
pub use load::{
    check_resume_folder, check_resume_setting, read_full, resume, resumed_template_clock, Resumed,
};
pub use manifest::{Manifest, FORMAT, VERSION};
pub use merged::{export_merged, parse_size, MergeSource, MergedSummary};
pub use prompt::{PromptSettings, PROMPT_FILE};
pub(crate) use retention::set_aside_later;
pub use save::Checkpointer;

/// Where the training loop stands (what a checkpoint restores besides tensors).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: u64,
    /// The epoch the loop is in.
    pub epoch: u64,
    /// Epoch whose shuffle the data continues with.
    pub data_epoch: u64,
    /// Next global batch index within `data_epoch`.
    pub data_batch: u64,
    pub skipped_nonfinite: u64,
    /// The loss of step `step` as metrics.jsonl has it (`Manifest::loss`).
    pub loss: Option<f64>,
    /// Training samples in the epoch plan (`DataPosition::samples`).
    pub samples: Option<u64>,
    /// `lengths_hash` of their token lengths (`DataPosition::lengths_hash`).
    pub lengths_hash: Option<u64>,
    /// The lowest validation loss of the run so far (`Manifest::best_eval`).
    pub best_eval: Option<validation::EvalResult>,
}

/// What a run's epoch plan (which samples make up global batch k of epoch e) depends on besides
/// the seed and the global batch: the training samples and their token lengths (the sampler
/// sorts by length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataPlan {
    pub samples: u64,
    pub lengths_hash: u64,
}

impl DataPlan {
    pub fn new(lengths: &[usize]) -> Self {
        Self {
            samples: lengths.len() as u64,
            lengths_hash: lengths_hash(lengths),
        }
    }
}

/// The first 8 bytes (big-endian) of the sha256 over the token lengths, 4 bytes little-endian
/// each.
pub fn lengths_hash(lengths: &[usize]) -> u64 {
    let bytes: Vec<u8> = lengths
        .iter()
        .flat_map(|&n| (n.min(u32::MAX as usize) as u32).to_le_bytes())
        .collect();
    let d = Sha256::digest(&bytes);
    u64::from_be_bytes(d[..8].try_into().unwrap_or_default())
}

/// The folder name of step `step`'s checkpoint.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The checkpoint folder `p` is or is inside, as a real path (symlinks and `..` resolved as far
/// as the path exists): `p` itself when it holds a manifest.json, else the nearest folder above
/// it named `step-...` that holds one (a folder of another name above, with a manifest.json of
/// someone else's, is not one). Whatever is put there goes when retention removes that
/// checkpoint.
pub fn enclosing_checkpoint(p: &Path) -> Option<PathBuf> {
    let p = real_path(p)?;
    if p.join("manifest.json").is_file() {
        return Some(p);
    }
    let step_folder = |a: &Path| {
        a.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
    };
    (p.ancestors().skip(1))
        .find(|a| step_folder(a) && a.join("manifest.json").is_file())
        .map(Path::to_path_buf)
}

/// `p` made absolute with its longest existing part canonicalized (the rest, not there yet, as
/// written).
fn real_path(p: &Path) -> Option<PathBuf> {
    let p = std::path::absolute(p).ok()?;
    let existing = p.ancestors().find(|a| a.exists())?;
    let real = existing.canonicalize().ok()?;
    // (joining an empty rest would add a trailing `/`)
    match p.strip_prefix(existing).ok()? {
        rest if rest.as_os_str().is_empty() => Some(real),
        rest => Some(real.join(rest)),
    }
}

/// The file rank `rank` of `world` writes.
pub fn rank_file_name(rank: usize, world: usize) -> String {
    format!("rank-{rank}-of-{world}.safetensors")
}

/// One trainable flat tensor and this rank's part of it.
pub(crate) struct FlatState {
    /// `<unit>/<group index>` (FSDP) or the parameter name (plain).
    pub group: String,
    /// Unpadded element count.
    pub numel: i64,
    /// Elements per shard (the padded buffer is `shard_world x shard_len`).
    pub shard_len: i64,
    /// The shards the tensor is cut into (the world size; 1 replicated, G under hybrid_shard)
    /// and the ranks holding each (1; W replicated, W / G under hybrid_shard): rank q * G + g
    /// holds shard g and writes piece q of it (see `range_of`).
    pub shard_world: usize,
    pub replicas: usize,
    pub params: Vec<manifest::ParamEntry>,
    /// This rank's element range [start, end) of the unpadded flat tensor.
    pub start: i64,
    pub end: i64,
    /// master, exp_avg, exp_avg_sq: local tensors whose first `end - start` elements are the range.
    pub tensors: [Tensor; 3],
    /// AdamW's step count of each of `params` (`AdamW::steps`); None: the global one.
    pub optimizer_steps: Option<Vec<u64>>,
}

impl FlatState {
    /// The range rank `r` writes: of the shard it holds (g = r mod G), the piece q = r div G
    /// of `replicas` equal pieces (the shard whole without replicas), so that the ranks holding
    /// the same shard each write a part of it and together the whole.
    pub fn range_of(&self, r: usize) -> (i64, i64) {
        let (g, q) = (r % self.shard_world, r / self.shard_world);
        let lo = self.shard_len * g as i64;
        let hi = lo + self.shard_len;
        let piece = (self.shard_len + self.replicas as i64 - 1) / self.replicas as i64;
        let s = (lo + piece * q as i64).min(hi);
        let e = (s + piece).min(hi);
        (s.min(self.numel), e.min(self.numel))
    }

    /// The range of the shard rank `r` holds.
    fn held_by(&self, r: usize) -> (i64, i64) {
        let lo = self.shard_len * (r % self.shard_world) as i64;
        (lo.min(self.numel), (lo + self.shard_len).min(self.numel))
    }
}

/// Which part of its shard a rank's flat states cover, where other ranks hold the same shard
/// (`no_shard`: every rank holds every group whole; `hybrid_shard`: the shard groups hold copies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StatesFor {
    /// The rank's piece of its shard (`FlatState::range_of`). Under no_shard that is range r of
    /// the layout full_shard would have at world W, so the checkpoint is the same whatever the
    /// strategy, and every rank writes its part.
    Save,
    /// The whole shard the rank holds.
    Load,
}

/// This rank's trainable state, in `master_params()` order (= `AdamW::moments` order).
pub(crate) fn flat_states(
    trainable: &Trainable,
    opt: &AdamW,
    purpose: StatesFor,
) -> Vec<FlatState> {
    let mut out = vec![];
    // per state, where its range starts in the local tensors (non-zero for a replicated group's
    // save range)
    let mut local_starts = vec![];
    match trainable {
        Trainable::Fsdp(m) => {
            for u in &m.units {
                for (gi, g) in u.groups.iter().enumerate().filter(|(_, g)| g.trainable) {
                    let params = g
                        .params
                        .iter()
                        .map(|p| manifest::ParamEntry {
                            name: p.name.clone(),
                            shape: p.shape.clone(),
                            offset: p.offset,
                        })
                        .collect();
                    let mut f = FlatState {
                        group: format!("{}/{gi}", u.name),
                        numel: g.numel,
                        shard_len: g.shard_len,
                        shard_world: m.shard_world,
                        replicas: m.world / m.shard_world,
                        params,
                        start: 0,
                        end: 0,
                        tensors: [g.shard.shallow_clone(), Tensor::new(), Tensor::new()],
                        optimizer_steps: None,
                    };
                    let held = f.held_by(m.rank);
                    (f.start, f.end) = match purpose {
                        StatesFor::Save => f.range_of(m.rank),
                        StatesFor::Load => held,
                    };
                    local_starts.push(f.start - held.0);
                    out.push(f);
                }
            }
        }
        Trainable::Plain(m) => {
            for ((name, p), master) in m.params.iter().zip(m.master_params()) {
                let numel = p.numel() as i64;
                out.push(FlatState {
                    group: name.clone(),
                    numel,
                    shard_len: numel,
                    shard_world: 1,
                    replicas: 1,
                    params: vec![manifest::ParamEntry {
                        name: name.clone(),
                        shape: p.size(),
                        offset: 0,
                    }],
                    start: 0,
                    end: numel,
                    tensors: [master.view([-1]), Tensor::new(), Tensor::new()],
                    optimizer_steps: None,
                });
                local_starts.push(0);
            }
        }
    }
    assert_eq!(
        out.len(),
        opt.moments.len(),
        "checkpoint: one (m, v) pair per trainable flat tensor"
    );
    let from = |t: &Tensor, at: i64| t.narrow(0, at, t.size()[0] - at);
    for (((f, (m, v)), steps), &at) in (out.iter_mut().zip(&opt.moments))
        .zip(&opt.steps)
        .zip(&local_starts)
    {
        f.tensors = [
            from(&f.tensors[0], at),
            from(&m.view([-1]), at),
            from(&v.view([-1]), at),
        ];
        assert_eq!(
            steps.len(),
            f.params.len(),
            "checkpoint: one step count per parameter"
        );
        f.optimizer_steps = Some(steps.clone());
    }
    out
}

/// Keys of a model's config.json that say how or when it was saved, not what the model is: a
/// re-save changes them (`transformers_version`, the `torch_dtype` -> `dtype` rename).
const SAVE_KEYS: [&str; 4] = [
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
];

/// Whether config.json's `bytes` describe the model `recorded` (a manifest's `model_config`)
/// does: the same JSON content but for `SAVE_KEYS` at any depth.
pub fn same_model_config(recorded: &Value, bytes: &[u8]) -> bool {
    !recorded.is_null()
        && model_config_content(bytes).is_some_and(|c| c == without_save_keys(recorded))
}

/// What config.json's `bytes` say the model is: their JSON without `SAVE_KEYS` at any depth (None
/// when they are not JSON).
pub fn model_config_content(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes)
        .ok()
        .map(|v: Value| without_save_keys(&v))
}

fn without_save_keys(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| !SAVE_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), without_save_keys(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Checks that `model_dir` is the base checkpoint `m` was trained on (for `infer`, `eval` and
/// `export` with `--model`): its config.json has the bytes the run read (the sha256 the manifest
/// records), or the same content (`same_model_config`: a copy re-indented or re-saved), and its
/// tensors are the run's base's (`check_base_tensors`). The error says what differs and where the
/// run's base was.
pub fn check_base(m: &manifest::Manifest, model_dir: &Path) -> anyhow::Result<()> {
    check_base_config(m, model_dir)?;
    check_base_tensors(m, model_dir)
        .map_err(|e| anyhow::anyhow!("{e}; pass the right folder with --model DIR"))
}

/// Whether `model_dir`'s tensors are those of the base the checkpoint `m` was trained on, by
/// samples of every tensor (`fingerprint::sampled_tensors`; the same weights in other shard
/// files pass). Ok when `m` recorded none (an older trainer's checkpoint). The error names the
/// folder and says what differs, for the caller to add the way on.
pub fn check_base_tensors(m: &manifest::Manifest, model_dir: &Path) -> Result<(), String> {
    if m.model_tensors_sampled.is_empty() {
        return Ok(());
    }
    let found = fingerprint::base_tensors(model_dir)
        .map_err(|e| format!("the tensors of {} cannot be read: {e}", model_dir.display()))?;
    if found == m.model_tensors_sampled {
        return Ok(());
    }
    Err(format!(
        "{} is not the model this checkpoint was trained on: its config.json describes the same \
         model as the run's base ({}), but samples of its tensors differ from those the run read \
         (another checkpoint of this architecture, or a merged export of this run?)",
        model_dir.display(),
        m.model_path
    ))
}

/// `check_base`'s config.json part.
fn check_base_config(m: &manifest::Manifest, model_dir: &Path) -> anyhow::Result<()> {
    let path = model_dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| {
        anyhow::anyhow!(
            "base model config {} cannot be read ({e}); the checkpoint was trained on model.path \
             {:?}: pass that folder with --model DIR",
            path.display(),
            m.model_path
        )
    })?;
    let recorded = m.config.get("model.config_sha256").and_then(Value::as_str);
    let found = sha256_hex(&bytes);
    match recorded {
        Some(r) if r != found => {
            if same_model_config(&m.model_config, &bytes) {
                tracing::info!(
                    "{}: other bytes than the run's base config.json (sha256 {found}, recorded \
                     {r}), the same model (only formatting or save-time keys differ)",
                    path.display()
                );
                return Ok(());
            }
            anyhow::bail!(
                "{} is not the model this checkpoint was trained on: its sha256 is {found}, the \
                 manifest records {r}{} (model.path {:?}); pass the right folder with --model DIR",
                path.display(),
                match m.model_config.is_null() {
                    true => "",
                    false => ", and its content differs too",
                },
                m.model_path
            )
        }
        _ => Ok(()),
    }
}

/// The model/LoRA settings a checkpoint's state depends on, by config key: a resume with other
/// values is refused (the tensors would not fit, or would mean something else).
pub fn identity(config: &Config) -> BTreeMap<String, Value> {
    let model_cfg = config.model.path.join("config.json");
    let model_hash = match std::fs::read(&model_cfg) {
        Ok(bytes) => sha256_hex(&bytes),
        Err(_) => "unreadable".into(),
    };
    let p = &config.peft;
    let mut m = BTreeMap::new();
    m.insert("model.config_sha256".into(), json!(model_hash));
    m.insert("model.dtype".into(), json!(config.model.dtype));
    m.insert("peft.method".into(), json!(p.method));
    if p.is_lora() {
        m.insert("peft.r".into(), json!(p.r));
        m.insert("peft.alpha".into(), json!(p.alpha));
        let key = "peft.target_modules";
        m.insert(key.into(), identity_value(key, json!(p.target_modules)));
    }
    // (only when set: identities of checkpoints from before the options stay as they were)
    if p.freeze_llm_only {
        m.insert("peft.freeze_llm_only".into(), json!(true));
    }
    if p.is_lora() && p.use_rslora {
        m.insert("peft.use_rslora".into(), json!(true));
    }
    if p.is_lora() && p.use_dora {
        m.insert("peft.use_dora".into(), json!(true));
    }
    // the per-layer options, only when set (identities of checkpoints from before them stay)
    if let (true, Ok(Value::Object(section))) = (p.is_lora(), serde_json::to_value(p)) {
        for key in [
            "rank_pattern",
            "alpha_pattern",
            "exclude_modules",
            "layers_to_transform",
            "layers_pattern",
            "modules_to_save",
        ] {
            if let Some(v) = section.get(key).filter(|v| is_set(Some(v))) {
                let key = format!("peft.{key}");
                let v = identity_value(&key, v.clone());
                m.insert(key, v);
            }
        }
    }
    m
}

/// An identity value as compared: `peft.target_modules` (and the other lists of modules or
/// layers) sorted and without repeats (the same
/// modules in another order wrap the same layers with the same parameters; `[v_proj, q_proj]`
/// resumes a `[q_proj, v_proj]` checkpoint, also one saved before the list was sorted).
pub(crate) fn identity_value(key: &str, v: Value) -> Value {
    match (key, v) {
        (
            "peft.target_modules"
            | "peft.exclude_modules"
            | "peft.layers_to_transform"
            | "peft.layers_pattern"
            | "peft.modules_to_save",
            Value::Array(mut list),
        ) => {
            list.sort_by_key(|m| m.to_string());
            list.dedup();
            Value::Array(list)
        }
        (_, v) => v,
    }
}

/// sha256 of the identity's canonical JSON (keys sorted).
pub fn identity_hash(id: &BTreeMap<String, Value>) -> String {
    sha256_hex(serde_json::to_string(id).expect("json").as_bytes())
}

/// The files an export created, removed again unless it finished (`done`): a failed export (disk
/// full, a bad tensor) leaves neither a folder that looks complete nor one that a retry refuses
/// as holding weights.
#[derive(Default)]
pub(crate) struct Created {
    pub paths: Vec<PathBuf>,
    pub done: bool,
}

impl Drop for Created {
    fn drop(&mut self) {
        if !self.done {
            for p in &self.paths {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Renames an export's `staged` files, (staging path, final path) in `out`, into place in order,
/// the final names recorded first in `out/list`: an export killed among the renames leaves the
/// list, and [`clear_killed_export`] (the next export into the folder, under its lock) removes
/// what it names, so a half-renamed export neither stays nor makes every retry refused.
pub(crate) fn rename_into_place(
    out: &Path,
    list: &str,
    staged: &[(PathBuf, PathBuf)],
) -> anyhow::Result<()> {
    use anyhow::Context;
    let list = out.join(list);
    let names: Vec<String> = staged
        .iter()
        .filter_map(|(_, fin)| fin.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    write_synced(&list, serde_json::Value::from(names).to_string().as_bytes())?;
    fsync_dir(out)?;
    for (tmp, fin) in staged {
        std::fs::rename(tmp, fin)
            .with_context(|| format!("renaming {} to {}", tmp.display(), fin.display()))?;
    }
    fsync_dir(out)?;
    std::fs::remove_file(&list).with_context(|| format!("removing {}", list.display()))?;
    Ok(fsync_dir(out)?)
}

/// The files a killed export had renamed into `out` (named by its `out/list`, see
/// [`rename_into_place`]) removed, then the list; the caller holds the folder's lock.
pub(crate) fn clear_killed_export(out: &Path, list: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    let list = out.join(list);
    let Ok(text) = std::fs::read_to_string(&list) else {
        return Ok(());
    };
    let names: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
    for name in names
        .iter()
        .filter(|n| !n.contains('/') && *n != "." && *n != "..")
    {
        match std::fs::remove_file(out.join(name)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", out.join(name).display()))
            }
            _ => {}
        }
    }
    std::fs::remove_file(&list).with_context(|| format!("removing {}", list.display()))
}

/// A writer's claim on a folder (`trainer export --out`, `train.output_dir`'s adapter):
/// `.llava-sco-export.lock` in it, held with `flock` (the kernel releases it when the process dies,
/// so a killed export leaves nothing to judge stale) and holding `host pid` for the message.
/// Two exports into one folder would pass the "folder holds no weights" check together and then
/// truncate each other's files; the second is refused. The file is removed while still locked.
pub(crate) struct ExportLock {
    path: PathBuf,
    // (the flock lives as long as this descriptor)
    _file: std::fs::File,
    /// False where the filesystem has no flock and the folder is not locked.
    pub held: bool,
    /// The folder, when taking the lock created it: removed again if it is still empty when
    /// the lock goes (a refused or failed export leaves no empty `--out` behind).
    created: Option<PathBuf>,
}

impl ExportLock {
    pub const NAME: &'static str = ".llava-sco-export.lock";

    /// Creates `dir` if needed and takes its lock.
    pub fn acquire(dir: &Path) -> anyhow::Result<Self> {
        Self::acquire_named(
            dir,
            Self::NAME,
            "is being written by another export or eval",
            "wait for it to finish",
        )
    }

    /// Creates `dir` if needed and takes the lock file `name` in it; when another process holds
    /// it, the error reads "DIR {busy} (LOCK: host pid); {fix}".
    pub fn acquire_named(dir: &Path, name: &str, busy: &str, fix: &str) -> anyhow::Result<Self> {
        use anyhow::Context;
        use std::io::{Seek, Write};
        use std::os::unix::fs::MetadataExt;
        if dir.exists() && !dir.is_dir() {
            anyhow::bail!(
                "{} is a file, not a folder; give a new or empty folder",
                dir.display()
            );
        }
        // (not checkpoint.dir and train.output_dir: the config check refuses those first)
        let export = name == Self::NAME;
        if let Some(ckpt) = export.then(|| enclosing_checkpoint(dir)).flatten() {
            anyhow::bail!(
                "{} is inside checkpoint {}: what is written there goes when checkpoint \
                 retention removes that checkpoint (checkpoint.keep_last); give a folder outside \
                 it",
                dir.display(),
                ckpt.display()
            );
        }
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        let path = dir.join(name);
        loop {
            // (again on a retry: a holder that failed may have removed the folder it made)
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))?;
            use launcher::flock::Flock;
            match launcher::flock::try_exclusive(&file)
                .with_context(|| format!("locking {}", path.display()))?
            {
                Flock::Held => {}
                Flock::Busy => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    anyhow::bail!(
                        "{} {busy} ({}: {}); {fix}",
                        dir.display(),
                        path.display(),
                        holder.trim()
                    );
                }
                // go on unlocked, as before locks
                Flock::Unsupported(e) => {
                    tracing::warn!(
                        "{}: flock is not supported here ({e}); writing without the lock (two writers into this folder at once would clash)",
                        path.display()
                    );
                    return Ok(Self {
                        path,
                        _file: file,
                        held: false,
                        created,
                    });
                }
            }
            // the holder before us may have removed the file after we opened it: then our lock
            // is on a file nobody else will find; open the one at the path again
            let same = std::fs::metadata(&path).is_ok_and(|m| {
                file.metadata()
                    .is_ok_and(|f| f.ino() == m.ino() && f.dev() == m.dev())
            });
            if !same {
                continue;
            }
            let me = format!(
                "{} {}\n",
                launcher::supervise::hostname(),
                std::process::id()
            );
            file.set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(me.as_bytes()))
                .with_context(|| format!("writing {}", path.display()))?;
            return Ok(Self {
                path,
                _file: file,
                held: true,
                created,
            });
        }
    }
}

impl Drop for ExportLock {
    fn drop(&mut self) {
        // removed before the descriptor (and with it the lock) goes: a waiter that opened this
        // file finds it gone and opens a new one
        let _ = std::fs::remove_file(&self.path);
        // (remove_dir removes only an empty folder)
        if let Some(dir) = &self.created {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// `dir` as an absolute path with its symlinks resolved: those of its deepest folder that exists
/// (a folder not there yet, e.g. an output_dir removed since, is written under its real parent,
/// as it would be once made).
fn absolute(dir: &Path) -> PathBuf {
    let full = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Ok(real) = std::fs::canonicalize(&full) {
        return real;
    }
    // (not there: its `..` taken by their text, `missing/..` having no folder to resolve)
    let full: PathBuf = full.components().fold(PathBuf::new(), |mut p, c| {
        match c {
            std::path::Component::ParentDir => {
                p.pop();
            }
            std::path::Component::CurDir => {}
            c => p.push(c),
        }
        p
    });
    let mut missing = vec![];
    let mut at = full.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(at) {
            return missing.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (at.parent(), at.file_name()) {
            (Some(parent), Some(name)) => {
                missing.push(name.to_os_string());
                at = parent;
            }
            _ => return full,
        }
    }
}

/// `path` as a path from `base` (both absolute): `..` for each of base's components past their
/// common start, then the rest of `path`.
fn path_from(base: &Path, path: &Path) -> PathBuf {
    let (b, p): (Vec<_>, Vec<_>) = (base.components().collect(), path.components().collect());
    let common = b.iter().zip(&p).take_while(|(x, y)| x == y).count();
    let mut out: PathBuf = b[common..].iter().map(|_| "..").collect();
    out.extend(&p[common..]);
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// `train.output_dir` as a path from `checkpoint.dir`, as manifests record it
/// (`Manifest::output_dir_from_checkpoint_dir`).
pub(crate) fn output_dir_from_checkpoint_dir(config: &Config) -> String {
    let ckpt = absolute(&config.checkpoint.dir);
    path_from(&ckpt, &absolute(&config.train.output_dir))
        .display()
        .to_string()
}

/// `local` on this rank, made an error on every rank when it is one on any rank (the others get
/// `elsewhere`, what failed, as a [`crate::dist::FailedElsewhere`] naming the failed rank, the
/// highest one when several failed): a rank that failed alone would leave the others waiting in
/// their next collective until the timeout, reporting a dead peer.
pub(crate) fn agree<T>(
    pg: &crate::dist::ProcessGroup,
    device: tch::Device,
    local: anyhow::Result<T>,
    elsewhere: impl FnOnce() -> String,
) -> anyhow::Result<T> {
    // (rank + 1 where this rank failed, else 0)
    let mark = match local.is_err() {
        true => pg.rank() as i64 + 1,
        false => 0,
    };
    let flag = Tensor::from_slice(&[mark]).to_device(device);
    pg.all_reduce(&flag, crate::dist::ReduceOp::Max)?;
    let value = local?;
    match flag.to_device(tch::Device::Cpu).int64_value(&[0]) {
        0 => Ok(value),
        failed => Err(crate::dist::FailedElsewhere {
            what: elsewhere(),
            rank: Some(failed as usize - 1),
        }
        .into()),
    }
}

/// Whose checkpoint a step folder is, by its manifest's `lineage` ([`run_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunOf {
    /// This training run's.
    Ours,
    /// Another run's: its lineage, or "unmarked" (an older trainer's, not resumed from).
    Other(String),
    /// Its manifest cannot be read (or its lineage is not text).
    Unknown,
}

/// Whose checkpoint `dir` is for a run of `lineage`: one with that lineage is this run's, one
/// without any (an older trainer's) only when `claim_unmarked` (this run resumed from such a one).
/// Retention, the same-step save and the adapter for train.output_dir all go by this one rule.
pub(crate) fn run_of(dir: &Path, lineage: Option<&str>, claim_unmarked: bool) -> RunOf {
    match manifest_field(dir, "lineage") {
        Ok(Value::String(l)) if Some(l.as_str()) == lineage => RunOf::Ours,
        Ok(Value::String(l)) => RunOf::Other(l),
        Ok(Value::Null) if claim_unmarked => RunOf::Ours,
        Ok(Value::Null) => RunOf::Other("unmarked".into()),
        _ => RunOf::Unknown,
    }
}

/// One top-level field of `dir`'s manifest.json (null when absent), without the checks of
/// `load::read_manifest`: for telling checkpoints apart (`launch_id`, `lineage`), not for loading.
pub(crate) fn manifest_field(dir: &Path, key: &str) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(dir.join("manifest.json"))?;
    let v: Value = serde_json::from_str(&text)?;
    Ok(v.get(key).cloned().unwrap_or(Value::Null))
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// sha256 of the file at `path`, if it reads (the model's files' fingerprints, a question's image).
pub fn file_sha256(path: &Path) -> Option<String> {
    Some(sha256_hex(&std::fs::read(path).ok()?))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `v`'s memory as bytes (checkpoint files hold little-endian f32; save.rs refuses to build for
/// big-endian targets).
pub(crate) fn f32_bytes_mut(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32 and u8 has no alignment requirement; the slice
    // covers exactly `v`'s memory and borrows it mutably for the same lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Creates `path` with `bytes` and fsyncs it.
pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// One tensor for [`safetensors_bytes`]: name, dtype, shape, data (little-endian).
pub(crate) type RawTensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// A safetensors file's bytes, `meta` as its `__metadata__`.
pub(crate) fn safetensors_bytes(
    tensors: &[RawTensor],
    meta: std::collections::HashMap<String, String>,
) -> anyhow::Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| anyhow::anyhow!("tensor {name}: {e:?}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::tensor::serialize(views, &Some(meta)).map_err(|e| anyhow::anyhow!("{e:?}"))
}

/// Replaces `path` with `bytes` whole: written and fsynced under a temporary name beside it, then
/// renamed over it and the folder fsynced (a reader or a crash sees the old file or the new one).
pub fn replace_synced(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.tmp", name.unwrap_or_default()));
    let dir = path.parent().unwrap_or(Path::new("."));
    // (named as the file's folder, not as the temporary file's creation failing)
    if !dir.as_os_str().is_empty() && !dir.is_dir() {
        anyhow::bail!(
            "writing {}: the folder {} does not exist (create it first, or give a path in an existing folder)",
            path.display(),
            dir.display()
        );
    }
    // (before the temporary file is written: the rename would fail and leave it behind)
    if path.is_dir() {
        anyhow::bail!(
            "{} is a folder: give a file path (a file in it, say)",
            path.display()
        );
    }
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir).with_context(|| format!("syncing {}", dir.display()))
}

/// Copies `src` to `dst` and fsyncs the copy.
pub(crate) fn copy_synced(src: &Path, dst: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    sync_file(dst)
}

/// fsyncs the file at `path` (written by someone else, e.g. libtorch).
pub(crate) fn sync_file(path: &Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", path.display()))
}

/// fsync of a folder (its entries: a rename into it is durable after this). A filesystem that
/// cannot sync folders at all (EINVAL or EOPNOTSUPP, as some FUSE and SMB mounts answer) gets one
/// warning and no error, or every save would fail there; other errors name the folder.
pub(crate) fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    // (the parent of a bare file name, `--out sco.jsonl`, is the empty path: the working folder)
    let dir = match dir.as_os_str().is_empty() {
        true => Path::new("."),
        false => dir,
    };
    match std::fs::File::open(dir).and_then(|f| f.sync_all()) {
        Err(e) if [libc::EINVAL, libc::EOPNOTSUPP].contains(&e.raw_os_error().unwrap_or(0)) => {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    "{}: this filesystem cannot sync folders ({e}); checkpoints are published without that guarantee (a power loss right after a save may lose it)",
                    dir.display()
                )
            });
            Ok(())
        }
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("syncing folder {}: {e}", dir.display()),
        )),
        Ok(()) => Ok(()),
    }
}

/// Complete checkpoints (`step-<8 digits>/` with a manifest) in `dir`, oldest first; and the
/// leftover `.partial` folders.
/// (complete `(step, folder)` oldest first, `.partial` folders).
pub(crate) type Listing = (Vec<(u64, PathBuf)>, Vec<PathBuf>);

pub(crate) fn list_dir(dir: &Path) -> std::io::Result<Listing> {
    let (mut complete, mut partial) = (vec![], vec![]);
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((complete, partial)),
        Err(e) => return Err(e),
    };
    let entries: Vec<std::fs::DirEntry> = entries.collect::<Result<_, _>>()?;
    let names: std::collections::HashSet<String> = entries
        .iter()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("step-") else {
            continue;
        };
        // a step folder moved aside to be replaced (`save::replace_dir` where the filesystem
        // cannot exchange two folders) whose replacement never arrived (a crash between the two
        // renames): it is still that step's complete checkpoint
        let aside_step = rest
            .strip_suffix(".replaced.partial")
            .filter(|s| s.len() >= 8 && s.bytes().all(|b| b.is_ascii_digit()))
            .filter(|s| !names.contains(&format!("step-{s}")))
            .filter(|_| e.path().join("manifest.json").is_file())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = aside_step {
            complete.push((step, e.path()));
        } else if rest.ends_with(".partial") {
            partial.push(e.path());
        } else if rest.len() >= 8 && rest.bytes().all(|b| b.is_ascii_digit()) {
            // the manifest is written before the folder gets its final name, and retention
            // renames a folder to a `.partial` name before deleting it: a step folder without a
            // manifest was damaged by something else (a hand edit, a copy cut short). It is not
            // a checkpoint to resume from, nor ours to delete: left alone, said once. So is one
            // whose manifest cannot be looked at now (EIO, a stale NFS handle).
            let manifest = e.path().join("manifest.json");
            let problem = match std::fs::metadata(&manifest) {
                Ok(m) if m.is_file() => None,
                Ok(_) => Some("is not a file".to_string()),
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    Some("is missing".to_string())
                }
                Err(err) => Some(err.to_string()),
            };
            if let Some(problem) = problem {
                warn_once_left_alone(&e.path(), &manifest, &problem);
                continue;
            }
            if let Ok(step) = rest.parse::<u64>() {
                complete.push((step, e.path()));
            }
        }
    }
    complete.sort();
    partial.sort();
    Ok((complete, partial))
}

/// Says once per process that the step folder `dir` is neither resumed from nor removed.
fn warn_once_left_alone(dir: &Path, manifest: &Path, problem: &str) {
    static SAID: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    if !said.iter().any(|p| p == dir) {
        said.push(dir.to_path_buf());
        tracing::warn!(
            "{} {problem}: {} is not a complete checkpoint; training does not continue from \
             it, and retention does not remove it (move it away, or delete it if it is of no \
             use)",
            manifest.display(),
            dir.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder that is not there is resolved through its real parent (a symlink on its path
    /// resolved as for the folder that exists).
    #[test]
    fn a_missing_folder_is_resolved_through_its_real_parent() {
        let root = std::env::temp_dir().join(format!("abs-test-{}", std::process::id()));
        let real = root.join("real");
        std::fs::create_dir_all(&real).unwrap();
        std::os::unix::fs::symlink(&real, root.join("link")).unwrap();
        let real = std::fs::canonicalize(&real).unwrap();
        assert_eq!(absolute(&root.join("link/out/run")), real.join("out/run"));
        assert_eq!(absolute(&root.join("link/gone/../out")), real.join("out"));
        std::fs::create_dir_all(real.join("out/run")).unwrap();
        assert_eq!(absolute(&root.join("link/out/run")), real.join("out/run"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A path from a folder to another: up to their common start, then down.
    #[test]
    fn paths_from_one_folder_to_another() {
        let from = |a: &str, b: &str| path_from(Path::new(a), Path::new(b)).display().to_string();
        assert_eq!(
            from("/w/finetuned_model/fine-tuned", "/w/finetuned_model"),
            ".."
        );
        assert_eq!(
            from("/w/finetuned_model/fine-tuned", "/w/runB"),
            "../../runB"
        );
        assert_eq!(from("/w/out", "/w/out/ckpt"), "ckpt");
        assert_eq!(from("/w/out", "/w/out"), ".");
        assert_eq!(from("/scratch/c", "/home/u/out"), "../../home/u/out");
    }

    /// A checkpoint folder, a folder inside it, a symlink into it: found; its parent through
    /// `step-N/..`, or a folder beside it: not.
    #[test]
    fn enclosing_checkpoint_follows_the_real_path() {
        let root = std::env::temp_dir().join(format!("enclosing-{}", std::process::id()));
        let step = root.join("ckpt/step-00000010");
        std::fs::create_dir_all(&step).unwrap();
        std::fs::write(step.join("manifest.json"), "{}").unwrap();
        let real = step.canonicalize().unwrap();
        assert_eq!(enclosing_checkpoint(&step), Some(real.clone()));
        assert_eq!(
            enclosing_checkpoint(&step.join("out/more")),
            Some(real.clone())
        );
        std::os::unix::fs::symlink(&step, root.join("link")).unwrap();
        assert_eq!(enclosing_checkpoint(&root.join("link/out")), Some(real));
        assert_eq!(enclosing_checkpoint(&step.join("..")), None);
        assert_eq!(enclosing_checkpoint(&step.join("../step-00000011")), None);
        assert_eq!(enclosing_checkpoint(&root.join("ckpt")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// A bare file name's parent is the empty path: its folder is the working one (`--out
    /// sco.jsonl` wrote the file, then failed syncing "").
    #[test]
    fn the_folder_of_a_bare_file_name_syncs() {
        let bare = Path::new("sco.jsonl").parent().unwrap();
        assert!(bare.as_os_str().is_empty());
        fsync_dir(bare).unwrap();
    }

    /// A file in a folder that does not exist: the error names the folder, not the temporary
    /// file whose creation failed.
    #[test]
    fn a_file_in_a_missing_folder_names_the_folder() {
        let path = std::env::temp_dir().join(format!("no-such-{}/sub/x.jsonl", std::process::id()));
        let e = format!("{:#}", replace_synced(&path, b"x").unwrap_err());
        assert!(e.contains("/sub does not exist"), "{e}");
        assert!(!e.contains(".x.jsonl.tmp"), "{e}");
    }

    /// A folder at the path (`--out DIR`): said so, no temporary file left beside it.
    #[test]
    fn a_folder_at_the_path_is_refused_before_anything_is_written() {
        let dir = std::env::temp_dir().join(format!("out-is-a-folder-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("out.jsonl")).unwrap();
        let e = format!(
            "{:#}",
            replace_synced(&dir.join("out.jsonl"), b"x").unwrap_err()
        );
        assert!(e.contains("out.jsonl is a folder: give a file path"), "{e}");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "only the folder"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The ranges the ranks write cover the flat tensor once, each inside the shard its rank
    /// holds, for any element count against shard groups and replicas (fewer elements than
    /// ranks, end padding); full_shard's and no_shard's are the ranges they always were.
    #[test]
    fn the_ranks_write_every_element_once_from_the_shard_they_hold() {
        let state = |numel: i64, shard_len: i64, g: usize, r: usize| FlatState {
            group: "g".into(),
            numel,
            shard_len,
            shard_world: g,
            replicas: r,
            params: vec![],
            start: 0,
            end: 0,
            tensors: [Tensor::new(), Tensor::new(), Tensor::new()],
            optimizer_steps: None,
        };
        for numel in [0i64, 1, 3, 5, 7, 8, 16, 17, 1000] {
            for (g, r) in [
                (1, 1),
                (2, 1),
                (3, 1),
                (1, 2),
                (1, 3),
                (2, 2),
                (2, 3),
                (3, 2),
                (4, 2),
            ] {
                let shard_len = (numel + g as i64 - 1) / g as i64; // FlatGroup::shard_from's
                let s = state(numel, shard_len, g, r);
                let mut ranges: Vec<(i64, i64)> = (0..g * r).map(|k| s.range_of(k)).collect();
                for (k, &(a, b)) in ranges.iter().enumerate() {
                    let (lo, hi) = s.held_by(k);
                    assert!(
                        lo <= a && a <= b && b <= hi,
                        "{numel} {g}x{r}: rank {k} {a}..{b} outside {lo}..{hi}"
                    );
                }
                ranges.retain(|(a, b)| b > a);
                ranges.sort();
                let mut at = 0;
                for (a, b) in ranges {
                    assert_eq!(a, at, "{numel} {g}x{r}: a gap or an overlap at {at}");
                    at = b;
                }
                assert_eq!(at, numel, "{numel} {g}x{r}");
            }
            // full_shard at world w: rank k its shard; no_shard: range k of full_shard's layout
            for w in [1usize, 2, 3, 4] {
                let n = (numel + w as i64 - 1) / w as i64;
                let full = state(numel, n, w, 1);
                let no_shard = state(numel, numel, 1, w);
                for k in 0..w {
                    let want = ((n * k as i64).min(numel), (n * (k as i64 + 1)).min(numel));
                    assert_eq!(full.range_of(k), want);
                    assert_eq!(no_shard.range_of(k), want);
                }
            }
        }
    }

    /// A crash between replace_dir's two renames (no RENAME_EXCHANGE) leaves the old step-N
    /// moved aside and the new one still `.partial`: the old one counts as step N's complete
    /// checkpoint (resume uses it, retention keeps it) until a step-N folder exists again.
    #[test]
    fn a_folder_moved_aside_for_a_replacement_that_never_came_is_complete() {
        let root = std::env::temp_dir().join(format!("ckpt-aside-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for name in [
            "step-00000005.replaced.partial",
            "step-00000005.partial",
            "step-00000003",
        ] {
            std::fs::create_dir_all(root.join(name)).unwrap();
            std::fs::write(root.join(name).join("manifest.json"), "{}").unwrap();
        }
        let (complete, partial) = list_dir(&root).unwrap();
        assert_eq!(
            complete,
            [
                (3, root.join("step-00000003")),
                (5, root.join("step-00000005.replaced.partial"))
            ]
        );
        assert_eq!(partial, [root.join("step-00000005.partial")]);
        // once step 5 exists again, the one aside is a leftover
        std::fs::rename(
            root.join("step-00000005.partial"),
            root.join("step-00000005"),
        )
        .unwrap();
        let (complete, partial) = list_dir(&root).unwrap();
        assert_eq!(complete.last().unwrap(), &(5, root.join("step-00000005")));
        assert_eq!(partial, [root.join("step-00000005.replaced.partial")]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn names_are_zero_padded() {
        assert_eq!(step_dir_name(42), "step-00000042");
        assert_eq!(rank_file_name(1, 3), "rank-1-of-3.safetensors");
    }

    #[test]
    fn listing_sorts_by_step_and_separates_partial_folders() {
        let dir = std::env::temp_dir().join(format!("ckpt-list-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for n in [
            "step-00000010",
            "step-00000002",
            "step-00000011.partial",
            "other",
            "step-x",
            "step-00000012",
        ] {
            std::fs::create_dir_all(dir.join(n)).unwrap();
            if n != "step-00000012" {
                std::fs::write(dir.join(n).join("manifest.json"), "{}").unwrap();
            }
        }
        let (complete, partial) = list_dir(&dir).unwrap();
        let steps: Vec<u64> = complete.iter().map(|(s, _)| *s).collect();
        assert_eq!(steps, [2, 10]);
        // a step folder without its manifest (damaged after publishing) is neither: not
        // resumed from, and not for retention to remove
        assert_eq!(partial, [dir.join("step-00000011.partial")]);
        assert_eq!(complete.last().unwrap().1, dir.join("step-00000010"));
        assert_eq!(list_dir(&dir.join("missing")).unwrap().0.len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identity_hash_is_order_independent_json() {
        let mut a = BTreeMap::new();
        a.insert("peft.r".to_string(), json!(4));
        a.insert("model.dtype".to_string(), json!("bf16"));
        let mut b = BTreeMap::new();
        b.insert("model.dtype".to_string(), json!("bf16"));
        b.insert("peft.r".to_string(), json!(4));
        assert_eq!(identity_hash(&a), identity_hash(&b));
        b.insert("peft.r".to_string(), json!(8));
        assert_ne!(identity_hash(&a), identity_hash(&b));
    }
}
