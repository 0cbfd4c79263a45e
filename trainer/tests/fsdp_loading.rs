//! Sharded loading: every FSDP rank reads only its slices of the safetensors into its flat shards.
//! In one process, for each rank r of W: a skeleton model (placeholder weights) sharded straight
//! from the weight source must give exactly the shards of the fully loaded model sliced by the
//! old path, while reading about 1/W of the checkpoint's bytes (and the W ranks together read
//! every byte exactly once). Both key layouts (sharded hf5 folder, legacy single file), LoRA and
//! full finetuning, fp32 and bf16 storage.
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tch::Kind;
use trainer::fsdp::{FsdpModel, WrapOptions};
use trainer::model::{
    AttentionImpl, LoadOptions, LoraConfig, MllamaConfig, MllamaModel, TargetModules, WeightSource,
};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/mllama_tiny")
}

fn opts(dtype: Kind) -> LoadOptions {
    LoadOptions {
        dtype,
        attention: AttentionImpl::Sdpa,
        ..Default::default()
    }
}

/// LoRA init draws from libtorch's global generator: the tests (threads) take turns.
static RNG: Mutex<()> = Mutex::new(());

fn with_lora(mut m: MllamaModel, lora: bool) -> MllamaModel {
    if lora {
        let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        };
        m.apply_lora(&cfg, 7).unwrap();
    }
    m
}

const WRAP: WrapOptions = WrapOptions {
    compute: Kind::Float,
    prefetch: true,
    activation_checkpointing: true,
    sharding: trainer::config::ShardingStrategy::FullShard,
    sharding_group_size: 1, // (read by hybrid_shard only)
};

/// Shards of rank r of `world` built both ways; returns the bytes the sharded load read.
fn rank_matches_full_load(dir: &Path, dtype: Kind, lora: bool, rank: usize, world: usize) -> u64 {
    let full = with_lora(MllamaModel::load(dir, opts(dtype)).unwrap(), lora);
    let reference = FsdpModel::shard(full, None, rank, world, WRAP).unwrap();

    let src = WeightSource::open_dir(dir).unwrap();
    let config = MllamaConfig::from_file(&dir.join("config.json")).unwrap();
    let skeleton = with_lora(
        MllamaModel::skeleton(config, &src, opts(dtype)).unwrap(),
        lora,
    );
    assert_eq!(src.bytes_read(), 0, "a skeleton reads no weight");
    let sharded = FsdpModel::shard(skeleton, Some(&src), rank, world, WRAP).unwrap();

    assert_eq!(reference.units.len(), sharded.units.len());
    for (ur, us) in reference.units.iter().zip(&sharded.units) {
        assert_eq!(ur.groups.len(), us.groups.len(), "unit {}", ur.name);
        for (gr, gs) in ur.groups.iter().zip(&us.groups) {
            assert_eq!(gr.trainable, gs.trainable);
            assert_eq!(gr.shard_len, gs.shard_len);
            assert_eq!(gr.shard.kind(), gs.shard.kind());
            assert!(
                gr.shard.equal(&gs.shard),
                "unit {} rank {rank}/{world}: shard differs from the full load's",
                ur.name
            );
            let names = |g: &trainer::fsdp::FlatGroup| -> Vec<(String, Vec<i64>, i64)> {
                g.params
                    .iter()
                    .map(|p| (p.name.clone(), p.shape.clone(), p.offset))
                    .collect()
            };
            assert_eq!(names(gr), names(gs), "unit {} layout", ur.name);
        }
    }
    src.bytes_read()
}

fn check(folder: &str, dtype: Kind, lora: bool) {
    let dir = fixtures().join(folder);
    let total = WeightSource::open_dir(&dir).unwrap().total_bytes();
    // file bytes per element, so the slack below is one padding element per group
    let elt = 4u64;
    for world in [1, 2, 3] {
        let mut sum = 0;
        for rank in 0..world {
            let read = rank_matches_full_load(&dir, dtype, lora, rank, world);
            let groups = 2 * 40; // at most two groups per unit, fewer than 40 units in the fixture
            println!(
                "{folder} {dtype:?} lora={lora} rank {rank}/{world}: read {read} of {total} bytes ({:.3})",
                read as f64 / total as f64
            );
            assert!(
                read <= total / world as u64 + groups * elt,
                "rank {rank} of {world} read {read} of {total} bytes"
            );
            sum += read;
        }
        assert_eq!(
            sum, total,
            "world {world}: the ranks together read every byte once"
        );
    }
}

#[test]
fn lora_shards_read_from_source_equal_full_load() {
    check("model_hf5", Kind::Float, true);
}

#[test]
fn full_finetune_shards_read_from_source_equal_full_load() {
    check("model_hf5", Kind::Float, false);
}

#[test]
fn legacy_layout_bf16_storage_shards_equal_full_load() {
    check("model_legacy", Kind::BFloat16, false);
    check("model_legacy", Kind::BFloat16, true);
}
