//! Mask cells: which 64-query x 32-key cells of an attention call the key, query and block masks
//! allow completely. Computed once per call with a few libtorch ops, so a kernel decides whether a
//! tile needs per-element masking from a few byte loads (`mask_cells_full` in cuda/attention.cu)
//! instead of treating every tile of a masked call as partial: with any mask part set, every
//! element of every tile loaded its `key_keep` / `query_flags` / `block_mask` bytes, and the
//! model's cross-attention ran at 0.29x SDPA forward (H200, 2026-11-28, kernels/BENCHMARKS.md).
use tch::{Device, Kind, Tensor};

use crate::attention::AttentionMask;

/// Query rows per cell (every kernel's query tile starts at a multiple of 64).
pub const CELL_ROWS: i64 = 64;
/// Keys per cell (every kernel's key tile starts at a multiple of 32).
pub const CELL_KEYS: i64 = 32;

/// (B, ceil(Sq / 64), ceil(Sk / 32)) u8, contiguous on `device`: 1 where `key_keep`,
/// `query_flags` and `block_mask` allow every (query, key) pair of the cell, else 0. Rows past Sq
/// and keys past Sk count as allowed (the kernels never store those rows and check the key tail
/// themselves), and so does the causal mask, which the kernels compare per tile. None when the
/// mask has none of those three parts.
pub fn full_cells(
    mask: &AttentionMask,
    b: i64,
    sq: i64,
    sk: i64,
    device: Device,
) -> Option<Tensor> {
    if mask.key_keep.is_none() && mask.block_mask.is_none() {
        return None;
    }
    let (nqc, nkc) = (cells(sq, CELL_ROWS), cells(sk, CELL_KEYS));
    let (pad_q, pad_k) = (nqc * CELL_ROWS - sq, nkc * CELL_KEYS - sk);
    // 1 where some pair of the cell is masked, built from "masked" tensors padded with 0
    let mut masked = Tensor::zeros([b, nqc, nkc], (Kind::Uint8, device));
    if let Some(keep) = mask.key_keep {
        // (B, nkc): some key of the cell dropped
        let dropped = is_zero(keep, device)
            .constant_pad_nd([0, pad_k])
            .view([b, nkc, CELL_KEYS])
            .amax([2], false);
        // (B, nqc): some row of the cell to which key_keep applies
        let applies = match mask.query_flags {
            Some(flags) => is_zero(flags, device)
                .eq(0)
                .to_kind(Kind::Uint8)
                .constant_pad_nd([0, pad_q])
                .view([b, nqc, CELL_ROWS])
                .amax([2], false),
            None => Tensor::ones([b, nqc], (Kind::Uint8, device)),
        };
        masked = masked.maximum(&(applies.unsqueeze(2) * dropped.unsqueeze(1)));
    }
    if let Some((blocks, kblock)) = mask.block_mask {
        let nblk = blocks.size()[2];
        // (B, nqc, nblk): some row of the cell does not see the block
        let unseen = is_zero(blocks, device)
            .constant_pad_nd([0, 0, 0, pad_q])
            .view([b, nqc, CELL_ROWS, nblk])
            .amax([2], false);
        // each key's block, then (B, nqc, nkc): some key of the cell in an unseen block
        let key_block =
            Tensor::arange(sk, (Kind::Int64, device)).divide_scalar_mode(kblock, "floor");
        let unseen = unseen
            .index_select(2, &key_block)
            .constant_pad_nd([0, pad_k])
            .view([b, nqc, nkc, CELL_KEYS])
            .amax([3], false);
        masked = masked.maximum(&unseen);
    }
    Some(masked.eq(0).to_kind(Kind::Uint8).contiguous())
}

/// The kernels' decision, spelled out on the host (`mask_cells_full` and the key-tail test of
/// `tile_full` in cuda/attention.cu, for tests and tools): whether the tile of queries
/// [q0, q0 + 128) (64-row tiles are checked over 128 rows too) and keys [k0, k0 + bn) of batch
/// `b` skips per-element masking as far as the masks go. `full` from `full_cells`, on the CPU.
pub fn tile_whole(full: &Tensor, b: i64, q0: i64, k0: i64, bn: i64, sk: i64) -> bool {
    let (nqc, nkc) = (full.size()[1], full.size()[2]);
    if k0 + bn > sk {
        return false;
    }
    let (qc_end, kc_end) = (
        (q0 / CELL_ROWS + 2).min(nqc),
        cells(k0 + bn, CELL_KEYS).min(nkc),
    );
    (q0 / CELL_ROWS..qc_end)
        .all(|qc| (k0 / CELL_KEYS..kc_end).all(|kc| full.int64_value(&[b, qc, kc]) != 0))
}

fn cells(n: i64, per_cell: i64) -> i64 {
    (n + per_cell - 1) / per_cell
}

/// 1 (u8) where a bool/u8 mask tensor is 0, on `device`.
fn is_zero(t: &Tensor, device: Device) -> Tensor {
    t.to_device(device)
        .to_kind(Kind::Uint8)
        .eq(0)
        .to_kind(Kind::Uint8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::dense_mask;

    /// The cells computed the slow way: the dense mask (causal off), padded with "allowed", all()
    /// over each cell.
    fn slow(mask: &AttentionMask, b: i64, sq: i64, sk: i64) -> Tensor {
        let no_causal = AttentionMask {
            causal: false,
            ..*mask
        };
        let (nqc, nkc) = (cells(sq, CELL_ROWS), cells(sk, CELL_KEYS));
        let allowed = dense_mask(&no_causal, b, sq, sk, Device::Cpu).view([b, sq, sk]);
        let padded = Tensor::ones(
            [b, nqc * CELL_ROWS, nkc * CELL_KEYS],
            (Kind::Bool, Device::Cpu),
        );
        padded.narrow(1, 0, sq).narrow(2, 0, sk).copy_(&allowed);
        padded
            .view([b, nqc, CELL_ROWS, nkc, CELL_KEYS])
            .to_kind(Kind::Uint8)
            .amin([2, 4], false)
    }

    fn random_bool(shape: &[i64], p_true: f64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::rand(shape, (Kind::Float, Device::Cpu)).lt(p_true)
    }

    #[test]
    fn full_cells_match_the_dense_mask() {
        let mut checked_full = 0;
        let mut checked_partial = 0;
        for (seed, &(b, sq, sk, kblock)) in [
            (2i64, 1i64, 1i64, 1i64),
            (2, 100, 70, 17),
            (2, 300, 6404, 1601),
            (1, 64, 64, 64),
            (3, 130, 1000, 33),
            (2, 17, 4097, 5),
        ]
        .iter()
        .enumerate()
        {
            let seed = seed as i64 * 10;
            // mostly-true masks, so full cells exist; whole blocks and key runs dropped
            let keep = random_bool(&[b, sk], 0.999, seed);
            let _ = keep.narrow(1, sk / 2, sk / 4).fill_(0);
            let flags = random_bool(&[b, sq], 0.3, seed + 1);
            let nblk = cells(sk, kblock);
            let blocks = random_bool(&[b, sq, nblk], 0.9, seed + 2);
            let _ = blocks.get(0).narrow(1, nblk / 2, nblk - nblk / 2).fill_(0);
            let masks = [
                AttentionMask {
                    key_keep: Some(&keep),
                    ..Default::default()
                },
                AttentionMask {
                    key_keep: Some(&keep),
                    query_flags: Some(&flags),
                    ..Default::default()
                },
                AttentionMask {
                    block_mask: Some((&blocks, kblock)),
                    ..Default::default()
                },
                AttentionMask {
                    causal: true,
                    key_keep: Some(&keep),
                    query_flags: Some(&flags),
                    block_mask: Some((&blocks, kblock)),
                },
            ];
            for mask in &masks {
                let got = full_cells(mask, b, sq, sk, Device::Cpu).expect("a mask part is set");
                let want = slow(mask, b, sq, sk);
                assert_eq!(got.size(), want.size(), "b {b} sq {sq} sk {sk}");
                assert!(
                    got.equal(&want),
                    "b {b} sq {sq} sk {sk} kblock {kblock}: {got:?} vs {want:?}"
                );
                let full = got.sum(Kind::Int64).int64_value(&[]);
                checked_full += full;
                checked_partial += got.numel() as i64 - full;
            }
        }
        // the cases hold both kinds of cells (else the comparison says little)
        assert!(
            checked_full > 100 && checked_partial > 100,
            "{checked_full} / {checked_partial}"
        );
    }

    /// Every tile the kernels' lookup calls whole has no masked pair in its rows (64 or 128 of
    /// them, the last tile cut at Sq) and keys, for every tile shape the kernels use; and
    /// Mllama-shaped masks give whole tiles as well as partial ones.
    #[test]
    fn the_kernels_lookup_never_calls_a_masked_tile_whole() {
        let (b, sq, sk) = (2i64, 700i64, 900i64);
        let pos = Tensor::arange(sk.max(sq), (Kind::Int64, Device::Cpu));
        // vision: tiles of 200, the last 7 padded, the first sample's last tiles all padding
        let pad = pos.remainder(200).ge(193).unsqueeze(0).repeat([b, 1]);
        let _ = pad.get(0).narrow(0, 400, sk.max(sq) - 400).fill_(1);
        let keep = pad.narrow(1, 0, sk).logical_not();
        let flags = pad.narrow(1, 0, sq);
        // cross-attention: blocks of 300 keys, rows 0-2 see none, the first sample half of them
        let blocks = Tensor::ones([b, sq, 3], (Kind::Bool, Device::Cpu));
        let _ = blocks.get(0).narrow(1, 2, 1).fill_(0);
        let _ = blocks.narrow(1, 0, 3).fill_(0);
        let masks = [
            AttentionMask {
                key_keep: Some(&keep),
                query_flags: Some(&flags),
                ..Default::default()
            },
            AttentionMask {
                block_mask: Some((&blocks, 300)),
                ..Default::default()
            },
        ];
        for mask in &masks {
            let cells = full_cells(mask, b, sq, sk, Device::Cpu).unwrap();
            let allowed = dense_mask(mask, b, sq, sk, Device::Cpu).view([b, sq, sk]);
            let (mut whole, mut partial) = (0, 0);
            for (bm, bn) in [(128, 128), (128, 64), (128, 32), (64, 128), (64, 64)] {
                for bi in 0..b {
                    for q0 in (0..sq).step_by(bm as usize) {
                        for k0 in (0..sk).step_by(bn as usize) {
                            if !tile_whole(&cells, bi, q0, k0, bn, sk) {
                                partial += 1;
                                continue;
                            }
                            whole += 1;
                            let rows = bm.min(sq - q0);
                            let tile = allowed.get(bi).narrow(0, q0, rows).narrow(1, k0, bn);
                            assert!(
                                tile.all().int64_value(&[]) != 0,
                                "b{bi} q0 {q0} k0 {k0} {bm}x{bn} called whole"
                            );
                        }
                    }
                }
            }
            assert!(
                whole > 50 && partial > 50,
                "{whole} whole, {partial} partial"
            );
        }
    }

    #[test]
    fn u8_masks_and_no_mask() {
        let keep = Tensor::from_slice(&[1u8, 1, 0, 1]).view([1, 4]);
        let mask = AttentionMask {
            key_keep: Some(&keep),
            ..Default::default()
        };
        let got = full_cells(&mask, 1, 3, 4, Device::Cpu).unwrap();
        assert_eq!(got.size(), [1, 1, 1]);
        assert_eq!(got.int64_value(&[0, 0, 0]), 0);
        let causal_only = AttentionMask {
            causal: true,
            ..Default::default()
        };
        assert!(full_cells(&causal_only, 1, 3, 4, Device::Cpu).is_none());
    }
}
