//! The `trainer` binary's larger subcommands, one module each (main.rs declares them: they are
//! not part of the library).
pub(crate) mod bench;
pub(crate) mod eval;
pub(crate) mod infer;
