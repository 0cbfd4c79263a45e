//! launcher: the rank environment contract (torchrun's variable names) and, later, the
//! rendezvous store. This crate never links libtorch so the launcher starts in milliseconds.
pub mod env;
