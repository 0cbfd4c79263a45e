//! Decode-time fast path of [`super::Linear`]: y = x W^T (+ b) for a few rows of x against a large
//! fp32 weight on the CPU.
//!
//! Why: one greedy decode step multiplies one row per sequence by every weight of the text decoder
//! and the LM head, so it is bound by the bytes of weight read (memory bandwidth), not by FLOPs.
//! libtorch sends (1, in) x (in, out) to MKL's sgemv, whose generic path reads 6.5-9.9 GB/s on
//! this machine's AMD cores while a plain AVX2 dot-product loop streams 10-12.5 GB/s on one
//! thread (`trainer bench decode`, BENCHMARKS.md), and MKL does not split a gemv over threads.
//! Here each weight row is one sequential stream dotted with the x rows held in registers, and the
//! output rows are split over libtorch's intra-op thread count on rayon's pool.
//!
//! libtorch's OpenMP workers spin for a while after each parallel region, and on a machine with as
//! many threads as cores they take the cores these threads need (2 threads: 21 vs 28-29 tokens/s
//! on the ~100M bench model). [`decode_scope`] therefore runs a decode step with libtorch at one
//! thread (its ops there are tiny) and gives the threads to this path.
//!
//! Used only where it pays and is safe: CPU, fp32, no autograd (neither input requires grad),
//! at most [`MAX_ROWS`] rows, a weight of at least [`MIN_WEIGHT_ELEMENTS`] (smaller ones sit in
//! cache and MKL is as fast), an x86-64 CPU with AVX2 and FMA. Anything else returns `None` and the
//! caller uses libtorch. The sums run in another order than MKL's, so results differ from it in
//! the last bits (tested against `Tensor::linear`).
use std::cell::Cell;

use tch::{Device, Kind, Tensor};

/// Rows of x (decode: one per sequence of the batch) up to which the fast path is used; up to
/// here the loop stays bound by the weight bytes (2 R FLOPs per 4-byte weight).
pub const MAX_ROWS: usize = 8;
/// Weights smaller than this (256 KiB of fp32; the fixture models' are 32 KiB) stay with libtorch.
pub const MIN_WEIGHT_ELEMENTS: i64 = 1 << 16;

thread_local! {
    /// Threads of the fast path inside a [`decode_scope`] (libtorch's own count is 1 there).
    static SCOPE_THREADS: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Threads the fast path uses now: those handed over by a [`decode_scope`], else libtorch's.
pub fn threads() -> usize {
    SCOPE_THREADS
        .get()
        .unwrap_or_else(|| tch::get_num_threads().max(1) as usize)
}

/// Runs one decode step of `rows` rows on `device`: when every large linear of it takes the fast
/// path (CPU, at most [`MAX_ROWS`] rows) and libtorch runs more than one thread, libtorch runs at
/// one thread inside and the fast path gets its threads (see the module doc); else `step()` as is.
pub fn decode_scope<T>(device: Device, rows: usize, step: impl FnOnce() -> T) -> T {
    let n = tch::get_num_threads();
    if device != Device::Cpu
        || rows > MAX_ROWS
        || n <= 1
        || !avx2_fma()
        || SCOPE_THREADS.get().is_some()
    {
        return step();
    }
    /// Restores libtorch's threads also when `step` unwinds.
    struct Restore(i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPE_THREADS.set(None);
            tch::set_num_threads(self.0);
        }
    }
    let _restore = Restore(n);
    SCOPE_THREADS.set(Some(n as usize));
    tch::set_num_threads(1);
    step()
}

/// `x.linear(w, bias)` for x (..., in) with at most [`MAX_ROWS`] rows and w (out, in), or None
/// when the fast path does not apply (see the module doc).
pub fn try_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, threads: usize) -> Option<Tensor> {
    if !applies(x, w, bias) {
        return None;
    }
    let (out, inp) = (w.size()[0], w.size()[1]);
    let rows = (x.numel() as i64) / inp;
    let x = x.contiguous();
    let bias = bias.map(Tensor::contiguous);
    let mut out_shape = x.size();
    *out_shape.last_mut().unwrap() = out;
    // (rows, out), uninitialized: gemv writes every element
    let y = Tensor::empty([rows, out], (Kind::Float, Device::Cpu));
    // SAFETY: x, w and bias are contiguous fp32 CPU tensors of the sizes used for the slices,
    // alive for this scope; y is fresh, of rows * out elements, and every one is written by gemv
    // through the raw pointer (no reference to its uninitialized memory is made).
    unsafe {
        let xs = std::slice::from_raw_parts(x.data_ptr() as *const f32, (rows * inp) as usize);
        let ws = std::slice::from_raw_parts(w.data_ptr() as *const f32, (out * inp) as usize);
        let bs = bias
            .as_ref()
            .map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, out as usize));
        gemv(
            xs,
            rows as usize,
            ws,
            inp as usize,
            bs,
            y.data_ptr() as *mut f32,
            threads,
        );
    }
    Some(y.reshape(out_shape))
}

fn applies(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    if !avx2_fma() || w.dim() != 2 || x.dim() == 0 {
        return false;
    }
    let cpu_f32 =
        |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu && !t.requires_grad();
    let inp = w.size()[1];
    let rows = if inp > 0 { x.numel() as i64 / inp } else { 0 };
    cpu_f32(x)
        && cpu_f32(w)
        && w.is_contiguous()
        && bias.is_none_or(|b| cpu_f32(b) && b.size() == [w.size()[0]])
        && x.size().last() == Some(&inp)
        && rows >= 1
        && rows as usize <= MAX_ROWS
        && w.numel() as i64 >= MIN_WEIGHT_ELEMENTS
}

fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Raw pointers of one call, shared by the threads (each writes its own output columns).
#[derive(Clone, Copy)]
struct Job {
    x: *const f32, // (rows, in)
    rows: usize,
    w: *const f32, // (out, in)
    inp: usize,
    bias: Option<*const f32>, // (out,)
    y: *mut f32,              // (rows, out)
    out: usize,
}
// SAFETY: the pointers outlive the rayon scope below, x/w/bias are only read, and the threads
// write disjoint output column ranges of y.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

/// y (rows, out) = x (rows, in) w^T (+ bias), output columns split over `threads`.
///
/// # Safety
/// `y` points to rows * out writable f32 (out = w.len() / in), which this writes, all of them.
unsafe fn gemv(
    x: &[f32],
    rows: usize,
    w: &[f32],
    inp: usize,
    bias: Option<&[f32]>,
    y: *mut f32,
    threads: usize,
) {
    let out = w.len() / inp;
    assert!(rows <= MAX_ROWS && x.len() == rows * inp && w.len() == out * inp);
    assert!(bias.is_none_or(|b| b.len() == out));
    let job = Job {
        x: x.as_ptr(),
        rows,
        w: w.as_ptr(),
        inp,
        bias: bias.map(<[f32]>::as_ptr),
        y,
        out,
    };
    let parts = threads.clamp(1, out.div_ceil(64));
    if parts == 1 {
        // SAFETY: the whole column range of a job built from valid slices
        unsafe { job.columns(0, out) };
        return;
    }
    let per = out.div_ceil(parts);
    // the calling thread takes part 0 itself: `parts` threads busy, not the caller waiting idle on
    // top of them (on a machine with as many threads as cores that oversubscribes)
    rayon::in_place_scope(|s| {
        for p in 1..parts {
            let (lo, hi) = (p * per, ((p + 1) * per).min(out));
            // SAFETY: disjoint column ranges of a job built from valid slices
            s.spawn(move |_| unsafe { job.columns(lo, hi) });
        }
        // SAFETY: as above
        unsafe { job.columns(0, per.min(out)) };
    });
}

impl Job {
    /// Output columns lo..hi of every row.
    unsafe fn columns(self, lo: usize, hi: usize) {
        #[cfg(target_arch = "x86_64")]
        match self.rows {
            1 => avx2::columns::<1, 4>(self, lo, hi),
            2 => avx2::columns::<2, 2>(self, lo, hi),
            3 => avx2::columns::<3, 2>(self, lo, hi),
            4 => avx2::columns::<4, 2>(self, lo, hi),
            5 => avx2::columns::<5, 1>(self, lo, hi),
            6 => avx2::columns::<6, 1>(self, lo, hi),
            7 => avx2::columns::<7, 1>(self, lo, hi),
            8 => avx2::columns::<8, 1>(self, lo, hi),
            _ => unreachable!("rows <= MAX_ROWS"),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the fast path is x86-64 only ({lo}..{hi})")
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Job;

    /// For each output column o in lo..hi: y[r, o] = sum_k x[r, k] w[o, k] (+ bias[o]) for the R
    /// rows, reading weight row o once as one sequential stream into A accumulators per x row
    /// (8 floats each), then a scalar tail for in % (8 A).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns<const R: usize, const A: usize>(job: Job, lo: usize, hi: usize) {
        let k = job.inp;
        let step = 8 * A;
        let main = k - k % step;
        for o in lo..hi {
            let wr = job.w.add(o * k);
            let mut acc = [[_mm256_setzero_ps(); A]; R];
            let mut i = 0;
            while i < main {
                for a in 0..A {
                    let wv = _mm256_loadu_ps(wr.add(i + 8 * a));
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_ps(job.x.add(r * k + i + 8 * a));
                        acc_r[a] = _mm256_fmadd_ps(wv, xv, acc_r[a]);
                    }
                }
                i += step;
            }
            for (r, acc_r) in acc.iter().enumerate() {
                let mut v = acc_r[0];
                for acc_ra in &acc_r[1..] {
                    v = _mm256_add_ps(v, *acc_ra);
                }
                let mut sum = hsum(v);
                for t in main..k {
                    sum += *job.x.add(r * k + t) * *wr.add(t);
                }
                if let Some(b) = job.bias {
                    sum += *b.add(o);
                }
                *job.y.add(r * job.out + o) = sum;
            }
        }
    }

    /// Sum of the 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)); // 4 lanes
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s)); // 2 lanes
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).abs().max().double_value(&[]);
        d / b.abs().max().double_value(&[]).max(1e-30)
    }

    #[test]
    fn equals_libtorch_linear_for_every_row_count_tail_bias_and_thread_count() {
        if !avx2_fma() {
            eprintln!("SKIP (no AVX2/FMA)");
            return;
        }
        tch::manual_seed(3);
        // in: a multiple of 32, of 16 (tail for A = 4 only), and an odd one (scalar tail)
        for (out, inp) in [(1024, 768), (600, 1040), (513, 1031)] {
            // (A = 4 for one row: tail at 32, A = 2: at 16, A = 1: at 8)
            let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu));
            let b = Tensor::randn([out], (Kind::Float, Device::Cpu));
            for rows in 1..=MAX_ROWS as i64 {
                let x = Tensor::randn([rows, 1, inp], (Kind::Float, Device::Cpu)); // (rows, 1, in)
                for threads in [1, 2, 3] {
                    for bias in [None, Some(&b)] {
                        let got = try_linear(&x, &w, bias, threads).expect("fast path applies");
                        let want = x.linear(&w, bias);
                        assert_eq!(got.size(), want.size());
                        let e = rel_err(&got, &want);
                        assert!(
                            e < 1e-5,
                            "out {out} in {inp} rows {rows} threads {threads}: {e}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_decode_scope_hands_libtorch_threads_to_the_fast_path_and_restores_them() {
        let before = tch::get_num_threads();
        tch::set_num_threads(2);
        let inside = decode_scope(Device::Cpu, 1, || (tch::get_num_threads(), threads()));
        if avx2_fma() {
            assert_eq!(inside, (1, 2));
        }
        assert_eq!(tch::get_num_threads(), 2);
        assert_eq!(threads(), 2);
        let too_many_rows = decode_scope(Device::Cpu, MAX_ROWS + 1, tch::get_num_threads);
        assert_eq!(
            too_many_rows, 2,
            "rows libtorch multiplies keep its threads"
        );
        let unwound = std::panic::catch_unwind(|| decode_scope(Device::Cpu, 1, || panic!("step")));
        assert!(unwound.is_err());
        assert_eq!(
            (tch::get_num_threads(), threads()),
            (2, 2),
            "restored after a panic"
        );
        tch::set_num_threads(before);
    }

    #[test]
    fn declines_what_it_does_not_cover() {
        let opts = (Kind::Float, Device::Cpu);
        let big = Tensor::randn([1024, 768], opts);
        let x = Tensor::randn([1, 768], opts);
        let none = |x: &Tensor, w: &Tensor| try_linear(x, w, None, 1).is_none();
        assert!(
            none(&Tensor::randn([MAX_ROWS as i64 + 1, 768], opts), &big),
            "too many rows"
        );
        assert!(none(&x, &Tensor::randn([64, 768], opts)), "small weight");
        assert!(none(&x, &big.to_kind(Kind::BFloat16)), "not fp32");
        assert!(
            none(&x.to_kind(Kind::Double), &big.to_kind(Kind::Double)),
            "not fp32"
        );
        assert!(none(&x.set_requires_grad(true), &big), "autograd");
        assert!(none(&x, &big.copy().set_requires_grad(true)), "autograd");
        assert!(none(&Tensor::randn([1, 700], opts), &big), "shape mismatch");
        assert!(
            none(&x, &Tensor::randn([768, 1024], opts).tr()),
            "a transposed weight is not copied"
        );
    }
}
