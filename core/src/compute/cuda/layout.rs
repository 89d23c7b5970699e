//! [`ExpertLayout`]: how one expert's bf16 weights lie in one buffer, the
//! same on the GPU and in pinned host memory, so that paging an expert in
//! is one copy.
//!
//! The buffer holds gate and up stacked as one `[2 · intermediate, hidden]`
//! matrix (gate rows first), so that one GEMM yields both, then `down`
//! (`[hidden, intermediate]`), all `[out, in]` as checkpoints store them.
//! `down` starts on a [`ALIGN_BYTES`] boundary: cuBLAS picks its kernels
//! partly by pointer alignment, and an expert's weights must look the same
//! to it on every node that holds a replica.

use half::bf16;

use moemesh_proto::codec::WireDtype;

use crate::model::checkpoint::{Encoding, ExpertWeights, StoredExpert, StoredTensor};
use crate::{CoreError, CoreResult};

/// The alignment of every matrix the GPU path hands to cuBLAS: cudaMalloc's
/// own, so an aligned offset into an allocation is as aligned as its start.
pub(super) const ALIGN_BYTES: usize = 256;

/// Rounds `elements` of `element_bytes` each up to a whole number of
/// [`ALIGN_BYTES`].
pub(super) fn aligned_len(elements: usize, element_bytes: usize) -> usize {
    let per_block = ALIGN_BYTES / element_bytes;
    elements.div_ceil(per_block) * per_block
}

/// Where gate/up and down lie in one expert's bf16 buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExpertLayout {
    pub hidden: usize,
    pub intermediate: usize,
    /// Element offset of `down`.
    pub down_offset: usize,
    /// Elements in the buffer, padding included.
    pub len: usize,
}

impl ExpertLayout {
    pub fn new(hidden: usize, intermediate: usize) -> Self {
        let down_offset = aligned_len(2 * intermediate * hidden, size_of::<bf16>());
        Self {
            hidden,
            intermediate,
            down_offset,
            len: down_offset + hidden * intermediate,
        }
    }

    /// Bytes of weights, padding excluded: what Expert Buffering budgets.
    pub fn weight_bytes(&self) -> usize {
        3 * self.hidden * self.intermediate * size_of::<bf16>()
    }

    /// Bytes of the whole buffer.
    pub fn buffer_bytes(&self) -> usize {
        self.len * size_of::<bf16>()
    }

    /// `[2 · intermediate, hidden]`: gate rows, then up rows.
    pub fn gate_up<'a>(&self, buffer: &'a [bf16]) -> &'a [bf16] {
        &buffer[..2 * self.intermediate * self.hidden]
    }

    /// `[hidden, intermediate]`.
    pub fn down<'a>(&self, buffer: &'a [bf16]) -> &'a [bf16] {
        &buffer[self.down_offset..self.len]
    }

    /// The layout of `weights`, checking that its projections have the
    /// sizes it claims.
    pub fn of(weights: &ExpertWeights) -> CoreResult<Self> {
        let (hidden, intermediate) = (weights.hidden_size, weights.intermediate_size);
        if weights.gate_proj.len() != intermediate * hidden
            || weights.up_proj.len() != intermediate * hidden
            || weights.down_proj.len() != hidden * intermediate
        {
            return Err(CoreError::Checkpoint(
                "expert projections do not match their sizes".into(),
            ));
        }
        Ok(Self::new(hidden, intermediate))
    }

    /// Writes `weights` into `buffer` (`len` elements) in this layout,
    /// rounded to bf16 (exact for bf16 checkpoints); padding is zero.
    pub fn fill(&self, weights: &ExpertWeights, buffer: &mut [bf16]) {
        debug_assert_eq!(buffer.len(), self.len);
        let gate_end = self.intermediate * self.hidden;
        let projections = [
            (&weights.gate_proj, 0),
            (&weights.up_proj, gate_end),
            (&weights.down_proj, self.down_offset),
        ];
        for (values, start) in projections {
            for (slot, &value) in buffer[start..start + values.len()].iter_mut().zip(values) {
                *slot = bf16::from_f32(value);
            }
        }
        buffer[2 * gate_end..self.down_offset].fill(bf16::ZERO);
    }

    /// Writes `stored` into `buffer` (`len` elements) in this layout,
    /// straight from the checkpoint's memory map: bf16 tensors are copied
    /// as they are, f32 and f16 ones rounded to bf16; padding is zero. The
    /// mapped pages are released after each projection.
    pub fn fill_stored(&self, stored: &StoredExpert<'_>, buffer: &mut [bf16]) {
        debug_assert_eq!(buffer.len(), self.len);
        let gate_end = self.intermediate * self.hidden;
        let projections = [
            (&stored.gate_proj, 0),
            (&stored.up_proj, gate_end),
            (&stored.down_proj, self.down_offset),
        ];
        // Each projection holds intermediate · hidden values.
        for (tensor, start) in projections {
            copy_as_bf16(tensor, &mut buffer[start..start + gate_end]);
            tensor.release_pages();
        }
        buffer[2 * gate_end..self.down_offset].fill(bf16::ZERO);
    }

    /// The layout of a stored expert.
    pub fn of_stored(stored: &StoredExpert<'_>) -> Self {
        Self::new(stored.hidden_size, stored.intermediate_size)
    }

    /// The buffer of `weights` in ordinary memory.
    #[cfg(test)]
    pub fn filled_buffer(&self, weights: &ExpertWeights) -> Vec<bf16> {
        let mut buffer = vec![bf16::ZERO; self.len];
        self.fill(weights, &mut buffer);
        buffer
    }
}

/// `tensor`'s values as bf16 into `into` (as many as it holds).
fn copy_as_bf16(tensor: &StoredTensor<'_>, into: &mut [bf16]) {
    match tensor.encoding {
        Encoding::Plain(WireDtype::Bf16) => {
            for (slot, bytes) in into.iter_mut().zip(tensor.bytes.chunks_exact(2)) {
                *slot = bf16::from_le_bytes([bytes[0], bytes[1]]);
            }
        }
        _ => {
            for (slot, value) in into.iter_mut().zip(tensor.to_f32()) {
                *slot = bf16::from_f32(value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::cpu_expert::tests::random_expert;

    #[test]
    fn down_starts_aligned_and_the_projections_come_back_in_place() {
        let weights = random_expert(24, 13, 1);
        let layout = ExpertLayout::of(&weights).unwrap();
        assert_eq!(layout.down_offset * 2 % ALIGN_BYTES, 0);
        assert!(layout.down_offset >= 2 * 13 * 24);
        assert_eq!(layout.weight_bytes(), 3 * 24 * 13 * 2);
        let buffer = layout.filled_buffer(&weights);
        let rounded = |values: &[f32]| -> Vec<bf16> {
            values.iter().map(|&value| bf16::from_f32(value)).collect()
        };
        let gate_up = layout.gate_up(&buffer);
        assert_eq!(gate_up[..13 * 24], rounded(&weights.gate_proj)[..]);
        assert_eq!(gate_up[13 * 24..], rounded(&weights.up_proj)[..]);
        assert_eq!(layout.down(&buffer), &rounded(&weights.down_proj)[..]);
        assert!(
            buffer[2 * 13 * 24..layout.down_offset]
                .iter()
                .all(|&value| value == bf16::ZERO)
        );
    }

    #[test]
    fn misshapen_projections_are_refused() {
        let mut weights = random_expert(8, 4, 2);
        weights.down_proj.pop();
        assert!(ExpertLayout::of(&weights).is_err());
    }

    #[test]
    fn aligned_lengths_round_up_to_whole_blocks() {
        assert_eq!(aligned_len(0, 2), 0);
        assert_eq!(aligned_len(1, 2), 128);
        assert_eq!(aligned_len(128, 2), 128);
        assert_eq!(aligned_len(65, 4), 128);
    }

    #[test]
    fn experts_copied_from_the_map_match_experts_read_as_f32() {
        // bf16 (copied as stored), f16 and f32 (rounded on the way) checkpoints.
        for name in ["mixtral_bf16_sharded", "qwen3_moe_f16", "mixtral"] {
            let dir = format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
            let checkpoint = crate::model::checkpoint::Checkpoint::open(dir.as_ref()).unwrap();
            let layer = checkpoint.config().moe_layers()[0];
            let stored = checkpoint.stored_expert(layer, 1).unwrap();
            let layout = ExpertLayout::of_stored(&stored);
            let mut buffer = vec![bf16::from_f32(7.0); layout.len];
            layout.fill_stored(&stored, &mut buffer);
            let weights = checkpoint.load_expert(layer, 1).unwrap();
            assert_eq!(layout, ExpertLayout::of(&weights).unwrap());
            assert!(buffer == layout.filled_buffer(&weights), "{name}");
        }
    }
}
