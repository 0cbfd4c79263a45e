//! Element types the collectives move, and the deterministic reduction over ranks' buffers:
//! each element is combined in rank order 0, 1, ..., W-1 (bf16/f16 accumulate in f32).
use half::{bf16, f16};
use tch::Kind;

use super::ReduceOp;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    F64,
    BF16,
    F16,
    I64,
}

impl Elem {
    pub fn of(kind: Kind) -> Option<Elem> {
        match kind {
            Kind::Float => Some(Elem::F32),
            Kind::Double => Some(Elem::F64),
            Kind::BFloat16 => Some(Elem::BF16),
            Kind::Half => Some(Elem::F16),
            Kind::Int64 => Some(Elem::I64),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F64 | Elem::I64 => 8,
            Elem::BF16 | Elem::F16 => 2,
        }
    }
}

/// Elements per block of the fast reduction: the f32/f64 accumulator lives on the stack.
const BLOCK: usize = 1024;

/// Float reduction, block by block: acc = src0; acc op= src1; ...; dst = acc (times 1/W for Avg).
/// Per element that is exactly the left fold in rank order of the slow reference below, but each
/// pass is a straight loop over one block, which the compiler vectorizes. A block of every source
/// is read before that block of `dst` is written, so `dst` may alias a source.
macro_rules! reduce_float {
    ($t:ty, $acc:ty, $to:expr, $from:expr, $srcs:expr, $dst:expr, $n:expr, $op:expr) => {{
        let world = $srcs.len();
        let scale = 1.0 as $acc / world as $acc;
        let mut acc = [0 as $acc; BLOCK];
        let mut start = 0;
        while start < $n {
            let len = BLOCK.min($n - start);
            let acc = &mut acc[..len];
            let src =
                |r: usize| std::slice::from_raw_parts(($srcs[r] as *const $t).add(start), len);
            // the first pass combines sources 0 and 1 (one pass less over the block: the same
            // operations in the same order)
            if world == 1 {
                for (a, &x) in acc.iter_mut().zip(src(0)) {
                    *a = $to(x);
                }
            } else {
                let s1 = src(1);
                match $op {
                    ReduceOp::Max => {
                        for ((a, &x), &y) in acc.iter_mut().zip(src(0)).zip(s1) {
                            *a = $to(x).max($to(y));
                        }
                    }
                    _ => {
                        for ((a, &x), &y) in acc.iter_mut().zip(src(0)).zip(s1) {
                            *a = $to(x) + $to(y);
                        }
                    }
                }
            }
            for r in 2..world {
                let s = src(r);
                match $op {
                    ReduceOp::Max => {
                        for (a, &x) in acc.iter_mut().zip(s) {
                            *a = a.max($to(x));
                        }
                    }
                    _ => {
                        for (a, &x) in acc.iter_mut().zip(s) {
                            *a += $to(x);
                        }
                    }
                }
            }
            let dst = std::slice::from_raw_parts_mut(($dst as *mut $t).add(start), len);
            if $op == ReduceOp::Avg {
                for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                    *d = $from(a * scale);
                }
            } else {
                for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                    *d = $from(a);
                }
            }
            start += len;
        }
    }};
}

/// dst[i] = op over r in 0..W of srcs[r][i], for `n` elements, combined in rank order 0..W-1
/// (bf16/f16 accumulate in f32 and round once; Avg multiplies the sum by 1/W).
///
/// # Safety
/// Every pointer must be valid for `n` elements of `elem` and aligned; `dst` may alias a source
/// exactly (same address), but must not partially overlap one.
pub unsafe fn reduce_into(elem: Elem, op: ReduceOp, srcs: &[*const u8], dst: *mut u8, n: usize) {
    if n == 0 || srcs.is_empty() {
        return;
    }
    match elem {
        Elem::F32 => reduce_float!(f32, f32, |x: f32| x, |x: f32| x, srcs, dst, n, op),
        Elem::F64 => reduce_float!(f64, f64, |x: f64| x, |x: f64| x, srcs, dst, n, op),
        Elem::BF16 => reduce_float!(
            bf16,
            f32,
            |x: bf16| x.to_f32(),
            bf16::from_f32,
            srcs,
            dst,
            n,
            op
        ),
        Elem::F16 => reduce_float!(
            f16,
            f32,
            |x: f16| x.to_f32(),
            f16::from_f32,
            srcs,
            dst,
            n,
            op
        ),
        Elem::I64 => {
            let mut acc = [0i64; BLOCK];
            let mut start = 0;
            while start < n {
                let len = BLOCK.min(n - start);
                let acc = &mut acc[..len];
                let src =
                    |r: usize| std::slice::from_raw_parts((srcs[r] as *const i64).add(start), len);
                acc.copy_from_slice(src(0));
                for r in 1..srcs.len() {
                    for (a, &x) in acc.iter_mut().zip(src(r)) {
                        *a = match op {
                            ReduceOp::Max => (*a).max(x),
                            _ => a.wrapping_add(x),
                        };
                    }
                }
                std::slice::from_raw_parts_mut((dst as *mut i64).add(start), len)
                    .copy_from_slice(acc);
                start += len;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow reference: one element at a time, in rank order, in f64 bits of the accumulator type.
    fn reference(elem: Elem, op: ReduceOp, srcs: &[Vec<u8>]) -> Vec<u8> {
        let es = elem.size();
        let n = srcs[0].len() / es;
        let mut out = Vec::with_capacity(n * es);
        let at = |r: usize, i: usize| &srcs[r][i * es..(i + 1) * es];
        for i in 0..n {
            macro_rules! fold {
                ($t:ty, $acc:ty, $to:expr, $from:expr) => {{
                    let get = |r: usize| -> $acc {
                        $to(<$t>::from_le_bytes(at(r, i).try_into().unwrap()))
                    };
                    let mut acc = get(0);
                    for r in 1..srcs.len() {
                        acc = if op == ReduceOp::Max {
                            acc.max(get(r))
                        } else {
                            acc + get(r)
                        };
                    }
                    if op == ReduceOp::Avg {
                        acc *= 1.0 as $acc / srcs.len() as $acc;
                    }
                    let v: $t = $from(acc);
                    out.extend_from_slice(&v.to_le_bytes());
                }};
            }
            match elem {
                Elem::F32 => fold!(f32, f32, |x| x, |x| x),
                Elem::F64 => fold!(f64, f64, |x| x, |x| x),
                Elem::BF16 => fold!(bf16, f32, |x: bf16| x.to_f32(), bf16::from_f32),
                Elem::F16 => fold!(f16, f32, |x: f16| x.to_f32(), f16::from_f32),
                Elem::I64 => {
                    let get = |r: usize| i64::from_le_bytes(at(r, i).try_into().unwrap());
                    let mut acc = get(0);
                    for r in 1..srcs.len() {
                        acc = if op == ReduceOp::Max {
                            acc.max(get(r))
                        } else {
                            acc.wrapping_add(get(r))
                        };
                    }
                    out.extend_from_slice(&acc.to_le_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn blocked_reduction_matches_the_element_by_element_reference_bitwise() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for elem in [Elem::F32, Elem::F64, Elem::BF16, Elem::F16, Elem::I64] {
            for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
                for (world, n) in [(1, 5), (2, 2 * BLOCK + 3), (3, BLOCK), (5, 77)] {
                    let es = elem.size();
                    // values of a moderate range in every type (random bits would be NaN/inf)
                    let srcs: Vec<Vec<u64>> = (0..world)
                        .map(|_| {
                            let mut v = vec![0u64; (n * es).div_ceil(8)];
                            let b = bytemuck_bytes(&mut v);
                            for i in 0..n {
                                let x = ((next() % 20001) as f64 - 10000.0) / 97.0;
                                let e = &mut b[i * es..(i + 1) * es];
                                match elem {
                                    Elem::F32 => e.copy_from_slice(&(x as f32).to_le_bytes()),
                                    Elem::F64 => e.copy_from_slice(&x.to_le_bytes()),
                                    Elem::BF16 => {
                                        e.copy_from_slice(&bf16::from_f64(x).to_le_bytes())
                                    }
                                    Elem::F16 => e.copy_from_slice(&f16::from_f64(x).to_le_bytes()),
                                    Elem::I64 => {
                                        e.copy_from_slice(&((x * 97.0) as i64).to_le_bytes())
                                    }
                                }
                            }
                            v
                        })
                        .collect();
                    let bytes: Vec<Vec<u8>> = srcs
                        .iter()
                        .map(|v| {
                            let mut v = v.clone();
                            bytemuck_bytes(&mut v)[..n * es].to_vec()
                        })
                        .collect();
                    let want = reference(elem, op, &bytes);
                    let mut out = vec![0u64; (n * es).div_ceil(8)];
                    let ptrs: Vec<*const u8> =
                        srcs.iter().map(|v| v.as_ptr() as *const u8).collect();
                    unsafe { reduce_into(elem, op, &ptrs, out.as_mut_ptr() as *mut u8, n) };
                    assert_eq!(
                        &bytemuck_bytes(&mut out)[..n * es],
                        &want[..],
                        "{elem:?} {op:?} world {world}"
                    );
                    // in place: dst aliases the last source
                    let mut srcs = srcs;
                    let last = srcs.len() - 1;
                    let dst = srcs[last].as_mut_ptr() as *mut u8;
                    unsafe { reduce_into(elem, op, &ptrs, dst, n) };
                    assert_eq!(
                        &bytemuck_bytes(&mut srcs[last])[..n * es],
                        &want[..],
                        "{elem:?} {op:?} world {world} in place"
                    );
                }
            }
        }
    }

    fn bytemuck_bytes(v: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64 storage viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 8) }
    }

    #[test]
    fn bf16_sums_accumulate_in_f32_and_round_once() {
        // 1 + 2^-9 + 2^-9 in bf16 steps would round each time; in f32 it rounds once.
        let a = [bf16::from_f32(1.0)];
        let b = [bf16::from_f32(2f32.powi(-9))];
        let c = [bf16::from_f32(2f32.powi(-9))];
        let mut out = [bf16::ZERO];
        let srcs = [
            a.as_ptr() as *const u8,
            b.as_ptr() as *const u8,
            c.as_ptr() as *const u8,
        ];
        unsafe {
            reduce_into(
                Elem::BF16,
                ReduceOp::Sum,
                &srcs,
                out.as_mut_ptr() as *mut u8,
                1,
            )
        };
        assert_eq!(out[0], bf16::from_f32(1.0 + 2f32.powi(-8)));
    }

    #[test]
    fn max_and_avg() {
        let a = [1.0f32, -3.0];
        let b = [2.0f32, -5.0];
        let srcs = [a.as_ptr() as *const u8, b.as_ptr() as *const u8];
        let mut out = [0f32; 2];
        unsafe {
            reduce_into(
                Elem::F32,
                ReduceOp::Max,
                &srcs,
                out.as_mut_ptr() as *mut u8,
                2,
            )
        };
        assert_eq!(out, [2.0, -3.0]);
        unsafe {
            reduce_into(
                Elem::F32,
                ReduceOp::Avg,
                &srcs,
                out.as_mut_ptr() as *mut u8,
                2,
            )
        };
        assert_eq!(out, [1.5, -4.0]);
    }
}
