//! Finding the CUDA libraries without panics.
//!
//! cudarc loads libraries by name and panics when none is found, so we check first and, where the
//! system loader cannot see them, load them ourselves by absolute path from the torch wheel's
//! `nvidia/*/lib` folders: once a library is loaded, cudarc's later `dlopen` by the same soname
//! finds it. Search order: `LLAVA_SCO_CUDA_LIB_DIRS` (colon-separated), the wheel next to the
//! libtorch this process has loaded (read from /proc/self/maps), then the `.venv` of the checkout
//! this crate was built in (`make setup` writes `.venv/cuda-lib-dirs.txt`).
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::{KernelError, Result};

/// Candidate folders holding libnvrtc / libnccl, in search order, deduplicated.
pub fn cuda_lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("LLAVA_SCO_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&v));
    }
    if let Some(torch_lib) = loaded_libtorch_dir() {
        // torch/lib -> site-packages -> nvidia/<pkg>/lib
        if let Some(site) = torch_lib.parent().and_then(Path::parent) {
            if let Ok(entries) = std::fs::read_dir(site.join("nvidia")) {
                let mut found: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path().join("lib"))
                    .filter(|p| p.is_dir())
                    .collect();
                found.sort();
                dirs.extend(found);
            }
        }
    }
    if let Some(venv) = option_env!("LLAVA_SCO_VENV") {
        if let Ok(text) = std::fs::read_to_string(Path::new(venv).join("cuda-lib-dirs.txt")) {
            dirs.extend(text.lines().filter(|l| !l.is_empty()).map(PathBuf::from));
        }
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    dirs
}

/// The folder of the libtorch this process has mapped, if any.
fn loaded_libtorch_dir() -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so") || p.ends_with("/libc10.so"))
        .and_then(|p| Path::new(p).parent().map(Path::to_path_buf))
}

fn dlopen_global(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: dlopen with a valid C string; the handle is intentionally never closed.
    !unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null()
}

/// The files of `dir` whose names start with one of `prefixes`, sorted.
fn files_with_prefix(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            prefixes.iter().any(|p| name.starts_with(p))
        })
        .map(|e| e.path())
        .collect();
    found.sort();
    found
}

/// Loads `soname` from the search folders unless the system loader already finds it.
/// Returns the folders searched on failure.
/// Files starting with one of `companion_prefixes` are loaded first from the same folder (libnvrtc
/// opens libnvrtc-builtins by a soname that carries the minor version, e.g. `.so.13.0`).
fn ensure_loaded(
    soname: &str,
    companion_prefixes: &[&str],
    system_visible: impl Fn() -> bool,
) -> std::result::Result<(), String> {
    if system_visible() {
        return Ok(());
    }
    let dirs = cuda_lib_dirs();
    for d in &dirs {
        let candidate = d.join(soname);
        if !candidate.exists() {
            continue;
        }
        for companion in files_with_prefix(d, companion_prefixes) {
            dlopen_global(&companion);
        }
        if dlopen_global(&candidate) && system_visible() {
            return Ok(());
        }
    }
    let mut searched: Vec<String> = vec!["the system library path".into()];
    searched.extend(dirs.iter().map(|d| d.display().to_string()));
    Err(searched.join(", "))
}

/// NVRTC (from the torch wheel's nvidia/cu13/lib when the system has none). cudarc tries
/// `libnvrtc.so` before `libnvrtc.so.13`, so a CUDA toolkit's on the library path wins over the
/// wheel's: its version is checked (`nvrtc_verdict`).
pub fn ensure_nvrtc() -> Result<()> {
    enum Failure {
        Missing(String),
        TooOld(String),
    }
    static DONE: OnceLock<std::result::Result<(), Failure>> = OnceLock::new();
    let done = DONE.get_or_init(|| {
        // SAFETY: is_culib_present only tries dlopen on candidate names.
        ensure_loaded("libnvrtc.so.13", &["libnvrtc-builtins.so.13."], || unsafe {
            cudarc::nvrtc::sys::is_culib_present()
        })
        .map_err(Failure::Missing)?;
        let (mut major, mut minor) = (0, 0);
        // SAFETY: plain out-parameters; the library is loaded (above).
        let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        if status.result().is_err() {
            return Ok(()); // (the compile reports what is wrong)
        }
        let path = loaded_nvrtc_path().unwrap_or_else(|| "libnvrtc".into());
        match nvrtc_verdict(major, minor, &path) {
            Ok(Some(note)) => {
                tracing::warn!("{note}");
                Ok(())
            }
            Ok(None) => Ok(()),
            Err(why) => Err(Failure::TooOld(why)),
        }
    });
    match done {
        Ok(()) => Ok(()),
        Err(Failure::Missing(searched)) => Err(KernelError::LibraryMissing {
            lib: "libnvrtc (NVRTC)",
            searched: searched.clone(),
        }),
        Err(Failure::TooOld(why)) => Err(KernelError::Unsupported(why.clone())),
    }
}

/// Whether the NVRTC found (`major.minor` at `path`) may compile the kernels: 13 (the torch
/// wheel's, which `make kernels-check` runs) is; 12 compiles them too (sm_90a since 12.0) and is
/// used with a note; older ones cannot compile the Hopper kernels.
fn nvrtc_verdict(
    major: i32,
    minor: i32,
    path: &str,
) -> std::result::Result<Option<String>, String> {
    let fix = "remove the CUDA toolkit's lib folder from LD_LIBRARY_PATH so that the torch wheel's NVRTC 13 (nvidia/cu13/lib) is used, or set model.attention: sdpa";
    match major {
        13.. => Ok(None),
        12 => Ok(Some(format!(
            "NVRTC {major}.{minor} ({path}) compiles the fused kernels; they are checked with NVRTC 13: {fix}"
        ))),
        _ => Err(format!(
            "NVRTC {major}.{minor} ({path}) is too old for the fused kernels (12 or newer): {fix}"
        )),
    }
}

/// Why the driver refused the kernels' PTX as too new (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`): an
/// NVRTC newer than the driver (a CUDA toolkit's, found before the torch wheel's) wrote it.
/// `driver`: `cuDriverGetVersion`'s 1000 * major + 10 * minor.
pub fn ptx_too_new(nvrtc: Option<((i32, i32), String)>, driver: Option<i32>) -> String {
    let made_by = match nvrtc {
        Some(((major, minor), path)) => format!("NVRTC {major}.{minor} ({path})"),
        None => "the NVRTC in use".into(),
    };
    let reads = match driver {
        Some(v) => format!("the driver's CUDA {}.{}", v / 1000, v % 1000 / 10),
        None => "the driver".into(),
    };
    format!(
        "the fused kernels' PTX, compiled by {made_by}, is newer than {reads} reads: use an NVRTC no newer than the driver (remove a CUDA toolkit's lib folder from LD_LIBRARY_PATH so that the torch wheel's is used), update the NVIDIA driver, or set model.attention: sdpa"
    )
}

/// The file the NVRTC that cudarc uses was loaded from (`dladdr` on its `nvrtcVersion`).
pub(crate) fn loaded_nvrtc_path() -> Option<String> {
    // SAFETY: the library is loaded (`ensure_loaded` above) and the symbol has this signature;
    // dladdr only reads the loader's tables for the address.
    unsafe {
        let lib = cudarc::nvrtc::sys::culib();
        let sym = lib
            .get::<unsafe extern "C" fn(*mut i32, *mut i32) -> i32>(b"nvrtcVersion\0")
            .ok()?;
        let addr = *sym as *const std::ffi::c_void;
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr(info.dli_fname)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// The CUDA driver (libcuda.so.1, installed with the NVIDIA driver; never in a wheel).
pub fn ensure_driver() -> Result<()> {
    // SAFETY: as above.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(KernelError::LibraryMissing {
            lib: "libcuda.so.1 (the NVIDIA driver)",
            searched: "the system library path".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC 13 is used as is, 12 with a note naming the file and the fix, older ones refused.
    #[test]
    fn the_nvrtc_found_is_checked() {
        assert_eq!(nvrtc_verdict(13, 0, "/w/libnvrtc.so.13"), Ok(None));
        let note = nvrtc_verdict(12, 4, "/usr/local/cuda/lib64/libnvrtc.so")
            .unwrap()
            .unwrap();
        assert!(
            note.contains("NVRTC 12.4 (/usr/local/cuda/lib64/libnvrtc.so)")
                && note.contains("LD_LIBRARY_PATH"),
            "{note}"
        );
        let err = nvrtc_verdict(11, 8, "/opt/cuda/libnvrtc.so").unwrap_err();
        assert!(
            err.contains("too old") && err.contains("attention: sdpa"),
            "{err}"
        );
    }

    /// PTX the driver finds too new names the NVRTC that wrote it, the driver's version and the fixes.
    #[test]
    fn ptx_too_new_names_both_versions_and_the_fix() {
        let nvrtc = Some((
            (13, 1),
            "/usr/local/cuda-13.1/lib64/libnvrtc.so".to_string(),
        ));
        let m = ptx_too_new(nvrtc, Some(13000));
        assert!(
            m.contains("NVRTC 13.1 (/usr/local/cuda-13.1/lib64/libnvrtc.so)")
                && m.contains("the driver's CUDA 13.0 reads")
                && m.contains("LD_LIBRARY_PATH")
                && m.contains("attention: sdpa"),
            "{m}"
        );
        assert!(ptx_too_new(None, Some(12080)).contains("CUDA 12.8"));
        assert!(ptx_too_new(None, None).contains("the NVRTC in use"));
    }

    #[test]
    fn companions_are_found_by_prefix_whatever_the_minor_version() {
        let dir = std::env::temp_dir().join(format!("cuda-libs-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for name in [
            "libnvrtc-builtins.so.13.1",
            "libnvrtc-builtins.alt.so.13.1",
            "libnvrtc.so.13",
        ] {
            std::fs::write(dir.join(name), b"").unwrap();
        }
        let found = files_with_prefix(&dir, &["libnvrtc-builtins.so.13."]);
        assert_eq!(found, vec![dir.join("libnvrtc-builtins.so.13.1")]);
        assert!(files_with_prefix(&dir.join("missing"), &["lib"]).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
