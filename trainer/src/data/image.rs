//! The Mllama image processor, in parity with transformers 5.24's `MllamaImageProcessorPil` fed
//! as the seed feeds it (`Image.open(path).convert("RGB")`):
//! decode -> RGB as PIL's `convert("RGB")` -> canvas (`optimal_tiled_canvas`) -> aspect-keeping
//! size (`fit_to_canvas`) -> PIL's fixed-point bilinear resize (`resize_bilinear`) -> zero pad
//! right/bottom -> rescale, normalize (f32 as numpy) -> tiles.
//!
//! EXIF orientation is NOT applied: PIL's `Image.open` does not apply it and transformers only
//! transposes images it loads from a path or URL itself, never PIL images handed to it (the
//! seed's case). Checked by the `exif_rot.jpg` fixture.
//!
//! Parity (tests/data_image.rs): every fixture format (JPEG incl. gray and CMYK, PNG, BMP, GIF,
//! WebP lossless and lossy) is bit-exact with Pillow 13 + transformers 5.24's PIL backend, pixel_values
//! included: decode (JPEG: libjpeg-turbo's decoder, the `jpeg` module; colour keys: the
//! `transparency` module), resize (Pillow 13's pass order) and normalization. (The image crate's
//! own JPEG decoder, zune-jpeg, rounds its IDCT and chroma upsampling differently: up to 4 levels,
//! 0.06 after normalization.)
//! transformers' torchvision backend (`MllamaImageProcessor` when torchvision is installed)
//! resizes with torch's antialiased bilinear and differs from both by a few levels.
use std::path::Path;

use serde_json::Value;

/// An 8-bit RGB image, row-major (H, W, 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// The image-processor settings of a model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessorConfig {
    /// Tile side in pixels (`size.height`; Mllama requires height == width).
    pub tile: usize,
    pub max_image_tiles: usize,
    pub rescale_factor: f64,
    pub do_rescale: bool,
    pub do_normalize: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl ImageProcessorConfig {
    /// Read `preprocessor_config.json` (released layout) or `processor_config.json` with a
    /// nested `image_processor` (transformers 5 layout).
    pub fn from_model_dir(dir: &Path) -> Result<Self, String> {
        let flat = dir.join("preprocessor_config.json");
        let nested = dir.join("processor_config.json");
        let (path, v) = if flat.is_file() {
            (flat.clone(), read_json(&flat)?)
        } else if nested.is_file() {
            let v = read_json(&nested)?;
            let inner = v
                .get("image_processor")
                .cloned()
                .ok_or_else(|| format!("{}: no \"image_processor\" section", nested.display()))?;
            (nested.clone(), inner)
        } else {
            return Err(format!(
                "{}: neither preprocessor_config.json nor processor_config.json found (is this a Hugging Face Mllama model folder?)",
                dir.display()
            ));
        };
        Self::from_json(&v).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The tiles it makes must be the ones the model's vision tower was built for: another tile
    /// size would fail deep in the vision tower (a reshape of the patch count), another tile
    /// count gives aspect-ratio ids the model reads as other layouts. `model_dir` names the files.
    pub fn check_fits(
        &self,
        vision: &crate::model::config::VisionConfig,
        model_dir: &Path,
    ) -> Result<(), String> {
        let files = format!(
            "{}: the image processor config (preprocessor_config.json / processor_config.json) and config.json",
            model_dir.display()
        );
        if self.tile as i64 != vision.image_size {
            return Err(format!(
                "{files} disagree: tiles of {} px, vision_config.image_size {} (a missing \"size\" means transformers' default, 224); make the processor's size match the model",
                self.tile, vision.image_size
            ));
        }
        if self.max_image_tiles as i64 != vision.max_num_tiles {
            return Err(format!(
                "{files} disagree: max_image_tiles {}, vision_config.max_num_tiles {}; make them equal",
                self.max_image_tiles, vision.max_num_tiles
            ));
        }
        // the processor's aspect_ratio_id is an index into its own list: the model's tile
        // embeddings must be indexed the same way
        let ours: Vec<[i64; 2]> = supported_aspect_ratios(self.max_image_tiles)
            .into_iter()
            .map(|(h, w)| [h as i64, w as i64])
            .collect();
        if vision.supported_aspect_ratios != ours {
            return Err(format!(
                "{files} disagree: vision_config.supported_aspect_ratios {:?}, but the image processor's arrangements of up to {} tiles are {ours:?} (transformers' order; a missing list means the 4-tile one); make them equal",
                vision.supported_aspect_ratios, self.max_image_tiles
            ));
        }
        Ok(())
    }

    /// Parse the image-processor JSON object; defaults are transformers' class defaults.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        let b = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        for (k, what) in [("do_resize", "resize"), ("do_pad", "pad")] {
            if !b(k, true) {
                return Err(format!(
                    "{k}=false is not supported (MllamaImageProcessor always {what}s)"
                ));
            }
        }
        if !b("do_convert_rgb", true) {
            return Err("do_convert_rgb=false is not supported".into());
        }
        let resample = v.get("resample").and_then(Value::as_u64).unwrap_or(2);
        if resample != 2 {
            return Err(format!(
                "resample={resample} is not supported: only 2 (bilinear, Mllama's) is implemented"
            ));
        }
        let size = v.get("size");
        let h = size.and_then(|s| s.get("height")).and_then(Value::as_u64);
        let w = size.and_then(|s| s.get("width")).and_then(Value::as_u64);
        let tile = match (h, w) {
            (Some(h), Some(w)) if h == w && h > 0 => h as usize,
            (None, None) => 224,
            _ => {
                return Err(format!(
                    "size must have equal positive height and width, got {size:?}"
                ))
            }
        };
        let max_image_tiles = v
            .get("max_image_tiles")
            .and_then(Value::as_u64)
            .unwrap_or(4) as usize;
        if max_image_tiles == 0 {
            return Err("max_image_tiles must be positive".into());
        }
        let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3], String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(Value::Number(n)) => {
                    let x = n.as_f64().unwrap_or(0.0) as f32;
                    Ok([x; 3])
                }
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut o = [0f32; 3];
                    for (i, x) in a.iter().enumerate() {
                        o[i] = x
                            .as_f64()
                            .ok_or_else(|| format!("{k}[{i}] is not a number"))?
                            as f32;
                    }
                    Ok(o)
                }
                Some(other) => Err(format!("{k} must be a number or 3 numbers, got {other}")),
            }
        };
        Ok(Self {
            tile,
            max_image_tiles,
            rescale_factor: v
                .get("rescale_factor")
                .and_then(Value::as_f64)
                .unwrap_or(1.0 / 255.0),
            do_rescale: b("do_rescale", true),
            do_normalize: b("do_normalize", true),
            // IMAGENET_STANDARD_* are transformers' class defaults
            image_mean: triple("image_mean", [0.5; 3])?,
            image_std: triple("image_std", [0.5; 3])?,
        })
    }
}

fn read_json(p: &Path) -> Result<Value, String> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&t).map_err(|e| format!("{}: malformed JSON: {e}", p.display()))
}

/// Decode an image file and convert it to RGB as the seed's `Image.open(p).convert("RGB")` fed
/// to transformers' `convert_to_rgb` does: alpha channels dropped (not composited), palette
/// expanded, 16-bit RGB keeps the high byte, 16-bit grayscale clips at 255 (PIL's
/// `I;16 -> RGB`), and pixels of a PNG `tRNS` / GIF colour key turned white
/// (`transparency` module). Errors name the file and suggest the cause.
pub fn load_rgb(path: &Path) -> Result<RgbImage, String> {
    let bytes =
        std::fs::read(path).map_err(|e| format!("cannot read image {}: {e}", path.display()))?;
    decode_rgb(&bytes).map_err(|e| format!("{e} ({})", path.display()))
}

/// What can be told of an image file from its header alone (its format and size), without
/// decoding it, as the training data's scan tells it (JPEGs by libjpeg-turbo, the decoder that
/// loads them): a list of questions checks every image before a model loads. Errors name the file.
pub fn check_header(path: &Path) -> Result<(), String> {
    super::scan::image_size(path).map(drop)
}

/// Pillow refuses to open images of more pixels than this (`Image.MAX_IMAGE_PIXELS` x 2: its
/// `DecompressionBombError`), so the reference pipeline cannot take them either; checked from the
/// header, before anything is allocated (a small crafted file can claim ~4 billion pixels).
pub const MAX_IMAGE_PIXELS: usize = 2 * 89_478_485;

/// Err for images larger than [`MAX_IMAGE_PIXELS`].
pub(crate) fn check_pixel_count(w: usize, h: usize) -> Result<(), String> {
    match w.checked_mul(h) {
        Some(n) if n <= MAX_IMAGE_PIXELS => Ok(()),
        _ => Err(format!(
            "image too large: {w}x{h} pixels, more than {MAX_IMAGE_PIXELS} (Pillow's \
             decompression-bomb limit; the reference processor refuses it too): downscale the file"
        )),
    }
}

/// One chunk of a PNG file: its type, and where its type field and its CRC field are (the CRC is
/// over `bytes[type_at..crc_at]`).
struct PngChunk {
    kind: [u8; 4],
    type_at: usize,
    crc_at: usize,
}

impl PngChunk {
    /// The CRC of its type and data (computed when asked: an image's IDAT is most of the file).
    fn crc(&self, bytes: &[u8]) -> u32 {
        crc32fast::hash(&bytes[self.type_at..self.crc_at])
    }

    fn crc_ok(&self, bytes: &[u8]) -> bool {
        bytes[self.crc_at..self.crc_at + 4] == self.crc(bytes).to_be_bytes()
    }
}

/// The chunks of a PNG file in order, as far as they are whole (None for no PNG). Each chunk is
/// its length (4 bytes, big-endian), type (4), data (length) and the CRC of type and data (4).
fn png_chunks(bytes: &[u8]) -> Option<impl Iterator<Item = PngChunk> + '_> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if !bytes.starts_with(SIGNATURE) {
        return None;
    }
    let mut at = SIGNATURE.len();
    Some(std::iter::from_fn(move || {
        let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
        let end = (at + 8).checked_add(len)?;
        bytes.get(end..end.checked_add(4)?)?; // (whole, its CRC field included)
        let chunk = PngChunk {
            kind: bytes[at + 4..at + 8].try_into().ok()?,
            type_at: at + 4,
            crc_at: end,
        };
        at = end + 4;
        Some(chunk)
    }))
}

/// Pillow checks the CRC of every chunk before the image data and refuses the file at a wrong
/// one ("broken PNG file"), ancillary chunks included, where the png crate skips an ancillary
/// chunk with a wrong CRC: the type of the first such chunk, refused as Pillow refuses it.
fn png_bad_chunk_before_data(bytes: &[u8]) -> Option<String> {
    png_chunks(bytes)?
        .take_while(|c| &c.kind != b"IDAT")
        .find(|c| !c.crc_ok(bytes))
        .map(|c| String::from_utf8_lossy(&c.kind).into_owned())
}

/// Pillow checks the CRCs of the chunks before the image data only: it reads a PNG whose IDAT
/// chunks, or chunks after them, carry wrong CRCs, where the png crate refuses a wrong IDAT CRC.
/// The bytes with the CRCs from the first IDAT on recomputed (None when none is wrong, or for
/// no PNG); the chunks before it are checked first (`png_bad_chunk_before_data`).
fn png_with_idat_crcs_mended(bytes: &[u8]) -> Option<Vec<u8>> {
    let wrong: Vec<PngChunk> = png_chunks(bytes)?
        .skip_while(|c| &c.kind != b"IDAT")
        .filter(|c| !c.crc_ok(bytes))
        .collect();
    if wrong.is_empty() {
        return None;
    }
    let mut out = bytes.to_vec();
    for c in wrong {
        out[c.crc_at..c.crc_at + 4].copy_from_slice(&c.crc(bytes).to_be_bytes());
    }
    Some(out)
}

/// `load_rgb` over bytes in memory.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty image file (0 bytes): an interrupted download or copy?".into());
    }
    if super::jpeg::is_jpeg(bytes) {
        return super::jpeg::decode(bytes);
    }
    // a decoder that panics on a malformed file gives an error for that file, not a dead worker
    std::panic::catch_unwind(|| decode_with_image_crate(bytes)).unwrap_or_else(|_| {
        Err("malformed image: its decoder failed on it (re-encode the file)".into())
    })
}

/// The formats this build decodes (JPEG by libjpeg-turbo, the others by the image crate): an
/// error for a file of another, or of none, saying which.
pub(crate) fn readable_format(format: Option<image::ImageFormat>) -> Result<(), String> {
    use image::ImageFormat as F;
    const SUPPORTED: &str = "supported: JPEG, PNG, WebP, GIF, BMP";
    match format {
        Some(F::Jpeg | F::Png | F::WebP | F::Gif | F::Bmp) => Ok(()),
        // (TIFF, PPM, TGA, ICO...: Pillow reads them, this build does not)
        Some(f) => Err(format!(
            "{} images are not read ({SUPPORTED}): convert the file, to PNG for example",
            f.extensions_str()
                .first()
                .map_or("these".into(), |e| e.to_uppercase())
        )),
        None => Err(format!("unknown image format ({SUPPORTED})")),
    }
}

/// PNG, WebP, GIF, BMP to RGB as PIL.
fn decode_with_image_crate(bytes: &[u8]) -> Result<RgbImage, String> {
    use image::DynamicImage as D;
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read image: {e}"))?;
    readable_format(reader.format())?;
    if let Some(kind) = png_bad_chunk_before_data(bytes) {
        return Err(format!(
            "corrupt PNG: the CRC of its {kind:?} chunk, before the image data, is wrong \
             (Pillow refuses the file too: \"broken PNG file\"); re-encode it"
        ));
    }
    // the header only: refuse decompression bombs before the decoder allocates
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .and_then(|r| r.into_dimensions().map_err(std::io::Error::other))
        .map_err(|e| format!("corrupt or truncated image: {e}"))?;
    check_pixel_count(w as usize, h as usize)?;
    let mut reader = reader;
    reader.no_limits();
    let is_gif = reader.format() == Some(image::ImageFormat::Gif);
    let is_png = reader.format() == Some(image::ImageFormat::Png);
    let img = match reader.decode() {
        Ok(img) => img,
        Err(e) => {
            if let Some(mended) = is_png.then(|| png_with_idat_crcs_mended(bytes)).flatten() {
                tracing::debug!("a PNG with wrong IDAT CRCs read as Pillow reads it ({e})");
                return decode_with_image_crate(&mended);
            }
            return Err(format!("corrupt or truncated image: {e}"));
        }
    };
    let info = super::transparency::source_info(bytes);
    // GIF pixels of the transparent index, and the screen outside the first frame, are the key
    // colour in Pillow (then white); without a key, the screen outside is palette entry 0
    let gif_clear = match (is_gif, info.key, info.gif_fill) {
        (false, _, _) => None,
        (true, Some(_), _) => Some([255, 255, 255]),
        (true, None, fill) => fill,
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(format!("zero-sized image ({w}x{h})"));
    }
    let n = w * h;
    let mut data = Vec::with_capacity(n * 3);
    match img {
        D::ImageRgb8(b) => data = b.into_raw(),
        D::ImageRgba8(b) => {
            for p in b.as_raw().chunks_exact(4) {
                if let Some(clear) = gif_clear.filter(|_| p[3] == 0) {
                    data.extend_from_slice(&clear);
                } else {
                    data.extend_from_slice(&p[..3]);
                }
            }
        }
        D::ImageLuma8(b) => {
            for &l in b.as_raw() {
                data.extend_from_slice(&[l, l, l]);
            }
        }
        D::ImageLumaA8(b) => {
            for p in b.as_raw().chunks_exact(2) {
                data.extend_from_slice(&[p[0], p[0], p[0]]);
            }
        }
        D::ImageLuma16(b) => {
            for &l in b.as_raw() {
                let v = l.min(255) as u8;
                data.extend_from_slice(&[v, v, v]);
            }
        }
        D::ImageLumaA16(b) => {
            // true gray + alpha is PIL's "LA" (high byte); gray + tRNS is "I;16" (clips)
            for p in b.as_raw().chunks_exact(2) {
                let v = if info.gray16_clips {
                    p[0].min(255) as u8
                } else {
                    (p[0] >> 8) as u8
                };
                data.extend_from_slice(&[v, v, v]);
            }
        }
        D::ImageRgb16(b) => data.extend(b.as_raw().iter().map(|&v| (v >> 8) as u8)),
        D::ImageRgba16(b) => {
            for p in b.as_raw().chunks_exact(4) {
                data.extend(p[..3].iter().map(|&v| (v >> 8) as u8));
            }
        }
        other => {
            return Err(format!(
                "unsupported pixel format {:?} (only 8/16-bit images are supported)",
                other.color()
            ))
        }
    }
    if let Some(bits) = super::bmp16::pillow_layout(bytes) {
        super::bmp16::to_pillow_levels(&mut data, bits);
    }
    if let Some(key) = info.key {
        super::transparency::apply_key(&mut data, key);
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

/// Tile arrangements `(tiles_high, tiles_wide)` with at most `max_image_tiles` tiles, in
/// transformers' order; `aspect_ratio_id` = index + 1.
pub fn supported_aspect_ratios(max_image_tiles: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for a in 1..=max_image_tiles {
        for b in 1..=max_image_tiles {
            if a * b <= max_image_tiles {
                v.push((a, b));
            }
        }
    }
    v
}

/// transformers' `get_optimal_tiled_canvas`: the canvas `(height, width)` in pixels.
pub fn optimal_tiled_canvas(
    image_height: usize,
    image_width: usize,
    max_image_tiles: usize,
    tile: usize,
) -> (usize, usize) {
    let canvases: Vec<(usize, usize)> = supported_aspect_ratios(max_image_tiles)
        .into_iter()
        .map(|(a, b)| (a * tile, b * tile))
        .collect();
    let scales: Vec<f64> = canvases
        .iter()
        .map(|&(th, tw)| {
            let sh = th as f64 / image_height as f64;
            let sw = tw as f64 / image_width as f64;
            if sw > sh {
                sh
            } else {
                sw
            }
        })
        .collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0);
    let selected = match up.clone().reduce(f64::min) {
        Some(s) => s,
        None => scales
            .iter()
            .copied()
            .filter(|&s| s < 1.0)
            .reduce(f64::max)
            .unwrap_or(1.0),
    };
    let mut best: Option<(usize, usize)> = None;
    for (c, &s) in canvases.iter().zip(&scales) {
        if s == selected && best.is_none_or(|b| c.0 * c.1 < b.0 * b.1) {
            best = Some(*c);
        }
    }
    best.unwrap_or((tile, tile))
}

/// transformers' `get_image_size_fit_to_canvas`: the resized `(height, width)`.
pub fn fit_to_canvas(
    image_height: usize,
    image_width: usize,
    canvas_height: usize,
    canvas_width: usize,
    tile: usize,
) -> (usize, usize) {
    let target_w = image_width.clamp(tile, canvas_width.max(tile));
    let target_h = image_height.clamp(tile, canvas_height.max(tile));
    let scale_h = target_h as f64 / image_height as f64;
    let scale_w = target_w as f64 / image_width as f64;
    let or1 = |x: f64| {
        let f = x.floor() as usize;
        if f == 0 {
            1
        } else {
            f
        }
    };
    if scale_w < scale_h {
        (or1(image_height as f64 * scale_w).min(target_h), target_w)
    } else {
        (target_h, or1(image_width as f64 * scale_h).min(target_w))
    }
}

pub use super::resize::resize_bilinear;

/// Where a processed image's pixel values come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Pixels {
    /// The processor's output: the resized image, (h, w, 3), the canvas's top-left (the rest of
    /// the canvas is padding), and the u8 -> rescaled, normalized f32 table per channel (numpy's
    /// arithmetic). The f32 values are computed when written.
    Resized {
        image: RgbImage,
        lut: Box<[[f32; 256]; 3]>,
    },
    /// Ready values, (num_tiles or more, 3, tile, tile): e.g. pixel values made by transformers.
    Values(Vec<f32>),
}

/// One processed image: resized, not yet padded or normalized. The pixel values are written
/// from the u8 image straight into their destination (`write_tiles`: the batch tensor), so no
/// (tiles, 3, tile, tile) f32 copy (15 MB at 4 tiles of 560) is made per sample.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessedImage {
    pub pixels: Pixels,
    pub tile: usize,
    pub max_image_tiles: usize,
    pub num_tiles: usize,
    /// `(tiles_high, tiles_wide)`.
    pub aspect_ratio: (usize, usize),
    /// Index in `supported_aspect_ratios` + 1 (0 is batch padding).
    pub aspect_ratio_id: i64,
    /// (max_image_tiles,): 1 for the image's tiles (and always for tile 0).
    pub aspect_ratio_mask: Vec<i64>,
}

impl ProcessedImage {
    /// Elements of one tile, 3 x tile x tile.
    pub fn tile_len(&self) -> usize {
        3 * self.tile * self.tile
    }

    /// The pixel values as transformers returns them: (max_image_tiles, 3, tile, tile), tiles
    /// past `num_tiles` zeros (as `pack_images`).
    pub fn pixel_values(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.max_image_tiles * self.tile_len()];
        self.write_tiles(&mut v[..self.num_tiles * self.tile_len()]);
        v
    }

    /// Write the image's `num_tiles` tiles, (num_tiles, 3, tile, tile), into `out` (every element
    /// of it): pad right/bottom with 0, rescale, normalize (one table lookup per value), split
    /// into tiles in row-major tile order.
    pub fn write_tiles(&self, out: &mut [f32]) {
        let t = self.tile;
        let plane = t * t;
        assert_eq!(
            out.len(),
            self.num_tiles * 3 * plane,
            "write_tiles: output size"
        );
        let (resized, lut) = match &self.pixels {
            Pixels::Values(v) => return out.copy_from_slice(&v[..out.len()]),
            Pixels::Resized { image, lut } => (image, lut),
        };
        let (w, h) = (resized.width, resized.height);
        let [lr, lg, lb] = &**lut;
        let ntw = self.aspect_ratio.1;
        for (tile_idx, tile_out) in out.chunks_exact_mut(3 * plane).enumerate() {
            let (x0, y0) = ((tile_idx % ntw) * t, (tile_idx / ntw) * t);
            let valid_w = w.saturating_sub(x0).min(t);
            let (r, gb) = tile_out.split_at_mut(plane);
            let (g, b) = gb.split_at_mut(plane);
            let rows = r
                .chunks_exact_mut(t)
                .zip(g.chunks_exact_mut(t))
                .zip(b.chunks_exact_mut(t));
            for (y, ((r, g), b)) in rows.enumerate() {
                let mut x = 0;
                if y0 + y < h {
                    let src = &resized.data[((y0 + y) * w + x0) * 3..][..valid_w * 3];
                    let dst = r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut());
                    for (p, ((r, g), b)) in src.chunks_exact(3).zip(dst) {
                        *r = lr[p[0] as usize];
                        *g = lg[p[1] as usize];
                        *b = lb[p[2] as usize];
                    }
                    x = valid_w;
                }
                r[x..].fill(lr[0]);
                g[x..].fill(lg[0]);
                b[x..].fill(lb[0]);
            }
        }
    }
}

/// Choose the canvas and resize one RGB image; padding, rescale, normalization and tiling
/// happen when its pixels are written (`ProcessedImage::write_tiles`).
pub fn process(cfg: &ImageProcessorConfig, img: &RgbImage) -> ProcessedImage {
    let t = cfg.tile;
    let (ch, cw) = optimal_tiled_canvas(img.height, img.width, cfg.max_image_tiles, t);
    let (nth, ntw) = (ch / t, cw / t);
    let (nh, nw) = fit_to_canvas(img.height, img.width, ch, cw, t);
    let resized = resize_bilinear(img, nw, nh);
    // per-value lookup: u8 -> rescaled, normalized f32, exactly numpy's arithmetic
    let mut lut = Box::new([[0f32; 256]; 3]);
    for (c, l) in lut.iter_mut().enumerate() {
        for (v, o) in l.iter_mut().enumerate() {
            let mut x = if cfg.do_rescale {
                (v as f64 * cfg.rescale_factor) as f32
            } else {
                v as f32
            };
            if cfg.do_normalize {
                x = (x - cfg.image_mean[c]) / cfg.image_std[c];
            }
            *o = x;
        }
    }
    let num_tiles = nth * ntw;
    let ratios = supported_aspect_ratios(cfg.max_image_tiles);
    let id = ratios
        .iter()
        .position(|&r| r == (nth, ntw))
        .map(|i| i as i64 + 1)
        .unwrap_or(0);
    let mut mask = vec![0i64; cfg.max_image_tiles];
    mask[0] = 1;
    for m in mask.iter_mut().take(num_tiles) {
        *m = 1;
    }
    ProcessedImage {
        pixels: Pixels::Resized {
            image: resized,
            lut,
        },
        tile: t,
        max_image_tiles: cfg.max_image_tiles,
        num_tiles,
        aspect_ratio: (nth, ntw),
        aspect_ratio_id: id,
        aspect_ratio_mask: mask,
    }
}
