//! Parity of `data::image` with transformers' MllamaImageProcessor (goldens from
//! tests/fixtures/data/make_fixtures.py).
use std::path::PathBuf;

use serde_json::Value;
use trainer::data::image::{self, ImageProcessorConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data")
}

fn read_f32(p: &std::path::Path) -> Vec<f32> {
    let b = std::fs::read(p).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("image_golden.json")).unwrap())
        .unwrap()
}

/// A TIFF (Pillow reads it, this build does not) is said to be one, with the formats read; bytes
/// of no image format are "unknown".
#[test]
fn an_unread_format_is_named() {
    let tiff = b"II*\0\x08\0\0\0\0\0";
    let e = image::decode_rgb(tiff).unwrap_err();
    assert!(
        e.contains("TIFF images are not read (supported: JPEG, PNG, WebP, GIF, BMP)"),
        "{e}"
    );
    let e = image::decode_rgb(b"hello, not an image").unwrap_err();
    assert!(e.contains("unknown image format"), "{e}");
    let e = image::decode_rgb(b"").unwrap_err();
    assert!(e.contains("empty image file (0 bytes)"), "{e}");
}

#[test]
fn supported_aspect_ratios_match_transformers_docstring() {
    assert_eq!(
        image::supported_aspect_ratios(4),
        vec![
            (1, 1),
            (1, 2),
            (1, 3),
            (1, 4),
            (2, 1),
            (2, 2),
            (3, 1),
            (4, 1)
        ]
    );
}

#[test]
fn every_fixture_image_matches_transformers() {
    let cfg = ImageProcessorConfig::from_model_dir(&fixtures().join("tok")).unwrap();
    assert_eq!((cfg.tile, cfg.max_image_tiles), (56, 4));
    let g = golden();
    let mut worst = Vec::new();
    for case in g["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let img = image::load_rgb(&fixtures().join("images").join(file)).unwrap();
        assert_eq!(
            (img.width as u64, img.height as u64),
            (
                case["width"].as_u64().unwrap(),
                case["height"].as_u64().unwrap()
            ),
            "{file}: size (EXIF orientation must not be applied)"
        );
        let p = image::process(&cfg, &img);
        let pv = p.pixel_values();
        let want_id = case["aspect_ratio_ids"][0][0].as_i64().unwrap();
        assert_eq!(p.aspect_ratio_id, want_id, "{file}: aspect_ratio_id");
        let want_mask: Vec<i64> = case["aspect_ratio_mask"][0][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(p.aspect_ratio_mask, want_mask, "{file}: aspect_ratio_mask");
        assert_eq!(
            p.num_tiles as u64,
            case["num_tiles"][0][0].as_u64().unwrap(),
            "{file}"
        );
        let want = read_f32(&fixtures().join("image_golden").join(format!("{file}.f32")));
        assert_eq!(want.len(), pv.len(), "{file}: pixel_values size");
        let max_err = want
            .iter()
            .zip(&pv)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        worst.push((file.to_string(), max_err));
    }
    for (f, e) in &worst {
        println!("{f:24} max |err| = {e:.6}");
    }
    // Every format, JPEG (libjpeg-turbo's decoder) included: bit-exact (decode, Pillow 13's
    // resize order, numpy's f32 normalize).
    for (f, e) in &worst {
        assert!(*e == 0.0, "{f}: max abs error {e} (want bit-exact)");
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

fn pixel_golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("pixel_golden.json")).unwrap())
        .unwrap()
}

/// Every fixture, JPEGs included (and the PNG tRNS / GIF colour-key set) decodes to exactly the RGB
/// bytes the seed's `Image.open(p).convert("RGB")` + transformers' `convert_to_rgb` give.
#[test]
fn decoded_rgb_is_bit_exact_with_pil_and_convert_to_rgb() {
    let g = pixel_golden();
    let cases = g["decode"].as_array().unwrap();
    assert!(cases.len() >= 32);
    let mut bad = Vec::new();
    let mut keyed = 0;
    for c in cases {
        let file = c["file"].as_str().unwrap();
        let img = image::load_rgb(&fixtures().join("images").join(file)).unwrap();
        assert_eq!(
            (img.width as u64, img.height as u64),
            (c["width"].as_u64().unwrap(), c["height"].as_u64().unwrap()),
            "{file}"
        );
        if sha256_hex(&img.data) != c["sha256"].as_str().unwrap() {
            bad.push(file.to_string());
        }
        if c["whitened"].as_u64().unwrap() > 0 {
            keyed += 1;
            let white = img
                .data
                .chunks_exact(3)
                .filter(|p| p == &[255, 255, 255])
                .count();
            assert!(white >= c["whitened"].as_u64().unwrap() as usize, "{file}");
        }
    }
    // palette, palette GIF, gray 1/4/8-bit, gray GIF, RGB 8/16-bit keys
    assert!(keyed >= 8, "only {keyed} fixtures exercise a colour key");
    assert!(bad.is_empty(), "decoded RGB differs from PIL for {bad:?}");
}

/// The noise image `lcg_image` of make_fixtures.py.
fn lcg_image(w: usize, h: usize, seed: u64) -> image::RgbImage {
    let data = (0..(w * h * 3) as u64)
        .map(|i| {
            let v = (i.wrapping_mul(2654435761).wrapping_add(seed * 40503)) & 0xFFFF_FFFF;
            ((v >> 13) & 0xFF) as u8
        })
        .collect();
    image::RgbImage {
        width: w,
        height: h,
        data,
    }
}

/// `resize_bilinear` is bit-exact with Pillow 13's `Image.resize(BILINEAR)` over 120 random size
/// pairs, which cover both pass orders (vertical first when the height shrinks by more than twice
/// the width's shrink) and up/down scaling per axis.
#[test]
fn resize_is_bit_exact_with_pillow_over_random_sizes() {
    let g = pixel_golden();
    let cases = g["resize"].as_array().unwrap();
    assert_eq!(cases.len(), 120);
    let (mut vertical_first, mut bad) = (0, Vec::new());
    for c in cases {
        let n = |v: &Value, i: usize| v.as_array().unwrap()[i].as_u64().unwrap() as usize;
        let (w0, h0, w, h) = (
            n(&c["in"], 0),
            n(&c["in"], 1),
            n(&c["out"], 0),
            n(&c["out"], 1),
        );
        let src = lcg_image(w0, h0, c["seed"].as_u64().unwrap());
        let r = image::resize_bilinear(&src, w, h);
        assert_eq!((r.width, r.height, r.data.len()), (w, h, w * h * 3));
        if sha256_hex(&r.data) != c["sha256"].as_str().unwrap() {
            bad.push(format!("{w0}x{h0}->{w}x{h}"));
        }
        let dh = h0 as i64 - h as i64;
        if dh > 0 && dh > 2 * (w0 as i64 - w as i64) {
            vertical_first += 1;
        }
    }
    assert!(
        vertical_first >= 10,
        "only {vertical_first} vertical-first cases"
    );
    assert!(bad.is_empty(), "resize differs from Pillow for {bad:?}");
}

/// The fast passes (AVX2 horizontal over 8 interleaved rows, chunked vertical) give the
/// reference passes' bytes: fewer than 8 rows, rows not a multiple of 8, rows narrower than the
/// 16-byte interleave, 1-pixel sides, up- and downscaling (up to 9x: 19-tap kernels) on both
/// axes and both pass orders.
#[test]
fn fast_resize_passes_equal_the_reference() {
    use trainer::data::resize::{resize_bilinear_with, Passes};
    let sizes = [
        ((1, 1), (3, 2)),
        ((5, 3), (2, 7)),
        ((7, 9), (5, 4)),
        ((16, 8), (9, 17)),
        ((33, 17), (12, 30)),
        ((300, 41), (37, 40)),
        ((41, 300), (40, 33)),
        ((1000, 20), (111, 20)),
        ((20, 1000), (20, 111)),
        ((257, 129), (1000, 700)),
        ((2000, 1500), (1120, 840)),
        ((640, 480), (747, 560)),
    ];
    for (seed, ((w0, h0), (w, h))) in sizes.into_iter().enumerate() {
        let src = lcg_image(w0, h0, seed as u64 + 7);
        let fast = resize_bilinear_with(&src, w, h, Passes::Fast);
        let reference = resize_bilinear_with(&src, w, h, Passes::Reference);
        assert_eq!((fast.width, fast.height), (w, h));
        assert!(
            fast.data == reference.data,
            "{w0}x{h0} -> {w}x{h}: fast passes differ from the reference"
        );
    }
}

#[test]
fn real_560_tiles_match_transformers() {
    let cfg = ImageProcessorConfig::from_model_dir(&fixtures().join("real560")).unwrap();
    let g = &golden()["real560"];
    let img =
        image::load_rgb(&fixtures().join("images").join(g["file"].as_str().unwrap())).unwrap();
    let p = image::process(&cfg, &img);
    assert_eq!(
        p.aspect_ratio_id,
        g["aspect_ratio_ids"][0][0].as_i64().unwrap()
    );
    let pv = p.pixel_values();
    let stride = g["stride"].as_u64().unwrap() as usize;
    let mut err = 0f32;
    for (i, v) in g["sample"].as_array().unwrap().iter().enumerate() {
        err = err.max((pv[i * stride] - v.as_f64().unwrap() as f32).abs());
    }
    println!("560: max |err| over the strided sample = {err}");
    assert!(err <= 1e-2);
    let sum: f64 = pv.iter().map(|&v| v as f64).sum();
    assert!(
        (sum - g["sum"].as_f64().unwrap()).abs() < 1.0,
        "sum {sum} vs {}",
        g["sum"]
    );
}

#[test]
fn transformers5_processor_config_layout_reads_the_same() {
    let a = ImageProcessorConfig::from_model_dir(&fixtures().join("tok")).unwrap();
    let b = ImageProcessorConfig::from_model_dir(&fixtures().join("tok_v5")).unwrap();
    assert_eq!(a, b);
}

/// Damaged files: every one of 300 single-byte corruptions (headers, tables, compressed data) and
/// 60 truncations of each fixture format decodes to an image of the right size or to an error;
/// nothing panics or aborts (libjpeg's fatal errors unwind into `Err`).
#[test]
fn damaged_images_decode_or_fail_cleanly() {
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for name in [
        "photo.jpg",
        "gray.jpg",
        "cmyk.jpg",
        "arith.jpg",
        "photo444.jpg",
        "large.png",
        "palette_trns.png",
        "gray16.png",
        "anim.gif",
        "lossless.webp",
        "rgb.bmp",
    ] {
        let good = std::fs::read(fixtures().join("images").join(name)).unwrap();
        let want = image::decode_rgb(&good).unwrap();
        let (mut ok, mut failed) = (0, 0);
        let mut check = |bytes: &[u8]| match image::decode_rgb(bytes) {
            Ok(img) => {
                assert_eq!(img.data.len(), img.width * img.height * 3, "{name}");
                ok += 1;
            }
            Err(e) => {
                assert!(!e.is_empty());
                failed += 1;
            }
        };
        for _ in 0..300 {
            let mut bad = good.clone();
            let at = next() % bad.len();
            bad[at] ^= 1 + (next() % 255) as u8;
            check(&bad);
        }
        for _ in 0..60 {
            check(&good[..next() % good.len()]);
        }
        // JPEG decodes most flipped bytes (damaged pixels); PNG's checksums refuse nearly every
        // one (a flip in an IDAT CRC alone is read, as Pillow reads it)
        assert!(failed > 0, "{name}: {ok} decoded, {failed} failed");
        // and the intact file still decodes the same (no state left behind by the failures)
        assert!(image::decode_rgb(&good).unwrap() == want, "{name}");
    }
}

/// A PNG whose IDAT chunk (or IEND) carries a wrong CRC decodes to the intact file's pixels, as
/// Pillow reads it (it checks the chunks before the image data only; checked with Pillow
/// 13.0.0); a wrong CRC of IHDR, or of an ancillary chunk before the image data (which the png
/// crate would skip), is refused, as Pillow refuses it ("broken PNG file").
#[test]
fn a_wrong_idat_crc_is_read_as_pillow_reads_it() {
    let good = std::fs::read(fixtures().join("images/large.png")).unwrap();
    let want = image::decode_rgb(&good).unwrap();
    // the offset of the CRC field of the first chunk of `kind`
    let crc_at = |kind: &[u8]| {
        let mut at = 8;
        loop {
            let len = u32::from_be_bytes(good[at..at + 4].try_into().unwrap()) as usize;
            if &good[at + 4..at + 8] == kind {
                return at + 8 + len;
            }
            at += 12 + len;
        }
    };
    let mut bad_idat = good.clone();
    bad_idat[crc_at(b"IDAT")] ^= 0x5a;
    assert!(image::decode_rgb(&bad_idat).unwrap() == want);
    // and one after the image data (Pillow checks none there)
    bad_idat[crc_at(b"IEND")] ^= 0x5a;
    assert!(image::decode_rgb(&bad_idat).unwrap() == want);
    let mut bad_ihdr = good.clone();
    bad_ihdr[crc_at(b"IHDR")] ^= 0x5a;
    let e = image::decode_rgb(&bad_ihdr).unwrap_err();
    assert!(
        e.contains("corrupt PNG: the CRC of its \"IHDR\" chunk"),
        "{e}"
    );
    // a tEXt chunk after IHDR (13 bytes of data): read with its right CRC, refused with a wrong one
    let text = b"tEXtComment\0hello";
    let crc = crc32fast::hash(text);
    let with_text = |crc: u32| {
        let ihdr_end = 8 + 12 + 13;
        let mut b = good[..ihdr_end].to_vec();
        b.extend_from_slice(&((text.len() - 4) as u32).to_be_bytes());
        b.extend_from_slice(text);
        b.extend_from_slice(&crc.to_be_bytes());
        b.extend_from_slice(&good[ihdr_end..]);
        b
    };
    assert!(image::decode_rgb(&with_text(crc)).unwrap() == want);
    let e = image::decode_rgb(&with_text(crc ^ 1)).unwrap_err();
    assert!(
        e.contains("corrupt PNG: the CRC of its \"tEXt\" chunk, before the image data, is wrong"),
        "{e}"
    );
}

#[test]
fn bad_images_are_errors_not_panics() {
    let dir = std::env::temp_dir().join(format!("data_image_bad_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = std::fs::read(fixtures().join("images/large.png")).unwrap();
    let jpg = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let cmyk = std::fs::read(fixtures().join("images/cmyk.jpg")).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated.png", good[..good.len() / 3].to_vec()),
        ("garbage.png", b"\x89PNG\r\n\x1a\nnot really".to_vec()),
        ("empty.jpg", vec![]),
        ("text.jpg", b"hello".to_vec()),
        ("truncated.jpg", jpg[..jpg.len() / 2].to_vec()),
        ("header_only.jpg", jpg[..200].to_vec()),
        (
            "soi_then_junk.jpg",
            b"\xff\xd8\xffjunk that is not a JPEG".to_vec(),
        ),
        ("cmyk_truncated.jpg", cmyk[..cmyk.len() - 100].to_vec()),
    ];
    for (name, bytes) in cases {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        let e = image::load_rgb(&p).unwrap_err();
        assert!(!e.is_empty(), "{name}");
        assert!(
            e.contains(name),
            "{name}: error does not name the file: {e}"
        );
        if name.contains("truncated") {
            assert!(e.contains("truncated"), "{name}: {e}");
        }
    }
    assert!(image::load_rgb(&dir.join("missing.png"))
        .unwrap_err()
        .contains("cannot read"));
    std::fs::remove_dir_all(&dir).ok();
}

/// CRC-32 (PNG's chunk checksum), bitwise.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn decompression_bombs_are_refused_from_the_header() {
    // a small file that claims more pixels than Pillow opens (Image.MAX_IMAGE_PIXELS x 2) must be
    // refused before anything of that size is allocated, with the limit in the message
    let huge = |w: u32, h: u32| (w as usize) * (h as usize) > image::MAX_IMAGE_PIXELS;
    assert!(huge(100_000, 100_000) && huge(65_000, 65_000) && !huge(13_000, 13_000));

    // PNG: IHDR (bytes 16..24 width, height; CRC over type + data at 29..33) patched
    let mut png = std::fs::read(fixtures().join("images/large.png")).unwrap();
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());

    // JPEG: the SOF0 frame header's height and width (after FFC0, length, precision)
    let mut jpg = std::fs::read(fixtures().join("images/photo.jpg")).unwrap();
    let sof = jpg
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .expect("baseline SOF0");
    jpg[sof + 5..sof + 7].copy_from_slice(&65_000u16.to_be_bytes());
    jpg[sof + 7..sof + 9].copy_from_slice(&65_000u16.to_be_bytes());

    for (name, bytes) in [("bomb.png", png), ("bomb.jpg", jpg)] {
        let e = image::decode_rgb(&bytes).unwrap_err();
        assert!(e.contains("too large"), "{name}: {e}");
        assert!(
            e.contains(&image::MAX_IMAGE_PIXELS.to_string()),
            "{name}: {e}"
        );
    }
}

/// The processor's tiles must be the vision tower's: its size, its tile count, and its aspect
/// ratio list (the processor's `aspect_ratio_id` indexes the model's tile embeddings; a shorter
/// list made the lookup run out of range at the first wide image).
#[test]
fn the_image_processor_must_fit_the_vision_tower() {
    use trainer::model::MllamaConfig;
    let model = std::path::Path::new("model");
    let four = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"height": 448, "width": 448},
        "max_image_tiles": 4
    }))
    .unwrap();
    let base = MllamaConfig::from_json_str("{}").unwrap();
    four.check_fits(&base.vision, model).unwrap();
    let short = MllamaConfig::from_json_str(
        r#"{"vision_config": {"supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]}}"#,
    )
    .unwrap();
    let err = four.check_fits(&short.vision, model).unwrap_err();
    assert!(
        err.contains("vision_config.supported_aspect_ratios [[1, 1], [1, 2], [2, 1]]")
            && err.contains("make them equal"),
        "{err}"
    );
    // two tiles with the default (4-tile) list: transformers refuses it too
    let two_tiles =
        MllamaConfig::from_json_str(r#"{"vision_config": {"max_num_tiles": 2}}"#).unwrap();
    let two = ImageProcessorConfig::from_json(&serde_json::json!({
        "size": {"height": 448, "width": 448},
        "max_image_tiles": 2
    }))
    .unwrap();
    assert!(two
        .check_fits(&two_tiles.vision, model)
        .unwrap_err()
        .contains("arrangements of up to 2 tiles are [[1, 1], [1, 2], [2, 1]]"));
    let err = four.check_fits(&two_tiles.vision, model).unwrap_err();
    assert!(
        err.contains("max_image_tiles 4, vision_config.max_num_tiles 2"),
        "{err}"
    );
}
