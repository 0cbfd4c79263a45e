//! JPEG decoding as the seed's `Image.open(p).convert("RGB")` does it: libjpeg-turbo's decoder
//! (the `mozjpeg` crate builds it from source; its decoder is libjpeg-turbo's) with the settings
//! Pillow 13 uses (islow IDCT, fancy upsampling, output colour space by component count), then
//! Pillow's mode conversion: 1 component = "L" (replicated), 3 = "RGB", 4 = "CMYK;I" (Adobe
//! polarity, which Pillow always assumes) converted with Pillow's `cmyk2rgb`.
//! Bit-exact with Pillow on the JPEG fixtures (tests/data_image.rs), SIMD or not: libjpeg-turbo's
//! SIMD paths (built when nasm is installed) give the same pixels as its C paths.
//!
//! libjpeg reports fatal errors through `error_exit`, which must not return: ours unwinds (the
//! crate's "C-unwind" callbacks allow it) and `decode` turns the unwind into an `Err`. A file that
//! ends early is an error too (Pillow: "image file is truncated"), although libjpeg only warns and
//! fills the rest with gray; other warnings (extraneous bytes, ...) are ignored as Pillow does.
use std::os::raw::c_int;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};

use mozjpeg::{ColorSpace, Decompress};
use mozjpeg_sys as ffi;

use super::image::RgbImage;
use super::scratch;

/// The JPEG start-of-image marker followed by a marker byte.
pub fn is_jpeg(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0xFF, 0xD8, 0xFF])
}

/// Decode a JPEG file's bytes to 8-bit RGB, as Pillow's `Image.open(...).convert("RGB")`.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, String> {
    warn_once_without_simd();
    unwinding_to_err(|| decode_unwinding(bytes))
}

extern "C" {
    /// libjpeg-turbo's own question to its SIMD layer (jsimd.c, or jsimd_none.c's 0 when the
    /// library was built without SIMD; mozjpeg-sys builds it with NO_GETENV, so the JSIMD_*
    /// variables change nothing).
    fn jsimd_can_idct_islow() -> c_int;
}

/// Whether libjpeg-turbo decodes with its SIMD code (same pixels; about twice as fast here:
/// 5.3 against 11.2 CPU ms per bench image, BENCHMARKS.md).
pub fn simd_in_use() -> bool {
    // SAFETY: no arguments; reads the CPU's features and the environment once, then a flag
    unsafe { jsimd_can_idct_islow() != 0 }
}

/// The SIMD code is built only when nasm is on PATH while cargo builds mozjpeg-sys, and cargo
/// does not rebuild it when nasm arrives later: say so once, with the fix, instead of decoding at
/// half speed in silence.
fn warn_once_without_simd() {
    static CHECKED: std::sync::Once = std::sync::Once::new();
    CHECKED.call_once(|| {
        if !simd_in_use() {
            tracing::warn!("{NO_SIMD}");
        }
    });
}

#[cfg(target_arch = "x86_64")]
const NO_SIMD: &str = "JPEG decoding runs without libjpeg-turbo's SIMD code (about 2x slower, \
    same pixels): nasm was not on PATH when cargo built mozjpeg-sys, and cargo does not rebuild it \
    by itself. Install nasm (Debian: apt-get install nasm), then `cargo clean -p mozjpeg-sys \
    --release` (without --release for debug builds) and rebuild";
#[cfg(not(target_arch = "x86_64"))]
const NO_SIMD: &str = "JPEG decoding runs without libjpeg-turbo's SIMD code (slower, same \
    pixels): mozjpeg-sys was built without it for this architecture";

/// Runs libjpeg work whose fatal errors unwind out of `error_exit`, as an `Err` with libjpeg's
/// message.
fn unwinding_to_err<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => Err(match payload.downcast::<String>() {
            Ok(msg) => *msg,
            Err(_) => "corrupt JPEG (libjpeg error)".into(),
        }),
    }
}

/// The colour space libjpeg decodes `layers` components to (Pillow's modes L, RGB, CMYK).
fn output_space(layers: usize) -> Result<ColorSpace, String> {
    match layers {
        1 => Ok(ColorSpace::JCS_GRAYSCALE),
        3 => Ok(ColorSpace::JCS_RGB),
        4 => Ok(ColorSpace::JCS_CMYK),
        n => Err(format!("cannot handle {n}-layer JPEG images")),
    }
}

/// Width and height from a JPEG's header, read by the same decoder as `decode` (every frame type
/// libjpeg-turbo decodes: baseline, progressive, arithmetic-coded, lossless); a layer count
/// `decode` refuses is refused here too.
pub fn header_size(bytes: &[u8]) -> Result<(usize, usize), String> {
    unwinding_to_err(|| {
        let d = Decompress::with_err(error_mgr())
            .from_mem(bytes)
            .map_err(|e| format!("corrupt or truncated JPEG header: {e}"))?;
        output_space(d.components().len())?;
        Ok(d.size())
    })
}

fn decode_unwinding(bytes: &[u8]) -> Result<RgbImage, String> {
    let io = |e: std::io::Error| format!("corrupt or truncated JPEG: {e}");
    let d = Decompress::with_err(error_mgr())
        .from_mem(bytes)
        .map_err(io)?;
    let layers = d.components().len();
    let (w, h) = d.size();
    // from the header, before libjpeg allocates its buffers
    super::image::check_pixel_count(w, h)?;
    let out = output_space(layers)?;
    let mut started = d.to_colorspace(out).map_err(io)?;
    // into a recycled buffer (no fresh pages to fault in and zero)
    let n = w * h * layers;
    let mut raw = scratch::take(n);
    let got = started
        .read_scanlines_into_uninit(&mut raw.spare_capacity_mut()[..n])
        .map_err(io)?
        .len();
    // SAFETY: read_scanlines_into_uninit initialized the first `got` bytes
    unsafe { raw.set_len(got) };
    started.finish().map_err(io)?;
    if got != n {
        return Err(format!(
            "corrupt JPEG: {got} bytes decoded for {w}x{h}x{layers}"
        ));
    }
    let data = if layers == 3 {
        raw
    } else {
        let mut rgb = scratch::take(w * h * 3);
        if layers == 1 {
            rgb.extend(raw.iter().flat_map(|&l| [l, l, l]));
        } else {
            rgb.extend(raw.chunks_exact(4).flat_map(inverted_cmyk_to_rgb));
        }
        scratch::give(raw);
        rgb
    };
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Pillow's "CMYK;I" unpack (every byte inverted) then `cmyk2rgb`:
/// `nk - nk * c / 255` with Pillow's rounding `MULDIV255`.
fn inverted_cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let nk = 255 - (!p[3]) as i32;
    let muldiv255 = |a: i32| {
        let t = a * nk + 128;
        ((t >> 8) + t) >> 8
    };
    let ch = |c: u8| (nk - muldiv255((!c) as i32)).clamp(0, 255) as u8;
    [ch(p[0]), ch(p[1]), ch(p[2])]
}

fn error_mgr() -> ffi::jpeg_error_mgr {
    // SAFETY: jpeg_error_mgr is plain C data (pointers, ints, optional fn pointers), for which
    // all-zeroes is valid; jpeg_std_error then fills in libjpeg's defaults.
    let mut err: ffi::jpeg_error_mgr = unsafe { std::mem::zeroed() };
    unsafe { ffi::jpeg_std_error(&mut err) };
    err.error_exit = Some(error_exit);
    err.emit_message = Some(emit_message);
    err
}

/// libjpeg's formatted text for the current `msg_code`.
fn message(cinfo: &mut ffi::jpeg_common_struct) -> String {
    // SAFETY: cinfo.err is the manager above; format_message writes at most JMSG_LENGTH_MAX
    // (200, jpeglib.h) bytes, NUL-terminated, into the buffer (the binding types it as
    // `&[u8; 80]`, but the C function writes it, so it is called through a pointer-typed
    // signature with a buffer of the C limit).
    unsafe {
        let Some(format) = cinfo.err.as_ref().and_then(|e| e.format_message) else {
            return "libjpeg error".into();
        };
        let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
            std::mem::transmute(format);
        let mut buf = [0u8; 200];
        format(cinfo, buf.as_mut_ptr());
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    }
}

extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
    let msg = format!("corrupt JPEG: {}", message(cinfo));
    // resume_unwind: no panic hook, no "thread panicked" line; caught in `decode`
    resume_unwind(Box::new(msg));
}

extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
    // SAFETY: cinfo.err points at this decoder's error manager for its whole life.
    let code = unsafe { cinfo.err.as_ref().map_or(0, |e| e.msg_code) };
    if level < 0 && code == ffi::JWRN_JPEG_EOF as c_int {
        resume_unwind(Box::new(
            "truncated JPEG: the file ends before the image data does (re-download or re-encode it)"
                .to_string(),
        ));
    }
}

#[cfg(test)]
mod tests {
    /// With nasm installed the SIMD code is built (CI installs nasm before building), so this
    /// fails on a build made before nasm arrived, with the fix in the message.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn simd_is_built_when_nasm_is_installed() {
        let nasm = std::process::Command::new("nasm")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        if nasm {
            assert!(super::simd_in_use(), "{}", super::NO_SIMD);
        }
    }
}
