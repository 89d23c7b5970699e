//! [`MoeLayer`]: one whole MoE layer in process, gate and experts together.
//! It is the reference every distributed path is compared with.

use std::sync::Arc;

use crate::CoreResult;
use crate::compute::{
    ComputeBackend, Expert, ExpertWork, add_weighted, add_zero_experts, weighted_inputs,
};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::ModelConfig;
use crate::model::gating::{Gate, Routing};

/// The tokens routed to one expert and their routing weights.
#[derive(Debug, Clone, Default)]
struct ExpertTokens {
    /// Token indices, ascending.
    rows: Vec<u32>,
    weights: Vec<f32>,
}

/// Per expert id (shared expert last), the tokens routed to it.
fn tokens_per_expert(routing: &Routing, experts_per_layer: usize) -> Vec<ExpertTokens> {
    let mut per_expert = vec![ExpertTokens::default(); experts_per_layer];
    let routed = experts_per_layer - usize::from(routing.shared_weights.is_some());
    for token in 0..routing.tokens() {
        // Zero experts (LongCat-Flash's, ids from `routed` on) are added apart.
        for (expert, weight) in routing
            .token(token)
            .filter(|&(expert, _)| (expert as usize) < routed)
        {
            per_expert[expert as usize].rows.push(token as u32);
            per_expert[expert as usize].weights.push(weight);
        }
    }
    if let Some(shared_weights) = &routing.shared_weights {
        let shared = per_expert
            .last_mut()
            .expect("a layer with a shared expert has at least one slot");
        shared.rows = (0..routing.tokens() as u32).collect();
        shared.weights.clone_from(shared_weights);
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
    /// Where the experts live and run.
    backend: Arc<dyn ComputeBackend>,
}

impl MoeLayer {
    /// Loads layer `layer` of a checkpoint onto a compute backend.
    pub fn load<B: ComputeBackend + Clone + 'static>(
        checkpoint: &Checkpoint,
        layer: usize,
        backend: &B,
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
            backend: Arc::new(backend.clone()),
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
    /// token alone. Fails only when the backend's device does.
    pub fn forward(&self, hidden: &[f32], tokens: usize) -> CoreResult<Vec<f32>> {
        let routing = self.gate.route(hidden, tokens);
        let per_expert = tokens_per_expert(&routing, self.experts.len());
        if self.config.weights_scale_input {
            return self.forward_weighting_inputs(hidden, tokens, &per_expert);
        }
        let work: Vec<ExpertWork<'_>> = self
            .experts
            .iter()
            .zip(&per_expert)
            .map(|(expert, tokens)| ExpertWork {
                expert: expert.as_ref(),
                rows: &tokens.rows,
                weights: &tokens.weights,
            })
            .collect();
        let width = self.config.hidden_size;
        let mut output = self.backend.run_experts(hidden, width, &work)?;
        if self.config.zero_experts > 0 {
            let picks = routing.zero_expert_picks(self.config.num_experts);
            add_zero_experts(&mut output, hidden, width, &picks);
        }
        Ok(output)
    }

    /// Llama 4: each expert computes on its tokens' rows multiplied by
    /// their weights ([`weighted_inputs`]), and a token's output is the sum
    /// of its experts' outputs, in expert order as elsewhere.
    fn forward_weighting_inputs(
        &self,
        hidden: &[f32],
        tokens: usize,
        per_expert: &[ExpertTokens],
    ) -> CoreResult<Vec<f32>> {
        let width = self.config.hidden_size;
        let input = weighted_inputs(
            hidden,
            width,
            per_expert
                .iter()
                .map(|tokens| (&tokens.rows[..], &tokens.weights[..])),
        );
        let rows: Vec<u32> = (0..(input.len() / width) as u32).collect();
        let ones = vec![1f32; rows.len()];
        let mut work = Vec::with_capacity(per_expert.len());
        let mut first = 0;
        for (expert, tokens) in self.experts.iter().zip(per_expert) {
            let count = tokens.rows.len();
            work.push(ExpertWork {
                expert: expert.as_ref(),
                rows: &rows[first..first + count],
                weights: &ones[first..first + count],
            });
            first += count;
        }
        let outputs = self.backend.expert_outputs(&input, width, &work)?;
        let mut combined = vec![0f32; tokens * width];
        let token_rows = per_expert.iter().flat_map(|tokens| &tokens.rows);
        for (&token, output) in token_rows.zip(outputs.chunks_exact(width)) {
            let token = token as usize;
            add_weighted(
                &mut combined[token * width..(token + 1) * width],
                output,
                1.0,
            );
        }
        Ok(combined)
    }
}
