//! [`Gpu`]: one opened GPU (its context, stream, kernels and cuBLAS handle),
//! how experts' weights reach it, and how a batch runs on it.
//!
//! A batch is one copy of its input to the GPU, one gather of every
//! expert's rows into tiles (as bf16), per tile a gate/up GEMM, per expert
//! one activation kernel, per tile a down GEMM into the padded output, and
//! one copy back (see [`super::tiles`] for why tiles). Everything runs on
//! one stream, in order: one stream keeps cuBLAS on one workspace, which
//! its bit-for-bit reproducibility needs. The GEMMs of small experts leave
//! part of the GPU idle that way; grouped GEMM over an expert's tiles, all
//! of one shape, is how to recover it.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
use half::bf16;

use super::blas::{Blas, GemmShape};
use super::host_tier::{HostBuffer, HostExpert};
use super::kernels::{self, Kernels};
use super::layout::ExpertLayout;
use super::probe::OpenedDevice;
use super::tiles::{TILE_ROWS, TilePlan};
use crate::compute::buffering::format_byte_size;
use crate::{CoreError, CoreResult};

/// One expert's weights in GPU memory, laid out by [`ExpertLayout`].
pub(super) struct DeviceWeights {
    pub layout: ExpertLayout,
    buffer: CudaSlice<bf16>,
}

impl Drop for DeviceWeights {
    fn drop(&mut self) {
        // The buffer frees itself next, through the driver, which needs
        // its context current on whichever thread drops the last handle.
        let _ = self.buffer.context().bind_to_thread();
    }
}

/// One expert's share of a batch on the GPU.
pub(super) struct BatchItem<'a> {
    pub weights: &'a DeviceWeights,
    /// Rows of the batch's input, as in [`crate::compute::ExpertWork`].
    pub rows: &'a [u32],
}

/// An opened GPU, shared by the backend and its experts.
pub(super) struct Gpu {
    pub ordinal: usize,
    context: Arc<CudaContext>,
    /// Every copy, kernel and GEMM of this backend, in order.
    stream: Arc<CudaStream>,
    kernels: Kernels,
    /// Held while enqueuing and awaiting one batch or upload: cuBLAS takes
    /// one thread at a time, and a batch's synchronisation then waits for
    /// its own work only.
    queue: Mutex<Blas>,
}

impl Gpu {
    /// Compiles the kernels for `device` and prepares its stream and cuBLAS.
    pub fn open(device: &OpenedDevice, ordinal: usize) -> CoreResult<Self> {
        let unavailable =
            |what: String| CoreError::DeviceUnavailable(format!("cuda:{ordinal}: {what}"));
        let (major, minor) = device.compute_capability;
        let ptx = kernels::compile(major, minor).map_err(unavailable)?;
        let kernels = Kernels::load(&device.context, ptx).map_err(unavailable)?;
        let stream = device
            .context
            .new_stream()
            .map_err(|error| unavailable(format!("cannot create a stream: {error}")))?;
        let blas = Blas::new(&stream).map_err(unavailable)?;
        Ok(Self {
            ordinal,
            context: Arc::clone(&device.context),
            stream,
            kernels,
            queue: Mutex::new(blas),
        })
    }

    /// The context, for pinned host memory.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.context
    }

    fn error(&self, what: impl std::fmt::Display) -> CoreError {
        CoreError::Device(format!("cuda:{}: {what}", self.ordinal))
    }

    /// Takes the queue and makes the context current on this thread.
    fn take_queue(&self) -> CoreResult<MutexGuard<'_, Blas>> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.context
            .bind_to_thread()
            .map_err(|error| self.error(format!("cannot use the GPU's context: {error}")))?;
        Ok(queue)
    }

    /// Copies one expert's weights from host memory into GPU memory.
    pub fn upload(&self, host: &HostExpert) -> CoreResult<DeviceWeights> {
        let layout = host.layout;
        let _queue = self.take_queue()?;
        // SAFETY: every element is written by the copy below before any
        // kernel reads it.
        let mut buffer = unsafe { self.stream.alloc::<bf16>(layout.len) }.map_err(|error| {
            let bytes = format_byte_size(layout.buffer_bytes() as u64);
            self.error(format!("cannot allocate {bytes} for an expert: {error}"))
        })?;
        let copied = match host.buffer() {
            HostBuffer::Pinned(pinned) if pinned.len() == layout.len => {
                self.stream.memcpy_htod(pinned, &mut buffer)
            }
            HostBuffer::Pageable(values) if values.len() == layout.len => {
                self.stream.memcpy_htod(values.as_slice(), &mut buffer)
            }
            _ => return Err(self.error("an expert's host copy does not match its layout")),
        };
        copied
            .and_then(|()| self.stream.synchronize())
            .map_err(|error| self.error(format!("cannot copy an expert to the GPU: {error}")))?;
        Ok(DeviceWeights { layout, buffer })
    }

    /// Runs each item's expert on its rows of `input` (`[rows, width]`)
    /// and returns the outputs item after item, each in its rows' order.
    pub fn run_batch(
        &self,
        input: &[f32],
        width: usize,
        items: &[BatchItem<'_>],
    ) -> CoreResult<Vec<f32>> {
        if width == 0 || !input.len().is_multiple_of(width) {
            return Err(self.error(format!(
                "an input of {} values is not whole rows of {width}",
                input.len()
            )));
        }
        if let Some(item) = items
            .iter()
            .find(|item| item.weights.layout.hidden != width)
        {
            return Err(self.error(format!(
                "an expert of hidden size {} was given rows of {width}",
                item.weights.layout.hidden
            )));
        }
        let experts = items
            .iter()
            .map(|item| (item.weights.layout.intermediate, item.rows));
        let plan = TilePlan::new(width, input.len() / width, experts)
            .map_err(|error| self.error(error))?;
        if plan.total_tiles == 0 {
            return Ok(Vec::new());
        }
        let queue = self.take_queue()?;
        let padded = self
            .compute_tiles(&queue, input, &plan, items)
            .map_err(|error| self.error(error))?;
        Ok(plan.compact(&padded))
    }

    /// Enqueues the whole batch of `plan` and returns its padded output.
    fn compute_tiles(
        &self,
        blas: &Blas,
        input: &[f32],
        plan: &TilePlan,
        items: &[BatchItem<'_>],
    ) -> Result<Vec<f32>, String> {
        let stream = &self.stream;
        let failed = |what: &'static str| move |error| format!("cannot {what}: {error}");
        let input_on_gpu = stream
            .clone_htod(input)
            .map_err(failed("copy the input to the GPU"))?;
        let slots = stream
            .clone_htod(&plan.slots)
            .map_err(failed("copy the row indices to the GPU"))?;
        let allocation = failed("allocate a batch's buffers");
        // SAFETY (all four): the kernels and GEMMs below write every element
        // that anything reads; padding between tiles is never read.
        let gathered = unsafe { stream.alloc::<bf16>(plan.input_len()) }.map_err(allocation)?;
        let gate_up = unsafe { stream.alloc::<f32>(plan.gate_up_len) }.map_err(allocation)?;
        let activated = unsafe { stream.alloc::<bf16>(plan.activated_len) }.map_err(allocation)?;
        let output = unsafe { stream.alloc::<f32>(plan.output_len()) }.map_err(allocation)?;
        let buffers = TileBuffers {
            gathered: address(&gathered, stream),
            gate_up: address(&gate_up, stream),
            activated: address(&activated, stream),
            output: address(&output, stream),
        };
        // SAFETY: each buffer has the length the plan gives it, and every
        // slot is a row of the input (checked when the plan was made).
        unsafe {
            self.kernels.gather_rows(
                stream,
                plan,
                address(&input_on_gpu, stream),
                address(&slots, stream),
                buffers.gathered,
            )?;
            for (index, item) in items.iter().enumerate() {
                self.compute_expert(blas, plan, index, item, &buffers)?;
            }
        }
        let padded = stream
            .clone_dtoh(&output)
            .map_err(failed("copy the output from the GPU"))?;
        stream.synchronize().map_err(failed("finish the batch"))?;
        self.context
            .check_err()
            .map_err(failed("finish the batch"))?;
        Ok(padded)
    }

    /// Enqueues one expert's tiles: gate/up GEMMs, the activation, down
    /// GEMMs.
    ///
    /// # Safety
    /// `buffers` hold the batch of `plan`, `index` is the item's place in it.
    unsafe fn compute_expert(
        &self,
        blas: &Blas,
        plan: &TilePlan,
        index: usize,
        item: &BatchItem<'_>,
        buffers: &TileBuffers,
    ) -> Result<(), String> {
        let tiles = &plan.experts[index];
        if tiles.tiles == 0 {
            return Ok(());
        }
        let layout = item.weights.layout;
        let gate_up_weights = address(&item.weights.buffer, &self.stream);
        let down_weights = offset::<bf16>(gate_up_weights, layout.down_offset);
        let gate_up_shape = GemmShape {
            outputs: 2 * layout.intermediate,
            rows: TILE_ROWS,
            inputs: layout.hidden,
        };
        let down_shape = GemmShape {
            outputs: layout.hidden,
            rows: TILE_ROWS,
            inputs: layout.intermediate,
        };
        let gate_up = offset::<f32>(buffers.gate_up, tiles.gate_up_offset);
        let activated = offset::<bf16>(buffers.activated, tiles.activated_offset);
        // SAFETY: every offset stays inside its buffer, as the plan laid
        // them out; the weights hold `layout.len` elements.
        unsafe {
            for tile in 0..tiles.tiles {
                let rows = offset::<bf16>(
                    buffers.gathered,
                    (tiles.first_tile + tile) * plan.input_pitch,
                );
                let into = offset::<f32>(gate_up, tile * tiles.gate_up_pitch);
                blas.weights_times_rows(gate_up_shape, gate_up_weights, rows, into)?;
            }
            self.kernels
                .silu_mul(&self.stream, tiles, gate_up, activated)?;
            for tile in 0..tiles.tiles {
                let rows = offset::<bf16>(activated, tile * tiles.activated_pitch);
                let into = offset::<f32>(
                    buffers.output,
                    (tiles.first_tile + tile) * plan.output_pitch,
                );
                blas.weights_times_rows(down_shape, down_weights, rows, into)?;
            }
        }
        Ok(())
    }
}

/// The device addresses of a batch's buffers.
struct TileBuffers {
    gathered: u64,
    gate_up: u64,
    activated: u64,
    output: u64,
}

/// The device address of `slice`. Its use is ordered by the one stream
/// every operation of the backend runs on.
fn address<T>(slice: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    let (pointer, _recorded) = slice.device_ptr(stream);
    pointer
}

/// `base` advanced by `elements` values of `T`.
fn offset<T>(base: u64, elements: usize) -> u64 {
    base + (elements * size_of::<T>()) as u64
}
