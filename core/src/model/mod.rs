//! The model side of an MoE layer: what a checkpoint says and where its
//! experts live, with no computation beyond the router.
//!
//! - [`config`]: the model families and their `config.json`.
//! - [`checkpoint`]: memory-mapped safetensors checkpoints, single or sharded,
//!   with the tensor names of each family.
//! - [`gating`]: the router of each family, exactly as transformers computes it.
//! - [`placement`]: which node holds which expert, the placement file, the
//!   first assignment of experts to nodes, and the [`placement::planner`]
//!   that rebalances replicas by load.

pub mod checkpoint;
pub mod config;
pub mod gating;
pub mod placement;
