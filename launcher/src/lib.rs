//! launcher: a torchrun-compatible process launcher, as a library the thin `launcher` binary
//! drives and the trainer links (for [`env::RankEnv`] and [`store::StoreClient`]). It never links
//! libtorch, so it starts in milliseconds and runs anywhere.
//!
//! - [`env`]: the rank environment contract (torchrun's variable names + the store token).
//! - [`store`]: the rendezvous store (protocol, server, client).
//! - [`supervise`]: start, watch, stop and restart ranks; multi-node coordination.
//! - [`outcome`]: exit codes and the root-cause summary.
//! - [`error_file`]: `TORCHELASTIC_ERROR_FILE`, where a failing rank records why.
//! - [`slurm`]: SLURM allocations and node lists.
//! - [`gpus`]: `--nproc-per-node auto`.
//! - [`token`]: random run ids and tokens.
//! - [`shm`]: the ranks' shared-memory segment files (names, leftovers).
//! - [`cli_note`]: a note for config settings given as flags (llama-recipes' habit).
pub mod cli_note;
pub mod env;
pub mod error_file;
pub mod flock;
pub mod gpus;
pub mod outcome;
pub mod shm;
pub mod slurm;
pub mod store;
pub mod supervise;
pub mod token;

pub use env::RankEnv;
pub use outcome::{exit, Outcome};
pub use store::{StoreClient, StoreError, StoreServer};
