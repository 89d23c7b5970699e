//! The model side of an MoE layer: what a checkpoint says and where its
//! experts live, with no computation beyond the router.
//!
//! - [`config`]: the model families and their `config.json`.
//! - [`checkpoint`]: memory-mapped safetensors checkpoints, single or sharded,
//!   with the tensor names of each family.
//! - [`quantized`]: FP8 and MXFP4 weights, dequantized on load.
//! - [`gating`]: the router of each family, exactly as transformers computes it.
//! - [`placement`]: which node holds which expert, the placement file, the
//!   first assignment of experts to nodes, and the [`placement::planner`]
//!   that rebalances replicas by load.

pub mod checkpoint;
pub mod config;
pub mod gating;
pub mod placement;
pub mod quantized;

/// The model id a checkpoint gets when none is given: its directory's
/// name, made absolute first ("." names the current directory).
pub fn default_model_id(model_dir: &std::path::Path) -> String {
    model_dir
        .canonicalize()
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into())
}
