//! `trainer data check|dump|build-sco` end to end through the real binary.
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::SafeTensors;
use trainer::config::TextOnly;
use trainer::data::dataset::{Dataset, Split};
use trainer::data::records::{parse_jsonl, ParseOptions, DEFAULT_CORRECTION_PROMPT};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trainer-data-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn trainer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .expect("run trainer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const IMAGES: [&str; 4] = ["small.png", "large.png", "layout_2x2.png", "photo.jpg"];

fn record(i: usize, image: &str) -> String {
    serde_json::json!({"id": format!("r{i}"), "image": image, "conversations": [
        {"from": "human", "value": format!("<image>\nQuestion {i}: {}", "why? ".repeat(i % 4))},
        {"from": "gpt", "value": format!("<CONCLUSION> answer {i} </CONCLUSION>")}
    ]})
    .to_string()
}

/// A config + JSONL in `dir` over a copy of some fixture images; returns the config path.
fn setup(dir: &Path, lines: &[String], extra_data: &str) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for f in IMAGES {
        std::fs::copy(fixtures().join("images").join(f), images.join(f)).unwrap();
    }
    let train = dir.join("train.jsonl");
    std::fs::write(&train, lines.join("\n") + "\n").unwrap();
    let cfg = dir.join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "model: {{path: {}}}\ndata: {{train: {}, image_root: {}{extra_data}}}\ntrain: {{batch_size: 2}}\n",
            fixtures().join("tok").display(),
            train.display(),
            images.display()
        ),
    )
    .unwrap();
    cfg
}

fn good_lines(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| record(i, IMAGES[i % IMAGES.len()]))
        .collect()
}

#[test]
fn check_prints_counts_percentiles_tiles_and_supervision() {
    let dir = temp_dir("check-ok");
    let cfg = setup(&dir, &good_lines(6), "");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 lines, 6 ok"), "{out}");
    assert!(out.contains("token lengths: min"), "{out}");
    assert!(
        out.contains("p50") && out.contains("p90") && out.contains("max"),
        "{out}"
    );
    assert!(out.contains("tiles per image: 1: "), "{out}");
    assert!(out.contains("supervised tokens:"), "{out}");
    assert!(out.contains("data check passed"), "{out}");
}

/// What `trainer train` refuses before reading a record, data check refuses too: fewer samples
/// than one global batch, a missing data.image_root (one error, not one per record); and
/// data.eval, which training reads only to validate, is checked only with train.validate.
#[test]
fn check_refuses_what_training_refuses_first() {
    let dir = temp_dir("check-as-train");
    let cfg = setup(&dir, &good_lines(3), "");
    let check = |sets: &[&str]| {
        let mut args = vec!["data", "check", cfg.to_str().unwrap()];
        args.extend(sets.iter().flat_map(|s| ["--set", *s]));
        trainer(&args)
    };
    let (code, out, err) = check(&["train.batch_size=4", "train.drop_last=true"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("3 samples do not fill one global batch of 4 (batch_size 4 x world 1 x grad_accum 1) and train.drop_last is true"),
        "{out}{err}"
    );
    // (without drop_last they are one partial step)
    let (code, out, err) = check(&["train.batch_size=4"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("at 1 rank(s): a global batch of 4 (batch_size 4 x world 1 x grad_accum 1), 1 step(s) per epoch, the last of them 3 sample(s)"),
        "{out}"
    );
    // --world: the global batch of a run at that many ranks
    let mut args = vec!["data", "check", cfg.to_str().unwrap(), "--world", "2"];
    args.extend([
        "--set",
        "train.batch_size=1",
        "--set",
        "train.drop_last=true",
    ]);
    let (code, out, err) = trainer(&args);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("at 2 rank(s): a global batch of 2 (batch_size 1 x world 2 x grad_accum 1), 1 step(s) per epoch; 1 sample(s) sit out each epoch (train.drop_last)"),
        "{out}"
    );
    args[4] = "3";
    args[6] = "train.batch_size=2";
    let (code, out, err) = trainer(&args);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("3 samples do not fill one global batch of 6 (batch_size 2 x world 3"),
        "{err}"
    );
    let (code, out, err) = check(&["data.image_root=/no/such/images"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("data.image_root: /no/such/images: no such folder"),
        "{err}"
    );
    assert!(!out.contains("cannot read"), "{out}");
    let eval = dir.join("eval.jsonl");
    std::fs::write(&eval, "not json\n").unwrap();
    let eval = format!("data.eval={}", eval.display());
    let (code, out, err) = check(&[&eval]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("not checked (train.validate is false: training does not read it)"),
        "{out}"
    );
    let (code, out, err) = check(&[&eval, "train.validate=true"]);
    assert_eq!(code, 1, "{out}{err}");
}

/// A sample whose image does not decode (its header whole: the scan let it through) is a bad
/// record in the report, and its length, tiles and tokens leave the statistics: the check of the
/// good records with it prints the statistics of the good records alone.
#[test]
fn check_statistics_leave_out_samples_whose_images_do_not_decode() {
    let dir = temp_dir("check-stats");
    let good: Vec<String> = (0..2).map(|i| record(i, "small.png")).collect();
    let cfg = setup(&dir, &good, ", bad_records: skip");
    let stats = |text: &str| -> Vec<String> {
        (text.lines())
            .filter(|l| {
                ["token lengths:", "tiles per image:", "supervised tokens:"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .map(str::to_string)
            .collect()
    };
    let (code, alone, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{alone}{err}");
    let photo = std::fs::read(dir.join("images/photo.jpg")).unwrap();
    std::fs::write(dir.join("images/cut.jpg"), &photo[..2000]).unwrap();
    let mut lines = good.clone();
    lines.push(record(7, "cut.jpg"));
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
    let (code, with, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{with}{err}");
    assert!(with.contains("3 lines, 2 ok"), "{with}");
    assert!(with.contains("train.jsonl:3: truncated JPEG"), "{with}");
    assert_eq!(stats(&with), stats(&alone), "{with}");
    assert_eq!(stats(&alone).len(), 3, "{alone}");
}

/// JPEG decoding without libjpeg-turbo's SIMD code (a build made before nasm was installed) is
/// said once, with the fix; with SIMD, nothing is said.
#[test]
fn check_says_once_whether_jpeg_decoding_runs_without_simd() {
    let dir = temp_dir("check-simd");
    let lines: Vec<String> = (0..3).map(|i| record(i, "photo.jpg")).collect();
    let cfg = setup(&dir, &lines, ", num_workers: 2");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let said = err.matches("without libjpeg-turbo's SIMD").count();
    if trainer::data::jpeg::simd_in_use() {
        assert_eq!(said, 0, "{err}");
    } else {
        assert_eq!(said, 1, "{err}");
        assert!(err.contains("cargo clean -p mozjpeg-sys"), "{err}");
    }
}

/// Good records plus a malformed line (3), an unknown role (5), and a truncated image (7)
/// that only decoding finds.
fn bad_setup(dir: &Path, extra: &str) -> (PathBuf, PathBuf) {
    let mut lines = good_lines(4);
    lines.insert(2, "{\"id\": 1,".into());
    lines.insert(
        4,
        r#"{"id": "x", "image": "small.png", "conversations": [{"from": "robot", "value": "q"}]}"#
            .into(),
    );
    lines.push(record(9, "cut.png"));
    let cfg = setup(dir, &lines, extra);
    let bytes = std::fs::read(fixtures().join("images/large.png")).unwrap();
    std::fs::write(dir.join("images/cut.png"), &bytes[..bytes.len() / 2]).unwrap();
    (cfg, dir.join("train.jsonl"))
}

#[test]
fn check_lists_every_problem_and_fails_under_bad_records_error() {
    let dir = temp_dir("check-bad");
    let (cfg, train) = bad_setup(&dir, "");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let t = train.display().to_string();
    assert!(out.contains(&format!("{t}:3: malformed JSON")), "{out}");
    assert!(
        out.contains(&format!("{t}:5: unknown role \"robot\"")),
        "{out}"
    );
    assert!(
        out.contains(&format!("{t}:7: corrupt or truncated image")),
        "{out}"
    );
    assert!(out.contains("problems: 3"), "{out}");
    assert!(err.contains("3 problem(s) would stop training"), "{err}");
}

/// `data.train` as a list: `data check` lists every file's problems, decoding ones included,
/// in file order and then by line.
#[test]
fn check_lists_the_problems_of_several_files_in_file_order() {
    let dir = temp_dir("check-several");
    let (_, train) = bad_setup(&dir, "");
    let mut lines = good_lines(3);
    lines.push(record(10, "cut.png")); // line 4: found only when decoded
    let first = dir.join("first.jsonl");
    std::fs::write(&first, lines.join("\n") + "\n").unwrap();
    let list = format!("data.train=[{}, {}]", first.display(), train.display());
    let cfg = dir.join("config.yaml");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap(), "--set", &list]);
    assert_eq!(code, 1, "{out}{err}");
    let (f, t) = (first.display().to_string(), train.display().to_string());
    let at = |what: &str| out.find(what).unwrap_or_else(|| panic!("{what} in\n{out}"));
    let order = [
        at(&format!("{f}:4: corrupt or truncated image")),
        at(&format!("{t}:3: malformed JSON")),
        at(&format!("{t}:5: unknown role")),
        at(&format!("{t}:7: corrupt or truncated image")),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");
    assert!(out.contains(&format!("train split: {f}, {t}")), "{out}");
}

/// A record left out with nothing supervised (here its answer lies past max_seq_len under
/// `truncate`) is named by data check, as training's log says it is; the log names no
/// text-only records (they are not listed).
#[test]
fn check_names_records_left_out_with_nothing_supervised() {
    let dir = temp_dir("check-unsupervised");
    let mut lines = good_lines(4);
    let long = serde_json::json!({"id": "long", "image": IMAGES[0], "conversations": [
        {"from": "human", "value": format!("<image>\n{}", "why? ".repeat(200))},
        {"from": "gpt", "value": "<CONCLUSION> yes </CONCLUSION>"}
    ]});
    lines.push(long.to_string());
    let cfg = setup(
        &dir,
        &lines,
        ", max_seq_len: 120, max_seq_len_policy: truncate",
    );
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("nothing supervised after truncation: 1"),
        "{out}"
    );
    let train = dir.join("train.jsonl");
    assert!(
        out.contains("  left out: 1\n")
            && out.contains(&format!(
                "{}:5: skipped: nothing supervised after truncation",
                train.display()
            )),
        "{out}"
    );
}

/// Records that repeat an earlier record's id are counted, the first named (they passed
/// without a word; `data dump` names samples by id).
#[test]
fn check_names_repeated_ids() {
    let dir = temp_dir("check-repeated-ids");
    let mut lines = good_lines(4);
    lines.push(lines[1].clone());
    lines.push(lines[1].clone());
    let cfg = setup(&dir, &lines, "");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    let train = dir.join("train.jsonl").display().to_string();
    let want = format!("repeated ids: 2 record(s) have the id of an earlier one, first \"r1\" at {train}:5 (first at {train}:2)");
    assert!(out.contains(&want), "{out}");
    let cfg = setup(&temp_dir("check-unique-ids"), &good_lines(4), "");
    let (_, out, _) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert!(!out.contains("repeated ids"), "{out}");
}

/// Fields the trainer does not read are named (a dataset's own metadata, or an image under a
/// key of another format whose record is then text-only and skipped without a word).
#[test]
fn check_names_the_fields_it_does_not_read() {
    let dir = temp_dir("check-unread-fields");
    let mut lines = good_lines(4);
    let mut extra: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    extra["source"] = "coco".into();
    extra["image_path"] = "x.jpg".into();
    lines[0] = extra.to_string();
    let cfg = setup(&dir, &lines, "");
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("fields not read: image_path, source (id, image and conversations are)"),
        "{out}"
    );
}

/// An empty file in a data.train list is named (it added no record without a word).
#[test]
fn check_names_an_empty_file_of_a_list() {
    let dir = temp_dir("check-empty-of-list");
    let cfg = setup(&dir, &good_lines(4), "");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "\n\n").unwrap();
    let list = format!(
        "data.train=[{}, {}]",
        dir.join("train.jsonl").display(),
        empty.display()
    );
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap(), "--set", &list]);
    assert_eq!(code, 0, "{out}{err}");
    let want = format!(
        "{} holds no record: it adds nothing to the split",
        empty.display()
    );
    assert!(out.contains(&want), "{out}");
}

#[test]
fn check_counts_problems_under_skip_and_passes() {
    let dir = temp_dir("check-skip");
    let (cfg, train) = bad_setup(&dir, "");
    let (code, out, err) = trainer(&[
        "data",
        "check",
        cfg.to_str().unwrap(),
        "--set",
        "data.bad_records=skip",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("7 lines, 4 ok"), "{out}");
    assert!(out.contains("bad record: 3"), "{out}");
    assert!(out.contains(&format!("{}:7: ", train.display())), "{out}");
}

#[test]
fn check_reports_too_long_under_policy_error() {
    let dir = temp_dir("check-long");
    let cfg = setup(
        &dir,
        &good_lines(4),
        ", max_seq_len: 20, max_seq_len_policy: error",
    );
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("> data.max_seq_len 20"), "{out}");
}

/// `trainer data dump CFG ARGS...`.
fn dump(cfg: &Path, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["data", "dump", cfg.to_str().unwrap()];
    all.extend_from_slice(args);
    trainer(&all)
}

#[test]
fn dump_writes_the_exact_tensors_of_a_global_batch() {
    let dir = temp_dir("dump");
    let cfg = setup(&dir, &good_lines(6), "");
    let out_file = dir.join("b.safetensors");
    let (code, out, err) = dump(
        &cfg,
        &[
            "--index",
            "1",
            "--out",
            out_file.to_str().unwrap(),
            "--text",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("[["), "supervised spans are marked: {out}");
    assert!(out.contains("<CONCLUSION>"), "{out}");
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(
        names,
        vec![
            "aspect_ratio_ids",
            "aspect_ratio_mask",
            "attention_mask",
            "cross_attention_mask",
            "input_ids",
            "labels",
            "pixel_values"
        ]
    );
    // the same batch through the library: global batch 1 of epoch 0 at world 1
    let config = trainer::config::load(&cfg, &[]).unwrap();
    let ds = Dataset::open(&config, &config.model.path, Split::Train).unwrap();
    let job = &ds.epoch_plan(0, 1, 0, 1, 2, 1).unwrap()[0];
    let loaded = ds.load(&job.indices).unwrap();
    let c = &loaded.collated;
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.shape(), &[2, c.seq_len]);
    let want: Vec<u8> = c.input_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(ids.data(), &want[..]);
    let want: Vec<u8> = c.labels.iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(st.tensor("labels").unwrap().data(), &want[..]);
    let pv = st.tensor("pixel_values").unwrap();
    assert_eq!(pv.shape(), &[2, 1, 4, 3, 56, 56]);
    let want: Vec<u8> = c
        .pixel_values
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    assert_eq!(pv.data(), &want[..]);
    assert_eq!(
        st.tensor("cross_attention_mask").unwrap().shape(),
        &[2, c.seq_len, 1, 4]
    );
}

/// `--out` replaces an earlier dump only: the data file, the config, an image or a folder given
/// as --out is refused and left as it was (the dump wrote over each).
#[test]
fn dump_refuses_to_overwrite_what_is_not_a_dump() {
    let dir = temp_dir("dump-overwrite");
    let cfg = setup(&dir, &good_lines(4), "");
    let image = dir.join("images").join(IMAGES[0]);
    for target in [
        dir.join("train.jsonl"),
        cfg.clone(),
        image,
        dir.join("images"),
    ] {
        let before = std::fs::read(&target).ok();
        let (code, out, err) = dump(&cfg, &["--index", "0", "--out", target.to_str().unwrap()]);
        assert_eq!(code, 1, "{}: {out}{err}", target.display());
        assert!(
            err.contains("give another path (a dump replaces only an earlier dump)"),
            "{err}"
        );
        assert_eq!(std::fs::read(&target).ok(), before, "{}", target.display());
    }
    let again = dir.join("b.safetensors");
    for index in ["0", "1"] {
        let (code, out, err) = dump(&cfg, &["--index", index, "--out", again.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}{err}");
    }
}

/// `--world 2`: the global batch of a 2-rank run (the sampler depends on it), each rank's part
/// under `rank{r}.`, equal to what that rank loads.
#[test]
fn dump_at_a_world_size_writes_each_ranks_part() {
    let dir = temp_dir("dump-world");
    let cfg = setup(&dir, &good_lines(6), "");
    let out_file = dir.join("b.safetensors");
    let at_world_2 = |index: &str| {
        let out = out_file.to_str().unwrap();
        dump(&cfg, &["--index", index, "--world", "2", "--out", out])
    };
    let (code, out, err) = at_world_2("0");
    assert_eq!(code, 0, "{out}{err}");
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let config = trainer::config::load(&cfg, &[]).unwrap();
    let ds = Dataset::open(&config, &config.model.path, Split::Train).unwrap();
    for rank in 0..2 {
        let job = &ds.epoch_plan(0, 0, rank, 2, 2, 1).unwrap()[0];
        let c = ds.load(&job.indices).unwrap().collated;
        let want: Vec<u8> = c.input_ids.iter().flat_map(|x| x.to_le_bytes()).collect();
        let ids = st.tensor(&format!("rank{rank}.input_ids")).unwrap();
        assert_eq!(ids.data(), &want[..], "rank {rank}");
    }
    assert!(st.tensor("input_ids").is_err());
    // 6 samples: one global batch of 4 at world 2, and a partial one of 2: rank 0's slice of
    // batch_size 2, rank 1 a filler row (its labels all masked)
    let (code, out, err) = at_world_2("1");
    assert_eq!(code, 0, "{out}{err}");
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (rank, want) in [(0, 2), (1, 1)] {
        let rows = st.tensor(&format!("rank{rank}.input_ids")).unwrap().shape()[0];
        assert_eq!(rows, want, "rank {rank}");
    }
    let labels = st.tensor("rank1.labels").unwrap();
    assert!(labels
        .data()
        .chunks_exact(8)
        .all(|b| i64::from_le_bytes(b.try_into().unwrap()) == -100));
    let (code, _, err) = at_world_2("2");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("epoch 0 has 2 global batch(es) of 4 samples, the last one of 2 (train.batch_size 2 x world 2"),
        "{err}"
    );
    let (code, _, err) = dump(&cfg, &["--index", "0", "--world", "0", "--out", "x"]);
    assert_eq!(code, 2, "{err}");
    // --text tells the ranks' samples apart
    let out = out_file.to_str().unwrap();
    let (code, text, err) = dump(
        &cfg,
        &["--index", "0", "--world", "2", "--out", out, "--text"],
    );
    assert_eq!(code, 0, "{text}{err}");
    for rank in 0..2 {
        for sample in 0..2 {
            let label = format!("--- rank {rank}, sample {sample}: dataset index");
            assert_eq!(text.matches(&label).count(), 1, "{label}\n{text}");
        }
    }
    // 5 samples: the partial batch of 1 is rank 0's; rank 1 runs a masked filler row, in the
    // file as it trains it, and not among the batch's samples
    let five = temp_dir("dump-world-filler");
    let cfg = setup(&five, &good_lines(5), "");
    let (code, text, err) = dump(
        &cfg,
        &["--index", "1", "--world", "2", "--out", out, "--text"],
    );
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("--- rank 1, a masked filler row"), "{text}");
    let bytes = std::fs::read(&out_file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let labels = |rank: usize| -> Vec<i64> {
        let t = st.tensor(&format!("rank{rank}.labels")).unwrap();
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    assert!(labels(0).iter().any(|&l| l != -100));
    assert!(
        labels(1).iter().all(|&l| l == -100),
        "the filler row is masked"
    );
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let used: Vec<usize> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["sample_indices"]).unwrap();
    assert_eq!(used.len(), 1, "{used:?}");
}

#[test]
fn dump_past_the_end_says_how_many_batches_there_are() {
    let dir = temp_dir("dump-end");
    let cfg = setup(&dir, &good_lines(6), "");
    let out_file = dir.join("b.safetensors");
    let (code, out, err) = dump(&cfg, &["--index", "3", "--out", out_file.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("epoch 0 has 3 global batch(es)"), "{err}");
    assert!(!out_file.exists());
}

/// `trainer data build-sco REFINED --out OUT [EXTRA...]`.
fn build_sco(refined: &Path, out: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec![
        "data",
        "build-sco",
        refined.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    trainer(&args)
}

#[test]
fn build_sco_writes_two_turn_records_and_counts() {
    let dir = temp_dir("sco");
    let refined = dir.join("refined.json");
    std::fs::write(
        &refined,
        serde_json::json!([
            {"question": "What is it?", "original_answer": "A cat.", "refined_answer": "A dog.", "image_path": "small.png"},
            {"question": "How many?", "original_answer": "2", "refined_answer": "", "image_path": "large.png"},
            {"question": "Color?", "original_answer": "red", "refined_answer": "blue", "image_path": "photo.jpg"}
        ])
        .to_string(),
    )
    .unwrap();
    let out = dir.join("sco.jsonl");
    let (code, stdout, err) = build_sco(&refined, &out, &[]);
    assert_eq!(code, 0, "{stdout}{err}");
    assert!(stdout.contains("wrote 2 record(s)"), "{stdout}");
    assert!(stdout.contains("skipped 1"), "{stdout}");
    let opts = ParseOptions {
        image_root: None,
        text_only: TextOnly::Keep,
        check_image_exists: false,
        keep_image_placeholder: false,
    };
    let rep = parse_jsonl(&out, &opts).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(rep.records.len(), 2);
    let r = &rep.records[0];
    assert_eq!(r.turns.len(), 2);
    assert_eq!(r.turns[0].user, "What is it?");
    assert_eq!(r.turns[0].assistant, "A cat.");
    assert_eq!(r.turns[1].user, DEFAULT_CORRECTION_PROMPT);
    assert_eq!(r.turns[1].assistant, "A dog.");

    // a custom prompt, and a malformed entry fails the command but keeps the good ones
    std::fs::write(
        &refined,
        r#"[{"question": "Q", "original_answer": "A", "refined_answer": "B", "image_path": "x.png"}, 7]"#,
    )
    .unwrap();
    let (code, stdout, err) = build_sco(&refined, &out, &["--correction-prompt", "Look again."]);
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(err.contains("entry 1: expected an object"), "{err}");
    let rep = parse_jsonl(&out, &opts).unwrap();
    assert_eq!(rep.records.len(), 1);
    assert_eq!(rep.records[0].turns[1].user, "Look again.");

    // fields named otherwise are malformed entries (not failed refinements), and a file of
    // nothing but those converts nothing: an error, --out left as it was
    let before = std::fs::read(&out).unwrap();
    std::fs::write(
        &refined,
        r#"[{"question": "Q", "original_answer": "A", "refined": "B", "image_path": "x.png"}]"#,
    )
    .unwrap();
    let (code, stdout, err) = build_sco(&refined, &out, &[]);
    assert_eq!(code, 1, "{stdout}{err}");
    assert!(
        err.contains(r#"entry 0: no field "refined_answer" (it has ["#)
            && err.contains("no entry converted"),
        "{err}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), before);
    // so do an empty list and one of failed refinements only (no malformed entry)
    for (text, why) in [
        ("[]", "the file holds no entries"),
        (
            r#"[{"question": "Q", "original_answer": "A", "refined_answer": "", "image_path": "x.png"}]"#,
            "1 with an empty refined_answer",
        ),
    ] {
        std::fs::write(&refined, text).unwrap();
        let (code, stdout, err) = build_sco(&refined, &out, &[]);
        assert_eq!(code, 1, "{stdout}{err}");
        assert!(
            err.contains("no entry converted") && err.contains(why),
            "{err}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), before);
    }
    // --out naming the input: refused, the input kept
    let input = std::fs::read(&refined).unwrap();
    let (code, _, err) = build_sco(&refined, &refined, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is the input file"), "{err}");
    assert_eq!(std::fs::read(&refined).unwrap(), input);
}

/// A train split whose every record is dropped (here by the length policy `skip`) fails the check,
/// as `trainer train` refuses it: a passing check must mean the data trains.
#[test]
fn check_fails_a_train_split_with_no_usable_sample() {
    let dir = temp_dir("check-empty");
    let cfg = setup(
        &dir,
        &good_lines(4),
        ", max_seq_len: 20, max_seq_len_policy: skip",
    );
    let (code, out, err) = trainer(&["data", "check", cfg.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    let all = format!("{out}{err}");
    assert!(
        all.contains("no usable sample: training would stop here"),
        "{all}"
    );
    assert!(!all.contains("data check passed"), "{all}");
}
