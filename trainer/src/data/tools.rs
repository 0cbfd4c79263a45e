//! What `trainer data check|dump|build-sco` do, as library functions returning what to print
//! (the binary decides the exit code).
use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::Dtype;

use super::collate;
use super::dataset::{checked_report, DataError, Dataset, Split};
use super::records::{build_sco, DEFAULT_CORRECTION_PROMPT};
use super::tokenize::IGNORE;
use crate::config::{BadRecords, Config, LengthPolicy};

/// The result of `trainer data check`.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    /// The reports of the splits, with every problem as `FILE:LINE: reason`.
    pub text: String,
    /// Problems that would stop training (bad records under `bad_records: error`, too-long
    /// samples under `max_seq_len_policy: error`, a train split with no usable sample, an eval
    /// split with nothing to validate on under `train.validate`).
    pub failed: bool,
    pub summary: String,
}

/// Pre-scan every split of `config`, decode every image, and report (with the epoch plan of a
/// run at `world` ranks).
pub fn check(config: &Config, world: usize) -> Result<CheckOutcome, DataError> {
    let mut text = String::new();
    let mut stopping = 0usize;
    // (what `trainer train` refuses beyond single records, as it words it)
    let mut refused = Vec::new();
    // (the policies that make those problems stop training, as set)
    let mut policies = std::collections::BTreeSet::new();
    let mut splits = vec![Split::Train];
    match (&config.data.eval, config.train.validate) {
        (Some(_), true) => splits.push(Split::Eval),
        // (training reads it only to validate)
        (Some(eval), false) => text.push_str(&format!(
            "eval split: {}: not checked (train.validate is false: training does not read it)\n",
            eval
        )),
        (None, _) => {}
    }
    for split in splits {
        let ds = Dataset::scan(config, &config.model.path, split)?;
        let report = checked_report(&ds);
        if config.data.bad_records == BadRecords::Error && !report.problems.is_empty() {
            stopping += report.problems.len();
            policies.insert("data.bad_records: error");
        }
        if config.data.max_seq_len_policy == LengthPolicy::Error && !report.too_long.is_empty() {
            stopping += report.too_long.len();
            policies.insert("data.max_seq_len_policy: error");
        }
        match split {
            Split::Train if report.ok == 0 => refused.push(format!(
                "data.train {}: no usable sample: training would stop here ({})",
                report.file,
                crate::data::dataset::DROPPING_KEYS
            )),
            Split::Train if config.train.drop_last && report.ok < config.train.global_batch(world) => refused.push(format!(
                "data.train {}: {} samples do not fill one global batch of {} (batch_size {} x world {world} x grad_accum {}) and train.drop_last is true: training would stop here; lower train.batch_size or train.grad_accum, or set train.drop_last: false",
                report.file,
                report.ok,
                config.train.global_batch(world),
                config.train.batch_size,
                config.train.grad_accum
            )),
            Split::Eval if config.train.validate && (report.ok == 0 || report.supervised_tokens == 0) => refused.push(format!(
                "data.eval {}: no supervised tokens to validate on: training with train.validate would stop here (fix the file, or set train.validate: false)",
                report.file
            )),
            _ => {}
        }
        text.push_str(&report.to_string());
        if split == Split::Train && report.ok > 0 {
            text.push_str(&epoch_line(config, report.ok, world));
        }
    }
    if stopping > 0 {
        let policies: Vec<&str> = policies.into_iter().collect();
        refused.insert(0, format!("{stopping} problem(s) would stop training ({}); fix them or set the policy to skip", policies.join(", ")));
    }
    let failed = !refused.is_empty();
    let summary = match failed {
        true => refused.join("\n"),
        false => "data check passed".to_string(),
    };
    Ok(CheckOutcome {
        text,
        failed,
        summary,
    })
}

/// The epoch plan of `samples` usable samples at `world` ranks: steps per epoch and what the
/// samples left over do.
fn epoch_line(config: &Config, samples: usize, world: usize) -> String {
    let t = &config.train;
    let global = t.global_batch(world);
    let steps = crate::data::sampler::batches_per_epoch(samples, global, t.drop_last);
    let left = samples % global;
    let last = match (left, t.drop_last) {
        (0, _) => String::new(),
        (r, true) => format!("; {r} sample(s) sit out each epoch (train.drop_last)"),
        (r, false) => format!(", the last of them {r} sample(s)"),
    };
    format!(
        "at {world} rank(s): a global batch of {global} (batch_size {} x world {world} x grad_accum {}), {steps} step(s) per epoch{last}\n",
        t.batch_size, t.grad_accum
    )
}

fn le_bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn le_bytes_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The named tensors of one collated batch as (name, dtype, shape, bytes).
fn batch_tensors(c: &collate::Batch, prefix: &str) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let (b, l, ni, t, h) = (c.batch, c.seq_len, c.num_images, c.max_tiles, c.tile);
    let mut v = vec![
        (
            "input_ids",
            Dtype::I64,
            vec![b, l],
            le_bytes_i64(&c.input_ids),
        ),
        (
            "attention_mask",
            Dtype::I64,
            vec![b, l],
            le_bytes_i64(&c.attention_mask),
        ),
        ("labels", Dtype::I64, vec![b, l], le_bytes_i64(&c.labels)),
    ];
    if ni > 0 {
        v.extend([
            (
                "pixel_values",
                Dtype::F32,
                vec![b, ni, t, 3, h, h],
                le_bytes_f32(&c.pixel_values),
            ),
            (
                "aspect_ratio_ids",
                Dtype::I64,
                vec![b, ni],
                le_bytes_i64(&c.aspect_ratio_ids),
            ),
            (
                "aspect_ratio_mask",
                Dtype::I64,
                vec![b, ni, t],
                le_bytes_i64(&c.aspect_ratio_mask),
            ),
            (
                "cross_attention_mask",
                Dtype::I64,
                vec![b, l, ni, t],
                le_bytes_i64(&c.cross_attention_mask),
            ),
        ]);
    }
    v.into_iter()
        .map(|(n, d, s, bytes)| (format!("{prefix}{n}"), d, s, bytes))
        .collect()
}

/// Write the exact tensors of global batch `index` of `epoch` of a run at `world` ranks to `out`
/// (safetensors): `train.batch_size x world x train.grad_accum` samples (an epoch's last batch
/// the fewer left over, unless `train.drop_last`, with a masked filler row for a rank left
/// without a sample, as training runs it), as that run's step
/// `index + 1` of the epoch sees them (the sampler depends on the global batch). At world 1 with
/// `train.grad_accum` 1 the names are `input_ids`, `attention_mask`, `labels`, `pixel_values`,
/// `aspect_ratio_ids`, `aspect_ratio_mask`, `cross_attention_mask`; with more micro-steps each
/// micro-batch is padded on its own (as training does) and its tensors are named
/// `micro{m}.input_ids` etc.; at more ranks each rank's part is `rank{r}.` before that. Image
/// tensors are absent for a text-only batch.
/// The metadata holds the epoch, the index, the dataset indices and the records' `FILE:LINE`.
/// Returns what to print: a summary, and with `text` each sample rendered with its supervised
/// spans marked `[[...]]`.
pub fn dump(
    config: &Config,
    epoch: u64,
    index: u64,
    world: usize,
    out: &Path,
    text: bool,
) -> Result<String, DataError> {
    refuse_to_overwrite(out)?;
    let ds = Dataset::open(config, &config.model.path, Split::Train)?;
    let (bs, accum) = (config.train.batch_size, config.train.grad_accum);
    let world = world.max(1);
    let global = bs * world * accum;
    let n = ds.batches_per_epoch(global);
    if index >= n {
        let last = match ds.partial_batch_len(global) {
            r if r > 0 && !config.train.drop_last => format!(", the last one of {r}"),
            _ => String::new(),
        };
        return Err(DataError::Layout(format!(
            "--index {index} is past the end: epoch {epoch} has {n} global batch(es) of {global} samples{last} (train.batch_size {bs} x world {world} x train.grad_accum {accum}) over {} samples",
            ds.len()
        )));
    }
    let mut jobs = Vec::new();
    for rank in 0..world {
        let part = ds
            .epoch_plan(epoch, index, rank, world, bs, accum)?
            .into_iter()
            .take_while(|j| j.position.batch == index);
        jobs.extend(part.map(|j| (rank, j)));
    }
    let mut tensors = Vec::new();
    let mut used = Vec::new();
    let mut shown = String::new();
    for (rank, job) in &jobs {
        // (a rank left without a sample in a partial last micro-step runs a masked copy of
        // another rank's sample: in the file as it trains it, not a sample of the batch)
        let loaded = ds.load_job(job)?;
        // (tensor name prefixes, and the same in words for the text)
        let (mut prefix, mut label) = (String::new(), String::new());
        if world > 1 {
            prefix.push_str(&format!("rank{rank}."));
            label.push_str(&format!("rank {rank}, "));
        }
        if accum > 1 {
            prefix.push_str(&format!("micro{}.", job.micro_step));
            label.push_str(&format!("micro-batch {}, ", job.micro_step));
        }
        tensors.extend(batch_tensors(&loaded.collated, &prefix));
        if text && job.fillers == job.indices.len() {
            shown.push_str(&format!(
                "--- {label}a masked filler row (no sample of its own: the batch left it none)\n"
            ));
        } else if text {
            shown.push_str(&render_marked(&ds, &loaded.collated, &label)?);
        }
        used.extend(loaded.indices);
    }
    let records: Vec<String> = used
        .iter()
        .map(|&i| {
            let r = ds.record(i);
            format!("{}:{}", r.file.display(), r.line)
        })
        .collect();
    let meta = HashMap::from([
        ("epoch".to_string(), epoch.to_string()),
        ("index".to_string(), index.to_string()),
        ("world".to_string(), world.to_string()),
        (
            "sample_indices".to_string(),
            serde_json::to_string(&used).unwrap_or_default(),
        ),
        (
            "records".to_string(),
            serde_json::to_string(&records).unwrap_or_default(),
        ),
    ]);
    // through a temporary name: a failed write leaves no half file under `out`
    crate::checkpoint::safetensors_bytes(&tensors, meta)
        .and_then(|bytes| crate::checkpoint::replace_synced(out, &bytes))
        .map_err(|e| DataError::Output(format!("{}: cannot write: {e:#}", out.display())))?;
    let mut msg = format!(
        "wrote global batch {index} of epoch {epoch} ({} samples: {}) to {}\n",
        used.len(),
        records.join(", "),
        out.display()
    );
    for (name, _, shape, _) in &tensors {
        msg.push_str(&format!("  {name}: {shape:?}\n"));
    }
    msg.push_str(&shown);
    Ok(msg)
}

/// `data dump --out` replaces only an earlier dump: any other file there (the config, a data
/// file, an image, a model's weights) is refused before anything is read.
fn refuse_to_overwrite(out: &Path) -> Result<(), DataError> {
    let refuse = |what: &str| {
        Err(DataError::Output(format!(
            "--out {} {what}: give another path (a dump replaces only an earlier dump)",
            out.display()
        )))
    };
    match std::fs::metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataError::Output(format!("--out {}: {e}", out.display()))),
        Ok(m) if m.is_dir() => refuse("is a folder"),
        // (an empty file holds nothing to lose: `mktemp`'s)
        Ok(m) if m.len() == 0 || is_dump(out) => Ok(()),
        Ok(_) => refuse("exists and is not a `trainer data dump` file; it would be overwritten"),
    }
}

/// Whether `path` is a safetensors file whose metadata is a dump's (`sample_indices`, `records`).
fn is_dump(path: &Path) -> bool {
    use std::io::Read;
    let header = || -> std::io::Result<serde_json::Value> {
        let mut f = std::fs::File::open(path)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len)?;
        let len = u64::from_le_bytes(len);
        let mut json = Vec::new();
        // (a dump's header is small: the tensors' names and the records; a length past this is
        // another file's bytes)
        f.take(len.min(64 << 20)).read_to_end(&mut json)?;
        Ok(serde_json::from_slice(&json)?)
    };
    header().is_ok_and(|h| {
        let meta = &h["__metadata__"];
        meta.get("sample_indices").is_some() && meta.get("records").is_some()
    })
}

/// Each sample of a collated batch as text, supervised spans in `[[` `]]`; `label` ("rank 1, ")
/// tells the batches of a global batch apart.
fn render_marked(ds: &Dataset, c: &collate::Batch, label: &str) -> Result<String, DataError> {
    let tok = &ds.text_processor().tokenizer;
    let mut out = String::new();
    for i in 0..c.batch {
        let row = i * c.seq_len..(i + 1) * c.seq_len;
        let n = c.attention_mask[row.clone()]
            .iter()
            .filter(|&&a| a == 1)
            .count();
        let ids = &c.input_ids[row.clone()][..n];
        let labels = &c.labels[row][..n];
        let idx = c.indices[i];
        let r = ds.record(idx);
        let sup = labels.iter().filter(|&&l| l != IGNORE).count();
        out.push_str(&format!(
            "--- {label}sample {i}: dataset index {idx}, {}:{} (id {:?}), {n} tokens, {sup} supervised ---\n",
            r.file.display(),
            r.line,
            r.id
        ));
        let mut k = 0;
        while k < n {
            let on = labels[k] != IGNORE;
            let end = (k..n).find(|&j| (labels[j] != IGNORE) != on).unwrap_or(n);
            let span: Vec<u32> = ids[k..end].iter().map(|&t| t as u32).collect();
            let s = tok
                .decode(&span, false)
                .map_err(|e| DataError::Output(format!("tokenizer decode: {e}")))?;
            if on {
                out.push_str(&format!("[[{s}]]"));
            } else {
                out.push_str(&s);
            }
            k = end;
        }
        out.push('\n');
    }
    Ok(out)
}

/// What `trainer data build-sco` did.
#[derive(Debug, Clone)]
pub struct BuildScoOutcome {
    pub written: usize,
    pub skipped_empty_refined: usize,
    /// Entries without an image_path, written as text-only records.
    pub without_image: usize,
    /// Malformed entries, `entry I: reason`.
    pub problems: Vec<String>,
}

/// Convert the seed's refinement JSON at `refined` into SCo JSONL at `out`
/// (`records::build_sco`); the correction prompt defaults to `DEFAULT_CORRECTION_PROMPT`.
pub fn build_sco_file(
    refined: &Path,
    out: &Path,
    correction_prompt: Option<&str>,
) -> Result<BuildScoOutcome, DataError> {
    // (`--out` naming the input would replace the refinements with their conversion)
    if let (Ok(a), Ok(b)) = (refined.canonicalize(), out.canonicalize()) {
        if a == b {
            return Err(DataError::Output(format!(
                "--out {} is the input file: give another path",
                out.display()
            )));
        }
    }
    let text = std::fs::read_to_string(refined)
        .map_err(|e| DataError::Output(format!("{}: cannot read: {e}", refined.display())))?;
    let rep = build_sco(
        &text,
        correction_prompt.unwrap_or(DEFAULT_CORRECTION_PROMPT),
    )
    .map_err(|e| DataError::Output(format!("{}: {e}", refined.display())))?;
    let mut body = rep.lines.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    if rep.lines.is_empty() {
        let why = match rep.problems.first() {
            Some(first) => format!("{} malformed, first: {first}", rep.problems.len()),
            None if rep.skipped_empty_refined > 0 => format!(
                "{} with an empty refined_answer (failed refinements)",
                rep.skipped_empty_refined
            ),
            None => "the file holds no entries".into(),
        };
        return Err(DataError::Output(format!(
            "{}: no entry converted ({why}); {} is left as it was",
            refined.display(),
            out.display()
        )));
    }
    // whole or not at all (a full disk must not leave half a file that looks complete)
    crate::checkpoint::replace_synced(out, body.as_bytes())
        .map_err(|e| DataError::Output(format!("{}: cannot write: {e:#}", out.display())))?;
    Ok(BuildScoOutcome {
        written: rep.lines.len(),
        skipped_empty_refined: rep.skipped_empty_refined,
        without_image: rep.without_image,
        problems: rep.problems,
    })
}
