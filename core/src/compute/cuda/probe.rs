//! Finding a usable GPU: the driver, the device, its architecture and the
//! libraries the backend loads, each missing piece named in one
//! [`CoreError::DeviceUnavailable`].
//!
//! cudarc loads every CUDA library when first called and panics when one is
//! missing, so each library's presence is checked before any call into it.

use std::sync::Arc;

use cudarc::driver::{CudaContext, DriverError, sys};

use crate::compute::buffering::format_byte_size;
use crate::compute::device::DeviceInfo;
use crate::{CoreError, CoreResult};

/// The oldest compute capability served: bf16 tensor cores came with 8.0.
const MIN_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// A GPU that passed every check, its context made current.
pub(super) struct OpenedDevice {
    pub context: Arc<CudaContext>,
    pub info: DeviceInfo,
    /// (major, minor), for example (9, 0).
    pub compute_capability: (i32, i32),
}

/// Opens GPU `ordinal` if moemesh can compute on it.
pub(super) fn open_device(ordinal: usize) -> CoreResult<OpenedDevice> {
    let unavailable =
        |what: String| CoreError::DeviceUnavailable(format!("cuda:{ordinal}: {what}"));
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(unavailable(
            "no CUDA driver (libcuda.so) found on this machine".into(),
        ));
    }
    let driver = driver_version().map_err(unavailable)?;
    let count = CudaContext::device_count().map_err(|error| unavailable(no_device(error)))?;
    let count = usize::try_from(count).unwrap_or(0);
    if ordinal >= count {
        return Err(unavailable(match count {
            0 => "the CUDA driver finds no GPU".into(),
            _ => format!("no such GPU; this machine has cuda:0 to cuda:{}", count - 1),
        }));
    }
    let context = CudaContext::new(ordinal)
        .map_err(|error| unavailable(format!("cannot open the GPU: {error}")))?;
    let read_failed = |what: &str, error: DriverError| {
        unavailable(format!("cannot read the GPU's {what}: {error}"))
    };
    let name = context.name().map_err(|error| read_failed("name", error))?;
    let compute_capability = context
        .compute_capability()
        .map_err(|error| read_failed("compute capability", error))?;
    let (major, minor) = compute_capability;
    if compute_capability < MIN_COMPUTE_CAPABILITY {
        return Err(unavailable(format!(
            "{name} has compute capability {major}.{minor}; moemesh needs 8.0 or newer \
             (bf16 tensor cores)"
        )));
    }
    check_libraries(driver).map_err(unavailable)?;
    let memory = context
        .total_mem()
        .map_err(|error| read_failed("memory size", error))? as u64;
    let info = DeviceInfo {
        description: format!("{name} ({}, sm_{major}{minor})", format_byte_size(memory)),
        memory_bytes: Some(memory),
    };
    Ok(OpenedDevice {
        context,
        info,
        compute_capability,
    })
}

/// The CUDA version the driver supports, as (major, minor).
fn driver_version() -> Result<(i32, i32), String> {
    let mut version = 0;
    // SAFETY: the driver library is present; the call writes one int.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|error| format!("the CUDA driver does not answer: {error}"))?;
    let version = (version / 1000, version % 1000 / 10);
    if version < (12, 0) {
        return Err(format!(
            "the NVIDIA driver supports CUDA {}.{}; moemesh needs 12.0 or newer",
            version.0, version.1
        ));
    }
    Ok(version)
}

/// Describes why the driver lists no device.
fn no_device(error: DriverError) -> String {
    if error.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE {
        "the CUDA driver finds no GPU".into()
    } else {
        format!("the CUDA driver cannot start: {error}")
    }
}

/// Checks that cuBLAS and NVRTC can be loaded, and that the driver can
/// load what this NVRTC produces.
fn check_libraries(driver: (i32, i32)) -> Result<(), String> {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err("cuBLAS (libcublas.so) not found; install it (`pip install \
             nvidia-cublas`, or the CUDA toolkit) and add its lib directory to LD_LIBRARY_PATH"
            .into());
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("NVRTC (libnvrtc.so) not found; install it (`pip install \
             nvidia-cuda-nvrtc==13.0.*`) and add its lib directory to LD_LIBRARY_PATH"
            .into());
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is present; the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|error| format!("NVRTC does not answer: {error:?}"))?;
    // The driver compiles NVRTC's PTX when loading it, and refuses PTX
    // newer than itself.
    if (major, minor) > driver {
        return Err(format!(
            "NVRTC {major}.{minor} is newer than the NVIDIA driver (CUDA {}.{}), which cannot \
             load its code; update the driver or install the NVRTC of CUDA {}.{}",
            driver.0, driver.1, driver.0, driver.1
        ));
    }
    Ok(())
}

/// Checks that GPU `ordinal` can be opened, without loading anything.
pub(crate) fn probe_device(ordinal: usize) -> CoreResult<DeviceInfo> {
    open_device(ordinal).map(|device| device.info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU this is an error naming the device; on
    /// one with a GPU, its description. Never a panic.
    #[test]
    fn probing_names_the_device_or_says_why_it_cannot() {
        match probe_device(0) {
            Ok(info) => assert!(info.memory_bytes.is_some_and(|bytes| bytes > 0)),
            Err(CoreError::DeviceUnavailable(message)) => {
                assert!(message.starts_with("cuda:0: "), "{message}")
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
        match probe_device(4096) {
            Err(CoreError::DeviceUnavailable(message)) => {
                assert!(message.starts_with("cuda:4096: "), "{message}")
            }
            other => panic!("cuda:4096 should be unavailable: {other:?}"),
        }
    }
}
