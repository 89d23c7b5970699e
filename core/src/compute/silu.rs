//! `silu(gate) * up`, between the gate/up and the down GEMM of the expert
//! FFN: a polynomial `exp` the compiler vectorises, built for AVX-512 where
//! the CPU has it, AVX2 where it has that.

/// `out[i] = silu(gate[i]) * up[i]`, with `silu(x) = x / (1 + e^-x)`.
pub(super) fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU supports AVX-512F, checked just above.
        unsafe { silu_mul_avx512(out, gate, up) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports AVX2 and FMA, checked just above.
        unsafe { silu_mul_avx2(out, gate, up) };
        return;
    }
    silu_mul_portable(out, gate, up);
}

/// The same arithmetic as [`silu_mul_portable`] (Rust never fuses a
/// multiply and an add on its own), 8 lanes at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn silu_mul_avx2(out: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_portable(out, gate, up);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn silu_mul_avx512(out: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_portable(out, gate, up);
}

/// Written so that the compiler vectorises it for whatever features the
/// caller enables.
#[inline(always)]
fn silu_mul_portable(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((out, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *out = g / (1.0 + exp_approx(-g)) * u;
    }
}

/// gpt-oss's activation: `gate` clamped above at `limit`, `up` to
/// `±limit`, then `out[i] = (up + 1) · gate · σ(alpha · gate)`.
pub(super) fn clamped_swiglu(out: &mut [f32], gate: &[f32], up: &[f32], alpha: f32, limit: f32) {
    for ((out, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.min(limit);
        let u = u.clamp(-limit, limit);
        *out = (u + 1.0) * (g / (1.0 + exp_approx(-alpha * g)));
    }
}

/// `e^x` to within 2 ulp over the whole f32 range, in branch-free
/// arithmetic the compiler vectorises (libm's `expf` is a call per value).
/// Cody-Waite reduction to `2^n · e^r` with |r| ≤ ln 2 / 2, then the
/// degree-6 minimax polynomial of `e^r` used by Cephes' `expf`.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding and subtracting it rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.7);
    let rounded = x * LOG2_E + ROUND;
    let n = rounded - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e_r = p * r * r + r + 1.0;
    // 2^n by building the exponent; n is in [-126, 128] after the clamp,
    // so split it in two to stay finite and normal at both ends. As an
    // integer, n is the low bits of `rounded`, whose last place is worth 1:
    // read there, it vectorises, where `n as i32` converts lane by lane (a
    // saturating cast).
    let n = rounded.to_bits() as i32 - ROUND.to_bits() as i32;
    let half = n >> 1;
    let scale = |power: i32| f32::from_bits(((power + 127) as u32) << 23);
    e_r * scale(half) * scale(n - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_approx_is_within_three_ulp_of_exp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_approx(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(exp_approx(-200.0), exp_approx(-87.3));
        assert!(exp_approx(200.0).is_finite());
    }

    #[test]
    fn silu_mul_gives_the_same_bits_on_every_cpu() {
        // What this CPU runs (AVX-512 where it has it) against the portable
        // path a CPU without it runs.
        let gate: Vec<f32> = (0..4099).map(|i| (i as f32 - 2049.0) * 0.0437).collect();
        let up: Vec<f32> = (0..4099).map(|i| (i % 13) as f32 * 0.3 - 1.7).collect();
        let (mut here, mut portable) = (vec![0f32; gate.len()], vec![0f32; gate.len()]);
        silu_mul(&mut here, &gate, &up);
        silu_mul_portable(&mut portable, &gate, &up);
        let bits = |values: &[f32]| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&here), bits(&portable));
    }

    #[test]
    fn silu_mul_matches_silu_in_f64() {
        let gate: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let up: Vec<f32> = (0..1000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut out = vec![0f32; 1000];
        silu_mul(&mut out, &gate, &up);
        for ((&got, &g), &u) in out.iter().zip(&gate).zip(&up) {
            let (g, u) = (g as f64, u as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (got as f64 - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs().max(1e-30),
                "silu({g}) * {u}: {got} vs {want}"
            );
        }
    }
}
