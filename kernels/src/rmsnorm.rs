//! Fused RMSNorm (`cuda/rmsnorm.cu`) and its reference. x (..., C) bf16/fp16 with C % 8 == 0,
//! weight (C) of the same dtype. Forward keeps rstd (rows) in fp32 for the backward.
use std::ffi::c_void;

use tch::{Device, Kind, Tensor};

use crate::{runtime, KernelError, Result};

const THREADS: u32 = 256;
const ROWS_PER_BLOCK: i64 = 32;

fn check(x: &Tensor, w: &Tensor) -> Result<(&'static runtime::Gpu, &'static str, i64, i64)> {
    // (the arguments first, the device last: a bad call is the same error on every machine)
    let name = match x.kind() {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        other => {
            return Err(KernelError::Unsupported(format!(
                "fused RMSNorm takes bf16 or fp16, got {other:?}"
            )))
        }
    };
    let c = *x.size().last().unwrap_or(&0);
    if c == 0 || c % 8 != 0 || w.size() != [c] || w.kind() != x.kind() {
        return Err(KernelError::Invalid(format!("RMSNorm needs x (..., C) with C % 8 == 0 and weight (C) of x's dtype; got x {:?}, weight {:?} {:?}", x.size(), w.size(), w.kind())));
    }
    let n = x.numel() as i64 / c;
    // one block per row, and the kernels take the counts as i32
    if n > i32::MAX as i64 || c > i32::MAX as i64 {
        return Err(KernelError::Unsupported(format!(
            "RMSNorm of {n} rows of {c}: at most 2^31 - 1 rows and columns; split the input"
        )));
    }
    let gpu = match x.device() {
        Device::Cuda(i) => runtime::gpu(i as i32)?,
        other => {
            return Err(KernelError::Unsupported(format!(
                "fused RMSNorm needs CUDA tensors, got {other:?}"
            )))
        }
    };
    crate::same_device(x.device(), &[("weight", w)])?;
    Ok((gpu, name, n, c))
}

/// y = w * cast(x * rstd); returns (y, rstd (rows) fp32).
pub fn fused_forward(x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(KernelError::Invalid(format!(
            "RMSNorm eps must be finite and >= 0, got {eps}"
        )));
    }
    let (gpu, name, n, c) = check(x, w)?;
    let (x, w) = (crate::contiguous_aligned(x), crate::contiguous_aligned(w));
    let y = Tensor::empty(x.size(), (x.kind(), x.device()));
    let rstd = Tensor::empty([n], (Kind::Float, x.device()));
    if n == 0 {
        return Ok((y, rstd));
    }
    let f = gpu.function("rmsnorm.cu", &format!("rmsnorm_fwd_{name}"))?;
    let (mut xp, mut wp, mut yp, mut rp) = (
        x.data_ptr() as u64,
        w.data_ptr() as u64,
        y.data_ptr() as u64,
        rstd.data_ptr() as u64,
    );
    let (mut ni, mut ci, mut e) = (n as i32, c as i32, eps as f32);
    let mut args: [*mut c_void; 7] = [
        ptr(&mut xp),
        ptr(&mut wp),
        ptr(&mut yp),
        ptr(&mut rp),
        ptr(&mut ni),
        ptr(&mut ci),
        ptr(&mut e),
    ];
    // SAFETY: arguments match rmsnorm_fwd_*; tensors live until after the launch on the same stream.
    unsafe { gpu.launch(f, (n as u32, 1, 1), (THREADS, 1, 1), 0, &mut args)? };
    Ok((y, rstd))
}

/// Returns (dx, dw) with dw in the weight's dtype (accumulated in fp32).
pub fn fused_backward(
    dy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (gpu, name, n, c) = check(x, w)?;
    if dy.size() != x.size()
        || dy.kind() != x.kind()
        || rstd.kind() != Kind::Float
        || rstd.numel() != n as usize
    {
        return Err(KernelError::Invalid(format!(
            "RMSNorm backward needs dy shaped and typed like x ({:?} {:?}) and rstd ({n}) fp32 from the forward; got dy {:?} {:?}, rstd {:?} {:?}",
            x.size(),
            x.kind(),
            dy.size(),
            dy.kind(),
            rstd.size(),
            rstd.kind()
        )));
    }
    crate::same_device(x.device(), &[("dy", dy), ("rstd", rstd)])?;
    let (x, w, dy, rstd) = (
        crate::contiguous_aligned(x),
        crate::contiguous_aligned(w),
        crate::contiguous_aligned(dy),
        crate::contiguous_aligned(rstd),
    );
    let dx = Tensor::empty(x.size(), (x.kind(), x.device()));
    let dw = Tensor::zeros([c], (Kind::Float, x.device()));
    if n > 0 {
        let f = gpu.function("rmsnorm.cu", &format!("rmsnorm_bwd_{name}"))?;
        let mut p = [
            x.data_ptr() as u64,
            w.data_ptr() as u64,
            dy.data_ptr() as u64,
            rstd.data_ptr() as u64,
            dx.data_ptr() as u64,
            dw.data_ptr() as u64,
        ];
        let (mut ni, mut ci, mut rpb) = (n as i32, c as i32, ROWS_PER_BLOCK as i32);
        let [a, b, cc, d, e, f6] = &mut p;
        let mut args: [*mut c_void; 9] = [
            ptr(a),
            ptr(b),
            ptr(cc),
            ptr(d),
            ptr(e),
            ptr(f6),
            ptr(&mut ni),
            ptr(&mut ci),
            ptr(&mut rpb),
        ];
        let blocks = ((n + ROWS_PER_BLOCK - 1) / ROWS_PER_BLOCK) as u32;
        // the weight gradient's partial sums: C floats of shared memory per block
        let shared = u32::try_from(c * 4)
            .ok()
            .filter(|&b| i64::from(b) <= gpu.max_shared_optin)
            .ok_or_else(|| {
                KernelError::Unsupported(format!(
                    "fused RMSNorm backward over {c} columns needs {} bytes of shared memory per block; GPU {} allows {} (at most {} columns): use the unfused norm",
                    c * 4,
                    gpu.ordinal,
                    gpu.max_shared_optin,
                    gpu.max_shared_optin / 4
                ))
            })?;
        // SAFETY: arguments match rmsnorm_bwd_*; dynamic shared memory holds C floats.
        unsafe { gpu.launch(f, (blocks, 1, 1), (THREADS, 1, 1), shared, &mut args)? };
    }
    Ok((dx, dw.to_kind(x.kind())))
}

fn ptr<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
}

/// Reference in fp64 (differentiable): w * (x / sqrt(mean(x^2) + eps)).
pub fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let x = x.to_kind(Kind::Double);
    let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Double);
    w.to_kind(Kind::Double) * (&x * (var + eps).rsqrt())
}
