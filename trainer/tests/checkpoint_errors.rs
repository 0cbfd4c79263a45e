//! Checkpoint integrity through the real trainer binary: a flipped byte, a truncated file, a
//! deleted file, an edited manifest, a manifest of another format version, and a changed `peft.r` each stop the
//! resume with an error naming the file (or the differing key) and the fix
//! (`--set checkpoint.resume=never`); that fix then trains from scratch. At world 2 a file only
//! one rank reads fails both ranks (no rank waits forever).
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::ckpt::*;
use serde_json::Value;

/// A world-`world` checkpoint of step 2 (made once per world size).
fn base(world: usize) -> PathBuf {
    static W1: OnceLock<PathBuf> = OnceLock::new();
    static W2: OnceLock<PathBuf> = OnceLock::new();
    let cell = if world == 1 { &W1 } else { &W2 };
    cell.get_or_init(|| {
        let out = fresh(&format!("base-w{world}"));
        let train = format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 2",
            4 / world
        );
        ok(
            run(&out, world, &train, &["checkpoint.every_steps=2"], &[]),
            "base",
        );
        out.join("ckpt/step-00000002")
    })
    .clone()
}

/// A copy of the base checkpoint in a fresh run folder, damaged by `damage`; resumes it.
fn resume_damaged(name: &str, world: usize, sets: &[&str], damage: impl FnOnce(&Path)) -> Out {
    let src = base(world);
    let out = fresh(name);
    let dst = out.join("ckpt/step-00000002");
    common::copy_dir(&src, &dst);
    damage(&dst);
    let train = format!(
        "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 3",
        4 / world
    );
    run(&out, world, &train, sets, &[])
}

fn assert_error(o: &Out, wants: &[&str]) {
    assert_eq!(o.code, Some(1), "expected a failure\n{}", o.stderr);
    for w in wants {
        assert!(o.stderr.contains(w), "missing {w:?} in\n{}", o.stderr);
    }
    assert!(
        o.stderr.contains("--set checkpoint.resume=never"),
        "the fix is named\n{}",
        o.stderr
    );
}

#[test]
fn intact_copy_resumes() {
    let o = ok(resume_damaged("intact", 1, &[], |_| {}), "intact");
    assert!(o.stderr.contains("resumed from"), "{}", o.stderr);
    assert_eq!(
        metrics(&setup().join("intact")).len(),
        1,
        "only step 3 trained"
    );
}

#[test]
fn flipped_byte_is_corrupt() {
    let o = resume_damaged("flip", 1, &[], |d| {
        let p = d.join("rank-0-of-1.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.len() - 3;
        b[i] ^= 0x40;
        std::fs::write(&p, b).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is corrupt", "sha256"]);
    // the fix works
    let fixed = ok(
        resume_damaged("flip-fixed", 1, &["checkpoint.resume=never"], |_| {}),
        "resume=never",
    );
    assert!(!fixed.stderr.contains("resumed from"));
    assert_eq!(metrics(&setup().join("flip-fixed")).len(), 3);
}

/// Under no_shard every rank reads every file of a world-2 checkpoint and checks only its share
/// of them: a flipped byte in either file still stops the run on every rank, naming the file.
#[test]
fn flipped_byte_is_corrupt_under_no_shard_whichever_rank_checks_it() {
    for file in ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors"] {
        let o = resume_damaged(
            &format!("flip-no-shard-{file}"),
            2,
            &["fsdp.sharding_strategy=no_shard"],
            |d| {
                let p = d.join(file);
                let mut b = std::fs::read(&p).unwrap();
                let i = b.len() - 3;
                b[i] ^= 0x40;
                std::fs::write(&p, b).unwrap();
            },
        );
        assert_error(&o, &[&format!("{file} is corrupt"), "sha256"]);
        for rank in 0..2 {
            let share = format!("checking the sha256 of 1 of the 2 checkpoint files this rank reads (share {rank} of 2");
            assert!(o.stderr.contains(&share), "{}", o.stderr);
        }
    }
}

#[test]
fn truncated_file_is_named() {
    let o = resume_damaged("truncate", 1, &[], |d| {
        let p = d.join("rank-0-of-1.safetensors");
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len / 2).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is truncated"]);
}

#[test]
fn deleted_file_is_named() {
    let o = resume_damaged("delete", 1, &[], |d| {
        std::fs::remove_file(d.join("rank-0-of-1.safetensors")).unwrap();
    });
    assert_error(&o, &["rank-0-of-1.safetensors is missing"]);
}

/// Edits manifest.json as JSON and removes `manifest.sha256`, as in a checkpoint of a trainer that
/// wrote none (or a crafted one): the checks after the checksum see the edit.
fn edit_manifest_without_checksum(d: &Path, edit: impl FnOnce(&mut Value)) {
    let p = d.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&p, m.to_string()).unwrap();
    std::fs::remove_file(d.join("manifest.sha256")).unwrap();
}

#[test]
fn edited_manifest_fails_its_checksum() {
    // one parameter's offset moved: every rank file's sha256 still matches, the weights would load
    // shifted
    let o = resume_damaged("manifest-offset", 1, &[], |d| {
        let p = d.join("manifest.json");
        let text = std::fs::read_to_string(&p).unwrap();
        let edited = text.replacen("\"offset\": 0", "\"offset\": 1", 1);
        assert_ne!(edited, text, "the manifest has an offset 0");
        std::fs::write(&p, edited).unwrap();
    });
    assert_error(
        &o,
        &[
            "manifest.json is corrupt",
            "manifest.sha256 says",
            "another `step-N` folder",
        ],
    );
}

#[test]
fn checkpoint_without_manifest_checksum_still_resumes() {
    let o = ok(
        resume_damaged("no-checksum", 1, &[], |d| {
            std::fs::remove_file(d.join("manifest.sha256")).unwrap()
        }),
        "no manifest.sha256",
    );
    assert!(o.stderr.contains("resumed from"), "{}", o.stderr);
    // (this trainer's checkpoints have one: its absence is said, once)
    let warning = "manifest.sha256 is missing (the trainer that saved it writes one";
    assert_eq!(o.stderr.matches(warning).count(), 1, "{}", o.stderr);
}

#[test]
fn manifest_naming_a_file_outside_the_folder_is_refused() {
    let o = resume_damaged("escape", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| {
            m["files"][0]["file"] = "../../rank-0-of-1.safetensors".into()
        })
    });
    assert_error(
        &o,
        &["names the file \"../../rank-0-of-1.safetensors\" where rank file \"rank-0-of-1.safetensors\" belongs"],
    );
}

/// A step folder whose name is not its manifest's step (a copy of step 2 named step 9, taken for
/// the newest; a manifest edited to another step) is refused, naming both and the fix, and the
/// real checkpoints are left where they are.
#[test]
fn a_step_folder_named_for_another_step_is_refused() {
    let o = resume_damaged("misnamed-copy", 1, &[], |d| {
        common::copy_dir(d, &d.parent().unwrap().join("step-00000009"))
    });
    assert_error(
        &o,
        &[
            "step-00000009 is named for step 9, but its manifest records step 2",
            "rename it to step-00000002",
        ],
    );
    assert_eq!(
        checkpoints(&setup().join("misnamed-copy")),
        ["step-00000002", "step-00000009"]
    );
    let o = resume_damaged("misnamed-manifest", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| m["step"] = 5.into())
    });
    assert_error(
        &o,
        &["is named for step 2, but its manifest records step 5"],
    );
}

/// A manifest whose shard range does not fit the rank file's tensor names the file by its path,
/// and gives the ways on (another step, or starting over).
#[test]
fn a_shard_range_the_file_does_not_hold_names_the_file() {
    let o = resume_damaged("shard-range", 2, &[], |d| {
        edit_manifest_without_checksum(d, |m| {
            let end = m["tensors"][0]["shards"][1]["end"].as_i64().unwrap();
            m["tensors"][0]["shards"][1]["end"] = (end + 4).into();
        })
    });
    assert_error(
        &o,
        &["step-00000002/rank-1-of-2.safetensors: tensor vision.local.0/1/param has"],
    );
}

#[test]
fn other_manifest_version_is_refused() {
    let o = resume_damaged("version", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| m["version"] = 99.into())
    });
    assert_error(
        &o,
        &["manifest.json has format version 99", "reads version 1"],
    );
}

#[test]
fn changed_lora_rank_names_the_key() {
    let o = resume_damaged("peft-r", 1, &["peft.r=8"], |_| {});
    assert_error(
        &o,
        &[
            "different model/LoRA config",
            "peft.r: checkpoint 4, config 8",
        ],
    );
}

/// The same LoRA target modules in another order wrap the same layers with the same parameters:
/// the resume goes on, whichever side lists them otherwise (a checkpoint saved before the list was
/// stored sorted, or a config that lists them otherwise).
#[test]
fn lora_target_modules_in_another_order_resume() {
    let o = resume_damaged(
        "peft-order",
        1,
        &["peft.target_modules=[v_proj,q_proj,v_proj]"],
        |_| {},
    );
    assert!(ok(o, "peft-order").stderr.contains("resumed from"));
    let o = resume_damaged("peft-order-stored", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| {
            m["config"]["peft.target_modules"] = serde_json::json!(["v_proj", "q_proj"])
        })
    });
    assert!(ok(o, "peft-order-stored").stderr.contains("resumed from"));
}

#[test]
fn damage_seen_by_one_rank_fails_both() {
    let o = resume_damaged("flip-w2", 2, &[], |d| {
        let p = d.join("rank-1-of-2.safetensors");
        let mut b = std::fs::read(&p).unwrap();
        let i = b.len() - 3;
        b[i] ^= 0x01;
        std::fs::write(&p, b).unwrap();
    });
    assert_ne!(o.code, Some(0));
    assert!(
        o.stderr.contains("rank-1-of-2.safetensors is corrupt"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("failed on another rank"), "{}", o.stderr);
}

/// Another global batch is refused with a fix that exists: the per-rank product to set, or,
/// where the world size does not divide the checkpoint's global batch, the world sizes that
/// resume it (3 ranks were told to make the product 4).
#[test]
fn another_global_batch_is_refused_with_a_fix_that_exists() {
    let o = resume_damaged("global-batch", 1, &["train.batch_size=3"], |_| {});
    assert_error(
        &o,
        &[
            "global batch of 4 samples, this run has 3",
            "so that batch_size x grad_accum is 4",
        ],
    );
    // the world-1 checkpoint (global batch 4) at 3 ranks
    let out = fresh("global-batch-w3");
    common::copy_dir(&base(1), &out.join("ckpt/step-00000002"));
    let train = "epochs: 1, batch_size: 1, grad_accum: 1, max_steps: 3";
    let o = run(&out, 3, train, &[], &[]);
    assert_error(
        &o,
        &["4 samples do not split over 3 ranks: resume it at 1, 2, 4 rank(s)"],
    );
}

/// A checkpoint's manifest.json given where its folder is expected (export, resume) is said to
/// be a file, not a damaged checkpoint to replace by another step.
#[test]
fn a_checkpoints_file_given_for_its_folder_is_named() {
    let manifest = base(1).join("manifest.json");
    let out = fresh("file-for-folder");
    let export = std::process::Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["export", "--format", "peft", "--checkpoint"])
        .arg(&manifest)
        .arg("--out")
        .arg(out.join("adapter"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&export.stderr);
    assert_eq!(export.status.code(), Some(1), "{stderr}");
    let want = format!(
        "{} is a file, not a checkpoint folder: give the step-N folder ({} holds it)",
        manifest.display(),
        base(1).display()
    );
    assert!(
        stderr.contains(&want) && !stderr.contains("incomplete"),
        "{stderr}"
    );
    let resume = format!("checkpoint.resume={}", manifest.display());
    let o = run(
        &out,
        1,
        "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 3",
        &[&resume],
        &[],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains(&format!("checkpoint.resume: {want}")),
        "{}",
        o.stderr
    );
}

#[test]
fn changed_seed_is_refused() {
    let o = resume_damaged("seed", 1, &["train.seed=12345"], |_| {});
    assert_error(&o, &["was trained with train.seed", "this run has 12345"]);
}

#[test]
fn other_training_data_is_refused() {
    // the checkpoint says it was trained on 999 samples; the fixture data has fewer
    let o = resume_damaged("samples", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| {
            assert!(m["data"]["samples"].is_u64(), "{}", m["data"]);
            m["data"]["samples"] = 999.into()
        })
    });
    assert_error(
        &o,
        &[
            "was trained on 999 samples of data.train",
            "the data changed",
        ],
    );
}

#[test]
fn same_count_of_samples_with_other_lengths_is_refused() {
    // the checkpoint's token lengths differ from this run's (an edited file, another
    // max_seq_len or tokenizer): the length-sorted epoch plan would put other samples behind
    // its position
    let o = resume_damaged("lengths", 1, &[], |d| {
        edit_manifest_without_checksum(d, |m| {
            let h = m["data"]["lengths_hash"]
                .as_u64()
                .expect("lengths_hash recorded");
            m["data"]["lengths_hash"] = (h ^ 1).into()
        })
    });
    assert_error(&o, &["samples of other token lengths", "data.max_seq_len"]);
}

/// A checkpoint.dir no rank can create fails the run before its first step (not at the first
/// save, an epoch in), on both ranks, naming the folder.
#[test]
fn unwritable_checkpoint_dir_fails_before_training() {
    let out = fresh("unwritable");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let set = format!("checkpoint.dir={}", file.join("ckpt").display());
    // (resume: auto would stop at listing the folder already)
    let o = run(
        &out,
        2,
        "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2",
        &[&set, "checkpoint.resume=never"],
        &[],
    );
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("checkpoint.dir") && o.stderr.contains("is not writable"),
        "{}",
        o.stderr
    );
    assert!(o.stderr.contains("a-file/ckpt"), "{}", o.stderr);
    assert!(!o.stderr.contains("step 1 "), "no step ran\n{}", o.stderr);
    assert!(!out.join("metrics.jsonl").exists() || metrics(&out).is_empty());
}

/// A checkpoint left moved aside by a crash in the save's replace fallback
/// (`step-N.replaced.partial`, no `step-N`) is put back and resumed from, on every rank.
#[test]
fn a_checkpoint_moved_aside_by_a_crash_is_put_back_and_resumed() {
    let o = resume_damaged("aside", 2, &[], |d| {
        let aside = d.with_file_name("step-00000002.replaced.partial");
        std::fs::rename(d, aside).unwrap();
    });
    let o = ok(o, "aside");
    assert!(o.stderr.contains("renaming it back"), "{}", o.stderr);
    assert!(o.stderr.contains("resumed from"), "{}", o.stderr);
    assert_eq!(
        metrics(&setup().join("aside")).len(),
        1,
        "only step 3 trained"
    );
}

/// A `checkpoint.resume` folder that is not a checkpoint (a misspelt keyword, most likely) and a
/// missing data file stop the run before the model loads, not after every rank read its weights.
#[test]
fn a_wrong_resume_folder_or_data_file_fails_before_the_model_loads() {
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 1";
    let loaded = "weights: this rank read";
    let out = fresh("early-checks");
    let o = run(&out, 1, train, &["checkpoint.resume=auot"], &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("auot does not exist (did you mean auto?)"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains(loaded), "{}", o.stderr);
    let folder = format!("checkpoint.resume={}", out.display());
    let o = run(&out, 1, train, &[&folder], &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    let want = format!(
        "{} is not a checkpoint folder (no manifest.json)",
        out.display()
    );
    assert!(o.stderr.contains(&want), "{}", o.stderr);
    assert!(!o.stderr.contains(loaded), "{}", o.stderr);
    let o = run(&out, 1, train, &["data.train=/no/such/train.jsonl"], &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("data.train: /no/such/train.jsonl: no such file"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains(loaded), "{}", o.stderr);
    // (the line the checks look for is there when the run gets that far)
    let o = ok(run(&out, 1, train, &[], &[]), "good run");
    assert!(o.stderr.contains(loaded), "{}", o.stderr);
    // the folder of the step folders, and a step folder's bare name (read from the working
    // directory): each error says which folder was meant
    let (ckpt, step) = (out.join("ckpt"), "step-00000001");
    let parent = format!("checkpoint.resume={}", ckpt.display());
    let o = run(&out, 1, train, &[&parent], &[]);
    let newest = format!(
        "(it holds step-N folders: give one, e.g. the newest, {} of step 1",
        ckpt.join(step).display()
    );
    assert!(o.stderr.contains(&newest), "{}", o.stderr);
    let o = run(&out, 1, train, &[&format!("checkpoint.resume={step}")], &[]);
    let meant = format!(
        "{step} does not exist (relative paths are read from the working directory: did you mean {}?)",
        ckpt.join(step).display()
    );
    assert!(o.stderr.contains(&meant), "{}", o.stderr);
}

/// A second run saving into a checkpoint.dir another run holds (a requeued job whose first
/// allocation still runs) is refused before training, naming the holder: it would replace the
/// other's in-flight checkpoint folders and retire its checkpoints. At world 2 every rank stops,
/// before writing anything there: the holder's write probe (`.probe-rank-0`) is left alone.
#[test]
fn a_checkpoint_dir_in_use_by_another_run_is_refused() {
    let out = fresh("ckpt-dir-locked");
    let held = common::hold_lock(&out.join("ckpt"), ".llava-sco-train.lock");
    let holders_probe = out.join("ckpt/.probe-rank-0");
    std::fs::write(&holders_probe, "the other run's token").unwrap();
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    for world in [1, 2] {
        let o = run(&out, world, train, &["checkpoint.every_steps=1"], &[]);
        assert_ne!(o.code, Some(0), "{}", o.stderr);
        assert!(
            o.stderr.contains("is in use by another training run")
                && o.stderr.contains("otherhost"),
            "{}",
            o.stderr
        );
        assert!(!out.join("ckpt/step-00000001").exists());
        let probe = std::fs::read_to_string(&holders_probe);
        assert_eq!(probe.ok().as_deref(), Some("the other run's token"));
    }
    drop(held);
    std::fs::remove_file(&holders_probe).unwrap();
    ok(
        run(&out, 1, train, &["checkpoint.every_steps=1"], &[]),
        "after the other run",
    );
    assert!(out.join("ckpt/step-00000001").exists());
}

/// A second run writing into a train.output_dir another run holds is refused before the model
/// loads, at world 1 and 2, naming the holder: its metrics.jsonl lines would interleave with the
/// other run's and its adapter replace the other's. The holder's metrics.jsonl stays as it was.
/// Once the holder is gone, a fresh run there moves the earlier run's files aside, not over them.
#[test]
fn an_output_dir_in_use_by_another_run_is_refused_before_the_model_loads() {
    let out = fresh("out-dir-locked");
    let held = common::hold_lock(&out, ".llava-sco-train.lock");
    let earlier = "{\"step\": 1, \"loss\": 9.0}\n";
    std::fs::write(out.join("metrics.jsonl"), earlier).unwrap();
    std::fs::write(out.join("adapter_config.json"), "{}").unwrap();
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    for world in [1, 2] {
        let o = run(&out, world, train, &["checkpoint.every_steps=1"], &[]);
        assert_ne!(o.code, Some(0), "{}", o.stderr);
        assert!(
            o.stderr.contains("train.output_dir")
                && o.stderr.contains("is in use by another training run")
                && o.stderr.contains("otherhost"),
            "{}",
            o.stderr
        );
        assert!(
            !o.stderr.contains("weights: this rank read"),
            "{}",
            o.stderr
        );
        assert!(!out.join("ckpt/step-00000001").exists());
        if world == 2 {
            // the launcher's summary names rank 0, which holds the error, not rank 1, which only
            // reports it (whichever exited first), and lists rank 1's report after it
            let root = "rank       : 0 (local rank 0 on node 0)";
            let other = "rank 1 (local rank 1): exited with code 1: checkpoint.dir";
            assert!(o.stderr.contains(root), "{}", o.stderr);
            assert!(
                o.stderr.contains(other) && o.stderr.contains("(rank 0's error says why)"),
                "{}",
                o.stderr
            );
        }
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        assert_eq!(metrics, earlier);
    }
    drop(held);
    let o = ok(run(&out, 1, train, &[], &[]), "after the other run");
    assert!(o.stderr.contains("moved into"), "{}", o.stderr);
    assert_eq!(metrics(&out).len(), 1);
    let aside = previous_runs(&out);
    assert_eq!(aside.len(), 1, "{aside:?}");
    let kept = std::fs::read_to_string(aside[0].join("metrics.jsonl")).unwrap();
    assert_eq!(kept, earlier);
    assert_eq!(
        std::fs::read_to_string(aside[0].join("adapter_config.json")).unwrap(),
        "{}"
    );
    // this run's adapter is the one in the folder now
    assert!(std::fs::read_to_string(out.join("adapter_config.json"))
        .unwrap()
        .contains("lora"));
}

/// A train.output_dir rank 0 cannot create fails the run before the model loads (not at the end,
/// with the adapter), naming the key and the folder.
#[test]
fn unwritable_output_dir_fails_before_the_model_loads() {
    let out = fresh("unwritable-out");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let set = format!("train.output_dir={}", file.join("out").display());
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 1";
    for world in [1, 2] {
        let o = run(&out, world, train, &[&set], &[]);
        assert_eq!(o.code, Some(1), "{}", o.stderr);
        assert!(
            o.stderr.contains("train.output_dir") && o.stderr.contains("is not writable"),
            "{}",
            o.stderr
        );
        assert!(o.stderr.contains("a-file/out"), "{}", o.stderr);
        assert!(
            !o.stderr.contains("weights: this rank read"),
            "{}",
            o.stderr
        );
    }
}

/// A newest checkpoint whose manifest is damaged: the error names the checkpoint before it as
/// the way on (and an edit made on purpose, how to record it); resuming that one works.
#[test]
fn a_damaged_manifest_names_the_checkpoint_before_it() {
    let out = fresh("manifest-older");
    let older = out.join("ckpt/step-00000001");
    common::copy_dir(&base(1), &older);
    // (its step is 2 inside; as a folder of step 1 it is an older checkpoint of the same run)
    let newest = out.join("ckpt/step-00000002");
    common::copy_dir(&base(1), &newest);
    std::fs::write(newest.join("manifest.json"), "{ not json").unwrap();
    std::fs::remove_file(newest.join("manifest.sha256")).unwrap();
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 3";
    let o = run(&out, 1, train, &[], &[]);
    assert_error(
        &o,
        &[
            "is not valid JSON",
            &format!("--set checkpoint.resume={}", older.display()),
        ],
    );
    let back = format!("checkpoint.resume={}", older.display());
    ok(run(&out, 1, train, &[&back], &[]), "from the one before");

    // a truncated rank file names the one before it the same way
    let out = fresh("truncated-older");
    let older = out.join("ckpt/step-00000001");
    common::copy_dir(&base(1), &older);
    let newest = out.join("ckpt/step-00000002");
    common::copy_dir(&base(1), &newest);
    let p = newest.join("rank-0-of-1.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(len / 2).unwrap();
    let o = run(&out, 1, train, &[], &[]);
    assert_error(
        &o,
        &[
            "rank-0-of-1.safetensors is truncated",
            &format!(
                "resume from another `step-N` folder, e.g. the one before it: `--set checkpoint.resume={}`",
                older.display()
            ),
        ],
    );

    let o = resume_damaged("manifest-edited", 1, &[], |d| {
        let p = d.join("manifest.json");
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, text.replacen("\"model_path\"", "\"model_path\" ", 1)).unwrap();
    });
    assert_error(&o, &["sha256sum manifest.json > manifest.sha256"]);
}

/// A base whose config.json was re-indented and re-saved (other bytes, the same model) resumes;
/// one whose content differs is refused, naming the key.
#[test]
fn a_resaved_base_config_resumes_and_a_changed_one_is_refused() {
    let model = setup().join("model");
    let resaved = fresh("resaved-base").join("model");
    let mut cfg = common::resaved_model(&model, &resaved);
    let path = format!("model.path={}", resaved.display());
    let o = ok(resume_damaged("resaved", 1, &[&path], |_| {}), "resaved");
    assert!(o.stderr.contains("resumed from"), "{}", o.stderr);
    cfg["text_config"]["rms_norm_eps"] = 0.5.into();
    std::fs::write(resaved.join("config.json"), cfg.to_string()).unwrap();
    let o = resume_damaged("resaved-changed", 1, &[&path], |_| {});
    assert_error(&o, &["different model/LoRA config", "model.config_sha256"]);
}

/// A base of the same config.json but other weights (another checkpoint of the architecture, a
/// merged export of the run) is refused, naming model.path and the ways on; nothing is trained.
#[test]
fn a_base_with_other_weights_is_refused() {
    let other = fresh("other-weights-base").join("model");
    common::copy_dir(&setup().join("model"), &other);
    let weights = std::fs::read_dir(&other)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    *bytes.last_mut().unwrap() ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();
    let path = format!("model.path={}", other.display());
    let o = resume_damaged("other-weights", 1, &[&path], |_| {});
    assert_error(
        &o,
        &[
            &format!(
                "model.path {} is not the model this checkpoint was trained on",
                other.display()
            ),
            "samples of its tensors differ",
            "set model.path to the run's base",
            "peft.init_from",
        ],
    );
    let trained = std::fs::read_to_string(setup().join("other-weights/metrics.jsonl"));
    assert!(!trained.unwrap_or_default().contains("\"loss\""));
}
