//! Padding collator: what MllamaProcessor(padding=True, right padding) plus the seed's labels
//! return for a list of samples. Plain row-major buffers; shapes in the field comments.
use super::image::ProcessedImage;
use super::tokenize::{cross_attention_token_mask, Encoded, IGNORE};

/// One preprocessed sample (the unit the loader's workers produce).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index of the record in the dataset.
    pub index: usize,
    pub text: Encoded,
    /// None for a text-only record.
    pub image: Option<ProcessedImage>,
}

/// A padded batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq_len: usize,
    /// Images per sample (0 or 1 here), tiles per image, tile side.
    pub num_images: usize,
    pub max_tiles: usize,
    pub tile: usize,
    /// Dataset indices of the samples, in batch order.
    pub indices: Vec<usize>,
    pub input_ids: Vec<i64>,            // (B, L)
    pub attention_mask: Vec<i64>,       // (B, L)
    pub labels: Vec<i64>,               // (B, L)
    pub pixel_values: Vec<f32>,         // (B, I, T, 3, H, W)
    pub aspect_ratio_ids: Vec<i64>,     // (B, I)
    pub aspect_ratio_mask: Vec<i64>,    // (B, I, T)
    pub cross_attention_mask: Vec<i64>, // (B, L, I, T)
}

/// Right-pad `samples` with `pad_id` (labels `IGNORE`, attention 0) and stack the images.
pub fn collate(
    samples: &[Sample],
    pad_id: i64,
    image_id: i64,
    max_tiles: usize,
    tile: usize,
) -> Batch {
    let mut b = collate_text(samples, pad_id, image_id, max_tiles, tile);
    b.pixel_values = vec![0f32; pixel_len(&b)];
    pack_pixels(samples, b.num_images, max_tiles, tile, &mut b.pixel_values);
    b
}

/// Elements of `Batch::pixel_values` for this batch's shape.
pub fn pixel_len(b: &Batch) -> usize {
    b.batch * b.num_images * b.max_tiles * 3 * b.tile * b.tile
}

/// Write the (B, I, T, 3, H, W) pixel values of `samples` into `out`, every element (padding
/// tiles and images 0), so `out` may start uninitialized-but-valid (a fresh tensor).
pub fn pack_pixels(samples: &[Sample], ni: usize, max_tiles: usize, tile: usize, out: &mut [f32]) {
    let tile_len = 3 * tile * tile;
    let per_sample = ni * max_tiles * tile_len;
    for (s, dst) in samples.iter().zip(out.chunks_exact_mut(per_sample.max(1))) {
        let mut written = 0;
        if let (Some(img), true) = (&s.image, ni > 0) {
            assert_eq!(
                img.tile_len(),
                tile_len,
                "image processed for another tile size"
            );
            written = img.num_tiles.min(max_tiles) * tile_len;
            img.write_tiles(&mut dst[..written]);
        }
        dst[written..].fill(0.0);
    }
}

/// `collate` without `pixel_values` (left empty): what the loader's fused path uses, writing
/// the pixels straight into the model's tensor with `pack_pixels`.
pub fn collate_text(
    samples: &[Sample],
    pad_id: i64,
    image_id: i64,
    max_tiles: usize,
    tile: usize,
) -> Batch {
    let b = samples.len();
    let l = samples
        .iter()
        .map(|s| s.text.input_ids.len())
        .max()
        .unwrap_or(0);
    let ni = samples
        .iter()
        .map(|s| usize::from(s.image.is_some()))
        .max()
        .unwrap_or(0);
    let mut input_ids = vec![pad_id; b * l];
    let mut attention_mask = vec![0i64; b * l];
    let mut labels = vec![IGNORE; b * l];
    let mut aspect_ratio_ids = vec![0i64; b * ni];
    let mut aspect_ratio_mask = vec![0i64; b * ni * max_tiles];
    let mut cross_attention_mask = vec![0i64; b * l * ni * max_tiles];
    for (i, s) in samples.iter().enumerate() {
        let n = s.text.input_ids.len();
        input_ids[i * l..i * l + n].copy_from_slice(&s.text.input_ids);
        labels[i * l..i * l + n].copy_from_slice(&s.text.labels);
        for a in &mut attention_mask[i * l..i * l + n] {
            *a = 1;
        }
        for j in 0..ni {
            // build_aspect_ratio_mask: tile 0 is always set, padding images included
            aspect_ratio_mask[(i * ni + j) * max_tiles] = 1;
        }
        if let (Some(img), true) = (&s.image, ni > 0) {
            aspect_ratio_ids[i * ni] = img.aspect_ratio_id;
            for t in 0..img.num_tiles.min(max_tiles) {
                aspect_ratio_mask[i * ni * max_tiles + t] = 1;
            }
            // convert_sparse_cross_attention_mask_to_dense over the padded length
            let ranges = cross_attention_token_mask(&s.text.input_ids, image_id);
            for (j, &(start, end)) in ranges.iter().enumerate().take(ni) {
                let end = if end == -1 { l } else { (end as usize).min(l) };
                for pos in start..end {
                    let row = ((i * l + pos) * ni + j) * max_tiles;
                    for t in 0..img.num_tiles.min(max_tiles) {
                        cross_attention_mask[row + t] = 1;
                    }
                }
            }
        }
    }
    Batch {
        batch: b,
        seq_len: l,
        num_images: ni,
        max_tiles,
        tile,
        indices: samples.iter().map(|s| s.index).collect(),
        input_ids,
        attention_mask,
        labels,
        pixel_values: Vec::new(),
        aspect_ratio_ids,
        aspect_ratio_mask,
        cross_attention_mask,
    }
}
