//! PIL's `Image.resize((w, h), resample=BILINEAR)` on RGB, bit-exact with Pillow 13's 8-bit
//! fixed-point two-pass resampler. `resize_bilinear` runs the fast passes (`Passes::Fast`): where
//! the CPU has AVX2, a horizontal pass over 8 byte-interleaved rows at once and a vertical pass in
//! register-sized column chunks (`resize_avx2`); `Passes::Reference` runs Pillow's per-pixel
//! loops, the test reference. Integer sums of non-negative terms (taps <= 2^22, pixels <= 255)
//! are exact in i32 in any order, so the fast passes give the reference's bytes exactly.
use super::image::RgbImage;

pub(super) const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` for the bilinear (triangle) filter, normalized to fixed point
/// as `normalize_coeffs_8bpc`: returns (ksize, bounds (xmin, count) per output, coefficients).
fn precompute_coeffs(in_size: usize, out_size: usize) -> (usize, Vec<(usize, usize)>, Vec<i32>) {
    let support_base = 1.0f64; // bilinear filter support
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support_base * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let mut xmin = (center - support + 0.5) as i64; // C (int) truncation
        if xmin < 0 {
            xmin = 0;
        }
        let mut xmax = (center + support + 0.5) as i64;
        if xmax > in_size as i64 {
            xmax = in_size as i64;
        }
        let xmax = (xmax - xmin).max(0) as usize;
        let xmin = xmin as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let t = ((x + xmin) as f64 - center + 0.5) * ss;
            let t = t.abs();
            let w = if t < 1.0 { 1.0 - t } else { 0.0 };
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < xmax {
                if ww != 0.0 {
                    k[x] / ww
                } else {
                    k[x]
                }
            } else {
                0.0
            };
            let f = v * (1u64 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    (ksize, bounds, kk)
}

#[inline]
fn clip8(v: i32) -> u8 {
    let s = v >> PRECISION_BITS;
    s.clamp(0, 255) as u8
}

/// One axis of Pillow's resampling: per output index, the first input index and the count of
/// taps, and `ksize` fixed-point coefficients.
pub(super) struct Coeffs {
    pub(super) ksize: usize,
    pub(super) bounds: Vec<(usize, usize)>,
    pub(super) kk: Vec<i32>,
}

impl Coeffs {
    fn new(in_size: usize, out_size: usize) -> Self {
        let (ksize, bounds, kk) = precompute_coeffs(in_size, out_size);
        Self { ksize, bounds, kk }
    }
}

/// One output pixel of Pillow's horizontal pass: `n` taps from pixel `xmin` of an RGB row.
#[inline]
fn horizontal_pixel(row: &[u8], xmin: usize, k: &[i32]) -> [u8; 3] {
    let half = 1i32 << (PRECISION_BITS - 1);
    let taps = &row[xmin * 3..][..k.len() * 3];
    let (mut s0, mut s1, mut s2) = (half, half, half);
    for (p, &kx) in taps.chunks_exact(3).zip(k) {
        s0 += p[0] as i32 * kx;
        s1 += p[1] as i32 * kx;
        s2 += p[2] as i32 * kx;
    }
    [clip8(s0), clip8(s1), clip8(s2)]
}

/// Pillow's `ImagingResampleHorizontal_8bpc` on RGB rows `first_row..first_row + rows` of a
/// (H, src_w, 3) image; returns (rows, out_w, 3). The reference pass.
fn horizontal_pass(src: &[u8], src_w: usize, first_row: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    let out_w = c.bounds.len();
    let mut out = super::scratch::zeroed(rows * out_w * 3);
    for (y, orow) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let row = &src[(y + first_row) * src_w * 3..][..src_w * 3];
        for (xx, (&(xmin, n), o)) in c.bounds.iter().zip(orow.chunks_exact_mut(3)).enumerate() {
            o.copy_from_slice(&horizontal_pixel(row, xmin, &c.kk[xx * c.ksize..][..n]));
        }
    }
    out
}

/// `horizontal_pass` with the AVX2 kernel where the CPU has it (same bytes).
fn horizontal_fast(src: &[u8], src_w: usize, first_row: usize, rows: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above)
        return unsafe { super::resize_avx2::horizontal(src, src_w, first_row, rows, c) };
    }
    horizontal_pass(src, src_w, first_row, rows, c)
}

/// Pillow's `ImagingResampleVertical_8bpc` on a (H, w, 3) image; returns (out_h, w, 3).
/// Row-at-a-time accumulation over the taps (same integer sums as Pillow's per-pixel order).
fn vertical_pass(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    let out_h = c.bounds.len();
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = super::scratch::zeroed(out_h * w * 3);
    let mut acc = vec![0i32; w * 3];
    for (yy, (&(ymin, n), orow)) in c.bounds.iter().zip(out.chunks_exact_mut(w * 3)).enumerate() {
        let k = &c.kk[yy * c.ksize..][..n];
        acc.fill(half);
        for (y, &ky) in k.iter().enumerate() {
            let row = &src[(y + ymin) * w * 3..][..w * 3];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * ky;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// `vertical_chunked`, compiled for AVX2 where the CPU has it (same bytes).
fn vertical_fast(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above)
        return unsafe { super::resize_avx2::vertical(src, w, c) };
    }
    vertical_chunked(src, w, c)
}

/// `vertical_pass` over column chunks of 64 bytes whose sums stay in registers across the taps
/// (the reference streams a whole row of i32 sums through memory per tap); same bytes.
#[inline(always)]
pub(super) fn vertical_chunked(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    const CHUNK: usize = 64;
    let w3 = w * 3;
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut out = super::scratch::zeroed(c.bounds.len() * w3);
    for (yy, (&(ymin, n), orow)) in c.bounds.iter().zip(out.chunks_exact_mut(w3)).enumerate() {
        let k = &c.kk[yy * c.ksize..][..n];
        let rows = &src[ymin * w3..][..n * w3];
        let mut x = 0;
        while x + CHUNK <= w3 {
            let mut acc = [half; CHUNK];
            for (row, &ky) in rows.chunks_exact(w3).zip(k) {
                let px: &[u8; CHUNK] = row[x..x + CHUNK].try_into().expect("chunk");
                for (a, &p) in acc.iter_mut().zip(px) {
                    *a += p as i32 * ky;
                }
            }
            for (o, &a) in orow[x..x + CHUNK].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
            x += CHUNK;
        }
        for i in x..w3 {
            let s = rows
                .chunks_exact(w3)
                .zip(k)
                .fold(half, |s, (row, &ky)| s + row[i] as i32 * ky);
            orow[i] = clip8(s);
        }
    }
    out
}

type HorizontalPass = fn(&[u8], usize, usize, usize, &Coeffs) -> Vec<u8>;
type VerticalPass = fn(&[u8], usize, &Coeffs) -> Vec<u8>;

/// Which implementation of the two passes `resize_bilinear_with` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Passes {
    /// AVX2 horizontal (where the CPU has it) and chunked vertical: the default.
    Fast,
    /// Pillow's loops as written: the reference the fast passes are tested against.
    Reference,
}

/// PIL's `Image.resize((w, h), resample=BILINEAR)` on an RGB image, bit-exact with Pillow 13's
/// 8-bit fixed-point two-pass resampler (`ImagingResampleInner`). Pass order matters by one
/// level (each pass rounds to 8 bits): Pillow 13 runs the vertical pass first when the height
/// shrinks by more than twice as many pixels as the width (`(in_h - h) > 0 &&
/// (in_h - h) > 2 (in_w - w)`), else horizontal first over only the rows the vertical pass
/// reads. Pillow <= 12 always went horizontal first (except images over 100x taller than wide),
/// so goldens from older Pillow differ by one level on such sizes.
pub fn resize_bilinear(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    resize_bilinear_with(src, out_w, out_h, Passes::Fast)
}

/// `resize_bilinear` with a choice of pass implementations (the same bytes either way).
pub fn resize_bilinear_with(
    src: &RgbImage,
    out_w: usize,
    out_h: usize,
    passes: Passes,
) -> RgbImage {
    let (horizontal_pass, vertical_pass): (HorizontalPass, VerticalPass) = match passes {
        Passes::Fast => (horizontal_fast, vertical_fast),
        Passes::Reference => (horizontal_pass, vertical_pass),
    };
    let (in_w, in_h) = (src.width, src.height);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        // a zero side in or out (the processor never asks for this): a black image of the asked size
        return RgbImage {
            width: out_w,
            height: out_h,
            data: vec![0; out_w * out_h * 3],
        };
    }
    let copy = |d: &[u8]| {
        let mut v = super::scratch::take(d.len());
        v.extend_from_slice(d);
        v
    };
    if out_w == in_w && out_h == in_h {
        return RgbImage {
            width: in_w,
            height: in_h,
            data: copy(&src.data),
        };
    }
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;
    let dh = in_h as i64 - out_h as i64;
    let vertical_first = dh > 0 && dh > (in_w as i64 - out_w as i64) * 2;
    let data = if vertical_first {
        // need_v holds here
        let v = vertical_pass(&src.data, in_w, &Coeffs::new(in_h, out_h));
        if need_h {
            let out = horizontal_pass(&v, in_w, 0, out_h, &Coeffs::new(in_w, out_w));
            super::scratch::give(v);
            out
        } else {
            v
        }
    } else if !need_h {
        // no horizontal pass: the vertical pass reads the source itself
        vertical_pass(&src.data, out_w, &Coeffs::new(in_h, out_h))
    } else {
        // horizontal first, over only the rows the vertical pass reads
        let mut cv = Coeffs::new(in_h, out_h);
        let first = cv.bounds[0].0;
        let last = cv.bounds[out_h - 1].0 + cv.bounds[out_h - 1].1;
        for b in cv.bounds.iter_mut() {
            b.0 -= first;
        }
        let h = horizontal_pass(
            &src.data,
            in_w,
            first,
            last - first,
            &Coeffs::new(in_w, out_w),
        );
        if need_v {
            let out = vertical_pass(&h, out_w, &cv);
            super::scratch::give(h);
            out
        } else {
            h
        }
    };
    RgbImage {
        width: out_w,
        height: out_h,
        data,
    }
}
