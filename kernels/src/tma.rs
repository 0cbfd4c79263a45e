//! TMA (Hopper's tensor memory accelerator) descriptors for variant 7's attention tiles: how a
//! (batch, sequence, head, head-dim) view is described to `cuTensorMapEncodeTiled`, and the call.
//!
//! The kernel asks for boxes of 64 head-dim columns (128 bytes, the span of the 128-byte swizzle
//! wgmma reads) x `rows` sequence rows of one head of one batch; the copy engine writes them in
//! that swizzled layout and fills rows past the sequence end with zeros.
use cudarc::driver::sys;

use crate::{KernelError, Result};

/// A (B, S, H, D) view as a 4-d TMA tensor. Dimension 0 is the head dim (unit stride); 1-3 are
/// the sequence, head and batch dimensions ordered by increasing stride, size-1 dimensions last
/// (the packed form the driver documents, whatever order the view's strides come in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmaLayout {
    pub dims: [u64; 4],
    /// Byte strides of dimensions 1-3.
    pub strides: [u64; 3],
    /// Box size per dimension: 64 columns, `rows` along the sequence dimension, 1 elsewhere.
    pub boxes: [u32; 4],
    /// The map dimension (1-3) holding the sequence, head and batch index.
    pub pos: [i32; 3],
}

/// Box width in elements: 128 bytes of 16-bit elements.
pub const BOX_COLS: u32 = 64;

/// Describes a view of `seq` x `heads` x `batch` rows of `d` 16-bit elements with element strides
/// `strides` = (sequence, head, batch). None when the TMA unit cannot address it (a stride that is
/// not a multiple of 16 bytes or not below 2^40 bytes, a dimension of 0 or 2^32 and more, or a
/// head dim that is not a multiple of 64) or the sequence is shorter than one box of `rows`: the
/// caller then takes the cp.async path.
pub fn layout(
    seq: i64,
    heads: i64,
    batch: i64,
    d: i64,
    strides: [i64; 3],
    rows: u32,
) -> Option<TmaLayout> {
    const ELEM: i64 = 2;
    let sizes = [seq, heads, batch];
    if d <= 0 || d % BOX_COLS as i64 != 0 || sizes.iter().any(|&n| n <= 0 || n >= 1 << 32) {
        return None;
    }
    // A box taller than the sequence is likely fine (the rest reads as zeros), but the driver
    // documents no such case; sequences that short gain nothing from TMA anyway.
    if seq < rows as i64 {
        return None;
    }
    // (size, byte stride, logical index); a size-1 dimension is never stepped along, so its
    // stride is made the packed one (the extent of everything before it)
    let mut order: Vec<(i64, i64, usize)> =
        (0..3).map(|i| (sizes[i], strides[i] * ELEM, i)).collect();
    order.sort_by_key(|&(n, s, _)| (n == 1, s));
    let mut dims = [d as u64, 0, 0, 0];
    let mut out_strides = [0u64; 3];
    let mut boxes = [BOX_COLS, 1, 1, 1];
    let mut pos = [0i32; 3];
    let mut extent = d * ELEM; // bytes spanned by the dimensions placed so far
    for (slot, &(n, stride, logical)) in order.iter().enumerate() {
        let stride = if n == 1 {
            (extent + 15) / 16 * 16
        } else {
            stride
        };
        if stride <= 0 || stride % 16 != 0 || stride >= 1 << 40 {
            return None;
        }
        dims[slot + 1] = n as u64;
        out_strides[slot] = stride as u64;
        pos[logical] = slot as i32 + 1;
        if logical == 0 {
            boxes[slot + 1] = rows;
        }
        extent = extent.max(stride.checked_mul(n)?);
    }
    Some(TmaLayout {
        dims,
        strides: out_strides,
        boxes,
        pos,
    })
}

/// Encodes the map for the tensor at device address `ptr` (16-byte aligned) with `layout`.
pub fn encode(ptr: u64, layout: &TmaLayout, bf16: bool) -> Result<sys::CUtensorMap> {
    use sys::*;
    if !ptr.is_multiple_of(16) {
        return Err(KernelError::Invalid(format!(
            "TMA needs a 16-byte aligned address, got {ptr:#x}"
        )));
    }
    let mut map = CUtensorMap { opaque: [0; 16] };
    let element_strides = [1u32; 4];
    let dtype = if bf16 {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
    } else {
        CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16
    };
    // SAFETY: every array has the rank's length (strides: rank - 1); the encoder only writes `map`.
    let status = unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            dtype,
            4,
            ptr as *mut std::ffi::c_void,
            layout.dims.as_ptr(),
            layout.strides.as_ptr(),
            layout.boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if status != CUresult::CUDA_SUCCESS {
        return Err(KernelError::Driver {
            what: "cuTensorMapEncodeTiled".into(),
            detail: format!("{status:?} for {layout:?}"),
        });
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bshd_layout_orders_head_before_sequence() {
        // (B=2, S=1000, H=8, D=128) contiguous: strides seq 1024, head 128, batch 1_024_000
        let l = layout(1000, 8, 2, 128, [1024, 128, 1_024_000], 128).unwrap();
        assert_eq!(l.dims, [128, 8, 1000, 2]);
        assert_eq!(l.strides, [256, 2048, 2_048_000]);
        assert_eq!(l.boxes, [64, 1, 128, 1]);
        assert_eq!(l.pos, [2, 1, 3]); // seq in dim 2, head in dim 1, batch in dim 3
    }

    #[test]
    fn bhsd_layout_keeps_sequence_first() {
        // (B=3, H=4, S=170, D=64) contiguous
        let l = layout(170, 4, 3, 64, [64, 170 * 64, 4 * 170 * 64], 128).unwrap();
        assert_eq!(l.dims, [64, 170, 4, 3]);
        assert_eq!(l.strides, [128, 170 * 128, 4 * 170 * 128]);
        assert_eq!(l.boxes, [64, 128, 1, 1]);
        assert_eq!(l.pos, [1, 2, 3]);
    }

    #[test]
    fn size_one_dimensions_go_last_with_packed_strides() {
        // one head, one batch, whatever strides the view reports for them
        let l = layout(4097, 1, 1, 128, [128, 8, 0], 128).unwrap();
        assert_eq!(l.dims, [128, 4097, 1, 1]);
        assert_eq!(l.strides[0], 256);
        assert!(l.strides[1] >= 256 * 4097 && l.strides[1].is_multiple_of(16));
        assert!(l.strides[2] >= l.strides[1] && l.strides[2].is_multiple_of(16));
        assert_eq!(l.pos[0], 1);
    }

    #[test]
    fn unaddressable_views_are_refused() {
        assert!(layout(200, 2, 1, 80, [160, 80, 32000], 128).is_none()); // d not a multiple of 64
        assert!(layout(200, 2, 1, 128, [132, 128, 26400], 128).is_none()); // 264-byte rows
        assert!(layout(0, 2, 1, 128, [256, 128, 0], 128).is_none());
        assert!(layout(200, 2, 1, 128, [1 << 40, 128, 256], 128).is_none());
        assert!(layout(200, 1 << 31, 1, 128, [128, 1 << 38, 0], 128).is_none()); // extent overflows
        assert!(layout(127, 2, 1, 128, [256, 128, 256 * 127], 128).is_none()); // shorter than a box
        assert!(layout(128, 2, 1, 128, [256, 128, 256 * 128], 128).is_some());
    }
}
