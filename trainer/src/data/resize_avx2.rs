//! The AVX2 passes of `resize` (x86_64 only; callers check `is_x86_feature_detected!("avx2")`).
//!
//! Horizontal: taps run along a row, so 8 rows are processed at once, one per 32-bit lane. The
//! 8 rows are first interleaved byte-wise (`t[i * 8 + r] = row_r[i]`, an 8x8 transpose of 16-bit
//! pairs plus one byte shuffle per 16 columns); then each tap of an output pixel is one 8-byte
//! load per channel widened to 8 lanes, a multiply by the broadcast coefficient and an add,
//! exactly the reference's integer sums; the 8 results per channel are packed back to bytes and
//! de-interleaved into the 8 output rows. Vertical: the chunked loop of `resize`, compiled for
//! AVX2 (the crate's baseline is SSE2, which lacks a 32-bit multiply).
use std::arch::x86_64::*;

use super::resize::{Coeffs, PRECISION_BITS};

/// Rows per block = 32-bit lanes of a ymm register.
const LANES: usize = 8;

/// 8x8 transpose of 16-bit elements: out[j] lane i = x[i] lane j.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose8x16(x: [__m128i; 8]) -> [__m128i; 8] {
    let a0 = _mm_unpacklo_epi16(x[0], x[1]);
    let a1 = _mm_unpackhi_epi16(x[0], x[1]);
    let a2 = _mm_unpacklo_epi16(x[2], x[3]);
    let a3 = _mm_unpackhi_epi16(x[2], x[3]);
    let a4 = _mm_unpacklo_epi16(x[4], x[5]);
    let a5 = _mm_unpackhi_epi16(x[4], x[5]);
    let a6 = _mm_unpacklo_epi16(x[6], x[7]);
    let a7 = _mm_unpackhi_epi16(x[6], x[7]);
    let b0 = _mm_unpacklo_epi32(a0, a2);
    let b1 = _mm_unpackhi_epi32(a0, a2);
    let b2 = _mm_unpacklo_epi32(a1, a3);
    let b3 = _mm_unpackhi_epi32(a1, a3);
    let b4 = _mm_unpacklo_epi32(a4, a6);
    let b5 = _mm_unpackhi_epi32(a4, a6);
    let b6 = _mm_unpacklo_epi32(a5, a7);
    let b7 = _mm_unpackhi_epi32(a5, a7);
    [
        _mm_unpacklo_epi64(b0, b4),
        _mm_unpackhi_epi64(b0, b4),
        _mm_unpacklo_epi64(b1, b5),
        _mm_unpackhi_epi64(b1, b5),
        _mm_unpacklo_epi64(b2, b6),
        _mm_unpackhi_epi64(b2, b6),
        _mm_unpacklo_epi64(b3, b7),
        _mm_unpackhi_epi64(b3, b7),
    ]
}

/// `t[i * 8 + r] = rows[r][i]` for i < len; every row holds at least `len` bytes and `t` 8 len.
#[target_feature(enable = "avx2")]
fn interleave8(rows: [&[u8]; LANES], len: usize, t: &mut [u8]) {
    assert!(rows.iter().all(|r| r.len() >= len) && t.len() >= len * LANES);
    // (pair of columns, row) -> (column, row): bytes 0,2,..,14 then 1,3,..,15
    let split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let mut i = 0;
    while i + 16 <= len {
        // SAFETY: i + 16 <= len <= every row's length (asserted); unaligned loads
        let x = rows.map(|r| unsafe { _mm_loadu_si128(r.as_ptr().add(i) as *const __m128i) });
        // lane r of pairs[m] = columns i+2m, i+2m+1 of row r
        let pairs = transpose8x16(x);
        for (m, p) in pairs.into_iter().enumerate() {
            // SAFETY: writes bytes (i + 2m) * 8 .. + 16 <= 8 len of t (asserted)
            unsafe {
                _mm_storeu_si128(
                    t.as_mut_ptr().add((i + 2 * m) * LANES) as *mut __m128i,
                    _mm_shuffle_epi8(p, split),
                )
            };
        }
        i += 16;
    }
    for i in i..len {
        for (r, row) in rows.iter().enumerate() {
            t[i * LANES + r] = row[i];
        }
    }
}

/// The inverse of `interleave8`: `rows[r][i] = t[i * 8 + r]` for i < len.
#[target_feature(enable = "avx2")]
fn deinterleave8(t: &[u8], len: usize, rows: &mut [&mut [u8]; LANES]) {
    assert!(rows.iter().all(|r| r.len() >= len) && t.len() >= len * LANES);
    // (column, row) -> (pair of columns, row): bytes 0,8,1,9,..,7,15
    let pair = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    let mut i = 0;
    while i + 16 <= len {
        let mut x = [_mm_setzero_si128(); 8];
        for (m, xm) in x.iter_mut().enumerate() {
            // SAFETY: reads bytes (i + 2m) * 8 .. + 16 <= 8 len of t (asserted)
            let v =
                unsafe { _mm_loadu_si128(t.as_ptr().add((i + 2 * m) * LANES) as *const __m128i) };
            *xm = _mm_shuffle_epi8(v, pair);
        }
        for (row, v) in rows.iter_mut().zip(transpose8x16(x)) {
            // SAFETY: i + 16 <= len <= the row's length (asserted)
            unsafe { _mm_storeu_si128(row.as_mut_ptr().add(i) as *mut __m128i, v) };
        }
        i += 16;
    }
    for i in i..len {
        for (r, row) in rows.iter_mut().enumerate() {
            row[i] = t[i * LANES + r];
        }
    }
}

/// The horizontal pass over 8 interleaved rows: `t` (in_w, 3, 8) bytes -> `ot` (out_w, 3, 8)
/// bytes (plus 8 spare bytes at its end for the last 32-byte store).
#[target_feature(enable = "avx2")]
fn horizontal_block(t: &[u8], ot: &mut [u8], c: &Coeffs) {
    const SHIFT: i32 = PRECISION_BITS as i32;
    let out_w = c.bounds.len();
    assert!(ot.len() >= out_w * 3 * LANES + LANES);
    let half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    let (zero, top) = (_mm256_setzero_si256(), _mm256_set1_epi32(255));
    // dwords (r0-3, r4-7, g0-3, g4-7, b0-3, b4-7, ..) out of packus' per-128-bit-lane order
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let pixel = 3 * LANES;
    for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
        assert!((xmin + n) * pixel <= t.len());
        let (mut r, mut g, mut b) = (half, half, half);
        for (j, &k) in c.kk[xx * c.ksize..][..n].iter().enumerate() {
            let k = _mm256_set1_epi32(k);
            // SAFETY: (xmin + j) * 24 + 16 + 8 <= (xmin + n) * 24 <= t.len() (asserted)
            let p = unsafe { t.as_ptr().add((xmin + j) * pixel) };
            let ch = |o: usize| unsafe {
                _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(o) as *const __m128i))
            };
            r = _mm256_add_epi32(r, _mm256_mullo_epi32(ch(0), k));
            g = _mm256_add_epi32(g, _mm256_mullo_epi32(ch(LANES), k));
            b = _mm256_add_epi32(b, _mm256_mullo_epi32(ch(2 * LANES), k));
        }
        let clip = |v: __m256i| {
            _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32::<SHIFT>(v), zero), top)
        };
        let (r, g, b) = (clip(r), clip(g), clip(b));
        let bytes = _mm256_packus_epi16(_mm256_packus_epi32(r, g), _mm256_packus_epi32(b, b));
        let v = _mm256_permutevar8x32_epi32(bytes, order);
        // SAFETY: xx * 24 + 32 <= out_w * 24 + 8 <= ot.len() (asserted); the next pixel's store
        // overwrites the 8 bytes past this pixel's 24
        unsafe { _mm256_storeu_si256(ot.as_mut_ptr().add(xx * pixel) as *mut __m256i, v) };
    }
}

/// Pillow's horizontal pass (`resize::horizontal_pass`) on rows `first_row..first_row + rows`
/// of a (H, src_w, 3) image, 8 rows at a time; returns (rows, out_w, 3), the same bytes.
#[target_feature(enable = "avx2")]
pub(super) fn horizontal(
    src: &[u8],
    src_w: usize,
    first_row: usize,
    rows: usize,
    c: &Coeffs,
) -> Vec<u8> {
    let (in_len, out_len) = (src_w * 3, c.bounds.len() * 3);
    let mut out = super::scratch::zeroed(rows * out_len);
    let mut t = vec![0u8; in_len * LANES];
    let mut ot = vec![0u8; out_len * LANES + LANES];
    for (block, dst) in (0..rows)
        .step_by(LANES)
        .zip(out.chunks_mut(LANES * out_len.max(1)))
    {
        let valid = dst.len() / out_len.max(1);
        // lanes past the last row re-read it; their outputs are dropped
        let row = |l: usize| &src[(first_row + block + l.min(valid - 1)) * in_len..][..in_len];
        interleave8(std::array::from_fn(row), in_len, &mut t);
        horizontal_block(&t, &mut ot, c);
        if valid == LANES {
            let mut it = dst.chunks_exact_mut(out_len);
            let mut lanes: [&mut [u8]; LANES] = std::array::from_fn(|_| it.next().expect("8 rows"));
            deinterleave8(&ot, out_len, &mut lanes);
        } else {
            // the last block, fewer rows: scalar
            for (l, row) in dst.chunks_exact_mut(out_len).enumerate() {
                for (i, o) in row.iter_mut().enumerate() {
                    *o = ot[i * LANES + l];
                }
            }
        }
    }
    out
}

/// `resize::vertical_chunked` compiled for AVX2.
#[target_feature(enable = "avx2")]
pub(super) fn vertical(src: &[u8], w: usize, c: &Coeffs) -> Vec<u8> {
    super::resize::vertical_chunked(src, w, c)
}
