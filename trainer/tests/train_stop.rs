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
