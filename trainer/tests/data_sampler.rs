//! Sampler: global batches independent of world size, per-epoch shuffle, deterministic
//! ordered workers.
use trainer::data::loader::OrderedPool;
use trainer::data::sampler::LengthGroupedSampler;

fn lengths() -> Vec<usize> {
    (0..103).map(|i| (i * 37) % 50 + 1).collect()
}

#[test]
fn steps_see_the_same_samples_at_any_world_size() {
    let s = LengthGroupedSampler::new(lengths(), 8, 42);
    assert_eq!(s.batches_per_epoch(), 12);
    let e0 = s.epoch_batches(0);
    for world in [1, 2, 4, 8] {
        for g in &e0 {
            let joined: Vec<usize> = (0..world)
                .flat_map(|r| LengthGroupedSampler::rank_part(g, r, world).to_vec())
                .collect();
            assert_eq!(&joined, g);
        }
    }
    // similar lengths inside a global batch
    let l = lengths();
    for g in &e0 {
        let (mn, mx) = (
            g.iter().map(|&i| l[i]).min().unwrap(),
            g.iter().map(|&i| l[i]).max().unwrap(),
        );
        assert!(mx - mn <= 5, "{mn}..{mx}");
    }
    // deterministic, different per epoch, every index at most once
    assert_eq!(e0, s.epoch_batches(0));
    assert_ne!(e0, s.epoch_batches(1));
    let mut all: Vec<usize> = e0.concat();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 96);
}

#[test]
fn the_samples_left_out_change_per_epoch() {
    // 103 samples, global batch 8: 7 left out per epoch, a random subset (not the 7 longest)
    let l = lengths();
    let s = LengthGroupedSampler::new(l.clone(), 8, 42);
    let mut seen = vec![false; l.len()];
    let mut longest_always_out = true;
    for epoch in 0..12 {
        let used: Vec<usize> = s.epoch_batches(epoch).concat();
        assert_eq!(used.len(), 96);
        for &i in &used {
            seen[i] = true;
        }
        longest_always_out &= !used.iter().any(|&i| l[i] == 50);
    }
    assert!(
        !longest_always_out,
        "the longest samples are never trained on"
    );
    assert!(
        seen.iter().all(|&b| b),
        "some sample never came up in 12 epochs"
    );
}

#[test]
fn ordered_pool_output_does_not_depend_on_worker_count() {
    let jobs: Vec<u64> = (0..50).collect();
    let want: Vec<u64> = jobs.iter().map(|x| x * x).collect();
    for workers in [1, 2, 3, 7] {
        let got: Vec<u64> = OrderedPool::new(jobs.clone(), workers, 2, |&x: &u64| {
            std::thread::sleep(std::time::Duration::from_micros((x * 7919) % 300));
            x * x
        })
        .unwrap()
        .collect();
        assert_eq!(got, want, "workers {workers}");
    }
    // dropping early does not hang
    let mut p = OrderedPool::new((0..1000u64).collect(), 2, 1, |&x: &u64| x).unwrap();
    assert_eq!(p.next(), Some(0));
    drop(p);
}
