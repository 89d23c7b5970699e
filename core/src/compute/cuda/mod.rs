//! [`CudaBackend`]: experts resident on one NVIDIA GPU (compute capability
//! 8.0 or newer) in bf16, through cudarc, which loads the driver, cuBLAS
//! and NVRTC at run time: moemesh builds without a CUDA toolkit, and a
//! machine without a GPU gets a [`CoreError::DeviceUnavailable`], never a
//! panic.
//!
//! - `probe`: finds the GPU and checks the driver, architecture and
//!   libraries ([`probe_device`]).
//! - `kernels`: the CUDA C kernels (gather to bf16, `silu(gate) · up`),
//!   compiled once per backend by NVRTC for the device's architecture.
//! - `blas`: the cuBLAS handle and the bf16 GEMM with f32 sums.
//! - `tiles`: the batch laid out in fixed tiles of rows, so that a row's
//!   result never depends on the rest of the batch.
//! - `gpu`: the opened GPU, weight uploads and the batch path.
//! - `layout`: one expert's bf16 buffer, the same on the GPU and the host.
//! - `expert`: resident experts and the registry that finds them in a batch.
//! - `host_tier`: pinned host memory, the tier experts wait in.
//! - `host_ffn`: the FFN on the CPU from that tier (computing an expert
//!   where it waits).
//!
//! A row's output is the same bits whatever else its batch holds, on the
//! GPU and on the host path alike. The two paths do not give each other's
//! bits (the GPU rounds its input and activations to bf16, the host keeps
//! them in f32), nor the CPU backend's: they agree to about bf16's
//! precision.

mod blas;
mod expert;
mod gpu;
mod host_ffn;
mod host_tier;
mod kernels;
mod layout;
mod probe;
mod tiles;

use std::sync::Arc;

use expert::{CudaExpert, ExpertRegistry};
use gpu::{BatchItem, Gpu};
use host_tier::{HostExpert, HostTier, Purpose};
pub(crate) use probe::probe_device;

use super::buffering::{CostModel, format_byte_size};
use super::{ComputeBackend, Expert, ExpertWork, gather_rows};
use crate::model::checkpoint::{Checkpoint, ExpertWeights};
use crate::model::config::{Activation, ModelConfig};
use crate::{CoreError, CoreResult};

/// Experts resident on one GPU, waiting in pinned host memory when not.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    /// The experts this backend made resident, for batching them together.
    registry: ExpertRegistry,
    host_tier: HostTier,
    /// Computes experts where they wait (on the host).
    pool: rayon::ThreadPool,
    threads: usize,
    description: String,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, with `threads` host threads (0: one per core)
    /// and at most `host_budget` bytes of pinned host memory for waiting
    /// experts (None: no limit).
    pub fn open(ordinal: usize, threads: usize, host_budget: Option<u64>) -> CoreResult<Self> {
        let device = probe::open_device(ordinal)?;
        let gpu = Arc::new(Gpu::open(&device, ordinal)?);
        let (pool, threads) =
            super::cpu_backend::compute_pool(threads, &format!("moemesh-cuda{ordinal}-host"))?;
        let budget = host_budget.map_or_else(|| "no limit".into(), format_byte_size);
        let description = format!(
            "cuda:{ordinal} ({}, bf16 weights, host tier {budget}, {threads} host threads)",
            device.info.description
        );
        Ok(Self {
            host_tier: HostTier::new(Arc::clone(gpu.context()), host_budget),
            gpu,
            registry: ExpertRegistry::default(),
            pool,
            threads,
            description,
        })
    }

    /// Copies `host` to the GPU as a resident expert.
    fn make_resident(&self, host: &HostExpert) -> CoreResult<Arc<dyn Expert>> {
        let weights = self.gpu.upload(host)?;
        let expert = Arc::new(CudaExpert::new(Arc::clone(&self.gpu), weights));
        self.registry.register(&expert);
        Ok(expert)
    }
}

/// The CUDA kernels compute `silu(gate) · up` experts without biases;
/// other experts (gpt-oss's) are refused by name rather than computed
/// wrong.
pub(super) fn refuse_unless_silu_without_biases(
    activation: Activation,
    biases: bool,
) -> CoreResult<()> {
    if activation == Activation::SiluGlu && !biases {
        return Ok(());
    }
    Err(CoreError::Device(format!(
        "the CUDA backend computes silu experts without biases, not {activation:?}{}; serve \
         this model on CPU expert nodes (--device cpu)",
        if biases { " with biases" } else { "" }
    )))
}

impl ComputeBackend for CudaBackend {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>> {
        refuse_unless_silu_without_biases(weights.activation, weights.biases.is_some())?;
        self.make_resident(&self.host_tier.staged(&weights)?)
    }

    fn resident_bytes(&self, config: &ModelConfig, expert: u32) -> u64 {
        (config.expert_weight_count(expert) * size_of::<half::bf16>()) as u64
    }

    /// Paging in copies from pinned memory over PCIe: about 25 GB/s, what
    /// PCIe 4 reaches and a cautious figure for PCIe 5. cuBLAS runs the
    /// bf16 GEMMs at about 400 TFLOP/s on an H100 or H200, well below
    /// their peak at these tile shapes. The host computes an expert where
    /// it waits at about 50 GFLOP/s per thread.
    fn cost_model(&self) -> CostModel {
        CostModel {
            page_in_bytes_per_second: 25e9,
            resident_flops: 400e12,
            waiting_flops: Some(50e9 * self.threads as f64),
        }
    }

    /// Pages in from the host tier, where the expert is kept after its
    /// first use while the host budget has room.
    fn page_in(
        &self,
        checkpoint: &Checkpoint,
        layer: usize,
        expert: u32,
    ) -> CoreResult<Arc<dyn Expert>> {
        let host = self
            .host_tier
            .fetch(checkpoint, layer, expert, Purpose::Upload)?;
        self.make_resident(&host)
    }

    /// Computes on the host from the host tier's bf16 copy, keeping the
    /// expert there while the host budget has room.
    fn compute_where_waiting(
        &self,
        checkpoint: &Checkpoint,
        layer: usize,
        expert: u32,
        input: &[f32],
        output: &mut [f32],
    ) -> CoreResult<()> {
        let host = self
            .host_tier
            .fetch(checkpoint, layer, expert, Purpose::HostCompute)?;
        let hidden = host.layout.hidden;
        if !input.len().is_multiple_of(hidden) || output.len() != input.len() {
            return Err(CoreError::Device(format!(
                "expert {expert} of layer {layer}: {} input and {} output values are not \
                 whole rows of {hidden}",
                input.len(),
                output.len()
            )));
        }
        let rows = input.len() / hidden;
        let weights = host.weights()?;
        host_ffn::host_ffn(&self.pool, &host.layout, weights, input, rows, output);
        Ok(())
    }

    /// Times the GPU part of [`ComputeBackend::expert_outputs`] with CUDA
    /// events; every expert of `work` must be this backend's.
    fn time_compute_only(
        &self,
        input: &[f32],
        width: usize,
        work: &[ExpertWork<'_>],
        repeats: usize,
    ) -> Option<CoreResult<f64>> {
        let resident: Option<Vec<Arc<CudaExpert>>> = work
            .iter()
            .map(|item| self.registry.resolve(item.expert))
            .collect();
        let Some(resident) = resident else {
            return Some(Err(CoreError::Device(
                "only this backend's experts can be timed on the GPU".into(),
            )));
        };
        let items: Vec<BatchItem<'_>> = work
            .iter()
            .zip(&resident)
            .map(|(item, expert)| BatchItem {
                weights: expert.weights(),
                rows: item.rows,
            })
            .collect();
        Some(self.gpu.time_batch(input, width, &items, repeats))
    }

    /// Runs this backend's experts as one batch on the GPU (one copy in,
    /// one copy out) and any other expert through its own `forward`; a
    /// GPU failure fails the call.
    fn expert_outputs(
        &self,
        input: &[f32],
        width: usize,
        work: &[ExpertWork<'_>],
    ) -> CoreResult<Vec<f32>> {
        let resident: Vec<Option<Arc<CudaExpert>>> = work
            .iter()
            .map(|item| self.registry.resolve(item.expert))
            .collect();
        let items: Vec<BatchItem<'_>> = work
            .iter()
            .zip(&resident)
            .filter_map(|(item, expert)| {
                expert.as_ref().map(|expert| BatchItem {
                    weights: expert.weights(),
                    rows: item.rows,
                })
            })
            .collect();
        let on_gpu_rows: usize = items.iter().map(|item| item.rows.len()).sum();
        let on_gpu = self.gpu.run_batch(input, width, &items)?;
        if on_gpu.len() != on_gpu_rows * width {
            return Err(CoreError::Device(format!(
                "cuda:{}: a batch of {on_gpu_rows} rows came back with {} values",
                self.gpu.ordinal,
                on_gpu.len()
            )));
        }
        if items.len() == work.len() {
            return Ok(on_gpu);
        }
        let mut outputs = Vec::new();
        let mut taken = 0;
        for (item, expert) in work.iter().zip(&resident) {
            let len = item.rows.len() * width;
            if expert.is_some() {
                outputs.extend_from_slice(&on_gpu[taken..taken + len]);
                taken += len;
            } else {
                let start = outputs.len();
                outputs.resize(start + len, 0f32);
                let gathered = gather_rows(input, width, item.rows);
                item.expert
                    .forward(&gathered, item.rows.len(), &mut outputs[start..]);
            }
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opening_without_a_usable_gpu_is_an_error_not_a_panic() {
        match CudaBackend::open(4096, 1, None) {
            Err(CoreError::DeviceUnavailable(message)) => {
                assert!(message.starts_with("cuda:4096: "), "{message}")
            }
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("cuda:4096 opened"),
        }
    }
}
