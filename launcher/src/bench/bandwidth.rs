//! The machine's memory read bandwidth, measured beside the contestants, and
//! the bound it sets on a decode step: a decode-sized forward computes
//! little and must stream the weights of every expert its tokens touch.

use std::time::Instant;

use moemesh_core::layer::MoeLayer;

/// Bytes the bench reads per measurement: far past any cache.
pub(super) const BUFFER_BYTES: usize = 512 << 20;

/// A buffer read end to end by `threads` threads, each its own share.
pub(super) struct ReadBandwidth {
    pool: rayon::ThreadPool,
    threads: usize,
    words: Vec<u64>,
}

impl ReadBandwidth {
    /// A buffer of `bytes` for `threads` threads.
    pub(super) fn new(threads: usize, bytes: usize) -> anyhow::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        // Distinct values, so that no page is shared or left unmapped.
        let words = (0..bytes / size_of::<u64>())
            .map(|index| index as u64)
            .collect();
        Ok(Self {
            pool,
            threads,
            words,
        })
    }

    /// Reads the buffer `count` times; returns the read rate in GB/s.
    pub(super) fn measure(&self, count: usize) -> f64 {
        let share = self.words.len().div_ceil(self.threads);
        let started = Instant::now();
        for _ in 0..count {
            self.pool.scope(|scope| {
                for part in self.words.chunks(share) {
                    scope.spawn(move |_| {
                        std::hint::black_box(sum_words(part));
                    });
                }
            });
        }
        (count * self.words.len() * size_of::<u64>()) as f64 / started.elapsed().as_secs_f64() / 1e9
    }
}

/// The wrapping sum of `words`: integer adds, which the compiler may
/// reorder into as many vector lanes as it likes, so that the loads, not
/// the adds, set the pace.
fn sum_words(words: &[u64]) -> u64 {
    words.iter().fold(0u64, |sum, &word| sum.wrapping_add(word))
}

/// The bytes of expert weights a forward of `tokens` rows of `input`
/// reads: every expert the gate routes one of them to, once.
pub(super) fn decode_bytes(
    layer: &MoeLayer,
    input: &[f32],
    tokens: usize,
    bytes_per_expert: u64,
) -> u64 {
    let mut experts = layer.gate().route(input, tokens).experts;
    experts.sort_unstable();
    experts.dedup();
    experts.len() as u64 * bytes_per_expert
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_pass_reports_a_positive_rate_and_sums_every_word() {
        assert_eq!(sum_words(&[1, 2, u64::MAX]), 2);
        let bandwidth = ReadBandwidth::new(2, 8 << 20).unwrap();
        let rate = bandwidth.measure(1);
        assert!(rate.is_finite() && rate > 0.0, "{rate}");
    }
}
