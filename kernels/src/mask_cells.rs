//! Mask cells: which 64-query x 32-key cells of an attention call the key, query and block masks
//! allow completely (WHOLE) or not at all (EMPTY), and from them the state of the 128 x 128 tile
//! window starting at each cell. Computed once per call with a few libtorch ops, so a kernel
//! decides from one byte load per tile (`mask_tile_state` in cuda/attention.cu) whether the tile
//! needs per-element masking: without them, with any mask part set, every
//! element of every tile loaded its `key_keep` / `query_flags` / `block_mask` bytes, and the
//! model's cross-attention ran at 0.29x SDPA forward (H200, 2026-11-28, kernels/BENCHMARKS.md).
use tch::{Device, Kind, Tensor};

use crate::attention::AttentionMask;

/// Query rows per cell (every kernel's query tile starts at a multiple of 64).
pub const CELL_ROWS: i64 = 64;
/// Keys per cell (every kernel's key tile starts at a multiple of 32).
pub const CELL_KEYS: i64 = 32;
/// A cell whose every (query, key) pair the masks allow (`CELL_WHOLE` in attention.cu).
pub const WHOLE: u8 = 1;
/// A cell none of whose pairs the masks allow (`CELL_EMPTY`).
pub const EMPTY: u8 = 2;

/// (B, ceil(Sq / 64), ceil(Sk / 32)) u8, contiguous on `device`: `WHOLE` where `key_keep`,
/// `query_flags` and `block_mask` allow every (query, key) pair of the cell; with `mark_empty`,
/// `EMPTY` where they allow none (found per mask part: a cell only the two parts together empty
/// stays 0); else 0. Rows past Sq and keys past Sk count as allowed (the kernels never store
/// those rows and check the key tail themselves), and so does the causal mask, which the kernels
/// compare per tile. None when the mask has none of those three parts.
pub fn classify(
    mask: &AttentionMask,
    b: i64,
    sq: i64,
    sk: i64,
    device: Device,
    mark_empty: bool,
) -> Option<Tensor> {
    if mask.key_keep.is_none() && mask.block_mask.is_none() {
        return None;
    }
    let (nqc, nkc) = (cells(sq, CELL_ROWS), cells(sk, CELL_KEYS));
    // 1 where some pair of the cell is masked; 1 where every pair is
    let mut some_masked = Tensor::zeros([b, nqc, nkc], (Kind::Uint8, device));
    let mut all_masked = Tensor::zeros([b, nqc, nkc], (Kind::Uint8, device));
    if let Some(keep) = mask.key_keep {
        let dropped = is_zero(keep, device); // (B, Sk)
                                             // (B, Sq): the rows key_keep applies to
        let applies = match mask.query_flags {
            Some(flags) => is_zero(flags, device).eq(0).to_kind(Kind::Uint8),
            None => Tensor::ones([b, sq], (Kind::Uint8, device)),
        };
        // a pair is masked when key_keep applies to its row and drops its key
        let pairs = |rows: Tensor, keys: Tensor| rows.unsqueeze(2) * keys.unsqueeze(1);
        some_masked = some_masked.maximum(&pairs(
            per_cell(&applies, 1, CELL_ROWS, false),
            per_cell(&dropped, 1, CELL_KEYS, false),
        ));
        all_masked = all_masked.maximum(&pairs(
            per_cell(&applies, 1, CELL_ROWS, true),
            per_cell(&dropped, 1, CELL_KEYS, true),
        ));
    }
    if let Some((blocks, kblock)) = mask.block_mask {
        let unseen = is_zero(blocks, device); // (B, Sq, nblk)
        let key_block =
            Tensor::arange(sk, (Kind::Int64, device)).divide_scalar_mode(kblock, "floor");
        // (B, nqc, nblk): some / every row of the cell does not see the block; then per key
        // (its block's), then per cell of keys
        let keys_cells = |all: bool| {
            let rows = per_cell(&unseen, 1, CELL_ROWS, all).index_select(2, &key_block);
            per_cell(&rows, 2, CELL_KEYS, all)
        };
        some_masked = some_masked.maximum(&keys_cells(false));
        all_masked = all_masked.maximum(&keys_cells(true));
    }
    let mut states = some_masked.eq(0).to_kind(Kind::Uint8) * WHOLE as i64;
    if mark_empty {
        // (disjoint from WHOLE: an empty cell has a masked pair)
        states += all_masked * EMPTY as i64;
    }
    Some(states.contiguous())
}

/// Cells per tile window: 2 x 4 cells, 128 queries x 128 keys, the largest tile of any kernel.
const WINDOW: (i64, i64) = (2, 4);

/// What the kernels read (`attach_mask_cells` in attention.rs): `classify`'s cells turned into
/// the states of the 128 x 128 windows starting at each cell, WHOLE (EMPTY) where every cell of
/// the window is; cells past the last row or key cell count as either (rows past Sq are never
/// stored, keys past Sk are masked by the kernels' own tail tests).
pub fn tile_states(cells: &Tensor) -> Tensor {
    let every = |state: u8| window_any(&cells.ne(state as i64).to_kind(Kind::Uint8)).eq(0);
    let states = every(WHOLE).to_kind(Kind::Uint8) * WHOLE as i64
        + every(EMPTY).to_kind(Kind::Uint8) * EMPTY as i64;
    states.contiguous()
}

/// (B, nqc, nkc) u8 0/1: 1 where some cell of the window starting there is 1 (cells past the
/// edges count as 0).
fn window_any(t: &Tensor) -> Tensor {
    let (nqc, nkc) = (t.size()[1], t.size()[2]);
    let padded = t.constant_pad_nd([0, WINDOW.1 - 1, 0, WINDOW.0 - 1]);
    let mut any = t.zeros_like();
    for dq in 0..WINDOW.0 {
        for dk in 0..WINDOW.1 {
            any = any.maximum(&padded.narrow(1, dq, nqc).narrow(2, dk, nkc));
        }
    }
    any
}

/// The kernels' decision, spelled out on the host (`tile_full`'s mask and key-tail tests in
/// cuda/attention.cu, for tests and tools): whether the tile of at most 128 queries from q0 and
/// keys [k0, k0 + bn) (bn <= 128) of batch `b` skips per-element masking as far as the masks
/// go. `states` from `tile_states`, on the CPU.
pub fn tile_whole(states: &Tensor, b: i64, q0: i64, k0: i64, bn: i64, sk: i64) -> bool {
    k0 + bn <= sk && tile_state(states, b, q0, k0) == WHOLE
}

/// `tile_empty` in cuda/attention.cu: whether the masks allow no pair of the tile.
pub fn tile_empty(states: &Tensor, b: i64, q0: i64, k0: i64) -> bool {
    tile_state(states, b, q0, k0) == EMPTY
}

/// `mask_tile_state` in cuda/attention.cu: the one byte a tile's decision reads.
fn tile_state(states: &Tensor, b: i64, q0: i64, k0: i64) -> u8 {
    states.int64_value(&[b, q0 / CELL_ROWS, k0 / CELL_KEYS]) as u8
}

fn cells(n: i64, per_cell: i64) -> i64 {
    (n + per_cell - 1) / per_cell
}

/// `t` (u8 0/1) reduced over groups of `per_cell` along `dim`, padded with 0 to whole groups:
/// each group's maximum (`all` false: any) or minimum (`all` true: every).
fn per_cell(t: &Tensor, dim: usize, per_cell: i64, all: bool) -> Tensor {
    let mut size = t.size();
    let n = size[dim];
    let groups = cells(n, per_cell);
    // (constant_pad_nd's pairs run from the last dim back)
    let mut pad = vec![0i64; 2 * (size.len() - dim)];
    if let Some(last) = pad.last_mut() {
        *last = groups * per_cell - n;
    }
    size[dim] = per_cell;
    size.insert(dim, groups);
    let grouped = t.constant_pad_nd(pad).view(size.as_slice());
    let within = [dim as i64 + 1];
    match all {
        true => grouped.amin(within, false),
        false => grouped.amax(within, false),
    }
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

    /// The kernels read the cells with their own copies of the states and the cell shape
    /// (attention.cu); a drift would misjudge tiles on the GPU only, so the text is compared.
    #[test]
    fn the_cuda_side_reads_cells_as_they_are_made() {
        let src = include_str!("../cuda/attention.cu");
        assert!(src.contains(&format!("#define CELL_WHOLE {WHOLE}\n")));
        assert!(src.contains(&format!("#define CELL_EMPTY {EMPTY}\n")));
        // nqc = ceil(Sq / 64), nkc = ceil(Sk / 32), cell (q0 / 64, k0 / 32), row-major (B, nqc, nkc)
        let shift = |n: i64| n.trailing_zeros();
        let (r, k) = (shift(CELL_ROWS), shift(CELL_KEYS));
        assert_eq!((1 << r, 1 << k), (CELL_ROWS, CELL_KEYS));
        assert!(src.contains(&format!(
            "const int nqc = (p.Sq + {}) >> {r}, nkc = (p.Sk + {}) >> {k};",
            CELL_ROWS - 1,
            CELL_KEYS - 1
        )));
        assert!(src.contains(&format!(
            "p.mask_cells[((i64)b * nqc + (q0 >> {r})) * nkc + (k0 >> {k})]"
        )));
    }

    /// The cells the slow way, from the dense mask (causal off) padded with "allowed": (every
    /// pair allowed, no pair allowed), u8 each.
    fn slow(mask: &AttentionMask, b: i64, sq: i64, sk: i64) -> (Tensor, Tensor) {
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
        let grouped = padded
            .view([b, nqc, CELL_ROWS, nkc, CELL_KEYS])
            .to_kind(Kind::Uint8);
        let whole = grouped.amin([2, 4], false);
        let none = grouped.amax([2, 4], false).eq(0).to_kind(Kind::Uint8);
        (whole, none)
    }

    fn random_bool(shape: &[i64], p_true: f64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::rand(shape, (Kind::Float, Device::Cpu)).lt(p_true)
    }

    /// WHOLE exactly where the dense mask allows every pair; EMPTY only where it allows none, and
    /// exactly there for a mask of one part; no EMPTY without `mark_empty`.
    #[test]
    fn cells_match_the_dense_mask() {
        let (mut whole, mut empty, mut mixed) = (0, 0, 0);
        for (seed, &(b, sq, sk, kblock)) in [
            (2i64, 1i64, 1i64, 1i64),
            (2, 100, 70, 17),
            (2, 300, 6404, 1601),
            (1, 64, 64, 64),
            (3, 130, 1000, 33),
            (2, 17, 4097, 5),
            (2, 256, 512, 128),
        ]
        .iter()
        .enumerate()
        {
            let seed = seed as i64 * 10;
            // mostly-true masks, so whole cells exist; whole key runs and blocks dropped, so empty
            // ones do
            let keep = random_bool(&[b, sk], 0.999, seed);
            let _ = keep.narrow(1, sk / 2, sk / 4).fill_(0);
            let flags = random_bool(&[b, sq], 0.3, seed + 1);
            let _ = flags.narrow(1, 0, sq / 2).fill_(1);
            let nblk = cells(sk, kblock);
            let blocks = random_bool(&[b, sq, nblk], 0.9, seed + 2);
            let _ = blocks.get(0).narrow(1, nblk / 2, nblk - nblk / 2).fill_(0);
            let masks = [
                (
                    AttentionMask {
                        key_keep: Some(&keep),
                        ..Default::default()
                    },
                    true,
                ),
                (
                    AttentionMask {
                        key_keep: Some(&keep),
                        query_flags: Some(&flags),
                        ..Default::default()
                    },
                    true,
                ),
                (
                    AttentionMask {
                        block_mask: Some((&blocks, kblock)),
                        ..Default::default()
                    },
                    true,
                ),
                (
                    AttentionMask {
                        causal: true,
                        key_keep: Some(&keep),
                        query_flags: Some(&flags),
                        block_mask: Some((&blocks, kblock)),
                    },
                    false,
                ),
            ];
            for (mask, one_part) in &masks {
                let what = format!("b {b} sq {sq} sk {sk} kblock {kblock}");
                let (want_whole, want_none) = slow(mask, b, sq, sk);
                let got = classify(mask, b, sq, sk, Device::Cpu, true).expect("a mask part");
                assert_eq!(got.size(), want_whole.size(), "{what}");
                let got_whole = got.eq(WHOLE as i64).to_kind(Kind::Uint8);
                let got_empty = got.eq(EMPTY as i64).to_kind(Kind::Uint8);
                assert!(got_whole.equal(&want_whole), "{what}: whole cells differ");
                // EMPTY is never wrong: no cell marked EMPTY allows a pair
                let wrong = (&got_empty * want_none.eq(0).to_kind(Kind::Uint8)).sum(Kind::Int64);
                assert_eq!(
                    wrong.int64_value(&[]),
                    0,
                    "{what}: a cell with a pair called empty"
                );
                if *one_part {
                    assert!(got_empty.equal(&want_none), "{what}: empty cells differ");
                }
                let plain = classify(mask, b, sq, sk, Device::Cpu, false).unwrap();
                assert!(plain.equal(&got_whole), "{what}: EMPTY without mark_empty");
                let n_whole = got_whole.sum(Kind::Int64).int64_value(&[]);
                let n_empty = got_empty.sum(Kind::Int64).int64_value(&[]);
                whole += n_whole;
                empty += n_empty;
                mixed += got.numel() as i64 - n_whole - n_empty;
            }
        }
        // the cases hold every kind of cell (else the comparisons say little)
        assert!(
            whole > 100 && empty > 100 && mixed > 100,
            "{whole} whole, {empty} empty, {mixed} mixed"
        );
    }

    /// Every tile the kernels' lookup calls whole has no masked pair in its rows (64 or 128 of
    /// them, the last tile cut at Sq) and keys, every tile it calls empty no allowed pair, for
    /// every tile shape the kernels use; and Mllama-shaped masks give whole, empty and partial
    /// tiles.
    #[test]
    fn the_kernels_lookup_never_misjudges_a_tile() {
        let (b, sq, sk) = (2i64, 700i64, 900i64);
        let pos = Tensor::arange(sk.max(sq), (Kind::Int64, Device::Cpu));
        // vision: tiles of 200, the last 7 padded, the first sample's last tiles all padding
        let pad = pos.remainder(200).ge(193).unsqueeze(0).repeat([b, 1]);
        let _ = pad.get(0).narrow(0, 400, sk.max(sq) - 400).fill_(1);
        let keep = pad.narrow(1, 0, sk).logical_not();
        let flags = pad.narrow(1, 0, sq);
        // cross-attention: blocks of 300 keys, rows 0-2 see none, the first sample 2 of 3
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
            let states = tile_states(&classify(mask, b, sq, sk, Device::Cpu, true).unwrap());
            let allowed = dense_mask(mask, b, sq, sk, Device::Cpu).view([b, sq, sk]);
            let (mut whole, mut empty, mut partial) = (0, 0, 0);
            for (bm, bn) in [(128, 128), (128, 64), (128, 32), (64, 128), (64, 64)] {
                for bi in 0..b {
                    for q0 in (0..sq).step_by(bm as usize) {
                        for k0 in (0..sk).step_by(bn as usize) {
                            let rows = bm.min(sq - q0);
                            let tile =
                                allowed
                                    .get(bi)
                                    .narrow(0, q0, rows)
                                    .narrow(1, k0, bn.min(sk - k0));
                            let at = format!("b{bi} q0 {q0} k0 {k0} {bm}x{bn}");
                            if tile_whole(&states, bi, q0, k0, bn, sk) {
                                whole += 1;
                                assert!(tile.all().int64_value(&[]) != 0, "{at} called whole");
                            } else if tile_empty(&states, bi, q0, k0) {
                                empty += 1;
                                assert!(tile.any().int64_value(&[]) == 0, "{at} called empty");
                            } else {
                                partial += 1;
                            }
                        }
                    }
                }
            }
            assert!(
                whole > 50 && empty > 20 && partial > 50,
                "{whole} whole, {empty} empty, {partial} partial"
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
        let got = classify(&mask, 1, 3, 4, Device::Cpu, true).unwrap();
        assert_eq!(got.size(), [1, 1, 1]);
        assert_eq!(got.int64_value(&[0, 0, 0]), 0);
        let causal_only = AttentionMask {
            causal: true,
            ..Default::default()
        };
        assert!(classify(&causal_only, 1, 3, 4, Device::Cpu, true).is_none());
    }
}
