//! `dist-selftest`: one rank of the collective layer's end-to-end tests, run under the launcher.
//!
//! `--mode ops`: every op x dtype x size against a reference computed locally from all ranks'
//! inputs (each rank can regenerate every rank's input from the seed), written as
//! `OUT/result-RANK.txt` (a digest of every output, for bitwise comparison across ranks and runs).
//! `--mode death --die-rank R`: rank R exits 3 after one barrier; the others try an all_reduce and
//! write the error they get to `OUT/error-RANK.txt` (they ignore SIGTERM from the launcher so they
//! live long enough to report).
//! `--mode death-mid --die-rank R`: as `death`, but rank R exits a few milliseconds into a 16 MiB
//! all_reduce it started, so the others lose it mid-op (while reading its memory, with
//! cross-memory attach) or at the op's next barrier; they record the first error of that
//! all_reduce and a barrier after it.
//! `--mode groups` (even world): the ops of `ops` in sub-groups (`new_group`): the halves of the
//! ranks and the strides across them, as HSDP's shard and replica groups.
//! `--mode group-death --die-rank R`: rank R exits; the others all_reduce in a sub-group and write
//! the error they get (global rank numbers) to `OUT/error-RANK.txt`.
//! `--mode transport`: one all_reduce, checked, and a line naming the transport (setup tests).
//! `--mode drop-unwaited`: an all_reduce whose Work is dropped without wait() has completed
//! right after (the drop waits), on every rank.
//! `--mode mismatch` / `mismatch-empty`: rank 0 all_reduces 4097 (0) f32 and the others 4096
//! (1); each rank writes the error it gets to `OUT/error-RANK.txt` ("no error" if none).
//! `mismatch-dtype`: 2048 f64 against 4096 f32; `mismatch-root`: every rank broadcasts from
//! itself; `mismatch-barrier`: rank 0 waits at a barrier while the others all_reduce.
//! `--mode nccl-timeout` (GPU, world 1): the NCCL dead-peer path. NCCL refuses two ranks of one
//! communicator on one GPU, so with one GPU a peer that never answers is simulated: libtorch's
//! stream is blocked on a host word nobody writes (cuStreamWaitValue32), so the next all_reduce can
//! never finish, exactly as when a peer is gone. The rank must get an error after the 5 s timeout
//! (not hang), later ops must fail at once, and it leaves with `_exit` (the stream stays blocked).
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tch::{Device, Kind, Tensor};
use trainer::dist::{Backend, ProcessGroup, ReduceOp};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "ops")]
    mode: String,
    #[arg(long, default_value_t = 1)]
    die_rank: usize,
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// Include the 16 MiB f32 cases (chunked rounds)
    #[arg(long)]
    large: bool,
    /// Tensors on `cpu` or `cuda` (the GPU LOCAL_RANK; for the nccl backend)
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Rank `r`'s input for case `case`: deterministic, different per rank and case.
fn input(r: usize, case: u64, n: i64, kind: Kind) -> Tensor {
    tch::manual_seed((case * 1000 + r as u64) as i64);
    match kind {
        Kind::Int64 => Tensor::randint_low(-1000, 1000, [n], (Kind::Int64, tch::Device::Cpu)),
        k => Tensor::randn([n], (Kind::Float, tch::Device::Cpu)).to_kind(k),
    }
}

/// The reduction in rank order, accumulating like the backend (f32 for 16-bit floats).
fn reference_reduce(parts: &[Tensor], op: ReduceOp, kind: Kind) -> Tensor {
    let acc_kind = match kind {
        Kind::BFloat16 | Kind::Half => Kind::Float,
        k => k,
    };
    let mut acc = parts[0].to_kind(acc_kind);
    for p in &parts[1..] {
        let p = p.to_kind(acc_kind);
        acc = match op {
            ReduceOp::Max => acc.maximum(&p),
            _ => acc + p,
        };
    }
    if op == ReduceOp::Avg {
        acc *= 1.0 / parts.len() as f64;
    }
    acc.to_kind(kind)
}

/// The sum (readable) and a hash of the raw bytes (bitwise comparison across ranks, runs and
/// transports: `same` compares values, which would not tell -0.0 from 0.0).
fn digest(t: &Tensor) -> String {
    let t = t.to_device(Device::Cpu).contiguous();
    let sum = t.to_kind(Kind::Double).sum(Kind::Double).double_value(&[]);
    let len = t.numel() * t.kind().elt_size_in_bytes();
    let bytes: &[u8] = if len == 0 {
        &[]
    } else {
        // SAFETY: a contiguous CPU tensor of `len` bytes, alive for this borrow.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, len) }
    };
    // FNV-1a over 8-byte words (then the tail bytes)
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    for w in words {
        h = (h ^ u64::from_le_bytes(w.try_into().expect("8 bytes"))).wrapping_mul(0x100_0000_01b3);
    }
    for &b in tail {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{sum:.17e} {h:016x}")
}

/// Where two results differ: (differing elements, max abs difference, max abs of the reference).
fn diff(a: &Tensor, b: &Tensor) -> String {
    let (a, b) = (
        a.to_device(Device::Cpu).to_kind(Kind::Double),
        b.to_device(Device::Cpu).to_kind(Kind::Double),
    );
    if a.size() != b.size() {
        return format!("shapes {:?} vs {:?}", a.size(), b.size());
    }
    let d = (&a - &b).abs();
    format!(
        "{} of {} elements differ, max |diff| {:e}, max |ref| {:e}",
        d.gt(0.0).sum(Kind::Int64).int64_value(&[]),
        d.numel(),
        d.max().double_value(&[]),
        b.abs().max().double_value(&[])
    )
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    let (a, b) = (a.to_device(Device::Cpu), b.to_device(Device::Cpu));
    a.size() == b.size()
        && a.kind() == b.kind()
        && a.to_kind(Kind::Double).equal(&b.to_kind(Kind::Double))
}

fn run_ops(pg: &ProcessGroup, large: bool, dev: Device) -> Result<String> {
    let (rank, world) = (pg.rank(), pg.world_size());
    let mut log = String::new();
    let mut case = 0u64;
    let kinds = [
        Kind::Float,
        Kind::BFloat16,
        Kind::Half,
        Kind::Int64,
        Kind::Double,
    ];
    let mut sizes = vec![0i64, 1, 7, 4097, (1 << 20) + 3];
    if large {
        sizes.push((16 << 20) / 4);
    }
    for &kind in &kinds {
        for &n in &sizes {
            if n > (1 << 20) + 3 && kind != Kind::Float {
                continue;
            }
            case += 1;
            let inputs: Vec<Tensor> = (0..world).map(|r| input(r, case, n, kind)).collect();
            let mine = &inputs[rank].to_device(dev);
            // all_gather
            let out = Tensor::zeros([n * world as i64], (kind, dev));
            pg.all_gather_into(&out, mine)
                .with_context(|| format!("all_gather {kind:?} n={n}"))?;
            if !same(&out, &Tensor::cat(&inputs, 0)) {
                bail!("all_gather {kind:?} n={n}: wrong result");
            }
            writeln!(log, "all_gather {kind:?} {n} {}", digest(&out))?;
            // broadcast from the last rank
            let b = mine.copy();
            pg.broadcast(&b, world - 1)?;
            if !same(&b, &inputs[world - 1]) {
                bail!("broadcast {kind:?} n={n}: wrong result");
            }
            let ops: &[ReduceOp] = match kind {
                Kind::Int64 => &[ReduceOp::Sum, ReduceOp::Max],
                Kind::Float | Kind::Double => &[ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max],
                _ => &[ReduceOp::Sum, ReduceOp::Avg],
            };
            for &op in ops {
                // all_reduce
                let t = mine.copy();
                pg.all_reduce(&t, op)
                    .with_context(|| format!("all_reduce {op:?} {kind:?} n={n}"))?;
                let want = reference_reduce(&inputs, op, kind);
                if !same(&t, &want) {
                    bail!(
                        "all_reduce {op:?} {kind:?} n={n}: differs from the reference: {}",
                        diff(&t, &want)
                    );
                }
                writeln!(log, "all_reduce {op:?} {kind:?} {n} {}", digest(&t))?;
                // reduce_scatter: input (W * m), rank r gets the reduction of slice r
                let m = n / world as i64;
                if m > 0 {
                    let big: Vec<Tensor> = (0..world)
                        .map(|r| input(r, case + 10_000, m * world as i64, kind))
                        .collect();
                    let out = Tensor::zeros([m], (kind, dev));
                    pg.reduce_scatter(&out, &big[rank].to_device(dev), op)
                        .with_context(|| format!("reduce_scatter {op:?} {kind:?} m={m}"))?;
                    let slices: Vec<Tensor> = big
                        .iter()
                        .map(|t| t.narrow(0, rank as i64 * m, m))
                        .collect();
                    let want = reference_reduce(&slices, op, kind);
                    if !same(&out, &want) {
                        bail!(
                            "reduce_scatter {op:?} {kind:?} m={m}: differs from the reference: {}",
                            diff(&out, &want)
                        );
                    }
                    writeln!(log, "reduce_scatter {op:?} {kind:?} {m} {}", digest(&out))?;
                }
            }
        }
    }
    // async forms: two in flight, waited in order
    let a = Tensor::ones([1000], (Kind::Float, dev));
    let b = Tensor::ones([10], (Kind::Float, dev));
    let wa = pg.all_reduce_async(&a, ReduceOp::Sum)?;
    let wb = pg.all_reduce_async(&b, ReduceOp::Sum)?;
    wa.wait()?;
    wb.wait()?;
    if a.double_value(&[0]) != world as f64 || b.double_value(&[9]) != world as f64 {
        bail!("async all_reduce: wrong result");
    }
    pg.barrier()?;
    Ok(log)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let backend = match args.backend.as_str() {
        "cpu" => Backend::Cpu,
        "tcp" => Backend::Tcp,
        "nccl" => Backend::Nccl,
        _ => Backend::Auto,
    };
    let rank: usize = std::env::var("RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    match args.mode.as_str() {
        "ops" => {
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(60))?;
            let dev = match args.device.as_str() {
                "cuda" => Device::Cuda(
                    std::env::var("LOCAL_RANK")
                        .ok()
                        .and_then(|r| r.parse().ok())
                        .unwrap_or(0),
                ),
                _ => Device::Cpu,
            };
            let log = run_ops(&pg, args.large, dev)?;
            println!(
                "dist-selftest: rank {rank}: all ops correct on backend {} ({dev:?}), transport {}",
                pg.backend_name(),
                pg.transport()
            );
            std::fs::write(args.out.join(format!("result-{rank}.txt")), log)?;
        }
        "groups" => {
            // world 2k: the halves (0..k, k..2k: on one node each with two launcher nodes) and
            // the strides (r, r + k: across the nodes), as HSDP's shard and replica groups; every
            // op in each against the reference of its own members, with world ops between them
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(60))?;
            let (world, half) = (pg.world_size(), pg.world_size() / 2);
            if world % 2 != 0 {
                bail!("--mode groups needs an even world size");
            }
            let row: Vec<usize> = (0..half).map(|i| rank / half * half + i).collect();
            let col: Vec<usize> = (0..2).map(|i| rank % half + i * half).collect();
            let rows = pg.new_group(&row, &format!("half-{}", rank / half))?;
            let cols = pg.new_group(&col, &format!("stride-{}", rank % half))?;
            let mut log = run_ops(&rows, false, Device::Cpu).context("in the halves")?;
            pg.barrier()?;
            log += &run_ops(&cols, false, Device::Cpu).context("in the strides")?;
            // a group reduces over its members only, and the world group still over every rank
            let t = Tensor::from_slice(&[rank as f64]);
            cols.all_reduce(&t, ReduceOp::Sum)?;
            let g = Tensor::from_slice(&[rank as f64]);
            pg.all_reduce(&g, ReduceOp::Sum)?;
            let (want_col, want_world) = (col.iter().sum::<usize>(), world * (world - 1) / 2);
            if t.double_value(&[0]) != want_col as f64 || g.double_value(&[0]) != want_world as f64
            {
                bail!("a group reduced over the wrong ranks");
            }
            println!(
                "dist-selftest: rank {rank}: group ops correct; halves {} ({}), strides {} ({})",
                rows.transport(),
                rows.rank(),
                cols.transport(),
                cols.rank()
            );
            std::fs::write(args.out.join(format!("result-{rank}.txt")), log)?;
        }
        "death" | "group-death" => {
            // SAFETY: ignoring SIGTERM so this rank outlives the launcher's stop long enough to report.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            // group-death: the survivors all_reduce in their stride group (r, r + W/2), whose
            // member's error names the dead rank by its global number
            let group = match args.mode.as_str() {
                "group-death" => {
                    let half = pg.world_size() / 2;
                    let col: Vec<usize> = (0..2).map(|i| rank % half + i * half).collect();
                    Some(pg.new_group(&col, &format!("stride-{}", rank % half))?)
                }
                _ => None,
            };
            pg.barrier()?;
            if rank == args.die_rank {
                std::process::exit(3);
            }
            let t = Tensor::ones([1 << 16], (Kind::Float, tch::Device::Cpu));
            let err = match group.as_ref().unwrap_or(&pg).all_reduce(&t, ReduceOp::Sum) {
                Ok(()) => "no error".to_string(),
                Err(e) => e.to_string(),
            };
            std::fs::write(args.out.join(format!("error-{rank}.txt")), &err)?;
            eprintln!("rank {rank}: {err}");
            // (the dead rank stays the launcher's first failure, its root cause, even when a
            // survivor noticed at once: over TCP a closed socket is seen within milliseconds)
            std::thread::sleep(Duration::from_millis(500));
            std::process::exit(1);
        }
        "mismatch" | "mismatch-empty" | "mismatch-dtype" | "mismatch-root" | "mismatch-barrier" => {
            // rank 0 all_reduces 4097 f32 and the others 4096, or rank 0 an empty tensor and the
            // others one element, or rank 0 2048 f64 and the others 4096 f32 (the same bytes),
            // or every rank broadcasts 4096 f32 from itself: every rank must get an error, not
            // wrong data. (SIGTERM ignored, as in `death`: the launcher stops the other ranks
            // once one exits, and each must still write its error; the grace period bounds it.)
            // SAFETY: ignoring SIGTERM so this rank outlives the launcher's stop long enough to report.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            let (mine, others) = match args.mode.as_str() {
                "mismatch" => (4097, 4096),
                "mismatch-dtype" => (2048, 4096),
                _ => (0, 1),
            };
            let n = if rank == 0 { mine } else { others };
            let kind = match (args.mode.as_str(), rank) {
                ("mismatch-dtype", 0) => Kind::Double,
                _ => Kind::Float,
            };
            let t = Tensor::ones([n], (kind, tch::Device::Cpu));
            let result = match args.mode.as_str() {
                "mismatch-root" => pg.broadcast(&t, rank),
                "mismatch-barrier" if rank == 0 => pg.barrier(),
                _ => pg.all_reduce(&t, ReduceOp::Sum),
            };
            let first = match result {
                Ok(()) => "no error".to_string(),
                Err(e) => e.to_string(),
            };
            std::fs::write(args.out.join(format!("error-{rank}.txt")), &first)?;
            eprintln!("rank {rank}: {first}");
            std::process::exit(if first == "no error" { 0 } else { 1 });
        }
        "template-clock" => {
            // ranks in other time zones (the test sets TZ per rank) render rank 0's date
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            let fmt = "%d %b %Y %H";
            let own = trainer::data::template::strftime(fmt, trainer::data::template::local_now());
            trainer::data::template::agree_template_clock(&pg, tch::Device::Cpu, None)?;
            let agreed = trainer::data::template::strftime_now(fmt);
            std::fs::write(
                args.out.join(format!("clock-{rank}.txt")),
                format!("{own}|{agreed}"),
            )?;
        }
        "inplace-gather" => {
            // all_gather whose input is this rank's own slot of the output (torch allows it)
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            let (w, n) = (pg.world_size() as i64, 4099i64);
            let out = Tensor::zeros([w * n], (Kind::Float, tch::Device::Cpu));
            let mine = out.narrow(0, rank as i64 * n, n);
            let _ = mine.shallow_clone().fill_(rank as f64 + 1.0);
            pg.all_gather_into(&out, &mine)?;
            let want = Tensor::arange_start(1, w + 1, (Kind::Float, tch::Device::Cpu))
                .repeat_interleave_self_int(n, 0, None);
            if !same(&out, &want) {
                bail!("rank {rank}: an in-place all_gather gave other values");
            }
            // shapes that differ with the counts right (only bytes move): (1, W n) into (n,)
            let input = Tensor::ones([1, w * n], (Kind::Float, tch::Device::Cpu));
            let part = Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
            pg.reduce_scatter(&part, &input, ReduceOp::Sum)?;
            if !same(
                &part,
                &Tensor::full([n], w as f64, (Kind::Float, tch::Device::Cpu)),
            ) {
                bail!("rank {rank}: a reduce_scatter of a (1, W n) input gave other values");
            }
            println!(
                "dist-selftest: rank {rank}: in-place all_gather ok ({})",
                pg.transport()
            );
        }
        "drop-unwaited" => {
            // every rank drops an all_reduce's Work without wait(): the drop waits for it, so
            // the tensor holds the sum right after and the group goes on in step
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            let t = Tensor::ones([1 << 20], (Kind::Float, tch::Device::Cpu));
            drop(pg.all_reduce_async(&t, ReduceOp::Sum)?);
            let want = Tensor::full(
                [1 << 20],
                pg.world_size() as f64,
                (Kind::Float, tch::Device::Cpu),
            );
            if !same(&t, &want) {
                bail!("rank {rank}: a dropped all_reduce's tensor is not the sum");
            }
            pg.barrier()?;
            println!(
                "dist-selftest: rank {rank}: dropped work completed ({})",
                pg.transport()
            );
        }
        "transport" => {
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(60))?;
            let t = Tensor::ones([4097], (Kind::Float, tch::Device::Cpu));
            pg.all_reduce(&t, ReduceOp::Sum)?;
            if !same(
                &t,
                &Tensor::full(
                    [4097],
                    pg.world_size() as f64,
                    (Kind::Float, tch::Device::Cpu),
                ),
            ) {
                bail!("all_reduce: wrong result");
            }
            println!("dist-selftest: rank {rank}: transport {}", pg.transport());
        }
        "death-mid" => {
            // SAFETY: as in `death`.
            unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
            let pg = ProcessGroup::from_env(backend, Duration::from_secs(20))?;
            pg.barrier()?;
            let t = Tensor::ones([4 << 20], (Kind::Float, tch::Device::Cpu));
            if rank == args.die_rank {
                let _work = pg.all_reduce_async(&t, ReduceOp::Sum)?;
                std::thread::sleep(Duration::from_millis(5));
                // SAFETY: ends the process at once (exit() would run libtorch's destructors first,
                // while the communication thread goes on and may finish the op).
                unsafe { libc::_exit(3) };
            }
            let err = match pg.all_reduce(&t, ReduceOp::Sum).and_then(|()| pg.barrier()) {
                Ok(()) => "no error".to_string(),
                Err(e) => e.to_string(),
            };
            std::fs::write(args.out.join(format!("error-{rank}.txt")), &err)?;
            eprintln!("rank {rank}: {err}");
            // (the dead rank stays the launcher's first failure, its root cause, even when a
            // survivor noticed at once: over TCP a closed socket is seen within milliseconds)
            std::thread::sleep(Duration::from_millis(500));
            std::process::exit(1);
        }
        "nccl-timeout" => nccl_timeout(&args.out)?,
        other => bail!("unknown mode {other}"),
    }
    Ok(())
}

/// Blocks libtorch's current stream on `device` until a host word becomes 1 (it never does).
fn block_stream(device: i32) -> std::result::Result<(), String> {
    use cudarc::driver::sys;
    let gpu = kernels::runtime::gpu(device).map_err(|e| e.to_string())?;
    gpu.make_current().map_err(|e| e.to_string())?;
    let stream = kernels::runtime::torch_current_stream(device);
    // SAFETY: a 4-byte mapped host allocation, leaked on purpose (the stream waits on it forever).
    unsafe {
        let mut host: *mut std::ffi::c_void = std::ptr::null_mut();
        let r = sys::cuMemHostAlloc(&mut host, 4, sys::CU_MEMHOSTALLOC_DEVICEMAP);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemHostAlloc: {r:?}"));
        }
        *(host as *mut u32) = 0;
        let mut dptr: sys::CUdeviceptr = 0;
        let r = sys::cuMemHostGetDevicePointer_v2(&mut dptr, host, 0);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuMemHostGetDevicePointer: {r:?}"));
        }
        let geq = sys::CUstreamWaitValue_flags_enum::CU_STREAM_WAIT_VALUE_GEQ as u32;
        let r = sys::cuStreamWaitValue32_v2(stream, dptr, 1, geq);
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!(
                "cuStreamWaitValue32 (stream memory operations unsupported?): {r:?}"
            ));
        }
    }
    Ok(())
}

/// The NCCL wait path on a collective that never finishes (see the module doc).
fn nccl_timeout(out: &std::path::Path) -> Result<()> {
    let timeout = Duration::from_secs(5);
    let pg = ProcessGroup::from_env(Backend::Nccl, timeout)?;
    let local: usize = std::env::var("LOCAL_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    let dev = Device::Cuda(local);
    let t = Tensor::ones([1024], (Kind::Float, dev));
    pg.all_reduce(&t, ReduceOp::Sum)
        .context("a normal all_reduce first")?;
    tch::Cuda::synchronize(local as i64);
    if let Err(why) = block_stream(local as i32) {
        println!("SKIP nccl-timeout: {why}");
        return Ok(());
    }
    let started = Instant::now();
    let err = match pg.all_reduce(&t, ReduceOp::Sum) {
        Ok(()) => bail!("an all_reduce that cannot finish returned Ok"),
        Err(e) => e.to_string(),
    };
    let secs = started.elapsed().as_secs_f64();
    if !err.contains("no progress for 5 s") || !(5.0..30.0).contains(&secs) {
        bail!("expected a timeout error after 5-30 s, got after {secs:.1} s: {err}");
    }
    let later = match pg.barrier() {
        Ok(()) => bail!("a barrier after the failure returned Ok"),
        Err(e) => e.to_string(),
    };
    if !later.contains("after an earlier collective failed") {
        bail!("a later op must fail with the first error, got: {later}");
    }
    let report = format!("error after {secs:.1} s: {err}\nlater op: {later}\n");
    std::fs::write(out.join("nccl-timeout.txt"), &report)?;
    println!("dist-selftest: nccl timeout path OK: {report}");
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // SAFETY: leave without CUDA's exit-time teardown, which could wait on the blocked stream.
    unsafe { libc::_exit(0) }
}
