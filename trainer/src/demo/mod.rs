//! `trainer demo-data`: the self-contained demo's data set and model folder (issue 11).
//! Index:
//! - `scene`: seeded scenes of colored shapes, rendering, questions with staged first/refined answers
//! - `model`: the byte-level BPE tokenizer trained on the corpus, the tiny Mllama folder
//! - `report`: the final before/after table and SVG plots (`trainer demo-model table`)
//! - here:    [`generate`] (train/val SCo records, the test bench, images, model; cached by a
//!   manifest); the trained model folder comes from `trainer export` (scripts/demo.sh)
pub mod model;
pub mod report;
pub mod scene;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::data::records::DEFAULT_CORRECTION_PROMPT;
use scene::{make_qa, Category, Qa, Rng, Scene};

/// Bumped whenever the generator's output changes (invalidates caches).
pub const GENERATOR_VERSION: u32 = 5;

/// Probability that turn 1 is wrong in a record.
pub const P_WRONG: f64 = 0.3;

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DemoOptions {
    pub out: PathBuf,
    pub seed: u64,
    pub train: usize,
    pub val: usize,
    pub test: usize,
    /// Image side = tile side (one tile per image).
    pub image_size: u32,
    /// BPE merges/vocabulary before the special tokens.
    pub bpe_vocab: usize,
}

impl DemoOptions {
    fn manifest(&self) -> Value {
        json!({
            "generator_version": GENERATOR_VERSION,
            "seed": self.seed,
            "train": self.train,
            "val": self.val,
            "test": self.test,
            "image_size": self.image_size,
            "bpe_vocab": self.bpe_vocab,
            "p_wrong": P_WRONG,
        })
    }
}

/// What [`generate`] did.
#[derive(Debug, Clone)]
pub struct DemoSummary {
    /// True when a matching manifest was found and nothing was written.
    pub cached: bool,
    pub parameters: usize,
    pub first_turn_wrong: usize,
    pub records: usize,
}

#[derive(Clone, Copy)]
enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
    fn tag(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Val => 2,
            Split::Test => 3,
        }
    }
}

/// One generated item: its scene and question (a pure function of seed, split and index).
pub struct Item {
    pub id: String,
    pub image: String,
    pub scene: Scene,
    pub qa: Qa,
}

fn item(seed: u64, split: Split, i: usize, size: u32) -> Item {
    let mut rng = Rng::new(
        seed.wrapping_mul(0x100_0000_01B3)
            ^ (split.tag() << 56)
            ^ (i as u64).wrapping_mul(0x9E37_79B9),
    );
    let scene = Scene::random(&mut rng, size);
    let p_wrong = if matches!(split, Split::Test) {
        0.0
    } else {
        P_WRONG
    };
    let qa = make_qa(&scene, &mut rng, p_wrong);
    let id = format!("{}-{i:05}", split.name());
    Item {
        image: format!("{id}.png"),
        id,
        scene,
        qa,
    }
}

/// Regenerates item `i` of split `split` ("train", "val" or "test") for `opts` (tests check that
/// a written record's answer is what the scene decides).
pub fn regenerate(opts: &DemoOptions, split: &str, i: usize) -> Option<Item> {
    let s = match split {
        "train" => Split::Train,
        "val" => Split::Val,
        "test" => Split::Test,
        _ => return None,
    };
    Some(item(opts.seed, s, i, opts.image_size))
}

fn record(it: &Item) -> Value {
    json!({
        "id": it.id,
        "image": it.image,
        "conversations": [
            {"from": "human", "value": format!("<image>\n{}", it.qa.question)},
            {"from": "gpt", "value": it.qa.first},
            {"from": "human", "value": DEFAULT_CORRECTION_PROMPT},
            {"from": "gpt", "value": it.qa.refined},
        ]
    })
}

fn bench_line(it: &Item) -> Value {
    json!({
        "id": it.id,
        "image": it.image,
        "question": it.qa.question,
        "answer": it.qa.answer,
        "choices": it.qa.choices,
        "category": it.qa.category.name(),
    })
}

/// Chance accuracy of a uniform guess among the choices, per category (what the report compares to).
pub fn chance_levels() -> Vec<(&'static str, f64)> {
    Category::ALL
        .iter()
        .map(|c| {
            let n = match c {
                Category::CountColor | Category::CountShape => scene::MAX_SHAPES + 1,
                Category::LargestColor => 4,
                Category::LeftRight | Category::Compare => 2,
            };
            (c.name(), 1.0 / n as f64)
        })
        .collect()
}

fn write_jsonl(path: &Path, lines: &[Value]) -> Result<()> {
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Generates everything under `opts.out` (train.jsonl, val.jsonl, test.jsonl, images/, model/,
/// chance.json, manifest.json), or nothing when `manifest.json` says the same options made it.
pub fn generate(opts: &DemoOptions) -> Result<DemoSummary> {
    let out = &opts.out;
    let manifest_path = out.join("manifest.json");
    let wanted = opts.manifest();
    let expected = [
        "train.jsonl",
        "val.jsonl",
        "test.jsonl",
        "model/model.safetensors",
        "model/tokenizer.json",
    ];
    if let Ok(text) = std::fs::read_to_string(&manifest_path) {
        if let Ok(found) = serde_json::from_str::<Value>(&text) {
            if found.get("options") == Some(&wanted)
                && expected.iter().all(|f| out.join(f).is_file())
            {
                return Ok(DemoSummary {
                    cached: true,
                    parameters: found["parameters"].as_u64().unwrap_or(0) as usize,
                    first_turn_wrong: found["first_turn_wrong"].as_u64().unwrap_or(0) as usize,
                    records: found["records"].as_u64().unwrap_or(0) as usize,
                });
            }
        }
    }
    // a stale or partial folder: start over (only what this generator writes)
    let _ = std::fs::remove_file(&manifest_path);
    let images = out.join("images");
    std::fs::create_dir_all(&images).with_context(|| format!("creating {}", images.display()))?;
    let mut corpus: Vec<String> = vec![];
    let mut wrong = 0usize;
    let mut records = 0usize;
    for (split, n) in [
        (Split::Train, opts.train),
        (Split::Val, opts.val),
        (Split::Test, opts.test),
    ] {
        let mut lines = Vec::with_capacity(n);
        for i in 0..n {
            let it = item(opts.seed, split, i, opts.image_size);
            let path = images.join(&it.image);
            it.scene
                .render()
                .save(&path)
                .with_context(|| format!("writing {}", path.display()))?;
            match split {
                Split::Test => lines.push(bench_line(&it)),
                _ => {
                    corpus.push(it.qa.question.clone());
                    corpus.push(it.qa.first.clone());
                    corpus.push(it.qa.refined.clone());
                    wrong += usize::from(!it.qa.first_correct);
                    records += 1;
                    lines.push(record(&it));
                }
            }
        }
        write_jsonl(&out.join(format!("{}.jsonl", split.name())), &lines)?;
    }
    // the correction prompt and the template's own words as often as a record holds them, so BPE
    // learns them as whole words: seen once they split into single letters (89 tokens for the
    // prompt instead of ~30, about a third of every training sequence)
    for _ in 0..records {
        corpus.push(DEFAULT_CORRECTION_PROMPT.to_string());
        for w in ["user", "assistant", "user", "assistant"] {
            corpus.push(w.to_string());
        }
    }
    for w in [
        "system",
        "Cutting Knowledge Date: December 2023",
        "Today Date: 26 Jul 2024",
    ] {
        corpus.push(w.to_string());
    }
    let parameters = model::write_model_folder(
        &out.join("model"),
        &corpus,
        model::ModelSizes {
            tile: opts.image_size,
            bpe_vocab: opts.bpe_vocab,
        },
        opts.seed as i64,
    )?;
    let chance: serde_json::Map<String, Value> = chance_levels()
        .into_iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    std::fs::write(
        out.join("chance.json"),
        serde_json::to_string_pretty(&chance)?,
    )?;
    let manifest = json!({
        "options": wanted,
        "parameters": parameters,
        "first_turn_wrong": wrong,
        "records": records,
    });
    std::fs::write(&manifest_path, serde_json::to_string_pretty(&manifest)?)?;
    Ok(DemoSummary {
        cached: false,
        parameters,
        first_turn_wrong: wrong,
        records,
    })
}
