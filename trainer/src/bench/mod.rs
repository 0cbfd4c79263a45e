//! `trainer bench ...`: measurements, never timed tests. Each prints a table, or with `--json`
//! one JSON object per measurement on stdout.
pub mod checkpoint;
pub mod collectives;
pub mod data;
pub mod decode;
pub mod step;
