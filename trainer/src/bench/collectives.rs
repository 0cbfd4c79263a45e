//! `trainer bench collectives`: all_gather, reduce_scatter and all_reduce at 1, 16, 64 and 256 MiB
//! (total bytes of the gathered / reduced buffer), median of several runs, with nccl-tests' bus
//! bandwidth: all_gather and reduce_scatter x (n-1)/n, all_reduce x 2(n-1)/n. Run one per rank
//! under the launcher; rank 0 prints.
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use crate::dist::{ProcessGroup, ReduceOp, Result};

pub struct Measurement {
    pub op: &'static str,
    pub bytes: usize,
    pub seconds: f64,
    pub busbw_gbps: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Untimed runs of each op and size first: the CPU backend backs a buffer with huge pages from its
/// third use in a collective (`dist::thp`), whose one-off cost (~160 ms at 64 MiB) would land in
/// a timed run.
const WARMUPS: usize = 3;

/// Runs every op at every size on `device` (f32 buffers) and returns rank 0's view.
pub fn run(
    pg: &ProcessGroup,
    sizes_mib: &[usize],
    reps: usize,
    device: Device,
) -> Result<Vec<Measurement>> {
    let w = pg.world_size();
    let mut out = Vec::new();
    for &mib in sizes_mib {
        let total = mib << 20;
        let n = (total / 4 / w).max(1) as i64; // elements per rank
        let big = Tensor::ones([n * w as i64], (Kind::Float, device));
        let small = Tensor::ones([n], (Kind::Float, device));
        for op in ["all_gather", "reduce_scatter", "all_reduce"] {
            let mut times = Vec::with_capacity(reps);
            for i in 0..reps + WARMUPS {
                pg.barrier()?;
                let t = Instant::now();
                match op {
                    "all_gather" => pg.all_gather_into(&big, &small)?,
                    "reduce_scatter" => pg.reduce_scatter(&small, &big, ReduceOp::Sum)?,
                    _ => pg.all_reduce(&big, ReduceOp::Sum)?,
                }
                if let Device::Cuda(d) = device {
                    tch::Cuda::synchronize(d as i64);
                }
                if i >= WARMUPS {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            let seconds = median(times);
            let bytes = (n as usize) * w * 4;
            let factor = (w as f64 - 1.0) / w as f64 * if op == "all_reduce" { 2.0 } else { 1.0 };
            out.push(Measurement {
                op,
                bytes,
                seconds,
                busbw_gbps: bytes as f64 * factor / seconds / 1e9,
            });
        }
    }
    Ok(out)
}

/// One JSON line per measurement (the format `make bench-collectives` merges with gloo's; gloo,
/// the peer, runs in its own process there, so `peer` and `ratio` are null here). `transport`:
/// what the backend ran on (`ProcessGroup::transport`: the CPU backend's single-copy `shm-cma`,
/// or `shm-copy` where cross-memory attach was refused, or `tcp`), which the figures depend on.
pub fn json_line(m: &Measurement, backend: &str, transport: &str, world: usize) -> String {
    serde_json::json!({
        "name": format!("collectives/{}/{backend}/world{world}/{}", m.op, m.bytes),
        "op": m.op, "backend": backend, "transport": transport, "world": world, "bytes": m.bytes,
        "seconds": m.seconds, "busbw_gbps": (m.busbw_gbps * 1000.0).round() / 1000.0,
        "figure": m.busbw_gbps, "unit": "GB/s (bus bandwidth)", "peer": null, "ratio": null,
    })
    .to_string()
}
