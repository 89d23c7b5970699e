use std::path::PathBuf;

/// Errors of moemesh-core: bad checkpoints, configs and placements, and
/// requests for what is not served here.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `config.json` is missing a field, has an unsupported value or is not JSON.
    #[error("invalid model config: {0}")]
    Config(String),
    /// A safetensors file or its index is malformed, or lacks a tensor we need.
    #[error("invalid checkpoint: {0}")]
    Checkpoint(String),
    /// A request names a model, layer or expert that is not served here.
    #[error("not found: {0}")]
    NotFound(String),
    /// A placement file is malformed or inconsistent with the model.
    #[error("invalid placement: {0}")]
    Placement(String),
    /// The device asked for cannot be used: no GPU, no driver, or a
    /// moemesh built without its support.
    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),
    /// The device failed while computing or moving weights.
    #[error("device error: {0}")]
    Device(String),
}

/// Result alias of moemesh-core.
pub type CoreResult<T> = Result<T, CoreError>;
