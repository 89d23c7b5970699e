//! The router of each model family, computed exactly as its transformers
//! module does, one token at a time so that a token's routing never depends
//! on the other tokens in its batch. Ties break by lowest expert id.

use crate::compute::add_into;
use crate::model::checkpoint::GateWeights;
use crate::model::config::{Family, GroupLimit, ModelConfig};
use gate_logits::{dot, logits};

/// The routing of a batch: per token, `top_k` (expert, weight) pairs sorted
/// by expert id, and the shared expert's weight where the layer has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    /// `[tokens * top_k]`: expert ids, ascending within each token.
    pub experts: Vec<u32>,
    /// `[tokens * top_k]`: the weight of the expert at the same position.
    pub weights: Vec<f32>,
    /// `[tokens]`: the shared expert's weight (1, or Qwen2-MoE's sigmoid gate).
    pub shared_weights: Option<Vec<f32>>,
}

impl Routing {
    /// Returns the number of tokens routed.
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }

    /// Every pick of a zero expert (an id from `num_experts` on:
    /// LongCat-Flash's identity experts) as (token, weight), by token and
    /// then expert id.
    pub fn zero_expert_picks(&self, num_experts: usize) -> Vec<(u32, f32)> {
        (0..self.tokens())
            .flat_map(|token| {
                self.token(token)
                    .filter(move |&(expert, _)| expert as usize >= num_experts)
                    .map(move |(_, weight)| (token as u32, weight))
            })
            .collect()
    }

    /// Returns the (expert, weight) pairs of one token.
    pub fn token(&self, token: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let range = token * self.top_k..(token + 1) * self.top_k;
        self.experts[range.clone()]
            .iter()
            .copied()
            .zip(self.weights[range].iter().copied())
    }
}

/// One MoE layer's gate: its weights and the family's routing rule.
#[derive(Debug, Clone)]
pub struct Gate {
    family: Family,
    hidden_size: usize,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    group_limit: Option<GroupLimit>,
    routed_scaling_factor: f32,
    router_jitter_noise: f32,
    has_shared_expert: bool,
    weights: GateWeights,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Puts into `order` the indices of the `k` largest values, largest first,
/// ties to the lowest index, by selection rather than a full sort. NaN
/// never occurs: inputs are validated.
fn top_k_into(values: &[f32], k: usize, order: &mut Vec<usize>) {
    // A total order: value descending, then index ascending.
    let larger_first = |&a: &usize, &b: &usize| values[b].total_cmp(&values[a]).then(a.cmp(&b));
    order.clear();
    order.extend(0..values.len());
    if k < order.len() {
        order.select_nth_unstable_by(k, larger_first);
        order.truncate(k);
    }
    order.sort_unstable_by(larger_first);
}

/// `probs` = softmax of `logits`, in f32 as transformers computes it.
fn softmax_into(logits: &[f32], probs: &mut Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    probs.clear();
    probs.extend(logits.iter().map(|logit| (logit - max).exp()));
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|prob| *prob /= total);
}

/// Keeps the `top_groups` groups of `scores` (equal groups, one
/// `group_scores` value each) whose group scores are best, ties to the
/// lowest group, and sets every score of the other groups to `masked`.
fn keep_best_groups(
    scores: &mut [f32],
    group_scores: &[f32],
    top_groups: usize,
    kept_groups: &mut Vec<usize>,
    masked: f32,
) {
    top_k_into(group_scores, top_groups, kept_groups);
    let group_size = scores.len() / group_scores.len();
    for (group, members) in scores.chunks_exact_mut(group_size).enumerate() {
        if !kept_groups.contains(&group) {
            members.fill(masked);
        }
    }
}

/// Granite MoE and gpt-oss: the top-k logits, then a softmax over those k only.
fn top_k_softmax(top_k: usize, scratch: &mut Scratch) {
    let Scratch {
        logits,
        scores,
        scores_for_choice: top_logits,
        order,
        chosen,
        ..
    } = scratch;
    top_k_into(logits, top_k, order);
    top_logits.clear();
    top_logits.extend(order.iter().map(|&expert| logits[expert]));
    softmax_into(top_logits, scores);
    chosen.clear();
    chosen.extend(
        order
            .iter()
            .zip(scores.iter())
            .map(|(&expert, &weight)| (expert as u32, weight)),
    );
}

/// Llama 4: the top-k logits, each expert weighted by its logit's sigmoid
/// (a weight its input is multiplied by), not renormalised.
fn sigmoid_top_k(top_k: usize, scratch: &mut Scratch) {
    let Scratch {
        logits,
        order,
        chosen,
        ..
    } = scratch;
    top_k_into(logits, top_k, order);
    chosen.clear();
    chosen.extend(
        order
            .iter()
            .map(|&expert| (expert as u32, sigmoid(logits[expert]))),
    );
}

/// PhiMoE's sparsemixer, as transformers computes it in eval mode: the best
/// expert, weighted by the softmax over the logits within `2 · jitter_eps`
/// of the best (relatively: `(best − l) / max(|l|, best)`), then the best
/// of the others, weighted likewise against the runner-up among the
/// others. The two weights are not renormalised.
fn sparsemixer(jitter_eps: f32, scratch: &mut Scratch) {
    let Scratch {
        logits,
        scores,
        order,
        chosen,
        ..
    } = scratch;
    top_k_into(logits, 2, order);
    chosen.clear();
    for (rank, &expert) in order.iter().enumerate() {
        let best = logits[expert];
        // The first pick competes with every expert, the second with all but the first.
        scores.clear();
        scores.extend(logits.iter().enumerate().map(|(other, &logit)| {
            let factor = logit.abs().max(best);
            let far = (best - logit) / factor > 2.0 * jitter_eps;
            if far || (rank == 1 && other == order[0]) {
                f32::NEG_INFINITY
            } else {
                logit
            }
        }));
        let total: f32 = scores.iter().map(|&logit| (logit - best).exp()).sum();
        chosen.push((expert as u32, 1.0 / total));
    }
}

/// Buffers reused from token to token while routing a batch.
#[derive(Default)]
struct Scratch {
    logits: Vec<f32>,
    /// Probabilities (softmax) or sigmoid scores.
    scores: Vec<f32>,
    /// The scores selection ranks (DeepSeek-V3's and LongCat's biased ones), or
    /// Granite's and gpt-oss's top-k logits.
    scores_for_choice: Vec<f32>,
    group_scores: Vec<f32>,
    order: Vec<usize>,
    kept_groups: Vec<usize>,
    chosen: Vec<(u32, f32)>,
}

impl Gate {
    /// Builds the gate of a layer from its weights and the model config.
    pub fn new(config: &ModelConfig, weights: GateWeights) -> Self {
        debug_assert_eq!(
            weights.weight.len(),
            config.gate_experts() * config.hidden_size
        );
        Self {
            family: config.family,
            hidden_size: config.hidden_size,
            num_experts: config.gate_experts(),
            top_k: config.top_k,
            norm_topk_prob: config.norm_topk_prob,
            group_limit: config.group_limit,
            routed_scaling_factor: config.routed_scaling_factor,
            router_jitter_noise: config.router_jitter_noise,
            has_shared_expert: config.has_shared_expert(),
            weights,
        }
    }

    /// Routes `tokens` rows of `hidden` (`[tokens, hidden_size]`).
    pub fn route(&self, hidden: &[f32], tokens: usize) -> Routing {
        debug_assert_eq!(hidden.len(), tokens * self.hidden_size);
        let mut experts = Vec::with_capacity(tokens * self.top_k);
        let mut weights = Vec::with_capacity(tokens * self.top_k);
        let mut shared_weights = self.has_shared_expert.then(|| Vec::with_capacity(tokens));
        let mut scratch = Scratch {
            logits: vec![0f32; self.num_experts],
            ..Scratch::default()
        };
        for row in hidden.chunks_exact(self.hidden_size) {
            logits(row, &self.weights.weight, &mut scratch.logits);
            if let Some(bias) = &self.weights.logit_bias {
                add_into(&mut scratch.logits, bias);
            }
            match self.family {
                Family::Mixtral
                | Family::Qwen2Moe
                | Family::Qwen3Moe
                | Family::Olmoe
                | Family::Dbrx => self.softmax_top_k(&mut scratch),
                Family::GraniteMoe | Family::GraniteMoeShared | Family::GptOss => {
                    top_k_softmax(self.top_k, &mut scratch)
                }
                Family::Phimoe => sparsemixer(self.router_jitter_noise, &mut scratch),
                Family::Llama4Text => sigmoid_top_k(self.top_k, &mut scratch),
                Family::LongcatFlash => self.softmax_biased_top_k(&mut scratch),
                Family::DeepseekV3 | Family::Glm4Moe => self.sigmoid_group_top_k(&mut scratch),
                Family::DeepseekV2 => self.softmax_group_top_k(&mut scratch),
            }
            let chosen = &mut scratch.chosen;
            chosen.sort_by_key(|&(expert, _)| expert);
            experts.extend(chosen.iter().map(|&(expert, _)| expert));
            weights.extend(chosen.iter().map(|&(_, weight)| weight));
            if let Some(shared_weights) = shared_weights.as_mut() {
                shared_weights.push(match &self.weights.shared_expert_gate {
                    Some(shared_gate) => sigmoid(dot(row, shared_gate)),
                    None => 1.0,
                });
            }
        }
        Routing {
            top_k: self.top_k,
            experts,
            weights,
            shared_weights,
        }
    }

    /// Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE: softmax over all experts,
    /// top-k of the probabilities, divided by their sum where
    /// `norm_topk_prob`.
    fn softmax_top_k(&self, scratch: &mut Scratch) {
        let Scratch {
            logits,
            scores: probs,
            order,
            chosen,
            ..
        } = scratch;
        softmax_into(logits, probs);
        top_k_into(probs, self.top_k, order);
        chosen.clear();
        chosen.extend(order.iter().map(|&expert| (expert as u32, probs[expert])));
        if self.norm_topk_prob {
            let sum: f32 = chosen.iter().map(|&(_, weight)| weight).sum();
            chosen.iter_mut().for_each(|(_, weight)| *weight /= sum);
        }
    }

    /// LongCat-Flash: softmax over the routed and zero experts; the
    /// selection-only bias picks the top-k; the chosen probabilities,
    /// not renormalised, times `routed_scaling_factor`.
    fn softmax_biased_top_k(&self, scratch: &mut Scratch) {
        let Scratch {
            logits,
            scores: probs,
            scores_for_choice,
            order,
            chosen,
            ..
        } = scratch;
        softmax_into(logits, probs);
        scores_for_choice.clear();
        scores_for_choice.extend_from_slice(probs);
        if let Some(bias) = &self.weights.score_correction_bias {
            add_into(scores_for_choice, bias);
        }
        top_k_into(scores_for_choice, self.top_k, order);
        chosen.clear();
        chosen.extend(
            order
                .iter()
                .map(|&expert| (expert as u32, probs[expert] * self.routed_scaling_factor)),
        );
    }

    /// DeepSeek-V2: softmax over all experts; with `group_limited_greedy`
    /// groups are ranked by their best probability and only the best
    /// `topk_group` compete (the others' probabilities set to 0, as
    /// transformers masks them); the chosen probabilities, not
    /// renormalised, times `routed_scaling_factor`.
    fn softmax_group_top_k(&self, scratch: &mut Scratch) {
        let Scratch {
            logits,
            scores: probs,
            scores_for_choice,
            group_scores,
            order,
            kept_groups,
            chosen,
        } = scratch;
        softmax_into(logits, probs);
        scores_for_choice.clear();
        scores_for_choice.extend_from_slice(probs);
        if let Some(GroupLimit { groups, top_groups }) = self.group_limit {
            let group_size = self.num_experts / groups;
            group_scores.clear();
            group_scores.extend(
                probs
                    .chunks_exact(group_size)
                    .map(|group| group.iter().copied().fold(f32::NEG_INFINITY, f32::max)),
            );
            keep_best_groups(
                scores_for_choice,
                group_scores,
                top_groups,
                kept_groups,
                0.0,
            );
        }
        top_k_into(scores_for_choice, self.top_k, order);
        chosen.clear();
        chosen.extend(order.iter().map(|&expert| {
            (
                expert as u32,
                scores_for_choice[expert] * self.routed_scaling_factor,
            )
        }));
    }

    /// DeepSeek-V3: sigmoid scores; the bias shifts selection only; groups
    /// are ranked by the sum of their two best biased scores and only the
    /// best `topk_group` groups compete; the chosen experts' unbiased scores
    /// are renormalised (plus 1e-20) and multiplied by `routed_scaling_factor`.
    fn sigmoid_group_top_k(&self, scratch: &mut Scratch) {
        let Scratch {
            logits,
            scores,
            scores_for_choice,
            group_scores,
            order,
            kept_groups,
            chosen,
        } = scratch;
        scores.clear();
        scores.extend(logits.iter().map(|&logit| sigmoid(logit)));
        scores_for_choice.clear();
        match &self.weights.score_correction_bias {
            Some(bias) => {
                scores_for_choice.extend(scores.iter().zip(bias).map(|(score, bias)| score + bias))
            }
            None => scores_for_choice.extend_from_slice(scores),
        }
        if let Some(GroupLimit { groups, top_groups }) = self.group_limit {
            let group_size = self.num_experts / groups;
            group_scores.clear();
            for group in scores_for_choice.chunks_exact(group_size) {
                top_k_into(group, 2, order);
                group_scores.push(order.iter().map(|&index| group[index]).sum());
            }
            keep_best_groups(
                scores_for_choice,
                group_scores,
                top_groups,
                kept_groups,
                f32::NEG_INFINITY,
            );
        }
        top_k_into(scores_for_choice, self.top_k, order);
        chosen.clear();
        chosen.extend(order.iter().map(|&expert| (expert as u32, scores[expert])));
        if self.norm_topk_prob {
            let denominator: f32 = chosen.iter().map(|&(_, weight)| weight).sum::<f32>() + 1e-20;
            chosen
                .iter_mut()
                .for_each(|(_, weight)| *weight /= denominator);
        }
        chosen
            .iter_mut()
            .for_each(|(_, weight)| *weight *= self.routed_scaling_factor);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn config(json: &str) -> ModelConfig {
        ModelConfig::from_json(json).unwrap()
    }

    fn mixtral(experts: usize, top_k: usize) -> ModelConfig {
        config(&format!(
            r#"{{"model_type":"mixtral","hidden_size":2,"num_hidden_layers":1,"intermediate_size":4,
                "num_local_experts":{experts},"num_experts_per_tok":{top_k}}}"#
        ))
    }

    #[test]
    fn ties_break_by_lowest_expert_id() {
        // Every expert gets the same logit: the first top_k ids win.
        let gate = Gate::new(
            &mixtral(4, 2),
            GateWeights {
                weight: vec![1.0; 8],
                score_correction_bias: None,
                logit_bias: None,
                shared_expert_gate: None,
            },
        );
        let routing = gate.route(&[0.5, -0.25], 1);
        assert_eq!(routing.experts, vec![0, 1]);
        assert_eq!(routing.weights, vec![0.5, 0.5]);
    }

    #[test]
    fn deepseek_bias_selects_but_does_not_weigh() {
        let config = config(
            r#"{"model_type":"deepseek_v3","hidden_size":2,"num_hidden_layers":1,
                "moe_intermediate_size":4,"n_routed_experts":4,"n_shared_experts":1,
                "num_experts_per_tok":1,"n_group":2,"topk_group":1,"routed_scaling_factor":2.0,
                "norm_topk_prob":false}"#,
        );
        // Logits [2, 0, 0, 0] for hidden [1, 0]; the bias makes expert 3 win.
        let gate = Gate::new(
            &config,
            GateWeights {
                weight: vec![2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                score_correction_bias: Some(vec![0.0, 0.0, 0.0, 1.0]),
                logit_bias: None,
                shared_expert_gate: None,
            },
        );
        let routing = gate.route(&[1.0, 0.0], 1);
        assert_eq!(routing.experts, vec![3]);
        assert!((routing.weights[0] - 2.0 * 0.5).abs() < 1e-7);
        assert_eq!(routing.shared_weights, Some(vec![1.0]));
    }

    #[test]
    fn deepseek_groups_limit_the_choice() {
        let config = config(
            r#"{"model_type":"deepseek_v3","hidden_size":1,"num_hidden_layers":1,
                "moe_intermediate_size":4,"n_routed_experts":6,"n_shared_experts":0,
                "num_experts_per_tok":2,"n_group":3,"topk_group":1}"#,
        );
        // Group 1 (experts 2, 3) has the best pair sum even though expert 0 alone is best.
        let gate = Gate::new(
            &config,
            GateWeights {
                weight: vec![5.0, -5.0, 3.0, 3.0, 0.0, 0.0],
                score_correction_bias: Some(vec![0.0; 6]),
                logit_bias: None,
                shared_expert_gate: None,
            },
        );
        let routing = gate.route(&[1.0], 1);
        assert_eq!(routing.experts, vec![2, 3]);
        assert!((routing.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(routing.shared_weights, None);
    }

    proptest! {
        #[test]
        fn selection_matches_a_stable_sort_even_with_ties(
            // Few distinct values, so ties are common.
            values in proptest::collection::vec(0u8..4, 1..40),
            k in 1usize..40,
        ) {
            let values: Vec<f32> = values.into_iter().map(f32::from).collect();
            let k = k.min(values.len());
            let mut expected: Vec<usize> = (0..values.len()).collect();
            expected.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
            expected.truncate(k);
            let mut order = Vec::new();
            top_k_into(&values, k, &mut order);
            prop_assert_eq!(order, expected);
        }

        #[test]
        fn routing_of_a_token_does_not_depend_on_its_batch(
            batch in proptest::collection::vec(-3f32..3.0, 2 * 6),
            weight in proptest::collection::vec(-1f32..1.0, 2 * 8),
            position in 0usize..6,
        ) {
            let gate = Gate::new(&mixtral(8, 3), GateWeights { weight, score_correction_bias: None, logit_bias: None, shared_expert_gate: None });
            let together = gate.route(&batch, 6);
            let alone = gate.route(&batch[position * 2..position * 2 + 2], 1);
            prop_assert_eq!(together.token(position).collect::<Vec<_>>(), alone.token(0).collect::<Vec<_>>());
            let weights: f32 = alone.weights.iter().sum();
            prop_assert!((weights - 1.0).abs() < 1e-5);
        }
    }
}

#[path = "gate_logits.rs"]
mod gate_logits;
