//! trainer eval end to end on a tiny random model (fixture tokenizer and images): the report's
//! numbers agree with predictions.jsonl, an interrupted run resumes to the same report, and bad
//! benchmarks give FILE:LINE errors; `--batch-size` does not change greedy predictions.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::{repo, tiny_model_folder};
use serde_json::Value;

/// A temp folder with `model/` (tiny random Mllama + fixture tokenizer) and `bench.jsonl`.
fn setup() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("eval-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // wider than the fixture model, so the fixture's adapter does not fit this base model
        tiny_model_folder(&dir.join("model"), 3, |cfg| cfg["text_config"]["hidden_size"] = 96.into());
        let lines = [
            r#"{"id": "a", "image": "small.png", "question": "How many?", "answer": "3", "category": "count"}"#,
            r#"{"id": "b", "image": "large.png", "question": "Which color?", "answer": "B", "choices": ["red", "blue"], "category": "color"}"#,
            r#"{"id": "c", "image": "gray.png", "question": "What is it?", "answer": "a circle", "category": "shape"}"#,
            r#"{"id": "d", "image": "layout_1x2.png", "question": "How many?", "answer": "2", "category": "count"}"#,
        ];
        std::fs::write(dir.join("bench.jsonl"), lines.join("\n") + "\n").unwrap();
        dir
    })
}

fn eval(out: &Path, extra: &[&str]) -> (i32, String) {
    eval_bench(out, &setup().join("bench.jsonl"), extra)
}

fn eval_bench(out: &Path, bench: &Path, extra: &[&str]) -> (i32, String) {
    eval_model(&setup().join("model"), out, bench, extra)
}

fn eval_model(model: &Path, out: &Path, bench: &Path, extra: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["eval", "--turns", "2", "--max-new-tokens", "6"])
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(bench)
        .arg("--image-root")
        .arg(repo().join("tests/fixtures/data/images"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn report_matches_predictions_and_resume_gives_the_same_report() {
    let dir = setup();
    let full = dir.join("out-full");
    let (code, err) = eval(&full, &[]);
    assert_eq!(code, 0, "{err}");
    let report = json(&full.join("report.json"));
    let preds: Vec<Value> = std::fs::read_to_string(full.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(preds.len(), 4);
    for t in 0..2 {
        let correct = preds
            .iter()
            .filter(|p| p["turns"][t]["correct"].as_bool().unwrap())
            .count();
        assert_eq!(
            report["turns"][t]["correct"].as_u64().unwrap() as usize,
            correct
        );
        assert_eq!(report["turns"][t]["total"], 4);
    }
    let tr = &report["transitions"][0];
    let sum: u64 = ["right_right", "right_wrong", "wrong_right", "wrong_wrong"]
        .iter()
        .map(|k| tr[*k].as_u64().unwrap())
        .sum();
    assert_eq!(sum, 4);
    let md = std::fs::read_to_string(full.join("report.md")).unwrap();
    assert!(md.contains("## Accuracy per turn"));
    // the plots: PNGs of the documented size, linked from report.md, with something drawn
    for name in ["accuracy.png", "transitions.png"] {
        assert!(md.contains(&format!("]({name})")), "report.md links {name}");
        let bytes = std::fs::read(full.join(name)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is a PNG");
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), trainer::eval::plots::SIZE, "{name}");
        // bars or lines and legend squares (non-white) and the labels (dark text)
        let drawn = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        let dark = img
            .pixels()
            .filter(|p| p.0.iter().all(|&c| c < 100))
            .count();
        assert!(
            drawn > 2000 && dark > 500,
            "{name}: {drawn} drawn, {dark} dark pixels"
        );
    }

    // interrupted after 2 samples, then resumed: the same predictions and report
    let resumed = dir.join("out-resumed");
    assert_eq!(eval(&resumed, &["--limit", "2"]).0, 0);
    assert_eq!(
        std::fs::read_to_string(resumed.join("predictions.jsonl"))
            .unwrap()
            .lines()
            .count(),
        2
    );
    // the rest in one left-padded batch: greedy texts are those of the one-at-a-time run
    assert_eq!(eval(&resumed, &["--batch-size", "3"]).0, 0);
    let strip = |v: Value| -> Value {
        let mut v = v;
        v["cost"] = Value::Null; // timings differ
        v
    };
    assert_eq!(strip(json(&resumed.join("report.json"))), strip(report));
    let texts = common::prediction_texts;
    assert_eq!(texts(&resumed), texts(&full));
    assert!(texts(&full).iter().flatten().all(|t| !t.is_empty()));
}

#[test]
fn reruns_keep_earlier_predictions_and_refuse_other_settings() {
    let dir = setup();
    let out = dir.join("out-rerun");
    let lines = |out: &Path| {
        std::fs::read_to_string(out.join("predictions.jsonl"))
            .unwrap()
            .lines()
            .count()
    };
    assert_eq!(eval(&out, &[]).0, 0);
    assert_eq!(lines(&out), 4);
    // a quick --limit run into the same folder reports on its share and keeps the rest
    let (code, err) = eval(&out, &["--limit", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("score differently"), "{err}");
    assert_eq!(json(&out.join("report.json"))["turns"][0]["total"], 1);
    assert_eq!(lines(&out), 4, "earlier predictions kept");
    // a stored score another trainer's rules decided (flipped here): rescored, and said so
    let path = out.join("predictions.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let was = rows[0]["turns"][0]["correct"].as_bool().unwrap();
    rows[0]["turns"][0]["correct"] = (!was).into();
    let flipped: String = rows.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(&path, flipped).unwrap();
    let (code, err) = eval(&out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("1 stored prediction(s) score differently now"),
        "{err}"
    );
    let again: Value = serde_json::from_str(
        std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(again["turns"][0]["correct"], was);
    // a write cut inside a multi-byte character: that line is dropped, the others are kept
    let mut torn = std::fs::read(out.join("predictions.jsonl")).unwrap();
    torn.extend_from_slice(b"{\"id\": \"zz\", \"answer\": \"caf\xc3");
    std::fs::write(out.join("predictions.jsonl"), torn).unwrap();
    let (code, err) = eval(&out, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines(&out), 4);
    // other generation settings than the stored predictions': refused, nothing rewritten
    let before = std::fs::read(out.join("predictions.jsonl")).unwrap();
    let (code, err) = eval(&out, &["--temperature", "0.5"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("other settings (")
            && err.contains("infer.temperature there 0.0, this run 0.5")
            && !err.contains("\"model\""),
        "{err}"
    );
    // greedy decoding reads no seed, top-k or top-p: changing them resumes
    let (code, err) = eval(&out, &["--seed", "9", "--top-k", "3", "--top-p", "0.5"]);
    assert_eq!(code, 0, "{err}");
    // ... as is a prompt with two <|begin_of_text|> (a model trained with data.double_bos)
    let (code, err) = eval(&out, &["--double-bos"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("other settings"), "{err}");
    assert_eq!(
        std::fs::read(out.join("predictions.jsonl")).unwrap(),
        before
    );
    // a benchmark whose question of a stored id differs (another benchmark numbered alike): refused
    let edited = dir.join("bench-edited.jsonl");
    let text = std::fs::read_to_string(dir.join("bench.jsonl")).unwrap();
    std::fs::write(&edited, text.replace("Which color?", "Which shape?")).unwrap();
    let (code, err) = eval_bench(&out, &edited, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bench-edited.jsonl:2: id \"b\"") && err.contains("made for another question"),
        "{err}"
    );
    // settings.json of an older trainer (no per-question seeds recorded): refused, saying so
    let settings = out.join("settings.json");
    let kept = std::fs::read(&settings).unwrap();
    let mut old: Value = serde_json::from_slice(&kept).unwrap();
    old.as_object_mut().unwrap().remove("seeds");
    std::fs::write(&settings, old.to_string()).unwrap();
    let (code, err) = eval(&out, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("made by an older trainer"), "{err}");
    // no settings.json beside the predictions: refused too (it used to be written afresh)
    std::fs::remove_file(&settings).unwrap();
    let (code, err) = eval(&out, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("holds predictions but not the settings"),
        "{err}"
    );
    std::fs::write(&settings, kept).unwrap();
    // a folder another eval (or export) is writing: refused before anything is generated
    let held = common::hold_export_lock(&out);
    let (code, err) = eval(&out, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("being written by another export or eval"),
        "{err}"
    );
    drop(held);
    assert_eq!(
        std::fs::read(out.join("predictions.jsonl")).unwrap(),
        before
    );
}

/// The base model's config.json re-saved between runs (other bytes, the same content) resumes,
/// as a training run's resume does; a changed content is refused, naming the key; settings.json
/// of a trainer that recorded only the bytes' sha256 is compared by that.
#[test]
fn a_resaved_base_config_resumes_and_a_changed_one_is_refused() {
    let dir = setup();
    // (an own copy: this test rewrites its config.json)
    let model = dir.join("model-resaved");
    let mut cfg = common::resaved_model(&dir.join("model"), &model);
    let first = std::fs::read(model.join("config.json")).unwrap();
    let (out, bench) = (dir.join("out-resaved"), dir.join("bench.jsonl"));
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    let predictions = std::fs::read(out.join("predictions.jsonl")).unwrap();
    // re-saved: compact, another transformers_version, torch_dtype renamed
    cfg["transformers_version"] = "5.0.0".into();
    if let Some(dtype) = cfg.as_object_mut().unwrap().remove("torch_dtype") {
        cfg["dtype"] = dtype;
    }
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    let now = std::fs::read(out.join("predictions.jsonl")).unwrap();
    assert_eq!(now, predictions, "nothing regenerated");
    // settings of an older trainer (the bytes' sha256 only): other bytes are refused ...
    let settings = out.join("settings.json");
    let kept = std::fs::read(&settings).unwrap();
    let mut old: Value = serde_json::from_slice(&kept).unwrap();
    old["model"].as_object_mut().unwrap().remove("model_config");
    std::fs::write(&settings, old.to_string()).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.model_config_sha256 there"), "{err}");
    // ... and the same bytes resume
    std::fs::write(model.join("config.json"), &first).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    // a changed model: refused, naming what changed
    std::fs::write(&settings, &kept).unwrap();
    cfg["text_config"]["rope_parameters"]["rope_theta"] = 1234.0.into();
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("model.model_config.text_config.rope_parameters.rope_theta there 500000.0"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(out.join("predictions.jsonl")).unwrap(),
        predictions
    );
}

/// A resume refuses a model whose weights changed at the same file names and sizes (another
/// merged export, an edit in place) and one whose chat template changed, naming what changed;
/// settings.json of a trainer that recorded neither fingerprint resumes as before. A copy of the
/// model in another folder (moved to local disk) resumes: the fingerprints are the model.
#[test]
fn a_resume_refuses_other_weights_of_the_same_size_and_another_chat_template() {
    let dir = setup();
    let model = dir.join("model-edited");
    common::copy_dir(&dir.join("model"), &model);
    let (out, bench) = (dir.join("out-edited"), dir.join("bench.jsonl"));
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    let settings = out.join("settings.json");
    let kept = std::fs::read(&settings).unwrap();
    let predictions = std::fs::read(out.join("predictions.jsonl")).unwrap();
    let moved = dir.join("model-moved");
    common::copy_dir(&model, &moved);
    let (code, err) = eval_model(&moved, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(out.join("predictions.jsonl")).unwrap(),
        predictions,
        "nothing regenerated"
    );
    std::fs::write(&settings, &kept).unwrap();
    // one byte of the weights' data, the file's size unchanged (its last byte is tensor data)
    let weights = model.join("model.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let mut edited = original.clone();
    *edited.last_mut().unwrap() ^= 0x40;
    std::fs::write(&weights, &edited).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("model.model_weights_sampled there"), "{err}");
    // an older trainer's settings (neither fingerprint) resume as they did
    let mut old: Value = serde_json::from_slice(&kept).unwrap();
    let m = old["model"].as_object_mut().unwrap();
    m.remove("model_weights_sampled");
    m.remove("model_files");
    std::fs::write(&settings, old.to_string()).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 0, "{err}");
    // the chat template changed
    std::fs::write(&settings, &kept).unwrap();
    std::fs::write(&weights, &original).unwrap();
    let tok = model.join("tokenizer_config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&tok).unwrap()).unwrap();
    cfg["chat_template"] = format!(
        "SYSTEM: be brief.\n{}",
        cfg["chat_template"].as_str().unwrap_or("")
    )
    .into();
    std::fs::write(&tok, cfg.to_string()).unwrap();
    let (code, err) = eval_model(&model, &out, &bench, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("model.model_files.tokenizer_config_json there \""),
        "{err}"
    );
}

/// `--out` naming an existing file is refused as not a folder (it was "File exists"), and a
/// folder holding a report.md that no evaluation wrote is left alone.
#[test]
fn an_out_that_is_a_file_is_refused() {
    let dir = setup();
    let file = dir.join("out-is-a-file.jsonl");
    std::fs::write(&file, "mine\n").unwrap();
    let (code, err) = eval_model(&dir.join("model"), &file, &dir.join("bench.jsonl"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a file, not a folder"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine\n");
    // a folder with someone's report.md, not an evaluation's: left as it is
    let theirs = dir.join("out-theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("report.md"), "my notes\n").unwrap();
    let (code, err) = eval_model(&dir.join("model"), &theirs, &dir.join("bench.jsonl"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not an evaluation's folder"), "{err}");
    assert_eq!(
        std::fs::read_to_string(theirs.join("report.md")).unwrap(),
        "my notes\n"
    );
}

#[test]
fn integer_ids_are_read_and_written_back_as_integers() {
    let dir = setup();
    let p = dir.join("int_ids.jsonl");
    std::fs::write(
        &p,
        "{\"id\": 7, \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n\
         {\"id\": 1.5, \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n",
    )
    .unwrap();
    let err = trainer::eval::read_bench(&p).unwrap_err().to_string();
    assert!(
        err.contains("int_ids.jsonl:2: `id` must be a string or an integer"),
        "{err}"
    );
    std::fs::write(
        &p,
        "{\"id\": 7, \"image\": \"small.png\", \"question\": \"q\", \"answer\": 2.5}\n",
    )
    .unwrap();
    let items = trainer::eval::read_bench(&p).unwrap();
    assert_eq!(items[0].1.id.as_str(), "7");
    assert_eq!(
        items[0].1.answer, "2.5",
        "a numeric answer is read as its text"
    );
    // predictions write it back as an integer (a table of them joins the benchmark's rows), a
    // rerun resumes from them, and they pair with an older trainer's "7"
    let out = dir.join("out-int-ids");
    let _ = std::fs::remove_dir_all(&out);
    assert_eq!(eval_bench(&out, &p, &[]).0, 0);
    let predictions = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert!(predictions.starts_with("{\"id\":7,"), "{predictions}");
    let (code, err) = eval_bench(&out, &p, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("1 of this rank's 1 questions already answered"),
        "{err}"
    );
    let older = dir.join("out-int-ids-as-text");
    let _ = std::fs::remove_dir_all(&older);
    std::fs::create_dir_all(&older).unwrap();
    for file in ["settings.json", "report.json"] {
        std::fs::copy(out.join(file), older.join(file)).unwrap();
    }
    let as_text = predictions.replacen("{\"id\":7,", "{\"id\":\"7\",", 1);
    std::fs::write(older.join("predictions.jsonl"), as_text).unwrap();
    let compared = trainer::eval::compare::compare(&out, &older).unwrap();
    assert_eq!(compared.paired, 1);
    // a resume of the older folder writes the id back as the benchmark writes it
    let (code, err) = eval_bench(&older, &p, &[]);
    assert_eq!(code, 0, "{err}");
    let resumed = std::fs::read_to_string(older.join("predictions.jsonl")).unwrap();
    assert!(resumed.starts_with("{\"id\":7,"), "{resumed}");
}

/// A resume into --out whose image under the same path now holds other bytes (a benchmark
/// folder replaced in place) is refused: its prediction was made for another image. (It was
/// only known by its path.)
#[test]
fn a_resume_refuses_an_image_replaced_under_the_same_name() {
    let dir = setup();
    let images = dir.join("replaced-images");
    std::fs::create_dir_all(&images).unwrap();
    let fixtures = repo().join("tests/fixtures/data/images");
    std::fs::copy(fixtures.join("small.png"), images.join("q.png")).unwrap();
    let bench = dir.join("replaced.jsonl");
    // (an absolute path: the helper's --image-root is the fixtures')
    let line = serde_json::json!({"id": "a", "image": images.join("q.png"), "question": "How many?", "answer": "3"});
    std::fs::write(&bench, format!("{line}\n")).unwrap();
    let out = dir.join("out-replaced");
    let _ = std::fs::remove_dir_all(&out);
    let root: [&str; 0] = [];
    let (code, err) = eval_bench(&out, &bench, &root);
    assert_eq!(code, 0, "{err}");
    // the same bytes again (a copy): resumed
    std::fs::copy(fixtures.join("small.png"), images.join("q.png")).unwrap();
    let (code, err) = eval_bench(&out, &bench, &root);
    assert_eq!(code, 0, "{err}");
    // infer --questions over the same line, then the image replaced: its rerun is refused too
    std::fs::copy(fixtures.join("small.png"), images.join("q.png")).unwrap();
    let generations = dir.join("replaced-generations.jsonl");
    let _ = std::fs::remove_file(&generations);
    let infer = || {
        let (q, g) = (bench.to_str().unwrap(), generations.to_str().unwrap());
        greedy_infer(&["--questions", q, "--out", g, "--date", "2024-07-26"])
    };
    let (code, _, err) = infer();
    assert_eq!(code, 0, "{err}");
    std::fs::copy(fixtures.join("large.png"), images.join("q.png")).unwrap();
    let (code, _, err) = infer();
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("the generation for id \"a\" was made for another image: ")
            && err.contains("q.png holds other bytes now"),
        "{err}"
    );
    let (code, err) = eval_bench(&out, &bench, &root);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("id \"a\": the prediction for it in")
            && err.contains("was made for another image: ")
            && err.contains("q.png holds other bytes now"),
        "{err}"
    );
    // an image that no longer reads is not compared: every question answered, the report is made
    std::fs::remove_file(images.join("q.png")).unwrap();
    let (code, err) = eval_bench(&out, &bench, &root);
    assert_eq!(code, 0, "{err}");
}

/// A benchmark's own fields are ignored (one warning names them); a byte-order mark is not part
/// of the first line; letters and numbers are answers without choices.
#[test]
fn other_fields_and_a_byte_order_mark_are_read_past() {
    let dir = setup();
    let p = dir.join("extra_fields.jsonl");
    std::fs::write(
        &p,
        "\u{feff}{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"B\", \"source\": \"mmstar\"}\n\
         {\"id\": \"y\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"0\", \"split\": 1}\n",
    )
    .unwrap();
    let items = trainer::eval::read_bench(&p).unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!(
        (items[0].1.id.as_str(), items[1].1.answer.as_str()),
        ("x", "0")
    );
}

/// A question without an image (`image` null or left out) is asked as text, in a batch of its
/// own beside the image questions, as `trainer infer` without --image asks it.
#[test]
fn text_only_questions_are_asked_without_an_image() {
    let dir = setup();
    let bench = dir.join("mixed.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"t1\", \"image\": null, \"question\": \"What is red?\", \"answer\": \"a color\"}\n\
         {\"id\": \"i1\", \"image\": \"small.png\", \"question\": \"How many?\", \"answer\": \"3\"}\n\
         {\"id\": \"t2\", \"question\": \"Name a shape.\", \"answer\": \"circle\"}\n",
    )
    .unwrap();
    let out = dir.join("out-mixed");
    let (code, err) = eval_bench(&out, &bench, &["--batch-size", "3", "--date", "2024-07-26"]);
    assert_eq!(code, 0, "{err}");
    let settings = json(&out.join("settings.json"));
    assert_eq!(settings["template_date"], "2024-07-26");
    let preds: Vec<Value> = std::fs::read_to_string(out.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let by_id = |id: &str| preds.iter().find(|p| p["id"] == id).unwrap().clone();
    for (id, tiles) in [("t1", 0), ("t2", 0)] {
        assert_eq!(by_id(id)["turns"][0]["tiles"], tiles, "{id}");
    }
    assert!(by_id("i1")["turns"][0]["tiles"].as_u64().unwrap() > 0);
    // the same text as infer's for the question alone (greedy, the same day)
    let (code, stdout, err) = greedy_infer(&[
        "--question",
        "Name a shape.",
        "--date",
        "2024-07-26",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let alone: Value = serde_json::from_str(&stdout).unwrap();
    for t in 0..2 {
        assert_eq!(
            by_id("t2")["turns"][t]["text"],
            alone["turns"][t]["text"],
            "turn {t}"
        );
    }
    // a rerun without --date (another day, say) asks with the recorded day, so it resumes; with
    // another --date it is refused
    std::fs::remove_file(out.join("report.json")).unwrap();
    let (code, err) = eval_bench(&out, &bench, &["--batch-size", "3"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out.join("settings.json"))["template_date"],
        "2024-07-26"
    );
    let (code, err) = eval_bench(&out, &bench, &["--date", "2024-7-27"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("template_date") && err.contains("2024-07-27"),
        "{err}"
    );
}

/// `trainer infer` on the test model, greedy, two turns of at most 6 tokens, with `extra`:
/// (exit code, stdout, stderr).
fn greedy_infer(extra: &[&str]) -> (i32, String, String) {
    greedy_infer_with(&setup().join("model"), extra)
}

fn greedy_infer_with(model: &Path, extra: &[&str]) -> (i32, String, String) {
    let base = [
        "infer",
        "--turns",
        "2",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ];
    let model = ["--model", model.to_str().unwrap()];
    trainer_with(&[&base[..], &model, extra].concat())
}

/// `trainer ARGS`: exit code, stdout, stderr.
fn trainer_with(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A folder whose questions so far all had images (no date recorded) takes text-only ones
/// later: they are asked and the day recorded from then on, not refused as other settings.
#[test]
fn text_only_questions_added_to_an_image_only_folder_resume() {
    let dir = setup();
    let bench = dir.join("image-then-text.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"i1\", \"image\": \"small.png\", \"question\": \"How many?\", \"answer\": \"3\"}\n\
         {\"id\": \"t1\", \"question\": \"What is red?\", \"answer\": \"a color\"}\n",
    )
    .unwrap();
    let out = dir.join("out-image-then-text");
    let (code, err) = eval_bench(&out, &bench, &["--limit", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(json(&out.join("settings.json"))
        .get("template_date")
        .is_none());
    let (code, err) = eval_bench(&out, &bench, &["--date", "2024-07-26"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out.join("settings.json"))["template_date"],
        "2024-07-26"
    );
    assert_eq!(json(&out.join("report.json"))["turns"][0]["total"], 2);
    // a --limit that leaves the text-only question out again: resumed, the day kept
    let (code, err) = eval_bench(&out, &bench, &["--limit", "1"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json(&out.join("settings.json"))["template_date"],
        "2024-07-26"
    );
}

/// Ctrl-C mid-run: the process ends as SIGINT ends it, saying where the predictions made so far
/// are and that a rerun resumes; the rerun says how many it found and finishes the rest.
#[test]
fn an_interrupted_eval_says_what_it_kept_and_the_rerun_resumes() {
    let dir = setup();
    let bench = dir.join("long.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| format!("{{\"id\": \"q{i}\", \"image\": \"small.png\", \"question\": \"How many? {i}\", \"answer\": \"3\"}}"))
        .collect();
    std::fs::write(&bench, lines.join("\n") + "\n").unwrap();
    let out = dir.join("out-interrupted");
    let child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "eval",
            "--turns",
            "2",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "1",
        ])
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--data")
        .arg(&bench)
        .arg("--image-root")
        .arg(repo().join("tests/fixtures/data/images"))
        .arg("--out")
        .arg(&out)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let rank_file = out.join("predictions.rank-0.jsonl");
    let answered = || {
        std::fs::read_to_string(&rank_file)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let start = std::time::Instant::now();
    while answered() < 2 && start.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(libc::SIGINT), "{stderr}");
    assert!(
        stderr.contains("eval: interrupted; the predictions made so far are kept in")
            && stderr.contains("predictions.rank-0.jsonl")
            && stderr.contains("run the same command again to resume"),
        "{stderr}"
    );
    let kept = answered();
    assert!((2..200).contains(&kept), "{kept} kept");
    let (code, err) = eval_bench(&out, &bench, &["--batch-size", "1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "resuming: {kept} of this rank's 200 questions already answered"
        )),
        "{err}"
    );
    let merged = std::fs::read_to_string(out.join("predictions.jsonl")).unwrap();
    assert_eq!(merged.lines().count(), 200);
}

/// `infer --questions`: a file of questions (ids given or not, images or none) answered in
/// batches, each as `infer` answers it alone; a torn output resumes to the same lines; other
/// settings are refused; a bad line is named.
#[test]
fn infer_questions_batches_resumes_and_matches_single_infer() {
    let dir = setup();
    let images = repo().join("tests/fixtures/data/images");
    let questions = dir.join("questions.jsonl");
    std::fs::write(
        &questions,
        "{\"id\": \"a\", \"image\": \"small.png\", \"question\": \"How many?\", \"answer\": \"3\"}\n\
         {\"id\": 7, \"image\": null, \"question\": \"Name a shape.\"}\n\
         {\"question\": \"What is red?\"}\n\
         {\"id\": \"d\", \"image\": \"gray.png\", \"question\": \"What is it?\"}\n\
         {\"id\": \"e\", \"question\": \"Count to three.\"}\n",
    )
    .unwrap();
    let infer = greedy_infer;
    let out = dir.join("generations.jsonl");
    let _ = std::fs::remove_file(&out);
    let batch_with = |model: &Path, out: &Path, extra: &[&str]| {
        let base = [
            "--questions",
            questions.to_str().unwrap(),
            "--image-root",
            images.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--batch-size",
            "2",
        ];
        greedy_infer_with(model, &[&base[..], extra].concat())
    };
    let batch = |out: &Path, extra: &[&str]| batch_with(&dir.join("model"), out, extra);
    let (code, _, err) = batch(&out, &["--date", "2024-07-26"]);
    assert_eq!(code, 0, "{err}");
    let full = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<Value> = full
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (an integer id comes back as one: the resume below keeps its line)
    let ids: Vec<String> = lines.iter().map(|l| l["id"].to_string()).collect();
    assert_eq!(ids, ["\"a\"", "7", "\"line-3\"", "\"d\"", "\"e\""]);
    // each as infer answers it alone (greedy)
    for (i, extra) in [
        (0, vec!["--question", "How many?", "--image"]),
        (1, vec!["--question", "Name a shape."]),
    ] {
        let image = images.join("small.png");
        let mut args = extra.clone();
        if i == 0 {
            args.push(image.to_str().unwrap());
        }
        args.extend(["--json", "--date", "2024-07-26"]);
        let (code, stdout, err) = infer(&args);
        assert_eq!(code, 0, "{err}");
        let alone: Value = serde_json::from_str(&stdout).unwrap();
        for t in 0..2 {
            assert_eq!(
                lines[i]["turns"][t]["text"], alone["turns"][t]["text"],
                "{i} turn {t}"
            );
        }
    }
    // interrupted after two lines, mid-way through the third: resumed to the same file (without
    // --date: the day the lines were made with)
    let cut: String = full
        .lines()
        .take(2)
        .map(|l| format!("{l}\n"))
        .collect::<String>()
        + &full.lines().nth(2).unwrap()[..20];
    std::fs::write(&out, cut).unwrap();
    let (code, _, err) = batch(&out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming: 2 of 5 questions already in"),
        "{err}"
    );
    // (the same lines but their timings)
    let untimed = |text: &str| -> Vec<Value> {
        text.lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                for t in v["turns"].as_array_mut().unwrap() {
                    t.as_object_mut().unwrap().remove("seconds");
                }
                v
            })
            .collect()
    };
    let resumed = std::fs::read_to_string(&out).unwrap();
    assert_eq!(untimed(&resumed), untimed(&full));
    assert!(resumed.starts_with(&full.lines().take(2).collect::<Vec<_>>().join("\n")));
    // a greedy rerun with another seed changes no text: accepted (nothing left to ask)
    let (code, _, err) = batch(&out, &["--seed", "5"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming: 5 of 5 questions already in"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), resumed);
    // other settings: refused, the file kept
    let (code, _, err) = batch(&out, &["--correction-prompt", "Check again."]);
    assert_ne!(code, 0);
    assert!(
        err.contains("generated with other settings (infer.correction_prompt differ"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), resumed);
    // the model by its files' content: a copy in another folder resumes, other weights of the
    // same size at that path are refused
    let copy = dir.join("model-questions");
    common::copy_dir(&dir.join("model"), &copy);
    let (code, _, err) = batch_with(&copy, &out, &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("resuming: 5 of 5 questions already in"),
        "{err}"
    );
    let weights = copy.join("model.safetensors");
    let mut edited = std::fs::read(&weights).unwrap();
    *edited.last_mut().unwrap() ^= 0x40;
    std::fs::write(&weights, &edited).unwrap();
    let (code, _, err) = batch_with(&copy, &out, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("files.model_weights_sampled differ: files.model_weights_sampled there"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out).unwrap(), resumed);
    // a run already writing --out: refused; two lines for one id: refused
    {
        let held = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
        assert!(matches!(
            launcher::flock::try_exclusive(&held).unwrap(),
            launcher::flock::Flock::Held
        ));
        let (code, _, err) = batch(&out, &[]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("is being written by another `infer --questions`"),
            "{err}"
        );
    }
    let twice = dir.join("generations-twice.jsonl");
    let first = resumed.lines().next().unwrap();
    std::fs::write(&twice, format!("{resumed}{first}\n")).unwrap();
    let (code, _, err) = batch(&twice, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("a second generation for id \"a\""), "{err}");
    // an edited question under an id already answered: refused (it answers another question)
    let edited = std::fs::read_to_string(&questions)
        .unwrap()
        .replace("Count to three.", "Count to four.");
    std::fs::write(&questions, edited).unwrap();
    let (code, _, err) = batch(&out, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "the generation for id \"e\" was made for another question or image than line 5"
        ),
        "{err}"
    );
    // a bad line is named, before the model loads
    std::fs::write(
        &questions,
        "{\"id\": \"x\", \"question\": \"q\"}\n{\"id\": \"y\"}\n",
    )
    .unwrap();
    let (code, _, err) = batch(&dir.join("other.jsonl"), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("questions.jsonl:2: missing `question`"),
        "{err}"
    );
    // an --out that is not this command's output, one line without its newline (a minified
    // JSON file): refused and kept, not cut as a torn line
    std::fs::write(&questions, "{\"id\": \"x\", \"question\": \"q\"}\n").unwrap();
    // --out without --questions: refused (one answer is printed)
    let single = dir.join("single.jsonl");
    let (code, _, err) = greedy_infer(&["--question", "q", "--out", single.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is for --questions FILE"), "{err}");
    // (also a whole line that starts as ours, e.g. a questions file's)
    let foreign = dir.join("results.json");
    for text in [
        "[{\"id\": \"x\", \"score\": 1}]",
        "{\"id\": \"x\", \"question\": \"q\"}",
    ] {
        std::fs::write(&foreign, text).unwrap();
        let (code, _, err) = batch(&foreign, &[]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("results.json:1: not a line of `infer --questions`"),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&foreign).unwrap(), text);
    }
    // unreadable images, whatever their place in the file, named before anything is generated:
    // not an image or not there (from the header, before the model loads), then a truncated one
    // (its header reads, its pixels do not)
    let whole = std::fs::read(images.join("large.png")).unwrap();
    let bad_root = dir.join("bad-images");
    std::fs::create_dir_all(&bad_root).unwrap();
    std::fs::write(bad_root.join("cut.png"), &whole[..whole.len() / 2]).unwrap();
    std::fs::write(bad_root.join("text.png"), "not an image").unwrap();
    std::fs::copy(images.join("small.png"), bad_root.join("small.png")).unwrap();
    std::fs::write(
        &questions,
        "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\"}\n\
         {\"id\": \"y\", \"image\": \"text.png\", \"question\": \"q\"}\n\
         {\"id\": \"z\", \"image\": \"none.png\", \"question\": \"q\"}\n",
    )
    .unwrap();
    let bad_out = dir.join("bad-images.jsonl");
    let with_root = |out: &Path| {
        greedy_infer_with(
            &dir.join("model"),
            &[
                "--questions",
                questions.to_str().unwrap(),
                "--image-root",
                bad_root.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        )
    };
    let (code, _, err) = with_root(&bad_out);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("questions.jsonl: 2 bad lines:")
            && err.contains("questions.jsonl:2: image")
            && err.contains("text.png: corrupt image header")
            && err.contains("questions.jsonl:3: image")
            && err.contains("none.png not found"),
        "{err}"
    );
    // (then, the model loaded, the truncated one)
    std::fs::write(
        &questions,
        "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\"}\n\
         {\"id\": \"y\", \"image\": \"cut.png\", \"question\": \"q\"}\n",
    )
    .unwrap();
    let (code, _, err) = with_root(&bad_out);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("questions.jsonl:2: corrupt or truncated image"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&bad_out).unwrap_or_default(),
        "",
        "nothing generated"
    );
}

#[test]
fn bad_benchmarks_name_file_and_line() {
    let dir = setup();
    let cases = [
        ("blank-answer.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \" ? \"}\n", "blank-answer.jsonl:1: answer \" ? \" is nothing once normalized"),
        ("array.jsonl", "[\"x\", \"small.png\", \"q\", \"1\"]\n", "array.jsonl:1: expected a JSON object"),
        ("not-json.jsonl", "not json\n", "not-json.jsonl:1: malformed JSON: expected ident (column 2)"),
        ("no-metrics.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n", "--train-metrics"),
        ("missing.jsonl", "{\"id\": \"x\", \"image\": \"nope.png\", \"question\": \"q\", \"answer\": \"1\"}\n", "missing.jsonl:1:"),
        ("empty.jsonl", "\n", "the benchmark is empty"),
        ("nochoice.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"E\", \"choices\": [\"red\", \"blue\"]}\n", "nochoice.jsonl:1: answer \"E\" is none of the 2 choices"),
        ("dup.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n", "dup.jsonl:2: id \"x\" repeats"),
        // found before the first question is generated, not when its turn comes
        ("literal.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n{\"id\": \"y\", \"image\": \"small.png\", \"question\": \"see <|image|> here\", \"answer\": \"1\"}\n", "literal.jsonl:2: id \"y\": the question holds a literal <|image|>"),
        ("late-missing.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n{\"id\": \"y\", \"image\": \"nope.png\", \"question\": \"q\", \"answer\": \"1\"}\n", "late-missing.jsonl:2: image"),
        ("question-type.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": 5, \"answer\": \"1\"}\n", "question-type.jsonl:1: `question` is a number: expected a string"),
        ("choices-type.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\", \"choices\": [1, 2]}\n", "choices-type.jsonl:1: `choices` item 1 is a number"),
        ("dup-choices.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"red\", \"choices\": [\"red\", \"red\"]}\n", "dup-choices.jsonl:1: answer \"red\" is the text of more than one of the choices"),
        ("empty-image.jsonl", "{\"id\": \"x\", \"image\": \" \", \"question\": \"q\", \"answer\": \"1\"}\n", "empty-image.jsonl:1: `image` is an empty string: give the image's path, or null"),
        ("blank-question.jsonl", "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \" \\n\", \"answer\": \"1\"}\n", "blank-question.jsonl:1: `question` is empty: give the text to ask"),
    ];
    // a truncated image (its header reads, its pixels do not), found before anything runs
    let whole = std::fs::read(repo().join("tests/fixtures/data/images/large.png")).unwrap();
    std::fs::write(dir.join("cut.png"), &whole[..whole.len() / 2]).unwrap();
    let images = repo().join("tests/fixtures/data/images");
    std::fs::copy(images.join("small.png"), dir.join("small.png")).unwrap();
    let truncated = "{\"id\": \"x\", \"image\": \"small.png\", \"question\": \"q\", \"answer\": \"1\"}\n{\"id\": \"y\", \"image\": \"cut.png\", \"question\": \"q\", \"answer\": \"1\"}\n";
    let cases = cases
        .iter()
        .map(|&(name, text, want)| (name, text, want, images.clone()))
        .chain([(
            "truncated.jsonl",
            truncated,
            "truncated.jsonl:2: corrupt or truncated image",
            dir.to_path_buf(),
        )]);
    for (name, text, want, image_root) in cases {
        std::fs::write(dir.join(name), text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["eval", "--turns", "1"])
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--data")
            .arg(dir.join(name))
            .arg("--image-root")
            .arg(&image_root)
            .arg("--out")
            .arg(dir.join(format!("out-{name}")))
            // (a metrics file that does not exist: refused before the model loads)
            .args(match name {
                "no-metrics.jsonl" => &["--train-metrics", "/no/such/metrics.jsonl"][..],
                _ => &[],
            })
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
        let rank_file = dir.join(format!("out-{name}/predictions.rank-0.jsonl"));
        assert!(!rank_file.exists(), "{name}: nothing generated");
    }
}

#[test]
fn adapter_for_another_base_model_is_a_clear_error() {
    let dir = setup();
    // `infer --model MODEL --adapter` with the fixtures' adapter: the exit code and stderr
    let infer = |model: &Path| {
        let o = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args([
                "infer",
                "--question",
                "q",
                "--turns",
                "1",
                "--max-new-tokens",
                "2",
            ])
            .arg("--model")
            .arg(model)
            .arg("--adapter")
            .arg(repo().join("tests/fixtures/mllama_tiny/adapter_hf5"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        (o.status.code(), stderr)
    };
    let (code, stderr) = infer(&dir.join("model"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("adapter"), "{stderr}");
    // an adapter of a deeper model: its extra layers are named, and how deep this model is
    let (code, stderr) = infer(&repo().join("tests/fixtures/train/model"));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("unexpected base_model.model.model.vision_model.transformer.layers.3.")
            && stderr.contains("(this model has 3 text layers and 2 + 1 vision layers"),
        "{stderr}"
    );
}

/// Text-only questions on two ranks a day apart (time zones 26 hours apart): every rank asks
/// with rank 0's day (gathered), recorded in settings.json; without that the ranks' settings
/// differ and the run is refused.
#[test]
fn ranks_in_two_time_zones_date_text_only_prompts_alike() {
    let dir = setup();
    let bench = dir.join("text-ranks.jsonl");
    std::fs::write(
        &bench,
        "{\"id\": \"t1\", \"question\": \"What is red?\", \"answer\": \"a color\"}\n\
         {\"id\": \"t2\", \"question\": \"Name a shape.\", \"answer\": \"circle\"}\n",
    )
    .unwrap();
    let out = dir.join("out-text-ranks");
    let trainer = env!("CARGO_BIN_EXE_trainer");
    let script = format!(
        "if [ \"$RANK\" = 1 ]; then export TZ=EST-14; else export TZ=WST+12; fi; exec {trainer} eval --turns 1 --max-new-tokens 4 --model {} --data {} --image-root {} --out {}",
        dir.join("model").display(),
        bench.display(),
        repo().join("tests/fixtures/data/images").display(),
        out.display()
    );
    // rank 0's day: UTC-12's (read before and after the run, which may cross its midnight)
    let west = || {
        let o = Command::new("date")
            .args(["+%Y-%m-%d"])
            .env("TZ", "WST+12")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let before = west();
    let o = common::launcher()
        .args([
            "--standalone",
            "--nproc-per-node",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .env("TMPDIR", dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recorded = json(&out.join("settings.json"))["template_date"].clone();
    assert!(
        recorded == before.as_str() || recorded == west().as_str(),
        "{recorded}"
    );
}

#[test]
fn two_ranks_under_the_launcher_give_the_same_report_as_one() {
    let dir = setup();
    let single = dir.join("out-single");
    assert_eq!(eval(&single, &[]).0, 0);
    let dist = dir.join("out-dist");
    let launch = || {
        common::launcher()
            .args(["--standalone", "--nproc-per-node", "2", "--"])
            .arg(env!("CARGO_BIN_EXE_trainer"))
            .args(["eval", "--turns", "2", "--max-new-tokens", "6"])
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--data")
            .arg(dir.join("bench.jsonl"))
            .arg("--image-root")
            .arg(repo().join("tests/fixtures/data/images"))
            .arg("--out")
            .arg(&dist)
            // (a failing rank's kept error folder in the test's own folder)
            .env("TMPDIR", dir)
            .output()
            .unwrap()
    };
    // --out held by another eval: every rank stops before writing (rank 1 learns it from rank 0)
    let held = common::hold_export_lock(&dist);
    let o = launch();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    // (each rank prints its own reason; the launcher may stop one before it printed, so one of
    // the two suffices)
    assert!(
        err.contains("being written by another export or eval")
            || err.contains("another rank could not start evaluating"),
        "{err}"
    );
    assert!(!dist.join("predictions.rank-1.jsonl").exists(), "{err}");
    drop(held);
    let o = launch();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let strip = |mut v: Value| {
        v["cost"] = Value::Null;
        v
    };
    assert_eq!(
        strip(json(&dist.join("report.json"))),
        strip(json(&single.join("report.json")))
    );
    let merged = std::fs::read_to_string(dist.join("predictions.jsonl")).unwrap();
    let ids: Vec<String> = merged
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids, ["a", "b", "c", "d"], "merged in benchmark order");
    assert!(
        !dist.join("predictions.rank-1.jsonl").exists(),
        "rank files are merged away"
    );
}

/// A folder given where another kind is meant is named for what it is, with the flag that
/// takes it: a Hub id for --model, a model folder for --adapter, a folder for --data, a run's
/// output folder for --checkpoint, a folder for compare's --json.
#[test]
fn misplaced_folders_are_named_for_what_they_are() {
    let dir = setup();
    let model = dir.join("model");
    let (code, _, err) = greedy_infer_with(
        Path::new("meta-llama/Llama-3.2-11B-Vision-Instruct"),
        &["--question", "q"],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no such folder (a Hub id is not downloaded"),
        "{err}"
    );
    let (code, _, err) = greedy_infer(&["--adapter", model.to_str().unwrap(), "--question", "q"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is a model folder (config.json), not a PEFT adapter: give it with --model"),
        "{err}"
    );
    let (code, err) = eval_bench(&dir.join("out-data-dir"), dir, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("--data is the benchmark's JSONL file, not its folder"),
        "{err}"
    );
    // a run's train.output_dir (its resolved_config.yaml names checkpoint.dir)
    let run_dir = dir.join("a-run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let ckpt_dir = dir.join("a-run-checkpoints");
    std::fs::write(
        run_dir.join("resolved_config.yaml"),
        format!("checkpoint:\n  dir: {}\n", ckpt_dir.display()),
    )
    .unwrap();
    let (code, _, err) =
        greedy_infer(&["--checkpoint", run_dir.to_str().unwrap(), "--question", "q"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is a training run's train.output_dir, not a checkpoint: its checkpoint.dir")
            && err.contains("a-run-checkpoints holds no complete checkpoint"),
        "{err}"
    );
    // its checkpoint.dir relative to the folder the run started in, which the output_dir (given
    // relative too) is under
    std::fs::write(
        run_dir.join("resolved_config.yaml"),
        "train:\n  output_dir: ./a-run\ncheckpoint:\n  dir: a-run-checkpoints\n",
    )
    .unwrap();
    let (code, _, err) =
        greedy_infer(&["--checkpoint", run_dir.to_str().unwrap(), "--question", "q"]);
    assert_eq!(code, 1, "{err}");
    let want = format!(
        "its checkpoint.dir {} holds no complete",
        ckpt_dir.display()
    );
    assert!(err.contains(&want), "{err}");
    let (code, _, err) = trainer_with(&["compare", "/a", "/b", "--json", dir.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("a folder; give the file the comparison is written to"),
        "{err}"
    );
}

/// `infer` without --json streams each turn under its header, a turn that wrote no text too;
/// --position with one turn (no correction turn) is said to change nothing.
#[test]
fn streamed_turns_each_have_a_header() {
    let (code, stdout, err) = greedy_infer(&["--question", "How many?"]);
    assert_eq!(code, 0, "{err}");
    let turn0 = stdout.find("--- turn 0 ---");
    let turn1 = stdout.find("--- turn 1 ---");
    assert!(turn0.is_some() && turn1 > turn0, "{stdout}");
    assert_eq!(stdout.matches("--- turn ").count(), 2, "{stdout}");
    let model = setup().join("model");
    let (code, _, err) = trainer_with(&[
        "infer",
        "--turns",
        "1",
        "--position",
        "after-reasoning",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
        "--question",
        "q",
        "--model",
        model.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("--position applies to correction turns, and --turns 1 asks none"),
        "{err}"
    );
}
