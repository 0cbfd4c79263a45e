//! NVRTC: kernel source -> PTX for one virtual arch, with warnings treated as errors, and a disk
//! cache keyed by (source hash, arch, NVRTC version) so a process compiles each kernel at most once
//! per machine.
use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::nvrtc::result as nvrtc;
use sha2::{Digest, Sha256};

use crate::{cuda_libs, KernelError, KernelSource, Result};

/// The arches CI compiles every kernel for (`make kernels-check`).
pub const CHECK_ARCHES: [&str; 2] = ["compute_80", "compute_90"];

fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
    ]
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    cuda_libs::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: plain out-parameters; the library is loaded (checked above).
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| KernelError::Compile {
        source_name: "-".into(),
        arch: "-".into(),
        log: format!("nvrtcVersion: {e:?}"),
    })?;
    Ok((major, minor))
}

fn c_text(raw: &[std::ffi::c_char]) -> String {
    if raw.is_empty() {
        return String::new();
    }
    // SAFETY: NVRTC returns NUL-terminated buffers.
    unsafe { CStr::from_ptr(raw.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string()
}

/// Compiles `src` to PTX for `arch` (e.g. "compute_90"). A non-empty log with a warning is an
/// error (what `make kernels-check` runs; at run time see `compile_ptx_for_run`).
pub fn compile_ptx(src: &KernelSource, arch: &str) -> Result<String> {
    compile(src, arch, true)
}

/// `compile_ptx` for a run: a warning (a newer NVRTC may warn where CI's did not) is logged once,
/// not fatal, so it cannot stop every rank at its first attention call.
pub fn compile_ptx_for_run(src: &KernelSource, arch: &str) -> Result<String> {
    compile(src, arch, false)
}

fn compile(src: &KernelSource, arch: &str, warnings_are_errors: bool) -> Result<String> {
    cuda_libs::ensure_nvrtc()?;
    let fail = |log: String| KernelError::Compile {
        source_name: src.name.to_string(),
        arch: arch.to_string(),
        log,
    };
    let text =
        CString::new(src.text.as_bytes()).map_err(|_| fail("source contains a NUL byte".into()))?;
    let name = CString::new(src.name).map_err(|_| fail("name contains a NUL byte".into()))?;
    let prog = nvrtc::create_program(&text, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    // SAFETY: `prog` is valid until destroy_program below; buffers are owned Vecs.
    let outcome = unsafe {
        let compiled = nvrtc::compile_program(prog, &options(arch));
        let log = nvrtc::get_program_log(prog)
            .map(|l| c_text(&l))
            .unwrap_or_default();
        let warned = log.contains("warning");
        if warned && !warnings_are_errors {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| tracing::warn!("NVRTC warned compiling {} for {arch} (kernels-check, with the torch wheel's NVRTC, does not):\n{log}", src.name));
        }
        let ptx = match compiled {
            Ok(()) if warned && warnings_are_errors => {
                Err(fail(format!("warnings are errors:\n{log}")))
            }
            Ok(()) => nvrtc::get_ptx(prog)
                .map(|p| c_text(&p))
                .map_err(|e| fail(format!("get_ptx: {e:?}"))),
            Err(e) => Err(fail(format!("{e:?}\n{log}"))),
        };
        let _ = nvrtc::destroy_program(prog);
        ptx
    };
    outcome
}

/// Where compiled PTX is kept: `LLAVA_SCO_KERNEL_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`,
/// then `/llava-sco/kernels`, else this user's folder in the temp dir (`temp_cache_dir`).
/// Values that are not absolute paths are ignored (as the XDG spec says: a relative one would put
/// the cache in each rank's working directory), and so is a folder this user cannot write (a
/// read-only home in a container): every start would compile again.
pub fn cache_dir() -> PathBuf {
    let absolute = |var: &str| {
        let p = std::env::var_os(var).map(PathBuf::from)?;
        if !p.is_absolute() {
            if var == "LLAVA_SCO_KERNEL_CACHE" && !p.as_os_str().is_empty() {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!("LLAVA_SCO_KERNEL_CACHE={} is not an absolute path: ignored (each rank would cache in its own working directory)", p.display()));
            }
            return None;
        }
        Some(p)
    };
    if let Some(d) = absolute("LLAVA_SCO_KERNEL_CACHE") {
        return d;
    }
    absolute("XDG_CACHE_HOME")
        .or_else(|| absolute("HOME").map(|h| h.join(".cache")))
        .map(|base| base.join("llava-sco").join("kernels"))
        .filter(|d| writable(d))
        .unwrap_or_else(temp_cache_dir)
}

/// Whether `dir` exists (made if missing) and this user may write into it.
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path.
    std::fs::create_dir_all(dir).is_ok() && unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0
}

/// The cache without a home folder: `<temp>/llava-sco-<uid>/kernels`. Other users can write the
/// temp dir, and PTX found there is loaded as device code: the folder is created private (0700)
/// and only used while it is this user's and nobody else can write it (`trusted`).
fn temp_cache_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    std::env::temp_dir()
        .join(format!("llava-sco-{uid}"))
        .join("kernels")
}

/// Whether cached PTX under `dir` may be read and written. PTX found there runs as this user's
/// device code, so the folder must be this user's and not writable by everyone (a cache under a
/// shared `HOME=/tmp` or `XDG_CACHE_HOME` could be another user's); in the temp-dir fallback,
/// its user folder must also be closed to the group (it is created so when missing).
fn trusted(dir: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    match dir.parent().filter(|_| dir == temp_cache_dir()) {
        Some(user_dir) => private_folder(user_dir, uid),
        None => {
            // (a folder named by LLAVA_SCO_KERNEL_CACHE that is not there yet is made, ours)
            let _ = std::fs::create_dir_all(dir);
            owned_and_not_world_writable(dir, uid)
        }
    }
}

/// Whether `dir` is a folder of `uid` that not everyone can write (group-writable folders of a
/// `umask 002` pass: the group is the user's own there).
fn owned_and_not_world_writable(dir: &Path, uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o002 == 0)
}

/// Creates `dir` (mode 0700) when missing; whether it is a real folder (not a link) of `uid`
/// that nobody else can write.
fn private_folder(dir: &Path, uid: u32) -> bool {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let _ = std::fs::DirBuilder::new().mode(0o700).create(dir);
    std::fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.mode() & 0o022 == 0)
}

/// The cache file name for (source, arch, NVRTC version).
pub fn cache_key(src: &KernelSource, arch: &str, version: (i32, i32)) -> String {
    let mut h = Sha256::new();
    h.update(src.text.as_bytes());
    h.update(options(arch).join(" ").as_bytes());
    let hex = hex(&h.finalize()[..8]);
    format!(
        "{}-{arch}-nvrtc{}.{}-{hex}.ptx",
        src.name.trim_end_matches(".cu"),
        version.0,
        version.1
    )
}

/// PTX from the disk cache, compiling (and caching atomically) on a miss. A cache that cannot be
/// written is not fatal: the PTX is still returned and a warning logged once.
pub fn cached_ptx(src: &KernelSource, arch: &str) -> Result<String> {
    let dir = cache_dir();
    if !trusted(&dir) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| {
            tracing::warn!(
                "kernel cache {} could not be made, is not this user's own folder, or everyone \
                 can write it (another user could plant PTX there): compiling without it; set \
                 LLAVA_SCO_KERNEL_CACHE to a folder of yours",
                dir.display()
            )
        });
        return compile_ptx_for_run(src, arch);
    }
    let path = dir.join(cache_key(src, arch, nvrtc_version()?));
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Some(ptx) = unsealed(&text) {
            return Ok(ptx.to_string());
        }
    }
    compile_and_cache(src, arch, &path)
}

/// The last line of a cache file: the hash of the PTX before it, so a file cut short (a crash
/// before its data reached the disk) is a miss, not a module without its last kernels.
fn seal(ptx: &str) -> String {
    format!("{ptx}\n{SEAL}{}\n", hex16(ptx))
}

/// The PTX of a sealed cache file, or None when the seal is missing or does not match.
fn unsealed(text: &str) -> Option<&str> {
    let body = text.strip_suffix('\n')?;
    let (ptx, last) = body.rsplit_once('\n')?;
    (last.strip_prefix(SEAL)? == hex16(ptx)).then_some(ptx)
}

const SEAL: &str = "// llava-sco kernel cache, sha256 of the above: ";

/// The first 16 bytes of `text`'s sha256, in hex.
fn hex16(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes())[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles afresh and replaces the cached copy (a cached file the driver refused to load).
pub fn recompile_ptx(src: &KernelSource, arch: &str) -> Result<String> {
    compile_and_cache(
        src,
        arch,
        &cache_dir().join(cache_key(src, arch, nvrtc_version()?)),
    )
}

/// Compiles and writes the PTX to the cache file `path`.
fn compile_and_cache(src: &KernelSource, arch: &str, path: &Path) -> Result<String> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let ptx = compile_ptx_for_run(src, arch)?;
    // unique per writer (process, call, time): two writers of one key (threads, or processes on
    // hosts sharing the cache folder) never write into the same file before the atomic rename
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!(
        "tmp{}.{}.{nanos}",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(seal(&ptx).as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    if let Err(e) = written {
        tracing::warn!(
            "kernel cache {} not writable ({e}); compiling on every start",
            dir.display()
        );
    }
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The temp-dir cache folder is created private and trusted only while private and ours: one
    /// that others can write, another user's, or a symlink is not used.
    /// A cache file cut short, or of another PTX, is a miss.
    #[test]
    fn cache_files_are_sealed() {
        let ptx = ".version 8.0\n.entry k()\n{\n}";
        let file = seal(ptx);
        assert_eq!(unsealed(&file), Some(ptx));
        assert_eq!(unsealed(&file[..file.len() - 5]), None, "cut short");
        assert_eq!(unsealed(&file[..20]), None);
        assert_eq!(unsealed(ptx), None, "an unsealed (older) file");
        assert_eq!(
            unsealed(&file.replace(".version 8.0", ".version 8.1")),
            None
        );
    }

    #[test]
    fn the_temp_cache_folder_must_be_private() {
        let root = std::env::temp_dir().join(format!("kcache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        let mine = root.join("mine");
        assert!(private_folder(&mine, uid), "created 0700 and ours");
        let mode = std::fs::metadata(&mine).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!private_folder(&mine, uid), "writable by others");
        std::fs::set_permissions(&mine, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(
            !private_folder(&mine, uid.wrapping_add(1)),
            "another user's"
        );
        let link = root.join("link");
        std::os::unix::fs::symlink(&mine, &link).unwrap();
        assert!(!private_folder(&link, uid), "a symlink");
        assert_eq!(temp_cache_dir().file_name().unwrap(), "kernels");
        std::fs::remove_dir_all(&root).unwrap();
    }

    /// Any other cache folder must be this user's and not writable by everyone.
    #[test]
    fn a_cache_folder_everyone_can_write_is_not_used() {
        let dir = std::env::temp_dir().join(format!("kcache-any-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(trusted(&dir), "ours, group-writable (umask 002)");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(!trusted(&dir), "writable by everyone");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(
            !owned_and_not_world_writable(&dir, uid.wrapping_add(1)),
            "another user's"
        );
        // a folder not there yet is made, and is ours
        assert!(trusted(&dir.join("new/cache")) && dir.join("new/cache").is_dir());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
