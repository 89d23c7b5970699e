//! The CUDA C kernels of the GPU path, compiled once per backend by NVRTC
//! for the device's own architecture (no CUDA toolkit at build time).
//!
//! - [`GATHER_ROWS`]: takes each tile's rows out of the batch's f32 input,
//!   as bf16 (round to nearest even, as `half` rounds), zeros for padding.
//! - [`SILU_MUL`]: `silu(gate) · up` from the f32 output of the gate/up
//!   GEMM, written as bf16 for the down GEMM. Its `exp` and the order of
//!   its operations are those of the CPU backend's `silu_mul`, and the
//!   module is compiled with `--fmad=false` so that the compiler keeps each
//!   multiply and add apart, as Rust does.
//!
//! Both are elementwise over grid-stride loops, so a value's result never
//! depends on how the work is split into blocks.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::tiles::{ExpertTiles, TILE_ROWS, TilePlan};

/// The name of the gather kernel in [`SOURCE`].
pub(super) const GATHER_ROWS: &str = "moemesh_gather_rows_bf16";
/// The name of the activation kernel in [`SOURCE`].
pub(super) const SILU_MUL: &str = "moemesh_silu_mul_bf16";

/// The kernels, in CUDA C with no includes: bf16 values travel as their
/// bits (`unsigned short`), which cuBLAS reads as `CUDA_R_16BF`.
pub(super) const SOURCE: &str = r#"
// f32 to bf16 bits, rounding to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ unsigned short moemesh_to_bf16(float value) {
    unsigned int bits = __float_as_uint(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (unsigned short)((bits >> 16) | 0x0040u);
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (unsigned short)(bits >> 16);
}

// e^x exactly as moemesh's CPU backend computes it (compute/silu.rs):
// Cody-Waite reduction, then Cephes' degree-6 polynomial.
__device__ __forceinline__ float moemesh_exp(float x) {
    const float log2_e = 1.44269504088896340735992468100189214f;
    const float ln2_hi = 0.6933594f;
    const float ln2_lo = -2.1219444e-4f;
    const float round = 12582912.0f;
    x = fminf(fmaxf(x, -87.3f), 88.7f);
    float n = (x * log2_e + round) - round;
    float r = x - n * ln2_hi - n * ln2_lo;
    float p = 1.9875691e-4f;
    p = p * r + 1.3981999e-3f;
    p = p * r + 8.333452e-3f;
    p = p * r + 4.1665796e-2f;
    p = p * r + 1.6666665e-1f;
    p = p * r + 5e-1f;
    float e_r = p * r * r + r + 1.0f;
    int k = (int)n;
    int half_k = k >> 1;
    return e_r * __int_as_float((half_k + 127) << 23) * __int_as_float((k - half_k + 127) << 23);
}

// Calls visit(tile, within) for each element `within` of each of `tiles`
// tiles of `per_tile` elements, spread over the whole grid.
template <typename Visit>
__device__ __forceinline__ void moemesh_for_each_tile_element(
    unsigned long long tiles, unsigned long long per_tile, Visit visit)
{
    const unsigned long long total = tiles * per_tile;
    const unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;
    for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
         i < total; i += stride) {
        const unsigned long long tile = i / per_tile;
        visit(tile, i - tile * per_tile);
    }
}

// gathered[tile * tile_pitch + slot * hidden + column] =
//     bf16(input[rows[tile * tile_rows + slot] * hidden + column]), or 0
// where the slot is padding (0xffffffff).
extern "C" __global__ void moemesh_gather_rows_bf16(
    const float* input, const unsigned int* rows, unsigned short* gathered,
    unsigned long long tiles, unsigned int tile_rows, unsigned int hidden,
    unsigned long long tile_pitch)
{
    moemesh_for_each_tile_element(tiles, (unsigned long long)tile_rows * hidden,
        [=](unsigned long long tile, unsigned long long within) {
            const unsigned int row = rows[tile * tile_rows + within / hidden];
            const unsigned long long column = within % hidden;
            gathered[tile * tile_pitch + within] = row == 0xffffffffu
                ? (unsigned short)0
                : moemesh_to_bf16(input[(unsigned long long)row * hidden + column]);
        });
}

// For each of `tiles` tiles: gate_up is [tile_rows, 2 * intermediate]
// (gate columns, then up), activated [tile_rows, intermediate].
extern "C" __global__ void moemesh_silu_mul_bf16(
    const float* gate_up, unsigned short* activated,
    unsigned long long tiles, unsigned int tile_rows, unsigned int intermediate,
    unsigned long long gate_up_pitch, unsigned long long activated_pitch)
{
    moemesh_for_each_tile_element(tiles, (unsigned long long)tile_rows * intermediate,
        [=](unsigned long long tile, unsigned long long within) {
            const unsigned long long row = within / intermediate;
            const unsigned long long column = within % intermediate;
            const float* source = gate_up + tile * gate_up_pitch + row * 2 * intermediate;
            const float gate = source[column];
            const float up = source[intermediate + column];
            activated[tile * activated_pitch + within] =
                moemesh_to_bf16(gate / (1.0f + moemesh_exp(-gate)) * up);
        });
}
"#;

/// Threads per block of the elementwise kernels.
const BLOCK_THREADS: u32 = 256;
/// At most this many blocks; the grid-stride loops cover the rest.
const MAX_BLOCKS: u64 = 65_535;

/// Compiles [`SOURCE`] for compute capability `major.minor`.
pub(super) fn compile(major: i32, minor: i32) -> Result<Ptx, String> {
    let options = CompileOptions {
        fmad: Some(false),
        options: vec![format!("--gpu-architecture=sm_{major}{minor}")],
        name: Some("moemesh_kernels.cu".into()),
        ..Default::default()
    };
    compile_ptx_with_opts(SOURCE, options).map_err(|error| match error {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => {
            format!("NVRTC cannot compile moemesh's kernels for sm_{major}{minor}: {log:?}")
        }
        other => format!("NVRTC failed: {other}"),
    })
}

/// The compiled kernels, loaded into one context.
pub(super) struct Kernels {
    gather_rows: CudaFunction,
    silu_mul: CudaFunction,
}

impl Kernels {
    /// Loads `ptx` (from [`compile`]) into `context`.
    pub fn load(context: &Arc<CudaContext>, ptx: Ptx) -> Result<Self, String> {
        let module = context
            .load_module(ptx)
            .map_err(|error| format!("the driver cannot load moemesh's kernels: {error}"))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(|error| format!("kernel {name} is missing: {error}"))
        };
        Ok(Self {
            gather_rows: function(GATHER_ROWS)?,
            silu_mul: function(SILU_MUL)?,
        })
    }

    /// Enqueues [`GATHER_ROWS`] on `stream`: `input` (f32) and `slots`
    /// (u32, one per tile slot) into `gathered` (bf16, `plan.input_len()`).
    ///
    /// # Safety
    /// The three are device pointers of at least the sizes `plan` implies,
    /// and every slot is a row of `input` or padding.
    pub unsafe fn gather_rows(
        &self,
        stream: &CudaStream,
        plan: &TilePlan,
        input: u64,
        slots: u64,
        gathered: u64,
    ) -> Result<(), String> {
        let tiles = plan.total_tiles as u64;
        let tile_rows = TILE_ROWS as u32;
        let hidden = u32::try_from(plan.hidden).map_err(|_| "hidden size too large")?;
        let pitch = plan.input_pitch as u64;
        let mut launch = stream.launch_builder(&self.gather_rows);
        launch
            .arg(&input)
            .arg(&slots)
            .arg(&gathered)
            .arg(&tiles)
            .arg(&tile_rows)
            .arg(&hidden)
            .arg(&pitch);
        // SAFETY: the arguments match the kernel's parameters in order and
        // type; the caller vouches for the pointers.
        unsafe { launch.launch(elementwise(tiles * TILE_ROWS as u64 * plan.hidden as u64)) }
            .map(drop)
            .map_err(|error| format!("gather kernel: {error}"))
    }

    /// Enqueues [`SILU_MUL`] on `stream` over the tiles of one expert:
    /// its gate/up tiles (f32) at `gate_up` into its activation tiles
    /// (bf16) at `activated`.
    ///
    /// # Safety
    /// Both are device pointers to the expert's first tile in buffers laid
    /// out by the plan that gave `expert`.
    pub unsafe fn silu_mul(
        &self,
        stream: &CudaStream,
        expert: &ExpertTiles,
        gate_up: u64,
        activated: u64,
    ) -> Result<(), String> {
        let tiles = expert.tiles as u64;
        let tile_rows = TILE_ROWS as u32;
        let intermediate =
            u32::try_from(expert.intermediate).map_err(|_| "intermediate size too large")?;
        let gate_up_pitch = expert.gate_up_pitch as u64;
        let activated_pitch = expert.activated_pitch as u64;
        let mut launch = stream.launch_builder(&self.silu_mul);
        launch
            .arg(&gate_up)
            .arg(&activated)
            .arg(&tiles)
            .arg(&tile_rows)
            .arg(&intermediate)
            .arg(&gate_up_pitch)
            .arg(&activated_pitch);
        let elements = tiles * TILE_ROWS as u64 * expert.intermediate as u64;
        // SAFETY: as for `gather_rows`.
        unsafe { launch.launch(elementwise(elements)) }
            .map(drop)
            .map_err(|error| format!("activation kernel: {error}"))
    }
}

/// A one-dimensional launch for `elements` grid-stride iterations.
fn elementwise(elements: u64) -> LaunchConfig {
    let blocks = elements.div_ceil(BLOCK_THREADS as u64).clamp(1, MAX_BLOCKS);
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (BLOCK_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU, so the kernels are compiled on every machine
    /// that runs the tests: a kernel that does not compile fails here
    /// rather than when a GPU node starts.
    #[test]
    fn kernels_compile_with_nvrtc_for_sm_90() {
        // SAFETY: only probes whether the library can be loaded.
        let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
        assert!(
            present,
            "NVRTC (libnvrtc.so.13) is not installed, so moemesh's CUDA kernels cannot be \
             checked: run `pip install nvidia-cuda-nvrtc==13.0.*` and set LD_LIBRARY_PATH to \
             its lib directory (for example /opt/nvrtc13/nvidia/cu13/lib)"
        );
        let ptx = compile(9, 0).unwrap_or_else(|error| panic!("{error}"));
        let text = ptx.to_src();
        assert!(text.contains(".target sm_90"), "{text}");
        for name in [GATHER_ROWS, SILU_MUL] {
            assert!(
                text.contains(&format!(".entry {name}(")),
                "kernel {name} is missing from the PTX"
            );
        }
        // No fused multiply-adds: the activation keeps the CPU's rounding.
        assert!(!text.contains("fma.rn.f32"), "{text}");
    }

    #[test]
    fn launches_cover_every_element_with_bounded_grids() {
        assert_eq!(elementwise(0).grid_dim.0, 1);
        assert_eq!(elementwise(257).grid_dim.0, 2);
        assert_eq!(elementwise(u64::MAX / 2).grid_dim.0, MAX_BLOCKS as u32);
    }
}
