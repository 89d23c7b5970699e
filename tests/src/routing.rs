//! References for pre-routed forwards: random routings and hidden rows,
//! and a layer's output for a given routing computed in this process.

use moemesh_core::compute::{
    ComputeBackend, CpuBackend, Expert, ExpertWork, add_weighted, add_zero_experts, weighted_inputs,
};
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::gating::Routing;
use rand::Rng;
use rand::seq::SliceRandom;

use crate::Fixture;

/// `tokens` tokens each routed to `top_k` distinct random experts of
/// `num_experts`, with random positive weights.
pub fn random_routing(
    rng: &mut impl Rng,
    tokens: usize,
    top_k: usize,
    num_experts: usize,
) -> Routing {
    let mut ids: Vec<u32> = (0..num_experts as u32).collect();
    let mut experts = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let (chosen, _) = ids.partial_shuffle(rng, top_k);
        experts.extend_from_slice(chosen);
    }
    let weights = (0..tokens * top_k)
        .map(|_| rng.random_range(0.05f32..1.0))
        .collect();
    Routing {
        top_k,
        experts,
        weights,
        shared_weights: None,
    }
}

/// Per token, the sum of `experts`' outputs on their `(rows, weights)`,
/// each weighted as the model says: the output (most families) or, for
/// Llama 4, the input ([`weighted_inputs`]); summed in the order given.
fn combine(
    backend: &CpuBackend,
    config: &ModelConfig,
    input: &[f32],
    experts: &[&dyn Expert],
    per_expert: &[(Vec<u32>, Vec<f32>)],
) -> Vec<f32> {
    let width = config.hidden_size;
    if !config.weights_scale_input {
        let work: Vec<ExpertWork<'_>> = experts
            .iter()
            .zip(per_expert)
            .map(|(&expert, (rows, weights))| ExpertWork {
                expert,
                rows,
                weights,
            })
            .collect();
        return backend.run_experts(input, width, &work).unwrap();
    }
    let mut combined = vec![0f32; input.len()];
    for (&expert, (rows, weights)) in experts.iter().zip(per_expert) {
        let weighted = weighted_inputs(input, width, [(&rows[..], &weights[..])]);
        let mut output = vec![0f32; weighted.len()];
        expert.forward(&weighted, rows.len(), &mut output);
        for (&row, output) in rows.iter().zip(output.chunks_exact(width)) {
            let row = row as usize;
            add_weighted(&mut combined[row * width..(row + 1) * width], output, 1.0);
        }
    }
    combined
}

/// `tokens` random hidden rows of `hidden` values in [-2, 2).
pub fn random_rows(rng: &mut impl Rng, tokens: usize, hidden: usize) -> Vec<f32> {
    (0..tokens * hidden)
        .map(|_| rng.random_range(-2f32..2.0))
        .collect()
}

/// One layer's output computed in process from `routing`, in its two
/// parts: the routed experts' weighted sum (what `ForwardRouted` answers)
/// and the shared expert's (zero for families without one, or a routing
/// without shared weights). Experts are summed in ascending id, as the
/// in-process layer and the router do.
pub fn in_process_parts(
    fixture: &Fixture,
    layer: usize,
    input: &[f32],
    routing: &Routing,
) -> (Vec<f32>, Vec<f32>) {
    let config = fixture.checkpoint.config();
    let backend = CpuBackend::new(1).unwrap();
    let load = |expert: u32| {
        backend
            .load_expert(fixture.checkpoint.load_expert(layer, expert).unwrap())
            .unwrap()
    };
    let mut per_expert = vec![(Vec::new(), Vec::new()); config.num_experts];
    for token in 0..routing.tokens() {
        // Zero experts (ids from num_experts on) are added below.
        let routed = routing
            .token(token)
            .filter(|&(expert, _)| (expert as usize) < config.num_experts);
        for (expert, weight) in routed {
            per_expert[expert as usize].0.push(token as u32);
            per_expert[expert as usize].1.push(weight);
        }
    }
    let routed_experts: Vec<_> = (0..config.num_experts as u32).map(load).collect();
    let experts: Vec<&dyn Expert> = routed_experts
        .iter()
        .map(|expert| expert.as_ref())
        .collect();
    let mut routed = combine(&backend, config, input, &experts, &per_expert);
    let zero_picks = routing.zero_expert_picks(config.num_experts);
    add_zero_experts(&mut routed, input, config.hidden_size, &zero_picks);
    let shared = match (config.shared_expert_id(), &routing.shared_weights) {
        (Some(id), Some(weights)) => {
            let expert = load(id);
            let rows: Vec<u32> = (0..routing.tokens() as u32).collect();
            combine(
                &backend,
                config,
                input,
                &[expert.as_ref()],
                &[(rows, weights.clone())],
            )
        }
        _ => vec![0.0; input.len()],
    };
    (routed, shared)
}
