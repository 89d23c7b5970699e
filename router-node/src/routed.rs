//! Pre-routed forwards (`ForwardRouted`): a batch whose routing the caller
//! computed with its own gate. The routing is checked against the model
//! and put in the order [`Routing`] promises, then takes the same fan-out
//! as a gated forward. Shared experts stay with the caller, so a pre-routed
//! batch never names one and its routing has no shared weights.

use moemesh_core::model::gating::Routing;

use crate::{RouterError, RouterResult};

/// The routing a caller sent with `tokens` tokens: `top_k` experts per
/// token, `expert_ids` and `weights` row-major `[tokens * top_k]`, for a
/// model with `num_experts` routed experts of which it routes a token to
/// `model_top_k` (`num_experts_per_tok`).
///
/// Refuses a `top_k` of 0 or above `model_top_k` (expert nodes size what
/// they accept by the model's experts per token), lengths other than
/// `tokens * top_k`, ids out of range, an id twice in one token and
/// non-finite weights, naming the first offending token. Each token's
/// pairs come back sorted by ascending expert id: the order the fan-out
/// and the in-process layer sum in, so the output's bits do not depend on
/// the order the caller listed the experts in.
pub fn caller_routing(
    tokens: usize,
    top_k: usize,
    expert_ids: Vec<u32>,
    weights: Vec<f32>,
    num_experts: usize,
    model_top_k: usize,
) -> RouterResult<Routing> {
    if top_k == 0 {
        return Err(invalid(
            "top_k is 0: every token needs at least one expert".into(),
        ));
    }
    if top_k > model_top_k {
        return Err(invalid(format!(
            "top_k {top_k} exceeds the model's {model_top_k} experts per token \
             (num_experts_per_tok), the most an expert node takes"
        )));
    }
    // top_k is at most the model's, so this cannot overflow for any batch
    // that fits in memory; saturating keeps it a refusal if it did.
    let expected = tokens.saturating_mul(top_k);
    for (field, length) in [("expert_ids", expert_ids.len()), ("weights", weights.len())] {
        if length != expected {
            return Err(invalid(format!(
                "{field} has {length} entries; {tokens} tokens with top_k {top_k} need {expected}"
            )));
        }
    }
    let mut experts = expert_ids;
    let mut weights = weights;
    let mut pairs: Vec<(u32, f32)> = Vec::with_capacity(top_k);
    for token in 0..tokens {
        let range = token * top_k..(token + 1) * top_k;
        pairs.clear();
        pairs.extend(
            experts[range.clone()]
                .iter()
                .copied()
                .zip(weights[range.clone()].iter().copied()),
        );
        check_token(token, &mut pairs, num_experts)?;
        for ((expert, weight), (slot_expert, slot_weight)) in pairs
            .iter()
            .zip(experts[range.clone()].iter_mut().zip(&mut weights[range]))
        {
            *slot_expert = *expert;
            *slot_weight = *weight;
        }
    }
    Ok(Routing {
        top_k,
        experts,
        weights,
        shared_weights: None,
    })
}

/// Checks one token's (expert, weight) pairs and sorts them by expert id.
fn check_token(token: usize, pairs: &mut [(u32, f32)], num_experts: usize) -> RouterResult<()> {
    for &(expert, weight) in pairs.iter() {
        if expert as usize >= num_experts {
            return Err(invalid(format!(
                "token {token}: expert id {expert} is out of range; the model's routed experts \
                 are 0..{num_experts} (shared experts are not routed)"
            )));
        }
        if !weight.is_finite() {
            return Err(invalid(format!(
                "token {token}: the weight of expert {expert} is {weight}, not a finite number"
            )));
        }
    }
    pairs.sort_unstable_by_key(|&(expert, _)| expert);
    if let Some(twice) = pairs.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(invalid(format!(
            "token {token}: duplicate expert id {}; a token's experts must be distinct",
            twice[0].0
        )));
    }
    Ok(())
}

fn invalid(message: String) -> RouterError {
    RouterError::InvalidArgument(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(result: RouterResult<Routing>) -> String {
        match result {
            Err(RouterError::InvalidArgument(message)) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn each_tokens_experts_come_back_ascending_with_their_weights() {
        let routing = caller_routing(
            2,
            3,
            vec![5, 1, 3, 0, 7, 2],
            vec![0.5, 0.1, 0.3, 1.0, 2.0, -3.0],
            8,
            3,
        )
        .unwrap();
        assert_eq!(routing.top_k, 3);
        assert_eq!(routing.tokens(), 2);
        assert_eq!(routing.experts, [1, 3, 5, 0, 2, 7]);
        assert_eq!(routing.weights, [0.1, 0.3, 0.5, 1.0, -3.0, 2.0]);
        assert_eq!(routing.shared_weights, None);
    }

    #[test]
    fn top_k_may_be_below_the_models_and_a_batch_empty() {
        let routing = caller_routing(2, 1, vec![7, 0], vec![1.0, 0.5], 8, 4).unwrap();
        assert_eq!((routing.top_k, routing.experts), (1, vec![7, 0]));
        let routing = caller_routing(1, 4, vec![3, 2, 1, 0], vec![1.0; 4], 4, 4).unwrap();
        assert_eq!(routing.experts, [0, 1, 2, 3]);
        let routing = caller_routing(0, 2, Vec::new(), Vec::new(), 8, 2).unwrap();
        assert_eq!(routing.tokens(), 0);
    }

    #[test]
    fn malformed_routings_are_refused_naming_what_is_wrong() {
        let cases = [
            (1, 0, vec![], vec![], "top_k is 0"),
            (
                1,
                3,
                vec![0, 1, 2],
                vec![1.0; 3],
                "top_k 3 exceeds the model's 2 experts per token",
            ),
            (
                2,
                2,
                vec![0, 1, 2],
                vec![1.0; 4],
                "expert_ids has 3 entries; 2 tokens with top_k 2 need 4",
            ),
            (
                2,
                2,
                vec![0, 1, 2, 3],
                vec![1.0; 5],
                "weights has 5 entries",
            ),
            (
                2,
                2,
                vec![0, 1, 2, 8],
                vec![1.0; 4],
                "token 1: expert id 8 is out of range",
            ),
            (
                2,
                2,
                vec![0, 1, 4, 4],
                vec![1.0; 4],
                "token 1: duplicate expert id 4",
            ),
            (
                1,
                2,
                vec![0, 1],
                vec![1.0, f32::NAN],
                "token 0: the weight of expert 1 is NaN",
            ),
            (
                1,
                2,
                vec![0, 1],
                vec![f32::INFINITY, 1.0],
                "expert 0 is inf, not a finite number",
            ),
        ];
        for (tokens, top_k, ids, weights, needle) in cases {
            let message = refusal(caller_routing(tokens, top_k, ids, weights, 8, 2));
            assert!(
                message.contains(needle),
                "{message:?} should contain {needle:?}"
            );
        }
    }
}
