//! The transparent colour key of PNG `tRNS` chunks and GIF transparency indices, as the seed's
//! loading path turns it into white pixels.
//!
//! The seed feeds `Image.open(p).convert("RGB")` to transformers' processor. Pillow's
//! `convert("RGB")` drops alpha channels, but a *colour key* (PNG `tRNS` on a gray, RGB or
//! palette image; a GIF transparency index) survives in `info["transparency"]` as an RGB colour.
//! transformers' `convert_to_rgb` then sees `info["transparency"]`, converts to RGBA (every pixel
//! of exactly that colour gets alpha 0) and composites onto white: every pixel whose RGB equals
//! the key becomes (255, 255, 255), whichever palette index it came from.
//!
//! The rules below were read from Pillow 13's `PngImagePlugin.chunk_tRNS` and `Image.convert`
//! and checked against Pillow 13.0.0 + transformers 5.24 (fixtures `*trns*` in
//! tests/fixtures/data/images):
//! - palette + `tRNS` with exactly one 0 entry, all others 255: key = that palette colour;
//!   any other palette `tRNS` (partial alphas) is dropped by `convert("RGB")`: no key.
//! - gray 1-bit: key 0 or 255; gray 2/4/8-bit: the raw `tRNS` value `v` as (v, v, v), compared
//!   with the *scaled* 8-bit pixels (so a 4-bit key 3 matches nothing, as in Pillow);
//!   gray 16-bit (`I;16`): no key (Pillow's `I;16 -> RGB` loses it).
//! - RGB 8/16-bit: the low byte of each raw `tRNS` sample (Pillow packs the tuple into 8-bit
//!   channels).
//! - GIF: the first frame's transparency index looked up in its local, else global, colour table.
//!   Pixels of the screen outside the first frame are that index too (Pillow fills the frame's
//!   canvas with it), or, without one, index 0 (a zero-filled canvas): `SourceInfo::gif_fill`.

/// The colour key (if any) and whether 16-bit gray samples clip (`I;16`) rather than keep the
/// high byte: the image crate decodes gray + `tRNS` to LumaA16 just like true gray + alpha.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourceInfo {
    pub key: Option<[u8; 3]>,
    pub gray16_clips: bool,
    /// GIF without a transparency index: the colour of the screen outside the first frame
    /// (entry 0 of the frame's colour table).
    pub gif_fill: Option<[u8; 3]>,
}

/// Inspect the file header (no pixel decoding). Unknown formats and malformed headers give the
/// default (no key): the decoder reports real corruption.
pub fn source_info(bytes: &[u8]) -> SourceInfo {
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png_info(bytes).unwrap_or_default()
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        let (key, gif_fill) = match gif_first_frame(bytes) {
            Some((table, Some(i))) => (colour(table, i), None),
            Some((table, None)) => (None, colour(table, 0)),
            None => (None, None),
        };
        SourceInfo {
            key,
            gif_fill,
            ..SourceInfo::default()
        }
    } else {
        SourceInfo::default()
    }
}

/// Replace every pixel equal to `key` with white. `rgb`: (H, W, 3).
pub fn apply_key(rgb: &mut [u8], key: [u8; 3]) {
    for p in rgb.chunks_exact_mut(3) {
        if p == key {
            p.copy_from_slice(&[255, 255, 255]);
        }
    }
}

fn be16(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn png_info(b: &[u8]) -> Option<SourceInfo> {
    let mut pos = 8;
    let (mut bit_depth, mut color_type) = (0u8, 255u8);
    let mut plte: &[u8] = &[];
    while pos + 8 <= b.len() {
        let len = u32::from_be_bytes(b[pos..pos + 4].try_into().ok()?) as usize;
        let kind = &b[pos + 4..pos + 8];
        let data = b.get(pos + 8..pos + 8 + len)?;
        match kind {
            b"IHDR" => {
                bit_depth = *data.get(8)?;
                color_type = *data.get(9)?;
            }
            b"PLTE" => plte = data,
            b"tRNS" => return Some(png_trns(color_type, bit_depth, plte, data)),
            // tRNS must precede IDAT; nothing after it matters here
            b"IDAT" | b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    Some(SourceInfo {
        gray16_clips: color_type == 0 && bit_depth == 16,
        ..SourceInfo::default()
    })
}

fn png_trns(color_type: u8, bit_depth: u8, plte: &[u8], t: &[u8]) -> SourceInfo {
    let gray16_clips = color_type == 0 && bit_depth == 16;
    let key = match color_type {
        // Pillow's `_simple_palette`: ^\xff*\x00\xff*$
        3 => {
            let zeros: Vec<usize> = (0..t.len()).filter(|&i| t[i] == 0).collect();
            let simple = zeros.len() == 1 && t.iter().all(|&a| a == 0 || a == 255);
            if simple {
                plte.get(zeros[0] * 3..zeros[0] * 3 + 3)
                    .map(|c| [c[0], c[1], c[2]])
            } else {
                None
            }
        }
        0 => match (bit_depth, be16(t, 0)) {
            (1, Some(v)) => {
                let k = if v != 0 { 255 } else { 0 };
                Some([k; 3])
            }
            (2 | 4 | 8, Some(v)) if v <= 255 => Some([v as u8; 3]),
            _ => None,
        },
        2 => match (be16(t, 0), be16(t, 2), be16(t, 4)) {
            (Some(r), Some(g), Some(b)) => Some([r as u8, g as u8, b as u8]),
            _ => None,
        },
        _ => None,
    };
    SourceInfo {
        key,
        gray16_clips,
        gif_fill: None,
    }
}

/// Skip GIF data sub-blocks starting at `pos`; returns the position after the terminator.
fn skip_sub_blocks(b: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        let n = *b.get(pos)? as usize;
        pos += 1 + n;
        if n == 0 {
            return Some(pos);
        }
    }
}

/// Entry `i` of a GIF colour table.
fn colour(table: &[u8], i: usize) -> Option<[u8; 3]> {
    table.get(i * 3..i * 3 + 3).map(|c| [c[0], c[1], c[2]])
}

/// The first frame's colour table (local, else global) and transparency index.
fn gif_first_frame(b: &[u8]) -> Option<(&[u8], Option<usize>)> {
    let table_len = |packed: u8| 3usize << ((packed & 7) + 1);
    let screen_packed = *b.get(10)?;
    let mut pos = 13;
    let mut global: &[u8] = &[];
    if screen_packed & 0x80 != 0 {
        global = b.get(pos..pos + table_len(screen_packed))?;
        pos += global.len();
    }
    let mut index = None;
    loop {
        match *b.get(pos)? {
            0x21 => {
                let label = *b.get(pos + 1)?;
                // graphic control extension: size 4, packed, delay (2), transparent index
                if label == 0xF9 && *b.get(pos + 2)? >= 4 {
                    let packed = *b.get(pos + 3)?;
                    index = (packed & 1 != 0).then_some(*b.get(pos + 6)? as usize);
                }
                pos = skip_sub_blocks(b, pos + 2)?;
            }
            0x2C => {
                let packed = *b.get(pos + 9)?;
                let table = if packed & 0x80 != 0 {
                    b.get(pos + 10..pos + 10 + table_len(packed))?
                } else {
                    global
                };
                return Some((table, index));
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_trns_rules() {
        let plte = [1, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_eq!(png_trns(3, 8, &plte, &[255, 0]).key, Some([4, 5, 6]));
        assert_eq!(png_trns(3, 8, &plte, &[0]).key, Some([1, 2, 3]));
        // partial alpha or two transparent entries: Pillow keeps bytes, convert drops them
        assert_eq!(png_trns(3, 8, &plte, &[255, 128, 0]).key, None);
        assert_eq!(png_trns(3, 8, &plte, &[0, 0]).key, None);
        assert_eq!(png_trns(3, 8, &plte, &[255, 255]).key, None);
        // index past the palette
        assert_eq!(png_trns(3, 8, &plte, &[255, 255, 255, 0]).key, None);
    }

    #[test]
    fn gray_and_rgb_trns_rules() {
        assert_eq!(png_trns(0, 1, &[], &[0, 1]).key, Some([255; 3]));
        assert_eq!(png_trns(0, 4, &[], &[0, 3]).key, Some([3; 3]));
        assert_eq!(png_trns(0, 8, &[], &[0, 60]).key, Some([60; 3]));
        let g16 = png_trns(0, 16, &[], &[0, 60]);
        assert_eq!((g16.key, g16.gray16_clips), (None, true));
        assert_eq!(
            png_trns(2, 16, &[], &[0x64, 0x64, 0, 0, 0xC8, 0xC8]).key,
            Some([100, 0, 200])
        );
        assert_eq!(png_trns(6, 8, &[], &[0, 1]).key, None);
    }

    #[test]
    fn apply_key_whitens_exact_matches_only() {
        let mut px = vec![1, 2, 3, 1, 2, 4, 1, 2, 3];
        apply_key(&mut px, [1, 2, 3]);
        assert_eq!(px, vec![255, 255, 255, 1, 2, 4, 255, 255, 255]);
    }

    #[test]
    fn truncated_headers_give_no_key() {
        assert_eq!(source_info(b"\x89PNG\r\n\x1a\n\0\0"), SourceInfo::default());
        assert_eq!(source_info(b"GIF89a\x01"), SourceInfo::default());
    }
}
