//! Weight matrices laid out for the `gemm` crate: row-major f32, or bf16 in
//! column panels widened to f32 one cache-sized panel at a time; and
//! [`matmul`], a plain product on the same kernel.
//!
//! The weight matrices' products sum their depth in chunks of at most
//! [`DEPTH_CHUNK`], chunk after chunk, so that every output's summation
//! order follows from the shapes alone: the same on every host, whatever its
//! caches, and whatever the thread count.

use std::ops::Range;

use gemm::Parallelism;

use super::WeightFormat;

/// Columns per bf16 panel unless a backend sets its own (the last panel
/// also takes the remainder). Wide enough that gemm never takes its
/// small-matrix paths on a panel, narrow enough that a widened panel of the
/// larger projection stays in L2/L3.
pub(super) const DEFAULT_PANEL_COLUMNS: usize = 128;

/// The deepest product one gemm call sums. gemm cuts a product's depth into
/// blocks whose size it derives from the host's L1 cache and sums block
/// after block; that size is never below 512 (`kernel_params` in
/// gemm-common takes the larger of 512 and its cache-derived size; its
/// small-matrix path takes 512 and its horizontal path 1024). A call no
/// deeper than this is therefore one block on every host, so cutting the
/// depth here ourselves makes the summation order independent of the host.
/// Within a block, gemm's x86 kernels (AVX-512, or AVX2 with FMA) keep one
/// fused multiply-add chain per output, started from zero and then added
/// to the output; the tests below check the products against that order
/// written out in scalars.
pub(super) const DEPTH_CHUNK: usize = 512;

/// The depth ranges, in order, that a product of depth `depth` sums one
/// after another: equal chunks of at most [`DEPTH_CHUNK`], the last taking
/// what remains (as gemm cuts depth on hosts whose block is 512). Always
/// at least one range, empty for an empty depth.
pub(super) fn depth_chunks(depth: usize) -> impl Iterator<Item = Range<usize>> {
    chunks_of_at_most(depth, DEPTH_CHUNK)
}

/// `length` cut into equal chunks of at most `block`, the last taking what
/// remains: the way gemm cuts a depth by its block.
fn chunks_of_at_most(length: usize, block: usize) -> impl Iterator<Item = Range<usize>> {
    let size = length.div_ceil(length.div_ceil(block).max(1)).max(1);
    (0..length.max(1))
        .step_by(size)
        .map(move |start| start..(start + size).min(length))
}

/// The panels of a matrix with `n` columns cut into panels of
/// `panel_columns`.
fn panel_count(n: usize, panel_columns: usize) -> usize {
    (n / panel_columns).max(1)
}

/// The first column and the width of panel `index` of `n` columns.
fn panel_bounds(n: usize, panel_columns: usize, index: usize) -> (usize, usize) {
    let start = index * panel_columns;
    if index + 1 == panel_count(n, panel_columns) {
        (start, n - start)
    } else {
        (start, panel_columns)
    }
}

/// The fewest rows a product with `columns` output columns must have for
/// every row to be computed by the same kernel whatever the batch; smaller
/// batches are padded. gemm (which computes row-major products transposed)
/// takes a matrix-vector path for one row, and has a horizontal kernel for
/// products of at most 256 outputs (with other strides than ours): padding
/// past both costs little. The depth needs no padding: every call is one
/// depth block whatever the rows (see [`DEPTH_CHUNK`]).
pub(super) fn min_invariant_rows(columns: usize) -> usize {
    2.max(256 / columns.max(1) + 1)
}

/// A weight matrix `[k, n]` (inputs by outputs) laid out for the kernel.
pub(super) enum PackedMatrix {
    /// Row-major f32.
    F32 { values: Vec<f32>, n: usize },
    /// bf16 in column panels: panel `p` holds columns `p * panel_columns..`
    /// of every row, row-major and contiguous, so that it widens in one
    /// sequential pass.
    Bf16Panels {
        values: Vec<half::bf16>,
        k: usize,
        n: usize,
        panel_columns: usize,
    },
}

impl PackedMatrix {
    /// Lays out `[k, n]` from `at(row, column)`, visiting the source in
    /// column order (checkpoints store `[out, in]`, so that reads it in
    /// order); bf16 in panels of `panel_columns` (at least 1).
    pub(super) fn pack(
        format: WeightFormat,
        k: usize,
        n: usize,
        panel_columns: usize,
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
                debug_assert!(panel_columns > 0);
                let panels = panel_count(n, panel_columns);
                let mut values = vec![half::bf16::ZERO; k * n];
                for column in 0..n {
                    let panel = (column / panel_columns).min(panels - 1);
                    let (panel_start, width) = panel_bounds(n, panel_columns, panel);
                    let base = panel_start * k + column - panel_start;
                    for row in 0..k {
                        values[base + row * width] = half::bf16::from_f32(at(row, column));
                    }
                }
                Self::Bf16Panels {
                    values,
                    k,
                    n,
                    panel_columns,
                }
            }
        }
    }

    /// The narrowest output the GEMM kernel sees in one call: the whole
    /// matrix in f32, the first panel in bf16.
    pub(super) fn kernel_columns(&self) -> usize {
        match self {
            Self::F32 { n, .. } => *n,
            Self::Bf16Panels {
                n, panel_columns, ..
            } => panel_bounds(*n, *panel_columns, 0).1,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        match self {
            Self::F32 { values, .. } => values.len() * size_of::<f32>(),
            Self::Bf16Panels { values, .. } => values.len() * size_of::<half::bf16>(),
        }
    }

    /// `dst[m, n] = lhs[m, k] · self`, or `dst += lhs · self` when
    /// `accumulate`, summing the depth chunk after chunk (see
    /// [`depth_chunks`]); call inside the backend's pool. `host_depth_block`
    /// emulates a host whose gemm blocks the depth by that many (see
    /// [`CpuBlocking`](super::CpuBlocking)).
    pub(super) fn multiply(
        &self,
        dst: &mut [f32],
        lhs: &[f32],
        m: usize,
        threads: usize,
        accumulate: bool,
        host_depth_block: Option<usize>,
    ) {
        match self {
            Self::F32 { values, n } => {
                let (k, n) = (values.len() / n, *n);
                let parallelism = if threads > 1 {
                    Parallelism::Rayon(threads)
                } else {
                    Parallelism::None
                };
                assert!(dst.len() >= m * n && lhs.len() >= m * k && values.len() >= k * n);
                let product = Product {
                    dst: dst.as_mut_ptr(),
                    dst_row_stride: n,
                    lhs: lhs.as_ptr(),
                    lhs_row_stride: k,
                    rhs: values.as_ptr(),
                    rhs_row_stride: n,
                    m,
                    n,
                    k,
                };
                // SAFETY: the assert keeps the product inside the three
                // slices, contiguous row-major matrices.
                unsafe { product.run_by_depth_chunks(accumulate, parallelism, host_depth_block) };
            }
            Self::Bf16Panels {
                values,
                k,
                n,
                panel_columns,
            } => {
                let (k, n, panel_columns) = (*k, *n, *panel_columns);
                assert!(dst.len() >= m * n && lhs.len() >= m * k);
                let destination = SharedColumns(dst.as_mut_ptr());
                let panel = |index: usize| {
                    let (start, width) = panel_bounds(n, panel_columns, index);
                    let packed = &values[start * k..start * k + k * width];
                    WIDENED_PANEL.with_borrow_mut(|widened| {
                        widened.clear();
                        widened.extend(packed.iter().map(|value| value.to_f32()));
                        let product = Product {
                            dst: destination.at(start),
                            dst_row_stride: n,
                            lhs: lhs.as_ptr(),
                            lhs_row_stride: k,
                            rhs: widened.as_ptr(),
                            rhs_row_stride: width,
                            m,
                            n: width,
                            k,
                        };
                        // SAFETY: panel `index` writes columns
                        // start..start+width of rows 0..m, inside `dst`
                        // (asserted above) and disjoint from every other
                        // panel's columns; `widened` holds `[k, width]`.
                        unsafe {
                            product.run_by_depth_chunks(
                                accumulate,
                                Parallelism::None,
                                host_depth_block,
                            )
                        };
                    });
                };
                let panels = panel_count(n, panel_columns);
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

/// `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` over raw row-major matrices with
/// the given row strides (columns are contiguous).
struct Product {
    dst: *mut f32,
    dst_row_stride: usize,
    lhs: *const f32,
    lhs_row_stride: usize,
    rhs: *const f32,
    rhs_row_stride: usize,
    m: usize,
    n: usize,
    k: usize,
}

impl Product {
    /// Runs the product as one gemm call per depth chunk, in order, each
    /// adding its chunk's sum to what the chunks before it left in `dst`
    /// (the first adds to `dst` only when `accumulate`). With
    /// `host_depth_block`, each chunk is cut again as gemm would cut it on
    /// a host with that depth block: never, since no host's block is
    /// smaller than a chunk, which is what tests emulating hosts check.
    ///
    /// # Safety
    /// The three matrices must lie inside live allocations, `dst` written
    /// by no one else meanwhile.
    unsafe fn run_by_depth_chunks(
        &self,
        accumulate: bool,
        parallelism: Parallelism,
        host_depth_block: Option<usize>,
    ) {
        let mut first = true;
        for chunk in depth_chunks(self.k) {
            let blocks = chunks_of_at_most(chunk.len(), host_depth_block.unwrap_or(usize::MAX));
            for block in blocks {
                let depth = chunk.start + block.start..chunk.start + block.end;
                // SAFETY: `depth` lies inside 0..k; the caller vouches for
                // the matrices.
                unsafe { self.run_depth(depth, accumulate || !first, parallelism) };
                first = false;
            }
        }
    }

    /// One gemm call over the depth range `depth`.
    ///
    /// # Safety
    /// As [`Product::run_by_depth_chunks`], and `depth` inside `0..k`.
    unsafe fn run_depth(&self, depth: Range<usize>, accumulate: bool, parallelism: Parallelism) {
        debug_assert!(depth.end <= self.k);
        // SAFETY: the caller keeps every access inside the matrices; the
        // offsets select columns `depth` of lhs and rows `depth` of rhs.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                depth.len(),
                self.dst,
                1,
                self.dst_row_stride as isize,
                accumulate,
                self.lhs.wrapping_add(depth.start),
                1,
                self.lhs_row_stride as isize,
                self.rhs.wrapping_add(depth.start * self.rhs_row_stride),
                1,
                self.rhs_row_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
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

/// `dst[m, n] = lhs[m, k] · rhs[k, n]`, all row-major and contiguous, in
/// one call of the GEMM library the CPU experts use (call it inside a rayon
/// pool to choose its threads): the machine's plain GEMM, for benchmarks.
/// Unlike the experts' products, its depth blocking is gemm's own, derived
/// from the host's cache.
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

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    #[test]
    fn depth_chunks_cover_the_depth_in_order_within_gemms_smallest_block() {
        for depth in [
            0, 1, 2, 300, 511, 512, 513, 1024, 1100, 1408, 4096, 7168, 14336,
        ] {
            let chunks: Vec<_> = depth_chunks(depth).collect();
            let mut next = 0;
            for chunk in &chunks {
                assert_eq!(chunk.start, next, "{depth}: {chunks:?}");
                assert!(chunk.len() <= DEPTH_CHUNK, "{depth}: {chunks:?}");
                assert!(!chunk.is_empty() || depth == 0, "{depth}: {chunks:?}");
                next = chunk.end;
            }
            assert_eq!(next, depth, "{chunks:?}");
            assert_eq!(chunks.len(), depth.div_ceil(DEPTH_CHUNK).max(1));
        }
        // As gemm cuts a depth of 1408 on a host whose block is 512.
        let chunks: Vec<_> = depth_chunks(1408).collect();
        assert_eq!(chunks, vec![0..470, 470..940, 940..1408]);
    }

    /// The summation order the products promise, written out in scalars:
    /// per depth chunk, a chain of fused multiply-adds from zero, added to
    /// what the chunks before left.
    fn product_in_the_promised_order(
        lhs: &[f32],
        rhs: &[f32],
        start: &[f32],
        (m, k, n): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut dst = start.to_vec();
        for row in 0..m {
            for column in 0..n {
                for chunk in depth_chunks(k) {
                    let mut chain = 0f32;
                    for depth in chunk {
                        chain = lhs[row * k + depth].mul_add(rhs[depth * n + column], chain);
                    }
                    dst[row * n + column] += chain;
                }
            }
        }
        dst
    }

    #[test]
    fn products_sum_in_the_promised_order_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (m, k, n) = (70, 1100, 200);
        let lhs: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1f32..1.0)).collect();
        let weights: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1f32..1.0)).collect();
        let start: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1f32..1.0)).collect();
        let rounded: Vec<f32> = weights
            .iter()
            .map(|&value| half::bf16::from_f32(value).to_f32())
            .collect();
        for (format, exact) in [
            (WeightFormat::F32, &weights),
            (WeightFormat::Bf16, &rounded),
        ] {
            let packed = PackedMatrix::pack(format, k, n, DEFAULT_PANEL_COLUMNS, |row, column| {
                weights[row * n + column]
            });
            let want = product_in_the_promised_order(&lhs, exact, &start, (m, k, n));
            for (threads, host_depth_block) in [(1, None), (2, Some(768)), (1, Some(2048))] {
                let mut dst = start.clone();
                packed.multiply(&mut dst, &lhs, m, threads, true, host_depth_block);
                let differing = dst.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differing, 0,
                    "{format}, {threads} threads, {host_depth_block:?}"
                );
            }
        }
    }
}
