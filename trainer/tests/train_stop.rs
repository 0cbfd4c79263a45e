//! A run that `train.max_steps` stops in mid-epoch always leaves a checkpoint of its last step
//! (whatever `checkpoint.every_steps` says), and a longer run resumes from it exactly where the
//! straight run would be: world 1 with synchronous saves and no periodic saves, world 2 with
//! background saves between periodic ones. 48 samples, global batch 4: 12 steps per epoch.
mod common;

use common::ckpt::*;

fn train(world: usize, max_steps: u64) -> String {
    format!(
        "epochs: 2, batch_size: {}, grad_accum: 1, max_steps: {max_steps}",
        4 / world
    )
}

fn stop_saves_and_resumes(world: usize, sets: &[&str], want: &[&str]) {
    let tag = format!("w{world}");
    let stopped = fresh(&format!("stop-{tag}"));
    let o = ok(run(&stopped, world, &train(world, 3), sets, &[]), "stopped");
    assert_eq!(checkpoints(&stopped), want, "{}", o.stderr);
    assert_eq!(metrics(&stopped).len(), 3);

    // a longer run picks up at step 3 and equals the straight 5-step run bitwise
    let o = ok(run(&stopped, world, &train(world, 5), sets, &[]), "resumed");
    assert!(
        o.stderr.contains("resumed from") && o.stderr.contains("step-00000003"),
        "{}",
        o.stderr
    );
    let straight = fresh(&format!("straight-{tag}"));
    ok(
        run(&straight, world, &train(world, 5), sets, &[]),
        "straight",
    );
    let _ = assert_same_run(&straight, &stopped, 5);
    // both 5-step runs end with a checkpoint of step 5 as well
    assert!(checkpoints(&straight).contains(&"step-00000005".to_string()));
    assert!(checkpoints(&stopped).contains(&"step-00000005".to_string()));
}

#[test]
fn max_steps_mid_epoch_saves_world1_sync_no_periodic() {
    stop_saves_and_resumes(1, &["checkpoint.async=false"], &["step-00000003"]);
}

#[test]
fn max_steps_mid_epoch_saves_world2_async_between_periodic() {
    stop_saves_and_resumes(
        2,
        &["checkpoint.async=true", "checkpoint.every_steps=2"],
        &["step-00000002", "step-00000003"],
    );
}

/// A stop signal while the ranks start (the model load: minutes at 11B) stops the run before its
/// first step, exit 143, with no checkpoint and no step trained (it used to train and save one
/// step first, past a scheduler's grace period); launched again, the run starts from the start.
#[test]
fn a_stop_during_start_up_stops_before_the_first_step() {
    let out = fresh("stop-at-start-up");
    let o = run(
        &out,
        1,
        &train(1, 3),
        &[],
        &[("TRAINER_STOP_AFTER_STEP", "0")],
    );
    assert_eq!(o.code, Some(143), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("SIGTERM: stopping before training (at step 0; nothing new to save)"),
        "{}",
        o.stderr
    );
    assert!(checkpoints(&out).is_empty(), "{:?}", checkpoints(&out));
    let again = ok(run(&out, 1, &train(1, 3), &[], &[]), "again");
    assert!(!again.stderr.contains("resumed from"), "{}", again.stderr);
    assert_eq!(metrics(&out).len(), 3);
}

/// A checkpoint saved with train.drop_last resumed without it (48 samples, global batch 5: 3 left
/// over each epoch) is refused before training, naming the setting to resume with (the epochs'
/// step count would change: a resumed run counted the epochs done by the new count, cut the
/// last epoch short and ended its schedule early); with it, the run resumes, 9 steps per epoch.
#[test]
fn a_resume_that_changes_drop_last_is_refused() {
    let out = fresh("drop-last-changed");
    let train =
        |max_steps: u64| format!("epochs: 2, batch_size: 5, grad_accum: 1, max_steps: {max_steps}");
    let first = ok(
        run(&out, 1, &train(3), &["train.drop_last=true"], &[]),
        "first",
    );
    assert!(
        first
            .stderr
            .contains("3 of 48 training samples sit out each epoch"),
        "{}",
        first.stderr
    );
    let refused = run(&out, 1, &train(0), &[], &[]);
    assert_eq!(refused.code, Some(1), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("was trained with train.drop_last true: its epochs left out the 3 samples that do not fill a global batch, this run's would end with a partial step of them, so the run's step count and learning-rate schedule would not continue the checkpoint's; set train.drop_last=true to resume"),
        "{}",
        refused.stderr
    );
    ok(
        run(&out, 1, &train(0), &["train.drop_last=true"], &[]),
        "resumed",
    );
    assert_eq!(metrics(&out).len(), 18);
}
