//! 16-bit BMPs read as Pillow reads them. The image crate widens a channel level v of n bits (5
//! or 6) to round(v * 255 / (2^n - 1)); Pillow's unpackers (`BGR;15`, `BGR;16`) truncate:
//! v * 255 / (2^n - 1), one 8-bit level lower for about half the levels. The image crate's levels
//! are all different, so each value maps back to its level and is widened again as Pillow does.

/// The channel widths (bits of R, G, B) of a 16-bit BMP in the layouts Pillow reads: 5-5-5
/// (`BI_RGB`, or `BI_BITFIELDS` with those masks) and 5-6-5 (`BI_BITFIELDS`). None for any other
/// file (Pillow refuses other 16-bit masks; the image crate's levels are kept there).
pub fn pillow_layout(b: &[u8]) -> Option<[u32; 3]> {
    let u16_at = |i: usize| Some(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?]));
    let u32_at = |i: usize| Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?));
    // (a BITMAPCOREHEADER of 12 bytes has no 16-bit form; every larger header holds the
    // fields below, and the masks follow the 40 bytes of BITMAPINFOHEADER or sit in a larger one)
    if !b.starts_with(b"BM") || u32_at(14)? < 40 || u16_at(28)? != 16 {
        return None;
    }
    // (the masks only where they are given: a BI_RGB file of a few pixels ends before byte 66)
    match u32_at(30)? {
        0 => Some([5, 5, 5]),
        3 => match [u32_at(54)?, u32_at(58)?, u32_at(62)?] {
            [0x7C00, 0x03E0, 0x001F] => Some([5, 5, 5]),
            [0xF800, 0x07E0, 0x001F] => Some([5, 6, 5]),
            _ => None,
        },
        _ => None,
    }
}

/// For each 8-bit value the image crate gives an n-bit level, Pillow's value for that level.
fn pillow_levels(bits: u32) -> [u8; 256] {
    let mut lut: [u8; 256] = std::array::from_fn(|i| i as u8);
    let max = (1u32 << bits) - 1;
    for level in 0..=max {
        let image_crate = (f64::from(level) / f64::from(max) * 255.0).round() as usize;
        lut[image_crate] = (level * 255 / max) as u8;
    }
    lut
}

/// `rgb` (H, W, 3), decoded by the image crate from a BMP of channel widths `bits`, in Pillow's
/// levels.
pub fn to_pillow_levels(rgb: &mut [u8], bits: [u32; 3]) {
    let luts = bits.map(pillow_levels);
    for p in rgb.chunks_exact_mut(3) {
        for (v, lut) in p.iter_mut().zip(&luts) {
            *v = lut[*v as usize];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every level of 5 and 6 bits: the image crate's widening (as its tables) maps to Pillow's
    /// truncating one, and only values the crate produces move.
    #[test]
    fn levels_map_from_the_image_crate_to_pillow() {
        for bits in [5u32, 6] {
            let (lut, max) = (pillow_levels(bits), (1u32 << bits) - 1);
            for level in 0..=max {
                let rounded = ((level * 255 * 2 + max) / (2 * max)) as usize;
                assert_eq!(
                    u32::from(lut[rounded]),
                    level * 255 / max,
                    "{bits} bits, {level}"
                );
            }
        }
        // 5 bits: level 1 is 8 in both, level 3 is 25 in the crate and 24 in Pillow
        let l5 = pillow_levels(5);
        assert_eq!((l5[8], l5[25], l5[24]), (8, 24, 24));
    }

    #[test]
    fn layouts_pillow_reads() {
        let bmp = |compression: u32, masks: [u32; 3]| {
            let mut b = b"BM".to_vec();
            b.resize(14, 0);
            b.extend(40u32.to_le_bytes());
            b.extend([0; 10]);
            b.extend(16u16.to_le_bytes());
            b.extend(compression.to_le_bytes());
            b.resize(54, 0);
            masks.iter().for_each(|m| b.extend(m.to_le_bytes()));
            b
        };
        assert_eq!(pillow_layout(&bmp(0, [0; 3])), Some([5, 5, 5]));
        assert_eq!(
            pillow_layout(&bmp(3, [0xF800, 0x07E0, 0x1F])),
            Some([5, 6, 5])
        );
        assert_eq!(pillow_layout(&bmp(3, [0xF00, 0xF0, 0xF])), None);
        assert_eq!(pillow_layout(&bmp(1, [0; 3])), None);
        assert_eq!(pillow_layout(b"BM\0\0"), None);
        // a 1x1 BI_RGB file: its pixel ends at byte 58, before where masks would sit
        assert_eq!(pillow_layout(&bmp(0, [0; 3])[..58]), Some([5, 5, 5]));
        let mut bits24 = bmp(0, [0; 3]);
        bits24[28] = 24;
        assert_eq!(pillow_layout(&bits24), None);
    }
}
