//! The pre-scan of one record, without decoding its image: the image header's size (its tiles),
//! the rendered and tokenized dialog, `data.max_seq_len` with its policy; and the checks that the
//! processors fit the model before any record is read.
use std::path::Path;

use super::image::{self, ImageProcessorConfig};
use super::records::Record;
use super::tokenize::{apply_length_policy, LengthOutcome, TextProcessor, IGNORE};
use crate::config::LengthPolicy;

/// What the scan of one record gave.
pub(super) enum Scanned {
    Ok {
        len: usize,
        supervised: usize,
        shifted_supervised: usize,
        tiles: usize,
        truncated: bool,
    },
    Bad(String),
    TooLong(String),
    /// Longer than max_seq_len under `skip`: dropped, named in the report.
    TooLongDropped(String),
    Skipped(&'static str),
}

pub(super) fn scan_record(
    r: &Record,
    text: &TextProcessor,
    image: &ImageProcessorConfig,
    max_seq_len: usize,
    policy: LengthPolicy,
) -> Scanned {
    let tiles = match &r.image {
        None => 0,
        Some(p) => match image_size(p) {
            Ok((w, h)) => {
                let (ch, cw) = image::optimal_tiled_canvas(h, w, image.max_image_tiles, image.tile);
                (ch / image.tile) * (cw / image.tile)
            }
            Err(e) => return Scanned::Bad(e),
        },
    };
    let mut enc = match text.encode_dialog(r.system.as_deref(), &r.turns, r.image.is_some()) {
        Ok(e) => e,
        Err(e) => return Scanned::Bad(e),
    };
    match apply_length_policy(&mut enc, max_seq_len, policy) {
        Err(reason) => Scanned::TooLong(reason),
        Ok(LengthOutcome::Skipped { reason }) => {
            if reason.starts_with("no supervised") {
                Scanned::Skipped("nothing supervised after truncation")
            } else {
                Scanned::TooLongDropped(reason)
            }
        }
        Ok(outcome) => {
            let supervised = enc.supervised();
            if supervised == 0 {
                return Scanned::Skipped("nothing supervised");
            }
            Scanned::Ok {
                len: enc.input_ids.len(),
                supervised,
                shifted_supervised: enc.labels.iter().skip(1).filter(|&&l| l != IGNORE).count(),
                tiles,
                truncated: matches!(outcome, LengthOutcome::Truncated { .. }),
            }
        }
    }
}

/// Width and height from the image header (no decoding), checked against the pixel limit the
/// load applies (so an oversized file is a bad record at the scan, not an error mid-run). JPEGs
/// by libjpeg-turbo, the decoder that loads them (the image crate's refuses arithmetic-coded and
/// lossless ones).
pub(super) fn image_size(p: &Path) -> Result<(usize, usize), String> {
    use std::io::Read;
    let unreadable = |e: std::io::Error| format!("image {} cannot be read: {e}", p.display());
    let mut file = std::fs::File::open(p).map_err(unreadable)?;
    let mut bytes = Vec::with_capacity(3);
    (&mut file)
        .take(3)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes.is_empty() {
        return Err(format!(
            "image {}: empty file (0 bytes): an interrupted download or copy?",
            p.display()
        ));
    }
    let (w, h) = if super::jpeg::is_jpeg(&bytes) {
        // libjpeg parses from memory: the first 64 KiB hold the frame header of almost every
        // file (every rank scans every image at startup, often over a network filesystem); a
        // file whose metadata pushes it further (large ICC/EXIF segments) is read whole
        (&mut file)
            .take(HEADER_READ - 3)
            .read_to_end(&mut bytes)
            .map_err(unreadable)?;
        match super::jpeg::header_size(&bytes) {
            Ok(wh) => wh,
            Err(_) if bytes.len() as u64 == HEADER_READ => {
                file.read_to_end(&mut bytes).map_err(unreadable)?;
                super::jpeg::header_size(&bytes)
                    .map_err(|e| format!("image {}: {e}", p.display()))?
            }
            Err(e) => return Err(format!("image {}: {e}", p.display())),
        }
    } else {
        other_image_size(p)?
    };
    if w == 0 || h == 0 {
        return Err(format!("image {}: zero-sized image ({w}x{h})", p.display()));
    }
    super::image::check_pixel_count(w, h).map_err(|e| format!("image {}: {e}", p.display()))?;
    Ok((w, h))
}

/// The processors must fit the model before any record is read: the tokenizer
/// (`check_tokenizer_fits_model`; tokenizer files of another model would otherwise fail deep in
/// libtorch without naming a record), the image processor's tiles (`ImageProcessorConfig::
/// check_fits`), and a supervised token must be one the LM head predicts
/// (`TextProcessor::label_limit`, set here). (A config.json that cannot be read is left to the
/// model's loading, which names it.)
pub(super) fn check_processors_fit_model(
    model_dir: &Path,
    text: &mut TextProcessor,
    image: &ImageProcessorConfig,
) -> Result<(), String> {
    let path = model_dir.join("config.json");
    let Ok(cfg) = crate::model::MllamaConfig::from_file(&path) else {
        return Ok(());
    };
    image.check_fits(&cfg.vision, model_dir)?;
    check_tokenizer_fits_model(model_dir, text, &cfg)?;
    text.label_limit = Some(cfg.text.vocab_size);
    Ok(())
}

/// The tokenizer's ids index the model's embedding (`text_config.vocab_size + 8` rows) and its
/// `<|image|>` is the model's `image_token_index` (training, `infer` and `eval` check it: an id
/// past the embedding is a panic on the CPU and a device-side assert on a GPU).
pub fn check_tokenizer_fits_model(
    model_dir: &Path,
    text: &TextProcessor,
    cfg: &crate::model::MllamaConfig,
) -> Result<(), String> {
    let rows = cfg.text.vocab_size + 8;
    let max_id = text
        .tokenizer
        .get_vocab(true)
        .into_values()
        .max()
        .unwrap_or(0) as i64;
    if max_id >= rows {
        return Err(format!(
            "{}: the tokenizer has token ids up to {max_id}, but the model's embedding has {rows} rows (text_config.vocab_size {} + 8): the tokenizer files are not this model's",
            model_dir.display(),
            cfg.text.vocab_size
        ));
    }
    if text.ids.image != cfg.image_token_index {
        return Err(format!(
            "{}: the tokenizer's {} is id {}, the model's image_token_index is {}: the tokenizer files are not this model's",
            model_dir.display(),
            text.ids.image_token,
            text.ids.image,
            cfg.image_token_index
        ));
    }
    Ok(())
}

/// Bytes of a JPEG read for its header first (`image_size`).
const HEADER_READ: u64 = 64 << 10;

/// `image_size` for the formats the image crate decodes (their headers only). A decoder that
/// panics on a crafted header gives an error for that file, as in `image::decode_rgb`.
fn other_image_size(p: &Path) -> Result<(usize, usize), String> {
    std::panic::catch_unwind(|| other_image_size_unguarded(p)).unwrap_or_else(|_| {
        Err(format!(
            "image {}: malformed header: its decoder failed on it (re-encode the file)",
            p.display()
        ))
    })
}

fn other_image_size_unguarded(p: &Path) -> Result<(usize, usize), String> {
    let reader = ::image::ImageReader::open(p)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("image {} cannot be read: {e}", p.display()))?;
    super::image::readable_format(reader.format())
        .map_err(|e| format!("image {}: {e}", p.display()))?;
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("image {}: corrupt image header: {e}", p.display()))?;
    Ok((w as usize, h as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG whose frame header lies beyond the first read (metadata segments of > 64 KiB after
    /// SOI, as large ICC profiles give) is read further and sized like the original; a short one
    /// is sized from its first bytes.
    #[test]
    fn jpeg_sizes_with_headers_past_the_first_read() {
        let images = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/data/images");
        let original = std::fs::read(images.join("photo.jpg")).unwrap();
        let want = image_size(&images.join("photo.jpg")).unwrap();
        // SOI, then two COM segments of 65533 bytes each (~128 KiB), then the rest of the file
        let mut padded = original[..2].to_vec();
        for _ in 0..2 {
            padded.extend_from_slice(&[0xFF, 0xFE, 0xFF, 0xFF]);
            padded.extend(std::iter::repeat_n(b'x', 65533));
        }
        padded.extend_from_slice(&original[2..]);
        let p = std::env::temp_dir().join(format!("padded-{}.jpg", std::process::id()));
        std::fs::write(&p, &padded).unwrap();
        assert_eq!(image_size(&p).unwrap(), want);
        let _ = std::fs::remove_file(&p);
    }
}
