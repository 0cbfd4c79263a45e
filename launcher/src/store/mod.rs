//! The rendezvous store: a small TCP key-value store that node 0's launcher serves and every rank
//! (and every other node's launcher) uses to meet: NCCL unique ids, CPU-backend addresses,
//! barriers, and the launchers' own bookkeeping.
//!
//! - [`protocol`]: the length-prefixed binary wire format and its limits.
//! - [`server`]: [`StoreServer`], one thread per connection, token check on connect.
//! - [`client`]: [`StoreClient`], blocking calls that always end (typed timeouts, never a hang).
//!
//! Like torchrun's TCPStore it is not a database: values are small, everything lives in memory for
//! the life of the run, and the secret token is the only access control (use it on trusted networks).
use std::io;
use std::time::Duration;

use thiserror::Error;

pub mod client;
pub mod protocol;
pub mod server;

pub use client::{CompareSet, StoreClient};
pub use server::{ServerOptions, ServerStats, StoreServer};

/// Everything that can go wrong talking to (or serving) the store. Each message says what to check.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error(
        "cannot reach rendezvous store at {endpoint} after {} s (is node 0 running? firewall?): {last}",
        waited.as_secs()
    )]
    Unreachable {
        endpoint: String,
        waited: Duration,
        last: String,
    },
    #[error("rendezvous store at {endpoint} refused the connection: {reason}")]
    Refused { endpoint: String, reason: String },
    #[error(
        "the rendezvous store token is missing: set {var} (the launcher sets it for every rank; \
         start this program with `launcher`)",
        var = crate::env::STORE_TOKEN_VAR
    )]
    NoToken,
    #[error("timed out after {} s waiting for {what} in the rendezvous store at {endpoint}", secs(*waited))]
    Timeout {
        endpoint: String,
        what: String,
        waited: Duration,
    },
    #[error(
        "barrier '{name}' timed out after {} s: {arrived} of {expected} participants arrived \
         (did a rank crash or skip the barrier?)",
        secs(*waited)
    )]
    BarrierTimeout {
        name: String,
        arrived: i64,
        expected: usize,
        waited: Duration,
    },
    #[error(
        "barrier '{name}' expected {expected} participants but {arrived} arrived \
         (do all participants pass the same count and call barriers in the same order?)"
    )]
    BarrierOverflow {
        name: String,
        arrived: i64,
        expected: usize,
    },
    #[error(
        "rendezvous store at {endpoint} did not answer within {} s (is node 0 overloaded or stopped?)",
        secs(*waited)
    )]
    NoReply { endpoint: String, waited: Duration },
    // The io::Error is part of the message (not a `source`), so `{:#}` chains do not repeat it.
    #[error("lost the connection to the rendezvous store at {endpoint}: {error} (did the launcher on node 0 exit?)")]
    Disconnected { endpoint: String, error: io::Error },
    #[error("rendezvous store at {endpoint} rejected the request: {reason}")]
    Rejected { endpoint: String, reason: String },
    #[error("{what} of {len} bytes exceeds the store's limit of {max} bytes (the store is for small rendezvous data)")]
    TooLarge {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("invalid store request: {0}")]
    InvalidArgument(String),
    #[error("unexpected answer from the rendezvous store at {endpoint}: {detail}")]
    Protocol { endpoint: String, detail: String },
    #[error(
        "cannot serve the rendezvous store on {addr}: the port is already in use \
         (another run on this node? pick another --master-port; a one-node run can use \
         --standalone for a free one)"
    )]
    AddrInUse { addr: String },
    #[error("cannot serve the rendezvous store on {addr}: {error} (is --master-addr an address of this node?)")]
    Bind { addr: String, error: io::Error },
    #[error("cannot resolve the address to serve the rendezvous store on: {error} (check --master-addr)")]
    Resolve { error: io::Error },
}

fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 10.0 || s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}
