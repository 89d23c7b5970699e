//! moemesh-core: everything about a Mixture-of-Experts layer that needs no
//! network.
//!
//! - [`config`]: the model families and their `config.json`.
//! - [`checkpoint`]: memory-mapped safetensors checkpoints, single or sharded,
//!   with the tensor names of each family.
//! - [`gating`]: the router of each family, exactly as transformers computes it.
//! - [`backend`]: the expert FFN behind the [`backend::ComputeBackend`] trait,
//!   with a multi-threaded CPU implementation on the `gemm` crate.
//! - [`layer`]: [`layer::MoeLayer`], the whole layer in process: the reference
//!   every distributed path is compared with.
//! - [`placement`]: which node holds which expert, and the placement file.
//! - [`tensor`]: the wire codec between `moemesh.v1.Tensor` and f32 rows.

pub mod backend;
pub mod checkpoint;
pub mod config;
mod error;
pub mod gating;
pub mod layer;
pub mod placement;
pub mod planner;
pub mod tensor;

pub use error::{CoreError, CoreResult};
