//! Checkpoint save/resume end to end through the real launcher and trainer (CPU backend, fp32,
//! tiny random Mllama + LoRA): a run stopped by SIGTERM (the `TRAINER_STOP_AFTER_STEP` hook)
//! after step 5 and resumed equals the uninterrupted 10-step run bitwise (losses, every metric,
//! final weights) at world 1 (synchronous saves; FSDP and `fsdp.enabled: false`) and 2 (background
//! saves), across an epoch boundary with dropout on; a checkpoint saved
//! at world 2 resumes at world 1 and 3 (losses within 1e-6 relative); a crash between the data
//! files and the manifest leaves a `.partial` folder that resume ignores and the next save removes;
//! a failed background write stops the run with its error and leaves the earlier checkpoint usable;
//! a background save is published when the next step stops every rank (a loss not finite).
mod common;

use common::ckpt::*;

/// 48 samples, global batch 8 (6 steps per epoch): 10 steps cross the epoch boundary.
fn bitwise(world: usize, async_save: bool, extra: &[&str]) {
    let b = (4 / world).to_string();
    let train = format!("epochs: 2, batch_size: {b}, grad_accum: 2, max_steps: 10");
    let async_set = format!("checkpoint.async={async_save}");
    let mut every: Vec<&str> = vec!["checkpoint.every_steps=4", &async_set];
    every.extend(extra);
    let every = every.as_slice();
    let tag = if extra.is_empty() { "" } else { "-plain" };
    let straight = fresh(&format!("bitwise-w{world}{tag}-straight"));
    let first_run = ok(run(&straight, world, &train, every, &[]), "straight");
    // (each removal said, as HF's Trainer says it)
    assert!(
        first_run.stderr.contains("deleting older checkpoint ")
            && first_run
                .stderr
                .contains("step-00000004 (checkpoint.keep_last 2)"),
        "{}",
        first_run.stderr
    );
    let resumed = fresh(&format!("bitwise-w{world}{tag}-resumed"));
    let first = run(
        &resumed,
        world,
        &train,
        every,
        &[("TRAINER_STOP_AFTER_STEP", "5")],
    );
    assert_ne!(first.code, Some(0), "the stopped run exits non-zero (143)");
    assert!(
        first.stderr.contains("SIGTERM: stopping after step 5"),
        "{}",
        first.stderr
    );
    assert_eq!(checkpoints(&resumed), ["step-00000004", "step-00000005"]);
    assert_eq!(metrics(&resumed).len(), 5);
    let second = ok(run(&resumed, world, &train, every, &[]), "resumed");
    assert!(
        second.stderr.contains("resumed from") && second.stderr.contains("step-00000005"),
        "{}",
        second.stderr
    );

    assert!(
        !second.stderr.contains("learning-rate schedule differs"),
        "{}",
        second.stderr
    );

    let n_weights = assert_same_run(&straight, &resumed, 10);
    // every_steps 4, the epoch end (step 6) and train.max_steps (step 10); keep_last 2
    assert_eq!(checkpoints(&straight), ["step-00000008", "step-00000010"]);
    assert_eq!(checkpoints(&resumed), ["step-00000008", "step-00000010"]);
    println!("world {world}: 10 losses and {n_weights} weights identical after resume at step 5");
}

#[test]
fn resume_is_bitwise_world1_sync_save() {
    bitwise(1, false, &[]);
}

#[test]
fn resume_is_bitwise_world2_async_save() {
    bitwise(2, true, &[]);
}

/// `fsdp.enabled: false` (ordinary autograd) with dropout: its masks are reseeded per micro-batch
/// too, so the resumed run replays them.
#[test]
fn resume_is_bitwise_without_fsdp() {
    bitwise(1, false, &["fsdp.enabled=false"]);
}

/// Global batch 6 at every world size (batch 6/W), dropout off (its masks depend on the split).
#[test]
fn resharded_resume_world2_to_1_and_3() {
    let train = |w: usize| {
        format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 8",
            6 / w
        )
    };
    resharded_resume("reshard", &["peft.dropout=0.0"], train, &[1, 3]);
}

/// Dropout on (0.05): micro-batches of the same batch_size (3) draw the same masks at any world
/// size (they are seeded by their slice of the global batch), so world 2 x grad_accum 1 resumed
/// as world 1 x grad_accum 2 replays the uninterrupted run.
#[test]
fn resharded_resume_with_dropout_replays_at_the_same_batch_size() {
    let train = |w: usize| {
        format!(
            "epochs: 1, batch_size: 3, grad_accum: {}, max_steps: 8",
            2 / w
        )
    };
    resharded_resume("reshard-dropout", &["peft.dropout=0.05"], train, &[1]);
}

/// `fsdp.sharding_strategy` does not change checkpoints: no_shard's at world 2 (each rank writes
/// its half of its replica) resumes under full_shard at world 3 and shard_grad_op at world 1, and
/// full_shard's under no_shard at world 3 (each replica read whole from two shards).
#[test]
fn resume_across_sharding_strategies() {
    let train = |w: usize| {
        format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 8",
            6 / w
        )
    };
    let full: &[&str] = &["fsdp.sharding_strategy=full_shard"];
    let replicas = resharded_resume_with(
        "strategy-no-shard",
        &["peft.dropout=0.0", "fsdp.sharding_strategy=no_shard"],
        train,
        &[(3, full), (1, &["fsdp.sharding_strategy=shard_grad_op"])],
    );
    let shards = resharded_resume_with(
        "strategy-full-shard",
        &["peft.dropout=0.0"],
        train,
        &[(3, &["fsdp.sharding_strategy=no_shard"])],
    );
    // the same files and ranges: every rank wrote its part of its replica
    let layout = |dir: &std::path::Path| -> Vec<(String, serde_json::Value)> {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("ckpt/step-00000004/manifest.json")).unwrap(),
        )
        .unwrap();
        (m["tensors"].as_array().unwrap().iter())
            .map(|t| (t["name"].to_string(), t["shards"].clone()))
            .collect()
    };
    let (a, b) = (layout(&replicas), layout(&shards));
    assert_eq!(a, b);
    assert!(
        a.iter().any(|(_, s)| s.as_array().unwrap().len() == 2),
        "{a:?}"
    );
}

/// hybrid_shard (HSDP) checkpoints are full_shard's format: one saved at world 4 in shard groups
/// of 2 (each rank writes half of the shard it holds) resumes under full_shard at world 2 and
/// as a single process, and full_shard's at world 2 resumes under hybrid_shard at world 4 (each
/// pair of ranks reading one copy, and splitting the check of its files).
#[test]
fn resume_to_and_from_hybrid_shard() {
    let train = |w: usize| {
        format!(
            "epochs: 1, batch_size: {}, grad_accum: 1, max_steps: 8",
            4 / w
        )
    };
    let hsdp: &[&str] = &[
        "fsdp.sharding_strategy=hybrid_shard",
        "fsdp.sharding_group_size=2",
    ];
    let full: &[&str] = &["fsdp.sharding_strategy=full_shard"];
    let saved = resharded_resume_from(
        4,
        "strategy-hybrid",
        &[&["peft.dropout=0.0"], hsdp].concat(),
        train,
        &[(2, full), (1, full)],
    );
    // every rank wrote a part: the 4 files hold 4 pieces of the two-way sharded groups
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(saved.join("ckpt/step-00000004/manifest.json")).unwrap(),
    )
    .unwrap();
    let most = (m["tensors"].as_array().unwrap().iter())
        .map(|t| t["shards"].as_array().unwrap().len())
        .max();
    assert_eq!(most, Some(4), "{m}");
    resharded_resume_with(
        "strategy-to-hybrid",
        &["peft.dropout=0.0"],
        train,
        &[(4, hsdp)],
    );
}

/// Trains 8 steps at world 2, resumes its step-4 checkpoint at each of `worlds`, and compares
/// steps 5..8 and the final weights with the world-2 run's.
fn resharded_resume(name: &str, extra: &[&str], train: impl Fn(usize) -> String, worlds: &[usize]) {
    let targets: Vec<(usize, &[&str])> = worlds.iter().map(|&w| (w, &[][..])).collect();
    resharded_resume_with(name, extra, train, &targets);
}

/// `resharded_resume` where the resumed run at world w adds its own `--set`s to `extra`'s (a
/// later one wins).
fn resharded_resume_with(
    name: &str,
    extra: &[&str],
    train: impl Fn(usize) -> String,
    targets: &[(usize, &[&str])],
) -> std::path::PathBuf {
    resharded_resume_from(2, name, extra, train, targets)
}

/// `resharded_resume_with` from a run at world `from`.
fn resharded_resume_from(
    from: usize,
    name: &str,
    extra: &[&str],
    train: impl Fn(usize) -> String,
    targets: &[(usize, &[&str])],
) -> std::path::PathBuf {
    let mut sets: Vec<&str> = vec!["checkpoint.every_steps=4"];
    sets.extend_from_slice(extra);
    let w2 = fresh(&format!("{name}-w{from}"));
    ok(run(&w2, from, &train(from), &sets, &[]), "first run");
    let reference = metrics(&w2);
    assert_eq!(reference.len(), 8);
    let ckpt = w2.join("ckpt/step-00000004");
    let resume = format!("checkpoint.resume={}", ckpt.display());
    for &(w, own) in targets {
        let out = fresh(&format!("{name}-w{from}-to-w{w}"));
        let mut s = sets.clone();
        s.push(&resume);
        s.extend_from_slice(own);
        let o = ok(run(&out, w, &train(w), &s, &[]), "resharded");
        let saved_by = format!("saved by {from} rank(s)");
        assert!(o.stderr.contains(&saved_by), "{}", o.stderr);
        assert!(!o.stderr.contains("dropout masks"), "{}", o.stderr);
        let m = metrics(&out);
        assert_eq!(m.len(), 4, "steps 5..8 only");
        let mut worst = 0.0f64;
        for (x, y) in reference[4..].iter().zip(&m) {
            assert_eq!(x["step"], y["step"]);
            assert_eq!(x["tokens"], y["tokens"], "same samples per step");
            let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            worst = worst.max((lx - ly).abs() / lx.abs());
        }
        let (wa, wb) = (weights(&w2), weights(&out));
        let mut worst_w = 0.0f64;
        for (n, t) in &wa {
            worst_w = worst_w.max((t - &wb[n]).abs().max().double_value(&[]));
        }
        println!(
            "world {from} -> {w}: max loss rel diff {worst:.2e}, max weight abs diff {worst_w:.2e}"
        );
        assert!(
            worst < 1e-6,
            "world {from} -> {w}: losses differ (rel {worst})"
        );
        assert!(
            worst_w < 1e-5,
            "world {from} -> {w}: weights differ (abs {worst_w})"
        );
    }
    w2
}

/// Killed after the rank files of step 4 and before its manifest: resume uses step 2, ignores
/// the partial folder, and the next successful save removes it.
#[test]
fn crash_before_manifest_leaves_earlier_checkpoint_usable() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let sets: &[&str] = &["checkpoint.every_steps=2"];
    let out = fresh("crash");
    let first = run(
        &out,
        2,
        train,
        sets,
        &[("TRAINER_CHECKPOINT_CRASH_AT", "4")],
    );
    assert_ne!(first.code, Some(0));
    assert_eq!(
        checkpoints(&out),
        ["step-00000002", "step-00000004.partial"]
    );
    let partial = out.join("ckpt/step-00000004.partial");
    assert!(partial.join("rank-0-of-2.safetensors").exists());
    assert!(partial.join("rank-1-of-2.safetensors").exists());
    assert!(!partial.join("manifest.json").exists());
    let second = ok(run(&out, 2, train, sets, &[]), "after the crash");
    assert!(
        second.stderr.contains("step-00000002 (step 2"),
        "{}",
        second.stderr
    );
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
}

/// A background write that fails (ENOSPC: the test hook writes step 4's files to /dev/full)
/// stops the run on every rank with the writer's error, as soon as the ranks publish the save;
/// the failed save's folder is removed, the earlier checkpoint stays complete and the next run
/// resumes from it.
#[test]
fn failed_background_write_stops_the_run_and_keeps_the_previous_checkpoint() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let sets: &[&str] = &["checkpoint.every_steps=2", "checkpoint.async=true"];
    let out = fresh("fail-write");
    let first = run(
        &out,
        2,
        train,
        sets,
        &[("TRAINER_CHECKPOINT_FAIL_WRITE_AT", "4")],
    );
    assert_ne!(first.code, Some(0), "{}", first.stderr);
    for want in [
        "step-00000004.partial/rank-0-of-2.safetensors",
        "step-00000004.partial/rank-1-of-2.safetensors",
        "No space left on device",
    ] {
        assert!(
            first.stderr.contains(want),
            "missing {want:?} in\n{}",
            first.stderr
        );
    }
    // (the failed save's folder is removed: the full disk may be why it failed)
    assert_eq!(checkpoints(&out), ["step-00000002"]);
    let second = ok(run(&out, 2, train, sets, &[]), "after the failed write");
    assert!(
        second.stderr.contains("step-00000002 (step 2"),
        "{}",
        second.stderr
    );
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
}

/// Rank 0 failing to publish (its manifest write hits ENOSPC) fails rank 1 too, at once and with
/// the cause named, instead of rank 1 waiting out the collective timeout and reporting a dead peer.
#[test]
fn failed_manifest_on_rank_0_is_reported_by_every_rank() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 4";
    let out = fresh("fail-manifest");
    let started = std::time::Instant::now();
    let o = run(
        &out,
        2,
        train,
        &["checkpoint.every_steps=2", "checkpoint.async=false"],
        &[("TRAINER_CHECKPOINT_FAIL_MANIFEST_AT", "4")],
    );
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    for want in [
        "/dev/full",
        "No space left on device",
        "rank 0 could not publish checkpoint step 4",
    ] {
        assert!(o.stderr.contains(want), "missing {want:?} in\n{}", o.stderr);
    }
    assert!(
        started.elapsed().as_secs() < 60,
        "rank 1 waited {:?}",
        started.elapsed()
    );
    assert_eq!(checkpoints(&out), ["step-00000002"]);
}

/// The launcher's restart resumes from the last complete checkpoint: a crash inside the save of
/// step 4 (attempt 0), `--max-restarts 1`, and the run ends equal to one that never crashed.
#[test]
fn launcher_restart_after_a_crash_in_save_is_bitwise() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let sets: &[&str] = &["checkpoint.every_steps=2"];
    let straight = fresh("restart-straight");
    ok(run(&straight, 2, train, sets, &[]), "straight");
    let out = fresh("restart-crashed");
    let o = ok(
        output(command(
            &out,
            2,
            train,
            sets,
            &[("TRAINER_CHECKPOINT_CRASH_AT", "4")],
            &["--max-restarts", "1"],
        )),
        "crash + restart",
    );
    assert!(o.stderr.contains("step-00000002 (step 2"), "{}", o.stderr);
    let (a, b) = (metrics(&straight), metrics(&out));
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(
                x[k], y[k],
                "step {}: {k} differs after the restart",
                x["step"]
            );
        }
    }
    let (wa, wb) = (weights(&straight), weights(&out));
    for (n, t) in &wa {
        assert!(t.equal(&wb[n]), "{n} differs after the restart");
    }
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
}

/// A run started over (`checkpoint.resume: never`) in a folder holding another run's newer
/// checkpoint (saved by another launcher invocation with the same run id, as two launches in one
/// SLURM job have), crashed in the save of step 4 and restarted by the launcher: the restart
/// continues from this launch's own step 2 (not from step 0, nor from the other launch's
/// checkpoint) and ends equal to the uninterrupted run; retention (keep_last 2) keeps the other
/// run's checkpoint.
#[test]
fn launcher_restart_of_a_run_started_over_continues_its_own_checkpoint() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    let straight = fresh("never-straight");
    ok(
        output(command(
            &straight,
            2,
            train,
            &["checkpoint.every_steps=2"],
            &[],
            &["--run-id", "one-job"],
        )),
        "straight",
    );
    let out = fresh("never-restarted");
    let other = out.join("ckpt/step-00000100");
    common::copy_dir(&straight.join("ckpt/step-00000006"), &other);
    let o = ok(
        output(command(
            &out,
            2,
            train,
            &["checkpoint.every_steps=2", "checkpoint.resume=never"],
            &[("TRAINER_CHECKPOINT_CRASH_AT", "4")],
            &["--max-restarts", "1", "--run-id", "one-job"],
        )),
        "crash + restart",
    );
    assert!(
        o.stderr
            .contains("already holds 1 checkpoint(s) of an earlier run"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("continuing from") && o.stderr.contains("step-00000002 (step 2"),
        "{}",
        o.stderr
    );
    // the other run's newer checkpoint is named once per process (the first attempt saved step
    // 2, the restart steps 4 and 6), not at every save
    let newer = "step-00000100 (step 100) is newer than the checkpoint just saved";
    assert_eq!(o.stderr.matches(newer).count(), 2, "{}", o.stderr);
    let (a, b) = (metrics(&straight), metrics(&out));
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        for k in ["step", "loss", "grad_norm"] {
            assert_eq!(
                x[k], y[k],
                "step {}: {k} differs after the restart",
                x["step"]
            );
        }
    }
    assert_eq!(
        checkpoints(&out),
        ["step-00000004", "step-00000006", "step-00000100"]
    );
}

/// A run started over in a folder holding another run's checkpoint of a step it saves too: that
/// checkpoint is moved aside (`step-N.of-run-<lineage>`), not replaced, and retention leaves it.
#[test]
fn a_run_started_over_keeps_another_runs_checkpoint_of_the_same_step() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 4";
    let sets: &[&str] = &["checkpoint.every_steps=2", "checkpoint.resume=never"];
    let first = fresh("same-step-first");
    ok(run(&first, 2, train, sets, &[]), "first run");
    let second = fresh("same-step-second");
    common::copy_dir(
        &first.join("ckpt/step-00000002"),
        &second.join("ckpt/step-00000002"),
    );
    let lineage = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(first.join("ckpt/step-00000002/manifest.json")).unwrap(),
    )
    .unwrap()["lineage"]
        .as_str()
        .unwrap()
        .to_string();
    let o = ok(run(&second, 2, train, sets, &[]), "second run");
    let aside = format!("step-00000002.of-run-{lineage}");
    assert!(o.stderr.contains(&aside), "{}", o.stderr);
    assert_eq!(
        checkpoints(&second),
        ["step-00000002", aside.as_str(), "step-00000004"]
    );
    // the folder moved aside is the other run's, intact
    assert_eq!(
        std::fs::read(second.join("ckpt").join(&aside).join("manifest.json")).unwrap(),
        std::fs::read(first.join("ckpt/step-00000002/manifest.json")).unwrap()
    );
    // an older trainer's checkpoint (no lineage) of that step is kept the same way
    let third = fresh("same-step-third");
    let old = third.join("ckpt/step-00000002");
    common::copy_dir(&first.join("ckpt/step-00000002"), &old);
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(old.join("manifest.json")).unwrap()).unwrap();
    m.as_object_mut().unwrap().remove("lineage");
    std::fs::write(old.join("manifest.json"), m.to_string()).unwrap();
    std::fs::remove_file(old.join("manifest.sha256")).unwrap();
    ok(run(&third, 2, train, sets, &[]), "third run");
    assert_eq!(
        checkpoints(&third),
        [
            "step-00000002",
            "step-00000002.of-run-unmarked",
            "step-00000004"
        ]
    );
    // a step folder that lost its manifest is not resumed from, nor deleted when the step is
    // saved again: moved aside, its rank files intact
    let fourth = fresh("same-step-damaged");
    let damaged = fourth.join("ckpt/step-00000002");
    common::copy_dir(&first.join("ckpt/step-00000002"), &damaged);
    std::fs::remove_file(damaged.join("manifest.json")).unwrap();
    let sets: &[&str] = &["checkpoint.every_steps=2"];
    let o = ok(run(&fourth, 1, train, sets, &[]), "fourth run");
    // (the start line says where the run writes)
    let at = format!(
        "metrics and adapter in {}, checkpoints in {}",
        fourth.display(),
        fourth.join("ckpt").display()
    );
    assert!(o.stderr.contains(&at), "{}", o.stderr);
    assert!(
        o.stderr.contains("is not a complete checkpoint"),
        "{}",
        o.stderr
    );
    assert!(!o.stderr.contains("resumed from"), "{}", o.stderr);
    assert_eq!(
        checkpoints(&fourth),
        ["step-00000002", "step-00000002.damaged", "step-00000004"]
    );
    assert!(fourth
        .join("ckpt/step-00000002.damaged/rank-0-of-2.safetensors")
        .exists());
}

/// Trains 3 steps with `sets`, then resumes the same run lengthened to 4 steps; the resumed
/// run's stderr.
fn resume_longer(name: &str, sets: &[&str]) -> String {
    let out = fresh(name);
    let train = |steps: u32| format!("epochs: 2, batch_size: 4, grad_accum: 2, max_steps: {steps}");
    ok(run(&out, 1, &train(3), sets, &[]), "first");
    let second = ok(run(&out, 1, &train(4), sets, &[]), "longer");
    assert!(second.stderr.contains("resumed from"), "{}", second.stderr);
    second.stderr
}

#[test]
fn resuming_with_a_longer_run_notes_the_changed_schedule() {
    let stderr = resume_longer(
        "schedule-change",
        &["checkpoint.every_steps=3", "train.schedule.kind=cosine"],
    );
    assert!(
        stderr.contains("learning-rate schedule differs")
            && stderr.contains("\"total_steps\":3")
            && stderr.contains("\"total_steps\":4"),
        "{stderr}"
    );
}

#[test]
fn a_longer_run_on_the_step_schedule_has_the_same_schedule() {
    // StepLR depends on the epoch, not on the run's length: no note
    let stderr = resume_longer("schedule-step-longer", &["checkpoint.every_steps=3"]);
    assert!(
        !stderr.contains("learning-rate schedule differs"),
        "{stderr}"
    );
    assert!(!stderr.contains("optimizer settings differ"), "{stderr}");
}

#[test]
fn resuming_with_another_weight_decay_notes_it() {
    let out = fresh("weight-decay-change");
    let train = |steps: u32| format!("epochs: 2, batch_size: 4, grad_accum: 2, max_steps: {steps}");
    let sets = ["checkpoint.every_steps=3"];
    ok(run(&out, 1, &train(3), &sets, &[]), "first");
    let second = ok(
        run(
            &out,
            1,
            &train(4),
            &["checkpoint.every_steps=3", "train.weight_decay=0.5"],
            &[],
        ),
        "other weight decay",
    );
    assert!(
        second.stderr.contains("optimizer settings differ")
            && second.stderr.contains("\"weight_decay\":0.01")
            && second.stderr.contains("\"weight_decay\":0.5"),
        "{}",
        second.stderr
    );
}

/// `train` of a one-epoch run of `steps` steps of 2 samples.
fn one_epoch_steps(steps: u32) -> String {
    format!("epochs: 1, batch_size: 2, grad_accum: 1, max_steps: {steps}")
}

/// A new run that changed only `train.output_dir`, in the same checkpoint.dir, is refused by
/// `resume: auto` instead of silently continuing the last run's checkpoints; naming the
/// checkpoint continues that run into the new output folder.
#[test]
fn auto_resume_into_another_output_dir_is_refused_unless_the_checkpoint_is_named() {
    let out = fresh("other-output-dir");
    ok(run(&out, 1, &one_epoch_steps(2), &[], &[]), "first");
    let other = out.join("experiment-b");
    let set_other = format!("train.output_dir={}", other.display());
    let refused = run(&out, 1, &one_epoch_steps(3), &[&set_other], &[]);
    assert_ne!(refused.code, Some(0), "{}", refused.stderr);
    let named = out.join("ckpt/step-00000002");
    for says in [
        "saved by a run whose train.output_dir was".to_string(),
        "(from checkpoint.dir: ..); this run writes to".to_string(),
        format!("checkpoint.dir={}/checkpoints", other.display()),
        format!("checkpoint.resume={}", named.display()),
    ] {
        assert!(refused.stderr.contains(&says), "{says}: {}", refused.stderr);
    }
    assert!(!other.join("metrics.jsonl").exists());
    let set_named = format!("checkpoint.resume={}", named.display());
    let continued = ok(
        run(&out, 1, &one_epoch_steps(3), &[&set_other, &set_named], &[]),
        "named",
    );
    assert!(
        continued.stderr.contains("resumed from"),
        "{}",
        continued.stderr
    );
    let steps: Vec<u64> = metrics(&other)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps, [3]);
}

/// A metrics.jsonl line a kill cut mid-character is dropped on resume, not the whole history.
#[test]
fn a_cut_metrics_line_does_not_lose_the_history() {
    use std::io::Write;
    let out = fresh("metrics-cut-line");
    let sets = ["checkpoint.every_steps=1"];
    ok(run(&out, 1, &one_epoch_steps(2), &sets, &[]), "first");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(out.join("metrics.jsonl"))
        .unwrap();
    f.write_all(b"{\"step\": 3, \"note\": \"caf\xc3").unwrap();
    drop(f);
    ok(run(&out, 1, &one_epoch_steps(3), &sets, &[]), "resumed");
    let steps: Vec<u64> = metrics(&out)
        .iter()
        .filter_map(|m| m["step"].as_u64())
        .collect();
    assert_eq!(steps, [1, 2, 3]);
}

/// metrics.jsonl that rank 0 cannot reopen on a resume (here a folder stands in its place)
/// stops every rank together, the others saying why, and the folder is left as it was.
#[test]
fn a_metrics_file_rank_0_cannot_open_stops_every_rank() {
    let out = fresh("metrics-unopenable");
    ok(run(&out, 2, &one_epoch_steps(2), &[], &[]), "first");
    let metrics_path = out.join("metrics.jsonl");
    std::fs::remove_file(&metrics_path).unwrap();
    std::fs::create_dir(&metrics_path).unwrap();
    std::fs::write(metrics_path.join("keep"), "x").unwrap();
    let o = run(&out, 2, &one_epoch_steps(3), &[], &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    for says in [
        "rank 0 could not open metrics.jsonl in train.output_dir",
        "metrics.jsonl",
    ] {
        assert!(o.stderr.contains(says), "{says}: {}", o.stderr);
    }
    assert!(metrics_path.join("keep").exists());
}

/// A finished run launched again (`resume: auto`) has no step left: it says so and neither
/// validates nor saves again (its metrics and checkpoints stay as they were).
#[test]
fn a_finished_run_launched_again_does_nothing() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    let out = fresh("finished-again");
    ok(run(&out, 1, train, &[], &[]), "first");
    let adapter = out.join("adapter_model.safetensors");
    let written = std::fs::metadata(&adapter).unwrap().modified().unwrap();
    let before = (metrics(&out).len(), checkpoints(&out));
    let again = ok(run(&out, 1, train, &[], &[]), "again");
    assert!(
        again
            .stderr
            .contains("nothing left to train: the run is at step 2 of 2"),
        "{}",
        again.stderr
    );
    assert_eq!((metrics(&out).len(), checkpoints(&out)), before);
    let again_written = std::fs::metadata(&adapter).unwrap().modified().unwrap();
    assert_eq!(
        again_written, written,
        "output_dir's adapter left as it was"
    );
}

/// A validation that fails (an eval image cut short, found only when it is decoded) stops the
/// run, but the epoch's checkpoint, saved in the background before validating, is published: the
/// epoch is not lost.
#[test]
fn a_failed_validation_keeps_the_epochs_checkpoint() {
    let out = fresh("validation-fails");
    let images = out.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for e in std::fs::read_dir(common::repo().join("tests/fixtures/data/images")).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), images.join(e.file_name())).unwrap();
        }
    }
    let jpg = std::fs::read(images.join("gray.jpg")).unwrap();
    std::fs::write(images.join("broken.jpg"), &jpg[..jpg.len() / 2]).unwrap();
    let eval = out.join("eval.jsonl");
    std::fs::write(
        &eval,
        r#"{"id": "e", "image": "broken.jpg", "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A picture."}]}"#,
    )
    .unwrap();
    let root = format!("data.image_root={}", images.display());
    let eval_set = format!("data.eval={}", eval.display());
    let sets = [
        root.as_str(),
        eval_set.as_str(),
        "train.validate=true",
        "checkpoint.async=true",
    ];
    let train = "epochs: 2, batch_size: 8, grad_accum: 1";
    let o = run(&out, 1, train, &sets, &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("broken.jpg"), "{}", o.stderr);
    let steps = metrics(&out).len();
    assert!(steps > 0);
    let ckpt = out.join(format!("ckpt/step-{steps:08}"));
    assert!(ckpt.join("manifest.json").exists(), "{}", o.stderr);
    assert!(!ckpt.join("validation.json").exists());
    // the eval file fixed, launched again: epoch 0 is validated first (its result counts towards
    // the best adapter), then epoch 1 trains
    std::fs::write(
        &eval,
        r#"{"id": "e", "image": "gray.jpg", "conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A picture."}]}"#,
    )
    .unwrap();
    let o = run(&out, 1, train, &sets, &[]);
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let note = format!("checkpoint of step {steps} (epoch 0) has no validation record");
    assert!(o.stderr.contains(&note), "{}", o.stderr);
    assert!(ckpt.join("validation.json").exists(), "{}", o.stderr);
    let validated: Vec<u64> = metrics(&out)
        .iter()
        .filter(|r| r["validation"] == true)
        .map(|r| r["step"].as_u64().unwrap())
        .collect();
    assert_eq!(validated, [steps as u64, 2 * steps as u64]);
}

/// A save that rank 0 cannot begin (here a stale `step-N.partial` it cannot remove: a file, so
/// remove_dir_all fails even as root) stops every rank with the cause, not the other ranks at a
/// collective timeout.
#[test]
fn a_save_rank_0_cannot_begin_stops_every_rank_with_its_cause() {
    let out = fresh("save-begin-fails");
    std::fs::create_dir_all(out.join("ckpt")).unwrap();
    std::fs::write(out.join("ckpt/step-00000001.partial"), "not a folder").unwrap();
    let started = std::time::Instant::now();
    let o = run(
        &out,
        2,
        "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2",
        &["checkpoint.every_steps=1"],
        &[],
    );
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.stderr.contains("removing stale") && o.stderr.contains("step-00000001.partial"),
        "{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("rank 0 could not create"),
        "the other rank names the cause: {}",
        o.stderr
    );
    assert!(started.elapsed().as_secs() < 120);
}

/// A step that stops every rank at once (here a loss that is not finite: lr 1e30 blows the LoRA
/// weights up in step 1) right after a background save began: that save, whose files are
/// written, is published before the error is returned, not left as `step-N.partial` with the run
/// resuming from an older checkpoint.
#[test]
fn a_background_save_is_published_when_the_next_step_stops_the_run() {
    let out = fresh("nonfinite-after-save");
    let sets = [
        "checkpoint.every_steps=1",
        "checkpoint.async=true",
        "train.lr=1e30",
    ];
    let o = run(
        &out,
        2,
        "epochs: 1, batch_size: 4, grad_accum: 1",
        &sets,
        &[],
    );
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(o.stderr.contains("is not finite"), "{}", o.stderr);
    assert_eq!(checkpoints(&out), ["step-00000001"], "{}", o.stderr);
}

/// Steps skipped under `train.skip_nonfinite` (their update not applied) do not move the learning
/// rate schedule on: lr 1e30 with a 4-step warmup blows the weights up in step 2, steps 3 and 4
/// are skipped and both run at step 3's rate (transformers' Trainer steps no scheduler after a
/// skipped optimizer step).
#[test]
fn skipped_steps_do_not_move_the_schedule_on() {
    let out = fresh("nonfinite-skipped");
    let sets = [
        "train.lr=1e30",
        "train.schedule={kind: linear, warmup_steps: 4}",
        "train.skip_nonfinite=5",
    ];
    let o = run(
        &out,
        1,
        "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 4",
        &sets,
        &[],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let lines = metrics(&out);
    let lr: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    // (relative: serde_json reads floats back to within a unit in the last place)
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs();
    for (got, want) in lr.iter().zip([0.0, 2.5e29, 5e29]) {
        assert!(near(*got, want), "{lr:?}\n{}", o.stderr);
    }
    assert!(
        o.stderr
            .contains("step 3: non-finite loss or gradient norm, update skipped"),
        "{}",
        o.stderr
    );
    assert_eq!(lr[3], lr[2], "{}", o.stderr);
}

/// Once the skips `train.skip_nonfinite` allows are used up, the error says so (it told to set
/// the key that was set).
#[test]
fn used_up_nonfinite_skips_say_so() {
    let out = fresh("nonfinite-used-up");
    let sets = ["train.lr=1e30", "train.skip_nonfinite=1"];
    let o = run(
        &out,
        1,
        "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 4",
        &sets,
        &[],
    );
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    assert!(
        o.stderr.contains("the 1 skips allowed by train.skip_nonfinite are used up: lower train.lr, or allow more"),
        "{}",
        o.stderr
    );
}

/// SLURM's `--signal=USR1@90` notice before the time limit, sent to the launcher: passed on to
/// the ranks, which stop after the same step with a checkpoint of it (exit 143, as for SIGTERM),
/// and the launcher does not restart them.
#[test]
fn sigusr1_to_the_launcher_stops_training_with_a_checkpoint() {
    let stderr = signal_stops_training(libc::SIGUSR1, "SIGUSR1", 143);
    assert!(stderr.contains("not restarting"), "{stderr}");
}

/// SLURM's `--signal=USR2@90` stops the same way (it killed the ranks, its default action).
#[test]
fn sigusr2_to_the_launcher_stops_training_with_a_checkpoint() {
    let stderr = signal_stops_training(libc::SIGUSR2, "SIGUSR2", 143);
    assert!(stderr.contains("not restarting"), "{stderr}");
}

/// SIGTERM sent to one rank (not through the launcher): every rank stops after the same step
/// with a checkpoint, and the launcher's summary names the rank the signal was sent to (the
/// others, which exit 143 with it, wrote that they stopped because of it), whichever exits first.
#[test]
fn sigterm_to_one_rank_stops_every_rank_and_names_that_rank() {
    let stderr = signal_to_stop(Some(1), libc::SIGTERM, "SIGTERM", 143);
    assert!(
        stderr.contains("rank       : 1 (local rank 1 on node 0)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("message    : SIGTERM received by this rank: stopped after step"),
        "{stderr}"
    );
}

/// Ctrl-C (SIGINT to the launcher, forwarded to the ranks) stops after a step with a checkpoint
/// of it, as SIGTERM does, instead of killing the ranks mid-epoch: exit 130.
#[test]
fn ctrl_c_to_the_launcher_stops_training_with_a_checkpoint() {
    signal_stops_training(libc::SIGINT, "SIGINT", 130);
}

/// Sends `sig` to a 2-rank launcher once a step is done; checks the exit code and that the ranks
/// stopped after the same step with a checkpoint of it. Returns the run's stderr.
fn signal_stops_training(sig: i32, name: &str, code: i32) -> String {
    signal_to_stop(None, sig, name, code)
}

/// The rank `rank` of the launcher `launcher`'s children (its `RANK` in /proc/PID/environ).
fn rank_pid(launcher: u32, rank: usize) -> Option<i32> {
    let want = format!("RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // (pid (comm) state ppid ...: comm may hold spaces)
        let ppid: u32 = stat
            .rsplit(')')
            .next()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let ours = environ.split(|b| *b == 0).any(|v| v == want.as_bytes());
        (ppid == launcher && ours).then_some(pid)
    })
}

/// Waits until the run writing into `out` has done a step (metrics.jsonl has a line).
fn wait_for_a_step(out: &std::path::Path) {
    use std::time::{Duration, Instant};
    let started = Instant::now();
    while std::fs::read_to_string(out.join("metrics.jsonl")).map_or(true, |t| t.is_empty()) {
        assert!(started.elapsed() < Duration::from_secs(120), "no step done");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `signal_stops_training` with the signal sent to rank `rank` alone (None: to the launcher).
fn signal_to_stop(rank: Option<usize>, sig: i32, name: &str, code: i32) -> String {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    let tag = rank.map_or(String::new(), |r| format!("-rank{r}"));
    let out = fresh(&format!("{}{tag}", name.to_lowercase()));
    std::fs::create_dir_all(&out).unwrap();
    // (a file, not a pipe: a pipe nobody reads until the end would fill and block the launcher)
    let log = out.join("stderr.log");
    let sets = ["checkpoint.every_steps=1000", "checkpoint.async=false"];
    let train = "epochs: 50, batch_size: 2, grad_accum: 1";
    let restarts: &[&str] = match rank {
        None => &["--max-restarts", "1"],
        Some(_) => &[],
    };
    let mut child = command(&out, 2, train, &sets, &[], restarts)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // once a step is done, the notice
    wait_for_a_step(&out);
    let target = match rank {
        None => child.id() as i32,
        Some(r) => rank_pid(child.id(), r).expect("the rank's process"),
    };
    // SAFETY: plain syscall to our own child (the launcher) or its child.
    unsafe { libc::kill(target, sig) };
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the run did not stop after {name}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(code), "{stderr}");
    let stopped = stderr
        .lines()
        .find_map(|l| l.split(&format!("{name}: stopping after step ")).nth(1))
        .unwrap_or_else(|| panic!("no stop line in\n{stderr}"));
    let step: u64 = stopped.trim().parse().unwrap();
    // the stop step's checkpoint is the newest; an older one kept (keep_last 2) can only be an
    // epoch's end (12 steps per epoch; the stop may come a few steps after the first metrics)
    let kept = checkpoints(&out);
    assert_eq!(kept.last(), Some(&format!("step-{step:08}")), "{stderr}");
    for older in &kept[..kept.len() - 1] {
        let n: u64 = older.trim_start_matches("step-").parse().unwrap();
        assert!(n.is_multiple_of(12) && n < step, "{kept:?}\n{stderr}");
    }
    stderr
}

/// A standalone `trainer train` that got a scheduler's notice (SIGUSR1) and is stopping still
/// dies at a second Ctrl-C (the notice, kept as the stop signal, hid the first SIGINT).
#[test]
fn a_second_ctrl_c_after_a_notice_kills_at_once() {
    use std::os::unix::process::ExitStatusExt;
    use std::time::{Duration, Instant};
    let out = fresh("notice-then-ctrl-c");
    let sets = ["checkpoint.every_steps=1000", "checkpoint.async=false"];
    let mut child = command(
        &out,
        1,
        "epochs: 50, batch_size: 2, grad_accum: 1",
        &sets,
        &[],
        &[],
    )
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    wait_for_a_step(&out);
    let pid = child.id() as i32;
    // SAFETY: plain syscalls to our own child.
    unsafe { libc::kill(pid, libc::SIGUSR1) };
    // Ctrl-C, again and again until the process ends: two sent before the first is handled
    // merge into one, but a later one follows (a fixed pair could merge on a loaded machine)
    let started = Instant::now();
    let status = loop {
        std::thread::sleep(Duration::from_millis(5));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "still running");
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGINT) };
    };
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
}

/// An image whose header is whole but whose data is cut (the scan reads headers only) fails to
/// load mid-epoch: every rank stops (the failing one's error names the record), after a
/// checkpoint of the last step done; with the file mended, the next run resumes from it and
/// ends as the uninterrupted run does.
#[test]
fn a_record_that_fails_to_load_mid_epoch_leaves_a_checkpoint_of_the_last_step() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 10";
    let straight = fresh("load-fail-straight");
    ok(run(&straight, 2, train, &[], &[]), "straight");
    let out = fresh("load-fail");
    let images = out.join("images");
    common::copy_dir(&common::repo().join("tests/fixtures/data/images"), &images);
    let photo = images.join("photo.jpg");
    let whole = std::fs::read(&photo).unwrap();
    std::fs::write(&photo, &whole[..2000]).unwrap();
    let root = format!("data.image_root={}", images.display());
    let o = run(&out, 2, train, &[&root], &[]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    let done = metrics(&out).len();
    assert!(
        done >= 1,
        "the cut image came in the first batch\n{}",
        o.stderr
    );
    let want = format!("the batch after step {done} could not be loaded (its checkpoint is saved");
    assert!(o.stderr.contains(&want), "{}", o.stderr);
    assert!(o.stderr.contains("photo.jpg"), "{}", o.stderr);
    assert_eq!(
        checkpoints(&out).last(),
        Some(&format!("step-{done:08}")),
        "{}",
        o.stderr
    );
    std::fs::write(&photo, &whole).unwrap();
    let o = ok(run(&out, 2, train, &[&root], &[]), "mended");
    assert!(
        o.stderr.contains(&format!("step-{done:08} (step {done}")),
        "{}",
        o.stderr
    );
    assert_same_run(&straight, &out, 10);
}

/// A panic in one rank's loader (a failed allocation, a broken invariant) takes the way out a
/// record that fails to load takes: every rank stops together after a checkpoint of the last
/// step, the error naming the panic (re-raised on the training thread, it skipped the agreement
/// and the checkpoint, and the other ranks waited in the step's collectives).
#[test]
fn a_panic_in_a_ranks_loader_stops_every_rank_after_a_checkpoint() {
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 10";
    let out = fresh("loader-panic");
    let o = run(&out, 2, train, &[], &[("TRAINER_LOADER_PANIC_AT", "1:3")]);
    assert_ne!(o.code, Some(0), "{}", o.stderr);
    for says in [
        "the batch after step 3 could not be loaded (its checkpoint is saved",
        "TRAINER_LOADER_PANIC_AT fired at global batch 3",
    ] {
        assert!(o.stderr.contains(says), "{says}: {}", o.stderr);
    }
    assert_eq!(metrics(&out).len(), 3, "{}", o.stderr);
    assert_eq!(
        checkpoints(&out).last().map(String::as_str),
        Some("step-00000003")
    );
}

/// A validation record whose image fails to load (its header whole, its data cut) stops every
/// rank together, after the epoch's checkpoint, naming the record on the rank that read it (the
/// others no longer wait in the forward's collectives until the launcher stops them).
#[test]
fn a_validation_record_that_fails_to_load_stops_every_rank_after_the_checkpoint() {
    let out = fresh("eval-load-fail");
    let images = out.join("images");
    common::copy_dir(&common::repo().join("tests/fixtures/data/images"), &images);
    let whole = std::fs::read(images.join("photo.jpg")).unwrap();
    std::fs::write(images.join("cut.jpg"), &whole[..2000]).unwrap();
    let train_lines = std::fs::read_to_string(setup().join("train.jsonl")).unwrap();
    let first = train_lines.lines().next().unwrap();
    let eval_lines: String = (0..4)
        .map(|i| {
            let image = if i == 3 { "cut.jpg" } else { "small.png" };
            let line = first
                .replacen("\"small.png\"", &format!("\"{image}\""), 1)
                .replacen("\"g0\"", &format!("\"e{i}\""), 1);
            format!("{line}\n")
        })
        .collect();
    let eval = out.join("eval.jsonl");
    std::fs::write(&eval, eval_lines).unwrap();
    let sets = [
        format!("data.image_root={}", images.display()),
        format!("data.eval={}", eval.display()),
        "train.validate=true".to_string(),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 2";
    let o = run(&out, 2, train, &sets, &[]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains(
            "validation at step 2 could not load a batch (the step's checkpoint is saved"
        ) && o.stderr.contains("cut.jpg")
            && o.stderr
                .contains("validation at step 2: another rank could not load its batch"),
        "{}",
        o.stderr
    );
    assert_eq!(checkpoints(&out).last(), Some(&"step-00000002".to_string()));
}

/// A resume with another `data.supervise` goes on, with a note that the loss now covers other
/// turns (the manifest records the setting).
#[test]
fn a_resume_with_another_supervise_is_noted() {
    let out = fresh("supervise-note");
    ok(
        run(
            &out,
            1,
            &one_epoch_steps(2),
            &["checkpoint.every_steps=2"],
            &[],
        ),
        "first",
    );
    let o = ok(
        run(
            &out,
            1,
            &one_epoch_steps(4),
            &["checkpoint.every_steps=2", "data.supervise=last"],
            &[],
        ),
        "resumed",
    );
    assert!(
        o.stderr.contains(
            "note: the checkpoint was trained with data.supervise \"all\", this run has \"last\""
        ),
        "{}",
        o.stderr
    );
    assert_eq!(metrics(&out).len(), 4);
}

/// Going back to an older checkpoint of the same run (`resume: DIR` after a loss spike) sets the
/// run's later checkpoints aside (kept, renamed `.abandoned-at-S`): retention, which ranks by
/// step, would otherwise delete the checkpoint resumed from while keeping the abandoned newer
/// one, and `resume: auto` would continue the abandoned branch.
#[test]
fn resuming_an_older_checkpoint_sets_the_later_ones_aside() {
    let out = fresh("resume-older");
    let train = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 6";
    ok(
        run(&out, 1, train, &["checkpoint.every_steps=2"], &[]),
        "first run",
    );
    assert_eq!(checkpoints(&out), ["step-00000004", "step-00000006"]);
    let first_six = std::fs::read(out.join("ckpt/step-00000006/manifest.json")).unwrap();
    let back = format!(
        "checkpoint.resume={}",
        out.join("ckpt/step-00000004").display()
    );
    let shorter = "epochs: 1, batch_size: 2, grad_accum: 1, max_steps: 5";
    let o = ok(
        run(&out, 1, shorter, &["checkpoint.every_steps=1", &back], &[]),
        "resumed from step 4",
    );
    assert!(o.stderr.contains("kept aside"), "{}", o.stderr);
    // step 4 (resumed from) and the new branch's step 5 kept (keep_last 2), the old step 6 aside
    assert_eq!(
        checkpoints(&out),
        [
            "step-00000004",
            "step-00000005",
            "step-00000006.abandoned-at-4"
        ]
    );
    let aside = out.join("ckpt/step-00000006.abandoned-at-4/manifest.json");
    assert_eq!(std::fs::read(aside).unwrap(), first_six);
}

/// `keep_last: 1` with validation leaves one checkpoint when the last validated step is the best
/// (it is the newest), and two (the best and the newest) when an earlier step was better: HF's
/// Trainer's rule. The old best goes when a validation finds a new one, not at the next save
/// (after the last save there is none).
#[test]
fn keep_last_1_with_validation_keeps_the_best_and_the_newest_only() {
    let out = fresh("keep-last-best");
    let eval = format!("data.eval={}", setup().join("train.jsonl").display());
    let sets = [
        eval.as_str(),
        "train.validate=true",
        "checkpoint.keep_last=1",
    ];
    let o = run(
        &out,
        1,
        "epochs: 3, batch_size: 4, grad_accum: 1",
        &sets,
        &[],
    );
    assert_eq!(o.code, Some(0), "{}", o.stderr);
    let validations: Vec<(u64, f64)> = metrics(&out)
        .iter()
        .filter(|r| r["validation"] == true)
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["eval_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(validations.len(), 3, "{}", o.stderr);
    let best = validations
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap()
        .0;
    let newest = validations[2].0;
    let mut want = vec![format!("step-{best:08}")];
    if best != newest {
        want.push(format!("step-{newest:08}"));
    }
    assert_eq!(checkpoints(&out), want, "{validations:?}\n{}", o.stderr);
}

/// `data.text_only: keep`: a text-only sample's system turn holds the chat template's "Today
/// Date". A run resumed on another day (time zones 26 hours apart) renders its first start's date
/// again, so the resumed run equals the uninterrupted one bitwise (before, its text-only samples
/// were tokenized with the new date).
#[test]
fn a_resume_on_another_day_keeps_the_text_only_samples_date() {
    let records = std::fs::read_to_string(setup().join("train.jsonl")).unwrap();
    let lines: Vec<String> = records
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let mut r: serde_json::Value = serde_json::from_str(l).unwrap();
            if i % 3 == 0 {
                // (the question without its <image> marker, the record without its image)
                r.as_object_mut().unwrap().remove("image");
                let q = r["conversations"][0]["value"].as_str().unwrap();
                r["conversations"][0]["value"] = q.trim_start_matches("<image>\n").into();
            }
            r.to_string()
        })
        .collect();
    let data = setup().join("text-only-mixed.jsonl");
    std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    let data = format!("data.train={}", data.display());
    let sets = [
        data.as_str(),
        "data.text_only=keep",
        "checkpoint.every_steps=4",
    ];
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 8";
    let (west, east) = (("TZ", "WWW+12"), ("TZ", "EEE-14"));
    let straight = fresh("text-only-date-straight");
    ok(run(&straight, 1, train, &sets, &[west]), "straight");
    let resumed = fresh("text-only-date-resumed");
    let stop = ("TRAINER_STOP_AFTER_STEP", "3");
    let first = run(&resumed, 1, train, &sets, &[west, stop]);
    assert!(
        first.stderr.contains("SIGTERM: stopping after step 3"),
        "{}",
        first.stderr
    );
    let second = ok(
        run(&resumed, 1, train, &sets, &[east]),
        "resumed a day later",
    );
    assert!(
        second
            .stderr
            .contains("the system turn of the 16 text-only samples keeps the run's date"),
        "{}",
        second.stderr
    );
    assert_same_run(&straight, &resumed, 8);
    // `data dump` of that run renders its date too (the batches it trained on), on any day;
    // without a checkpoint to read it from, today's
    let dump = |tz: &'static str, extra: &[&str]| -> String {
        let mut text = String::new();
        for index in 0..4 {
            let o = std::process::Command::new(common::bin("trainer"))
                .args(["data", "dump"])
                .arg(resumed.join("config.yaml"))
                .args(["--index", &index.to_string(), "--text", "--out"])
                .arg(resumed.join(format!("dump-{index}.safetensors")))
                .args(sets.iter().flat_map(|s| ["--set", s]))
                .args(extra.iter().flat_map(|s| ["--set", s]))
                .env("TZ", tz)
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            text += &String::from_utf8_lossy(&o.stdout);
        }
        text
    };
    let run_date = dump(west.1, &[]);
    assert!(run_date.contains("Today Date: "), "{run_date}");
    assert_eq!(dump(east.1, &[]), run_date, "the run's date on another day");
    let never = ["checkpoint.resume=never"];
    assert_ne!(
        dump(east.1, &never),
        dump(west.1, &never),
        "today's, two days"
    );
    // `data check` of that run counts the text-only samples' tokens with its date: a run whose
    // checkpoints say it started on 2 Jul 2024 (11 tokens with the fixture tokenizer, a date
    // today's 12-15 never are) counts fewer than today's date gives
    for step in checkpoints(&resumed) {
        let manifest = resumed.join("ckpt").join(step).join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        m["template_clock"] = 1_719_921_600i64.into(); // 2024-07-02 12:00
        std::fs::write(&manifest, m.to_string()).unwrap();
    }
    let total_tokens = |extra: &[&str]| -> u64 {
        let o = std::process::Command::new(common::bin("trainer"))
            .args(["data", "check"])
            .arg(resumed.join("config.yaml"))
            .args(sets.iter().chain(extra).flat_map(|s| ["--set", s]))
            .env("TZ", west.1)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let line = text.lines().find(|l| l.contains("supervised tokens: "));
        let total = line.and_then(|l| l.split(" of ").nth(1)?.split(' ').next());
        total
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("{text}"))
    };
    let (july, today) = (total_tokens(&[]), total_tokens(&never));
    // (16 text-only samples, each 1 to 4 tokens shorter)
    assert!(
        july < today && (today - july) % 16 == 0 && today - july <= 64,
        "{july} vs {today}"
    );
}

/// A run (A) stopped at step 5, another (B) started over into the same folders with other
/// settings and stopped at step 2, then `resume: auto`, which continues A's newer step 5: the
/// metrics.jsonl there was B's, so it goes aside with B's files and A's lines come back from the
/// `previous-run-*` folder they were moved into: the history equals A's uninterrupted run's (it
/// held B's steps 1-2, then A's 6-8), each step's loss identified by the checkpoint's.
#[test]
fn a_resume_continues_the_resumed_runs_own_metrics_history() {
    let train = "epochs: 1, batch_size: 4, grad_accum: 1, max_steps: 8";
    let every = ["checkpoint.every_steps=1"];
    let straight = fresh("history-straight");
    ok(run(&straight, 1, train, &every, &[]), "straight");
    let out = fresh("history-mixed");
    let a = run(&out, 1, train, &every, &[("TRAINER_STOP_AFTER_STEP", "5")]);
    assert_eq!(a.code, Some(143), "{}", a.stderr);
    let b_sets = [
        "checkpoint.every_steps=1",
        "checkpoint.resume=never",
        "train.lr=5.0e-4",
    ];
    let b = run(&out, 1, train, &b_sets, &[("TRAINER_STOP_AFTER_STEP", "2")]);
    assert_eq!(b.code, Some(143), "{}", b.stderr);
    let c = ok(run(&out, 1, train, &every, &[]), "resume: auto");
    assert!(
        c.stderr.contains("resumed from") && c.stderr.contains("step-00000005"),
        "{}",
        c.stderr
    );
    assert!(
        c.stderr
            .contains("metrics.jsonl is not the history of the run resumed from step 5")
            && c.stderr
                .contains("the resumed run's lines are continued from"),
        "{}",
        c.stderr
    );
    let losses = |m: Vec<serde_json::Value>| -> Vec<(u64, f64)> {
        m.iter()
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(losses(metrics(&out)), losses(metrics(&straight)));
    // B's lines are kept aside, not lost
    let b_lines = previous_runs(&out)
        .iter()
        .filter_map(|p| std::fs::read_to_string(p.join("metrics.jsonl")).ok())
        .filter(|t| t.lines().count() == 2)
        .count();
    assert_eq!(b_lines, 1);
}
