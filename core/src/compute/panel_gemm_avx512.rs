//! The panel kernels on AVX-512: 16 columns per register, a tile's
//! 6 rows × 64 columns in 24 accumulators.

use std::arch::x86_64::*;

use super::{LANES, PANEL, ROWS, Tile, Words, prefetch_streamed, stream_ahead_words};

/// Whether this CPU runs the AVX-512 kernel for `kind`.
pub(super) fn available(kind: Words) -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && match kind {
            Words::F32 => std::arch::is_x86_feature_detected!("fma"),
            Words::Bf16Pairs => std::arch::is_x86_feature_detected!("avx512bf16"),
        }
}

/// The tile on AVX-512, 16 columns per register, as many rows as it
/// has (a decode-sized tile computes no rows it does not need).
///
/// # Safety
/// [`available`] for the tile's kind; the tile's slices and output as
/// [`Tile`] says, its padded width a whole number of registers.
pub(super) unsafe fn tile(tile: &Tile<'_>) {
    /// The kernel `$kernel::<registers, rows>` for this tile.
    macro_rules! by_rows {
        ($kernel:ident, $registers:literal) => {
            match tile.rows {
                1 => $kernel::<$registers, 1>(tile),
                2 => $kernel::<$registers, 2>(tile),
                3 => $kernel::<$registers, 3>(tile),
                4 => $kernel::<$registers, 4>(tile),
                5 => $kernel::<$registers, 5>(tile),
                _ => $kernel::<$registers, ROWS>(tile),
            }
        };
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        match (tile.kind, tile.padded_width / LANES) {
            (Words::F32, 1) => by_rows!(f32_tile, 1),
            (Words::F32, 2) => by_rows!(f32_tile, 2),
            (Words::F32, 3) => by_rows!(f32_tile, 3),
            (Words::F32, _) => by_rows!(f32_tile, 4),
            (Words::Bf16Pairs, 1) => by_rows!(bf16_tile, 1),
            (Words::Bf16Pairs, 2) => by_rows!(bf16_tile, 2),
            (Words::Bf16Pairs, 3) => by_rows!(bf16_tile, 3),
            (Words::Bf16Pairs, _) => by_rows!(bf16_tile, 4),
        }
    }
}

#[target_feature(enable = "avx512f,fma")]
unsafe fn f32_tile<const NV: usize, const R: usize>(tile: &Tile<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let sums = accumulate::<NV, R>(tile, |sum, activation, weights| {
            _mm512_fmadd_ps(activation, weights, sum)
        });
        store::<NV, R>(tile, &sums);
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn bf16_tile<const NV: usize, const R: usize>(tile: &Tile<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        let sums = accumulate::<NV, R>(tile, |sum, activation, weights| {
            _mm512_dpbf16_ps(
                sum,
                std::mem::transmute::<__m512, __m512bh>(activation),
                std::mem::transmute::<__m512, __m512bh>(weights),
            )
        });
        store::<NV, R>(tile, &sums);
    }
}

/// Sums every depth word with `step(sum, broadcast activation,
/// weights)`: per word, `NV` registers of weights, then each row's
/// activation broadcast against them.
#[inline(always)]
unsafe fn accumulate<const NV: usize, const R: usize>(
    tile: &Tile<'_>,
    step: impl Fn(__m512, __m512, __m512) -> __m512,
) -> [[__m512; NV]; R] {
    debug_assert_eq!(tile.padded_width, NV * LANES);
    let depth_words = tile.lhs.len() / ROWS;
    debug_assert!(tile.weights.len() >= depth_words * tile.padded_width);
    let (weights, lhs) = (tile.weights.as_ptr(), tile.lhs.as_ptr());
    // SAFETY: (all reads) index < depth_words keeps them inside the
    // slices: NV registers make the padded width, ROWS words per index;
    // streaming prefetches stay below depth_words, and lines below
    // `prefetch.lines` lie inside the weights `Prefetch::share` took.
    // `carry.partial` holds ROWS rows of PANEL sums when resuming.
    unsafe {
        let mut sums = [[_mm512_setzero_ps(); NV]; R];
        if tile.carry.resume {
            for (row, sums) in sums.iter_mut().enumerate() {
                for (vector, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_loadu_ps(tile.carry.partial.add(row * PANEL + vector * LANES));
                }
            }
        }
        let prefetch = tile.prefetch;
        let ahead = stream_ahead_words(tile.padded_width);
        let streamed = if prefetch.stream {
            depth_words.saturating_sub(ahead)
        } else {
            0
        };
        for index in 0..depth_words {
            if index < prefetch.lines {
                _mm_prefetch::<_MM_HINT_T1>(prefetch.first.add(index * 16).cast());
            }
            let row_weights = weights.add(index * tile.padded_width);
            if index < streamed {
                let later = row_weights.add(ahead * tile.padded_width);
                for vector in 0..NV {
                    prefetch_streamed(later.add(vector * LANES).cast(), prefetch.past_caches);
                }
            }
            let mut columns = [_mm512_setzero_ps(); NV];
            for (vector, column) in columns.iter_mut().enumerate() {
                *column = _mm512_loadu_ps(row_weights.add(vector * LANES).cast());
            }
            for (row, sums) in sums.iter_mut().enumerate() {
                let word = *lhs.add(index * ROWS + row);
                let activation = _mm512_castsi512_ps(_mm512_set1_epi32(word as i32));
                for (sum, &column) in sums.iter_mut().zip(&columns) {
                    *sum = step(*sum, activation, column);
                }
            }
        }
        sums
    }
}

/// Writes (or adds) the tile's rows, the last register masked to its width.
#[inline(always)]
unsafe fn store<const NV: usize, const R: usize>(tile: &Tile<'_>, sums: &[[__m512; NV]; R]) {
    let last_lanes = tile.width - (NV - 1) * LANES;
    let last_mask: __mmask16 = if last_lanes >= LANES {
        0xffff
    } else {
        (1u16 << last_lanes) - 1
    };
    debug_assert!(tile.rows <= R);
    if !tile.carry.finish {
        for (row, sums) in sums.iter().enumerate() {
            for (vector, &sum) in sums.iter().enumerate() {
                // SAFETY: `partial` holds ROWS rows of PANEL sums.
                unsafe {
                    _mm512_storeu_ps(tile.carry.partial.add(row * PANEL + vector * LANES), sum)
                };
            }
        }
        return;
    }
    for (row, sums) in sums.iter().enumerate().take(tile.rows) {
        // SAFETY: the tile's rows and columns lie inside dst; the last
        // register's loads and stores are masked to the tile's width.
        unsafe {
            let out = tile.dst.add(row * tile.dst_row_stride);
            for (vector, &sum) in sums.iter().enumerate() {
                let at = out.add(vector * LANES);
                let mask = if vector + 1 == NV { last_mask } else { 0xffff };
                let value = if tile.accumulate {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, at), sum)
                } else {
                    sum
                };
                _mm512_mask_storeu_ps(at, mask, value);
            }
        }
    }
}
