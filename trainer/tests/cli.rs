//! The trainer binary's contract: config show works, unbuilt subcommands fail loudly (exit 2),
//! bad configs give one clear line and a non-zero exit.
mod common;

use std::process::Command;

fn trainer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run trainer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Output to a stdout that cannot be written: a full disk is an error that says so (it panicked
/// with a backtrace, exit 101), a reader that closed the pipe (`| head`) ends it quietly, with a
/// shell's status for SIGPIPE (a failed command does not pass for a success under pipefail).
#[test]
fn an_unwritable_stdout_is_an_error_and_a_closed_pipe_is_not() {
    // `config show` printing to `stdout`: exit code and stderr
    let show_to = |stdout: std::process::Stdio| {
        let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args(["config", "show", "configs/llava-sco.yaml"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (code, stderr) = show_to(full.into());
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: writing to stdout failed: No space left on device")
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    // (the pipe's reading end closed before the program starts: its first write fails)
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let (code, stderr) = show_to(writer.into());
    assert_eq!(code, Some(141), "128 + SIGPIPE, as a shell's: {stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}

#[test]
fn config_show_prints_the_resolved_config_with_overrides() {
    let (code, stdout, _) = trainer(&[
        "config",
        "show",
        "configs/llava-sco.yaml",
        "--set",
        "train.lr=2e-5",
    ]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("lr: 2.0e-5") || stdout.contains("lr: 0.00002"),
        "{stdout}"
    );
    assert!(stdout.contains("target_modules:"), "{stdout}");
}

#[test]
fn bad_override_is_one_clear_error() {
    let (code, _, stderr) = trainer(&[
        "config",
        "show",
        "configs/llava-sco.yaml",
        "--set",
        "pef.r=3",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains(r#"pef.r: unknown key "pef" (did you mean "peft"?)"#),
        "{stderr}"
    );
}

/// Under the launcher (or torchrun) the error is also recorded in TORCHELASTIC_ERROR_FILE, in
/// torchelastic's format, for the root-cause summary.
#[test]
fn an_error_is_recorded_in_the_torchelastic_error_file() {
    let dir = std::env::temp_dir().join(format!("trainer-cli-errfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("error.json");
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "config",
            "show",
            "configs/llava-sco.yaml",
            "--set",
            "pef.r=3",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("TORCHELASTIC_ERROR_FILE", &file)
        .output()
        .expect("run trainer");
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let message = json["message"]["message"].as_str().unwrap();
    assert!(message.contains(r#"pef.r: unknown key "pef""#), "{json}");
    let timestamp: u64 = json["message"]["extraInfo"]["timestamp"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(timestamp > 1_700_000_000, "{json}");
    // and the launcher reads it back as it reads Python's
    let read = launcher::error_file::read(&file).unwrap();
    assert_eq!(read.message, message);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn missing_config_names_the_file() {
    let (code, _, stderr) = trainer(&["train", "no/such.yaml"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no/such.yaml"), "{stderr}");
}

#[test]
fn an_unknown_bench_is_a_usage_error_listing_the_real_ones() {
    let (code, _, stderr) = trainer(&["bench", "nonsense"]);
    assert_eq!(code, 2, "{stderr}");
    for bench in ["collectives", "data", "step", "checkpoint", "decode"] {
        let (code, stdout, stderr) = trainer(&["bench", bench, "--help"]);
        assert_eq!(code, 0, "bench {bench} --help: {stderr}");
        assert!(stdout.contains("Usage"), "bench {bench}: {stdout}");
    }
}

/// llama-recipes' habit, a setting given as a flag after the config, is answered with its
/// `--set` (clap's tip, `-- --use_peft`, led to another error).
#[test]
fn a_setting_given_as_a_flag_is_answered_with_set() {
    let (code, _, stderr) = trainer(&["train", "configs/demo.yaml", "--use_peft"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("`--set use_peft=true`") && !stderr.contains("tip:"),
        "{stderr}"
    );
}

/// The seed's inference.py and transformers' names of the generation flags are read as ours:
/// --finetuning_path (the adapter), --max_new_tokens, --top_p.
#[test]
fn the_seeds_inference_flag_names_are_read() {
    let (code, _, stderr) = trainer(&[
        "infer",
        "--finetuning_path",
        "/no/such/lora",
        "--question",
        "q",
        "--max_new_tokens",
        "3",
        "--top_p",
        "0.5",
    ]);
    assert_eq!(
        code, 1,
        "read, then the missing adapter is the error: {stderr}"
    );
    assert!(
        stderr.contains("/no/such/lora/adapter_config.json"),
        "{stderr}"
    );
}

/// An empty --stop string would end every turn at once (transformers refuses it too).
#[test]
fn an_empty_stop_string_is_a_usage_error() {
    let (code, _, stderr) = trainer(&["infer", "--model", "m", "--question", "q", "--stop", ""]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("an empty stop string"), "{stderr}");
}

/// A blank --question is refused before the model loads, as a blank question line of
/// --questions or of a benchmark is.
#[test]
fn a_blank_question_is_a_usage_error() {
    for blank in ["", " \n"] {
        let (code, _, stderr) = trainer(&["infer", "--model", "m", "--question", blank]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("the question is empty"), "{stderr}");
    }
}

/// `eval --limit 0` would write an empty report and succeed.
#[test]
fn an_eval_limit_of_zero_is_a_usage_error() {
    let args = [
        "eval",
        "--model",
        "m",
        "--data",
        "b.jsonl",
        "--image-root",
        "i",
    ];
    let (code, _, stderr) =
        trainer(&[&args[..], &["--out", "o", "--turns", "1", "--limit", "0"]].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--limit"), "{stderr}");
}

/// A stop string made of special tokens never shows in the generated text (they are skipped,
/// as transformers' decode skips them): refused before the model loads.
#[test]
fn a_stop_string_of_special_tokens_is_refused() {
    let dir = std::env::temp_dir().join(format!("cli-stop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    common::tiny_model_folder(&dir, 3, |_| {});
    let ask = |more: &[&str]| {
        let args = ["infer", "--model", dir.to_str().unwrap(), "--question", "q"];
        trainer(&[&args[..], more].concat())
    };
    let (code, _, stderr) = ask(&["--stop", "<|eot_id|>"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("--stop \"<|eot_id|>\": special tokens are not part of the generated text"),
        "{stderr}"
    );
    // text the model writes passes the check
    let (code, _, stderr) = ask(&["--stop", " </CONCLUSION>", "--max-new-tokens", "2"]);
    assert_eq!(code, 0, "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn infer_with_a_missing_model_folder_names_it() {
    let (code, _, stderr) = trainer(&["infer", "--model", "no/such/model", "--question", "q"]);
    assert_eq!(code, 1);
    assert!(stderr.contains("no/such/model"), "{stderr}");
    assert!(
        stderr.contains("expected a Hugging Face model folder")
            && !stderr.contains("(os error 2): "),
        "the OS error once, and what the folder should hold: {stderr}"
    );
    // flags and the image are checked before any model is read
    let (code, _, stderr) = trainer(&[
        "infer",
        "--model",
        "no/such/model",
        "--question",
        "q",
        "--turns",
        "0",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("expected a whole number of 1 or more"),
        "{stderr}"
    );
    let (code, _, stderr) = trainer(&[
        "infer",
        "--model",
        "no/such/model",
        "--question",
        "q",
        "--image",
        "no/such.png",
    ]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("--image: cannot read image no/such.png"),
        "{stderr}"
    );
}

/// A benchmark works in a subfolder of --dir and removes only that: a --dir holding other files
/// (here a sentinel; its name has `: ` and `, `, which a YAML config must quote) keeps them.
#[test]
fn bench_checkpoint_keeps_what_its_dir_already_held() {
    let dir = std::env::temp_dir().join(format!("bench-dir-{}, a: b", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("precious.txt"), "keep me").unwrap();
    let (code, _, stderr) = trainer(&[
        "bench",
        "checkpoint",
        "--mib",
        "1",
        "--groups",
        "1",
        "--reps",
        "1",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        std::fs::read_to_string(dir.join("precious.txt")).unwrap(),
        "keep me"
    );
    assert!(
        !dir.join(".llava-sco-bench").exists(),
        "the scratch folder is removed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A benchmark's `--out` holds each measurement with when and where it was made (unix time,
/// cores, load, commit), and a run that fails leaves no earlier results behind that would pass
/// for its own.
#[test]
fn bench_out_records_provenance_and_a_failed_run_leaves_no_stale_results() {
    let out = std::env::temp_dir().join(format!("bench-out-{}.jsonl", std::process::id()));
    std::fs::write(&out, "{\"stale\": true}\n").unwrap();
    let o = out.to_str().unwrap();
    let args = [
        "bench",
        "data",
        "--images",
        "2",
        "--reps",
        "1",
        "--workers",
        "1",
        "--batch-size",
        "1",
    ];
    let mut failing = args.to_vec();
    failing.extend(["--python", "/no/such/python", "--out", o]);
    let (code, _, stderr) = trainer(&failing);
    assert_ne!(code, 0, "{stderr}");
    assert!(!out.exists(), "the earlier results are gone");
    let mut passing = args.to_vec();
    passing.extend(["--no-peer", "--out", o]);
    let (code, _, stderr) = trainer(&passing);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.lines().count() >= 2, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p = &v["provenance"];
        assert!(
            p["unix_time"].as_u64().unwrap() > 1_700_000_000 && p["cores"].as_u64().unwrap() >= 1,
            "{line}"
        );
        assert!(
            p.get("commit").is_some() && p.get("loadavg_1m").is_some(),
            "{line}"
        );
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        assert_eq!(p["profile"], profile, "{line}");
        assert!(p.get("dirty").is_some(), "{line}");
    }
    std::fs::remove_file(&out).unwrap();
}

/// `launcher --standalone --nproc-per-node 2 --max-restarts 2 configs/demo.yaml SETS...` to its end.
fn launch_demo_config(sets: &[&str]) -> std::process::Output {
    common::launcher()
        .args([
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "2",
        ])
        .arg("configs/demo.yaml")
        .args(sets)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("run launcher")
}

/// The launcher checks a config once before starting ranks: a bad key is one error, with the
/// file and the `--set`, and is not restarted (no restart can fix it).
#[test]
fn the_launcher_refuses_a_bad_config_once_without_restarts() {
    let out = launch_demo_config(&["--set", "pef.r=3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches(r#"pef.r: unknown key "pef""#).count(),
        1,
        "{stderr}"
    );
    assert!(
        stderr.contains("configs/demo.yaml: pef.r") && stderr.contains("(from --set pef.r=3)"),
        "{stderr}"
    );
    assert!(!stderr.contains("restarting"), "{stderr}");
}

/// configs/demo.yaml's paths, which `make demo` creates, pointed at the fixtures for `config
/// check` (which refuses paths that are not there).
const FIXTURE_PATHS: [&str; 8] = [
    "--set",
    "model.path=tests/fixtures/train/model",
    "--set",
    "data.train=tests/fixtures/train/train.jsonl",
    "--set",
    "data.eval=tests/fixtures/train/train.jsonl",
    "--set",
    "data.image_root=tests/fixtures/data/images",
];

/// `trainer config check` builds the model's structure with the adapter's layout (weights left
/// unread) and prints peft's trainable-parameter line, the numbers peft's
/// `print_trainable_parameters` printed for the same LoraConfig on this model (peft 0.21.2,
/// 2026-11-29); a layout that wraps nothing or patterns that overlap stop there.
#[test]
fn config_check_prints_what_trains_and_refuses_a_bad_adapter_layout() {
    let mut check = vec!["config", "check", "configs/demo.yaml"];
    check.extend(FIXTURE_PATHS);
    check.extend([
        "--set",
        "peft={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
    ]);
    for (set, want) in [
        (
            "peft.use_rslora=false",
            "LoRA on 12 linear layers (rank 4): trainable params: 4,224 || all params: 277,639 \
             || trainable%: 1.5214",
        ),
        (
            "peft={target_modules: [q_proj, v_proj, fc1], use_dora: true, r: 4}",
            "DoRA on 15 linear layers (rank 4): trainable params: 6,048 || all params: 279,463 \
             || trainable%: 2.1642",
        ),
        (
            "peft.rank_pattern={fc1: 2, v_proj: 6}",
            "LoRA on 12 linear layers (ranks 4-6): trainable params:",
        ),
        (
            "peft={rank_pattern: {qproj: 2}, exclude_modules: [nothing_here]}",
            "warning: peft.rank_pattern key \"qproj\" matches no layer LoRA wraps: check its \
             spelling\nwarning: peft.exclude_modules \"nothing_here\" matches no linear layer: \
             check its spelling",
        ),
        (
            "peft={r: 4, alpha: 8, dropout: 0.0, init_from: tests/fixtures/train/adapter}",
            "LoRA on 12 linear layers (rank 4): trainable params: 4,224",
        ),
        (
            "peft.modules_to_save=[multi_modal_projector]",
            "LoRA on 12 linear layers (rank 4) and modules_to_save \
             [\"model.multi_modal_projector\"]: trainable params: 8,384 || all params: 281,799 \
             || trainable%: 2.9752",
        ),
    ] {
        let mut args = check.clone();
        args.extend(["--set", set]);
        let (code, stdout, stderr) = trainer(&args);
        assert_eq!(code, 0, "{set}: {stderr}");
        assert!(stdout.contains(want), "{set}: {stdout}");
    }
    for (set, want) in [
        (
            "peft.target_modules=[nothing]",
            "peft: adapter: target_modules [\"nothing\"] match no linear layer",
        ),
        (
            // (an adapter to start from is checked against the section as the run checks it)
            "peft={r: 8, alpha: 8, dropout: 0.0, init_from: tests/fixtures/train/adapter}",
            "peft.init_from tests/fixtures/train/adapter: its adapter_config.json differs from \
             the peft config, which checkpoints and `trainer export` record (peft.r: adapter 4, \
             config 8;",
        ),
        (
            "peft={target_modules: all-linear, modules_to_save: [projector]}",
            "saves model.multi_modal_projector, which target_modules also gives LoRA: peft \
             refuses that",
        ),
        (
            "peft.modules_to_save=[mlp_projector]",
            "peft: adapter: modules_to_save \"mlp_projector\": no module of this model has a path \
             that ends with it",
        ),
        (
            "peft.rank_pattern={q_proj: 2, self_attn.q_proj: 3}",
            "\"self_attn.q_proj\" gives it 3 (and 4 more modules): patterns that give a module \
             different values must not overlap",
        ),
    ] {
        let mut args = check.clone();
        args.extend(["--set", set]);
        let (code, _, stderr) = trainer(&args);
        assert_eq!(code, 1, "{set}: {stderr}");
        assert!(stderr.contains(want), "{set}: {stderr}");
        assert!(
            stderr.contains("configs/demo.yaml: the model and its adapter layout"),
            "{stderr}"
        );
    }
}

/// A path the run reads that is not there (a typo in model.path, data.train, data.image_root),
/// or an output folder that is the base model's, is refused by `trainer config check` naming its
/// key and the `--set` that gave it, and so by the launcher once, before any rank starts or
/// restarts (each would load the model first).
#[test]
fn a_missing_model_or_data_path_is_refused_before_ranks_start() {
    let mut check = vec!["config", "check", "configs/demo.yaml"];
    check.extend(FIXTURE_PATHS);
    let (code, stdout, stderr) = trainer(&check);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("config ok"), "{stdout}");
    for (set, want) in [
        (
            "model.path=/no/such/model",
            "configs/demo.yaml: model.path: /no/such/model: no such folder",
        ),
        (
            "model.path=meta-llama/Llama-3.2-11B-Vision",
            "a Hub id is not downloaded",
        ),
        (
            "model.path=tests/fixtures/train",
            "model.path: tests/fixtures/train has no config.json",
        ),
        (
            "data.train=/no/such/train.jsonl",
            "data.train: /no/such/train.jsonl: no such file (from --set data.train=/no/such/train.jsonl)",
        ),
        (
            "data.train=scripts/bench_decode.py",
            "data.train: scripts/bench_decode.py is a Python file (llama-recipes' \
             custom_dataset.file, a dataset loader): give the JSONL records it reads",
        ),
        (
            "data.eval=[tests/fixtures/train/train.jsonl, tests/fixtures]",
            "data.eval: tests/fixtures: a folder, not a JSONL file",
        ),
        (
            "data.image_root=/no/such/images",
            "data.image_root: /no/such/images: no such folder",
        ),
        // where a relative path was looked for, and a ~ no shell expanded
        (
            "data.train=no/such/train.jsonl",
            "data.train: no/such/train.jsonl: no such file (relative paths are read from the working folder, ",
        ),
        (
            "data.image_root=~/images",
            "data.image_root: ~/images: no such folder (a leading ~ is not expanded in a config: write the full path)",
        ),
        (
            "train.output_dir=tests/fixtures/train/../train/model",
            "train.output_dir: tests/fixtures/train/../train/model is model.path",
        ),
        (
            "checkpoint.dir=tests/fixtures/train/model/",
            "checkpoint.dir: tests/fixtures/train/model/ is model.path",
        ),

    ] {
        let mut args = check.clone();
        args.extend(["--set", set]);
        let (code, _, stderr) = trainer(&args);
        assert_eq!(code, 1, "{set}: {stderr}");
        assert!(stderr.contains(want), "{set}: {stderr}");
    }
    // another model's folder as a LoRA run's output_dir (its adapter would land beside the model)
    let mut args = check.clone();
    args.extend(["--set", "peft.method=lora", "--set"]);
    args.push("train.output_dir=tests/fixtures/mllama_tiny/model_hf5");
    let (code, _, stderr) = trainer(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "train.output_dir: tests/fixtures/mllama_tiny/model_hf5 holds a model (config.json)"
        ),
        "{stderr}"
    );
    // a checkpoint folder (a copied step-N given as checkpoint.dir to resume from) as the run's
    // checkpoint.dir or output_dir, or a folder inside one: retention would delete it all
    let ckpt = std::env::temp_dir().join(format!("cli-in-checkpoint-{}", std::process::id()));
    let step = ckpt.join("step-00000003");
    std::fs::create_dir_all(&step).unwrap();
    std::fs::write(step.join("manifest.json"), "{}").unwrap();
    let refused = |set: String, want: &str| {
        let mut args = check.clone();
        args.extend(["--set", &set]);
        let (code, _, stderr) = trainer(&args);
        assert_eq!(code, 1, "{set}: {stderr}");
        assert!(stderr.contains(want), "{set}: {stderr}");
    };
    let s = step.display();
    refused(
        format!("checkpoint.dir={s}"),
        &format!("checkpoint.dir: {s} is the checkpoint folder (it holds manifest.json)"),
    );
    refused(
        format!("checkpoint.dir={s}"),
        &format!("set checkpoint.resume={s} and checkpoint.dir to a folder of this run's"),
    );
    refused(
        format!("train.output_dir={s}/out"),
        &format!("train.output_dir: {s}/out is inside the checkpoint folder {s}"),
    );
    // (its parent, the folder of step-N folders, is what checkpoint.dir is for)
    let mut args = check.clone();
    let parent = format!("checkpoint.dir={}", ckpt.display());
    args.extend(["--set", &parent]);
    assert_eq!(trainer(&args).0, 0);
    std::fs::remove_dir_all(&ckpt).unwrap();
    // across nodes (--world above --nproc-per-node) the paths are each node's: left to the ranks
    let on_nodes_of = |per_node: &'static str| {
        let mut args = check.clone();
        args.extend(["--set", "model.path=/no/such/model", "--world", "4"]);
        args.extend(["--nproc-per-node", per_node]);
        trainer(&args).0
    };
    assert_eq!(on_nodes_of("2"), 0, "two nodes");
    assert_eq!(on_nodes_of("4"), 1, "one node");
    // an eval file is read only with train.validate (and config check says so, as the run would)
    let mut args = check.clone();
    args.extend([
        "--set",
        "data.eval=/no/such",
        "--set",
        "train.validate=false",
    ]);
    let (code, stdout, _) = trainer(&args);
    assert_eq!(code, 0);
    assert!(
        stdout.contains("config ok\nnote: data.eval is set (/no/such) but train.validate is false"),
        "{stdout}"
    );
    // demo.yaml as it is, before `make demo` made its data: through the launcher
    let out = launch_demo_config(&["--set", "model.path=/no/such/model"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr
            .matches("model.path: /no/such/model: no such folder")
            .count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("starting 2 rank"), "{stderr}");
}

/// A config that parses but cannot train (fp16 compute: no loss scaling here) is refused by
/// `trainer config check`, and so by the launcher once before any rank starts, not once per rank
/// and restart; `config show` still prints it.
#[test]
fn a_config_that_cannot_train_is_refused_before_ranks_start() {
    let fp16 = ["--set", "fsdp.mixed_precision=fp16"];
    let mut check = vec!["config", "check", "configs/demo.yaml"];
    check.extend(FIXTURE_PATHS);
    let (code, stdout, _) = trainer(&check);
    assert_eq!(code, 0);
    assert!(stdout.contains("configs/demo.yaml: config ok"), "{stdout}");
    check.extend(fp16);
    let (code, _, stderr) = trainer(&check);
    assert_eq!(code, 1);
    assert!(
        stderr
            .contains("configs/demo.yaml: fsdp.mixed_precision: fp16 training needs loss scaling")
            && stderr.contains("(from --set fsdp.mixed_precision=fp16)"),
        "{stderr}"
    );
    let (code, _, _) = trainer(&["config", "show", "configs/demo.yaml", fp16[0], fp16[1]]);
    assert_eq!(code, 0, "config show prints configs that do not train");
    let out = launch_demo_config(&fp16);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.matches("fp16 training needs loss scaling").count(),
        1,
        "{stderr}"
    );
    assert!(!stderr.contains("starting 2 rank"), "{stderr}");
}

/// What a config cannot train on the launch's layout (fsdp.enabled: false on 2 ranks) or a
/// `checkpoint.resume` folder that is not a checkpoint is refused by `trainer config check` (with
/// `--world` for the layout), and so by the launcher before any rank starts.
#[test]
fn a_layout_or_resume_folder_the_config_cannot_train_is_refused_before_ranks_start() {
    let no_fsdp = ["--set", "fsdp.enabled=false"];
    let mut check = vec!["config", "check", "configs/demo.yaml"];
    check.extend(FIXTURE_PATHS);
    check.extend(no_fsdp);
    let (code, stdout, stderr) = trainer(&check);
    assert_eq!(code, 0, "one rank trains without FSDP: {stderr}");
    assert!(stdout.contains("config ok"), "{stdout}");
    check.extend(["--world", "2"]);
    let (code, _, stderr) = trainer(&check);
    assert_eq!(code, 1);
    let refused = "fsdp.enabled: false trains in one process, but this run has 2 ranks";
    assert!(stderr.contains(refused), "{stderr}");
    let out = launch_demo_config(&no_fsdp);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.matches(refused).count(), 1, "{stderr}");
    assert!(!stderr.contains("starting 2 rank"), "{stderr}");
    let resume = ["--set", "checkpoint.resume=/no/such/step-00000010"];
    let (code, _, stderr) =
        trainer(&["config", "check", "configs/demo.yaml", resume[0], resume[1]]);
    assert_eq!(code, 1);
    assert!(
        stderr.contains("/no/such/step-00000010 does not exist"),
        "{stderr}"
    );
}

/// `infer` checks the tokenizer against the model as training does (its ids within the
/// embedding, whose overrun was a panic at the first token on the CPU and a device-side assert on
/// a GPU; its <|image|> the model's image token), and LOCAL_RANK.
#[test]
fn infer_refuses_a_tokenizer_beyond_the_model_and_a_bad_local_rank() {
    let root = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let src = root.join("tests/fixtures/train/model");
    let dir = std::env::temp_dir().join(format!("trainer-cli-tok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    // the model's image token is not the tokenizer's <|image|> (711)
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["image_token_index"] = 700.into();
    std::fs::write(&path, config.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let args = [
        "infer",
        "--model",
        model,
        "--question",
        "q",
        "--max-new-tokens",
        "1",
    ];
    let (code, _, stderr) = trainer(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr
            .contains("the tokenizer's <|image|> is id 711, the model's image_token_index is 700")
            && stderr.contains("the tokenizer files are not this model's"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(args)
        .env("LOCAL_RANK", "one")
        .output()
        .expect("run trainer");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("LOCAL_RANK=\"one\" is not a rank number"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of tests/fixtures/peft_variants/dora (config and weights) with its config edited.
fn edited_dora(tag: &str, edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let src = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/peft_variants/dora"
    ));
    let dir = std::env::temp_dir().join(format!("cli-adapter-{tag}-{}", std::process::id()));
    common::copy_dir(src, &dir);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    dir
}

/// `infer --adapter` without --model finds the base as peft's AutoPeftModel does: the adapter's
/// base_model_name_or_path, when that is a folder here; else it says to pass --model.
#[test]
fn infer_with_an_adapter_finds_its_base() {
    let args = [
        "infer",
        "--adapter",
        "tests/fixtures/peft_variants/dora",
        "--question",
        "What is it?",
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
        "--turns",
        "1",
    ];
    let (code, stdout, stderr) = trainer(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("turn 0:") || stderr.contains("turn 0:"),
        "{stdout}{stderr}"
    );
    let dir = edited_dora("hub", |c| {
        c["base_model_name_or_path"] = "meta-llama/Llama-3.2-11B-Vision-Instruct".into()
    });
    let (code, _, stderr) = trainer(&[
        "infer",
        "--adapter",
        dir.to_str().unwrap(),
        "--question",
        "q",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("base_model_name_or_path \"meta-llama/Llama-3.2-11B-Vision-Instruct\" is not a model folder here")
            && stderr.contains("--model DIR"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// With RUST_BACKTRACE=1 the error file's traceback (which the launcher's summary ends with)
/// holds this program's frames only, then the whole error, last: not the standard library's
/// frames with the message cut off above them.
#[test]
fn the_error_file_ends_with_the_error_not_std_frames() {
    let file = std::env::temp_dir().join(format!("cli-error-file-{}.json", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["infer", "--model", "no/such/model", "--question", "q"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .env("RUST_BACKTRACE", "1")
        .env("TORCHELASTIC_ERROR_FILE", &file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let stack = v["message"]["extraInfo"]["py_callstack"].as_str().unwrap();
    assert!(
        stack.starts_with("Stack backtrace (this program's frames")
            && stack.contains(": trainer::"),
        "{stack}"
    );
    assert!(
        !stack.contains("std::") && !stack.contains("__libc_start"),
        "{stack}"
    );
    // the error chain last: its final cause ends the traceback the launcher shows the end of
    assert!(
        stack.trim_end().ends_with("tokenizer files)") && stack.contains("Caused by:"),
        "{stack}"
    );
    let _ = std::fs::remove_file(&file);
}

/// A folder passed as the wrong kind is named for what it is: an adapter given as --checkpoint,
/// a run's folder of checkpoints given as one, a checkpoint given as --adapter; and a reader of a
/// damaged checkpoint is not told to resume with `--set` (a training run's flag).
#[test]
fn folders_of_the_wrong_kind_are_named_for_what_they_are() {
    let (code, _, stderr) = trainer(&[
        "infer",
        "--checkpoint",
        "tests/fixtures/peft_variants/dora",
        "--question",
        "q",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(
            "is a PEFT adapter folder, not a training checkpoint: infer, eval and `export --format merged` take it with --adapter"
        ),
        "{stderr}"
    );
    // a folder that is not there is named once
    let (code, _, stderr) = trainer(&[
        "infer",
        "--checkpoint",
        "/no/such/step-1",
        "--question",
        "q",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.matches("/no/such/step-1").count(), 1, "{stderr}");
    assert!(
        stderr.contains("checkpoint /no/such/step-1: no such folder"),
        "{stderr}"
    );
    let run = std::env::temp_dir().join(format!("cli-run-{}", std::process::id()));
    let (older, newer) = (run.join("step-00000002"), run.join("step-00000004"));
    for step in [&older, &newer] {
        std::fs::create_dir_all(step).unwrap();
        std::fs::write(step.join("manifest.json"), "{}").unwrap();
    }
    let out = run.join("out");
    let export = |checkpoint: &std::path::Path| {
        let args = ["export", "--checkpoint", checkpoint.to_str().unwrap()];
        trainer(
            &[
                &args[..],
                &["--format", "peft", "--out", out.to_str().unwrap()],
            ]
            .concat(),
        )
    };
    let (code, _, stderr) = export(&run);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("is a folder of checkpoints, not one: pass one of its step-N folders")
            && stderr.contains("step-00000004"),
        "{stderr}"
    );
    // (a manifest that is not the format's: damaged)
    let (code, _, stderr) = export(&newer);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        !stderr.contains("--set") && stderr.contains("use another step-N folder of the run"),
        "{stderr}"
    );
    let infer_adapter = |adapter: &std::path::Path| {
        let model = "tests/fixtures/train/model";
        let adapter = adapter.to_str().unwrap();
        trainer(&[
            "infer",
            "--adapter",
            adapter,
            "--model",
            model,
            "--question",
            "q",
        ])
    };
    let (code, _, stderr) = infer_adapter(&newer);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("is a training checkpoint (a step-N folder), not a PEFT adapter: infer, eval and export take it with --checkpoint"),
        "{stderr}"
    );
    // the run's checkpoint.dir given as an adapter: its newest complete step named (not a
    // folder a crash left)
    let partial = run.join("step-00000009.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("manifest.json"), "{}").unwrap();
    let (code, _, stderr) = infer_adapter(&run);
    assert_eq!(code, 1, "{stderr}");
    let newest = format!("e.g. the newest: --checkpoint {}", newer.display());
    assert!(
        stderr.contains("holds training checkpoints (step-N folders), not a PEFT adapter")
            && stderr.contains(&newest),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&run);
}

/// A negative number reaches the flag's own check (not clap's "unexpected argument '-1'"), and
/// --max-new-tokens 0 says what is allowed; both exit 2, before any model is read.
#[test]
fn generation_flags_say_what_they_accept() {
    for (flag, value, says) in [
        ("--temperature", "-1", "expected a number >= 0 (0 = greedy)"),
        ("--top-p", "-0.5", "`-0.5`"),
        (
            "--max-new-tokens",
            "0",
            "expected a whole number of 1 or more",
        ),
    ] {
        let (code, _, stderr) = trainer(&["infer", "--model", "m", "--question", "q", flag, value]);
        assert_eq!(code, 2, "{flag}: {stderr}");
        assert!(
            stderr.contains(says) && !stderr.contains("unexpected argument"),
            "{flag}: {stderr}"
        );
    }
}

/// An adapter_config.json key peft 0.21 does not know (a typo, a newer peft's option) is named
/// in a warning, not silently ignored.
#[test]
fn unknown_adapter_config_keys_are_named() {
    let dir = edited_dora("typo", |c| c["lora_alpah"] = 16.into());
    let (code, _, stderr) = trainer(&[
        "infer",
        "--adapter",
        dir.to_str().unwrap(),
        "--question",
        "q",
        "--max-new-tokens",
        "1",
        "--turns",
        "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("unknown keys [\"lora_alpah\"] ignored"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model's generation_config.json gives the sampling defaults the flags leave unset, as
/// transformers' generate takes them (top_k 1: sampling picks what greedy picks); a flag wins;
/// a value of the wrong type names the file and key.
#[test]
fn generation_config_gives_the_defaults_the_flags_leave() {
    let src = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/train/model"
    ));
    let dir = std::env::temp_dir().join(format!("cli-genconfig-{}", std::process::id()));
    common::copy_dir(src, &dir);
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("generation_config.json")).unwrap())
            .unwrap();
    cfg["top_k"] = 1.into();
    std::fs::write(dir.join("generation_config.json"), cfg.to_string()).unwrap();
    let model = dir.to_str().unwrap();
    let run = |extra: &[&str]| {
        let base = [
            "infer",
            "--model",
            model,
            "--question",
            "What is it?",
            "--turns",
            "1",
        ];
        let tail = ["--max-new-tokens", "6", "--seed", "3"];
        trainer(&[&base[..], &tail[..], extra].concat())
    };
    let (code, greedy, _) = run(&["--temperature", "0"]);
    assert_eq!(code, 0);
    let (code, sampled, stderr) = run(&["--temperature", "0.9"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("top_k 1 from"), "{stderr}");
    assert_eq!(sampled, greedy, "top_k 1 samples the most likely token");
    let (code, _, stderr) = run(&["--temperature", "0.9", "--top-k", "0"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("top_k 1 from"), "{stderr}");
    // no --temperature: greedy unless do_sample is true (transformers' generate, passed the
    // seed's temperature 0.7, is greedy then), where the seed's 0.7 samples
    let (code, default, stderr) = run(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(default, greedy);
    assert!(stderr.contains("greedy decoding: "), "{stderr}");
    assert!(stderr.contains("does not set do_sample: true"), "{stderr}");
    assert!(!stderr.contains("top_k 1 from"), "{stderr}");
    let (code, _, stderr) = run(&["--top-p", "0.5"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("greedy decoding (temperature 0) ignores them"),
        "{stderr}"
    );
    cfg["do_sample"] = true.into();
    cfg["top_k"] = 0.into();
    std::fs::write(dir.join("generation_config.json"), cfg.to_string()).unwrap();
    let (code, sampled_default, stderr) = run(&[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("sampling at temperature 0.7"), "{stderr}");
    let (_, sampled_07, _) = run(&["--temperature", "0.7"]);
    assert_eq!(sampled_default, sampled_07);
    assert_ne!(
        sampled_default, greedy,
        "the tiny model's draws at 0.7 leave greedy's path"
    );
    cfg["top_k"] = 1.into();
    cfg["do_sample"] = "yes".into();
    let refused_do_sample = cfg.clone();
    cfg["do_sample"] = serde_json::Value::Null;
    // a generation_config.json with `cfg` refused with `want`
    let refused = |cfg: &serde_json::Value, want: &str| {
        std::fs::write(dir.join("generation_config.json"), cfg.to_string()).unwrap();
        let (code, _, stderr) = run(&[]);
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(want), "{stderr}");
    };
    refused(
        &refused_do_sample,
        "generation_config.json: `do_sample` must be true or false, not \"yes\"",
    );
    cfg["top_k"] = "many".into();
    refused(
        &cfg,
        "generation_config.json: `top_k` must be a whole number >= 0, not \"many\"",
    );
    cfg["top_k"] = 1.into();
    cfg["eos_token_id"] = serde_json::json!([456, "end"]);
    refused(&cfg, "`eos_token_id` must be a token id or a list of them");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A text-only prompt's "Today Date" is the day and time zone it runs in (as transformers'
/// strftime_now), unless --date pins it: then two time zones a day apart give the same prompt.
#[test]
fn date_pins_the_template_date_across_time_zones() {
    let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/train/model");
    let run = |tz: &str, extra: &[&str]| {
        let base = [
            "infer",
            "--model",
            model,
            "--question",
            "What is it?",
            "--turns",
            "1",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--json",
        ];
        let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
            .args([&base[..], extra].concat())
            .env("TZ", tz)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["template_date"].clone(),
            v["turns"][0]["prompt_tokens"].clone(),
            v["turns"][0]["text"].clone(),
        )
    };
    // 26 hours apart: always two calendar days (POSIX TZ strings: no zoneinfo files needed)
    let (west, east) = (run("WST+12", &[]), run("EST-14", &[]));
    assert_ne!(west.0, east.0);
    let pinned = ["--date", "2024-07-26"];
    let (west, east) = (run("WST+12", &pinned), run("EST-14", &pinned));
    assert_eq!(west.0, "2024-07-26");
    assert_eq!(west, east);
    let (code, _, stderr) = trainer(&[
        "infer",
        "--model",
        model,
        "--question",
        "q",
        "--date",
        "2024-02-30",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("\"2024-02-30\" is not a day of the calendar"),
        "{stderr}"
    );
}

/// A generation that runs past the model's max_position_embeddings is said (once), as
/// transformers' generate says it, and goes on; within them, nothing is said.
#[test]
fn generating_past_max_position_embeddings_warns() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/train/model");
    let short = std::env::temp_dir().join(format!("cli-max-pos-{}", std::process::id()));
    std::fs::create_dir_all(&short).unwrap();
    for file in std::fs::read_dir(&fixture).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, short.join(file.file_name().unwrap())).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(short.join("config.json")).unwrap()).unwrap();
    config["text_config"]["max_position_embeddings"] = 16.into();
    std::fs::write(short.join("config.json"), config.to_string()).unwrap();
    let run = |model: &std::path::Path| {
        let model = model.to_str().unwrap();
        let args = ["infer", "--model", model, "--question", "What?"];
        trainer(
            &[
                &args[..],
                &[
                    "--turns",
                    "2",
                    "--max-new-tokens",
                    "3",
                    "--temperature",
                    "0",
                ],
            ]
            .concat(),
        )
    };
    let (code, _, stderr) = run(&short);
    assert_eq!(code, 0, "{stderr}");
    let warning = "past the model's max_position_embeddings (16): the text past it may degrade";
    assert_eq!(stderr.matches(warning).count(), 1, "{stderr}");
    let (code, _, stderr) = run(&fixture);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stderr.contains("max_position_embeddings"), "{stderr}");
    let _ = std::fs::remove_dir_all(&short);
}

/// `infer --questions` under a launcher with several ranks is refused (each would answer every
/// question into the one file), before the model loads.
#[test]
fn infer_questions_refuses_several_ranks() {
    let dir = std::env::temp_dir().join(format!("cli-questions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let questions = dir.join("q.jsonl");
    std::fs::write(&questions, "{\"question\": \"q\"}\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args([
            "infer",
            "--model",
            "tests/fixtures/train/model",
            "--questions",
        ])
        .arg(&questions)
        .arg("--out")
        .arg(dir.join("g.jsonl"))
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "29511"),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("infer --questions runs as one process (this is rank 1 of 2)"),
        "{stderr}"
    );
    assert!(!dir.join("g.jsonl").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// `trainer compare A A` (here through another path to the same folder) is refused: every
/// question agrees with itself, and a table of no differences would look like a finding.
#[test]
fn compare_refuses_an_evaluation_against_itself() {
    let dir = std::env::temp_dir().join(format!("trainer-cli-compare-{}", std::process::id()));
    let eval = dir.join("eval");
    std::fs::create_dir_all(&eval).unwrap();
    let line = r#"{"id": "q0", "answer": "x", "turns": [{"text": "", "extracted": "x", "correct": true}]}"#;
    std::fs::write(eval.join("predictions.jsonl"), format!("{line}\n")).unwrap();
    let again = dir.join("eval/../eval");
    let (code, _, stderr) = trainer(&["compare", eval.to_str().unwrap(), again.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("are the same evaluation"), "{stderr}");
    // --json replaces an earlier comparison, never an evaluation's files
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("predictions.jsonl"), format!("{line}\n")).unwrap();
    let predictions = other.join("predictions.jsonl");
    let compare = |json: &std::path::Path| {
        trainer(&[
            "compare",
            eval.to_str().unwrap(),
            other.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
    };
    let (code, _, stderr) = compare(&predictions);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not an earlier comparison"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(&predictions).unwrap(),
        format!("{line}\n")
    );
    let json = other.join("compare.json");
    for run in ["first", "again"] {
        let (code, _, stderr) = compare(&json);
        assert_eq!(code, 0, "{run}: {stderr}");
    }
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(written["paired"], 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Under a launcher (WORLD_SIZE set) every line of a rank's final error carries its `[rank r]`
/// prefix, as its log lines do (two ranks' identical errors were told apart by nothing); the
/// error file gets the error.
#[test]
fn a_ranks_final_error_carries_its_rank_prefix() {
    let dir = std::env::temp_dir().join(format!("cli-rank-error-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let error_file = dir.join("error.json");
    let out = common::isolated(Command::new(env!("CARGO_BIN_EXE_trainer")))
        .args(["train", "/no/such/run.yaml"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("TORCHELASTIC_ERROR_FILE", &error_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("[rank 1] error: /no/such/run.yaml: config file does not exist"),
        "{stderr}"
    );
    assert!(
        stderr.lines().all(|l| l.starts_with("[rank 1] ")),
        "{stderr}"
    );
    let recorded = std::fs::read_to_string(&error_file).unwrap();
    assert!(
        recorded.contains("config file does not exist"),
        "{recorded}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A layout error is blamed on the --set that gave the value at fault (it named the strategy's).
#[test]
fn a_hybrid_layout_error_names_the_set_at_fault() {
    let mut args = vec!["config", "check", "configs/demo.yaml"];
    args.extend(FIXTURE_PATHS);
    args.extend([
        "--set",
        "fsdp.sharding_strategy=hybrid_shard",
        "--set",
        "fsdp.sharding_group_size=3",
        "--world",
        "4",
        "--nproc-per-node",
        "4",
    ]);
    let (code, _, stderr) = trainer(&args);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("fsdp.sharding_group_size: 3 does not divide the 4 ranks"),
        "{stderr}"
    );
    assert!(
        stderr.contains("(from --set fsdp.sharding_group_size=3)"),
        "{stderr}"
    );
}
