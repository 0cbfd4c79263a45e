//! trainer library. Module index:
//! - `bench`:   measurements behind `trainer bench ...` (collectives)
//! - `checkpoint`: sharded checkpoints: atomic save, resume at any world size, integrity checks (issue 8)
//! - `config`:  YAML schema, `--set` overrides, validation into a resolved config
//! - `data`:    records, Mllama image processor, chat template, labels, collate, sampler, loader
//! - `demo`:    `trainer demo-data`: synthetic shapes scenes, SCo records, test bench, tiny Mllama folder
//! - `dist`:    ProcessGroup (all_gather, reduce_scatter, all_reduce, broadcast, barrier) on cpu/nccl
//! - `eval`:    benchmark scoring per turn, transitions, reports (trainer eval)
//! - `fsdp`:    units, flat shards, gather/free schedule, recompute backward; plain (unsharded) baseline
//! - `infer`:   generation with self-correction turns, sampling, stage parsing
//! - `logging`: tracing with a `[rank r]` prefix, progress only on rank 0
//! - `model`:   Mllama (Llama 3.2 Vision) in tch: config, safetensors weights, vision, text, LoRA/PEFT, KV cache
//! - `optim`:   AdamW on flat fp32 shards, global-norm clipping, lr schedules
//! - `train`:   the training loop (`trainer train`): FSDP or plain, grad accumulation, clip, AdamW, metrics
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod demo;
pub mod dist;
pub mod eval;
pub mod fsdp;
pub mod infer;
pub mod logging;
pub mod model;
pub mod optim;
pub mod rng;
pub mod train;
