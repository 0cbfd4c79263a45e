//! `--set KEY=VALUE`: values typed as YAML, applied before checks, later ones win.
use std::path::PathBuf;

use trainer::config::{self, Config, Resume, ScheduleKind};

const MINIMAL: &str = "model: {path: m}\ndata: {train: t.jsonl}\n";

fn with(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    config::parse(MINIMAL, &sets).unwrap_or_else(|e| panic!("{sets:?}: {e}"))
}

#[test]
fn integers() {
    let c = with(&["train.epochs=7", "peft.r=64", "train.seed=0"]);
    assert_eq!((c.train.epochs, c.peft.r, c.train.seed), (7, 64, 0));
}

#[test]
fn floats_in_every_spelling() {
    assert_eq!(with(&["train.lr=2e-5"]).train.lr, 2e-5);
    assert_eq!(with(&["train.lr=2.0e-5"]).train.lr, 2e-5);
    assert_eq!(with(&["train.lr=0.001"]).train.lr, 1e-3);
    // An integer where a float goes is that number.
    assert_eq!(with(&["peft.alpha=16"]).peft.alpha, 16.0);
    assert_eq!(with(&["train.grad_clip=1"]).train.grad_clip, Some(1.0));
}

#[test]
fn bools() {
    let c = with(&[
        "fsdp.enabled=false",
        "data.double_bos=true",
        "checkpoint.async=False",
    ]);
    assert!(!c.fsdp.enabled);
    assert!(c.data.double_bos);
    assert!(!c.checkpoint.async_save);
}

#[test]
fn null_clears_an_optional_key() {
    let c = with(&["train.grad_clip=1.0", "train.grad_clip=null"]);
    assert_eq!(c.train.grad_clip, None);
    let c = with(&["data.eval=v.jsonl", "data.eval=~"]);
    assert_eq!(c.data.eval, None);
}

#[test]
fn lists() {
    let c = with(&["peft.target_modules=[q_proj, k_proj, v_proj]"]);
    assert_eq!(
        c.peft.target_modules,
        config::LoraTargets::Names(["q_proj", "k_proj", "v_proj"].map(String::from).to_vec())
    );
}

#[test]
fn strings_and_paths() {
    let c = with(&[
        "model.path=/models/Llama-3.2V-11B-cot",
        "data.image_root=images dir",
        "checkpoint.resume=ckpt/step-000100",
        "train.output_dir=a=b",
    ]);
    assert_eq!(c.model.path, PathBuf::from("/models/Llama-3.2V-11B-cot"));
    assert_eq!(c.data.image_root, Some(PathBuf::from("images dir")));
    assert_eq!(
        c.checkpoint.resume,
        Resume::From(PathBuf::from("ckpt/step-000100"))
    );
    // Only the first `=` splits key from value.
    assert_eq!(c.train.output_dir, PathBuf::from("a=b"));
    // Quoting keeps text that YAML would read as a number.
    assert_eq!(with(&["model.path='123'"]).model.path, PathBuf::from("123"));
}

#[test]
fn enums_and_nested_keys() {
    let c = with(&[
        "train.schedule.kind=cosine",
        "train.schedule.min_lr_ratio=0.1",
    ]);
    assert_eq!(c.train.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.train.schedule.min_lr_ratio, 0.1);
    // A whole section as a flow mapping replaces that section.
    let c = with(&["train.schedule={kind: cosine, warmup_steps: 5}"]);
    assert_eq!(c.train.schedule.kind, ScheduleKind::Cosine);
    assert_eq!(c.train.schedule.warmup_steps, 5);
    assert_eq!(c.train.schedule.gamma, 0.85);
}

#[test]
fn later_overrides_win_and_required_keys_can_come_from_overrides() {
    assert_eq!(with(&["train.lr=1e-3", "train.lr=3e-4"]).train.lr, 3e-4);
    let c =
        config::parse("", &["model.path=m".into(), "data.train=t".into()]).expect("overrides only");
    assert_eq!(c.model.path, PathBuf::from("m"));
    // An empty section in the file is filled by an override.
    let c = config::parse("model:\ndata: {train: t}\n", &["model.path=m".into()])
        .expect("empty section");
    assert_eq!(c.model.path, PathBuf::from("m"));
}

#[test]
fn override_syntax_errors() {
    let err = |set: &str| {
        config::parse(MINIMAL, &[set.to_string()])
            .unwrap_err()
            .to_string()
    };
    assert_eq!(err("foo"), r#"--set "foo": expected KEY=VALUE"#);
    assert_eq!(err("=3"), r#"--set "=3": expected KEY=VALUE"#);
    assert_eq!(
        err("train..lr=3"),
        r#"--set "train..lr=3": expected KEY=VALUE"#
    );
    assert!(
        err("train.lr=[1e-5").starts_with(r#"--set "train.lr=[1e-5": VALUE is not a YAML value: "#),
        "{}",
        err("train.lr=[1e-5")
    );
    assert_eq!(
        err("train.seed=99999999999999999999"),
        r#"--set "train.seed=99999999999999999999": VALUE is not a YAML value: the number 99999999999999999999 is too large"#
    );
    // Where the file sets the key, the override cannot go below it...
    let file = "model: {path: m}\ndata: {train: t}\ntrain: {lr: 1.0e-5}\n";
    assert_eq!(
        config::parse(file, &["train.lr.x=1".into()])
            .unwrap_err()
            .to_string(),
        r#"--set "train.lr.x=1": train.lr is a value, not a section, so it has no key "x""#
    );
    // ...and where it does not, the section the override makes is refused like one in the file.
    assert_eq!(
        err("train.lr.x=1"),
        "train.lr: expected a positive number, got a mapping"
    );
}
