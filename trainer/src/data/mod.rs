//! Training data: JSONL records -> the exact tensors transformers' MllamaProcessor and the seed's
//! collator would make.
//!
//! Module index:
//! - `records`:  JSONL parsing with `FILE:LINE: reason` problems, `<image>` placeholder removal,
//!   text-only skip/keep, `build_sco` converter and `DEFAULT_CORRECTION_PROMPT`
//! - `image`:    decode + RGB as PIL, canvas choice, PIL-exact bilinear resize, pad, normalize, tiles
//! - `jpeg`:     JPEG through libjpeg-turbo's decoder, bit-exact with Pillow (CMYK, gray included)
//! - `resize`:   Pillow-exact bilinear resize (AVX2 fast passes, plain reference passes)
//! - `scratch`:  per-thread recycled byte buffers of the image path (no page faults per sample)
//! - `template`: the chat template (minijinja with Hugging Face's jinja semantics)
//! - `tokenize`: tokenizer + special ids, BOS handling, the seed's label masking, length policy
//! - `collate`:  right padding, pixel values, aspect ratio ids/mask, cross-attention mask
//! - `sampler`:  length-grouped global batches split rank-contiguously, per-epoch shuffle, position
//! - `loader`:   ordered parallel workers with a bounded queue, deterministic order
//! - `dataset`:  the split the training loop reads: pre-scan + report, epoch plan, micro-batches
//! - `scan`:     the pre-scan of one record (image header, tokens, length policy), processor checks
//! - `scan_report`: `DataError` and the split's `ScanReport`
//! - `transparency`: PNG `tRNS` / GIF colour keys that the seed's loading turns white
//! - `bmp16`:    16-bit BMP channel levels as Pillow widens them
//! - `tools`:    `trainer data check|dump|build-sco`
mod bmp16;
pub mod collate;
pub mod dataset;
pub mod image;
pub mod jpeg;
pub mod loader;
pub mod records;
pub mod resize;
#[cfg(target_arch = "x86_64")]
mod resize_avx2;
pub mod sampler;
mod scan;
mod scan_report;
pub mod scratch;
pub mod template;
pub mod tokenize;
pub mod tools;
pub mod transparency;
