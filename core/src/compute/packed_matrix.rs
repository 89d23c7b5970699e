//! Weight matrices laid out for the `gemm` crate: row-major f32, or bf16 in
//! column panels widened to f32 one cache-sized panel at a time; and
//! [`matmul`], a plain product on the same kernel.

use gemm::Parallelism;

use super::WeightFormat;

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
pub(super) fn min_invariant_rows(columns: usize, depth: usize) -> usize {
    let mut rows = 2.max(256 / columns.max(1) + 1);
    if columns <= 64 && depth > 512 {
        rows = rows.max(65);
    }
    rows
}

/// A weight matrix `[k, n]` (inputs by outputs) laid out for the kernel.
pub(super) enum PackedMatrix {
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
    pub(super) fn pack(
        format: WeightFormat,
        k: usize,
        n: usize,
        at: impl Fn(usize, usize) -> f32,
    ) -> Self {
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
    pub(super) fn kernel_columns(&self) -> usize {
        match self {
            Self::F32 { n, .. } => *n,
            Self::Bf16Panels { n, .. } => panel_bounds(*n, 0).1,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::F32 { values, .. } => values.len() * size_of::<f32>(),
            Self::Bf16Panels { values, .. } => values.len() * size_of::<half::bf16>(),
        }
    }

    /// `dst[m, n] = lhs[m, k] · self`, or `dst += lhs · self` when
    /// `accumulate`; call inside the backend's pool.
    pub(super) fn multiply(
        &self,
        dst: &mut [f32],
        lhs: &[f32],
        m: usize,
        threads: usize,
        accumulate: bool,
    ) {
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
