//! `train.tensorboard`: the metrics of `metrics.jsonl` also as TensorBoard scalars, in an event
//! file under `train.output_dir/tensorboard/` (`tensorboard --logdir OUTPUT_DIR/tensorboard`), as
//! HF's Trainer (`report_to: tensorboard`) and torchtitan write them.
//!
//! The file is what PyTorch's `SummaryWriter` writes, byte for byte after its first event
//! (tests/fixtures/tensorboard): TFRecord framing (length, masked CRC-32C of the length, an
//! `Event` protobuf, its masked CRC-32C), first an event with `file_version: "brain.Event:2"`,
//! then one event per scalar (`wall_time`, `step`, `summary { value { tag, simple_value } }`).
//! A resumed run's file starts as `SummaryWriter(purge_step=N)`'s: after the file version, the
//! version again at step N and a `session_log { status: START }` at step N, on which TensorBoard
//! drops the points of earlier files from step N on (the abandoned run's steps after the
//! checkpoint it resumed from), so the curves hold one trajectory.
//! The three messages are encoded here by hand: they are five fields, not worth a protobuf
//! code generator.
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the event files go, under `train.output_dir`.
pub const DIR: &str = "tensorboard";

/// One event file, appended to and flushed per call.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), named as TensorBoard expects
    /// (`events.out.tfevents.<seconds>.<host>.<pid>.0`): each launch of a run writes its own, and
    /// TensorBoard reads them all as one run. `purge_from`: the step a resumed run continues from
    /// (its points from there on replace the earlier files').
    pub fn create(dir: &Path, purge_from: Option<u64>) -> std::io::Result<Self> {
        let now = wall_time();
        // TensorBoard reads a folder's files in name order: a launch in the same second as the
        // last one (whose pid may sort first) still comes after it
        let secs = match latest_file_seconds(dir) {
            Some(latest) if latest >= now as u64 => latest + 1,
            _ => now as u64,
        };
        let name = format!(
            "events.out.tfevents.{secs}.{}.{}.0",
            hostname(),
            std::process::id()
        );
        Self::create_at(&dir.join(name), now, purge_from)
    }

    /// The file at `path`, its first events stamped `wall_time`.
    pub(crate) fn create_at(
        path: &Path,
        wall_time: f64,
        purge_from: Option<u64>,
    ) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut w = EventWriter {
            file: File::create(path)?,
            path: path.to_path_buf(),
        };
        let mut event = Vec::new();
        put_f64(&mut event, 1, wall_time);
        put_bytes(&mut event, 3, b"brain.Event:2");
        let mut source = Vec::new();
        put_bytes(&mut source, 1, b"llava-sco trainer");
        put_bytes(&mut event, 10, &source); // source_metadata { writer }
        w.record(&event)?;
        if let Some(step) = purge_from {
            // (PyTorch's purge_step events: the file version again, then SessionLog START)
            let mut version = Vec::new();
            put_f64(&mut version, 1, wall_time);
            put_step(&mut version, step);
            put_bytes(&mut version, 3, b"brain.Event:2");
            w.record(&version)?;
            let mut start = Vec::new();
            put_f64(&mut start, 1, wall_time);
            put_step(&mut start, step);
            put_bytes(&mut start, 7, &[0x08, 0x01]); // session_log { status: START (1) }
            w.record(&start)?;
        }
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `(tag, value)` pairs at `step`, one event each (as `add_scalar` does), stamped now.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) -> std::io::Result<()> {
        self.scalars_at(step, values, wall_time())
    }

    pub(crate) fn scalars_at(
        &mut self,
        step: u64,
        values: &[(String, f64)],
        wall_time: f64,
    ) -> std::io::Result<()> {
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_bytes());
            // simple_value is a float (TensorBoard's precision); a oneof member, so written
            // even when zero
            put_tag(&mut value, 2, 5);
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            let mut summary = Vec::new();
            put_bytes(&mut summary, 1, &value);
            let mut event = Vec::new();
            put_f64(&mut event, 1, wall_time);
            put_step(&mut event, step);
            put_bytes(&mut event, 5, &summary);
            self.record(&event)?;
        }
        self.file.flush()
    }

    /// One TFRecord: length, masked CRC of the length, data, masked CRC of the data.
    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&buf)
    }
}

/// TFRecord's CRC-32C, rotated and offset (TensorFlow's `crc32c::Mask`).
pub(crate) fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// An `Event`'s step (field 2; proto3 leaves a zero step out).
fn put_step(buf: &mut Vec<u8>, step: u64) {
    if step != 0 {
        put_tag(buf, 2, 0);
        put_varint(buf, step);
    }
}

fn put_tag(buf: &mut Vec<u8>, field: u64, wire: u64) {
    put_varint(buf, (field << 3) | wire);
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_f64(buf: &mut Vec<u8>, field: u64, v: f64) {
    put_tag(buf, field, 1);
    buf.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(buf: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_tag(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The largest `<seconds>` of the event files named `events.out.tfevents.<seconds>....` in `dir`.
fn latest_file_seconds(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("events.out.tfevents.")?
                .split('.')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .max()
}

/// This machine's name for the file name (TensorBoard only needs it to tell writers apart).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "localhost".into())
}

/// The TensorBoard scalars of one `metrics.jsonl` line: a step's numbers as `train/<key>`, a
/// validation's `eval_<x>` as `eval/<x>` (HF's Trainer tags); counters that are not curves
/// (`step`, `world_size`) and non-numbers left out.
pub fn scalars_of(line: &serde_json::Value) -> Option<(u64, Vec<(String, f64)>)> {
    let obj = line.as_object()?;
    let step = obj.get("step")?.as_u64()?;
    let validation = obj.get("validation").and_then(|v| v.as_bool()) == Some(true);
    let values = obj
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "world_size" | "validation"))
        .filter_map(|(k, v)| {
            let x = v.as_f64()?;
            let tag = match k.strip_prefix("eval_") {
                Some(rest) if validation => format!("eval/{rest}"),
                _ if validation => format!("eval/{k}"),
                _ => format!("train/{k}"),
            };
            Some((tag, x))
        })
        .collect();
    Some((step, values))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tfrecord_crc_is_tensorflows_masked_crc32c() {
        // crc32c("123456789") = 0xe3069283 (the CRC-32C check value), masked as TensorFlow does
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        // TensorFlow: ((crc >> 15) | (crc << 17)) + 0xa282ead8
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    /// The records of an event file, each CRC checked.
    fn records(file: &[u8]) -> Vec<&[u8]> {
        let (mut out, mut at) = (vec![], 0);
        while at < file.len() {
            let len_bytes = &file[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            let crc = |b: &[u8]| u32::from_le_bytes(b.try_into().unwrap());
            assert_eq!(crc(&file[at + 8..at + 12]), masked_crc(len_bytes));
            let data = &file[at + 12..at + 12 + len];
            assert_eq!(crc(&file[at + 12 + len..at + 16 + len]), masked_crc(data));
            out.push(data);
            at += 16 + len;
        }
        out
    }

    /// tests/fixtures/tensorboard/events.golden, written by PyTorch's SummaryWriter
    /// (make_tb_golden.py): its CRCs are ours, and the same scalars at the same wall times give
    /// the same records; the first (file version) differs only in naming its writer.
    #[test]
    fn bytes_match_pytorch_summary_writer() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tensorboard");
        let golden = std::fs::read(fx.join("events.golden")).unwrap();
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fx.join("scalars.json")).unwrap())
                .unwrap();
        let dir = std::env::temp_dir().join(format!("tb-golden-{}", std::process::id()));
        let path = dir.join("events.out.tfevents.test");
        let first_wall = spec["file_version_wall_time"].as_f64().unwrap();
        let mut w = EventWriter::create_at(&path, first_wall, None).unwrap();
        for s in spec["scalars"].as_array().unwrap() {
            let value = (
                s["tag"].as_str().unwrap().to_string(),
                s["value"].as_f64().unwrap(),
            );
            w.scalars_at(
                s["step"].as_u64().unwrap(),
                &[value],
                s["wall_time"].as_f64().unwrap(),
            )
            .unwrap();
        }
        let ours = std::fs::read(&path).unwrap();
        let (ours, theirs) = (records(&ours), records(&golden));
        assert_eq!(ours.len(), 8);
        assert_eq!(ours[1..], theirs[1..]);
        // file version event: wall time (field 1) and file_version (field 3) as PyTorch's
        let head = |r: &[u8]| r[..24].to_vec(); // tag + 8-byte double, tag + len + 13 bytes
        assert_eq!(head(ours[0]), head(theirs[0]));
        assert!(theirs[0][..24].ends_with(b"brain.Event:2"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A resumed run's file starts as the one PyTorch's `SummaryWriter(purge_step=300)` writes
    /// (tests/fixtures/tensorboard/events_purge.golden): its purge events are the golden's but for
    /// their wall times (the time the writer opened), and its scalar the golden's.
    #[test]
    fn a_resumed_runs_file_purges_as_pytorchs_purge_step() {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tensorboard");
        let golden = std::fs::read(fx.join("events_purge.golden")).unwrap();
        let dir = std::env::temp_dir().join(format!("tb-purge-{}", std::process::id()));
        let path = dir.join("events.out.tfevents.test");
        let mut w = EventWriter::create_at(&path, 1.5, Some(300)).unwrap();
        w.scalars_at(300, &[("train/loss".into(), 2.0)], 1700000004.0)
            .unwrap();
        let ours = std::fs::read(&path).unwrap();
        let (ours, theirs) = (records(&ours), records(&golden));
        assert_eq!(ours.len(), 4);
        // (a wall time is its first 9 bytes: tag and double)
        for i in [1, 2] {
            assert_eq!(ours[i][..1], theirs[i][..1]);
            assert_eq!(ours[i][9..], theirs[i][9..], "event {i}");
        }
        assert_eq!(ours[3], theirs[3]);
        // and no purge events without a step to purge from
        let fresh = dir.join("events.out.tfevents.fresh");
        EventWriter::create_at(&fresh, 1.5, None).unwrap();
        assert_eq!(records(&std::fs::read(&fresh).unwrap()).len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn metric_lines_become_train_and_eval_tags() {
        let step = serde_json::json!({"step": 3, "epoch": 1, "loss": 2.5, "lr": 1e-4,
            "gpu_mem_bytes": null, "world_size": 2});
        let (s, v) = scalars_of(&step).unwrap();
        assert_eq!(s, 3);
        let tags: Vec<&str> = v.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["train/epoch", "train/loss", "train/lr"]);
        let val = serde_json::json!({"validation": true, "step": 4, "epoch": 1,
            "eval_loss": 2.0, "eval_ppl": 7.4});
        let (_, v) = scalars_of(&val).unwrap();
        let tags: Vec<&str> = v.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(tags, ["eval/epoch", "eval/loss", "eval/ppl"]);
        assert!(scalars_of(&serde_json::json!({"note": "no step"})).is_none());
    }
}
