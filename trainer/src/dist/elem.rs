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

/// Float reduction of one element stream, accumulating in `f32`/`f64` as `$acc`.
macro_rules! reduce_float {
    ($t:ty, $acc:ty, $to:expr, $from:expr, $srcs:expr, $dst:expr, $n:expr, $op:expr, $world:expr) => {{
        let srcs: Vec<&[$t]> = $srcs
            .iter()
            .map(|&p| std::slice::from_raw_parts(p as *const $t, $n))
            .collect();
        let dst = std::slice::from_raw_parts_mut($dst as *mut $t, $n);
        let scale = 1.0 as $acc / $world as $acc;
        for i in 0..$n {
            let mut acc: $acc = $to(srcs[0][i]);
            for s in &srcs[1..] {
                let v: $acc = $to(s[i]);
                acc = match $op {
                    ReduceOp::Max => acc.max(v),
                    _ => acc + v,
                };
            }
            if $op == ReduceOp::Avg {
                acc *= scale;
            }
            dst[i] = $from(acc);
        }
    }};
}

/// dst[i] = op over r in 0..W of srcs[r][i], for `n` elements.
///
/// # Safety
/// Every pointer must be valid for `n` elements of `elem`, aligned, and `dst` must not overlap a
/// source that is read after `dst` is written at the same index (aliasing `dst == srcs[k]` is fine:
/// each index is read fully before it is written).
pub unsafe fn reduce_into(elem: Elem, op: ReduceOp, srcs: &[*const u8], dst: *mut u8, n: usize) {
    let world = srcs.len();
    match elem {
        Elem::F32 => reduce_float!(f32, f32, |x: f32| x, |x: f32| x, srcs, dst, n, op, world),
        Elem::F64 => reduce_float!(f64, f64, |x: f64| x, |x: f64| x, srcs, dst, n, op, world),
        Elem::BF16 => reduce_float!(
            bf16,
            f32,
            |x: bf16| x.to_f32(),
            bf16::from_f32,
            srcs,
            dst,
            n,
            op,
            world
        ),
        Elem::F16 => reduce_float!(
            f16,
            f32,
            |x: f16| x.to_f32(),
            f16::from_f32,
            srcs,
            dst,
            n,
            op,
            world
        ),
        Elem::I64 => {
            let srcs: Vec<&[i64]> = srcs
                .iter()
                .map(|&p| std::slice::from_raw_parts(p as *const i64, n))
                .collect();
            let dst = std::slice::from_raw_parts_mut(dst as *mut i64, n);
            for i in 0..n {
                let mut acc = srcs[0][i];
                for s in &srcs[1..] {
                    acc = match op {
                        ReduceOp::Max => acc.max(s[i]),
                        _ => acc.wrapping_add(s[i]),
                    };
                }
                dst[i] = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
