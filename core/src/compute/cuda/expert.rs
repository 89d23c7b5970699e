//! [`CudaExpert`]: one expert resident in GPU memory, and the registry
//! through which the backend finds its own experts among a batch's work.
//!
//! [`ExpertWork`](crate::compute::ExpertWork) hands experts over as
//! `&dyn Expert`; to run a batch's experts together the backend needs
//! their GPU weights back. The registry maps each resident expert's
//! address to a weak handle: an address whose handle is still alive is that
//! very expert, since two live objects never share an address (no field of
//! a `CudaExpert` is an `Expert`). Anything else a batch carries runs
//! through its own [`Expert::forward`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::gpu::{BatchItem, DeviceWeights, Gpu};
use crate::compute::Expert;

/// One expert resident on a GPU.
pub(super) struct CudaExpert {
    gpu: Arc<Gpu>,
    weights: DeviceWeights,
}

impl CudaExpert {
    pub fn new(gpu: Arc<Gpu>, weights: DeviceWeights) -> Self {
        Self { gpu, weights }
    }

    pub fn weights(&self) -> &DeviceWeights {
        &self.weights
    }
}

impl Expert for CudaExpert {
    fn hidden_size(&self) -> usize {
        self.weights.layout.hidden
    }

    fn weight_bytes(&self) -> usize {
        self.weights.layout.weight_bytes()
    }

    /// Runs this expert alone through the batch path. The trait has no
    /// error to return: if the GPU fails, every output is NaN, which the
    /// wire codec refuses to carry.
    fn forward(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        let all_rows: Vec<u32> = (0..rows)
            .filter_map(|row| u32::try_from(row).ok())
            .collect();
        let item = BatchItem {
            weights: &self.weights,
            rows: &all_rows,
        };
        match self.gpu.run_batch(input, self.hidden_size(), &[item]) {
            Ok(values) if values.len() == output.len() => output.copy_from_slice(&values),
            _ => output.fill(f32::NAN),
        }
    }
}

/// The experts a backend made resident, by address.
#[derive(Default)]
pub(super) struct ExpertRegistry {
    experts: Mutex<HashMap<usize, Weak<CudaExpert>>>,
}

impl ExpertRegistry {
    /// Records `expert`, forgetting experts dropped since.
    pub fn register(&self, expert: &Arc<CudaExpert>) {
        let mut experts = self.experts.lock().unwrap_or_else(PoisonError::into_inner);
        experts.retain(|_, known| known.strong_count() > 0);
        experts.insert(address_of(expert.as_ref()), Arc::downgrade(expert));
    }

    /// The resident expert behind `expert`, if this registry's backend made it.
    pub fn resolve(&self, expert: &dyn Expert) -> Option<Arc<CudaExpert>> {
        let address = address_of(expert);
        let experts = self.experts.lock().unwrap_or_else(PoisonError::into_inner);
        let found = experts.get(&address)?.upgrade()?;
        (address_of(found.as_ref()) == address).then_some(found)
    }
}

/// The address of an expert's data, the same whatever trait object or
/// reference points to it.
fn address_of(expert: &dyn Expert) -> usize {
    (expert as *const dyn Expert).cast::<()>() as usize
}
