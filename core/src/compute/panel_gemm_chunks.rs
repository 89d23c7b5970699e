//! How the AVX-512 kernel walks a panel: with several row blocks, a depth
//! chunk at a time, its sums carried between chunks, prefetching the
//! weights that follow each chunk while its blocks reuse it; with one
//! (a decode step's), prefetching its own weights a little ahead, past
//! the caches on AMD (see `Product::panel`, [`streams_past_caches`]).

/// The most bytes of weights in one depth chunk of a panel (see
/// `Product::chunk_words`): a 64-column f32 panel of a hidden size of
/// 1024 in one chunk, of an intermediate size of 2816 in three. On a Zen 5
/// core (1 MiB L2; `expert_ffn_gflops -- 128 1`, six interleaved runs):
/// 233.5, 235.8 and 234.6 GFLOP/s with chunks of 128, 256 and 512 KiB,
/// 232.9 with prefetching alone and 224.9 with neither.
pub(super) const CHUNK_BYTES: usize = 256 << 10;

thread_local! {
    /// A panel's sums between depth chunks, [`ROWS`](super::ROWS) × [`PANEL`](super::PANEL) per row
    /// block, written by a chunk before the next reads them.
    pub(super) static PARTIAL_SUMS: std::cell::RefCell<Vec<f32>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Where a tile of one depth chunk keeps its sums for the next chunk.
#[derive(Clone, Copy)]
pub(super) struct Carry {
    /// [`ROWS`](super::ROWS) rows of [`PANEL`](super::PANEL) sums; unused by a tile of the whole depth.
    pub(super) partial: *mut f32,
    /// Start from the sums in `partial` instead of zero.
    pub(super) resume: bool,
    /// Write the sums to `dst` (the last chunk), not to `partial`.
    pub(super) finish: bool,
}

impl Carry {
    /// A tile of the whole depth: from zero into `dst`.
    pub(super) const WHOLE: Self = Self {
        partial: std::ptr::null_mut(),
        resume: false,
        finish: true,
    };
}

/// What a tile prefetches: lines of the weights after its own into L2,
/// one per depth word from `first`, or its own weights ahead of use
/// (`stream`).
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    pub(super) first: *const u32,
    pub(super) lines: usize,
    /// Each weight is read once (a panel of one row block): prefetch it
    /// [`STREAM_AHEAD_BYTES`] ahead, past the caches where
    /// [`streams_past_caches`].
    pub(super) stream: bool,
    pub(super) past_caches: bool,
}

/// Whether streamed weights are prefetched non-temporally
/// (`prefetchnta`) rather than into L1 (`prefetcht0`): on AMD, so that a
/// decode step's hundreds of MB of weights do not evict what the caches
/// hold for the code that answers the request (Zen 5 guest: dispatch
/// alone through the router 977 → 622 µs). Intel's `prefetchnta` fills
/// L1 alone, bypassing L2 and its streamer, and the step waits on memory:
/// on a Xeon with AMX, a decode step ran at 0.58-0.67 of the read bound
/// with it, 1.45-1.64 with `prefetcht0` and 1.14-1.23 with no prefetch
/// (`decode_step -- 8 2 40`, two rounds), and the bench's decode dispatch
/// overhead was 3.9-4.0 ms against 1.7-2.1 without it.
pub(super) fn streams_past_caches() -> bool {
    static AMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let vendor = std::arch::x86_64::__cpuid(0);
            let bytes: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
                .iter()
                .flat_map(|word| word.to_le_bytes())
                .collect();
            bytes == b"AuthenticAMD"
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Prefetches the line at `at` of a tile's streamed weights as
/// [`streams_past_caches`] says.
///
/// # Safety
/// None beyond the CPU having SSE (every x86-64): a prefetch never faults.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn prefetch_streamed(at: *const i8, past_caches: bool) {
    use std::arch::x86_64::{_MM_HINT_NTA, _MM_HINT_T0, _mm_prefetch};
    // SAFETY: prefetches never fault, whatever the address.
    unsafe {
        if past_caches {
            _mm_prefetch::<_MM_HINT_NTA>(at)
        } else {
            _mm_prefetch::<_MM_HINT_T0>(at)
        }
    }
}

/// Bytes of its weights ahead a streaming tile prefetches: 16 depth
/// words of a 64-column f32 panel. On a Zen 5 guest (`bench --no-torch`,
/// three rounds of three interleaved runs), streaming 4 KiB ahead past
/// the caches took decode dispatch alone from 0.80-1.04 ms to 0.62-0.67
/// through the router and from 377-515 to 328-346 µs in one hop; 12 KiB
/// was in between, and an ordinary (T0) prefetch 4 KiB ahead changed
/// nothing there. On the Xeon, 16 KiB past the caches was no better.
const STREAM_AHEAD_BYTES: usize = 4 << 10;

/// Depth words ahead a streaming tile of a panel `padded_width` wide
/// prefetches ([`STREAM_AHEAD_BYTES`]).
pub(super) fn stream_ahead_words(padded_width: usize) -> usize {
    (STREAM_AHEAD_BYTES / (padded_width * size_of::<u32>())).max(1)
}

impl Prefetch {
    pub(super) const NONE: Self = Self {
        first: std::ptr::null(),
        lines: 0,
        stream: false,
        past_caches: false,
    };

    /// A tile that streams its own weights.
    pub(super) fn stream() -> Self {
        Self {
            stream: true,
            past_caches: streams_past_caches(),
            ..Self::NONE
        }
    }

    /// Row block `block`'s share of `ahead` when each block of a chunk
    /// `depth_words` deep prefetches one line per word, first blocks first.
    pub(super) fn share(ahead: &[u32], block: usize, depth_words: usize) -> Self {
        const WORDS_PER_LINE: usize = 64 / size_of::<u32>();
        let first_line = block * depth_words;
        let lines = ahead.len().div_ceil(WORDS_PER_LINE);
        if first_line >= lines {
            return Self::NONE;
        }
        Self {
            first: ahead[first_line * WORDS_PER_LINE..].as_ptr(),
            lines: (lines - first_line).min(depth_words),
            ..Self::NONE
        }
    }
}
