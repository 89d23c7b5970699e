//! The gate's dot products, with a summation order that depends only on
//! the length: eight independent fused accumulators, so that they
//! vectorise, and the same result with or without FMA hardware
//! (`mul_add` is exact).

/// Lanes of the accumulators: one AVX2 register.
const LANES: usize = 8;
/// Experts whose dot products run side by side: enough independent
/// chains to hide the latency of a fused multiply-add.
const GROUP: usize = 8;

/// The dot product of `lhs` and `rhs`.
pub(super) fn dot(lhs: &[f32], rhs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: the CPU supports FMA and AVX2, checked just above.
        return unsafe { dot_fma(lhs, rhs) };
    }
    dot_portable(lhs, rhs)
}

/// `logits[e] = dot(row, weights[e])` for every row `e` of `weights`
/// (`[logits.len(), row.len()]`): the bits of [`dot`], computed for
/// [`GROUP`] experts at a time so that their chains overlap (one dot
/// alone waits on each fused multiply-add's latency).
pub(super) fn logits(row: &[f32], weights: &[f32], logits: &mut [f32]) {
    debug_assert_eq!(weights.len(), row.len() * logits.len());
    #[cfg(target_arch = "x86_64")]
    if fma_available() {
        // SAFETY: the CPU supports FMA and AVX2, checked just above.
        return unsafe { logits_fma(row, weights, logits) };
    }
    logits_portable(row, weights, logits)
}

#[cfg(target_arch = "x86_64")]
fn fma_available() -> bool {
    std::arch::is_x86_feature_detected!("fma") && std::arch::is_x86_feature_detected!("avx2")
}

/// [`dot`] compiled for FMA: without the feature each `mul_add` is a call
/// into a software fused multiply-add.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_fma(lhs: &[f32], rhs: &[f32]) -> f32 {
    dot_portable(lhs, rhs)
}

/// [`logits`] compiled for FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn logits_fma(row: &[f32], weights: &[f32], logits: &mut [f32]) {
    logits_portable(row, weights, logits)
}

#[inline(always)]
fn dot_portable(lhs: &[f32], rhs: &[f32]) -> f32 {
    debug_assert_eq!(lhs.len(), rhs.len());
    let mut lanes = [0f32; LANES];
    let chunks = lhs.len() / LANES * LANES;
    for (lhs_chunk, rhs_chunk) in lhs[..chunks]
        .chunks_exact(LANES)
        .zip(rhs[..chunks].chunks_exact(LANES))
    {
        for lane in 0..LANES {
            lanes[lane] = lhs_chunk[lane].mul_add(rhs_chunk[lane], lanes[lane]);
        }
    }
    finish(&lanes, &lhs[chunks..], &rhs[chunks..])
}

/// The lanes' sum in a fixed tree, then the tail past the last whole
/// chunk, in order.
#[inline(always)]
fn finish(lanes: &[f32; LANES], lhs_tail: &[f32], rhs_tail: &[f32]) -> f32 {
    let mut sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    for (l, r) in lhs_tail.iter().zip(rhs_tail) {
        sum = l.mul_add(*r, sum);
    }
    sum
}

#[inline(always)]
fn logits_portable(row: &[f32], weights: &[f32], logits: &mut [f32]) {
    let width = row.len();
    if width == 0 {
        logits.fill(0.0);
        return;
    }
    let chunks = width / LANES * LANES;
    let whole_groups = logits.len() / GROUP * GROUP;
    let (grouped, rest) = logits.split_at_mut(whole_groups);
    for (group, group_weights) in grouped
        .chunks_exact_mut(GROUP)
        .zip(weights.chunks_exact(GROUP * width))
    {
        let mut lanes = [[0f32; LANES]; GROUP];
        for start in (0..chunks).step_by(LANES) {
            let x = &row[start..start + LANES];
            for (expert, lanes) in lanes.iter_mut().enumerate() {
                let w = &group_weights[expert * width + start..][..LANES];
                for lane in 0..LANES {
                    lanes[lane] = x[lane].mul_add(w[lane], lanes[lane]);
                }
            }
        }
        for (expert, (logit, lanes)) in group.iter_mut().zip(&lanes).enumerate() {
            let tail = &group_weights[expert * width + chunks..(expert + 1) * width];
            *logit = finish(lanes, &row[chunks..], tail);
        }
    }
    for (logit, expert_weights) in rest
        .iter_mut()
        .zip(weights[whole_groups * width..].chunks_exact(width))
    {
        *logit = dot_portable(row, expert_weights);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, step: usize, modulus: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * step % modulus) as f32 - modulus as f32 / 2.0) * scale)
            .collect()
    }

    #[test]
    fn dot_gives_the_same_bits_with_and_without_fma_hardware() {
        let (lhs, rhs) = (values(1027, 37, 101, 0.013), values(1027, 53, 97, 0.021));
        for len in [0, 1, 7, 8, 9, 64, 1027] {
            assert_eq!(
                dot(&lhs[..len], &rhs[..len]).to_bits(),
                dot_portable(&lhs[..len], &rhs[..len]).to_bits(),
                "length {len}"
            );
        }
    }

    #[test]
    fn logits_give_the_bits_of_one_dot_per_expert() {
        for (width, experts) in [(0, 3), (1, 8), (9, 17), (64, 8), (1027, 21), (1024, 256)] {
            let row = values(width, 37, 101, 0.013);
            let weights = values(width * experts, 53, 97, 0.021);
            let mut fast = vec![f32::NAN; experts];
            let mut portable = vec![f32::NAN; experts];
            logits(&row, &weights, &mut fast);
            logits_portable(&row, &weights, &mut portable);
            for expert in 0..experts {
                let alone = dot_portable(&row, &weights[expert * width..(expert + 1) * width]);
                assert_eq!(
                    fast[expert].to_bits(),
                    alone.to_bits(),
                    "{width} x {experts}: {expert}"
                );
                assert_eq!(
                    portable[expert].to_bits(),
                    alone.to_bits(),
                    "{width} x {experts}: {expert}"
                );
            }
        }
    }
}
