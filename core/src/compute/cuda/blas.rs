//! [`Blas`]: one cuBLAS handle bound to the backend's stream, and the one
//! GEMM the GPU path needs: bf16 weights times bf16 rows, summed in f32.
//!
//! moemesh keeps matrices row-major; cuBLAS reads column-major. A row-major
//! `[rows, cols]` matrix is the column-major `[cols, rows]` one, so the
//! row-major product `Y = X · Wᵀ` (X `[n, k]`, W `[m, k]` as checkpoints
//! store it, Y `[n, m]`) is computed as the column-major `Yᵀ = W · Xᵀ`,
//! with W transposed (`CUBLAS_OP_T`) and X as it is (`CUBLAS_OP_N`).

use std::ffi::c_void;

use cudarc::cublas::result::{create_handle, destroy_handle, gemm_ex, set_stream};
use cudarc::cublas::sys::{
    cublasComputeType_t, cublasGemmAlgo_t, cublasHandle_t, cublasOperation_t, cudaDataType_t,
};
use cudarc::driver::CudaStream;

/// One GEMM in row-major terms: `[rows, inputs] · [outputs, inputs]ᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GemmShape {
    /// Output features (`W`'s rows).
    pub outputs: usize,
    /// Rows of `X` (one tile).
    pub rows: usize,
    /// Input features, shared by `W` and `X`.
    pub inputs: usize,
}

/// A cuBLAS handle whose work goes to one stream.
pub(super) struct Blas {
    handle: cublasHandle_t,
}

// SAFETY: a cuBLAS handle may be used from any thread, one at a time;
// the backend keeps its `Blas` behind a mutex and makes its context
// current on the calling thread before each use.
unsafe impl Send for Blas {}

impl Blas {
    /// Creates a handle that enqueues on `stream`; the stream's context
    /// must be current on this thread.
    pub fn new(stream: &CudaStream) -> Result<Self, String> {
        let handle = create_handle().map_err(|error| format!("cuBLAS cannot start: {error}"))?;
        let blas = Self { handle };
        // SAFETY: the handle was just created and the stream is alive for
        // as long as the backend that owns both.
        unsafe { set_stream(blas.handle, stream.cu_stream() as _) }
            .map_err(|error| format!("cuBLAS cannot take the stream: {error}"))?;
        Ok(blas)
    }

    /// Enqueues `Y = X · Wᵀ` in row-major terms: `weights` W (bf16,
    /// `[outputs, inputs]`), `rows` X (bf16, `[rows, inputs]`), `output` Y
    /// (f32, `[rows, outputs]`), all dense.
    ///
    /// # Safety
    /// The three are device pointers to at least the sizes `shape` implies,
    /// and the handle's context is current on this thread.
    pub unsafe fn weights_times_rows(
        &self,
        shape: GemmShape,
        weights: u64,
        rows: u64,
        output: u64,
    ) -> Result<(), String> {
        let int = |value: usize| {
            i32::try_from(value).map_err(|_| format!("GEMM dimension {value} is too large"))
        };
        let (m, n, k) = (int(shape.outputs)?, int(shape.rows)?, int(shape.inputs)?);
        let (alpha, beta) = (1f32, 0f32);
        // SAFETY: column-major Yᵀ[m, n] = op(W)[m, k] · Xᵀ[k, n], with W
        // stored as a column-major [k, m] (ld k), Xᵀ as [k, n] (ld k) and
        // Yᵀ as [m, n] (ld m); the caller vouches for the pointers.
        unsafe {
            gemm_ex(
                self.handle,
                cublasOperation_t::CUBLAS_OP_T,
                cublasOperation_t::CUBLAS_OP_N,
                m,
                n,
                k,
                (&alpha as *const f32).cast::<c_void>(),
                weights as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k,
                rows as *const c_void,
                cudaDataType_t::CUDA_R_16BF,
                k,
                (&beta as *const f32).cast::<c_void>(),
                output as *mut c_void,
                cudaDataType_t::CUDA_R_32F,
                m,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|error| format!("cuBLAS GEMM {}x{}x{}: {error}", m, n, k))
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is destroyed once, here. A failure leaves
        // nothing to clean up, so it is ignored.
        let _ = unsafe { destroy_handle(self.handle) };
    }
}
