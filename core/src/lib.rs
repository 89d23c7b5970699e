//! moemesh-core: everything about a Mixture-of-Experts layer that needs no
//! network.
//!
//! - [`model`]: the model itself.
//!   - [`model::config`]: the model families and their `config.json`.
//!   - [`model::checkpoint`]: memory-mapped safetensors checkpoints, single
//!     or sharded, with the tensor names of each family.
//!   - [`model::gating`]: the router of each family, exactly as transformers
//!     computes it.
//!   - [`model::placement`]: which node holds which expert, and the
//!     placement file; [`model::placement::planner`] decides replicas and
//!     their nodes from expert loads.
//! - [`compute`]: the expert FFN behind the [`compute::ComputeBackend`]
//!   trait, with a multi-threaded CPU implementation on the `gemm` crate.
//! - [`layer`]: [`layer::MoeLayer`], the whole layer in process: the reference
//!   every distributed path is compared with.
//!
//! The wire codec between `moemesh.v1.Tensor` and f32 rows lives in
//! `moemesh_proto::codec`.

pub mod compute;
mod error;
pub mod layer;
pub mod model;

pub use error::{CoreError, CoreResult};
