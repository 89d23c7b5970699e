//! [`MoeLayer`]: one whole MoE layer in process, gate and experts together.
//! It is the reference every distributed path is compared with, and
//! [`run_experts`] is the kernel an expert node runs on its share.

use std::sync::Arc;

use crate::CoreResult;
use crate::backend::{ComputeBackend, Expert};
use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::gating::{Gate, Routing};

/// One expert's share of a batch: which rows it takes and with what weight.
pub struct ExpertWork<'a> {
    pub expert: &'a dyn Expert,
    /// Indices of input rows, strictly increasing.
    pub rows: &'a [u32],
    /// The routing weight for each entry of `rows`.
    pub weights: &'a [f32],
}

/// Runs each expert on its rows and returns, per row of `input`
/// (`[rows, width]`), the sum of the weighted expert outputs.
///
/// Work items are applied in the order given; callers pass them by
/// ascending expert id so that every row's sum has a fixed order.
pub fn run_experts<'a>(
    input: &[f32],
    width: usize,
    work: impl IntoIterator<Item = ExpertWork<'a>>,
) -> Vec<f32> {
    let mut combined = vec![0f32; input.len()];
    let mut gathered = Vec::new();
    let mut expert_output = Vec::new();
    for ExpertWork {
        expert,
        rows,
        weights,
    } in work
    {
        debug_assert_eq!(rows.len(), weights.len());
        if rows.is_empty() {
            continue;
        }
        gathered.clear();
        for &row in rows {
            let row = row as usize;
            gathered.extend_from_slice(&input[row * width..(row + 1) * width]);
        }
        expert_output.clear();
        expert_output.resize(gathered.len(), 0f32);
        expert.forward(&gathered, rows.len(), &mut expert_output);
        for ((&row, &weight), output_row) in rows
            .iter()
            .zip(weights)
            .zip(expert_output.chunks_exact(width))
        {
            let row = row as usize;
            for (sum, value) in combined[row * width..(row + 1) * width]
                .iter_mut()
                .zip(output_row)
            {
                *sum += value * weight;
            }
        }
    }
    combined
}

/// Per expert id (shared expert last), the tokens routed to it and their
/// weights, tokens ascending.
pub fn tokens_per_expert(routing: &Routing, experts_per_layer: usize) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut per_expert = vec![(Vec::new(), Vec::new()); experts_per_layer];
    for token in 0..routing.tokens() {
        for (expert, weight) in routing.token(token) {
            per_expert[expert as usize].0.push(token as u32);
            per_expert[expert as usize].1.push(weight);
        }
    }
    if let Some(shared_weights) = &routing.shared_weights {
        let shared = per_expert
            .last_mut()
            .expect("a layer with a shared expert has at least one slot");
        shared.0 = (0..routing.tokens() as u32).collect();
        shared.1.clone_from(shared_weights);
    }
    per_expert
}

/// A whole MoE layer in one process.
pub struct MoeLayer {
    config: ModelConfig,
    layer: usize,
    gate: Gate,
    /// Routed experts by id, then the shared expert if the model has one.
    experts: Vec<Arc<dyn Expert>>,
}

impl MoeLayer {
    /// Loads layer `layer` of a checkpoint onto a compute backend.
    pub fn load(
        checkpoint: &Checkpoint,
        layer: usize,
        backend: &dyn ComputeBackend,
    ) -> CoreResult<Self> {
        let config = checkpoint.config().clone();
        let gate = Gate::new(&config, checkpoint.load_gate(layer)?);
        let experts = (0..config.experts_per_layer() as u32)
            .map(|expert| backend.load_expert(checkpoint.load_expert(layer, expert)?))
            .collect::<CoreResult<Vec<_>>>()?;
        Ok(Self {
            config,
            layer,
            gate,
            experts,
        })
    }

    /// Returns the decoder layer index.
    pub fn layer(&self) -> usize {
        self.layer
    }

    /// Returns the model config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Returns the layer's gate.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Computes the layer's output for `tokens` rows of `hidden`
    /// (`[tokens, hidden_size]`); each token's output depends on that
    /// token alone.
    pub fn forward(&self, hidden: &[f32], tokens: usize) -> Vec<f32> {
        let routing = self.gate.route(hidden, tokens);
        let per_expert = tokens_per_expert(&routing, self.experts.len());
        let work = self
            .experts
            .iter()
            .zip(&per_expert)
            .map(|(expert, (rows, weights))| ExpertWork {
                expert: expert.as_ref(),
                rows,
                weights,
            });
        run_experts(hidden, self.config.hidden_size, work)
    }
}
