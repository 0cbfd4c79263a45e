//! kernels: custom CUDA kernels, compiled at run time by NVRTC from sources embedded in the binary,
//! launched with cudarc on libtorch's current stream. Every kernel has a slow reference.
//!
//! Module index:
//! - `cuda_libs`:  finds NVRTC / the CUDA driver (torch wheel folders) and loads them without panics
//! - `compile`:    NVRTC -> PTX, cached on disk by (source hash, arch, NVRTC version)
//! - `runtime`:    CUDA context, modules, libtorch's current stream, kernel launch
//! - `attention`:  FlashAttention-2 style forward/backward (`attention::fused_*`) and the fp64 reference
//! - `rmsnorm`:    fused RMSNorm forward/backward and its reference
//! - `tma`:        TMA tensor maps for the warp-specialized attention forward (variant 7)
pub mod attention;
pub mod compile;
pub mod cuda_libs;
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
