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

    /// Makes one expert resident on this backend.
    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>>;

    /// Runs each expert of `work` on its rows of `input` (`[rows, width]`)
    /// and returns its outputs, unweighted: item after item in the order of
    /// `work`, each item's rows in its order (`[Σ rows, width]`).
    ///
    /// Backends may run the experts in any order or at once, as long as
    /// each row's result stays the same.
    fn expert_outputs(&self, input: &[f32], width: usize, work: &[ExpertWork<'_>]) -> Vec<f32> {
        let mut outputs = Vec::new();
        for item in work {
            let gathered = gather_rows(input, width, item.rows);
            let start = outputs.len();
            outputs.resize(start + gathered.len(), 0f32);
            item.expert
                .forward(&gathered, item.rows.len(), &mut outputs[start..]);
        }
        outputs
    }

    /// Returns, per row of `input`, the sum of the weighted expert outputs.
    ///
    /// Sums are taken in the order of `work`; callers pass it by ascending
    /// expert id so that every row's sum has a fixed order, the order a
    /// router also follows when experts answer from several nodes.
    fn run_experts(&self, input: &[f32], width: usize, work: &[ExpertWork<'_>]) -> Vec<f32> {
        let outputs = self.expert_outputs(input, width, work);
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
        combined
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

/// `value · weight`, element by element, in place (see [`add_weighted`]:
/// adding the result to zero gives the same bits as adding it directly).
pub fn scale_by_weight(values: &mut [f32], weight: f32) {
    for value in values {
        *value *= weight;
    }
}

/// The rows `rows` of `input` (`[_, width]`), in order, as one matrix.
fn gather_rows(input: &[f32], width: usize, rows: &[u32]) -> Vec<f32> {
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
}

/// How the CPU backend keeps expert weights resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Four bytes per weight; the format the GEMM kernel runs on directly.
    #[default]
    F32,
    /// Two bytes per weight (half the memory), widened to f32 one cache-sized
    /// panel at a time during each GEMM. Exact for bf16 checkpoints; f32
    /// checkpoints are rounded to nearest even once, at load.
    Bf16,
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown weight format {other:?}; expected f32 or bf16"
            )),
        }
    }
}

/// The multi-threaded CPU backend; clones share its threads.
#[derive(Clone)]
pub struct CpuBackend {
    /// Runs every GEMM of this backend's experts; sized once at start.
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    format: WeightFormat,
}

impl CpuBackend {
    /// Creates a backend with `threads` compute threads (0: one per core)
    /// that keeps weights in f32.
    pub fn new(threads: usize) -> CoreResult<Self> {
        Self::with_format(threads, WeightFormat::F32)
    }

    /// Creates a backend with `threads` compute threads (0: one per core)
    /// that keeps weights in `format`.
    pub fn with_format(threads: usize, format: WeightFormat) -> CoreResult<Self> {
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
            format,
        })
    }

    /// Returns the number of compute threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl ComputeBackend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads, {} weights)", self.threads, self.format)
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
        let mut slices = Vec::new();
        let mut min_rows = 1;
        for (first, width) in intermediate_slices(intermediate) {
            // [in=hidden, out=2*width]: gate columns, then up columns.
            let gate_up = PackedMatrix::pack(self.format, hidden, 2 * width, |input, out| {
                if out < width {
                    gate_proj[(first + out) * hidden + input]
                } else {
                    up_proj[(first + out - width) * hidden + input]
                }
            });
            // [in=width, out=hidden]: rows first..first+width of down^T.
            let down = PackedMatrix::pack(self.format, width, hidden, |input, out| {
                down_proj[out * intermediate + first + input]
            });
            min_rows = min_rows
                .max(min_invariant_rows(gate_up.kernel_columns(), hidden))
                .max(min_invariant_rows(down.kernel_columns(), width));
            slices.push(FfnSlice {
                width,
                gate_up,
                down,
            });
        }
        Ok(Arc::new(CpuExpert {
            hidden,
            slices,
            min_rows,
            pool: Arc::clone(&self.pool),
            threads: self.threads,
        }))
    }

    /// Splits the work into tasks of whole experts (large ones cut into row
    /// ranges) and runs them at once, one per compute thread, largest
    /// first: small per-expert batches keep every thread busy without the
    /// synchronisation a multi-threaded GEMM pays inside each product.
    fn expert_outputs(&self, input: &[f32], width: usize, work: &[ExpertWork<'_>]) -> Vec<f32> {
        let total_rows: usize = work.iter().map(|item| item.rows.len()).sum();
        let mut outputs = vec![0f32; total_rows * width];
        // Cut experts into pieces of at most `max_rows`, enough pieces for
        // every thread to take two, but never below MIN_TASK_ROWS rows,
        // where the GEMM loses efficiency.
        let max_rows = MIN_TASK_ROWS.max(total_rows.div_ceil(self.threads * 2));
        let mut tasks = Vec::new();
        let mut rest = &mut outputs[..];
        for item in work {
            let rows = item.rows.len();
            let pieces = rows.div_ceil(max_rows).max(1);
            for piece in 0..pieces {
                let range = piece * rows / pieces..(piece + 1) * rows / pieces;
                let (output, tail) = std::mem::take(&mut rest).split_at_mut(range.len() * width);
                rest = tail;
                tasks.push(ExpertTask {
                    expert: item.expert,
                    rows: &item.rows[range],
                    output,
                });
            }
        }
        tasks.sort_by_key(|task| std::cmp::Reverse(task.rows.len()));
        let queue = std::sync::Mutex::new(tasks.into_iter());
        let next = || queue.lock().expect("task queue").next();
        let run = |task: ExpertTask<'_, '_>| {
            GATHERED.with_borrow_mut(|gathered| {
                gathered.clear();
                for &row in task.rows {
                    let row = row as usize;
                    gathered.extend_from_slice(&input[row * width..(row + 1) * width]);
                }
                task.expert
                    .forward_serial(gathered, task.rows.len(), task.output);
            });
        };
        if self.threads == 1 {
            self.pool.install(|| {
                while let Some(task) = next() {
                    run(task);
                }
            });
        } else {
            self.pool.scope(|scope| {
                for _ in 0..self.threads {
                    scope.spawn(|_| {
                        while let Some(task) = next() {
                            run(task);
                        }
                    });
                }
            });
        }
        outputs
    }
}

/// The fewest rows worth a task of their own: below this the GEMM runs
/// well under its peak (measured: 78 GFLOP/s at 64 rows against 94 at 128
/// on one Zen 4 core).
const MIN_TASK_ROWS: usize = 96;

/// A range of one expert's rows, computed by one thread into its own
/// slice of the outputs.
struct ExpertTask<'work, 'out> {
    expert: &'work dyn Expert,
    rows: &'work [u32],
    output: &'out mut [f32],
}

thread_local! {
    /// The input rows of the task running on this thread, gathered.
    static GATHERED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Columns per bf16 panel (the last panel also takes the remainder). Wide
/// enough that gemm never takes its small-matrix paths on a panel, narrow
/// enough that a widened panel of the larger projection stays in L2/L3.
const PANEL_COLUMNS: usize = 128;

/// The panels of a matrix with `n` columns.
fn panel_count(n: usize) -> usize {
    (n / PANEL_COLUMNS).max(1)
}

/// The first column and the width of panel `index` of `n` columns.
fn panel_bounds(n: usize, index: usize) -> (usize, usize) {
    let start = index * PANEL_COLUMNS;
    if index + 1 == panel_count(n) {
        (start, n - start)
    } else {
        (start, PANEL_COLUMNS)
    }
}

/// The fewest rows a product with `columns` output columns and inner
/// dimension `depth` must have for every row to be computed by the same
/// kernel with the same depth blocking whatever the batch; smaller batches
/// are padded. gemm (which computes row-major products transposed) takes a
/// matrix-vector path for one row, a horizontal kernel when rows × columns
/// ≤ 256, and blocks the depth by 512 instead of its cache-derived block
/// when both dimensions are ≤ 64.
fn min_invariant_rows(columns: usize, depth: usize) -> usize {
    let mut rows = 2.max(256 / columns.max(1) + 1);
    if columns <= 64 && depth > 512 {
        rows = rows.max(65);
    }
    rows
}

/// A weight matrix `[k, n]` (inputs by outputs) laid out for the kernel.
enum PackedMatrix {
    /// Row-major f32.
    F32 { values: Vec<f32>, n: usize },
    /// bf16 in column panels: panel `p` holds columns `p * PANEL_COLUMNS..`
    /// of every row, row-major and contiguous, so that it widens in one
    /// sequential pass.
    Bf16Panels {
        values: Vec<half::bf16>,
        k: usize,
        n: usize,
    },
}

impl PackedMatrix {
    /// Lays out `[k, n]` from `at(row, column)`, visiting the source in
    /// column order (checkpoints store `[out, in]`, so that reads it in order).
    fn pack(format: WeightFormat, k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        match format {
            WeightFormat::F32 => {
                let mut values = vec![0f32; k * n];
                for column in 0..n {
                    for row in 0..k {
                        values[row * n + column] = at(row, column);
                    }
                }
                Self::F32 { values, n }
            }
            WeightFormat::Bf16 => {
                let mut values = vec![half::bf16::ZERO; k * n];
                for column in 0..n {
                    let panel = (column / PANEL_COLUMNS).min(panel_count(n) - 1);
                    let (panel_start, width) = panel_bounds(n, panel);
                    let base = panel_start * k + column - panel_start;
                    for row in 0..k {
                        values[base + row * width] = half::bf16::from_f32(at(row, column));
                    }
                }
                Self::Bf16Panels { values, k, n }
            }
        }
    }

    /// The widest output the GEMM kernel sees in one call: the whole
    /// matrix in f32, a panel in bf16.
    fn kernel_columns(&self) -> usize {
        match self {
            Self::F32 { n, .. } => *n,
            Self::Bf16Panels { n, .. } => panel_bounds(*n, 0).1,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Self::F32 { values, .. } => values.len() * size_of::<f32>(),
            Self::Bf16Panels { values, .. } => values.len() * size_of::<half::bf16>(),
        }
    }

    /// `dst[m, n] = lhs[m, k] · self`, or `dst += lhs · self` when
    /// `accumulate`; call inside the backend's pool.
    fn multiply(&self, dst: &mut [f32], lhs: &[f32], m: usize, threads: usize, accumulate: bool) {
        match self {
            Self::F32 { values, n } => {
                let k = values.len() / n;
                let parallelism = if threads > 1 {
                    Parallelism::Rayon(threads)
                } else {
                    Parallelism::None
                };
                assert!(dst.len() >= m * n && lhs.len() >= m * k && values.len() >= k * n);
                // SAFETY: the assert keeps every access inside the three
                // slices, whose strides describe contiguous row-major matrices.
                unsafe {
                    gemm::gemm(
                        m,
                        *n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        *n as isize,
                        accumulate,
                        lhs.as_ptr(),
                        1,
                        k as isize,
                        values.as_ptr(),
                        1,
                        *n as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
            Self::Bf16Panels { values, k, n } => {
                let (k, n) = (*k, *n);
                assert!(dst.len() >= m * n && lhs.len() >= m * k);
                let destination = SharedColumns(dst.as_mut_ptr());
                let panel = |index: usize| {
                    let (start, width) = panel_bounds(n, index);
                    let packed = &values[start * k..start * k + k * width];
                    WIDENED_PANEL.with_borrow_mut(|widened| {
                        widened.clear();
                        widened.extend(packed.iter().map(|value| value.to_f32()));
                        // SAFETY: panel `index` writes columns start..start+width
                        // of rows 0..m, inside `dst` (asserted above) and disjoint
                        // from every other panel's columns.
                        unsafe {
                            gemm::gemm(
                                m,
                                width,
                                k,
                                destination.at(start),
                                1,
                                n as isize,
                                accumulate,
                                lhs.as_ptr(),
                                1,
                                k as isize,
                                widened.as_ptr(),
                                1,
                                width as isize,
                                1.0,
                                1.0,
                                false,
                                false,
                                false,
                                Parallelism::None,
                            );
                        }
                    });
                };
                let panels = panel_count(n);
                if threads > 1 {
                    use rayon::prelude::*;
                    (0..panels).into_par_iter().for_each(panel);
                } else {
                    (0..panels).for_each(panel);
                }
            }
        }
    }
}

thread_local! {
    /// One bf16 panel widened to f32, reused by every GEMM on this thread.
    static WIDENED_PANEL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The output matrix shared by panels that write disjoint columns of it.
#[derive(Clone, Copy)]
struct SharedColumns(*mut f32);

// SAFETY: every user writes a column range no other user writes.
unsafe impl Send for SharedColumns {}
unsafe impl Sync for SharedColumns {}

impl SharedColumns {
    /// Pointer to column `column` of row 0.
    fn at(self, column: usize) -> *mut f32 {
        self.0.wrapping_add(column)
    }
}

/// The FFN restricted to a range of the intermediate dimension: summed
/// over all slices, the outputs make the whole FFN.
struct FfnSlice {
    /// Intermediate columns in this slice.
    width: usize,
    /// `[hidden, 2 * width]`, gate columns then up columns.
    gate_up: PackedMatrix,
    /// `[width, hidden]`.
    down: PackedMatrix,
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

struct CpuExpert {
    hidden: usize,
    /// The FFN by slices of the intermediate dimension, in order.
    slices: Vec<FfnSlice>,
    /// Batches smaller than this are padded, so that each row's result is
    /// the same in every batch (see [`min_invariant_rows`]).
    min_rows: usize,
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

/// `out[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 + e^-x)`.
fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { silu_mul_avx512(out, gate, up) };
        return;
    }
    silu_mul_portable(out, gate, up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn silu_mul_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_portable(out, gate, up);
}

/// Written so that the compiler vectorises it for whatever features the
/// caller enables.
#[inline(always)]
fn silu_mul_portable(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((out, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *out = g / (1.0 + exp_approx(-g)) * u;
    }
}

/// `e^x` to within 2 ulp over the whole f32 range, in branch-free
/// arithmetic the compiler vectorises (libm's `expf` is a call per value).
/// Cody-Waite reduction to `2^n · e^r` with |r| ≤ ln 2 / 2, then the
/// degree-6 minimax polynomial of `e^r` used by Cephes' `expf`.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2_E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e_r = p * r * r + r + 1.0;
    // 2^n by building the exponent; n is in [-126, 128] after the clamp,
    // so split it in two to stay finite and normal at both ends.
    let n = n as i32;
    let half = n >> 1;
    let scale = |power: i32| f32::from_bits(((power + 127) as u32) << 23);
    e_r * scale(half) * scale(n - half)
}

/// Per-thread buffers of the CPU experts, reused from call to call.
#[derive(Default)]
struct Scratch {
    padded_input: Vec<f32>,
    gate_up: Vec<f32>,
    activated: Vec<f32>,
    padded_output: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
}

impl CpuExpert {
    /// The FFN on `threads` threads of the pool (1: the calling thread).
    fn compute(&self, input: &[f32], rows: usize, output_rows: &mut [f32], threads: usize) {
        let hidden = self.hidden;
        debug_assert_eq!(input.len(), rows * hidden);
        debug_assert_eq!(output_rows.len(), rows * hidden);
        if rows == 0 {
            return;
        }
        // Taken out rather than borrowed: a thread waiting inside a parallel
        // GEMM may run another expert's work, which then starts afresh.
        let mut scratch = SCRATCH.take();
        // Small batches would take other gemm kernels, whose summation order
        // differs: pad them (with zero rows) so that a token's result never
        // depends on how many others came along.
        let padded_rows = rows.max(self.min_rows);
        let padded = padded_rows > rows;
        let Scratch {
            padded_input,
            gate_up,
            activated,
            padded_output,
        } = &mut scratch;
        let input = if padded {
            padded_input.clear();
            padded_input.extend_from_slice(input);
            padded_input.resize(padded_rows * hidden, 0.0);
            &padded_input[..]
        } else {
            input
        };
        let output = if padded {
            padded_output.resize(padded_rows * hidden, 0.0);
            &mut padded_output[..]
        } else {
            &mut *output_rows
        };
        // Slice by slice: this slice's activations, then its share of the
        // down projection added into the output.
        for (index, slice) in self.slices.iter().enumerate() {
            let width = slice.width;
            gate_up.resize(padded_rows * 2 * width, 0.0);
            activated.resize(padded_rows * width, 0.0);
            slice
                .gate_up
                .multiply(gate_up, input, padded_rows, threads, false);
            for (row_out, row_in) in activated
                .chunks_exact_mut(width)
                .zip(gate_up.chunks_exact(2 * width))
            {
                let (gate, up) = row_in.split_at(width);
                silu_mul(row_out, gate, up);
            }
            slice
                .down
                .multiply(output, activated, padded_rows, threads, index > 0);
        }
        if padded {
            output_rows.copy_from_slice(&padded_output[..rows * hidden]);
        }
        SCRATCH.set(scratch);
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
        self.pool
            .install(|| self.compute(input, rows, output, self.threads));
    }

    fn forward_serial(&self, input: &[f32], rows: usize, output: &mut [f32]) {
        self.compute(input, rows, output, 1);
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

    fn round_to_bf16(values: &[f32]) -> Vec<f32> {
        values
            .iter()
            .map(|&value| half::bf16::from_f32(value).to_f32())
            .collect()
    }

    #[test]
    fn bf16_weights_compute_what_f32_computes_on_the_rounded_weights() {
        // 200 output columns: a panel and a remainder; two intermediate slices.
        let (hidden, intermediate) = (200, 900);
        let weights = random_expert(hidden, intermediate, 11);
        let rounded = ExpertWeights {
            gate_proj: round_to_bf16(&weights.gate_proj),
            up_proj: round_to_bf16(&weights.up_proj),
            down_proj: round_to_bf16(&weights.down_proj),
            ..weights.clone()
        };
        for threads in [1, 2] {
            let bf16 = CpuBackend::with_format(threads, WeightFormat::Bf16)
                .unwrap()
                .load_expert(weights.clone())
                .unwrap();
            let f32 = CpuBackend::new(threads)
                .unwrap()
                .load_expert(rounded.clone())
                .unwrap();
            assert_eq!(bf16.weight_bytes() * 2, f32.weight_bytes());
            for rows in [1, 2, 9, 70] {
                let mut rng = rand::rngs::StdRng::seed_from_u64(rows as u64);
                let input: Vec<f32> = (0..rows * hidden)
                    .map(|_| rng.random_range(-1f32..1.0))
                    .collect();
                let (mut got, mut want) = (vec![0f32; rows * hidden], vec![0f32; rows * hidden]);
                bf16.forward(&input, rows, &mut got);
                f32.forward(&input, rows, &mut want);
                let error: f64 = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let norm: f64 = want.iter().map(|&b| (b as f64).powi(2)).sum::<f64>().sqrt();
                assert!(
                    error <= 1e-6 * norm,
                    "{threads} threads, {rows} rows: relative error {}",
                    error / norm
                );
            }
        }
    }

    #[test]
    fn exp_approx_is_within_three_ulp_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp_approx(-200.0), exp_approx(-87.3));
        assert!(exp_approx(200.0).is_finite());
    }

    #[test]
    fn silu_mul_matches_silu_in_f64() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let up: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; 1000];
        silu_mul(&mut out, &gate, &up);
        for ((&got, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let (g, u) = (g as f64, u as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (got as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1e-30),
                "silu({g}) * {u}: {got} vs {want}"
            );
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

    /// The experts' work run one expert after another, as the trait's
    /// provided method does.
    struct Sequential;

    impl ComputeBackend for Sequential {
        fn describe(&self) -> String {
            "sequential".into()
        }
        fn load_expert(&self, _: ExpertWeights) -> CoreResult<Arc<dyn Expert>> {
            unreachable!()
        }
    }

    #[test]
    fn parallel_expert_tasks_combine_exactly_as_one_after_another() {
        let (hidden, intermediate, tokens) = (128, 192, 700);
        let backend = CpuBackend::new(2).unwrap();
        let experts: Vec<_> = (0..5)
            .map(|seed| {
                backend
                    .load_expert(random_expert(hidden, intermediate, seed))
                    .unwrap()
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let input: Vec<f32> = (0..tokens * hidden)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        // Uneven loads: expert 0 takes most tokens (and is cut into
        // pieces), expert 4 takes none.
        let shares = [0.9, 0.3, 0.05, 0.01, 0.0];
        let assignments: Vec<(Vec<u32>, Vec<f32>)> = shares
            .iter()
            .map(|&share| {
                let rows: Vec<u32> = (0..tokens as u32)
                    .filter(|_| rng.random_bool(share))
                    .collect();
                let weights = rows.iter().map(|_| rng.random_range(0f32..1.0)).collect();
                (rows, weights)
            })
            .collect();
        let work: Vec<ExpertWork<'_>> = experts
            .iter()
            .zip(&assignments)
            .map(|(expert, (rows, weights))| ExpertWork {
                expert: expert.as_ref(),
                rows,
                weights,
            })
            .collect();
        let got = backend.run_experts(&input, hidden, &work);
        let want = Sequential.run_experts(&input, hidden, &work);
        assert_eq!(got, want);
        assert!(got.iter().any(|&value| value != 0.0));
    }

    #[test]
    fn weight_formats_parse_and_print() {
        for format in [WeightFormat::F32, WeightFormat::Bf16] {
            assert_eq!(format.to_string().parse::<WeightFormat>(), Ok(format));
        }
        assert_eq!("BF16".parse::<WeightFormat>(), Ok(WeightFormat::Bf16));
        assert!("fp8".parse::<WeightFormat>().unwrap_err().contains("fp8"));
    }

    #[test]
    fn cpu_expert_rows_are_batch_invariant() {
        // Real shapes, the fixtures' tiny ones (the horizontal kernel), and a
        // narrow output over a deep input (gemm's small-shape depth blocking).
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
