//! CUDA runtime side: one context per device (the primary context, the one libtorch uses), modules
//! compiled on first use, and launches on libtorch's *current* stream so kernels are ordered with
//! libtorch's own work without host syncs.
//!
//! The stream: libtorch_cuda exports the C shim `aoti_torch_get_current_cuda_stream(device, &stream)`
//! (torch 2.11). We look it up with dlsym at run time, so a CPU-only libtorch still links; when it
//! is absent we fall back to the legacy NULL stream, which synchronizes with every blocking stream
//! libtorch uses by default.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::result as drv;
use cudarc::driver::sys;

use crate::{compile, cuda_libs, KernelError, Result};

fn driver_err(what: &str) -> impl Fn(drv::DriverError) -> KernelError + '_ {
    move |e| KernelError::Driver {
        what: what.to_string(),
        detail: format!("{e:?}"),
    }
}

/// A loaded function handle. Driver handles may be used from any thread.
#[derive(Clone, Copy)]
pub struct Function(sys::CUfunction);
// SAFETY: CUfunction handles are process-wide and thread-safe in the driver API.
unsafe impl Send for Function {}
unsafe impl Sync for Function {}

/// Per-device state: the primary context, its compute arch and the functions loaded so far.
pub struct Gpu {
    pub ordinal: i32,
    pub arch: String,
    pub name: String,
    pub multiprocessors: i32,
    /// L2 cache bytes.
    pub l2_bytes: i64,
    /// Shared memory one block may use when its kernel opts in, bytes.
    pub max_shared_optin: i64,
    ctx: usize, // sys::CUcontext as an integer, so the struct is Send + Sync
    functions: Mutex<HashMap<(String, String), Function>>,
    modules: Mutex<HashMap<String, usize>>,
}

/// The GPU with this ordinal (initializing the driver and its primary context once).
pub fn gpu(ordinal: i32) -> Result<&'static Gpu> {
    static GPUS: OnceLock<Mutex<HashMap<i32, &'static Gpu>>> = OnceLock::new();
    let map = GPUS.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = map
        .lock()
        .map_err(|_| KernelError::Unsupported("GPU registry poisoned".into()))?;
    if let Some(g) = map.get(&ordinal) {
        return Ok(g);
    }
    cuda_libs::ensure_driver()?;
    drv::init().map_err(driver_err("cuInit"))?;
    let dev = drv::device::get(ordinal).map_err(driver_err("cuDeviceGet"))?;
    // SAFETY: valid device handle; the retained primary context lives for the process.
    let (ctx, major, minor, sms, l2, shared) = unsafe {
        let ctx = drv::primary_ctx::retain(dev).map_err(driver_err("cuDevicePrimaryCtxRetain"))?;
        let attr =
            |a| drv::device::get_attribute(dev, a).map_err(driver_err("cuDeviceGetAttribute"));
        (
            ctx,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
        )
    };
    let name = drv::device::get_name(dev).unwrap_or_else(|_| "unknown GPU".into());
    let g: &'static Gpu = Box::leak(Box::new(Gpu {
        ordinal,
        arch: format!("compute_{major}{minor}"),
        name,
        multiprocessors: sms,
        l2_bytes: l2 as i64,
        max_shared_optin: shared as i64,
        ctx: ctx as usize,
        functions: Mutex::new(HashMap::new()),
        modules: Mutex::new(HashMap::new()),
    }));
    map.insert(ordinal, g);
    Ok(g)
}

/// Whether the kernels run on a GPU of `arch` (`compute_{major}{minor}`): compute capability 8.0
/// or newer (`compute_100` is 10.0: compared as numbers, not as text).
fn kernels_run_on(arch: &str) -> bool {
    arch.trim_start_matches("compute_")
        .parse::<u32>()
        .is_ok_and(|c| c >= 80)
}

impl Gpu {
    /// Makes this device's primary context current on the calling thread (driver API calls need it).
    pub fn make_current(&self) -> Result<()> {
        // SAFETY: the context was retained in `gpu()` and is never released.
        unsafe { drv::ctx::set_current(self.ctx as sys::CUcontext) }
            .map_err(driver_err("cuCtxSetCurrent"))
    }

    /// The module of source file `source` (compiled and loaded on first use). The kernels need
    /// compute capability 8.0 (checked here, not in `gpu()`: the context and stream serve NCCL
    /// and SDPA runs on older GPUs too).
    fn module(&self, source: &str) -> Result<sys::CUmodule> {
        if !kernels_run_on(&self.arch) {
            return Err(KernelError::Unsupported(format!(
                "GPU {} ({}) has {}; the fused kernels need compute capability 8.0+ (use attention: sdpa)",
                self.ordinal, self.name, self.arch
            )));
        }
        self.make_current()?;
        let mut modules = self.modules.lock().map_err(|_| poisoned())?;
        Ok(match modules.get(source) {
            Some(m) => *m as sys::CUmodule,
            None => {
                let arch = crate::arch_for(source, &self.arch)?;
                let src = crate::source(source)?;
                let m = match load_ptx(compile::cached_ptx(&src, &arch)?) {
                    Ok(m) => m,
                    // PTX the driver cannot read (a damaged cache file): compile afresh (replacing
                    // it) and try once more; any other error (out of memory, an earlier fault) is
                    // not the file's and is reported as it is
                    Err(e) if ptx_unreadable(&e) => load_ptx(compile::recompile_ptx(&src, &arch)?)
                        .map_err(driver_err("cuModuleLoadData"))?,
                    Err(e) if e.0 == sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                        let mut driver = 0;
                        // SAFETY: a plain out-parameter.
                        let known = unsafe { sys::cuDriverGetVersion(&mut driver) }.result();
                        let nvrtc = compile::nvrtc_version().ok().map(|v| {
                            (
                                v,
                                cuda_libs::loaded_nvrtc_path().unwrap_or("libnvrtc".into()),
                            )
                        });
                        let why = cuda_libs::ptx_too_new(nvrtc, known.ok().map(|()| driver));
                        return Err(KernelError::Unsupported(why));
                    }
                    Err(e) => return Err(driver_err("cuModuleLoadData")(e)),
                };
                modules.insert(source.to_string(), m as usize);
                m
            }
        })
    }

    /// The kernel `name` from source file `source` (compiled and loaded on first use).
    pub fn function(&self, source: &str, name: &str) -> Result<Function> {
        let key = (source.to_string(), name.to_string());
        if let Some(f) = self.functions.lock().map_err(|_| poisoned())?.get(&key) {
            return Ok(*f);
        }
        let module = self.module(source)?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| KernelError::Invalid("kernel name contains NUL".into()))?;
        // SAFETY: valid module and name.
        let f = unsafe { drv::module::get_function(module, cname) }
            .map_err(driver_err("cuModuleGetFunction"))?;
        let f = Function(f);
        self.functions
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, f);
        Ok(f)
    }

    /// Reads the `__device__` array `name` of source file `source` into `out` after every kernel
    /// queued on libtorch's current stream has finished, then zeroes it (kernel development:
    /// counters a kernel leaves for the host).
    pub fn read_global_i64(&self, source: &str, name: &str, out: &mut [i64]) -> Result<()> {
        let module = self.module(source)?;
        let cname = std::ffi::CString::new(name)
            .map_err(|_| KernelError::Invalid("symbol name contains NUL".into()))?;
        // SAFETY: valid module and name.
        let (ptr, bytes) = unsafe { drv::module::get_global(module, cname) }
            .map_err(driver_err("cuModuleGetGlobal"))?;
        if bytes != std::mem::size_of_val(out) {
            return Err(KernelError::Invalid(format!(
                "{name} is {bytes} bytes on the device, {} expected",
                std::mem::size_of_val(out)
            )));
        }
        let stream = torch_current_stream(self.ordinal);
        // SAFETY: `ptr` is `bytes` bytes of device memory, the size of `out`; the stream is
        // synchronized first, so the copy sees every kernel queued before, and the zeroing is
        // ordered on the same stream before any later kernel.
        unsafe {
            drv::stream::synchronize(stream).map_err(driver_err("cuStreamSynchronize"))?;
            drv::memcpy_dtoh_sync(out, ptr).map_err(driver_err("cuMemcpyDtoH"))?;
            drv::memset_d8_async(ptr, 0, bytes, stream).map_err(driver_err("cuMemsetD8Async"))?;
            drv::stream::synchronize(stream).map_err(driver_err("cuStreamSynchronize"))?;
        }
        Ok(())
    }

    /// Registers per thread `f` starts with (the driver's JIT decides; a kernel that moves
    /// registers between warpgroups with setmaxnreg depends on this number).
    pub fn registers(&self, f: Function) -> Result<i32> {
        // SAFETY: a function handle from this context's modules.
        unsafe {
            drv::function::get_function_attribute(
                f.0,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NUM_REGS,
            )
        }
        .map_err(driver_err("cuFuncGetAttribute(registers)"))
    }

    /// Launches `f` on libtorch's current stream for this device.
    ///
    /// # Safety
    /// `params` must point to values whose types and order match the kernel's signature, and every
    /// device pointer in them must stay valid until the kernel has run (libtorch's caching
    /// allocator guarantees this for tensors kept alive until the launch returns, since later
    /// frees are ordered on the same stream).
    pub unsafe fn launch(
        &self,
        f: Function,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        self.make_current()?;
        if i64::from(shared_bytes) > self.max_shared_optin {
            return Err(KernelError::Unsupported(format!(
                "a launch needs {shared_bytes} bytes of shared memory per block; GPU {} ({}) allows {}",
                self.ordinal, self.name, self.max_shared_optin
            )));
        }
        if shared_bytes > 48 * 1024 {
            drv::function::set_function_attribute(
                f.0,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .map_err(driver_err("cuFuncSetAttribute(max dynamic shared memory)"))?;
        }
        let stream = torch_current_stream(self.ordinal);
        drv::launch_kernel(f.0, grid, block, shared_bytes, stream, params)
            .map_err(driver_err("cuLaunchKernel"))
    }
}

/// Loads a PTX image as a module that stays loaded for the process.
fn load_ptx(ptx: String) -> std::result::Result<sys::CUmodule, drv::DriverError> {
    let Ok(c) = std::ffi::CString::new(ptx) else {
        return Err(drv::DriverError(sys::CUresult::CUDA_ERROR_INVALID_PTX));
    };
    // SAFETY: NUL-terminated PTX image.
    unsafe { drv::module::load_data(c.as_ptr() as *const c_void) }
}

/// Whether the driver refused a PTX image as unreadable (what a damaged file gives).
fn ptx_unreadable(e: &drv::DriverError) -> bool {
    use sys::CUresult as R;
    matches!(
        e.0,
        R::CUDA_ERROR_INVALID_PTX | R::CUDA_ERROR_INVALID_IMAGE | R::CUDA_ERROR_INVALID_SOURCE
    )
}

fn poisoned() -> KernelError {
    KernelError::Unsupported("kernel registry poisoned by an earlier panic".into())
}

type GetStreamFn = unsafe extern "C" fn(i32, *mut *mut c_void) -> i32;

/// libtorch's current CUDA stream for `device`, or the NULL stream when the shim is unavailable.
pub fn torch_current_stream(device: i32) -> sys::CUstream {
    static SHIM: OnceLock<Option<GetStreamFn>> = OnceLock::new();
    let shim = SHIM.get_or_init(|| {
        // SAFETY: dlsym on the global namespace with a static NUL-terminated name.
        let sym = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"aoti_torch_get_current_cuda_stream".as_ptr()) };
        if sym.is_null() {
            tracing::warn!("libtorch does not export aoti_torch_get_current_cuda_stream; kernels run on the NULL stream");
            None
        } else {
            // SAFETY: the symbol has this C signature in torch 2.11 (torch/csrc/inductor/aoti_torch/c/shim.h).
            Some(unsafe { std::mem::transmute::<*mut c_void, GetStreamFn>(sym) })
        }
    });
    let mut stream: *mut c_void = std::ptr::null_mut();
    if let Some(f) = shim {
        // SAFETY: out-parameter of the documented signature.
        if unsafe { f(device, &mut stream) } != 0 {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!("aoti_torch_get_current_cuda_stream failed for device {device}; kernels run on the NULL stream, which does not order with libtorch's non-blocking streams")
            });
            stream = std::ptr::null_mut();
        }
    }
    stream as sys::CUstream
}

/// Whether a CUDA GPU is usable by both libtorch and the driver API.
pub fn cuda_available() -> bool {
    tch::Cuda::is_available() && cuda_libs::ensure_driver().is_ok()
}

#[cfg(test)]
mod tests {
    use super::kernels_run_on;

    #[test]
    fn kernels_need_compute_capability_8_0_or_newer() {
        for arch in [
            "compute_80",
            "compute_86",
            "compute_90",
            "compute_100",
            "compute_120",
        ] {
            assert!(kernels_run_on(arch), "{arch}");
        }
        for arch in ["compute_70", "compute_75", "", "sm_90"] {
            assert!(!kernels_run_on(arch), "{arch}");
        }
    }
}
