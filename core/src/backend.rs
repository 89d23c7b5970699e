//! The expert FFN, `down(silu(gate(x)) * up(x))`, behind a backend trait so
//! that a CUDA backend can hold weights in GPU memory later.
//!
//! The CPU backend lays weights out once, at load, as `[in, out]` (the
//! layout the `gemm` crate is fastest on), fuses gate and up into one GEMM,
//! and runs every GEMM on its own rayon pool, never on the async runtime.

use std::sync::Arc;

use gemm::Parallelism;

use crate::checkpoint::ExpertWeights;
use crate::{CoreError, CoreResult};

/// A place where experts can live and run: the CPU, or later a GPU.
pub trait ComputeBackend: Send + Sync {
    /// Returns a short description, for example `cpu (2 threads)`.
    fn describe(&self) -> String;

    /// Makes one expert resident on this backend.
    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>>;
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
}

/// The multi-threaded CPU backend.
pub struct CpuBackend {
    /// Runs every GEMM of this backend's experts; sized once at start.
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

impl CpuBackend {
    /// Creates a backend with `threads` compute threads (0: one per core).
    pub fn new(threads: usize) -> CoreResult<Self> {
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |cores| cores.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|index| format!("moemesh-cpu-{index}"))
            .build()
            .map_err(|error| {
                CoreError::Config(format!("cannot start {threads} compute threads: {error}"))
            })?;
        Ok(Self {
            pool: Arc::new(pool),
            threads,
        })
    }
}

impl ComputeBackend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>> {
        let ExpertWeights {
            hidden_size: hidden,
            intermediate_size: intermediate,
            gate_proj,
            up_proj,
            down_proj,
        } = weights;
        if gate_proj.len() != intermediate * hidden
            || up_proj.len() != intermediate * hidden
            || down_proj.len() != hidden * intermediate
        {
            return Err(CoreError::Checkpoint(
                "expert projections do not match their sizes".into(),
            ));
        }
        // [in=hidden, out=2*intermediate]: columns 0..I are gate, I..2I are up.
        let mut gate_up = vec![0f32; hidden * 2 * intermediate];
        for out in 0..intermediate {
            for input in 0..hidden {
                gate_up[input * 2 * intermediate + out] = gate_proj[out * hidden + input];
                gate_up[input * 2 * intermediate + intermediate + out] =
                    up_proj[out * hidden + input];
            }
        }
        // [in=intermediate, out=hidden].
        let mut down = vec![0f32; intermediate * hidden];
        for out in 0..hidden {
            for input in 0..intermediate {
                down[input * hidden + out] = down_proj[out * intermediate + input];
            }
        }
        Ok(Arc::new(CpuExpert {
            hidden,
            intermediate,
            gate_up,
            down,
            pool: Arc::clone(&self.pool),
            threads: self.threads,
        }))
    }
}

struct CpuExpert {
    hidden: usize,
    intermediate: usize,
    /// `[hidden, 2 * intermediate]`, gate columns then up columns.
    gate_up: Vec<f32>,
    /// `[intermediate, hidden]`.
    down: Vec<f32>,
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]`, all row-major and contiguous, on
/// the GEMM library the CPU experts use (call it inside a rayon pool to
/// choose its threads).
pub fn matmul(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    m: usize,
    k: usize,
    n: usize,
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    // SAFETY: the asserts above keep every access inside the three slices,
    // whose strides describe contiguous row-major matrices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

impl Expert for CpuExpert {
    fn hidden_size(&self) -> usize {
        self.hidden
    }

    fn weight_bytes(&self) -> usize {
        (self.gate_up.len() + self.down.len()) * size_of::<f32>()
    }

    fn forward(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        let (hidden, intermediate) = (self.hidden, self.intermediate);
        debug_assert_eq!(input.len(), rows * hidden);
        debug_assert_eq!(output.len(), rows * hidden);
        if rows == 0 {
            return;
        }
        // gemm takes a matrix-vector path for a single row, whose summation
        // order differs from the batched kernel's: pad a lone row to two so
        // that a token's result never depends on how many others came along.
        let padded_rows = rows.max(2);
        let padded_input;
        let input = if rows == 1 {
            padded_input = [input, input].concat();
            &padded_input[..]
        } else {
            input
        };
        let parallelism = if self.threads > 1 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        };
        let mut gate_up = vec![0f32; padded_rows * 2 * intermediate];
        let mut activated = vec![0f32; padded_rows * intermediate];
        let mut result = if rows == 1 {
            vec![0f32; padded_rows * hidden]
        } else {
            Vec::new()
        };
        self.pool.install(|| {
            matmul(
                &mut gate_up,
                input,
                &self.gate_up,
                padded_rows,
                hidden,
                2 * intermediate,
                parallelism,
            );
            for (row_out, row_in) in activated
                .chunks_exact_mut(intermediate)
                .zip(gate_up.chunks_exact(2 * intermediate))
            {
                let (gate, up) = row_in.split_at(intermediate);
                for ((out, &g), &u) in row_out.iter_mut().zip(gate).zip(up) {
                    *out = silu(g) * u;
                }
            }
            let dst = if rows == 1 {
                &mut result[..]
            } else {
                &mut output[..]
            };
            matmul(
                dst,
                &activated,
                &self.down,
                padded_rows,
                intermediate,
                hidden,
                parallelism,
            );
        });
        if rows == 1 {
            output.copy_from_slice(&result[..hidden]);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

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
        let weights = random_expert(96, 160, 7);
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

    #[test]
    fn cpu_expert_rows_are_batch_invariant() {
        let (hidden, intermediate) = (1024, 1408);
        let backend = CpuBackend::new(2).unwrap();
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
        for rows in [2, 3, 7, 8, 16, 31, 64, 65, 97, 128, 200] {
            let mut output = vec![0f32; rows * hidden];
            expert.forward(&input[..rows * hidden], rows, &mut output);
            assert_eq!(
                &output[probe..hidden],
                &alone[..],
                "row 0 differs in a batch of {rows}"
            );
        }
    }
}
