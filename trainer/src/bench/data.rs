//! `trainer bench data`: samples/s (one image + one record each) through our whole data
//! pipeline: read, decode, RGB, canvas + PIL-exact resize, pad, rescale/normalize, tiles, chat
//! template, tokenize, label masking, collate and the model's input tensors (`Dataset::epoch_iter`
//! with `data.num_workers` = K), next to transformers' MllamaProcessor (PIL image processor) +
//! the seed's label masking (scripts/bench_data.py, from .venv, one process pinned to one
//! thread) on the same files in the same run.
//!
//! Inputs: a generated set of JPEGs of mixed sizes (about 640x480 to 2000x1500, deterministic
//! content: smooth gradients + noise, quality 90) with LLaVA-CoT style records (question ->
//! staged answer, every third record two turns), the real model's 560-pixel tiles (4 max), and
//! the data fixtures' tokenizer (tests/fixtures/data/tok; a small BPE, same for both sides).
//! Figures are medians over `reps` full passes; per core = samples/s / K for ours (K threads)
//! and samples/s for the single-threaded peer.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::config;
use crate::data::dataset::{Dataset, Split};

const TOKENIZER: &str = include_str!("../../../tests/fixtures/data/tok/tokenizer.json");
const TOKENIZER_CONFIG: &str =
    include_str!("../../../tests/fixtures/data/tok/tokenizer_config.json");
const PREPROCESSOR_560: &str =
    include_str!("../../../tests/fixtures/data/real560/preprocessor_config.json");

pub struct DataBenchOptions {
    /// Generated JPEGs (= samples).
    pub images: usize,
    /// Worker counts to measure (`data.num_workers`).
    pub workers: Vec<usize>,
    /// Samples per batch (one rank).
    pub batch_size: usize,
    pub reps: usize,
    /// Where the model folder, images and records are written (removed afterwards).
    pub dir: PathBuf,
    /// Python with transformers for the peer, and its script; None = no peer.
    pub peer: Option<(PathBuf, PathBuf)>,
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct Measurement {
    pub workers: usize,
    pub samples: usize,
    pub seconds: f64,
    /// CPU seconds (all threads) of the pass with the median wall time.
    pub cpu_seconds: f64,
    /// The peer's median seconds and CPU seconds over the same samples (one thread), if run.
    pub peer_seconds: Option<f64>,
    pub peer_cpu_seconds: Option<f64>,
}

impl Measurement {
    pub fn samples_per_s(&self) -> f64 {
        self.samples as f64 / self.seconds
    }

    pub fn peer_samples_per_s(&self) -> Option<f64> {
        self.peer_seconds.map(|s| self.samples as f64 / s)
    }

    /// Ours per core over the peer's (single-threaded) rate, wall clock.
    pub fn ratio_per_core(&self) -> Option<f64> {
        self.peer_samples_per_s()
            .map(|p| self.samples_per_s() / self.workers as f64 / p)
    }

    /// Samples per CPU-second, ours over the peer's: per core, and robust to a loaded machine.
    pub fn ratio_per_cpu_second(&self) -> Option<f64> {
        self.peer_cpu_seconds.map(|p| p / self.cpu_seconds)
    }

    pub fn json(&self) -> Value {
        json!({
            "bench": "data",
            "name": format!("data/workers{}", self.workers),
            "figure": self.samples_per_s(),
            "unit": "samples/s",
            // the peer: transformers' MllamaProcessor + the seed's masking, one thread
            "peer": self.peer_samples_per_s(),
            "ratio": self.peer_samples_per_s().map(|p| self.samples_per_s() / p),
            "workers": self.workers,
            "samples": self.samples,
            "seconds": self.seconds,
            "samples_per_s": self.samples_per_s(),
            "samples_per_s_per_core": self.samples_per_s() / self.workers as f64,
            "peer_samples_per_s": self.peer_samples_per_s(),
            "ratio_per_core": self.ratio_per_core(),
            "cpu_seconds": self.cpu_seconds,
            "samples_per_cpu_s": self.samples as f64 / self.cpu_seconds,
            "peer_samples_per_cpu_s": self.peer_cpu_seconds.map(|c| self.samples as f64 / c),
            "ratio_per_cpu_s": self.ratio_per_cpu_second(),
        })
    }
}

pub fn table(ms: &[Measurement]) -> String {
    let mut s = format!(
        "{:>7} {:>8} {:>10} {:>12} {:>16} {:>9} {:>12} {:>18} {:>9}\n",
        "workers",
        "samples",
        "ours/s",
        "ours/s/core",
        "transformers/s",
        "per core",
        "ours/cpu-s",
        "transformers/cpu-s",
        "per cpu-s"
    );
    let opt = |v: Option<f64>, suffix: &str| v.map_or("-".into(), |r| format!("{r:.2}{suffix}"));
    for m in ms {
        s += &format!(
            "{:>7} {:>8} {:>10.2} {:>12.2} {:>16} {:>9} {:>12.2} {:>18} {:>9}\n",
            m.workers,
            m.samples,
            m.samples_per_s(),
            m.samples_per_s() / m.workers as f64,
            opt(m.peer_samples_per_s(), ""),
            opt(m.ratio_per_core(), "x"),
            m.samples as f64 / m.cpu_seconds,
            opt(m.peer_cpu_seconds.map(|c| m.samples as f64 / c), ""),
            opt(m.ratio_per_cpu_second(), "x"),
        );
    }
    s
}

/// CPU milliseconds per sample of each stage of the loader's path, one thread, over every record.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    pub samples: usize,
    pub decode_ms: f64,
    /// Canvas choice and the Pillow-exact resize (`image::process`).
    pub resize_ms: f64,
    pub text_ms: f64,
    /// Padding collate, then pad + rescale + normalize + tiles from the u8 images straight into
    /// the batch's pixel tensor (`dataset::to_model_batch_fused`), as the loader does.
    pub batch_ms: f64,
    /// Whether the JPEG decoder ran its SIMD code (`jpeg::simd_in_use`).
    pub jpeg_simd: bool,
}

impl Stages {
    pub fn json(&self) -> Value {
        let total_ms = self.decode_ms + self.resize_ms + self.text_ms + self.batch_ms;
        json!({"bench": "data-stages", "name": "data/stages", "figure": total_ms,
            "unit": "CPU ms/sample", "peer": null, "ratio": null,
            "samples": self.samples, "decode_ms": self.decode_ms,
            "resize_ms": self.resize_ms, "template_tokenize_mask_ms": self.text_ms,
            "collate_normalize_tile_ms": self.batch_ms, "jpeg_simd": self.jpeg_simd})
    }

    pub fn line(&self) -> String {
        format!(
            "per sample, one thread (CPU ms): decode {:.1}{}, resize {:.1}, template+tokenize+mask {:.2}, collate+pad+normalize+tiles into the tensor {:.1}\n",
            self.decode_ms,
            if self.jpeg_simd { "" } else { " (libjpeg-turbo without SIMD)" },
            self.resize_ms,
            self.text_ms,
            self.batch_ms
        )
    }
}

/// Time each stage of the loader's path separately, one thread (the profile behind the figures).
pub fn stages(model: &Path, jsonl: &Path, images: &Path, batch: usize) -> Result<Stages> {
    use crate::data::collate::{collate_text, Sample};
    use crate::data::dataset::{recycle, to_model_batch_fused};
    use crate::data::image::{load_rgb, process, ImageProcessorConfig};

    let yaml = format!(
        "model: {{path: {}}}\ndata: {{train: {}, image_root: {}, num_workers: 1}}\n",
        model.display(),
        jsonl.display(),
        images.display()
    );
    let cfg = config::parse(&yaml, &[]).context("bench config")?;
    let ds = Dataset::open(&cfg, model, Split::Train)?;
    let icfg = ImageProcessorConfig::from_model_dir(model).map_err(anyhow::Error::msg)?;
    let text = ds.text_processor();
    let mut st = Stages {
        samples: ds.len(),
        jpeg_simd: crate::data::jpeg::simd_in_use(),
        ..Stages::default()
    };
    let mut pending = Vec::new();
    let mut clock = cpu_seconds(true);
    let mut lap = |acc: &mut f64| {
        let now = cpu_seconds(true);
        *acc += now - clock;
        clock = now;
    };
    for i in 0..ds.len() {
        let r = ds.record(i);
        let path = r.image.as_ref().context("bench records have images")?;
        let rgb = load_rgb(path).map_err(anyhow::Error::msg)?;
        lap(&mut st.decode_ms);
        let img = process(&icfg, &rgb);
        crate::data::scratch::give(rgb.data);
        lap(&mut st.resize_ms);
        let enc = text.encode(&r.turns, true).map_err(anyhow::Error::msg)?;
        lap(&mut st.text_ms);
        pending.push(Sample {
            index: i,
            text: enc,
            image: Some(img),
        });
        if pending.len() == batch || i + 1 == ds.len() {
            let c = collate_text(
                &pending,
                text.ids.pad,
                text.ids.image,
                icfg.max_image_tiles,
                icfg.tile,
            );
            let b = to_model_batch_fused(&pending, &c);
            std::hint::black_box(&b);
            recycle(std::mem::take(&mut pending));
            drop(b);
            lap(&mut st.batch_ms);
        }
    }
    let per = 1000.0 / ds.len().max(1) as f64;
    for v in [
        &mut st.decode_ms,
        &mut st.resize_ms,
        &mut st.text_ms,
        &mut st.batch_ms,
    ] {
        *v *= per;
    }
    Ok(st)
}

/// CPU seconds (user + system) of this process, all threads; or of the calling thread.
fn cpu_seconds(thread_only: bool) -> f64 {
    let clock = if thread_only {
        libc::CLOCK_THREAD_CPUTIME_ID
    } else {
        libc::CLOCK_PROCESS_CPUTIME_ID
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer we pass.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Deterministic (width, height) of image `i`: about 640x480 to 2000x1500.
pub fn image_size(i: usize) -> (u32, u32) {
    let w = 640 + (i * 977 % 1361) as u32;
    let h = 480 + (i * 613 % 1021) as u32;
    (w, h)
}

/// Smooth gradients plus a little noise (JPEG sizes like photos, not like flat colour).
fn synth_rgb(w: u32, h: u32, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity((w * h * 3) as usize);
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for y in 0..h {
        for x in 0..w {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let n = (state & 15) as i32 - 8;
            let fx = x as f32 / w as f32;
            let fy = y as f32 / h as f32;
            let r = 127.0 + 110.0 * (fx * 7.0 + seed as f32).sin();
            let g = 127.0 + 110.0 * (fy * 5.0 + fx * 2.0).cos();
            let b = 127.0 + 110.0 * ((fx + fy) * 9.0).sin();
            for v in [r, g, b] {
                out.push((v as i32 + n).clamp(0, 255) as u8);
            }
        }
    }
    out
}

fn record(i: usize) -> Value {
    let q = format!(
        "<image>\nQuestion {i}: How many objects are there in the image, and what colour is the largest one? {}",
        "Answer the question using a single word. ".repeat(i % 3)
    );
    let a = format!(
        "<SUMMARY> I count the objects and name the colour of the largest. </SUMMARY> <CAPTION> {} </CAPTION> <REASONING> {} </REASONING> <CONCLUSION> three, red </CONCLUSION>",
        "The image shows a red square and a blue circle on a white table. ".repeat(1 + i % 4),
        "There are three objects. The square is the largest. ".repeat(1 + i % 5)
    );
    let mut conv = vec![
        json!({"from": "human", "value": q}),
        json!({"from": "gpt", "value": a}),
    ];
    if i.is_multiple_of(3) {
        conv.push(json!({"from": "human", "value": "Please review your previous answer, find any mistakes, and give a corrected answer."}));
        conv.push(json!({"from": "gpt", "value": "<REASONING> I count again: three. </REASONING> <CONCLUSION> three </CONCLUSION>"}));
    }
    json!({"id": format!("bench-{i}"), "image": format!("img{i:04}.jpg"), "conversations": conv})
}

/// Write the model folder, `n` JPEGs and the JSONL under `dir`; returns (model dir, jsonl,
/// image root).
pub fn prepare(dir: &Path, n: usize) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let model = dir.join("model");
    let images = dir.join("images");
    std::fs::create_dir_all(&model).with_context(|| format!("creating {}", model.display()))?;
    std::fs::create_dir_all(&images)?;
    std::fs::write(model.join("tokenizer.json"), TOKENIZER)?;
    std::fs::write(model.join("tokenizer_config.json"), TOKENIZER_CONFIG)?;
    std::fs::write(model.join("preprocessor_config.json"), PREPROCESSOR_560)?;
    let mut lines = String::new();
    for i in 0..n {
        let p = images.join(format!("img{i:04}.jpg"));
        if !p.exists() {
            let (w, h) = image_size(i);
            let rgb = synth_rgb(w, h, i as u64);
            let mut buf = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 90)
                .encode(&rgb, w, h, image::ExtendedColorType::Rgb8)
                .with_context(|| format!("encoding {}", p.display()))?;
            std::fs::write(&p, buf).with_context(|| format!("writing {}", p.display()))?;
        }
        lines += &record(i).to_string();
        lines.push('\n');
    }
    let jsonl = dir.join("train.jsonl");
    std::fs::write(&jsonl, lines)?;
    Ok((model, jsonl, images))
}

/// Our median seconds for one pass over every sample with `workers` threads.
fn time_ours(
    model: &Path,
    jsonl: &Path,
    images: &Path,
    workers: usize,
    batch: usize,
    reps: usize,
) -> Result<(usize, f64, f64)> {
    let yaml = format!(
        "model: {{path: {}}}\ndata: {{train: {}, image_root: {}, num_workers: {workers}}}\ntrain: {{seed: 1, batch_size: {batch}}}\n",
        model.display(),
        jsonl.display(),
        images.display()
    );
    let cfg = config::parse(&yaml, &[]).context("bench config")?;
    let ds = Dataset::open(&cfg, model, Split::Train)?;
    let mut times = Vec::new();
    let mut samples = 0;
    for _ in 0..reps.max(1) {
        let (t, c) = (Instant::now(), cpu_seconds(false));
        samples = 0;
        for mb in ds.epoch_iter(0, 0, 0, 1, batch, 1) {
            let mb = mb?;
            samples += mb.sample_indices.len();
            std::hint::black_box(&mb.batch);
        }
        times.push((t.elapsed().as_secs_f64(), cpu_seconds(false) - c));
    }
    times.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (wall, cpu) = times[times.len() / 2];
    Ok((samples, wall, cpu))
}

/// The peer's median seconds over the first `samples` records (same batches of `batch`).
fn time_peer(
    (python, script): (&Path, &Path),
    (model, jsonl, images): (&Path, &Path, &Path),
    samples: usize,
    batch: usize,
    reps: usize,
) -> Result<(f64, f64)> {
    let mut cmd = Command::new(python);
    cmd.arg(script)
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(jsonl)
        .arg("--image-root")
        .arg(images)
        .args([
            "--samples",
            &samples.to_string(),
            "--batch-size",
            &batch.to_string(),
            "--reps",
            &reps.to_string(),
        ])
        .env("OMP_NUM_THREADS", "1")
        .env("MKL_NUM_THREADS", "1")
        // (the fast tokenizer's own thread pool: the peer is one core, as the ratio counts it)
        .env("TOKENIZERS_PARALLELISM", "false")
        .env("RAYON_NUM_THREADS", "1");
    let v = super::peer_json(cmd, script)?;
    let f = |k: &str| {
        v.get(k)
            .and_then(Value::as_f64)
            .with_context(|| format!("{} gave no {k}: {v}", script.display()))
    };
    Ok((f("seconds")?, f("cpu_seconds")?))
}

/// Prepare the inputs, measure the stages, each worker count and the peer once; removes `dir`
/// afterwards.
pub fn run(o: &DataBenchOptions) -> Result<(Stages, Vec<Measurement>)> {
    if o.images < o.batch_size || o.batch_size == 0 {
        bail!(
            "--images {} must be at least --batch-size {} (> 0)",
            o.images,
            o.batch_size
        );
    }
    let (model, jsonl, images) = prepare(&o.dir, o.images)?;
    let result = (|| {
        let st = stages(&model, &jsonl, &images, o.batch_size)?;
        let mut ms = Vec::new();
        let mut peer = None;
        for &k in &o.workers {
            let (samples, seconds, cpu_seconds) =
                time_ours(&model, &jsonl, &images, k.max(1), o.batch_size, o.reps)?;
            if peer.is_none() {
                if let Some((py, script)) = &o.peer {
                    peer = Some(time_peer(
                        (py, script),
                        (&model, &jsonl, &images),
                        samples,
                        o.batch_size,
                        o.reps,
                    )?);
                }
            }
            ms.push(Measurement {
                workers: k.max(1),
                samples,
                seconds,
                cpu_seconds,
                peer_seconds: peer.map(|p| p.0),
                peer_cpu_seconds: peer.map(|p| p.1),
            });
        }
        Ok((st, ms))
    })();
    std::fs::remove_dir_all(&o.dir).ok();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_span_the_issue_range() {
        let sizes: Vec<_> = (0..512).map(image_size).collect();
        assert!(sizes
            .iter()
            .all(|&(w, h)| (640..=2000).contains(&w) && (480..=1500).contains(&h)));
        assert!(sizes.iter().any(|&(w, _)| w > 1900));
        assert!(sizes.iter().any(|&(_, h)| h > 1400));
    }

    #[test]
    fn ratio_is_per_core() {
        let m = Measurement {
            workers: 2,
            samples: 100,
            seconds: 1.0,
            cpu_seconds: 2.0,
            peer_seconds: Some(10.0),
            peer_cpu_seconds: Some(12.0),
        };
        assert_eq!(m.samples_per_s(), 100.0);
        assert_eq!(m.ratio_per_core(), Some(5.0));
        assert_eq!(m.ratio_per_cpu_second(), Some(6.0));
        let t = table(&[m]);
        assert!(t.contains("5.00x") && t.contains("6.00x"), "{t}");
    }
}
