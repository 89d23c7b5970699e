//! The panel kernels on AVX2 and FMA, for CPUs without AVX-512 (AMD before
//! Zen 4, most Intel desktops, many cloud guests). A register holds 8
//! columns and there are only 16 registers, so the weights are packed in
//! 16-column panels for these kernels (`panel_width`) and a tile computes
//! its panel in column groups whose accumulators stay in registers: 6 rows
//! × 16 columns, in f32 and in bf16 pairs.
//! A wider panel (the AVX-512 layout, which tests run here too) goes group
//! by group a depth chunk at a time. Every output is still one chain in
//! depth order: the same bits as the other kernels.

use std::arch::x86_64::*;

use super::{PANEL, ROWS, Tile, Words, prefetch_streamed, stream_ahead_words};

/// Lanes of one AVX2 register of f32.
const LANES: usize = 8;

/// Whether this CPU runs the AVX2 kernels (both word kinds).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// The tile on AVX2, column group after column group.
///
/// # Safety
/// [`available`]; the tile's slices and output as [`Tile`] says, its
/// padded width a whole number of 16-column registers of AVX-512.
pub(super) unsafe fn tile(tile: &Tile<'_>) {
    let depth_words = tile.lhs.len() / ROWS;
    // A tile of one group (a 16-column panel) streams its weights in
    // order: nothing to keep in cache for another group.
    let one_group = tile.padded_width <= 2 * LANES;
    let chunk_depth = if one_group { depth_words } else { DEPTH_CHUNK };
    SAVED_SUMS.with_borrow_mut(|saved| {
        // SAFETY: forwarded from the caller.
        unsafe { run_chunks(tile, depth_words, chunk_depth, saved) }
    });
}

thread_local! {
    /// The sums a tile's column groups keep between depth chunks, one set
    /// per thread rather than per tile: a tile writes a group's sums
    /// before it reads them, and a tile of one chunk (a 16-column panel)
    /// never touches them, so they need no zeroing, which cost 1-2% of a
    /// prefill when every tile zeroed its own.
    static SAVED_SUMS: std::cell::RefCell<[[f32; PANEL]; ROWS]> =
        const { std::cell::RefCell::new([[0.0; PANEL]; ROWS]) };
}

/// The tile's depth in chunks of `chunk_depth` words, every column group
/// per chunk.
///
/// # Safety
/// As [`tile`].
unsafe fn run_chunks(
    tile: &Tile<'_>,
    depth_words: usize,
    chunk_depth: usize,
    saved: &mut [[f32; PANEL]; ROWS],
) {
    /// The kernel `$kernel::<registers, rows>` on `$group`.
    macro_rules! by_rows {
        ($kernel:ident, $registers:literal, $group:expr) => {
            match tile.rows {
                1 => $kernel::<$registers, 1>(tile, $group),
                2 => $kernel::<$registers, 2>(tile, $group),
                3 => $kernel::<$registers, 3>(tile, $group),
                4 => $kernel::<$registers, 4>(tile, $group),
                5 => $kernel::<$registers, 5>(tile, $group),
                _ => $kernel::<$registers, ROWS>(tile, $group),
            }
        };
    }
    let mut start = 0;
    loop {
        let chunk = Chunk {
            depth: start..(start + chunk_depth).min(depth_words),
            first: start == 0,
            last: start + chunk_depth >= depth_words,
        };
        let mut first = 0;
        while first < tile.padded_width {
            let group = Group {
                first,
                chunk: &chunk,
                saved: &mut *saved,
            };
            // SAFETY: forwarded from the caller; a group never passes the
            // padded width, a multiple of 16 columns.
            let registers = unsafe {
                match tile.kind {
                    Words::F32 => by_rows!(f32_group, 2, group),
                    Words::Bf16Pairs => by_rows!(bf16_group, 2, group),
                }
            };
            first += registers * LANES;
        }
        if chunk.last {
            break;
        }
        start = chunk.depth.end;
    }
}

/// Depth words a tile's column groups take in turn before the next
/// ones, when it has several: the chunk's weights (at most 8 KiB) stay in
/// the first-level cache from group to group, so memory streams each
/// panel once, in order.
const DEPTH_CHUNK: usize = 32;

/// A range of depth words every column group sums in turn.
struct Chunk {
    depth: std::ops::Range<usize>,
    /// The sums start from zero.
    first: bool,
    /// The sums are final: to the output, not saved.
    last: bool,
}

/// One column group's share of a chunk, and the sums every group saves
/// between chunks (exact: a chain resumed from its saved value is the
/// same chain).
struct Group<'a> {
    first: usize,
    chunk: &'a Chunk,
    saved: &'a mut [[f32; PANEL]; ROWS],
}

impl Group<'_> {
    /// The sums the group starts the chunk from.
    #[inline(always)]
    unsafe fn start<const NV: usize, const R: usize>(&self) -> [[__m256; NV]; R] {
        // SAFETY: the caller runs with AVX; the group lies inside a panel.
        unsafe {
            let mut sums = [[_mm256_setzero_ps(); NV]; R];
            if !self.chunk.first {
                for (row, sums) in sums.iter_mut().enumerate() {
                    for (vector, sum) in sums.iter_mut().enumerate() {
                        *sum = _mm256_loadu_ps(
                            self.saved[row][self.first + vector * LANES..].as_ptr(),
                        );
                    }
                }
            }
            sums
        }
    }

    /// Saves the sums for the next chunk, or stores them in the tile's
    /// output after the last.
    #[inline(always)]
    unsafe fn finish<const NV: usize, const R: usize>(
        &mut self,
        tile: &Tile<'_>,
        sums: &[[__m256; NV]; R],
    ) {
        // SAFETY: as in `start`; the output as `store` needs it.
        unsafe {
            if self.chunk.last {
                store(tile, self.first, sums);
                return;
            }
            for (row, sums) in sums.iter().enumerate() {
                for (vector, &sum) in sums.iter().enumerate() {
                    let at = self.saved[row][self.first + vector * LANES..].as_mut_ptr();
                    _mm256_storeu_ps(at, sum);
                }
            }
        }
    }
}

/// For a tile that streams its weights (one 16-column group, a panel of
/// one row block), the depth words below which it prefetches the line of
/// weights `ahead` words later, and `ahead`; (0, _) for every other tile.
#[inline(always)]
fn streamed_depth(tile: &Tile<'_>, group: &Group<'_>) -> (usize, usize) {
    let ahead = stream_ahead_words(tile.padded_width);
    if !tile.prefetch.stream || tile.padded_width > 2 * LANES {
        return (0, ahead);
    }
    (group.chunk.depth.end.saturating_sub(ahead), ahead)
}

/// `NV` registers of columns from `first`, `R` rows, in f32; returns `NV`.
#[target_feature(enable = "avx2,fma")]
unsafe fn f32_group<const NV: usize, const R: usize>(
    tile: &Tile<'_>,
    mut group: Group<'_>,
) -> usize {
    let first = group.first;
    debug_assert!(tile.weights.len() >= tile.lhs.len() / ROWS * tile.padded_width);
    debug_assert!(first + NV * LANES <= tile.padded_width);
    let weights = tile.weights.as_ptr().cast::<f32>();
    let lhs = tile.lhs.as_ptr().cast::<f32>();
    // SAFETY: the chunk's depth words and the group inside the padded
    // width keep every read inside the slices, and every streaming
    // prefetch `ahead` words before the chunk's end.
    unsafe {
        let mut sums = group.start::<NV, R>();
        let (streamed, ahead) = streamed_depth(tile, &group);
        for index in group.chunk.depth.clone() {
            let row_weights = weights.add(index * tile.padded_width + first);
            if index < streamed {
                prefetch_streamed(
                    row_weights.add(ahead * tile.padded_width).cast(),
                    tile.prefetch.past_caches,
                );
            }
            let mut columns = [_mm256_setzero_ps(); NV];
            for (vector, column) in columns.iter_mut().enumerate() {
                *column = _mm256_loadu_ps(row_weights.add(vector * LANES));
            }
            for (row, sums) in sums.iter_mut().enumerate() {
                let activation = _mm256_broadcast_ss(&*lhs.add(index * ROWS + row));
                for (sum, &column) in sums.iter_mut().zip(&columns) {
                    *sum = _mm256_fmadd_ps(activation, column, *sum);
                }
            }
        }
        group.finish(tile, &sums);
    }
    NV
}

/// `NV` registers of columns from `first`, `R` rows, in bf16 pairs;
/// returns `NV`. Per pair, each lane adds the odd depths' product, rounds
/// and flushes, then the even depths': the portable kernel's arithmetic,
/// in two fused multiply-adds where the tile's products are exact.
#[target_feature(enable = "avx2,fma")]
unsafe fn bf16_group<const NV: usize, const R: usize>(tile: &Tile<'_>, group: Group<'_>) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe {
        if tile.exact_products {
            bf16_sums::<NV, R, true>(tile, group);
        } else {
            bf16_sums::<NV, R, false>(tile, group);
        }
    }
    NV
}

/// [`bf16_group`]'s sums; `FUSED`: `fma` for `flush(sum + x·w)`.
#[inline(always)]
unsafe fn bf16_sums<const NV: usize, const R: usize, const FUSED: bool>(
    tile: &Tile<'_>,
    mut group: Group<'_>,
) {
    let first = group.first;
    debug_assert!(tile.weights.len() >= tile.lhs.len() / ROWS * tile.padded_width);
    debug_assert!(first + NV * LANES <= tile.padded_width);
    // SAFETY: the caller runs with AVX2 and FMA; the chunk's depth words
    // and the group inside the padded width keep every read inside the
    // slices, and every streaming prefetch `ahead` words before the
    // chunk's end.
    unsafe {
        let high_half = _mm256_set1_epi32(0xffff_0000_u32 as i32);
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let smallest_normal = _mm256_set1_ps(f32::MIN_POSITIVE);
        let step = |sum: __m256, x: __m256, w: __m256| {
            if FUSED {
                return _mm256_fmadd_ps(x, w, sum);
            }
            // Zero (of the same sign) where a lane is subnormal, as
            // `vdpbf16ps` flushes.
            let value = _mm256_add_ps(sum, _mm256_mul_ps(x, w));
            let tiny =
                _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(value, magnitude), smallest_normal);
            _mm256_andnot_ps(_mm256_and_ps(tiny, magnitude), value)
        };
        debug_assert_eq!(tile.lhs_halves.len(), 2 * tile.lhs.len());
        let (weights, lhs_halves) = (tile.weights.as_ptr(), tile.lhs_halves.as_ptr());
        let mut sums = group.start::<NV, R>();
        // Every row's odd-depth step, then every row's even-depth step:
        // each sum still takes the pair in order, and only one half of the
        // weights is held at a time (12 accumulators fit beside them).
        let split = |pairs: __m256i, high: bool| {
            _mm256_castsi256_ps(if high {
                _mm256_and_si256(pairs, high_half)
            } else {
                _mm256_slli_epi32::<16>(pairs)
            })
        };
        let (streamed, ahead) = streamed_depth(tile, &group);
        for index in group.chunk.depth.clone() {
            let row_weights = weights.add(index * tile.padded_width + first);
            if index < streamed {
                prefetch_streamed(
                    row_weights.add(ahead * tile.padded_width).cast(),
                    tile.prefetch.past_caches,
                );
            }
            for (half, high) in [(0, true), (1, false)] {
                let mut columns = [_mm256_setzero_ps(); NV];
                for (vector, column) in columns.iter_mut().enumerate() {
                    let pairs = _mm256_loadu_si256(row_weights.add(vector * LANES).cast());
                    *column = split(pairs, high);
                }
                for (row, sums) in sums.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*lhs_halves.add(2 * (index * ROWS + row) + half));
                    for (sum, &column) in sums.iter_mut().zip(&columns) {
                        *sum = step(*sum, x, column);
                    }
                }
            }
        }
        group.finish(tile, &sums);
    }
}

/// Writes (or adds) the group's rows, lanes past the tile's width masked.
#[inline(always)]
unsafe fn store<const NV: usize, const R: usize>(
    tile: &Tile<'_>,
    first: usize,
    sums: &[[__m256; NV]; R],
) {
    // SAFETY: the caller runs with AVX2.
    let lane_index = unsafe { _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7) };
    for (row, sums) in sums.iter().enumerate().take(tile.rows) {
        for (vector, &sum) in sums.iter().enumerate() {
            let column = first + vector * LANES;
            if column >= tile.width {
                break;
            }
            // SAFETY: the tile's rows and columns lie inside dst; lanes at
            // or past its width are masked off.
            unsafe {
                let at = tile.dst.add(row * tile.dst_row_stride + column);
                let valid = tile.width - column;
                if valid >= LANES {
                    let value = if tile.accumulate {
                        _mm256_add_ps(_mm256_loadu_ps(at), sum)
                    } else {
                        sum
                    };
                    _mm256_storeu_ps(at, value);
                } else {
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid as i32), lane_index);
                    let value = if tile.accumulate {
                        _mm256_add_ps(_mm256_maskload_ps(at, mask), sum)
                    } else {
                        sum
                    };
                    _mm256_maskstore_ps(at, mask, value);
                }
            }
        }
    }
}
