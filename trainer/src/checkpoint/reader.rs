//! Reading a checkpoint's saved tensors: element ranges of the manifest's flat tensors from the
//! memory-mapped rank files (each file's sha256 checked when it is first opened, unless the caller
//! verifies the files itself), one trained parameter at a time (infer, merged export) or all of
//! them (PEFT export).
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use memmap2::Mmap;
use tch::{Kind, Tensor};

use super::load::{check_sha256, damaged, read_manifest};
use serde_json::Value;

use super::manifest::{Manifest, ParamEntry, TensorEntry, STATES};

/// Reads element ranges of the manifest's tensors from the rank files (mmap, verified lazily).
pub(super) struct Reader<'m> {
    dir: PathBuf,
    manifest: &'m Manifest,
    /// param name -> (group, offset in the group's flat tensor, shape)
    pub(super) params: HashMap<String, (String, i64, Vec<i64>)>,
    /// (group, state) -> tensor entry
    tensors: HashMap<(String, String), &'m TensorEntry>,
    /// file name -> (mmap, data start, tensor name -> byte offsets relative to data start)
    open: HashMap<String, OpenFile>,
    /// Whether `file` checks a file's sha256 when it first opens it (off when the caller
    /// verifies the files itself, concurrently).
    pub(super) verify_on_open: bool,
}

struct OpenFile {
    map: Mmap,
    data_start: usize,
    offsets: BTreeMap<String, (usize, usize)>,
}

impl<'m> Reader<'m> {
    /// Indexes the manifest and checks that every file exists with its recorded size.
    pub(super) fn new(dir: &Path, m: &'m Manifest) -> Result<Self> {
        for f in &m.files {
            let path = dir.join(&f.file);
            let meta = std::fs::metadata(&path).map_err(|e| {
                damaged(format!(
                    "checkpoint file {} is missing ({e}); the checkpoint is damaged",
                    path.display()
                ))
            })?;
            if meta.len() != f.bytes {
                return Err(damaged(format!(
                    "checkpoint file {} is truncated or damaged: {} bytes, the manifest says {}",
                    path.display(),
                    meta.len(),
                    f.bytes
                )));
            }
        }
        let mut params = HashMap::new();
        let mut tensors = HashMap::new();
        for t in &m.tensors {
            if t.dtype != "F32" {
                bail!(
                    "checkpoint {}: tensor {} has dtype {}, expected F32",
                    dir.display(),
                    t.name,
                    t.dtype
                );
            }
            tensors.insert((t.group.clone(), t.state.clone()), t);
            if t.state == "param" {
                for ParamEntry {
                    name,
                    shape,
                    offset,
                } in &t.params
                {
                    params.insert(name.clone(), (t.group.clone(), *offset, shape.clone()));
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest: m,
            params,
            tensors,
            open: HashMap::new(),
            verify_on_open: true,
        })
    }

    /// The files holding any element of `states`' ranges (of any of their parameters).
    pub(super) fn files_for(&self, states: &[super::FlatState]) -> BTreeSet<String> {
        let mut files = BTreeSet::new();
        for s in states.iter().filter(|s| s.end > s.start) {
            for p in &s.params {
                let (a, b) = (p.offset.max(s.start), (p.offset + p.numel()).min(s.end));
                let Some((group, src_off, _)) = self.params.get(&p.name) else {
                    continue;
                };
                let (from, to) = (src_off + (a - p.offset), src_off + (b - p.offset));
                for state in STATES {
                    let Some(t) = self.tensors.get(&(group.clone(), state.to_string())) else {
                        continue;
                    };
                    for sh in t.shards.iter().filter(|sh| sh.start < to && sh.end > from) {
                        files.insert(sh.file.clone());
                    }
                }
            }
        }
        files
    }

    fn file(&mut self, name: &str) -> Result<&OpenFile> {
        if !self.open.contains_key(name) {
            let entry = self
                .manifest
                .files
                .iter()
                .find(|f| f.file == name)
                .ok_or_else(|| anyhow!("checkpoint {}: manifest names file {name} in a tensor's shards but not in `files`", self.dir.display()))?;
            let path = self.dir.join(name);
            let file = std::fs::File::open(&path)
                .with_context(|| format!("reading checkpoint file {}", path.display()))?;
            // SAFETY: checkpoint files are never modified after the rename that publishes them.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("mapping {}", path.display()))?;
            if self.verify_on_open {
                // hashed from the map: no copy through a read buffer
                check_sha256(&path, &map, &entry.sha256)?;
            }
            let bad = || {
                damaged(format!(
                    "checkpoint file {} has a malformed safetensors header",
                    path.display()
                ))
            };
            if map.len() < 8 {
                return Err(bad());
            }
            let n = u64::from_le_bytes(map[..8].try_into().expect("8")) as usize;
            if n.checked_add(8).is_none_or(|end| end > map.len()) {
                return Err(bad());
            }
            let header: serde_json::Map<String, Value> =
                serde_json::from_slice(&map[8..8 + n]).map_err(|_| bad())?;
            let mut offsets = BTreeMap::new();
            for (k, v) in header {
                if k == "__metadata__" {
                    continue;
                }
                let o = v
                    .get("data_offsets")
                    .and_then(Value::as_array)
                    .ok_or_else(bad)?;
                let a = o.first().and_then(Value::as_u64).ok_or_else(bad)? as usize;
                let b = o.get(1).and_then(Value::as_u64).ok_or_else(bad)? as usize;
                if a > b || 8 + n + b > map.len() {
                    return Err(bad());
                }
                offsets.insert(k, (a, b));
            }
            self.open.insert(
                name.to_string(),
                OpenFile {
                    map,
                    data_start: 8 + n,
                    offsets,
                },
            );
        }
        Ok(&self.open[name])
    }

    /// Elements [from, to) of tensor `<group>/<state>` into `out`.
    pub(super) fn read(
        &mut self,
        group: &str,
        state: &str,
        from: i64,
        to: i64,
        out: &mut [f32],
    ) -> Result<()> {
        let t = *self
            .tensors
            .get(&(group.to_string(), state.to_string()))
            .ok_or_else(|| {
                anyhow!(
                    "checkpoint {}: no tensor {group}/{state} in the manifest",
                    self.dir.display()
                )
            })?;
        let mut at = from;
        // (in element order: under hybrid_shard rank order is not, see `FlatState::range_of`)
        let mut shards: Vec<_> = t.shards.iter().collect();
        shards.sort_by_key(|s| s.start);
        for sh in shards {
            if at >= to {
                break;
            }
            if sh.end <= at || sh.start >= to {
                continue;
            }
            if sh.start > at {
                break;
            }
            let end = sh.end.min(to);
            let path = self.dir.join(&sh.file);
            let f = self.file(&sh.file)?;
            let (a, b) = *f.offsets.get(&t.name).ok_or_else(|| {
                damaged(format!(
                    "checkpoint file {} has no tensor {}",
                    path.display(),
                    t.name
                ))
            })?;
            if (b - a) as i64 != (sh.end - sh.start) * 4 {
                return Err(damaged(format!(
                    "checkpoint file {}: tensor {} has {} bytes, the manifest says {} elements ({} bytes of fp32)",
                    path.display(),
                    t.name,
                    b - a,
                    sh.end - sh.start,
                    (sh.end - sh.start) * 4
                )));
            }
            let base = f.data_start + a + ((at - sh.start) * 4) as usize;
            let bytes = &f.map[base..base + ((end - at) * 4) as usize];
            let dst = &mut out[(at - from) as usize..(end - from) as usize];
            // little-endian f32 (save.rs refuses to build for other targets): a plain copy
            super::f32_bytes_mut(dst).copy_from_slice(bytes);
            at = end;
        }
        if at < to {
            return Err(damaged(format!(
                "checkpoint {}: elements [{at}, {to}) of {} are in no file of the manifest",
                self.dir.display(),
                t.name
            )));
        }
        Ok(())
    }
}

/// A checkpoint's trained parameters, read one at a time by name (merged export: never all of
/// them in memory). Each rank file is verified against its sha256 when first read.
pub struct TrainedParams<'m> {
    reader: Reader<'m>,
    /// fp32 elements in all the rank files (what a parameter's range must stay within).
    file_elems: i64,
}

/// The element count of `shape`, if every dimension is non-negative and the product fits.
fn checked_numel(shape: &[i64]) -> Option<i64> {
    shape
        .iter()
        .try_fold(1i64, |a, &d| if d < 0 { None } else { a.checked_mul(d) })
}

/// fp32 elements the manifest's files hold (bytes / 4): no tensor can be larger.
fn file_elems(m: &Manifest) -> i64 {
    m.files.iter().map(|f| f.bytes / 4).sum::<u64>() as i64
}

impl<'m> TrainedParams<'m> {
    pub fn new(dir: &Path, m: &'m Manifest) -> Result<Self> {
        Ok(Self {
            reader: Reader::new(dir, m)?,
            file_elems: file_elems(m),
        })
    }

    /// Every trained parameter's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.reader.params.keys().map(String::as_str)
    }

    pub fn shape(&self, name: &str) -> Option<&[i64]> {
        self.reader.params.get(name).map(|(_, _, s)| s.as_slice())
    }

    /// The fp32 parameter `name` with its shape.
    pub fn get(&mut self, name: &str) -> Result<Tensor> {
        let (group, offset, shape) = self.reader.params.get(name).cloned().ok_or_else(|| {
            anyhow!(
                "checkpoint {}: no parameter {name}",
                self.reader.dir.display()
            )
        })?;
        // sizes come from the manifest (maybe hand-edited): checked before anything is allocated
        let fits = |n: &i64| {
            offset >= 0
                && offset
                    .checked_add(*n)
                    .is_some_and(|end| end <= self.file_elems)
        };
        let Some(numel) = checked_numel(&shape).filter(fits) else {
            return Err(damaged(format!(
                "checkpoint {}: parameter {name} has shape {shape:?} at offset {offset}, outside the checkpoint's data (a damaged manifest?)",
                self.reader.dir.display()
            )));
        };
        let mut buf = vec![0f32; numel as usize];
        self.reader
            .read(&group, "param", offset, offset + numel, &mut buf)?;
        Ok(Tensor::from_slice(&buf).f_view(shape.as_slice())?)
    }
}

/// The full trainable fp32 weights of a checkpoint by parameter name (export), every file verified.
pub fn read_full(dir: &Path) -> Result<(Manifest, Vec<(String, Tensor)>)> {
    let m = read_manifest(dir)?;
    let mut reader = Reader::new(dir, &m)?;
    let mut out = vec![];
    // sizes come from the manifest: checked against the files before anything is allocated
    let file_elems = file_elems(&m);
    let damaged = |what: String| damaged(format!("checkpoint {}: {what}", dir.display()));
    for t in m.tensors.iter().filter(|t| t.state == "param") {
        let len = match t.shape[..] {
            [n] if (0..=file_elems).contains(&n) => n,
            _ => {
                return Err(damaged(format!(
                    "flat tensor {} has shape {:?}",
                    t.group, t.shape
                )))
            }
        };
        let mut buf = vec![0f32; len as usize];
        reader.read(&t.group, "param", 0, len, &mut buf)?;
        let flat = Tensor::from_slice(&buf);
        for p in &t.params {
            let bad = || damaged(format!("parameter {} lies outside its flat tensor", p.name));
            let Some(numel) = checked_numel(&p.shape).filter(|&n| {
                p.offset >= 0 && p.offset.checked_add(n).is_some_and(|end| end <= len)
            }) else {
                return Err(bad());
            };
            let w = flat
                .f_narrow(0, p.offset, numel)
                .and_then(|w| w.f_view(p.shape.as_slice()))
                .map_err(|_| bad())?;
            out.push((p.name.clone(), w.to_kind(Kind::Float).copy()));
        }
    }
    Ok((m, out))
}
