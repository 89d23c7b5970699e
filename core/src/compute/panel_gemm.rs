//! The products of the CPU experts: `dst (+)= lhs · W`, with `W` laid out
//! once, at load, in panels of up to [`PANEL`] columns (as wide as the
//! CPU's fastest kernel reads in one pass), in f32 or in bf16.
//!
//! - **f32**: each output is one chain of fused multiply-adds from zero,
//!   in depth order, then added to `dst` when accumulating; AVX-512 FMA
//!   where the CPU has it, the same chain in scalar `mul_add` elsewhere.
//! - **bf16**: the activations are rounded to bf16 (to nearest, ties to
//!   even) and the sums kept in f32, on AVX512-BF16's `vdpbf16ps` where the
//!   CPU has it (twice the multiply-adds of an f32 FMA per instruction,
//!   half the bytes of f32 weights). It takes the depth in pairs: each f32
//!   lane adds the product of the pair's odd elements, rounds, then adds
//!   the product of its even elements and rounds again (bf16 products are
//!   exact in f32), flushing subnormal inputs and results to zero. That is
//!   Intel's specification and what AMD's Zen 4 computes; the portable
//!   kernel computes the same, and a test checks it against the instruction
//!   bit for bit. Where the CPU has AMX (Intel Xeons since Sapphire
//!   Rapids), bf16 products run on its tiles instead, 4-5 times as fast,
//!   in AMX's own rounding of each 32-deep dot product: not the bits of
//!   the other kernels, but on that host still the same bits for a row
//!   whatever its batch and cut (`panel_gemm_amx.rs`; `MOEMESH_NO_AMX=1`
//!   opts out).
//!
//! Either way the summation order follows from the shapes alone: every row
//! is computed alike whatever the batch (no padding needed for batch
//! invariance), and neither the threads, nor the columns given to each,
//! nor the host's caches change a bit. A decode-sized product reads each
//! weight once, in order.

#[cfg(target_arch = "x86_64")]
use chunks::prefetch_streamed;
use chunks::{CHUNK_BYTES, Carry, PARTIAL_SUMS, Prefetch, stream_ahead_words};
use line_words::LineWords;
use magnitudes::Magnitudes;

/// Lanes of one AVX-512 register of f32.
const LANES: usize = 16;
/// Output columns of the widest panel: four AVX-512 registers of
/// accumulators per row.
pub(super) const PANEL: usize = 4 * LANES;
/// Rows one kernel call computes: 6 rows × 4 registers of accumulators,
/// 4 of weights and one of broadcast activations fit in 32 registers.
const ROWS: usize = 6;

/// How a panel matrix stores its weights, one 32-bit word per depth step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Words {
    /// One f32 per depth.
    #[default]
    F32,
    /// Two bf16 per word: an even depth in the low half, the next odd
    /// depth in the high half.
    Bf16Pairs,
}

impl Words {
    /// The words weights of `format` are packed in.
    pub(super) fn of(format: super::WeightFormat) -> Self {
        match format {
            super::WeightFormat::F32 => Self::F32,
            super::WeightFormat::Bf16 => Self::Bf16Pairs,
        }
    }

    /// Words a depth of `k` takes.
    fn depth_words(self, k: usize) -> usize {
        match self {
            Self::F32 => k,
            Self::Bf16Pairs => k.div_ceil(2),
        }
    }

    /// Word `index` of a row of `k` values given by `value(depth)`.
    fn word(self, index: usize, k: usize, value: impl Fn(usize) -> f32) -> u32 {
        match self {
            Self::F32 => value(index).to_bits(),
            Self::Bf16Pairs => {
                let odd = 2 * index + 1;
                let high = if odd < k { value(odd) } else { 0.0 };
                to_bf16_bits(value(2 * index)) | to_bf16_bits(high) << 16
            }
        }
    }

    /// Every word of a row of `values` into `words`, in order. The
    /// arithmetic has no branches, so that the compiler vectorizes it: a
    /// prefill rounds every activation it packs. Built for the widest
    /// vectors the CPU has, as the kernels are.
    fn row_words(self, values: &[f32], words: &mut [u32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512 BW (and so F), checked just above.
            return unsafe { self.row_words_avx512(values, words) };
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            return unsafe { self.row_words_avx2(values, words) };
        }
        self.row_words_portable(values, words);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw")]
    fn row_words_avx512(self, values: &[f32], words: &mut [u32]) {
        self.row_words_portable(values, words);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn row_words_avx2(self, values: &[f32], words: &mut [u32]) {
        self.row_words_portable(values, words);
    }

    #[inline(always)]
    fn row_words_portable(self, values: &[f32], words: &mut [u32]) {
        match self {
            Self::F32 => {
                for (word, value) in words.iter_mut().zip(values) {
                    *word = value.to_bits();
                }
            }
            Self::Bf16Pairs => {
                let pairs = values.chunks_exact(2);
                let odd_tail = pairs.remainder().first().copied();
                for (word, pair) in words.iter_mut().zip(pairs) {
                    *word = to_bf16_bits(pair[0]) | to_bf16_bits(pair[1]) << 16;
                }
                if let Some(last) = odd_tail {
                    words[values.len() / 2] = to_bf16_bits(last);
                }
            }
        }
    }
}

/// `value` rounded to bf16 (to nearest, ties to even; a NaN stays a quiet
/// NaN with its high bits, as `half::bf16::from_f32` does), a subnormal
/// flushed to zero as `vdpbf16ps` reads it. Without branches (see
/// [`Words::row_words`]).
#[inline(always)]
fn to_bf16_bits(value: f32) -> u32 {
    let bits = value.to_bits();
    // Adding just under half a unit of the last kept place, plus its
    // lowest bit, carries into it exactly when rounding to nearest even
    // goes up (an overflow rounds to infinity, as it should).
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    let nan = bits & 0x7fff_ffff > 0x7f80_0000;
    let bf16 = if nan { (bits >> 16) | 0x0040 } else { rounded };
    let subnormal = bf16 & 0x7f80 == 0;
    if subnormal { bf16 & 0x8000 } else { bf16 }
}

/// A weight matrix `[k, n]` (inputs by outputs) in panels.
pub(super) struct PanelMatrix {
    /// Panel after panel; panel `p` is `[depth words][width_p]`, its width
    /// padded with zero columns to whole registers. Every panel's rows
    /// start on cache lines (whole lines of words from a line-aligned
    /// start), so no register or tile row of weights spans two.
    words: LineWords,
    kind: Words,
    k: usize,
    n: usize,
    /// Columns of every panel but the last: [`panel_width`].
    panel: usize,
    magnitudes: Magnitudes,
}

impl PanelMatrix {
    /// Lays out `[k, n]` from `at(row, column)`, visiting the source in
    /// column order (checkpoints store `[out, in]`, so that reads it in
    /// order).
    pub(super) fn pack(kind: Words, k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Self {
        Self::pack_in_panels(kind, k, n, panel_width(kind), at)
    }

    /// [`PanelMatrix::pack`] in panels of `panel` columns, a multiple of
    /// 16 up to [`PANEL`].
    fn pack_in_panels(
        kind: Words,
        k: usize,
        n: usize,
        panel: usize,
        at: impl Fn(usize, usize) -> f32,
    ) -> Self {
        debug_assert!(panel.is_multiple_of(LANES) && panel <= PANEL);
        let depth_words = kind.depth_words(k);
        let mut words = LineWords::zeroed(depth_words * padded_columns(n, panel));
        for column in 0..n {
            let (start, width) = panel_bounds(n, panel, column / panel);
            let base = start * depth_words + column - start;
            for index in 0..depth_words {
                words[base + index * width] = kind.word(index, k, |row| at(row, column));
            }
        }
        let magnitudes = Magnitudes::of(kind, &words);
        Self {
            words,
            kind,
            k,
            n,
            panel,
            magnitudes,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        self.words.len() * size_of::<u32>()
    }

    /// `dst[m, n] = lhs · self`, or `dst +=` it when `accumulate`, for
    /// `lhs` laid out for this matrix's kind and depth; panels go to the
    /// pool's threads in groups of at least `task_columns` columns when
    /// `threads > 1` (call inside the pool).
    pub(super) fn multiply(
        &self,
        dst: &mut [f32],
        lhs: &PackedRows,
        threads: usize,
        accumulate: bool,
        task_columns: usize,
    ) {
        let (m, n) = (lhs.rows, self.n);
        assert!(lhs.kind == self.kind && lhs.k == self.k && dst.len() >= m * n);
        if m == 0 || n == 0 {
            return;
        }
        let product = Product {
            weights: self,
            lhs: &lhs.words,
            lhs_halves: &lhs.halves,
            lhs_rows: &lhs.row_major,
            dst: SharedOutput(dst.as_mut_ptr()),
            m,
            accumulate,
            exact_products: lhs.magnitudes.products_exact(self.magnitudes),
            kernel: Kernel::fastest(self.kind),
        };
        let panels = n.div_ceil(self.panel);
        let per_task = task_columns.div_ceil(self.panel).max(1);
        if threads > 1 && panels > per_task {
            use rayon::prelude::*;
            (0..panels.div_ceil(per_task))
                .into_par_iter()
                .for_each(|task| {
                    let first = task * per_task;
                    product.panels(first..panels.min(first + per_task));
                });
        } else {
            product.panels(0..panels);
        }
    }
}

/// Rows of activations laid out for the kernels, once for every product
/// that takes them: `[block][depth word][row in block]` in blocks of
/// [`ROWS`] rows, rows past the last zero. Reused from call to call.
#[derive(Default)]
pub(super) struct PackedRows {
    words: Vec<u32>,
    /// For bf16 words and the AVX2 kernel, each word's two values as f32,
    /// high then low, in the words' order: it broadcasts them from memory
    /// instead of splitting every word once per column group.
    halves: Vec<f32>,
    /// One row's words before they are spread over its block.
    row_words: Vec<u32>,
    /// For bf16 words on AMX, instead of `words`: each row's words in
    /// order (`PackedRows::pack_for_amx`), each row starting a cache line.
    row_major: LineWords,
    kind: Words,
    rows: usize,
    k: usize,
    magnitudes: Magnitudes,
}

impl PackedRows {
    /// Lays out `lhs [rows, k]` as `kind` words for the fastest kernel.
    pub(super) fn pack(&mut self, kind: Words, lhs: &[f32], rows: usize, k: usize) {
        assert!(lhs.len() >= rows * k);
        #[cfg(target_arch = "x86_64")]
        if Kernel::fastest(kind) == Kernel::Amx {
            return self.pack_for_amx(lhs, rows, k);
        }
        self.pack_blocks(kind, lhs, rows, k);
        #[cfg(target_arch = "x86_64")]
        if Kernel::fastest(kind) == Kernel::Avx2 {
            self.prepare_for_avx2();
        }
    }

    /// Lays out `lhs [rows, k]` in blocks of [`ROWS`] rows, as the tile
    /// kernels read them.
    fn pack_blocks(&mut self, kind: Words, lhs: &[f32], rows: usize, k: usize) {
        let depth_words = kind.depth_words(k);
        self.words.clear();
        self.words
            .resize(rows.div_ceil(ROWS) * depth_words * ROWS, 0);
        let mut row_words = std::mem::take(&mut self.row_words);
        row_words.resize(depth_words, 0);
        for row in 0..rows {
            kind.row_words(&lhs[row * k..(row + 1) * k], &mut row_words);
            let block = &mut self.words[row / ROWS * depth_words * ROWS..][..depth_words * ROWS];
            for (slot, &word) in block[row % ROWS..].iter_mut().step_by(ROWS).zip(&row_words) {
                *slot = word;
            }
        }
        self.row_words = row_words;
        (self.kind, self.rows, self.k) = (kind, rows, k);
        self.halves.clear();
        self.row_major.clear();
        self.magnitudes = Magnitudes::default();
    }

    /// What the AVX2 kernel reads of bf16 activations beside the words:
    /// their halves, and their magnitudes (whether its products may fuse).
    /// Other kernels need neither, so only packs for it pay for them.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    fn prepare_for_avx2(&mut self) {
        if self.kind == Words::Bf16Pairs {
            self.magnitudes = Magnitudes::of(self.kind, &self.words);
            self.halves.resize(2 * self.words.len(), 0.0);
            for (halves, &word) in self.halves.chunks_exact_mut(2).zip(&self.words) {
                halves.copy_from_slice(&[high(word), low(word)]);
            }
        }
    }
}

/// The instructions this CPU computes products of `kind` with, by name.
pub(super) fn kernel_name(kind: Words) -> &'static str {
    match Kernel::fastest(kind) {
        Kernel::Portable => "portable code",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => "AVX2",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if kind == Words::F32 => "AVX-512",
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => "AVX512-BF16",
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => "AMX",
    }
}

/// Columns of every panel but the last for `kind` on this CPU: the
/// AVX-512 kernel reads [`PANEL`] columns per depth in one pass; the AVX2
/// kernel's accumulators hold 16, and a panel that narrow streams from
/// memory in order (a wider one would be read in column groups, a cache
/// line of each depth at a time).
fn panel_width(kind: Words) -> usize {
    match Kernel::fastest(kind) {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => LANES,
        _ => PANEL,
    }
}

/// Columns of all panels of `n` columns: every panel is `panel` wide but
/// the last, padded to whole registers.
fn padded_columns(n: usize, panel: usize) -> usize {
    let full = n / panel * panel;
    full + (n - full).next_multiple_of(LANES)
}

/// The first column and the padded width of panel `index` of `n` columns
/// in panels of `panel`.
fn panel_bounds(n: usize, panel: usize, index: usize) -> (usize, usize) {
    let start = index * panel;
    (start, (n - start).min(panel).next_multiple_of(LANES))
}

/// The output matrix shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct SharedOutput(*mut f32);

// SAFETY: every task writes columns no other task writes.
unsafe impl Send for SharedOutput {}
unsafe impl Sync for SharedOutput {}

/// One product in progress: what every panel's tiles read and write.
struct Product<'a> {
    weights: &'a PanelMatrix,
    lhs: &'a [u32],
    lhs_halves: &'a [f32],
    /// The activations row by row, for AMX.
    lhs_rows: &'a [u32],
    dst: SharedOutput,
    m: usize,
    accumulate: bool,
    exact_products: bool,
    /// The kernel every tile runs on, the one the weights were laid out for.
    kernel: Kernel,
}

impl Product<'_> {
    /// Panels `indices`, one after the other (on AMX under one tile
    /// configuration).
    fn panels(&self, indices: std::ops::Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        if self.kernel == Kernel::Amx {
            // SAFETY: AMX is available (the kernel was chosen for it) and
            // the activations were packed for it (`PackedRows::pack`).
            return unsafe { amx::panels(self, indices) };
        }
        indices.for_each(|index| self.panel(index));
    }

    /// Every row block of panel `index`; the panel's weights stay in cache
    /// from block to block. On AVX-512 a panel of several blocks goes a
    /// depth chunk at a time ([`Product::chunk_words`]), its sums carried
    /// between chunks, and each chunk's first blocks prefetch the weights
    /// that follow it in memory (the panel's next chunk, or the next
    /// panel), so that the next chunk's first block need not wait on
    /// memory: that first pass ran at the speed of DRAM, a sixth of a
    /// prefill's time. A panel of one row block (a decode step's) reads
    /// each weight once and prefetches it a little ahead of use instead
    /// ([`Prefetch::stream`]).
    fn panel(&self, index: usize) {
        let depth_words = self.weights.kind.depth_words(self.weights.k);
        let (_, padded_width) = panel_bounds(self.weights.n, self.weights.panel, index);
        let blocks = self.m.div_ceil(ROWS);
        let chunk_words = self.chunk_words(depth_words, padded_width, blocks);
        let chunks = depth_words.div_ceil(chunk_words).max(1);
        let run = |partial: &mut [f32]| {
            for chunk in 0..chunks {
                let depth = chunk * chunk_words..((chunk + 1) * chunk_words).min(depth_words);
                let ahead = self.weights_after(index, &depth);
                for block in 0..blocks {
                    let carry = if chunks == 1 {
                        Carry::WHOLE
                    } else {
                        Carry {
                            partial: partial[block * ROWS * PANEL..].as_mut_ptr(),
                            resume: chunk > 0,
                            finish: chunk + 1 == chunks,
                        }
                    };
                    let prefetch = if blocks == 1 && self.kernel.streams() {
                        Prefetch::stream()
                    } else if blocks > 1 && self.kernel.prefetches_next_chunk() {
                        Prefetch::share(ahead, block, depth.len())
                    } else {
                        Prefetch::NONE
                    };
                    self.tile(index, block, depth.clone(), carry, prefetch)
                        .run_on(self.kernel);
                }
            }
        };
        if chunks == 1 {
            run(&mut []);
        } else {
            PARTIAL_SUMS.with_borrow_mut(|partial| {
                partial.resize(blocks * ROWS * PANEL, 0.0);
                run(partial);
            });
        }
    }

    /// Depth words per chunk of a panel `padded_width` wide: the whole
    /// depth but on AVX-512 with more than one row block, where a chunk
    /// of weights is at most [`CHUNK_BYTES`], so that it and the chunk
    /// prefetched after it stay in L2 together.
    fn chunk_words(&self, depth_words: usize, padded_width: usize, blocks: usize) -> usize {
        if blocks == 1 || !self.kernel.prefetches_next_chunk() {
            return depth_words.max(1);
        }
        let most = (CHUNK_BYTES / (padded_width * size_of::<u32>())).max(1);
        depth_words
            .div_ceil(depth_words.div_ceil(most).max(1))
            .max(1)
    }

    /// As many weights as the chunk `depth` of panel `index` has, from
    /// where it ends in memory (fewer at the end of the matrix).
    fn weights_after(&self, index: usize, depth: &std::ops::Range<usize>) -> &[u32] {
        let PanelMatrix {
            words,
            kind,
            k,
            n,
            panel,
            ..
        } = self.weights;
        let (start, padded_width) = panel_bounds(*n, *panel, index);
        let end = (start * kind.depth_words(*k) + depth.end * padded_width).min(words.len());
        &words[end..(end + depth.len() * padded_width).min(words.len())]
    }

    /// The tile of row block `block` of panel `index` over the depth words
    /// `depth`.
    fn tile(
        &self,
        index: usize,
        block: usize,
        depth: std::ops::Range<usize>,
        carry: Carry,
        prefetch: Prefetch,
    ) -> Tile<'_> {
        let PanelMatrix {
            words,
            kind,
            k,
            n,
            panel,
            ..
        } = self.weights;
        let depth_words = kind.depth_words(*k);
        let (start, padded_width) = panel_bounds(*n, *panel, index);
        let weights = &words[start * depth_words..][..depth_words * padded_width];
        let lhs = &self.lhs[block * depth_words * ROWS..][..depth_words * ROWS];
        Tile {
            kind: *kind,
            lhs: &lhs[depth.start * ROWS..depth.end * ROWS],
            lhs_halves: if self.lhs_halves.is_empty() {
                &[]
            } else {
                let halves = &self.lhs_halves[2 * block * depth_words * ROWS..];
                &halves[2 * depth.start * ROWS..2 * depth.end * ROWS]
            },
            weights: &weights[depth.start * padded_width..depth.end * padded_width],
            padded_width,
            dst: self.dst.0.wrapping_add(block * ROWS * n + start),
            dst_row_stride: *n,
            rows: (self.m - block * ROWS).min(ROWS),
            width: (*n - start).min(*panel),
            accumulate: self.accumulate,
            exact_products: self.exact_products,
            carry,
            prefetch,
        }
    }
}

/// Up to [`ROWS`] rows by up to [`PANEL`] columns of the output.
struct Tile<'a> {
    kind: Words,
    /// `[depth word][ROWS]` activations.
    lhs: &'a [u32],
    /// bf16 activations split ([`PackedRows::halves`]); empty for f32.
    lhs_halves: &'a [f32],
    /// `[depth word][padded_width]` weights.
    weights: &'a [u32],
    padded_width: usize,
    /// The tile's first output; its rows and columns lie inside the
    /// product's `dst`.
    dst: *mut f32,
    dst_row_stride: usize,
    rows: usize,
    width: usize,
    accumulate: bool,
    /// bf16 products are exact and sums never subnormal
    /// ([`Magnitudes::products_exact`]).
    exact_products: bool,
    /// Sums carried between depth chunks (AVX-512 only).
    carry: Carry,
    /// Weights to prefetch: the next chunk's (AVX-512), or the tile's own,
    /// streamed (AVX-512 and AVX2).
    prefetch: Prefetch,
}

/// The code a tile runs on: every kernel computes the same bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    /// AVX2 and FMA: 8 columns per register, 16 registers.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 (and AVX512-BF16 for bf16 words).
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AMX, for bf16 words: whole panels, not tiles, in its own rounding
    /// (`panel_gemm_amx.rs`).
    #[cfg(target_arch = "x86_64")]
    Amx,
}

impl Kernel {
    /// Every tile kernel this CPU runs for `kind`, the fastest last: all
    /// compute the same bits.
    #[cfg(test)]
    fn available(kind: Words) -> Vec<Self> {
        let mut kernels = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                kernels.push(Self::Avx2);
            }
            if avx512::available(kind) {
                kernels.push(Self::Avx512);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kind;
        kernels
    }

    /// Whether this kernel takes a panel of several row blocks a depth
    /// chunk at a time, prefetching the next chunk ([`Product::panel`]).
    fn prefetches_next_chunk(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        if self == Self::Avx512 {
            return true;
        }
        false
    }

    /// Whether tiles of one row block on this kernel stream their weights
    /// ([`Prefetch::stream`]).
    fn streams(self) -> bool {
        self != Self::Portable
    }

    /// The fastest kernel this CPU runs for `kind`.
    fn fastest(kind: Words) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if kind == Words::Bf16Pairs && amx::available() {
                return Self::Amx;
            }
            if avx512::available(kind) {
                return Self::Avx512;
            }
            if avx2::available() {
                return Self::Avx2;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = kind;
        Self::Portable
    }
}

impl Tile<'_> {
    /// The tile on `kernel`, one this CPU runs ([`Kernel::available`]).
    fn run_on(&self, kernel: Kernel) {
        match kernel {
            Kernel::Portable => self.run_portable(),
            // SAFETY: the CPU has the instructions (the caller's promise);
            // the tile's slices and output lie inside their matrices.
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => unsafe { avx2::tile(self) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => unsafe { avx512::tile(self) },
            #[cfg(target_arch = "x86_64")]
            Kernel::Amx => unreachable!("AMX computes whole panels, not tiles"),
        }
    }

    /// The kernel in plain arithmetic, in the same order and rounding.
    fn run_portable(&self) {
        let mut sums = [[0f32; PANEL]; ROWS];
        match self.kind {
            Words::F32 => self.sum_portable(&mut sums, |sum, x, w| {
                f32::from_bits(x).mul_add(f32::from_bits(w), sum)
            }),
            Words::Bf16Pairs => self.sum_portable(&mut sums, |sum, x, w| {
                let partial = flush_subnormal(sum + high(x) * high(w));
                flush_subnormal(partial + low(x) * low(w))
            }),
        }
        for (row, sums) in sums.iter().enumerate().take(self.rows) {
            for (column, &sum) in sums.iter().enumerate().take(self.width) {
                // SAFETY: the tile's rows and columns lie inside dst.
                unsafe {
                    let out = self.dst.add(row * self.dst_row_stride + column);
                    *out = if self.accumulate { *out + sum } else { sum };
                }
            }
        }
    }

    /// Every depth word into `sums` with `step(sum, activation, weight)`.
    #[inline(always)]
    fn sum_portable(&self, sums: &mut [[f32; PANEL]; ROWS], step: impl Fn(f32, u32, u32) -> f32) {
        let depth_words = self.lhs.len() / ROWS;
        for index in 0..depth_words {
            let weights = &self.weights[index * self.padded_width..][..self.width];
            for (row, sums) in sums.iter_mut().enumerate().take(self.rows) {
                let activation = self.lhs[index * ROWS + row];
                for (sum, &weight) in sums.iter_mut().zip(weights) {
                    *sum = step(*sum, activation, weight);
                }
            }
        }
    }
}

fn low(pair: u32) -> f32 {
    f32::from_bits(pair << 16)
}

fn high(pair: u32) -> f32 {
    f32::from_bits(pair & 0xffff_0000)
}

/// Zero (of the same sign) for a subnormal, as `vdpbf16ps` flushes them.
fn flush_subnormal(value: f32) -> f32 {
    if value.is_subnormal() {
        f32::from_bits(value.to_bits() & 0x8000_0000)
    } else {
        value
    }
}

#[path = "panel_gemm_chunks.rs"]
mod chunks;

#[path = "panel_gemm_magnitudes.rs"]
mod magnitudes;

#[path = "panel_gemm_line_words.rs"]
mod line_words;

#[cfg(target_arch = "x86_64")]
#[path = "panel_gemm_avx512.rs"]
mod avx512;

#[cfg(target_arch = "x86_64")]
#[path = "panel_gemm_avx2.rs"]
mod avx2;

#[cfg(target_arch = "x86_64")]
#[path = "panel_gemm_amx.rs"]
mod amx;

#[cfg(test)]
#[path = "panel_gemm_tests.rs"]
mod tests;
