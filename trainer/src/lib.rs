//! trainer library. Module index:
//! - `config`:  YAML schema, `--set` overrides, validation into a resolved config
//! - `logging`: tracing with a `[rank r]` prefix, progress only on rank 0
pub mod config;
pub mod logging;
