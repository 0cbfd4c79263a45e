//! kernels: custom CUDA kernels, compiled at run time by NVRTC from sources embedded in the binary,
//! launched with cudarc on libtorch's current stream. Every kernel has a slow reference.
//!
//! Module index:
//! - `cuda_libs`:  finds NVRTC / the CUDA driver (torch wheel folders) and loads them without panics
//! - `compile`:    NVRTC -> PTX, cached on disk by (source hash, arch, NVRTC version)
//! - `runtime`:    CUDA context, modules, libtorch's current stream, kernel launch
//! - `attention`:  FlashAttention-2 style forward/backward (`attention::fused_*`) and the fp64 reference
//! - `rmsnorm`:    fused RMSNorm forward/backward and its reference
//! - `mask_cells`: which tiles of a masked attention call need no per-element masking
//! - `tma`:        TMA tensor maps for the warp-specialized attention forward (variant 7)
pub mod attention;
pub mod compile;
pub mod cuda_libs;
pub mod mask_cells;
pub mod rmsnorm;
pub mod runtime;
pub mod tma;

/// Everything that can go wrong in this crate. Messages name what was searched or what to change.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{lib} was not found (searched: {searched}); run `make setup` (the torch wheel ships it) or set LLAVA_SCO_CUDA_LIB_DIRS")]
    LibraryMissing { lib: &'static str, searched: String },
    #[error("NVRTC failed to compile {source_name} for {arch}:\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    #[error("CUDA driver error in {what}: {detail}")]
    Driver { what: String, detail: String },
    #[error("{0}")]
    Unsupported(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("kernel cache at {path}: {detail}")]
    Cache { path: String, detail: String },
}

pub type Result<T> = std::result::Result<T, KernelError>;

/// Every tensor a kernel reaches through a raw pointer must live on the launching device (another
/// device's pointer faults, or silently reads a peer's memory).
pub(crate) fn same_device(device: tch::Device, tensors: &[(&str, &tch::Tensor)]) -> Result<()> {
    for (what, t) in tensors {
        if t.device() != device {
            return Err(KernelError::Invalid(format!(
                "{what} is on {:?} but the call runs on {device:?}; move it there first",
                t.device()
            )));
        }
    }
    Ok(())
}

/// `t` as a contiguous tensor whose data starts 16-byte aligned, as the kernels' 16-byte vector
/// accesses need: `t` itself when it already is, else a fresh copy (`contiguous()` alone keeps a
/// contiguous view whose storage offset breaks the alignment).
pub(crate) fn contiguous_aligned(t: &tch::Tensor) -> tch::Tensor {
    if t.is_contiguous() && (t.data_ptr() as usize).is_multiple_of(16) {
        return t.shallow_clone();
    }
    let mut fresh = tch::Tensor::empty(t.size(), (t.kind(), t.device()));
    fresh.copy_(t);
    fresh
}

/// One CUDA source file: its name and full text (common helpers prepended).
pub struct KernelSource {
    pub name: &'static str,
    pub text: String,
}

const COMMON: &str = include_str!("../cuda/common.cuh");

const ATTENTION: &str = include_str!("../cuda/attention.cu");

/// The Hopper-only source: attention.cu's helpers (masks, softmax pieces, loaders; not its
/// kernels) plus the wgmma forward of variant 4, compiled for compute_90a only (wgmma needs the
/// arch-specific target). Variant 4's backward is variant 3's, from attention.cu.
pub const SM90A_ATTENTION: &str = "attention_sm90a.cu";

/// Every kernel source, exactly as NVRTC compiles it.
pub fn sources() -> Vec<KernelSource> {
    // attention.cu's helpers without its kernels (each module is JIT-compiled whole on load)
    let sm90a = format!(
        "#define ATTN_HELPERS_ONLY\n{ATTENTION}\n{}\n{}",
        include_str!("../cuda/attention_sm90.cu"),
        include_str!("../cuda/attention_fwd_ws.cu")
    );
    [
        ("attention.cu", ATTENTION.to_string()),
        (SM90A_ATTENTION, sm90a),
        ("rmsnorm.cu", include_str!("../cuda/rmsnorm.cu").to_string()),
    ]
    .into_iter()
    .map(|(name, body)| KernelSource {
        name,
        text: format!("{COMMON}\n{body}"),
    })
    .collect()
}

/// The virtual arches `make kernels-check` compiles a source for.
pub fn check_arches(source: &str) -> &'static [&'static str] {
    if source == SM90A_ATTENTION {
        &["compute_90a"]
    } else {
        &compile::CHECK_ARCHES
    }
}

/// The arch to compile `source` for on a device of `device_arch` (e.g. "compute_90"): the
/// device's own, or its arch-specific "a" target for the Hopper-only source (an error elsewhere).
pub fn arch_for(source: &str, device_arch: &str) -> Result<String> {
    if source != SM90A_ATTENTION {
        return Ok(device_arch.to_string());
    }
    if device_arch == "compute_90" {
        Ok("compute_90a".into())
    } else {
        Err(KernelError::Unsupported(format!(
            "{source} needs a Hopper GPU (compute_90), this one is {device_arch}"
        )))
    }
}

/// The source with the given file name.
pub fn source(name: &str) -> Result<KernelSource> {
    sources()
        .into_iter()
        .find(|s| s.name == name)
        .ok_or_else(|| KernelError::Invalid(format!("no kernel source named {name}")))
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    #[test]
    fn misaligned_contiguous_views_are_copied_to_aligned_memory() {
        let base = Tensor::arange(64, (Kind::BFloat16, Device::Cpu));
        let view = base.narrow(0, 1, 32); // contiguous, 2 bytes past an aligned start
        assert!(view.is_contiguous());
        assert!(!(view.data_ptr() as usize).is_multiple_of(16));
        let fixed = super::contiguous_aligned(&view);
        assert!((fixed.data_ptr() as usize).is_multiple_of(16) && fixed.is_contiguous());
        assert!(fixed.equal(&view));
        // an aligned contiguous tensor is used as it is
        let same = super::contiguous_aligned(&base);
        assert_eq!(same.data_ptr(), base.data_ptr());
        // a strided view becomes contiguous
        let t = Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)).tr();
        assert!(super::contiguous_aligned(&t).is_contiguous());
    }

    #[test]
    fn tensors_on_another_device_are_named() {
        let t = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        assert!(super::same_device(Device::Cpu, &[("k", &t)]).is_ok());
        let err = super::same_device(Device::Cuda(0), &[("k", &t), ("v", &t)])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("k is on Cpu") && err.contains("Cuda(0)"),
            "{err}"
        );
    }
}
