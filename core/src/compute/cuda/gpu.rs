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
        let plan = self.plan(input, width, items)?;
        if plan.total_tiles == 0 {
            return Ok(Vec::new());
        }
        let queue = self.take_queue()?;
        let padded = self
            .compute_tiles(&queue, input, &plan, items)
            .map_err(|error| self.error(error))?;
        Ok(plan.compact(&padded))
    }

    /// Milliseconds the GPU spends on the batch's compute alone (gather,
    /// GEMMs, activation), its input already on the GPU: the median of
    /// `repeats` runs timed with events, after one untimed run. For
    /// measuring the expert GEMMs apart from the copies over PCIe.
    pub fn time_batch(
        &self,
        input: &[f32],
        width: usize,
        items: &[BatchItem<'_>],
        repeats: usize,
    ) -> CoreResult<f64> {
        let plan = self.plan(input, width, items)?;
        let queue = self.take_queue()?;
        self.time_tiles(&queue, input, &plan, items, repeats.max(1))
            .map_err(|error| self.error(error))
    }

    /// Checks a batch and lays it out in tiles.
    fn plan(&self, input: &[f32], width: usize, items: &[BatchItem<'_>]) -> CoreResult<TilePlan> {
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
        TilePlan::new(width, input.len() / width, experts).map_err(|error| self.error(error))
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
        let batch = BatchOnGpu::upload(stream, input, plan)?;
        // SAFETY: the buffers were allocated for `plan`.
        unsafe { self.enqueue_batch(blas, plan, items, &batch)? };
        let padded = stream
            .clone_dtoh(&batch.output)
            .map_err(failed("copy the output from the GPU"))?;
        stream.synchronize().map_err(failed("finish the batch"))?;
        self.context
            .check_err()
            .map_err(failed("finish the batch"))?;
        Ok(padded)
    }

    /// The median milliseconds of the batch's compute over `repeats` runs.
    fn time_tiles(
        &self,
        blas: &Blas,
        input: &[f32],
        plan: &TilePlan,
        items: &[BatchItem<'_>],
        repeats: usize,
    ) -> Result<f64, String> {
        let stream = &self.stream;
        let batch = BatchOnGpu::upload(stream, input, plan)?;
        let event = || {
            self.context
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(failed("create a timing event"))
        };
        let (start, end) = (event()?, event()?);
        let mut times = Vec::with_capacity(repeats);
        for repeat in 0..=repeats {
            start.record(stream).map_err(failed("record an event"))?;
            // SAFETY: the buffers were allocated for `plan`.
            unsafe { self.enqueue_batch(blas, plan, items, &batch)? };
            end.record(stream).map_err(failed("record an event"))?;
            let elapsed = start.elapsed_ms(&end).map_err(failed("time the batch"))?;
            if repeat > 0 {
                times.push(f64::from(elapsed));
            }
        }
        self.context.check_err().map_err(failed("time the batch"))?;
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// Enqueues the gather and every expert's tiles of `plan`.
    ///
    /// # Safety
    /// `batch` holds buffers allocated for `plan`.
    unsafe fn enqueue_batch(
        &self,
        blas: &Blas,
        plan: &TilePlan,
        items: &[BatchItem<'_>],
        batch: &BatchOnGpu,
    ) -> Result<(), String> {
        let stream = &self.stream;
        let buffers = TileBuffers {
            gathered: address(&batch.gathered, stream),
            gate_up: address(&batch.gate_up, stream),
            activated: address(&batch.activated, stream),
            output: address(&batch.output, stream),
        };
        // SAFETY: each buffer has the length the plan gives it, and every
        // slot is a row of the input (checked when the plan was made).
        unsafe {
            self.kernels.gather_rows(
                stream,
                plan,
                address(&batch.input, stream),
                address(&batch.slots, stream),
                buffers.gathered,
            )?;
            for (index, item) in items.iter().enumerate() {
                self.compute_expert(blas, plan, index, item, &buffers)?;
            }
        }
        Ok(())
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

/// A batch's input and working buffers in GPU memory.
struct BatchOnGpu {
    input: CudaSlice<f32>,
    slots: CudaSlice<u32>,
    gathered: CudaSlice<bf16>,
    gate_up: CudaSlice<f32>,
    activated: CudaSlice<bf16>,
    output: CudaSlice<f32>,
}

impl BatchOnGpu {
    /// Copies the input and the row indices of `plan` to the GPU and
    /// allocates the rest.
    fn upload(stream: &Arc<CudaStream>, input: &[f32], plan: &TilePlan) -> Result<Self, String> {
        let allocation = failed("allocate a batch's buffers");
        // SAFETY (all four): the kernels and GEMMs write every element
        // that anything reads; padding between tiles is never read.
        unsafe {
            Ok(Self {
                input: stream
                    .clone_htod(input)
                    .map_err(failed("copy the input to the GPU"))?,
                slots: stream
                    .clone_htod(&plan.slots)
                    .map_err(failed("copy the row indices to the GPU"))?,
                gathered: stream.alloc::<bf16>(plan.input_len()).map_err(allocation)?,
                gate_up: stream.alloc::<f32>(plan.gate_up_len).map_err(allocation)?,
                activated: stream
                    .alloc::<bf16>(plan.activated_len)
                    .map_err(allocation)?,
                output: stream.alloc::<f32>(plan.output_len()).map_err(allocation)?,
            })
        }
    }
}

/// Turns a driver error into a message saying what failed.
fn failed(what: &'static str) -> impl Fn(cudarc::driver::DriverError) -> String + Copy {
    move |error| format!("cannot {what}: {error}")
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
