//! Shared by the trainer's end-to-end tests: paths to the repository and the built binaries, and a
//! tiny random Mllama model folder that agrees with the data fixtures' tokenizer (vocab 711, the
//! image token 711 in the embedding's extra rows) and image processor (56-px tiles).
#![allow(dead_code)] // each test file uses a different part

pub mod ckpt;

use std::path::{Path, PathBuf};

use serde_json::Value;
use trainer::model::{KeyLayout, LoadOptions, MllamaConfig, MllamaModel};

/// A fresh copy of the files of folder `src` (not recursive) in `dst`.
/// Each prediction's turn texts, in predictions.jsonl's order (`trainer eval --out dir`).
#[allow(dead_code)] // (each test binary compiles this module; not all use it)
pub fn prediction_texts(dir: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(dir.join("predictions.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let p: Value = serde_json::from_str(l).unwrap();
            p["turns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["text"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

pub fn copy_dir(src: &Path, dst: &Path) {
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// A copy of model folder `src` at `dst` whose config.json was re-saved (pretty-printed, another
/// transformers_version): other bytes, the same model. Returns that config, for a test to change
/// and write back.
#[allow(dead_code)] // (each test binary compiles this module; not all use it)
pub fn resaved_model(src: &Path, dst: &Path) -> serde_json::Value {
    copy_dir(src, dst);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("config.json")).unwrap()).unwrap();
    cfg["transformers_version"] = "9.99.0".into();
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_string_pretty(&cfg).unwrap(),
    )
    .unwrap();
    cfg
}

/// Holds the export lock of `dir` as another export would (flock on `.llava-sco-export.lock`)
/// until the returned file is dropped.
pub fn hold_export_lock(dir: &Path) -> std::fs::File {
    hold_lock(dir, ".llava-sco-export.lock")
}

/// Holds the lock file `name` of `dir` (flock) until the returned file is dropped.
pub fn hold_lock(dir: &Path, name: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("otherhost {}\n", std::process::id())).unwrap();
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: flock on a descriptor this function owns.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    f
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cmd` without what the environment of a job (SLURM, an outer launcher or torchrun) would pass
/// to the launcher or trainer a test starts: SLURM's layout would make `launcher --standalone`
/// refuse a second node, an outer restart count or error file would change what a run does.
pub fn isolated(mut cmd: std::process::Command) -> std::process::Command {
    for (key, _) in std::env::vars() {
        if key.starts_with("SLURM_") || key.starts_with("TORCHELASTIC_") || key.starts_with("PET_")
        {
            cmd.env_remove(key);
        }
    }
    for key in [
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "LLAVA_SCO_LAUNCH_ID",
        "LLAVA_SCO_STORE_TOKEN",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// The workspace's launcher, `isolated`.
/// Launcher arguments for node `node_rank` of two nodes of `nproc` ranks each on this host, with
/// the store at 127.0.0.1:`port` (a free one: `free_port`), and the variable that lets the two
/// "nodes" reach each other over loopback (which a real multi-node run refuses by default).
#[allow(dead_code)] // (not every test binary starts two nodes)
pub fn two_node_args(node_rank: usize, nproc: usize, port: u16, run_id: &str) -> Vec<String> {
    let args = [
        "--nnodes",
        "2",
        "--node-rank",
        &node_rank.to_string(),
        "--nproc-per-node",
        &nproc.to_string(),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        &port.to_string(),
        "--run-id",
        run_id,
    ];
    args.iter().map(|a| a.to_string()).collect()
}

#[allow(dead_code)]
pub const LOOPBACK_NODES_ENV: (&str, &str) = ("LLAVA_SCO_CPU_TCP_ADDR", "127.0.0.1");

/// A TCP port free on 127.0.0.1 now.
#[allow(dead_code)]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

pub fn launcher() -> std::process::Command {
    isolated(std::process::Command::new(bin("launcher")))
}

/// A binary of this workspace next to the test executable (target/<profile>/).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --bins` (make test does)",
        path.display()
    );
    path
}

/// Writes `dir/` as a Hugging Face folder: config.json (the fixture model's, resized to the data
/// fixtures' tokenizer and tiles, then `edit`ed), a random model.safetensors from `seed`, and the
/// tokenizer, chat template and processor config of tests/fixtures/data/tok.
pub fn tiny_model_folder(dir: &Path, seed: i64, edit: impl FnOnce(&mut Value)) {
    std::fs::create_dir_all(dir).unwrap();
    let fx = repo().join("tests/fixtures");
    let text = std::fs::read_to_string(fx.join("mllama_tiny/model_hf5/config.json")).unwrap();
    let mut cfg: Value = serde_json::from_str(&text).unwrap();
    cfg["text_config"]["vocab_size"] = 711.into();
    cfg["image_token_index"] = 711.into();
    cfg["vision_config"]["image_size"] = 56.into();
    edit(&mut cfg);
    let text = serde_json::to_string_pretty(&cfg).unwrap();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let model = MllamaModel::random(
        MllamaConfig::from_json_str(&text).unwrap(),
        LoadOptions::default(),
        seed,
    )
    .unwrap();
    model
        .save_safetensors(&dir.join("model.safetensors"), KeyLayout::ModulePaths)
        .unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
    ] {
        std::fs::copy(fx.join("data/tok").join(f), dir.join(f)).unwrap();
    }
}

/// Writes `dir/train.jsonl`: 48 records over the fixture images, questions and answers of varied
/// lengths built from a few words (the training runs of the end-to-end tests).
pub fn write_train_records(dir: &Path) {
    let images = [
        "small.png",
        "large.png",
        "layout_1x2.png",
        "layout_2x1.png",
        "photo.jpg",
        "gray.png",
    ];
    let words = [
        "red", "square", "three", "objects", "blue", "circle", "answer", "count",
    ];
    let mut lines = vec![];
    for i in 0..48usize {
        let q: Vec<&str> = (0..(2 + i % 5))
            .map(|k| words[(i + k) % words.len()])
            .collect();
        let a: Vec<&str> = (0..(3 + (i * 7) % 11))
            .map(|k| words[(i * 3 + k) % words.len()])
            .collect();
        let rec = serde_json::json!({
            "id": format!("r{i}"),
            "image": images[i % images.len()],
            "conversations": [
                {"from": "human", "value": format!("<image>\nWhat is {}?", q.join(" "))},
                {"from": "gpt", "value": format!("<SUMMARY> {} </SUMMARY>", a.join(" "))},
            ]
        });
        lines.push(rec.to_string());
    }
    std::fs::write(dir.join("train.jsonl"), lines.join("\n") + "\n").unwrap();
}
