//! Pre-routed forwards (`ForwardRouted`): the caller's routing through a
//! cluster against the in-process experts and the transformers goldens,
//! batch invariance, and the refusal of malformed routings.

use moemesh_client::{Client, ClientError};
use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_core::model::gating::{Gate, Routing};
use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_tests::routing::{in_process_parts, random_routing, random_rows};
use moemesh_tests::{ClusterSandbox, FIXTURES, Fixture, partly_replicated, relative_l2};
use rand::{Rng, SeedableRng};

fn sum(lhs: &[f32], rhs: &[f32]) -> Vec<f32> {
    lhs.iter().zip(rhs).map(|(a, b)| a + b).collect()
}

/// Lists each token's experts in descending id instead of ascending.
fn reversed_per_token(routing: &Routing) -> (Vec<u32>, Vec<f32>) {
    let mut experts = routing.experts.clone();
    let mut weights = routing.weights.clone();
    experts.chunks_mut(routing.top_k).for_each(<[u32]>::reverse);
    weights.chunks_mut(routing.top_k).for_each(<[f32]>::reverse);
    (experts, weights)
}

async fn forward_routed(
    client: &mut Client,
    layer: usize,
    input: &[f32],
    hidden: usize,
    routing: &Routing,
) -> Result<Vec<f32>, ClientError> {
    client
        .forward_routed_f32(
            "",
            layer as u32,
            input,
            hidden,
            &routing.experts,
            &routing.weights,
            routing.top_k,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gates_routing_sent_pre_routed_gives_the_layers_routed_part() {
    let backend = CpuBackend::new(1).unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let hidden = fixture.hidden_size();
        let config = fixture.checkpoint.config();
        let cluster = ClusterSandbox::start(&fixture.dir, 3, partly_replicated(&fixture.dir)).await;
        let mut client = cluster.client().await;
        for (&layer, (input, expected)) in &fixture.cases {
            let tokens = input.len() / hidden;
            let gate = Gate::new(config, fixture.checkpoint.load_gate(layer).unwrap());
            let routing = gate.route(input, tokens);
            assert_eq!(routing.shared_weights.is_some(), config.has_shared_expert());
            let output = forward_routed(&mut client, layer, input, hidden, &routing)
                .await
                .unwrap();

            let (routed, shared) = in_process_parts(&fixture, layer, input, &routing);
            let error = relative_l2(&output, &routed);
            assert!(
                error < 1e-6,
                "{name} layer {layer}: pre-routed vs in-process routed experts, relative L2 {error:e}"
            );
            // The reference's two parts make up the in-process layer, and
            // with the shared part added the cluster's answer is
            // transformers' (for families without a shared expert, as is).
            let whole = MoeLayer::load(&fixture.checkpoint, layer, &backend)
                .unwrap()
                .forward(input, tokens)
                .unwrap();
            let error = relative_l2(&sum(&routed, &shared), &whole);
            assert!(
                error < 1e-6,
                "{name} layer {layer}: parts vs layer {error:e}"
            );
            let error = relative_l2(&sum(&output, &shared), expected);
            assert!(
                error < 1e-5,
                "{name} layer {layer}: pre-routed plus shared expert vs transformers, relative L2 {error:e}"
            );
            if !config.has_shared_expert() {
                let error = relative_l2(&output, expected);
                assert!(
                    error < 1e-5,
                    "{name} layer {layer}: vs transformers {error:e}"
                );
            }

            // The order a caller lists a token's experts in changes no bit.
            let (experts, weights) = reversed_per_token(&routing);
            let reordered = client
                .forward_routed_f32(
                    "",
                    layer as u32,
                    input,
                    hidden,
                    &experts,
                    &weights,
                    routing.top_k,
                )
                .await
                .unwrap();
            assert_eq!(
                reordered, output,
                "{name} layer {layer}: order changed bits"
            );
        }
        cluster.shutdown().await;
    }
}

/// Sorts each token's pairs by expert id, as `Routing` keeps them.
fn sorted_per_token(routing: &Routing) -> Routing {
    let mut sorted = routing.clone();
    for token in 0..routing.tokens() {
        let mut pairs: Vec<(u32, f32)> = routing.token(token).collect();
        pairs.sort_by_key(|&(expert, _)| expert);
        let range = token * routing.top_k..(token + 1) * routing.top_k;
        sorted.experts[range.clone()]
            .copy_from_slice(&pairs.iter().map(|p| p.0).collect::<Vec<_>>());
        sorted.weights[range].copy_from_slice(&pairs.iter().map(|p| p.1).collect::<Vec<_>>());
    }
    sorted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_routings_up_to_the_models_top_k_match_the_in_process_experts() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let config = fixture.checkpoint.config();
    let num_experts = config.num_experts;
    let cluster = ClusterSandbox::start(&fixture.dir, 3, partly_replicated(&fixture.dir)).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    for &layer in fixture.cases.keys() {
        for top_k in 1..=config.top_k {
            let tokens = rng.random_range(1..20);
            let input = random_rows(&mut rng, tokens, hidden);
            let routing = random_routing(&mut rng, tokens, top_k, num_experts);
            let output = forward_routed(&mut client, layer, &input, hidden, &routing)
                .await
                .unwrap();
            let (routed, _) =
                in_process_parts(&fixture, layer, &input, &sorted_per_token(&routing));
            let error = relative_l2(&output, &routed);
            assert!(
                error < 1e-6,
                "layer {layer} top_k {top_k}: relative L2 {error:e}"
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_routed_tokens_output_does_not_depend_on_its_batch() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let num_experts = fixture.checkpoint.config().num_experts;
    let layer = *fixture.cases.keys().min().unwrap();
    let cluster = ClusterSandbox::start(&fixture.dir, 3, partly_replicated(&fixture.dir)).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(32);
    for _ in 0..12 {
        let top_k = rng.random_range(1..=fixture.checkpoint.config().top_k);
        let victim_tokens = rng.random_range(1..4);
        let victim = random_rows(&mut rng, victim_tokens, hidden);
        let victim_routing = random_routing(&mut rng, victim_tokens, top_k, num_experts);
        let alone = forward_routed(&mut client, layer, &victim, hidden, &victim_routing)
            .await
            .unwrap();

        let others = rng.random_range(1..100);
        let position = rng.random_range(0..=others);
        let mut batch = random_rows(&mut rng, others, hidden);
        batch.splice(position * hidden..position * hidden, victim.iter().copied());
        let mut routing = random_routing(&mut rng, others, top_k, num_experts);
        let at = position * top_k;
        routing
            .experts
            .splice(at..at, victim_routing.experts.iter().copied());
        routing
            .weights
            .splice(at..at, victim_routing.weights.iter().copied());
        let together = forward_routed(&mut client, layer, &batch, hidden, &routing)
            .await
            .unwrap();
        assert_eq!(
            &together[position * hidden..(position + victim_tokens) * hidden],
            &alone[..],
            "victim at {position} of {} tokens, top_k {top_k}",
            others + victim_tokens
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_precision_rows_come_back_in_their_dtype() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = &fixture.cases[&0];
    let tokens = input.len() / hidden;
    let gate = Gate::new(
        fixture.checkpoint.config(),
        fixture.checkpoint.load_gate(0).unwrap(),
    );
    let routing = gate.route(input, tokens);
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 2).await;
    let mut client = cluster.client().await;
    for (dtype, tolerance) in [(WireDtype::Bf16, 2e-2), (WireDtype::F16, 2e-3)] {
        let output = client
            .forward_routed(
                "",
                0,
                encode(input, &[tokens, hidden], dtype),
                routing.experts.clone(),
                routing.weights.clone(),
                routing.top_k as u32,
            )
            .await
            .unwrap();
        assert_eq!(output.dtype, dtype.to_proto() as i32);
        let rows = decode_rows(Some(&output), hidden).unwrap();
        let error = relative_l2(&rows.values, expected);
        assert!(error < tolerance, "{dtype:?}: relative L2 error {error:e}");
    }
    cluster.shutdown().await;
}

fn expect_invalid(result: Result<Vec<f32>, ClientError>, needle: &str) {
    match result {
        Err(ClientError::InvalidArgument(message)) => assert!(
            message.contains(needle),
            "message {message:?} should mention {needle:?}"
        ),
        other => panic!("expected INVALID_ARGUMENT mentioning {needle:?}, got {other:?}"),
    }
}

/// A pre-routed request, and what its refusal must say if it is malformed.
#[derive(Clone)]
struct RoutedCase {
    layer: u32,
    model: &'static str,
    rows: Vec<f32>,
    expert_ids: Vec<u32>,
    weights: Vec<f32>,
    top_k: usize,
    needle: &'static str,
}

async fn send(
    client: &mut Client,
    hidden: usize,
    case: &RoutedCase,
) -> Result<Vec<f32>, ClientError> {
    client
        .forward_routed_f32(
            case.model,
            case.layer,
            &case.rows,
            hidden,
            &case.expert_ids,
            &case.weights,
            case.top_k,
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_routings_are_refused_clearly_and_the_router_keeps_serving() {
    // Qwen2-MoE addresses its shared expert as id 8, right after the 8
    // routed ones: a pre-routed request may not name it.
    let fixture = Fixture::open("qwen2_moe");
    let hidden = fixture.hidden_size();
    let layer = *fixture.cases.keys().min().unwrap();
    let (input, _) = &fixture.cases[&layer];
    let good_rows = input[..2 * hidden].to_vec();
    let good = RoutedCase {
        layer: layer as u32,
        model: "",
        rows: good_rows.clone(),
        expert_ids: vec![0, 1, 2, 3, 4, 5, 6, 7],
        weights: vec![0.25; 8],
        top_k: 4,
        needle: "",
    };
    let mut nan_rows = good_rows.clone();
    nan_rows[hidden + 5] = f32::NAN;
    let cases = [
        RoutedCase {
            expert_ids: vec![0, 1, 2, 3, 4, 5, 6, 8],
            needle: "token 1: expert id 8 is out of range",
            ..good.clone()
        },
        RoutedCase {
            expert_ids: vec![0, 1, 2, 3, 4, 4, 6, 7],
            needle: "token 1: duplicate expert id 4",
            ..good.clone()
        },
        RoutedCase {
            weights: vec![0.25, f32::NAN, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25],
            needle: "token 0: the weight of expert 1 is NaN",
            ..good.clone()
        },
        RoutedCase {
            weights: vec![f32::NEG_INFINITY; 8],
            needle: "is -inf, not a finite number",
            ..good.clone()
        },
        RoutedCase {
            expert_ids: vec![0, 1, 2, 3, 4, 5, 6],
            needle: "expert_ids has 7 entries; 2 tokens with top_k 4 need 8",
            ..good.clone()
        },
        RoutedCase {
            weights: vec![0.25; 9],
            needle: "weights has 9 entries",
            ..good.clone()
        },
        RoutedCase {
            top_k: 0,
            needle: "top_k is 0",
            ..good.clone()
        },
        RoutedCase {
            top_k: 5,
            weights: vec![0.25; 10],
            expert_ids: vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4],
            needle: "top_k 5 exceeds the model's 4 experts per token",
            ..good.clone()
        },
        RoutedCase {
            layer: 0,
            needle: "layer 0 is not served",
            ..good.clone()
        },
        RoutedCase {
            layer: 99,
            needle: "layer 99 is not served",
            ..good.clone()
        },
        RoutedCase {
            model: "other",
            needle: "unknown model \"other\"",
            ..good.clone()
        },
        RoutedCase {
            rows: nan_rows,
            needle: "NaN",
            ..good.clone()
        },
        RoutedCase {
            rows: vec![1e3; 2 * hidden],
            weights: vec![f32::MAX; 8],
            needle: "overflows f32",
            ..good.clone()
        },
    ];
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 1).await;
    let mut client = cluster.client().await;
    let good_output = send(&mut client, hidden, &good).await.unwrap();
    for case in &cases {
        expect_invalid(send(&mut client, hidden, case).await, case.needle);
        // The router still serves correct requests after each bad one.
        assert_eq!(send(&mut client, hidden, &good).await.unwrap(), good_output);
    }
    let empty = RoutedCase {
        rows: Vec::new(),
        expert_ids: Vec::new(),
        weights: Vec::new(),
        ..good.clone()
    };
    assert!(send(&mut client, hidden, &empty).await.unwrap().is_empty());
    cluster.shutdown().await;
}
