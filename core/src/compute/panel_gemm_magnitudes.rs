//! Whether bf16 products may take fused multiply-adds: the smallest and
//! largest magnitudes of a matrix's values (see [`Magnitudes`]).

use super::Words;

/// The smallest nonzero and the largest magnitude of a matrix's bf16
/// values, which tell whether a product of two matrices may take a fused
/// multiply-add where the kernels' arithmetic multiplies, adds and
/// flushes (the AVX2 kernel, without `vdpbf16ps`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Magnitudes {
    pub(super) smallest: f32,
    pub(super) largest: f32,
}

impl Default for Magnitudes {
    /// No values: every product is exact.
    fn default() -> Self {
        Self {
            smallest: f32::INFINITY,
            largest: 0.0,
        }
    }
}

impl Magnitudes {
    /// Of the values in `words`; f32 words keep the default, since their
    /// kernels fuse anyway.
    pub(super) fn of(kind: Words, words: &[u32]) -> Self {
        if kind != Words::Bf16Pairs {
            return Self::default();
        }
        // On the bits of magnitudes, which order as their values do, so
        // that the loop has no branches and vectorizes.
        const INFINITY_BITS: u32 = 0x7f80_0000;
        let (mut smallest, mut largest) = (u32::MAX, 0u32);
        for &word in words {
            for bits in [word << 16 & 0x7fff_0000, word & 0x7fff_0000] {
                // Zero and NaN never count as the smallest nonzero.
                let nonzero = if bits == 0 || bits > INFINITY_BITS {
                    u32::MAX
                } else {
                    bits
                };
                smallest = smallest.min(nonzero);
                largest = largest.max(bits);
            }
        }
        Self {
            smallest: if smallest == u32::MAX {
                f32::INFINITY
            } else {
                f32::from_bits(smallest)
            },
            // NaN becomes infinity: never exact.
            largest: f32::from_bits(largest.min(INFINITY_BITS)),
        }
    }

    /// Whether `fma(x, w, sum)` is `flush(sum + x·w)` for every value `x`
    /// of one side and `w` of the other, whatever the sums: bf16 products
    /// have 16 significant bits, so they are exact unless out of range;
    /// every nonzero one at least 2^-102 is a multiple of 2^-117, and so is
    /// every rounded sum of them, which therefore never falls below the
    /// normal range but to zero and needs no flush.
    pub(super) fn products_exact(self, other: Self) -> bool {
        let smallest = f64::from(self.smallest) * f64::from(other.smallest);
        let largest = f64::from(self.largest) * f64::from(other.largest);
        smallest >= 2f64.powi(-102) && largest < 2f64.powi(127)
    }
}
