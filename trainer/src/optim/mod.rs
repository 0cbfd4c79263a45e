//! Optimizer pieces that work on flat fp32 shards (any split of the parameters gives the same update):
//! - `adamw`:    [`AdamW`], element-wise identical to `torch.optim.AdamW` (single-tensor path)
//! - `clip`:     [`clip_grad_norm`], global L2 norm over all ranks' shards (squared norm all-reduced)
//! - `schedule`: [`LrSchedule`], StepLR per epoch (llama-recipes) and cosine with linear warmup + floor
pub mod adamw;
pub mod clip;
pub mod schedule;

pub use adamw::{AdamW, AdamWConfig, Segment};
pub use clip::{clip_grad_norm, grad_norm_squared};
pub use schedule::LrSchedule;
