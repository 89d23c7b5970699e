//! The expert FFN, `down(silu(gate(x)) * up(x))`, behind a backend trait so
//! that a CUDA backend can hold weights in GPU memory later.
//!
//! - [`ComputeBackend`] and [`Expert`]: where experts live and how a batch's
//!   rows reach them; [`add_weighted`] is the one way every path weights an
//!   expert's output.
//! - `cpu_backend`: [`CpuBackend`], which runs a batch's experts at once as
//!   tasks of whole experts or row ranges, largest first, on its own rayon
//!   pool, never on the async runtime; [`CpuBlocking`], how it cuts the
//!   work, which changes no result.
//! - `cpu_expert`: one expert on the CPU, its weights laid out once, at
//!   load, for its kernel, with gate and up fused into one product.
//! - `panel_gemm`: the experts' products, on weights in column panels of
//!   f32 or bf16 (AVX-512 FMA, AVX512-BF16 `vdpbf16ps`, AVX2 or portable
//!   kernels that compute the same bits; bf16 on AMX in its own rounding),
//!   in a summation order that depends on nothing but the shapes.
//! - `plain_gemm`: [`matmul`], the `gemm` crate's plain product, the
//!   benchmarks' ceiling.
//! - `silu`: the vectorised `silu(gate) * up` between the two GEMMs.
//! - [`buffering`]: Expert Buffering, which experts stay resident within a
//!   memory budget.

pub mod buffering;
mod cpu_backend;
mod cpu_expert;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
mod panel_gemm;
mod plain_gemm;
mod silu;

use std::sync::Arc;

use crate::model::checkpoint::{Checkpoint, ExpertWeights};
use crate::model::config::ModelConfig;
use crate::{CoreError, CoreResult};

pub use cpu_backend::{CpuBackend, CpuBlocking, WeightFormat};
pub use device::{BackendOptions, Device, open_backend};
pub use plain_gemm::matmul;

/// One expert's share of a batch: which rows it takes and with what weight.
pub struct ExpertWork<'a> {
    pub expert: &'a dyn Expert,
    /// Indices of input rows, strictly increasing.
    pub rows: &'a [u32],
    /// The routing weight for each entry of `rows`.
    pub weights: &'a [f32],
}

/// A place where experts can live and run: the CPU, or later a GPU.
pub trait ComputeBackend: Send + Sync {
    /// Returns a short description, for example `cpu (2 threads)`.
    fn describe(&self) -> String;

    /// Whether a small job may compute on whichever thread asks, its caller
    /// waiting (the CPU's arithmetic), rather than only on the thread that
    /// owns the device (a GPU's queue and context).
    fn computes_on_any_thread(&self) -> bool {
        false
    }

    /// Makes one expert resident on this backend.
    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>>;

    /// The bytes expert `expert` of `config` takes when resident here,
    /// known before it is loaded: Expert Buffering budgets with it.
    fn resident_bytes(&self, config: &ModelConfig, expert: u32) -> u64;

    /// The speeds Expert Buffering weighs when an expert is not resident.
    fn cost_model(&self) -> buffering::CostModel;

    /// Makes expert `expert` of `layer` resident from where it waits: by
    /// default the checkpoint, whose pages the OS keeps cached.
    fn page_in(
        &self,
        checkpoint: &Checkpoint,
        layer: usize,
        expert: u32,
    ) -> CoreResult<Arc<dyn Expert>> {
        self.load_expert(checkpoint.load_expert(layer, expert)?)
    }

    /// Computes a non-resident expert where it waits, without paging it in
    /// (`output` as [`Expert::forward`]); only for backends whose
    /// [`ComputeBackend::cost_model`] has a `waiting_flops`.
    fn compute_where_waiting(
        &self,
        _checkpoint: &Checkpoint,
        layer: usize,
        expert: u32,
        _input: &[f32],
        _output: &mut [f32],
    ) -> CoreResult<()> {
        Err(CoreError::Config(format!(
            "{} cannot compute expert {expert} of layer {layer} where it waits",
            self.describe()
        )))
    }

    /// Runs each expert of `work` on its rows of `input` (`[rows, width]`)
    /// and returns its outputs, unweighted: item after item in the order of
    /// `work`, each item's rows in its order (`[Σ rows, width]`).
    ///
    /// Backends may run the experts in any order or at once, as long as
    /// each row's result stays the same.
    /// A device that fails (a GPU error) fails the whole call.
    fn expert_outputs(
        &self,
        input: &[f32],
        width: usize,
        work: &[ExpertWork<'_>],
    ) -> CoreResult<Vec<f32>> {
        let mut outputs = Vec::new();
        for item in work {
            let gathered = gather_rows(input, width, item.rows);
            let start = outputs.len();
            outputs.resize(start + gathered.len(), 0f32);
            item.expert
                .forward(&gathered, item.rows.len(), &mut outputs[start..]);
        }
        Ok(outputs)
    }

    /// Milliseconds the backend computes `work` once its input is where it
    /// computes, without copies in and out (the median of `repeats`), for
    /// benchmarks; None for backends that compute where the input already
    /// is (the CPU).
    fn time_compute_only(
        &self,
        _input: &[f32],
        _width: usize,
        _work: &[ExpertWork<'_>],
        _repeats: usize,
    ) -> Option<CoreResult<f64>> {
        None
    }

    /// Returns, per row of `input`, the sum of the weighted expert outputs.
    ///
    /// Sums are taken in the order of `work`; callers pass it by ascending
    /// expert id so that every row's sum has a fixed order, the order a
    /// router also follows when experts answer from several nodes.
    fn run_experts(
        &self,
        input: &[f32],
        width: usize,
        work: &[ExpertWork<'_>],
    ) -> CoreResult<Vec<f32>> {
        let outputs = self.expert_outputs(input, width, work)?;
        let mut combined = vec![0f32; input.len()];
        let mut offset = 0;
        for item in work {
            for (&row, &weight) in item.rows.iter().zip(item.weights) {
                let row = row as usize;
                add_weighted(
                    &mut combined[row * width..(row + 1) * width],
                    &outputs[offset..offset + width],
                    weight,
                );
                offset += width;
            }
        }
        Ok(combined)
    }
}

/// `values[i] += bias[i]`: biases added to logits and to projections.
pub fn add_into(values: &mut [f32], bias: &[f32]) {
    for (value, bias) in values.iter_mut().zip(bias) {
        *value += bias;
    }
}

/// `sum += value · weight`, element by element: the one way every path
/// (in process, an expert node weighting its rows, a router adding them)
/// forms a weighted contribution, so that all give the same bits.
pub fn add_weighted(sum: &mut [f32], value: &[f32], weight: f32) {
    for (sum, value) in sum.iter_mut().zip(value) {
        *sum += value * weight;
    }
}

/// Adds zero experts' outputs (LongCat-Flash's identity experts: a row's
/// input times the pick's weight) for `picks` of (row, weight), after the
/// routed experts', as transformers adds them (their ids come last).
pub fn add_zero_experts(output: &mut [f32], input: &[f32], width: usize, picks: &[(u32, f32)]) {
    for &(row, weight) in picks {
        let row = row as usize * width..(row as usize + 1) * width;
        add_weighted(&mut output[row.clone()], &input[row], weight);
    }
}

/// `value · weight`, element by element, in place (see [`add_weighted`]:
/// adding the result to zero gives the same bits as adding it directly).
pub fn scale_by_weight(values: &mut [f32], weight: f32) {
    for value in values {
        *value *= weight;
    }
}

/// For families whose routing weight multiplies an expert's input (Llama
/// 4): per item, its rows of `input` (`[_, width]`) each multiplied by its
/// weight, item after item, as one matrix (`[Σ rows, width]`). The experts
/// then take these rows in order, with weight one.
pub fn weighted_inputs<'a>(
    input: &[f32],
    width: usize,
    items: impl IntoIterator<Item = (&'a [u32], &'a [f32])>,
) -> Vec<f32> {
    let mut weighted = Vec::new();
    for (rows, weights) in items {
        for (&row, &weight) in rows.iter().zip(weights) {
            let row = row as usize;
            weighted.extend(
                input[row * width..(row + 1) * width]
                    .iter()
                    .map(|value| value * weight),
            );
        }
    }
    weighted
}

/// The rows `rows` of `input` (`[_, width]`), in order, as one matrix.
pub fn gather_rows(input: &[f32], width: usize, rows: &[u32]) -> Vec<f32> {
    let mut gathered = Vec::with_capacity(rows.len() * width);
    for &row in rows {
        let row = row as usize;
        gathered.extend_from_slice(&input[row * width..(row + 1) * width]);
    }
    gathered
}

/// One resident expert.
pub trait Expert: Send + Sync {
    fn hidden_size(&self) -> usize;

    /// Returns the bytes of weights this expert keeps resident.
    fn weight_bytes(&self) -> usize;

    /// Computes `output = ffn(input)` for `rows` rows, both `[rows, hidden]`,
    /// as one batched computation. Each row's result is bit-identical
    /// whatever the other rows are and however many there are.
    fn forward(&self, input: &[f32], rows: usize, output: &mut [f32]);

    /// Like [`Expert::forward`], on the calling thread alone, with the same
    /// result: for backends that run several experts at once, one per thread.
    fn forward_serial(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        self.forward(input, rows, output);
    }

    /// Parts [`Expert::forward_part`] cuts this expert into (slices of its
    /// intermediate dimension on the CPU), so that a backend can spread a
    /// few small batches over all its threads: 1 where there is no cut.
    fn parts(&self) -> usize {
        1
    }

    /// Part `part`'s term of the FFN for `rows` rows, on the calling
    /// thread, written to `term` (`[rows, hidden]`).
    fn forward_part(&self, part: usize, input: &[f32], rows: usize, term: &mut [f32]) {
        debug_assert_eq!(part, 0);
        self.forward_serial(input, rows, term);
    }

    /// The FFN's output from every part's term (one `[rows, hidden]` each,
    /// in part order), the same bits as [`Expert::forward`].
    fn sum_parts(&self, terms: &[Vec<f32>], output: &mut [f32]) {
        output.copy_from_slice(&terms[0]);
    }
}
