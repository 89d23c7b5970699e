//! Mixtral-shaped experts (hidden 1024, intermediate 2816) with
//! deterministic weights, for the examples that measure them.

use std::sync::Arc;

use moemesh_core::compute::{ComputeBackend, Expert, WeightFormat};
use moemesh_core::model::checkpoint::ExpertWeights;
use moemesh_core::model::config::Activation;

pub const HIDDEN: usize = 1024;
pub const INTERMEDIATE: usize = 2816;

/// `count` experts loaded on `backend`: enough of them, run in turn, and a
/// small batch streams their weights from memory as a decode step does.
pub fn experts(backend: &impl ComputeBackend, count: u32) -> Vec<Arc<dyn Expert>> {
    (0..count)
        .map(|seed| {
            backend
                .load_expert(ExpertWeights {
                    hidden_size: HIDDEN,
                    intermediate_size: INTERMEDIATE,
                    gate_proj: pseudo_random(INTERMEDIATE * HIDDEN, 1 + seed),
                    up_proj: pseudo_random(INTERMEDIATE * HIDDEN, 2 + seed),
                    down_proj: pseudo_random(HIDDEN * INTERMEDIATE, 3 + seed),
                    activation: Activation::SiluGlu,
                    biases: None,
                })
                .expect("expert loads")
        })
        .collect()
}

/// `len` values in [-0.1, 0.1), different for every `seed`.
pub fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
    (0..len as u32)
        .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 2000) as f32 / 10000.0 - 0.1)
        .collect()
}

/// An example's positional arguments: numbers, then maybe a weight format.
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Self {
        Self(std::env::args().skip(1).collect())
    }

    /// Argument `index` as a number, `default` when it is absent.
    pub fn number(&self, index: usize, default: usize) -> usize {
        self.0
            .get(index)
            .map_or(default, |arg| arg.parse().expect("numeric arguments"))
    }

    /// Argument `index` as a weight format, f32 when it is absent.
    pub fn format(&self, index: usize) -> WeightFormat {
        self.0
            .get(index)
            .map_or(Ok(WeightFormat::F32), |arg| arg.parse())
            .expect("f32 or bf16")
    }
}
