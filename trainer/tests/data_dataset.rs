//! `Dataset`: pre-scan and report, world-size-independent steps, exact resume, bad records
//! (error vs skip, at scan and at load time), determinism across worker counts.
use std::path::{Path, PathBuf};

use tch::Tensor;
use trainer::config::{self, Config};
use trainer::data::dataset::{DataError, Dataset, MicroBatch, Split};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data")
}

/// A fresh temp folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "trainer-data-dataset-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const IMAGES: [&str; 8] = [
    "small.png",
    "large.png",
    "photo.jpg",
    "gray.png",
    "layout_1x2.png",
    "layout_2x2.png",
    "tall_1x8.png",
    "palette.png",
];

/// `n` good records with varied lengths and images.
fn good_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let q = format!("<image>\nQuestion {i}: {}", "what is it? ".repeat(i % 5));
            let a = format!("<SUMMARY> answer {i} </SUMMARY> {}", "word ".repeat((i * 7) % 11));
            let mut conv = vec![
                serde_json::json!({"from": "human", "value": q}),
                serde_json::json!({"from": "gpt", "value": a}),
            ];
            if i % 3 == 0 {
                conv.push(serde_json::json!({"from": "human", "value": "Please check again."}));
                conv.push(serde_json::json!({"from": "gpt", "value": format!("Corrected {i}.")}));
            }
            serde_json::json!({"id": format!("r{i}"), "image": IMAGES[i % IMAGES.len()], "conversations": conv})
                .to_string()
        })
        .collect()
}

fn write_jsonl(dir: &Path, lines: &[String]) -> PathBuf {
    let p = dir.join("train.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn config(train: &Path, image_root: &Path, overrides: &[&str]) -> Config {
    let yaml = format!(
        "model: {{path: {}}}\ndata: {{train: {}, image_root: {}, num_workers: 2}}\ntrain: {{seed: 7}}\n",
        fixtures().join("tok").display(),
        train.display(),
        image_root.display()
    );
    let ov: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    config::parse(&yaml, &ov).unwrap()
}

fn open(cfg: &Config) -> Result<Dataset, DataError> {
    Dataset::open(cfg, &fixtures().join("tok"), Split::Train)
}

fn good_dataset(name: &str, n: usize, overrides: &[&str]) -> Dataset {
    let dir = temp_dir(name);
    let train = write_jsonl(&dir, &good_lines(n));
    open(&config(&train, &fixtures().join("images"), overrides)).unwrap()
}

fn collect(it: impl Iterator<Item = Result<MicroBatch, DataError>>) -> Vec<MicroBatch> {
    it.map(|r| r.unwrap()).collect()
}

fn ints(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.flatten(0, -1)).unwrap()
}

fn floats(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

/// Each row of input_ids without right padding.
fn rows(mb: &MicroBatch) -> Vec<Vec<i64>> {
    let ids = &mb.batch.input_ids;
    let mask = mb.batch.attention_mask.as_ref().unwrap();
    let (b, _) = ids.size2().unwrap();
    (0..b)
        .map(|i| {
            let n = ints(&mask.get(i)).iter().sum::<i64>() as usize;
            ints(&ids.get(i))[..n].to_vec()
        })
        .collect()
}

#[test]
fn dataset_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Dataset>();
}

#[test]
fn open_reports_counts_lengths_tiles_and_supervision() {
    let ds = good_dataset("report", 16, &[]);
    assert_eq!(ds.len(), 16);
    assert!(!ds.is_empty());
    let r = ds.report();
    assert_eq!((r.lines, r.ok, r.skipped_total()), (16, 16, 0));
    assert_eq!(r.lengths.len(), 16);
    let pct = r.length_percentiles();
    assert_eq!(pct.first().unwrap().0, 0);
    assert_eq!(pct.last().unwrap().1, *r.lengths.iter().max().unwrap());
    assert_eq!(r.tiles.values().sum::<usize>(), 16);
    assert!(
        r.tiles.keys().all(|&t| (1..=4).contains(&t)),
        "{:?}",
        r.tiles
    );
    assert!(r.supervised_share() > 0.0 && r.supervised_share() < 1.0);
    let shown = r.to_string();
    assert!(shown.contains("16 ok"), "{shown}");
    assert!(shown.contains("supervised tokens"), "{shown}");
    assert_eq!(ds.batches_per_epoch(4), 4);
    // (16 = 3 x 5 + a partial global batch of 1)
    assert_eq!((ds.batches_per_epoch(5), ds.partial_batch_len(5)), (4, 1));
}

#[test]
fn micro_batches_hold_the_model_tensors() {
    let ds = good_dataset("tensors", 8, &[]);
    let mbs = collect(ds.epoch_iter(0, 0, 0, 1, 2, 1));
    assert_eq!(mbs.len(), 4);
    for (k, mb) in mbs.iter().enumerate() {
        assert_eq!(mb.position.epoch, 0);
        assert_eq!(mb.position.batch, k as u64);
        assert_eq!(mb.micro_step, 0);
        assert_eq!(mb.sample_indices.len(), 2);
        let (b, s) = mb.batch.input_ids.size2().unwrap();
        assert_eq!(b, 2);
        let labels = ints(mb.batch.labels.as_ref().unwrap());
        let want: i64 = labels
            .chunks(s as usize)
            .map(|r| r[1..].iter().filter(|&&l| l != -100).count() as i64)
            .sum();
        assert_eq!(mb.supervised_tokens, want);
        assert!(want > 0);
        let im = mb.batch.images.as_ref().unwrap();
        assert_eq!(im.pixel_values.size(), [2, 1, 4, 3, 56, 56]);
        assert_eq!(im.aspect_ratio_ids.size(), [2, 1]);
        assert_eq!(im.aspect_ratio_mask.size(), [2, 1, 4]);
        assert_eq!(im.cross_attention_mask.size(), [2, s, 1, 4]);
        // rows are exactly what the tokenizer gives for those records
        for (row, &i) in rows(mb).iter().zip(&mb.sample_indices) {
            let rec = ds.record(i);
            let enc = ds.text_processor().encode(&rec.turns, true).unwrap();
            assert_eq!(row, &enc.input_ids);
            assert_eq!(row.len(), ds.length(i));
        }
    }
}

#[test]
fn world_1_and_2_and_grad_accum_see_the_same_samples_per_step() {
    let ds = good_dataset("world", 24, &[]);
    // (world, batch_size, grad_accum) with the same global batch of 4
    let w1 = collect(ds.epoch_iter(1, 0, 0, 1, 4, 1));
    assert_eq!(w1.len(), 6);
    let w2: Vec<Vec<MicroBatch>> = (0..2)
        .map(|r| collect(ds.epoch_iter(1, 0, r, 2, 2, 1)))
        .collect();
    let acc = collect(ds.epoch_iter(1, 0, 0, 1, 2, 2));
    let w2acc: Vec<Vec<MicroBatch>> = (0..2)
        .map(|r| collect(ds.epoch_iter(1, 0, r, 2, 1, 2)))
        .collect();
    for (g, step) in w1.iter().enumerate() {
        let want = &step.sample_indices;
        let mut got = w2[0][g].sample_indices.clone();
        got.extend(&w2[1][g].sample_indices);
        assert_eq!(&got, want, "world 2, batch {g}");
        let mut got = acc[2 * g].sample_indices.clone();
        got.extend(&acc[2 * g + 1].sample_indices);
        assert_eq!(&got, want, "grad_accum 2, batch {g}");
        assert_eq!((acc[2 * g].micro_step, acc[2 * g + 1].micro_step), (0, 1));
        assert_eq!(acc[2 * g + 1].position, step.position);
        let mut got: Vec<usize> = Vec::new();
        for m in 0..2 {
            for rank in &w2acc {
                got.extend(&rank[2 * g + m].sample_indices);
            }
        }
        assert_eq!(&got, want, "world 2 x grad_accum 2, batch {g}");
        // and the same token rows
        let mut rows2 = rows(&w2[0][g]);
        rows2.extend(rows(&w2[1][g]));
        assert_eq!(rows2, rows(step));
        // supervised tokens add up over the ranks
        assert_eq!(
            w2[0][g].supervised_tokens + w2[1][g].supervised_tokens,
            step.supervised_tokens
        );
        // and match the per-sample counts of the scan (no collective needed)
        let planned: usize = want.iter().map(|&i| ds.supervised_tokens(i)).sum();
        assert_eq!(planned as i64, step.supervised_tokens);
    }
    // every sample at most once per epoch, and epochs are shuffled differently
    let mut all: Vec<usize> = w1.iter().flat_map(|m| m.sample_indices.clone()).collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 24);
    let e0: Vec<Vec<usize>> = collect(ds.epoch_iter(0, 0, 0, 1, 4, 1))
        .into_iter()
        .map(|m| m.sample_indices)
        .collect();
    let e1: Vec<Vec<usize>> = w1.iter().map(|m| m.sample_indices.clone()).collect();
    assert_ne!(e0, e1, "epochs must be reshuffled");
}

#[test]
fn resume_from_a_position_gives_the_same_remaining_batches() {
    let ds = good_dataset("resume", 20, &[]);
    let full = collect(ds.epoch_iter(2, 0, 0, 1, 2, 2));
    let tail = collect(ds.epoch_iter(2, 3, 0, 1, 2, 2));
    assert_eq!(full.len(), 10);
    assert_eq!(tail.len(), 4);
    for (a, b) in full[6..].iter().zip(&tail) {
        assert_eq!(a.position, b.position);
        assert_eq!(a.micro_step, b.micro_step);
        assert_eq!(a.sample_indices, b.sample_indices);
        assert!(a.batch.input_ids.equal(&b.batch.input_ids));
        let (pa, pb) = (
            &a.batch.images.as_ref().unwrap().pixel_values,
            &b.batch.images.as_ref().unwrap().pixel_values,
        );
        assert_eq!(floats(pa), floats(pb));
    }
    // resuming at another world size with the same global batch continues the same samples
    let tail_w2: Vec<usize> = (0..2usize)
        .map(|r| collect(ds.epoch_iter(2, 3, r, 2, 1, 2)))
        .collect::<Vec<_>>()
        .iter()
        .fold(vec![Vec::new(); 4], |mut acc, rank| {
            for (k, mb) in rank.iter().enumerate() {
                acc[k].extend(&mb.sample_indices);
            }
            acc
        })
        .concat();
    let want: Vec<usize> = tail.iter().flat_map(|m| m.sample_indices.clone()).collect();
    assert_eq!(tail_w2, want);
    // past the end: nothing
    assert_eq!(ds.epoch_iter(2, 5, 0, 1, 2, 2).count(), 0);
}

/// The last, partial global batch (train.drop_last false, the default): its samples are the same
/// at any world size and grad_accum, in fewer micro-steps (`micro_steps`), and a rank left without
/// a sample in its last micro-step runs a filler row that counts no token.
#[test]
fn the_partial_last_batch_holds_the_same_samples_at_any_layout() {
    let ds = good_dataset("partial", 11, &[]);
    // global batch 4: two whole ones and a partial one of 3
    assert_eq!((ds.batches_per_epoch(4), ds.partial_batch_len(4)), (3, 3));
    let step_samples = |world: usize, bs: usize, ga: usize| -> (Vec<usize>, i64, usize) {
        let mut samples = Vec::new();
        let (mut tokens, mut fillers) = (0, 0);
        for rank in 0..world {
            let mbs = collect(ds.epoch_iter(1, 2, rank, world, bs, ga));
            assert_eq!(mbs.len(), ds.micro_steps(2, bs, world, ga), "world {world}");
            for mb in &mbs {
                assert_eq!(mb.position.batch, 2);
                let real = mb.sample_indices.len() - mb.filler_rows;
                samples.extend(&mb.sample_indices[..real]);
                tokens += mb.supervised_tokens;
                fillers += mb.filler_rows;
            }
        }
        samples.sort();
        (samples, tokens, fillers)
    };
    let (want, tokens, fillers) = step_samples(1, 4, 1);
    assert_eq!((want.len(), fillers), (3, 0));
    let planned: usize = want.iter().map(|&i| ds.supervised_tokens(i)).sum();
    assert_eq!(planned as i64, tokens);
    // (world, batch_size, grad_accum) -> filler rows: world 2 x 1 x 2 cuts it into [2] + [1], the
    // second rank's part of the last micro-step empty; world 4 x 1 x 1: one rank empty
    for (layout, fill) in [
        ((1, 2, 2), 0),
        ((2, 1, 2), 1),
        ((2, 2, 1), 0),
        ((4, 1, 1), 1),
    ] {
        let (w, b, g) = layout;
        assert_eq!(
            step_samples(w, b, g),
            (want.clone(), tokens, fill),
            "{layout:?}"
        );
    }
    assert_eq!(ds.micro_steps(2, 1, 2, 2), 2);
    assert_eq!(ds.micro_steps(1, 1, 2, 2), 2);
    // with drop_last they sit out
    let dropped = good_dataset("partial-dropped", 11, &["train.drop_last=true"]);
    assert_eq!(dropped.batches_per_epoch(4), 2);
    assert_eq!(dropped.epoch_iter(1, 2, 0, 1, 4, 1).count(), 0);
}

#[test]
fn output_is_deterministic_across_worker_counts() {
    let dir = temp_dir("workers");
    let train = write_jsonl(&dir, &good_lines(12));
    let images = fixtures().join("images");
    let mut runs = Vec::new();
    for w in ["1", "3"] {
        let cfg = config(&train, &images, &[&format!("data.num_workers={w}")]);
        let ds = open(&cfg).unwrap();
        runs.push(collect(ds.epoch_iter(0, 0, 0, 1, 3, 1)));
    }
    assert_eq!(runs[0].len(), 4);
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert_eq!(a.sample_indices, b.sample_indices);
        assert!(a.batch.input_ids.equal(&b.batch.input_ids));
        assert!(a
            .batch
            .labels
            .as_ref()
            .unwrap()
            .equal(b.batch.labels.as_ref().unwrap()));
        let (ia, ib) = (
            a.batch.images.as_ref().unwrap(),
            b.batch.images.as_ref().unwrap(),
        );
        assert_eq!(floats(&ia.pixel_values), floats(&ib.pixel_values));
        assert!(ia.cross_attention_mask.equal(&ib.cross_attention_mask));
    }
}

fn bad_lines() -> Vec<String> {
    let mut lines = good_lines(6);
    lines.insert(2, "{not json".into());
    lines.insert(
        4,
        r#"{"id": "x", "image": "missing.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#.into(),
    );
    lines.push(r#"{"id": "t", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}"#.into());
    lines
}

#[test]
fn bad_records_error_names_file_line_and_counts_all() {
    let dir = temp_dir("bad-error");
    let train = write_jsonl(&dir, &bad_lines());
    let err = open(&config(&train, &fixtures().join("images"), &[]))
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        matches!(err, DataError::BadRecords { count: 2, .. }),
        "{msg}"
    );
    assert!(
        msg.starts_with(&format!("{}:3: malformed JSON", train.display())),
        "{msg}"
    );
    assert!(msg.contains("2 bad record(s)"), "{msg}");
    assert!(msg.contains("data.bad_records: skip"), "{msg}");
}

#[test]
fn bad_records_skip_counts_them_by_reason() {
    let dir = temp_dir("bad-skip");
    let train = write_jsonl(&dir, &bad_lines());
    let ds = open(&config(
        &train,
        &fixtures().join("images"),
        &["data.bad_records=skip"],
    ))
    .unwrap();
    assert_eq!(ds.len(), 6);
    let r = ds.report();
    assert_eq!(r.lines, 9);
    assert_eq!(r.skipped["bad record"], 2);
    assert_eq!(r.skipped["text-only"], 1);
    assert_eq!(r.problems.len(), 2);
    assert_eq!(r.problems[0].line, 3);
    assert_eq!(r.problems[1].line, 5);
    assert!(
        r.problems[1].reason.contains("missing.png"),
        "{}",
        r.problems[1]
    );
    let shown = r.to_string();
    assert!(
        shown.contains(&format!("{}:5: image", train.display())),
        "{shown}"
    );
}

#[test]
fn text_only_keep_makes_batches_without_images() {
    let dir = temp_dir("text-only");
    let lines: Vec<String> = (0..4)
        .map(|i| format!(r#"{{"id": "t{i}", "conversations": [{{"from": "human", "value": "question {i}"}}, {{"from": "gpt", "value": "answer {i}"}}]}}"#))
        .collect();
    let train = write_jsonl(&dir, &lines);
    let ds = open(&config(
        &train,
        &fixtures().join("images"),
        &["data.text_only=keep"],
    ))
    .unwrap();
    assert_eq!(ds.report().text_only_kept, 4);
    assert_eq!(ds.report().tiles[&0], 4);
    let mbs = collect(ds.epoch_iter(0, 0, 0, 1, 2, 1));
    assert_eq!(mbs.len(), 2);
    assert!(mbs.iter().all(|m| m.batch.images.is_none()));
}

#[test]
fn length_policy_skip_truncate_error() {
    let dir = temp_dir("length");
    let train = write_jsonl(&dir, &good_lines(8));
    let images = fixtures().join("images");
    let probe = open(&config(&train, &images, &[])).unwrap();
    let mut lens = probe.report().lengths.clone();
    lens.sort();
    let cut = lens[4]; // samples longer than this: at least 3
    let longer = lens.iter().filter(|&&l| l > cut).count();
    let set = format!("data.max_seq_len={cut}");

    let ds = open(&config(&train, &images, &[&set])).unwrap();
    assert_eq!(ds.len(), 8 - longer);
    assert_eq!(ds.report().skipped["too long"], longer);
    // each named, with its length (`data check` lists them)
    assert_eq!(ds.report().too_long.len(), longer);
    let why = &ds.report().too_long[0].reason;
    assert!(why.contains(&format!("> data.max_seq_len {cut}")), "{why}");

    let ds = open(&config(
        &train,
        &images,
        &[&set, "data.max_seq_len_policy=truncate"],
    ))
    .unwrap();
    assert!(ds.report().lengths.iter().all(|&l| l <= cut));
    assert_eq!(ds.len() + ds.report().skipped_total(), 8);
    assert!(ds.report().truncated > 0);
    for mb in collect(ds.epoch_iter(0, 0, 0, 1, 2, 1)) {
        assert!(mb.batch.input_ids.size2().unwrap().1 <= cut as i64);
    }

    let err = open(&config(
        &train,
        &images,
        &[&set, "data.max_seq_len_policy=error"],
    ))
    .err()
    .unwrap();
    assert!(
        matches!(err, DataError::TooLong { count, .. } if count == longer),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("{}:", train.display())),
        "{err}"
    );
}

/// A PNG whose header is fine but whose data is cut: the pre-scan passes, decoding fails.
fn truncated_image_setup(name: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(name);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in IMAGES {
        std::fs::copy(fixtures().join("images").join(f), images.join(f)).unwrap();
    }
    let bytes = std::fs::read(fixtures().join("images/large.png")).unwrap();
    std::fs::write(images.join("large.png"), &bytes[..bytes.len() / 3]).unwrap();
    let train = write_jsonl(&dir, &good_lines(8)); // record 1 (line 2) uses large.png
    (train, images)
}

#[test]
fn decode_error_at_load_time_is_an_error_naming_file_line() {
    let (train, images) = truncated_image_setup("decode-error");
    let ds = open(&config(&train, &images, &[])).unwrap(); // the header is readable
    assert_eq!(ds.len(), 8);
    let results: Vec<_> = ds.epoch_iter(0, 0, 0, 1, 8, 1).collect();
    assert_eq!(results.len(), 1);
    let err = results.into_iter().next().unwrap().err().unwrap();
    assert!(matches!(err, DataError::Decode(_)));
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!("{}:2: ", train.display())),
        "{msg}"
    );
    assert!(msg.contains("large.png"), "{msg}");
}

#[test]
fn decode_error_under_skip_replaces_with_the_next_sample_and_counts() {
    let (train, images) = truncated_image_setup("decode-skip");
    let ds = open(&config(&train, &images, &["data.bad_records=skip"])).unwrap();
    let mbs = collect(ds.epoch_iter(0, 0, 0, 1, 8, 1));
    assert_eq!(mbs.len(), 1);
    let mut got = mbs[0].sample_indices.clone();
    assert!(!got.contains(&1), "{got:?}");
    got.sort();
    assert_eq!(
        got,
        vec![0, 2, 2, 3, 4, 5, 6, 7],
        "sample 1 is replaced by sample 2"
    );
    assert_eq!(ds.replaced_samples(), 1);
    // (the micro-batch says so too: the training loop reports it in metrics.jsonl)
    assert_eq!(mbs[0].replaced, 1);
    // deterministic: the same again with another worker count
    let ds3 = open(&config(
        &train,
        &images,
        &["data.bad_records=skip", "data.num_workers=3"],
    ))
    .unwrap();
    let again = collect(ds3.epoch_iter(0, 0, 0, 1, 8, 1));
    assert_eq!(again[0].sample_indices, mbs[0].sample_indices);
}

#[test]
fn eval_split_and_bad_layouts() {
    let dir = temp_dir("eval");
    let train = write_jsonl(&dir, &good_lines(4));
    let images = fixtures().join("images");
    let err = Dataset::open(
        &config(&train, &images, &[]),
        &fixtures().join("tok"),
        Split::Eval,
    )
    .err()
    .unwrap();
    assert!(matches!(err, DataError::NoEvalSplit), "{err}");
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, good_lines(3).join("\n")).unwrap();
    let cfg = config(&train, &images, &[&format!("data.eval={}", eval.display())]);
    let ds = Dataset::open(&cfg, &fixtures().join("tok"), Split::Eval).unwrap();
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.report().split, "eval");
    let first = ds.epoch_iter(0, 0, 2, 2, 1, 1).next().unwrap();
    assert!(matches!(first, Err(DataError::Layout(_))));
}

/// Rows whose labels are all -100 (eval fillers).
fn masked_rows(mb: &MicroBatch) -> usize {
    let labels = mb.batch.labels.as_ref().unwrap();
    let (b, _) = labels.size2().unwrap();
    (0..b)
        .filter(|&i| ints(&labels.get(i)).iter().all(|&l| l == -100))
        .count()
}

/// Evaluation sees every sample exactly once for N not divisible by batch x world: the last
/// partial global batch is kept, split over the ranks, a rank left without a sample gets one
/// masked filler row, every rank runs the same number of micro-batches, and the supervised
/// token count (the loss's denominator) is exactly the split's.
#[test]
fn eval_counts_every_sample_once_for_any_batch_and_world() {
    let ds = good_dataset("eval-all", 11, &[]);
    let total_tokens: i64 = (0..11).map(|i| ds.supervised_tokens(i) as i64).sum();
    assert!(total_tokens > 0);
    for (world, batch) in [(1, 4), (2, 2), (3, 2), (4, 3), (2, 8), (16, 1)] {
        let per_rank: Vec<Vec<MicroBatch>> = (0..world)
            .map(|r| collect(ds.eval_iter(r, world, batch, None)))
            .collect();
        let steps = per_rank[0].len();
        assert_eq!(
            steps,
            11usize.div_ceil(batch * world),
            "world {world} batch {batch}"
        );
        assert!(
            per_rank.iter().all(|m| m.len() == steps),
            "same forward count on all ranks"
        );
        let (mut seen, mut tokens, mut fillers) = (Vec::new(), 0i64, 0);
        for mbs in &per_rank {
            for mb in mbs {
                let n = mb.sample_indices.len();
                assert!((1..=batch).contains(&n), "{n} rows, batch {batch}");
                assert_eq!(masked_rows(mb), mb.filler_rows, "fillers are fully masked");
                seen.extend_from_slice(&mb.sample_indices[..n - mb.filler_rows]);
                tokens += mb.supervised_tokens;
                fillers += mb.filler_rows;
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            (0..11).collect::<Vec<_>>(),
            "world {world} batch {batch}"
        );
        assert_eq!(tokens, total_tokens, "world {world} batch {batch}");
        // fillers only where a rank had nothing left: 16 ranks x 1 over 11 samples -> 5
        let want_fillers = if 11 % (batch * world) == 0 {
            0
        } else {
            world.saturating_sub(11 % (batch * world))
        };
        assert_eq!(fillers, want_fillers, "world {world} batch {batch}");
    }
    // deterministic and independent of the worker count
    let a: Vec<Vec<usize>> = collect(ds.eval_iter(1, 3, 2, None))
        .into_iter()
        .map(|m| m.sample_indices)
        .collect();
    let ds1 = good_dataset("eval-all-1w", 11, &["data.num_workers=1"]);
    let b: Vec<Vec<usize>> = collect(ds1.eval_iter(1, 3, 2, None))
        .into_iter()
        .map(|m| m.sample_indices)
        .collect();
    assert_eq!(a, b);
    assert!(matches!(
        ds.eval_iter(3, 3, 2, None).next().unwrap(),
        Err(DataError::Layout(_))
    ));
}

/// `train.max_eval_samples`: evaluation reads the split's first N samples in file order, each
/// once, whatever the world and batch sizes (not the N shortest, which the length ordering would
/// give if the limit were applied after it); a limit past the split's end reads it all.
#[test]
fn an_eval_sample_limit_reads_the_first_samples_at_any_layout() {
    let ds = good_dataset("eval-limit", 11, &[]);
    let mut shortest: Vec<usize> = (0..11).collect();
    shortest.sort_by_key(|&i| ds.length(i));
    shortest.truncate(5);
    shortest.sort();
    assert_ne!(
        shortest,
        [0, 1, 2, 3, 4],
        "the fixture's 5 shortest are not its first 5"
    );
    for (world, batch) in [(1, 4), (2, 2), (3, 2), (4, 3), (16, 1)] {
        for (limit, want) in [(5, 5), (11, 11), (40, 11)] {
            let mut seen: Vec<usize> = (0..world)
                .flat_map(|r| collect(ds.eval_iter(r, world, batch, Some(limit))))
                .flat_map(|mb| {
                    let n = mb.sample_indices.len() - mb.filler_rows;
                    mb.sample_indices[..n].to_vec()
                })
                .collect();
            seen.sort();
            assert_eq!(
                seen,
                (0..want).collect::<Vec<_>>(),
                "world {world} batch {batch} limit {limit}"
            );
        }
    }
}

/// Under `bad_records: skip` a sample that fails to load during evaluation becomes a masked
/// filler, not a second copy of another sample.
#[test]
fn eval_under_skip_masks_failed_samples_instead_of_double_counting() {
    let (train, images) = truncated_image_setup("eval-skip");
    let ds = open(&config(&train, &images, &["data.bad_records=skip"])).unwrap();
    let mbs = collect(ds.eval_iter(0, 1, 3, None));
    let tokens: i64 = mbs.iter().map(|m| m.supervised_tokens).sum();
    let want: i64 = (0..8)
        .filter(|&i| i != 1)
        .map(|i| ds.supervised_tokens(i) as i64)
        .sum();
    assert_eq!(tokens, want, "sample 1 (truncated image) counts nothing");
    assert_eq!(mbs.iter().map(|m| m.filler_rows).sum::<usize>(), 1);
    assert!(mbs.iter().all(|m| masked_rows(m) == m.filler_rows));
}

/// The loader's fused path (pixels straight into the tensor) gives exactly the tensors of the
/// reference path (`collate` -> `to_model_batch`), padding tiles and rows included.
#[test]
fn fused_loader_tensors_equal_the_collate_reference() {
    use trainer::data::dataset::to_model_batch;
    let ds = good_dataset("fused", 10, &[]);
    // (3 x 3 and a partial batch of 1)
    let mbs = collect(ds.epoch_iter(0, 0, 0, 1, 3, 1));
    assert_eq!(mbs.len(), 4);
    for mb in &mbs {
        let reference = to_model_batch(&ds.load(&mb.sample_indices).unwrap().collated);
        let (a, b) = (&mb.batch, &reference);
        assert_eq!(ints(&a.input_ids), ints(&b.input_ids));
        assert_eq!(
            ints(a.labels.as_ref().unwrap()),
            ints(b.labels.as_ref().unwrap())
        );
        assert_eq!(
            ints(a.attention_mask.as_ref().unwrap()),
            ints(b.attention_mask.as_ref().unwrap())
        );
        let (ia, ib) = (a.images.as_ref().unwrap(), b.images.as_ref().unwrap());
        assert_eq!(ia.pixel_values.size(), ib.pixel_values.size());
        assert_eq!(floats(&ia.pixel_values), floats(&ib.pixel_values));
        assert_eq!(ints(&ia.aspect_ratio_ids), ints(&ib.aspect_ratio_ids));
        assert_eq!(ints(&ia.aspect_ratio_mask), ints(&ib.aspect_ratio_mask));
        assert_eq!(
            ints(&ia.cross_attention_mask),
            ints(&ib.cross_attention_mask)
        );
    }
    // padding tiles exist (images of 1..4 tiles) and hold zeros; real tiles do not
    let pv: Vec<f32> = mbs
        .iter()
        .flat_map(|m| floats(&m.batch.images.as_ref().unwrap().pixel_values))
        .collect();
    let zeros = pv.iter().filter(|&&v| v == 0.0).count();
    assert!(zeros > 0 && zeros < pv.len(), "{zeros} of {}", pv.len());
}

#[test]
fn every_jpeg_the_loader_decodes_passes_the_scan() {
    // arithmetic-coded (the image crate's JPEG decoder refuses it; libjpeg-turbo loads it)
    let dir = temp_dir("jpeg-scan");
    let line = |img: &str| {
        serde_json::json!({"id": img, "image": img, "conversations": [
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "<SUMMARY> a </SUMMARY>"}]})
        .to_string()
    };
    let train = write_jsonl(&dir, &[line("arith.jpg"), line("photo.jpg")]);
    let ds = open(&config(&train, &fixtures().join("images"), &[])).expect("scan");
    assert_eq!(ds.len(), 2);
    let batches = collect(ds.epoch_iter(0, 0, 0, 1, 2, 1));
    assert_eq!(batches.len(), 1);
}

/// An image processor config whose tiles are not the vision tower's (another tile size: the
/// vision tower's patch reshape would fail at the first step; another tile count: aspect-ratio
/// ids of other layouts) is refused when the data is opened, naming both files.
#[test]
fn processor_tiles_must_be_the_models() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train/model");
    let dir = temp_dir("tiles-mismatch");
    let train = write_jsonl(&dir, &good_lines(4));
    for (key, value, want) in [
        (
            "size",
            serde_json::json!({"height": 64, "width": 64}),
            "vision_config.image_size 56",
        ),
        (
            "max_image_tiles",
            serde_json::json!(2),
            "vision_config.max_num_tiles 4",
        ),
    ] {
        let folder = dir.join(format!("model-{key}"));
        std::fs::create_dir_all(&folder).unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(model.join(f), folder.join(f)).unwrap();
        }
        let mut pre: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(model.join("preprocessor_config.json")).unwrap(),
        )
        .unwrap();
        pre[key] = value;
        std::fs::write(folder.join("preprocessor_config.json"), pre.to_string()).unwrap();
        let cfg = config(&train, &fixtures().join("images"), &[]);
        let Err(e) = Dataset::open(&cfg, &folder, Split::Train) else {
            panic!("{key}: opened");
        };
        let err = e.to_string();
        assert!(
            err.contains(want) && err.contains("preprocessor_config.json"),
            "{err}"
        );
    }
}

/// `data.train` as a list: the files' records in order, as one dataset (the same samples as one
/// file holding both); problems name their own file and line, in list order.
#[test]
fn several_train_files_are_read_as_one_dataset_in_order() {
    let dir = temp_dir("several-files");
    let mut first = good_lines(3);
    first.push("{not json".into()); // line 4 of the first file
    let second = bad_lines(); // lines 3 and 5 of the second file are bad
    let (a, b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
    std::fs::write(&a, first.join("\n") + "\n").unwrap();
    std::fs::write(&b, second.join("\n") + "\n").unwrap();
    let list = format!("data.train=[{}, {}]", a.display(), b.display());
    let images = fixtures().join("images");
    let both = open(&config(&a, &images, &[&list, "data.bad_records=skip"])).unwrap();
    let joined = write_jsonl(&dir, &[first.clone(), second.clone()].concat());
    let one = open(&config(&joined, &images, &["data.bad_records=skip"])).unwrap();
    assert_eq!(both.len(), 3 + 6);
    assert_eq!(both.report().lengths, one.report().lengths);
    assert_eq!(both.report().lines, one.report().lines);
    let found: Vec<(PathBuf, usize)> = (both.report().problems.iter())
        .map(|p| (p.file.clone(), p.line))
        .collect();
    assert_eq!(found, [(a.clone(), 4), (b.clone(), 3), (b.clone(), 5)]);
    // under error: the first file's problem first, every file named
    let err = open(&config(&a, &images, &[&list]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!("{}:4: malformed JSON", a.display())),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "3 bad record(s) in {}, {}",
            a.display(),
            b.display()
        )),
        "{err}"
    );
    // a list must name a file
    let e = config::parse("model: {path: m}\ndata: {train: []}\n", &[])
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "data.train: an empty list: name a JSONL file, or a list of them"
    );
}
