//! Sampler: global batches independent of world size, per-epoch shuffle, deterministic
//! ordered workers.
use trainer::data::loader::OrderedPool;
use trainer::data::sampler::LengthGroupedSampler;

fn lengths() -> Vec<usize> {
    (0..103).map(|i| (i * 37) % 50 + 1).collect()
}

#[test]
fn steps_see_the_same_samples_at_any_world_size() {
    let s = LengthGroupedSampler::new(lengths(), 8, 42, true);
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
    let s = LengthGroupedSampler::new(l.clone(), 8, 42, true);
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

/// Without drop_last the samples that do not fill a global batch are the epoch's last, partial
/// one: every sample once per epoch, the whole batches the same as with drop_last, and the
/// partial one spread over any world size with filler rows only where a rank has no sample.
#[test]
fn without_drop_last_every_sample_is_trained_once_per_epoch() {
    let l = lengths();
    let (kept, dropped) = (
        LengthGroupedSampler::new(l.clone(), 8, 42, false),
        LengthGroupedSampler::new(l.clone(), 8, 42, true),
    );
    assert_eq!(
        (kept.batches_per_epoch(), kept.partial_batch_len()),
        (13, 7)
    );
    for epoch in 0..3 {
        let (all, whole) = (kept.epoch_batches(epoch), dropped.epoch_batches(epoch));
        assert_eq!(&all[..12], &whole[..], "the whole batches do not change");
        let last = &all[12];
        assert_eq!(last.len(), 7);
        assert!(
            last.windows(2).all(|w| l[w[0]] <= l[w[1]]),
            "sorted by length"
        );
        let mut every: Vec<usize> = all.concat();
        every.sort();
        assert_eq!(every, (0..103).collect::<Vec<_>>(), "epoch {epoch}");
        // the partial batch is the same samples at any world size: even parts, fillers only
        // where a rank is left without one
        for world in [1, 2, 3, 7, 8, 16] {
            let parts: Vec<(Vec<usize>, usize)> = (0..world)
                .map(|r| LengthGroupedSampler::even_part(last, r, world))
                .collect();
            let real: Vec<usize> = parts
                .iter()
                .flat_map(|(p, f)| p[..p.len() - f].to_vec())
                .collect();
            assert_eq!(&real, last, "world {world}");
            let sizes: Vec<usize> = parts.iter().map(|(p, _)| p.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
            let fillers: usize = parts.iter().map(|p| p.1).sum();
            assert_eq!(fillers, world.saturating_sub(7), "world {world}");
        }
    }
    // training's partial micro-step: slices of batch_size, the same at any world size (whole
    // micro-steps' slices are their even parts)
    let step: Vec<usize> = (10..15).collect();
    for (world, want) in [
        (1, vec![(vec![10, 11], 0)]),
        (3, vec![(vec![10, 11], 0), (vec![12, 13], 0), (vec![14], 0)]),
        (
            4,
            vec![
                (vec![10, 11], 0),
                (vec![12, 13], 0),
                (vec![14], 0),
                (vec![10], 1),
            ],
        ),
    ] {
        let parts: Vec<_> = (0..world)
            .map(|r| LengthGroupedSampler::slice_part(&step, r, 2))
            .collect();
        assert_eq!(parts, want, "world {world}");
    }
    let whole: Vec<usize> = (0..6).collect();
    for r in 0..3 {
        assert_eq!(
            LengthGroupedSampler::slice_part(&whole, r, 2),
            LengthGroupedSampler::even_part(&whole, r, 3)
        );
    }
    // a data set smaller than one global batch is one partial step
    let small = LengthGroupedSampler::new(vec![3, 1, 2], 8, 42, false);
    assert_eq!(small.batches_per_epoch(), 1);
    assert_eq!(small.epoch_batches(0), [vec![1, 2, 0]]);
    assert_eq!(
        LengthGroupedSampler::new(vec![3, 1, 2], 8, 42, true).batches_per_epoch(),
        0
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
