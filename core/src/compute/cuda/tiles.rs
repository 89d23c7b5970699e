//! [`TilePlan`]: how a batch's rows are laid out on the GPU so that a row's
//! result never depends on the rest of the batch.
//!
//! cuBLAS chooses its kernel (tile shape, split-K) from the problem's
//! shape and alignment, and different kernels sum in different orders. So
//! every GEMM of an expert has the same shape whatever the batch: each
//! expert's rows are cut into tiles of exactly [`TILE_ROWS`] rows, the last
//! padded with zero rows, and each tile is one GEMM call. Each tile's
//! region starts on an [`ALIGN_BYTES`](super::layout::ALIGN_BYTES)
//! boundary, so every call also sees the same alignment. A row's result
//! then depends only on its expert and its own values: a GEMM sums each
//! output element over the shared dimension alone, and padding rows are
//! other output columns.
//!
//! The price is padding and rereading: an expert with few rows still
//! computes a whole tile, and its weights are read once per tile. At
//! [`TILE_ROWS`] rows a tile's GEMM does 128 FLOP per weight byte, below the
//! about 200 that an H100 or H200 computes per byte it reads: a
//! decode-sized batch costs about what reading its experts' weights costs,
//! and a large batch is bound by rereading them, below the GPU's peak.

use half::bf16;

use super::layout::aligned_len;
use crate::{CoreError, CoreResult};

/// Rows per GEMM call: enough for the tensor cores to do real work per
/// weight read, few enough that padding a decode-sized batch costs little
/// beyond reading the weights.
pub(super) const TILE_ROWS: usize = 128;

/// The slot of a padding row in [`TilePlan::slots`]: the gather writes
/// zeros there.
pub(super) const PADDING_ROW: u32 = u32::MAX;

/// One expert's tiles within a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ExpertTiles {
    /// Index of its first tile among the batch's tiles.
    pub first_tile: usize,
    pub tiles: usize,
    /// Its rows, before padding.
    pub rows: usize,
    pub intermediate: usize,
    /// Element offset of its first tile in the gate/up buffer (f32).
    pub gate_up_offset: usize,
    /// Elements per tile in the gate/up buffer: `[TILE_ROWS, 2 · intermediate]`, aligned.
    pub gate_up_pitch: usize,
    /// Element offset of its first tile in the activation buffer (bf16).
    pub activated_offset: usize,
    /// Elements per tile in the activation buffer: `[TILE_ROWS, intermediate]`, aligned.
    pub activated_pitch: usize,
}

/// The buffers of one batch on the GPU and where each expert's tiles lie
/// in them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TilePlan {
    pub hidden: usize,
    /// Elements per tile of the gathered input (bf16, `[TILE_ROWS, hidden]`)
    /// and of the output (f32, `[TILE_ROWS, hidden]`), aligned.
    pub input_pitch: usize,
    pub output_pitch: usize,
    pub experts: Vec<ExpertTiles>,
    pub total_tiles: usize,
    /// Elements of the gate/up buffer (f32), all experts.
    pub gate_up_len: usize,
    /// Elements of the activation buffer (bf16), all experts.
    pub activated_len: usize,
    /// Per tile slot, in tile order, the input row it takes, or
    /// [`PADDING_ROW`].
    pub slots: Vec<u32>,
}

impl TilePlan {
    /// Plans a batch of `input_rows` rows of width `hidden` for experts
    /// given as (intermediate size, rows taken); every row index must lie
    /// inside the batch.
    pub fn new<'a>(
        hidden: usize,
        input_rows: usize,
        experts: impl IntoIterator<Item = (usize, &'a [u32])>,
    ) -> CoreResult<Self> {
        let mut plan = Self {
            hidden,
            input_pitch: aligned_len(TILE_ROWS * hidden, size_of::<bf16>()),
            output_pitch: aligned_len(TILE_ROWS * hidden, size_of::<f32>()),
            experts: Vec::new(),
            total_tiles: 0,
            gate_up_len: 0,
            activated_len: 0,
            slots: Vec::new(),
        };
        for (intermediate, rows) in experts {
            if let Some(&row) = rows.iter().find(|&&row| row as usize >= input_rows) {
                return Err(CoreError::Device(format!(
                    "row {row} is outside the batch of {input_rows} rows"
                )));
            }
            let tiles = rows.len().div_ceil(TILE_ROWS);
            let tiles_of = ExpertTiles {
                first_tile: plan.total_tiles,
                tiles,
                rows: rows.len(),
                intermediate,
                gate_up_offset: plan.gate_up_len,
                gate_up_pitch: aligned_len(TILE_ROWS * 2 * intermediate, size_of::<f32>()),
                activated_offset: plan.activated_len,
                activated_pitch: aligned_len(TILE_ROWS * intermediate, size_of::<bf16>()),
            };
            plan.total_tiles += tiles;
            plan.gate_up_len += tiles * tiles_of.gate_up_pitch;
            plan.activated_len += tiles * tiles_of.activated_pitch;
            plan.slots.extend_from_slice(rows);
            plan.slots.resize(plan.total_tiles * TILE_ROWS, PADDING_ROW);
            plan.experts.push(tiles_of);
        }
        Ok(plan)
    }

    /// Elements of the gathered input (bf16).
    pub fn input_len(&self) -> usize {
        self.total_tiles * self.input_pitch
    }

    /// Elements of the padded output (f32).
    pub fn output_len(&self) -> usize {
        self.total_tiles * self.output_pitch
    }

    /// Each expert's rows out of the padded output tiles, in order:
    /// `[Σ rows, hidden]`.
    pub fn compact(&self, padded: &[f32]) -> Vec<f32> {
        let hidden = self.hidden;
        let total_rows: usize = self.experts.iter().map(|expert| expert.rows).sum();
        let mut outputs = Vec::with_capacity(total_rows * hidden);
        for expert in &self.experts {
            let mut left = expert.rows;
            for tile in expert.first_tile..expert.first_tile + expert.tiles {
                let rows = left.min(TILE_ROWS);
                let start = tile * self.output_pitch;
                outputs.extend_from_slice(&padded[start..start + rows * hidden]);
                left -= rows;
            }
        }
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cuda::layout::ALIGN_BYTES;

    #[test]
    fn experts_take_whole_tiles_with_padding_rows_last() {
        let first: Vec<u32> = (0..130).collect();
        let second = [3u32, 7];
        let empty: [u32; 0] = [];
        let plan = TilePlan::new(
            10,
            200,
            [(6, &first[..]), (6, &empty[..]), (9, &second[..])],
        )
        .unwrap();
        assert_eq!(plan.total_tiles, 3);
        let tiles: Vec<(usize, usize)> = plan
            .experts
            .iter()
            .map(|expert| (expert.first_tile, expert.tiles))
            .collect();
        assert_eq!(tiles, [(0, 2), (2, 0), (2, 1)]);
        assert_eq!(plan.slots.len(), 3 * TILE_ROWS);
        assert_eq!(&plan.slots[..130], &first[..]);
        assert!(plan.slots[130..256].iter().all(|&slot| slot == PADDING_ROW));
        assert_eq!(&plan.slots[256..258], &second);
        assert!(plan.slots[258..].iter().all(|&slot| slot == PADDING_ROW));
    }

    #[test]
    fn every_tile_starts_aligned() {
        let rows: Vec<u32> = (0..300).collect();
        let plan = TilePlan::new(7, 300, [(5, &rows[..]), (3, &rows[..1])]).unwrap();
        assert_eq!(plan.input_pitch * 2 % ALIGN_BYTES, 0);
        assert_eq!(plan.output_pitch * 4 % ALIGN_BYTES, 0);
        for expert in &plan.experts {
            assert_eq!(expert.gate_up_offset * 4 % ALIGN_BYTES, 0);
            assert_eq!(expert.gate_up_pitch * 4 % ALIGN_BYTES, 0);
            assert!(expert.gate_up_pitch >= TILE_ROWS * 2 * expert.intermediate);
            assert_eq!(expert.activated_offset * 2 % ALIGN_BYTES, 0);
            assert_eq!(expert.activated_pitch * 2 % ALIGN_BYTES, 0);
            assert!(expert.activated_pitch >= TILE_ROWS * expert.intermediate);
        }
        let last = &plan.experts[1];
        assert_eq!(
            plan.gate_up_len,
            last.gate_up_offset + last.tiles * last.gate_up_pitch
        );
    }

    #[test]
    fn compact_keeps_each_experts_rows_in_order_and_drops_padding() {
        let hidden = 3;
        let first: Vec<u32> = (0..129).collect();
        let plan = TilePlan::new(hidden, 129, [(4, &first[..]), (4, &first[5..7])]).unwrap();
        // Each padded output row holds its tile slot's number.
        let mut padded = vec![-1f32; plan.output_len()];
        for tile in 0..plan.total_tiles {
            for row in 0..TILE_ROWS {
                let start = tile * plan.output_pitch + row * hidden;
                padded[start..start + hidden].fill((tile * TILE_ROWS + row) as f32);
            }
        }
        let outputs = plan.compact(&padded);
        let slots: Vec<f32> = outputs.chunks(hidden).map(|row| row[0]).collect();
        let mut want: Vec<f32> = (0..129).map(|slot| slot as f32).collect();
        want.extend([256.0, 257.0]);
        assert_eq!(slots, want);
    }

    #[test]
    fn rows_outside_the_batch_are_refused() {
        let error = TilePlan::new(4, 2, [(4, &[0u32, 2][..])]).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("row 2 is outside the batch of 2 rows")
        );
    }
}
