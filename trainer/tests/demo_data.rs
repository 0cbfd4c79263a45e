//! `trainer demo-data`: generation is deterministic and cached, every answer is what the rendered
//! image says (read back from the PNG pixels by an independent analysis), the records parse in
//! the SCo format with the default correction prompt, and the model folder loads through the
//! same code paths a real Llama 3.2 Vision folder does.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer::data::image::ImageProcessorConfig;
use trainer::data::records::DEFAULT_CORRECTION_PROMPT;
use trainer::data::tokenize::TextProcessor;
use trainer::demo::{generate, regenerate, DemoOptions};
use trainer::model::{LoadOptions, MllamaModel};

fn opts(dir: &Path, seed: u64) -> DemoOptions {
    DemoOptions {
        out: dir.to_path_buf(),
        seed,
        train: 40,
        val: 8,
        test: 30,
        image_size: 112,
        bpe_vocab: 600,
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("demo-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn lines(p: &Path) -> Vec<Value> {
    String::from_utf8(read(p))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn deterministic_and_cached() {
    let (a, b, c) = (tmp("a"), tmp("b"), tmp("c"));
    let sa = generate(&opts(&a, 3)).unwrap();
    assert!(!sa.cached);
    generate(&opts(&b, 3)).unwrap();
    generate(&opts(&c, 4)).unwrap();
    for f in [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "images/train-00007.png",
        "images/test-00003.png",
        "model/tokenizer.json",
        "model/config.json",
        "model/model.safetensors",
    ] {
        assert_eq!(
            read(&a.join(f)),
            read(&b.join(f)),
            "{f} differs between runs"
        );
    }
    assert!(read(&a.join("train.jsonl")) != read(&c.join("train.jsonl")));
    // same options: nothing is rewritten
    let before = std::fs::metadata(a.join("train.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    let again = generate(&opts(&a, 3)).unwrap();
    assert!(again.cached);
    assert_eq!(again.records, sa.records);
    let after = std::fs::metadata(a.join("train.jsonl"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(before, after);
    // other sizes: regenerated
    let mut o = opts(&a, 3);
    o.train = 12;
    assert!(!generate(&o).unwrap().cached);
    assert_eq!(lines(&a.join("train.jsonl")).len(), 12);
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A shape read back from pixels.
#[derive(Debug)]
struct Blob {
    color: &'static str,
    kind: &'static str,
    area: usize,
    cx: f64,
}

fn palette(p: [u8; 3]) -> Option<&'static str> {
    let named = [
        ("red", [220, 40, 40]),
        ("green", [40, 170, 60]),
        ("blue", [40, 70, 220]),
        ("yellow", [235, 200, 30]),
    ];
    named.iter().find(|(_, c)| *c == p).map(|(n, _)| *n)
}

/// Connected components of palette-colored pixels; kind from how much of the bounding box the
/// shape fills (square ~1, circle ~0.785, triangle ~0.5).
fn blobs(path: &Path) -> Vec<Blob> {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let mut seen = vec![false; (w * h) as usize];
    let mut out = vec![];
    for y in 0..h {
        for x in 0..w {
            let Some(color) = palette(img.get_pixel(x, y).0) else {
                continue;
            };
            if seen[(y * w + x) as usize] {
                continue;
            }
            let mut stack = vec![(x, y)];
            seen[(y * w + x) as usize] = true;
            let (mut n, mut sx, mut x0, mut x1, mut y0, mut y1) = (0usize, 0f64, x, x, y, y);
            while let Some((px, py)) = stack.pop() {
                n += 1;
                sx += px as f64;
                (x0, x1, y0, y1) = (x0.min(px), x1.max(px), y0.min(py), y1.max(py));
                let nb = [
                    (px.wrapping_sub(1), py),
                    (px + 1, py),
                    (px, py.wrapping_sub(1)),
                    (px, py + 1),
                ];
                for (qx, qy) in nb {
                    if qx < w
                        && qy < h
                        && !seen[(qy * w + qx) as usize]
                        && palette(img.get_pixel(qx, qy).0) == Some(color)
                    {
                        seen[(qy * w + qx) as usize] = true;
                        stack.push((qx, qy));
                    }
                }
            }
            let fill = n as f64 / (((x1 - x0 + 1) * (y1 - y0 + 1)) as f64);
            let kind = if fill > 0.92 {
                "square"
            } else if fill > 0.65 {
                "circle"
            } else {
                "triangle"
            };
            out.push(Blob {
                color,
                kind,
                area: n,
                cx: sx / n as f64,
            });
        }
    }
    out
}

/// Answers a demo question from the blobs alone.
fn answer_from_pixels(q: &str, b: &[Blob]) -> String {
    let colors = ["red", "green", "blue", "yellow"];
    let kinds = [
        ("circles", "circle"),
        ("squares", "square"),
        ("triangles", "triangle"),
    ];
    let count_color = |c: &str| b.iter().filter(|x| x.color == c).count();
    if let Some(rest) = q.strip_prefix("How many ") {
        for c in colors {
            if rest.starts_with(&format!("{c} shapes")) {
                return count_color(c).to_string();
            }
        }
        for (pl, k) in kinds {
            if rest.starts_with(pl) {
                return b.iter().filter(|x| x.kind == k).count().to_string();
            }
        }
    }
    if q == "What color is the largest shape?" {
        return b.iter().max_by_key(|x| x.area).unwrap().color.to_string();
    }
    if let Some(rest) = q.strip_prefix("Are there more ") {
        let words: Vec<&str> = rest.split_whitespace().collect();
        let (a, c) = (words[0], words[2]);
        assert_ne!(
            count_color(a),
            count_color(c),
            "{q}: as many {a} as {c} shapes in the image: the question has no answer"
        );
        return if count_color(a) > count_color(c) {
            a
        } else {
            c
        }
        .to_string();
    }
    if let Some(rest) = q.strip_prefix("Is the ") {
        // "Is the red circle to the left or to the right of the blue square?"
        let w: Vec<&str> = rest.trim_end_matches('?').split_whitespace().collect();
        let find = |c: &str, k: &str| {
            let v: Vec<&Blob> = b.iter().filter(|x| x.color == c && x.kind == k).collect();
            assert_eq!(v.len(), 1, "{q}: {c} {k} is not unique in the image");
            v[0].cx
        };
        let (xa, xb) = (find(w[0], w[1]), find(w[w.len() - 2], w[w.len() - 1]));
        return if xa < xb { "left" } else { "right" }.to_string();
    }
    panic!("unknown question {q:?}");
}

#[test]
fn answers_are_determined_by_the_image() {
    let d = tmp("pixels");
    let o = opts(&d, 11);
    generate(&o).unwrap();
    let mut categories: HashMap<String, usize> = HashMap::new();
    for b in lines(&d.join("test.jsonl")) {
        let q = b["question"].as_str().unwrap();
        let got = answer_from_pixels(
            q,
            &blobs(&d.join("images").join(b["image"].as_str().unwrap())),
        );
        assert_eq!(got, b["answer"].as_str().unwrap(), "{}: {q}", b["id"]);
        let choices: Vec<&str> = b["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert!(
            choices.contains(&got.as_str()),
            "{}: answer not among the choices",
            b["id"]
        );
        *categories
            .entry(b["category"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        categories.len(),
        5,
        "every question type appears: {categories:?}"
    );
    // training records: the refined (turn 2) conclusion is right, turn 1 sometimes wrong
    let mut wrong = 0;
    let train = lines(&d.join("train.jsonl"));
    for (i, r) in train.iter().enumerate() {
        let conv = r["conversations"].as_array().unwrap();
        assert_eq!(conv.len(), 4);
        assert_eq!(conv[2]["value"], DEFAULT_CORRECTION_PROMPT);
        let q = conv[0]["value"]
            .as_str()
            .unwrap()
            .trim_start_matches("<image>\n");
        let truth = answer_from_pixels(
            q,
            &blobs(&d.join("images").join(r["image"].as_str().unwrap())),
        );
        let concl = |s: &str| {
            s.split("<CONCLUSION>")
                .nth(1)
                .unwrap()
                .split("</CONCLUSION>")
                .next()
                .unwrap()
                .to_string()
        };
        let first = concl(conv[1]["value"].as_str().unwrap());
        assert_eq!(
            concl(conv[3]["value"].as_str().unwrap()),
            truth,
            "train {i}: refined answer"
        );
        let it = regenerate(&o, "train", i).unwrap();
        assert_eq!(it.qa.answer, truth);
        assert_eq!(it.qa.first_correct, first == truth);
        wrong += usize::from(first != truth);
        // the correction restates the evidence, and the evidence is what the pixels show
        let refined = conv[3]["value"].as_str().unwrap();
        let evidence = refined
            .split("<REASONING>Recheck: ")
            .nth(1)
            .unwrap()
            .split(". ")
            .next()
            .unwrap();
        if q.starts_with("How many") {
            let items = evidence.split(": ").nth(1).unwrap();
            let n = if items == "none" {
                0
            } else {
                items.split(", ").count()
            };
            assert_eq!(n.to_string(), truth, "train {i}: {evidence}");
        } else if let Some(rest) = q.strip_prefix("Is the ") {
            let (a, b) = rest
                .trim_end_matches('?')
                .split_once(" left or right of the ")
                .unwrap();
            let want = if truth == "left" {
                format!("{a} is left of {b}")
            } else {
                format!("{b} is left of {a}")
            };
            assert_eq!(evidence, want, "train {i}");
        }
        assert!(
            refined.contains(if first == truth { "Confirmed." } else { "Not " }),
            "train {i}: {refined}"
        );
    }
    assert!(
        wrong > 0 && wrong < train.len() / 2,
        "{wrong} of {} first turns wrong",
        train.len()
    );
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn model_folder_loads_like_a_released_one() {
    let d = tmp("model");
    let s = generate(&opts(&d, 5)).unwrap();
    // the bar: a tiny Mllama of ~5-30M parameters
    assert!(
        (5_000_000..30_000_000).contains(&s.parameters),
        "{} parameters",
        s.parameters
    );
    let m = d.join("model");
    let text = TextProcessor::from_model_dir(&m, false).unwrap();
    let vocab = text.tokenizer.get_vocab_size(true);
    assert_eq!(
        text.ids.image as usize,
        vocab - 1,
        "<|image|> is the last id"
    );
    let cfg: Value = serde_json::from_slice(&read(&m.join("config.json"))).unwrap();
    assert_eq!(
        cfg["text_config"]["vocab_size"].as_i64().unwrap(),
        text.ids.image
    );
    assert_eq!(cfg["image_token_index"].as_i64().unwrap(), text.ids.image);
    // special ids in config.json are the tokenizer's (as in a released folder)
    let id = |t: &str| text.tokenizer.token_to_id(t).unwrap() as i64;
    let tc = &cfg["text_config"];
    assert_eq!(
        tc["bos_token_id"].as_i64().unwrap(),
        id("<|begin_of_text|>")
    );
    assert_eq!(tc["eos_token_id"].as_i64().unwrap(), id("<|eot_id|>"));
    assert_eq!(
        tc["pad_token_id"].as_i64().unwrap(),
        id("<|finetune_right_pad_id|>")
    );
    for t in [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ] {
        assert!(text.tokenizer.token_to_id(t).is_some(), "{t}");
    }
    // the post-processor prepends BOS
    let enc = text
        .tokenizer
        .encode("How many red shapes are there?", true)
        .unwrap();
    assert_eq!(enc.get_ids()[0] as i64, text.ids.bos);
    let round = text.tokenizer.decode(&enc.get_ids()[1..], true).unwrap();
    assert_eq!(round.trim(), "How many red shapes are there?");
    // a record renders through the chat template and tokenizes with the image token
    let rec = &lines(&d.join("train.jsonl"))[0];
    let conv = rec["conversations"].as_array().unwrap();
    let turns = vec![
        trainer::data::records::Turn {
            user: conv[0]["value"]
                .as_str()
                .unwrap()
                .trim_start_matches("<image>\n")
                .into(),
            assistant: conv[1]["value"].as_str().unwrap().into(),
        },
        trainer::data::records::Turn {
            user: conv[2]["value"].as_str().unwrap().into(),
            assistant: conv[3]["value"].as_str().unwrap().into(),
        },
    ];
    let e = text.encode(&turns, true).unwrap();
    assert_eq!(
        e.input_ids.iter().filter(|&&i| i == text.ids.image).count(),
        1
    );
    assert!(
        e.supervised() > 20 && e.input_ids.len() < 320,
        "{} tokens",
        e.input_ids.len()
    );
    let ip = ImageProcessorConfig::from_model_dir(&m).unwrap();
    assert!(format!("{ip:?}").contains("112"), "{ip:?}");
    let model = MllamaModel::load(&m, LoadOptions::default()).unwrap();
    let mut n = 0usize;
    model.visit_params(&mut |_, t| n += t.numel());
    assert_eq!(n, s.parameters);
    // one tile per image (the scene is one tile), and the patch positions are the 2D sine-cosine
    // table (row 0 is the class token's)
    assert_eq!(model.config.vision.max_num_tiles, 1);
    let grid = 112 / 14;
    let dim = model.config.vision.hidden_size;
    let want = tch::Tensor::from_slice(&trainer::demo::model::sincos_2d(grid, dim))
        .reshape([grid * grid, dim]);
    let got = model.vision.pos_embedding.narrow(0, 1, grid * grid);
    assert!(got.allclose(&want, 1e-6, 1e-6, false));
    // patch (row 0, col 1) vs (row 0, col 0): the x features differ, the y features do not
    let d01 = (got.get(1) - got.get(0)).abs();
    assert!(d01.narrow(0, 0, dim / 2).max().double_value(&[]) > 0.5);
    assert!(d01.narrow(0, dim / 2, dim / 2).max().double_value(&[]) < 1e-6);
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn binomial_tail_matches_hand_values() {
    use trainer::demo::report::binomial_tail;
    assert_eq!(binomial_tail(10, 0, 0.3), 1.0);
    assert!((binomial_tail(10, 10, 0.5) - 1.0 / 1024.0).abs() < 1e-12);
    assert!((binomial_tail(2, 1, 0.5) - 0.75).abs() < 1e-12);
    // 3 of 3 at p = 0.2: 0.008; at least 2 of 3: 3 * 0.04 * 0.8 + 0.008 = 0.104
    assert!((binomial_tail(3, 3, 0.2) - 0.008).abs() < 1e-12);
    assert!((binomial_tail(3, 2, 0.2) - 0.104).abs() < 1e-12);
}
