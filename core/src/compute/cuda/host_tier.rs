//! The host tier: pinned host memory where a GPU node's experts wait,
//! already in the GPU's bf16 layout, so that paging one in is a single
//! copy at full PCIe speed and computing one on the CPU reads it in place.
//!
//! An expert enters the tier the first time it is paged in or computed
//! where it waits, while the node's host budget has room, and stays there;
//! beyond the budget, each use reads the checkpoint again. The tier's
//! memory is pinned without write-combining, because the CPU reads it when
//! it computes an expert where it waits; staging buffers that only carry an
//! expert to the GPU once are write-combined, which the CPU writes faster.
//! The tier is keyed by (layer, expert): a backend serves one checkpoint.
//! Experts are copied straight from the checkpoint's memory map into
//! pinned memory (bf16 as stored; f32 and f16 rounded on the way), with
//! no f32 copy between.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;
use cudarc::driver::{CudaContext, PinnedHostSlice};
use half::bf16;

use super::layout::ExpertLayout;
use crate::model::checkpoint::{Checkpoint, ExpertWeights};
use crate::{CoreError, CoreResult};

/// Where an expert's host copy lives.
pub(super) enum HostBuffer {
    /// Page-locked: the GPU copies from it directly.
    Pinned(PinnedHostSlice<bf16>),
    /// Ordinary memory, for a copy only the CPU reads once.
    Pageable(Vec<bf16>),
}

/// One expert's weights in host memory, laid out as on the GPU.
pub(super) struct HostExpert {
    pub layout: ExpertLayout,
    buffer: HostBuffer,
}

impl HostExpert {
    pub fn buffer(&self) -> &HostBuffer {
        &self.buffer
    }

    /// The weights, once any copy in flight from them has finished.
    pub fn weights(&self) -> CoreResult<&[bf16]> {
        match &self.buffer {
            HostBuffer::Pinned(pinned) => pinned
                .context()
                .bind_to_thread()
                .and_then(|()| pinned.as_slice())
                .map_err(|error| {
                    CoreError::Device(format!("cannot read an expert in pinned memory: {error}"))
                }),
            HostBuffer::Pageable(values) => Ok(values),
        }
    }
}

impl Drop for HostExpert {
    fn drop(&mut self) {
        // Pinned memory is freed through the driver next, which needs the
        // context current on whichever thread drops the last handle.
        if let HostBuffer::Pinned(pinned) = &self.buffer {
            let _ = pinned.context().bind_to_thread();
        }
    }
}

/// What a host copy is fetched for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Copying to the GPU: pinned even when not kept.
    Upload,
    /// Computing on the CPU.
    HostCompute,
}

/// The host budget's ledger.
struct Ledger {
    /// None: no limit.
    budget: Option<u64>,
    used: u64,
    experts: HashMap<(usize, u32), Arc<HostExpert>>,
}

impl Ledger {
    /// Sets aside `bytes` if the budget has room for them.
    fn reserve(&mut self, bytes: u64) -> bool {
        let fits = self
            .budget
            .is_none_or(|budget| self.used.saturating_add(bytes) <= budget);
        if fits {
            self.used = self.used.saturating_add(bytes);
        }
        fits
    }
}

/// The experts kept in pinned host memory, within a byte budget.
pub(super) struct HostTier {
    context: Arc<CudaContext>,
    ledger: Mutex<Ledger>,
}

impl HostTier {
    /// An empty tier that keeps at most `budget` bytes (None: no limit).
    pub fn new(context: Arc<CudaContext>, budget: Option<u64>) -> Self {
        Self {
            context,
            ledger: Mutex::new(Ledger {
                budget,
                used: 0,
                experts: HashMap::new(),
            }),
        }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Expert `expert` of `layer`: from the tier, or read from `checkpoint`
    /// and kept if the budget has room.
    pub fn fetch(
        &self,
        checkpoint: &Checkpoint,
        layer: usize,
        expert: u32,
        purpose: Purpose,
    ) -> CoreResult<Arc<HostExpert>> {
        let config = checkpoint.config();
        super::refuse_unless_silu_without_biases(config.expert_activation, config.expert_biases)?;
        let key = (layer, expert);
        if let Some(kept) = self.ledger().experts.get(&key) {
            return Ok(Arc::clone(kept));
        }
        // Read without the lock: other experts' fetches go on meanwhile.
        let stored = checkpoint.stored_expert(layer, expert)?;
        let layout = ExpertLayout::of_stored(&stored);
        let bytes = layout.buffer_bytes() as u64;
        let keep = self.ledger().reserve(bytes);
        let fill = |buffer: &mut [bf16]| layout.fill_stored(&stored, buffer);
        let copied = match (keep, purpose) {
            (true, _) => self.pinned(layout, 0, fill),
            (false, Purpose::Upload) => self.pinned(layout, CU_MEMHOSTALLOC_WRITECOMBINED, fill),
            (false, Purpose::HostCompute) => {
                let mut buffer = vec![bf16::ZERO; layout.len];
                fill(&mut buffer);
                Ok(HostExpert {
                    layout,
                    buffer: HostBuffer::Pageable(buffer),
                })
            }
        };
        let mut ledger = self.ledger();
        let copied = match copied {
            Ok(copied) => Arc::new(copied),
            Err(error) => {
                if keep {
                    ledger.used -= bytes;
                }
                return Err(error);
            }
        };
        if keep {
            if let Some(kept) = ledger.experts.get(&key).cloned() {
                // Another caller kept it first.
                ledger.used -= bytes;
                return Ok(kept);
            }
            ledger.experts.insert(key, Arc::clone(&copied));
        }
        Ok(copied)
    }

    /// `weights` in write-combined pinned memory, to be copied to the GPU
    /// once.
    pub fn staged(&self, weights: &ExpertWeights) -> CoreResult<HostExpert> {
        let layout = ExpertLayout::of(weights)?;
        self.pinned(layout, CU_MEMHOSTALLOC_WRITECOMBINED, |buffer| {
            layout.fill(weights, buffer)
        })
    }

    /// A pinned buffer of `layout` (allocated with `flags`), written by `fill`.
    fn pinned(
        &self,
        layout: ExpertLayout,
        flags: u32,
        fill: impl FnOnce(&mut [bf16]),
    ) -> CoreResult<HostExpert> {
        let failed = |error| {
            CoreError::Device(format!(
                "cannot pin {} of host memory for an expert: {error}",
                crate::compute::buffering::format_byte_size(layout.buffer_bytes() as u64)
            ))
        };
        // SAFETY: every element is written by `fill` before anything reads it.
        let mut pinned = unsafe {
            self.context
                .alloc_pinned_with_flags::<bf16>(layout.len, flags)
        }
        .map_err(failed)?;
        fill(pinned.as_mut_slice().map_err(failed)?);
        Ok(HostExpert {
            layout,
            buffer: HostBuffer::Pinned(pinned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_keeps_within_its_budget() {
        let mut ledger = Ledger {
            budget: Some(100),
            used: 0,
            experts: HashMap::new(),
        };
        assert!(ledger.reserve(60));
        assert!(!ledger.reserve(60));
        assert!(ledger.reserve(40));
        assert_eq!(ledger.used, 100);
        let mut unlimited = Ledger {
            budget: None,
            used: u64::MAX - 1,
            experts: HashMap::new(),
        };
        assert!(unlimited.reserve(1));
    }
}
