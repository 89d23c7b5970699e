//! [`matmul`]: the plain f32 GEMM of the `gemm` crate, the machine's
//! ceiling in benchmarks.

use gemm::Parallelism;

/// `dst[m, n] = lhs[m, k] · rhs[k, n]`, all row-major and contiguous, in
/// one call of the `gemm` crate (call it inside a rayon pool to choose its
/// threads): the machine's plain GEMM, for benchmarks.
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
