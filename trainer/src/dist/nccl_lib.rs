//! libnccl, loaded by us rather than by cudarc's loader. cudarc opens `libnccl.so` and
//! `libnccl.so.<CUDA major>` (and a few older majors) by bare name, but NCCL's soname is
//! `libnccl.so.2`, the only name the PyPI wheel (nvidia-nccl-cu13) ships: with a stock torch
//! install cudarc finds nothing (it needed a `libnccl.so` link on the loader path). Here the
//! library is found by its real names on the system path, then in the torch wheel's
//! `nvidia/*/lib` folders (the same search as NVRTC: `kernels::cuda_libs::cuda_lib_dirs`), and the
//! few entry points the NCCL engine calls are resolved from it. cudarc's `nccl::sys` supplies
//! the C types only.
use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use cudarc::nccl::sys as nsys;

type R = nsys::ncclResult_t;
type Comm = nsys::ncclComm_t;
type Stream = nsys::cudaStream_t;
type DataType = nsys::ncclDataType_t;
type RedOp = nsys::ncclRedOp_t;

/// The NCCL entry points the engine uses (signatures as in nccl.h).
pub(crate) struct Nccl {
    /// Where the library was found (for messages).
    pub path: String,
    pub get_version: unsafe extern "C" fn(*mut c_int) -> R,
    pub get_unique_id: unsafe extern "C" fn(*mut nsys::ncclUniqueId) -> R,
    pub comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, nsys::ncclUniqueId, c_int) -> R,
    pub comm_abort: unsafe extern "C" fn(Comm) -> R,
    pub comm_destroy: unsafe extern "C" fn(Comm) -> R,
    pub comm_get_async_error: unsafe extern "C" fn(Comm, *mut R) -> R,
    pub all_gather:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, DataType, Comm, Stream) -> R,
    pub reduce_scatter:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, DataType, RedOp, Comm, Stream) -> R,
    pub all_reduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, DataType, RedOp, Comm, Stream) -> R,
    pub broadcast:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, DataType, c_int, Comm, Stream) -> R,
    /// Keeps the function pointers above valid for the process.
    _lib: libloading::Library,
}

const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The library's candidate paths, in search order: bare names (the system loader's path, and a
/// copy libtorch already loaded), then each wheel folder.
fn candidates() -> Vec<String> {
    let mut out: Vec<String> = NAMES.iter().map(|n| n.to_string()).collect();
    for dir in kernels::cuda_libs::cuda_lib_dirs() {
        for n in NAMES {
            let p = dir.join(n);
            if p.exists() {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

fn open(path: &str) -> Option<Nccl> {
    // SAFETY: loading NCCL runs its (side-effect free) initializers; the symbols are resolved with
    // the signatures nccl.h declares and kept alive with the library.
    unsafe {
        let lib = libloading::Library::new(path).ok()?;
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name).ok()?
            };
        }
        Some(Nccl {
            path: path.to_string(),
            get_version: sym!(b"ncclGetVersion\0"),
            get_unique_id: sym!(b"ncclGetUniqueId\0"),
            comm_init_rank: sym!(b"ncclCommInitRank\0"),
            comm_abort: sym!(b"ncclCommAbort\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            comm_get_async_error: sym!(b"ncclCommGetAsyncError\0"),
            all_gather: sym!(b"ncclAllGather\0"),
            reduce_scatter: sym!(b"ncclReduceScatter\0"),
            all_reduce: sym!(b"ncclAllReduce\0"),
            broadcast: sym!(b"ncclBroadcast\0"),
            _lib: lib,
        })
    }
}

/// libnccl, loaded once; the error lists every place searched.
pub(crate) fn nccl() -> Result<&'static Nccl, String> {
    static LIB: OnceLock<Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| {
        let tried = candidates();
        tried
            .iter()
            .find_map(|p| open(p))
            .ok_or_else(|| {
                format!(
                    "libnccl was not found (searched: {}, and every folder in LLAVA_SCO_CUDA_LIB_DIRS); install NCCL (pip's nvidia-nccl-cu13 comes with torch) or point LLAVA_SCO_CUDA_LIB_DIRS at the folder holding libnccl.so.2",
                    tried.join(", ")
                )
            })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// `Ok` for ncclSuccess, else an error naming the call and NCCL's result code.
pub(crate) fn check(r: R, what: &str) -> Result<(), String> {
    if matches!(r, nsys::ncclResult_t::ncclSuccess) {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With `make setup`'s torch wheel (nvidia-nccl-cu13 ships only libnccl.so.2), NCCL loads and
    /// reports its version without any `libnccl.so` link; hosts without the wheel get a message
    /// naming the searched places.
    #[test]
    fn loads_the_wheels_libnccl_so_2_or_says_where_it_looked() {
        match nccl() {
            Ok(lib) => {
                let mut v = 0;
                // SAFETY: out-parameter.
                check(unsafe { (lib.get_version)(&mut v) }, "ncclGetVersion").unwrap();
                assert!(v >= 20000, "NCCL version code {v} from {}", lib.path);
                println!("NCCL {v} from {}", lib.path);
            }
            Err(e) => {
                assert!(
                    e.contains("libnccl.so.2") && e.contains("LLAVA_SCO_CUDA_LIB_DIRS"),
                    "{e}"
                );
                println!("SKIP (no NCCL here): {e}");
            }
        }
    }
}
