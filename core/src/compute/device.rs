//! [`Device`]: where an expert node computes, and the backend for it.

use std::sync::Arc;

use super::{ComputeBackend, CpuBackend, WeightFormat};
#[cfg_attr(feature = "cuda", allow(unused_imports))]
use crate::{CoreError, CoreResult};

/// Where experts compute: the CPU, or one GPU through CUDA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// The GPU of this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => formatter.write_str("cpu"),
            Self::Cuda(ordinal) => write!(formatter, "cuda:{ordinal}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device {text:?}; expected cpu, cuda or cuda:N")),
        }
    }
}

/// What a node's backend is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendOptions {
    pub device: Device,
    /// CPU compute threads (0: one per core).
    pub threads: usize,
    /// How a CPU backend keeps weights (a GPU keeps the checkpoint's bf16
    /// or f16).
    pub weight_format: WeightFormat,
    /// Bytes of pinned host memory a GPU backend may keep cold experts in
    /// (None: no limit); experts beyond it are read from the checkpoint.
    pub host_budget: Option<u64>,
}

/// Opens the backend for `options.device`. A GPU that cannot be used
/// (moemesh built without CUDA, no driver, no such device) is a
/// [`CoreError::DeviceUnavailable`], never a panic.
pub fn open_backend(options: BackendOptions) -> CoreResult<Arc<dyn ComputeBackend>> {
    match options.device {
        Device::Cpu => Ok(Arc::new(CpuBackend::with_format(
            options.threads,
            options.weight_format,
        )?)),
        Device::Cuda(ordinal) => open_cuda(ordinal, options),
    }
}

/// What [`probe_device`] finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// For example `NVIDIA H200 (139 GiB)`.
    pub description: String,
    /// Total memory of a GPU; None for the CPU.
    pub memory_bytes: Option<u64>,
}

/// Checks that `device` can be opened, without loading anything: for
/// binaries that should refuse a bad `--device` before they start.
pub fn probe_device(device: Device) -> CoreResult<DeviceInfo> {
    match device {
        Device::Cpu => Ok(DeviceInfo {
            description: "cpu".into(),
            memory_bytes: None,
        }),
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => super::cuda::probe_device(ordinal),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => Err(built_without_cuda(device)),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize, options: BackendOptions) -> CoreResult<Arc<dyn ComputeBackend>> {
    Ok(Arc::new(super::cuda::CudaBackend::open(
        ordinal,
        options.threads,
        options.host_budget,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize, _: BackendOptions) -> CoreResult<Arc<dyn ComputeBackend>> {
    Err(built_without_cuda(Device::Cuda(ordinal)))
}

#[cfg(not(feature = "cuda"))]
fn built_without_cuda(device: Device) -> CoreError {
    CoreError::DeviceUnavailable(format!(
        "{device}: this moemesh was built without CUDA support; \
         build it with `cargo build --release -p moemesh --features cuda`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!("CUDA:3".parse(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(1).to_string().parse(), Ok(Device::Cuda(1)));
        assert!("tpu".parse::<Device>().unwrap_err().contains("cuda:N"));
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn a_gpu_without_cuda_support_is_a_clear_error() {
        let error = probe_device(Device::Cuda(0)).unwrap_err();
        assert!(matches!(error, CoreError::DeviceUnavailable(_)));
        assert!(error.to_string().contains("--features cuda"), "{error}");
    }
}
