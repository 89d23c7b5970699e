//! The expert FFN on the CPU from an expert's bf16 buffer: how the CUDA
//! backend computes an expert where it waits, in host memory, when moving
//! its weights to the GPU would cost more than computing its few rows here.
//!
//! Every output value is one dot product summed in a fixed order, whatever
//! the number of rows or threads, so a row's result is the same bits alone
//! or in any batch. Gate, up and activations stay in f32 (the GPU rounds
//! its input and activations to bf16, so the two paths agree to about
//! bf16's precision, not bit for bit). `silu(gate) · up` is the CPU
//! backend's own function.

use half::bf16;
use rayon::prelude::*;

use super::layout::ExpertLayout;
use crate::compute::silu::silu_mul;

/// `output = down(silu(gate · x) · (up · x))` for `rows` rows of `input`
/// (`[rows, hidden]`, as `output`), with the weights in `buffer` laid out
/// by `layout`, on the threads of `pool`.
pub(super) fn host_ffn(
    pool: &rayon::ThreadPool,
    layout: &ExpertLayout,
    buffer: &[bf16],
    input: &[f32],
    rows: usize,
    output: &mut [f32],
) {
    let (hidden, intermediate) = (layout.hidden, layout.intermediate);
    debug_assert_eq!(buffer.len(), layout.len);
    debug_assert_eq!(input.len(), rows * hidden);
    debug_assert_eq!(output.len(), rows * hidden);
    if rows == 0 {
        return;
    }
    // Column-major activations ([feature, row]) let each weight multiply
    // all rows at once, which the compiler vectorises across rows without
    // changing any single row's order of summation.
    let input_by_column = transpose(input, rows, hidden);
    let mut gate_up = vec![0f32; 2 * intermediate * rows];
    let mut activated = vec![0f32; intermediate * rows];
    let mut output_by_column = vec![0f32; hidden * rows];
    pool.install(|| {
        project(
            layout.gate_up(buffer),
            hidden,
            &input_by_column,
            &mut gate_up,
        );
        let (gate, up) = gate_up.split_at(intermediate * rows);
        silu_mul(&mut activated, gate, up);
        project(
            layout.down(buffer),
            intermediate,
            &activated,
            &mut output_by_column,
        );
    });
    output.copy_from_slice(&transpose(&output_by_column, hidden, rows));
}

/// `out[o, r] = Σ_i weights[o, i] · x[i, r]`, summed in order of `i`:
/// `weights` is `[outputs, inputs]` (row-major), `x` is `[inputs, rows]`
/// and `out` `[outputs, rows]`; one task per output feature.
fn project(weights: &[bf16], inputs: usize, x: &[f32], out: &mut [f32]) {
    let rows = x.len() / inputs;
    out.par_chunks_mut(rows)
        .zip(weights.par_chunks(inputs))
        .for_each(|(sums, weight_row)| {
            sums.fill(0.0);
            for (&weight, x_row) in weight_row.iter().zip(x.chunks_exact(rows)) {
                let weight = weight.to_f32();
                for (sum, &value) in sums.iter_mut().zip(x_row) {
                    *sum += weight * value;
                }
            }
        });
}

/// `[rows, columns]` to `[columns, rows]`.
fn transpose(values: &[f32], rows: usize, columns: usize) -> Vec<f32> {
    let mut transposed = vec![0f32; values.len()];
    for (row, row_values) in values.chunks_exact(columns).enumerate() {
        for (column, &value) in row_values.iter().enumerate() {
            transposed[column * rows + row] = value;
        }
    }
    transposed
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::compute::cpu_expert::tests::random_expert;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    fn random_rows(rows: usize, hidden: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * hidden)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect()
    }

    /// The FFN in f64 on the bf16 weights of `buffer`.
    fn reference_ffn(layout: &ExpertLayout, buffer: &[bf16], row: &[f32]) -> Vec<f64> {
        let project = |weights: &[bf16], inputs: usize, x: &[f64]| -> Vec<f64> {
            weights
                .chunks(inputs)
                .map(|weights| weights.iter().zip(x).map(|(&w, &x)| w.to_f64() * x).sum())
                .collect()
        };
        let x: Vec<f64> = row.iter().map(|&value| value as f64).collect();
        let gate_up = project(layout.gate_up(buffer), layout.hidden, &x);
        let (gate, up) = gate_up.split_at(layout.intermediate);
        let activated: Vec<f64> = gate
            .iter()
            .zip(up)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        project(layout.down(buffer), layout.intermediate, &activated)
    }

    #[test]
    fn host_ffn_matches_the_ffn_in_f64() {
        for (hidden, intermediate, rows) in [(64, 96, 5), (200, 352, 17)] {
            let weights = random_expert(hidden, intermediate, 4);
            let layout = ExpertLayout::of(&weights).unwrap();
            let buffer = layout.filled_buffer(&weights);
            let input = random_rows(rows, hidden, 8);
            let mut output = vec![0f32; rows * hidden];
            host_ffn(&pool(2), &layout, &buffer, &input, rows, &mut output);
            let (mut error, mut norm) = (0f64, 0f64);
            for (row, got) in input.chunks(hidden).zip(output.chunks(hidden)) {
                for (&got, want) in got.iter().zip(reference_ffn(&layout, &buffer, row)) {
                    error += (got as f64 - want).powi(2);
                    norm += want.powi(2);
                }
            }
            let relative = (error / norm).sqrt();
            assert!(
                relative < 1e-5,
                "{hidden}x{intermediate}: relative L2 {relative:e}"
            );
        }
    }

    #[test]
    fn host_ffn_rows_are_batch_and_thread_invariant() {
        let (hidden, intermediate) = (96, 160);
        let weights = random_expert(hidden, intermediate, 6);
        let layout = ExpertLayout::of(&weights).unwrap();
        let buffer = layout.filled_buffer(&weights);
        let input = random_rows(70, hidden, 3);
        let probe = 4;
        let mut alone = vec![0f32; hidden];
        let probe_row = &input[probe * hidden..(probe + 1) * hidden];
        host_ffn(&pool(1), &layout, &buffer, probe_row, 1, &mut alone);
        for (rows, threads) in [(5, 1), (5, 2), (33, 2), (70, 3)] {
            let mut output = vec![0f32; rows * hidden];
            let batch = &input[..rows * hidden];
            host_ffn(&pool(threads), &layout, &buffer, batch, rows, &mut output);
            assert_eq!(
                &output[probe * hidden..(probe + 1) * hidden],
                &alone[..],
                "row {probe} differs in a batch of {rows} on {threads} threads"
            );
        }
    }
}
