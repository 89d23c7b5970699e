//! One expert on the CPU. Its weights are laid out once, at load, for the
//! panel kernels (see [`panel_gemm`](super::panel_gemm)), in slices of the
//! intermediate dimension with gate and up fused into one product; every
//! product sums its depth in an order fixed by the shapes, so that a row's
//! result is the same in every batch, on every host and with every thread
//! count.

use std::sync::Arc;

use super::cpu_backend::wake_an_extra_thread;
use super::panel_gemm::{PackedRows, PanelMatrix, Words};
use super::silu::{clamped_swiglu, silu_mul};
use super::{CpuBlocking, Expert, WeightFormat, add_into};
use crate::model::checkpoint::{ExpertBiases, ExpertWeights};
use crate::model::config::Activation;
use crate::{CoreError, CoreResult};

/// The FFN restricted to a range of the intermediate dimension: summed
/// over all slices, the outputs make the whole FFN.
struct FfnSlice {
    /// The slice's first intermediate column.
    first: usize,
    /// Intermediate columns in this slice.
    width: usize,
    /// `[hidden, 2 * width]`, gate columns then up columns.
    gate_up: PanelMatrix,
    /// `[width, hidden]`.
    down: PanelMatrix,
}

/// Splits the intermediate dimension into slices of about
/// [`SLICE_TARGET`] columns (a multiple of 32 but for the last), so that a
/// slice's activations stay in cache and a thread's scratch stays small
/// whatever the intermediate size.
fn intermediate_slices(intermediate: usize) -> Vec<(usize, usize)> {
    let count = intermediate.div_ceil(SLICE_TARGET).max(1);
    let width = intermediate.div_ceil(count).next_multiple_of(32);
    (0..intermediate)
        .step_by(width)
        .map(|first| (first, width.min(intermediate - first)))
        .collect()
}

/// About how many intermediate columns one FFN slice takes.
const SLICE_TARGET: usize = 768;

/// One expert resident on the CPU; [`CpuBackend`](super::CpuBackend) makes them.
pub(super) struct CpuExpert {
    hidden: usize,
    /// The FFN by slices of the intermediate dimension, in order.
    slices: Vec<FfnSlice>,
    /// How the weights are stored, and so how activations are laid out.
    words: Words,
    /// Columns a multi-threaded product hands to one thread at a time
    /// ([`CpuBlocking::panel_columns`]).
    task_columns: usize,
    activation: Activation,
    biases: Option<ExpertBiases>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

/// Per-thread buffers of the CPU experts, reused from call to call.
#[derive(Default)]
struct Scratch {
    /// The input, laid out once for every slice's gate/up product.
    input: PackedRows,
    gate_up: Vec<f32>,
    activated: Vec<f32>,
    /// A slice's activations, laid out for its down product.
    packed_activated: PackedRows,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

impl CpuExpert {
    /// Lays `weights` out for the kernel in `format`, slice by slice of the
    /// intermediate dimension, cut as `blocking` says; the expert computes
    /// on `threads` threads of `pool`.
    pub(super) fn new(
        weights: ExpertWeights,
        format: WeightFormat,
        blocking: CpuBlocking,
        pool: Arc<rayon::ThreadPool>,
        threads: usize,
    ) -> CoreResult<Self> {
        let ExpertWeights {
            hidden_size: hidden,
            intermediate_size: intermediate,
            gate_proj,
            up_proj,
            down_proj,
            activation,
            biases,
        } = weights;
        // Checked configs never ask for an empty expert, but weights can be
        // built by hand, and an empty dimension has no slices to cut.
        if hidden == 0 || intermediate == 0 {
            return Err(CoreError::Checkpoint(format!(
                "an expert needs a positive hidden size and intermediate size, got {hidden} and {intermediate}"
            )));
        }
        if gate_proj.len() != intermediate * hidden
            || up_proj.len() != intermediate * hidden
            || down_proj.len() != hidden * intermediate
        {
            return Err(CoreError::Checkpoint(
                "expert projections do not match their sizes".into(),
            ));
        }
        if let Some(biases) = &biases
            && (biases.gate.len() != intermediate
                || biases.up.len() != intermediate
                || biases.down.len() != hidden)
        {
            return Err(CoreError::Checkpoint(
                "expert biases do not match their projections".into(),
            ));
        }
        let words = Words::of(format);
        let mut slices = Vec::new();
        for (first, width) in intermediate_slices(intermediate) {
            // [in=hidden, out=2*width]: gate columns, then up columns.
            let gate_up = PanelMatrix::pack(words, hidden, 2 * width, |input, out| {
                if out < width {
                    gate_proj[(first + out) * hidden + input]
                } else {
                    up_proj[(first + out - width) * hidden + input]
                }
            });
            // [in=width, out=hidden]: rows first..first+width of down^T.
            let down = PanelMatrix::pack(words, width, hidden, |input, out| {
                down_proj[out * intermediate + first + input]
            });
            slices.push(FfnSlice {
                first,
                width,
                gate_up,
                down,
            });
        }
        Ok(Self {
            hidden,
            slices,
            words,
            task_columns: blocking.panel_columns,
            activation,
            biases,
            pool,
            threads,
        })
    }

    /// The FFN on `threads` threads of the pool (1: the calling thread).
    fn compute(&self, input: &[f32], rows: usize, output_rows: &mut [f32], threads: usize) {
        debug_assert_eq!(input.len(), rows * self.hidden);
        debug_assert_eq!(output_rows.len(), rows * self.hidden);
        if rows == 0 {
            return;
        }
        // Taken out rather than borrowed: a thread waiting inside a parallel
        // GEMM may run another expert's work, which then starts afresh.
        let mut scratch = SCRATCH.take();
        scratch.input.pack(self.words, input, rows, self.hidden);
        // Slice by slice: each slice's term added into the output.
        for (index, slice) in self.slices.iter().enumerate() {
            self.slice_term(slice, &mut scratch, output_rows, threads, index > 0);
        }
        self.add_down_bias(output_rows);
        SCRATCH.set(scratch);
    }

    /// One slice's term of the FFN for the rows in `scratch.input`: its
    /// activations, then its share of the down projection, written to
    /// `dst` or added to it when `accumulate`.
    fn slice_term(
        &self,
        slice: &FfnSlice,
        scratch: &mut Scratch,
        dst: &mut [f32],
        threads: usize,
        accumulate: bool,
    ) {
        let Scratch {
            input: packed_input,
            gate_up,
            activated,
            packed_activated,
        } = scratch;
        let (rows, width) = (dst.len() / self.hidden, slice.width);
        gate_up.resize(rows * 2 * width, 0.0);
        activated.resize(rows * width, 0.0);
        slice
            .gate_up
            .multiply(gate_up, packed_input, threads, false, self.task_columns);
        for (row_out, row_in) in activated
            .chunks_exact_mut(width)
            .zip(gate_up.chunks_exact_mut(2 * width))
        {
            let (gate, up) = row_in.split_at_mut(width);
            if let Some(biases) = &self.biases {
                let columns = slice.first..slice.first + width;
                add_into(gate, &biases.gate[columns.clone()]);
                add_into(up, &biases.up[columns]);
            }
            match self.activation {
                Activation::SiluGlu => silu_mul(row_out, gate, up),
                Activation::ClampedSwiglu { alpha, limit } => {
                    clamped_swiglu(row_out, gate, up, alpha, limit)
                }
            }
        }
        packed_activated.pack(self.words, activated, rows, width);
        slice.down.multiply(
            dst,
            packed_activated,
            threads,
            accumulate,
            self.task_columns,
        );
    }

    /// The down projection's bias, after every slice's term.
    fn add_down_bias(&self, output_rows: &mut [f32]) {
        if let Some(biases) = &self.biases {
            for row in output_rows.chunks_exact_mut(self.hidden) {
                add_into(row, &biases.down);
            }
        }
    }
}

impl Expert for CpuExpert {
    fn hidden_size(&self) -> usize {
        self.hidden
    }

    fn weight_bytes(&self) -> usize {
        self.slices
            .iter()
            .map(|slice| slice.gate_up.bytes() + slice.down.bytes())
            .sum()
    }

    fn forward(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        if self.threads == 1 {
            // On the caller's thread: no hand-off to the pool and back.
            self.compute(input, rows, output, 1);
        } else {
            // The caller sleeps until the pool is done. Woken alone, the
            // thread that takes the call wakes the next as it splits the
            // first product, and that one may wait behind it. With 10 ms
            // idle before each call of two rows, a second thread was
            // missing or over 200 µs late in 72-82 of 100 calls, against 4
            // with the extra thread; the median call took 927-1167 µs
            // against 715-743 (`expert_ffn_gflops -- 2 2 100 f32 10`).
            wake_an_extra_thread(&self.pool);
            self.pool
                .install(|| self.compute(input, rows, output, self.threads));
        }
    }

    fn forward_serial(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        self.compute(input, rows, output, 1);
    }

    fn parts(&self) -> usize {
        self.slices.len()
    }

    /// Slice `part` alone: written, not added, so that [`Expert::sum_parts`]
    /// adds the terms in the order `compute` adds them.
    fn forward_part(&self, part: usize, input: &[f32], rows: usize, term: &mut [f32]) {
        debug_assert_eq!(term.len(), rows * self.hidden);
        if rows == 0 {
            return;
        }
        let mut scratch = SCRATCH.take();
        scratch.input.pack(self.words, input, rows, self.hidden);
        self.slice_term(&self.slices[part], &mut scratch, term, 1, false);
        SCRATCH.set(scratch);
    }

    fn sum_parts(&self, terms: &[Vec<f32>], output: &mut [f32]) {
        let (first, rest) = terms.split_first().expect("an expert has parts");
        output.copy_from_slice(first);
        for term in rest {
            add_into(output, term);
        }
        self.add_down_bias(output);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::compute::{ComputeBackend, CpuBackend};

    pub(crate) fn random_expert(hidden: usize, intermediate: usize, seed: u64) -> ExpertWeights {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut matrix = |len: usize| {
            (0..len)
                .map(|_| rng.random_range(-0.2f32..0.2))
                .collect::<Vec<_>>()
        };
        ExpertWeights {
            hidden_size: hidden,
            intermediate_size: intermediate,
            gate_proj: matrix(intermediate * hidden),
            up_proj: matrix(intermediate * hidden),
            down_proj: matrix(hidden * intermediate),
            activation: Activation::SiluGlu,
            biases: None,
        }
    }

    /// The FFN written out naively in f64, from the checkpoint layout.
    fn naive_ffn(weights: &ExpertWeights, row: &[f32]) -> Vec<f64> {
        let (hidden, intermediate) = (weights.hidden_size, weights.intermediate_size);
        let project = |matrix: &[f32], outputs: usize, inputs: usize, x: &[f64]| -> Vec<f64> {
            (0..outputs)
                .map(|o| {
                    (0..inputs)
                        .map(|i| matrix[o * inputs + i] as f64 * x[i])
                        .sum()
                })
                .collect()
        };
        let x: Vec<f64> = row.iter().map(|&v| v as f64).collect();
        let gate = project(&weights.gate_proj, intermediate, hidden, &x);
        let up = project(&weights.up_proj, intermediate, hidden, &x);
        let activated: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        project(&weights.down_proj, hidden, intermediate, &activated)
    }

    #[test]
    fn cpu_expert_matches_the_naive_ffn() {
        // One intermediate slice, and three with a narrower last one.
        for (intermediate, slices) in [(160, 1), (1600, 3)] {
            assert_eq!(intermediate_slices(intermediate).len(), slices);
            let weights = random_expert(96, intermediate, 7);
            let backend = CpuBackend::new(2).unwrap();
            let expert = backend.load_expert(weights.clone()).unwrap();
            let rows = 5;
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let input: Vec<f32> = (0..rows * 96)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let mut output = vec![0f32; rows * 96];
            expert.forward(&input, rows, &mut output);
            for row in 0..rows {
                let want = naive_ffn(&weights, &input[row * 96..(row + 1) * 96]);
                for (got, want) in output[row * 96..(row + 1) * 96].iter().zip(&want) {
                    assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn an_expert_with_an_empty_dimension_is_refused() {
        let backend = CpuBackend::new(1).unwrap();
        for (hidden, intermediate) in [(8, 0), (0, 8)] {
            let error = backend
                .load_expert(random_expert(hidden, intermediate, 3))
                .err()
                .expect("an empty expert is refused")
                .to_string();
            assert!(
                error.contains(&format!("got {hidden} and {intermediate}")),
                "{error}"
            );
        }
    }

    #[test]
    fn intermediate_slices_cover_the_dimension_once() {
        for intermediate in [1, 96, 768, 769, 1408, 2048, 2816, 14336] {
            let slices = intermediate_slices(intermediate);
            let mut next = 0;
            for &(first, width) in &slices {
                assert_eq!(first, next);
                assert!(width > 0 && width <= SLICE_TARGET + 32);
                next = first + width;
            }
            assert_eq!(next, intermediate, "{slices:?}");
        }
        assert_eq!(
            intermediate_slices(2816),
            vec![(0, 704), (704, 704), (1408, 704), (2112, 704)]
        );
    }

    /// The FFN with bf16 weights as the kernel computes it, in f64: the
    /// weights, the input and the activations between the products
    /// rounded to bf16, everything else exact. An activation within an
    /// f32 rounding of a bf16 tie may round the other way in the kernel,
    /// moving every output by up to 2^-9 of its share, so the kernel
    /// matches this to a few 1e-4, not to f32 precision.
    fn naive_bf16_ffn(weights: &ExpertWeights, row: &[f32]) -> Vec<f64> {
        let (hidden, intermediate) = (weights.hidden_size, weights.intermediate_size);
        let bf16 = |value: f64| half::bf16::from_f64(value).to_f64();
        let project = |matrix: &[f32], outputs: usize, inputs: usize, x: &[f64]| -> Vec<f64> {
            (0..outputs)
                .map(|o| {
                    (0..inputs)
                        .map(|i| bf16(matrix[o * inputs + i] as f64) * x[i])
                        .sum()
                })
                .collect()
        };
        let x: Vec<f64> = row.iter().map(|&v| bf16(v as f64)).collect();
        let gate = project(&weights.gate_proj, intermediate, hidden, &x);
        let up = project(&weights.up_proj, intermediate, hidden, &x);
        let activated: Vec<f64> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| bf16(g / (1.0 + (-g).exp()) * u))
            .collect();
        project(&weights.down_proj, hidden, intermediate, &activated)
    }

    #[test]
    fn bf16_weights_compute_the_ffn_on_bf16_values_with_f32_sums() {
        // 200 output columns: a panel and a partial one; two intermediate
        // slices.
        let (hidden, intermediate) = (200, 900);
        let weights = random_expert(hidden, intermediate, 11);
        for threads in [1, 2] {
            let bf16 = CpuBackend::with_format(threads, WeightFormat::Bf16)
                .unwrap()
                .load_expert(weights.clone())
                .unwrap();
            let f32_bytes = 3 * hidden * intermediate * 4;
            // Half the bytes, but for a few zero columns of padding.
            assert!(bf16.weight_bytes() * 2 >= f32_bytes);
            assert!(bf16.weight_bytes() * 2 <= f32_bytes * 21 / 20);
            for rows in [1, 2, 9, 70] {
                let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
                let input: Vec<f32> = (0..rows * hidden)
                    .map(|_| rng.random_range(-1f32..1.0))
                    .collect();
                let mut got = vec![0f32; rows * hidden];
                bf16.forward(&input, rows, &mut got);
                let want: Vec<f64> = input
                    .chunks_exact(hidden)
                    .flat_map(|row| naive_bf16_ffn(&weights, row))
                    .collect();
                let error: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as f64 - b).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let norm: f64 = want.iter().map(|&b| b.powi(2)).sum::<f64>().sqrt();
                assert!(
                    error <= 1e-3 * norm,
                    "{threads} threads, {rows} rows: relative error {}",
                    error / norm
                );
            }
        }
    }

    #[test]
    fn serial_and_parallel_forward_agree_bit_for_bit() {
        let (hidden, intermediate) = (256, 384);
        for format in [WeightFormat::F32, WeightFormat::Bf16] {
            let expert = CpuBackend::with_format(2, format)
                .unwrap()
                .load_expert(random_expert(hidden, intermediate, 5))
                .unwrap();
            for rows in [1, 3, 17, 130] {
                let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
                let input: Vec<f32> = (0..rows * hidden)
                    .map(|_| rng.random_range(-1f32..1.0))
                    .collect();
                let (mut serial, mut parallel) =
                    (vec![0f32; rows * hidden], vec![0f32; rows * hidden]);
                expert.forward_serial(&input, rows, &mut serial);
                expert.forward(&input, rows, &mut parallel);
                assert_eq!(serial, parallel, "{format}, {rows} rows");
            }
        }
    }

    #[test]
    fn cpu_expert_rows_are_batch_invariant() {
        // Real shapes, the fixtures' tiny ones (a partial panel), and a
        // narrow output over a deep input.
        for (hidden, intermediate) in [(1024, 1408), (64, 96), (48, 600)] {
            for format in [WeightFormat::F32, WeightFormat::Bf16] {
                rows_are_batch_invariant(format, hidden, intermediate);
            }
        }
    }

    fn rows_are_batch_invariant(format: WeightFormat, hidden: usize, intermediate: usize) {
        let backend = CpuBackend::with_format(2, format).unwrap();
        let expert = backend
            .load_expert(random_expert(hidden, intermediate, 3))
            .unwrap();
        let max_rows = 200;
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let input: Vec<f32> = (0..max_rows * hidden)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let probe = 0;
        let mut alone = vec![0f32; hidden];
        expert.forward(&input[..hidden], 1, &mut alone);
        for rows in [2, 3, 4, 5, 7, 8, 16, 31, 64, 65, 66, 97, 128, 200] {
            let mut output = vec![0f32; rows * hidden];
            expert.forward(&input[..rows * hidden], rows, &mut output);
            assert_eq!(
                &output[probe..hidden],
                &alone[..],
                "{format} {hidden}x{intermediate}: row 0 differs in a batch of {rows}"
            );
        }
    }
}
