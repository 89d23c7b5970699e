//! Cluster behaviour: batch invariance, bad input, replicas, dtypes.

use moemesh_client::{ClientError, Timed};
use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_core::model::placement::LayerExpert;
use moemesh_proto::ExpertServiceClient;
use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::v1::{ComputeRequest, ExpertRows, InfoRequest, Tensor};
use moemesh_tests::{ClusterSandbox, FIXTURES, Fixture, partly_replicated, relative_l2};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

fn random_rows(rng: &mut impl Rng, tokens: usize, hidden: usize) -> Vec<f32> {
    (0..tokens * hidden)
        .map(|_| rng.random_range(-2f32..2.0))
        .collect()
}

/// Builds a batch of `others` random tokens with the rows of `victim`
/// inserted together at a random token position.
fn batch_around(
    rng: &mut impl Rng,
    victim: &[f32],
    hidden: usize,
    others: usize,
) -> (Vec<f32>, usize) {
    let position = rng.random_range(0..=others);
    let mut batch = random_rows(rng, others, hidden);
    batch.splice(position * hidden..position * hidden, victim.iter().copied());
    (batch, position)
}

#[test]
fn in_process_output_of_a_token_does_not_depend_on_its_batch() {
    let backend = CpuBackend::new(2).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let hidden = fixture.hidden_size();
        for &layer in fixture.cases.keys() {
            let moe = MoeLayer::load(&fixture.checkpoint, layer, &backend).unwrap();
            for _ in 0..10 {
                let victim = random_rows(&mut rng, 1, hidden);
                let alone = moe.forward(&victim, 1).unwrap();
                let others = rng.random_range(1..150);
                let (batch, position) = batch_around(&mut rng, &victim, hidden, others);
                let together = moe.forward(&batch, others + 1).unwrap();
                assert_eq!(
                    &together[position * hidden..(position + 1) * hidden],
                    &alone[..],
                    "{name} layer {layer}: victim at {position} of {} differs",
                    others + 1
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_output_of_a_request_does_not_depend_on_its_batch() {
    // DeepSeek-V3, and the families whose nodes or routers weight experts
    // differently: Llama 4 (weights scale the input on the nodes),
    // LongCat-Flash (the router adds the zero experts).
    for (name, rounds) in [
        ("deepseek_v3", 12),
        ("llama4_text", 4),
        ("longcat_flash", 4),
    ] {
        a_requests_output_does_not_depend_on_its_batch(name, rounds).await;
    }
}

async fn a_requests_output_does_not_depend_on_its_batch(name: &str, rounds: usize) {
    let fixture = Fixture::open(name);
    let hidden = fixture.hidden_size();
    let layer = *fixture.cases.keys().min().unwrap() as u32;
    let cluster = ClusterSandbox::start(&fixture.dir, 3, partly_replicated(&fixture.dir)).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    for _ in 0..rounds {
        let victim_tokens = rng.random_range(1..4);
        let victim = random_rows(&mut rng, victim_tokens, hidden);
        let alone = client
            .forward_f32("", layer, &victim, hidden)
            .await
            .unwrap();
        let others = rng.random_range(1..100);
        let (batch, position) = batch_around(&mut rng, &victim, hidden, others);
        let together = client.forward_f32("", layer, &batch, hidden).await.unwrap();
        assert_eq!(
            &together[position * hidden..(position + victim_tokens) * hidden],
            &alone[..],
            "{name}"
        );
        // And while other requests run concurrently.
        let mut concurrent = Vec::new();
        for _ in 0..3 {
            let mut other_client = client.clone();
            let other_tokens = rng.random_range(1..64);
            let other = random_rows(&mut rng, other_tokens, hidden);
            concurrent.push(tokio::spawn(async move {
                other_client.forward_f32("", layer, &other, hidden).await
            }));
        }
        let again = client
            .forward_f32("", layer, &victim, hidden)
            .await
            .unwrap();
        assert_eq!(again, alone);
        for task in concurrent {
            task.await.unwrap().unwrap();
        }
    }
    cluster.shutdown().await;
}

fn expect_invalid(result: Result<impl std::fmt::Debug, ClientError>, needle: &str) {
    match result {
        Err(ClientError::InvalidArgument(message)) => {
            assert!(
                message.contains(needle),
                "message {message:?} should mention {needle:?}"
            )
        }
        other => panic!("expected INVALID_ARGUMENT mentioning {needle:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_clearly_and_the_router_keeps_serving() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let (input, expected) = &fixture.cases[&1];
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 1).await;
    let mut client = cluster.client().await;
    let good = encode(&input[..2 * hidden], &[2, hidden], WireDtype::F32);

    let cases: Vec<(Tensor, u32, &str, &str)> = vec![
        (
            encode(&input[..2 * (hidden - 1)], &[2, hidden - 1], WireDtype::F32),
            1,
            "",
            "hidden size is 63, this model's is 64",
        ),
        (
            Tensor {
                dtype: 0,
                ..good.clone()
            },
            1,
            "",
            "dtype is unspecified",
        ),
        (
            Tensor {
                dtype: 9,
                ..good.clone()
            },
            1,
            "",
            "unknown dtype 9",
        ),
        (
            Tensor {
                data: good.data.slice(..good.data.len() - 3),
                ..good.clone()
            },
            1,
            "",
            "needs 512 bytes, got 509",
        ),
        (
            Tensor {
                dtype: WireDtype::Bf16.to_proto() as i32,
                ..good.clone()
            },
            1,
            "",
            "needs 256 bytes, got 512",
        ),
        (
            Tensor {
                shape: vec![2 * hidden as u64],
                ..good.clone()
            },
            1,
            "",
            "2-d",
        ),
        (
            encode(&[f32::NAN; 64], &[1, 64], WireDtype::F32),
            1,
            "",
            "NaN",
        ),
        (
            encode(&[f32::INFINITY; 64], &[1, 64], WireDtype::F32),
            1,
            "",
            "inf",
        ),
        (
            good.clone(),
            1,
            "some-other-model",
            "unknown model \"some-other-model\"",
        ),
        (good.clone(), 0, "", "layer 0 is not served"),
        (good.clone(), 99, "", "layer 99 is not served"),
    ];
    for (tensor, layer, model, needle) in cases {
        expect_invalid(client.forward(model, layer, tensor).await, needle);
        // The router still serves correct requests after each bad one.
        let output = client
            .forward_f32("test-model", 1, input, hidden)
            .await
            .unwrap();
        assert!(relative_l2(&output, expected) < 1e-5);
    }

    let empty = client
        .forward("", 1, encode(&[], &[0, hidden], WireDtype::F32))
        .await
        .unwrap();
    assert_eq!(empty.shape, vec![0, hidden as u64]);
    assert!(empty.data.is_empty());
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_precision_activations_come_back_in_their_dtype() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = &fixture.cases[&0];
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 2).await;
    let mut client = cluster.client().await;
    let tokens = input.len() / hidden;
    for (dtype, tolerance) in [(WireDtype::Bf16, 2e-2), (WireDtype::F16, 2e-3)] {
        let output = client
            .forward("", 0, encode(input, &[tokens, hidden], dtype))
            .await
            .unwrap();
        assert_eq!(output.dtype, dtype.to_proto() as i32);
        let rows = decode_rows(Some(&output), hidden).unwrap();
        let error = relative_l2(&rows.values, expected);
        assert!(error < tolerance, "{dtype:?}: relative L2 error {error:e}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expert_nodes_refuse_malformed_work_and_report_their_load() {
    let fixture = Fixture::open("qwen2_moe");
    let hidden = fixture.hidden_size();
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 1).await;
    let node = &cluster.placement.nodes()[0];
    let held = cluster.placement.experts_of(&node.id);
    let LayerExpert { layer, expert } = held[0];
    let not_held = (0..9)
        .find(|&candidate| {
            !held.contains(&LayerExpert {
                layer,
                expert: candidate,
            })
        })
        .unwrap();
    let mut expert_client = ExpertServiceClient::connect(node.address.clone())
        .await
        .unwrap();
    let rows = encode(&vec![0.25; 3 * hidden], &[3, hidden], WireDtype::F32);
    let request = |experts: Vec<ExpertRows>| ComputeRequest {
        model: "test-model".into(),
        layer: layer as u32,
        rows: Some(rows.clone()),
        experts,
    };
    let work = |expert, rows: Vec<u32>, weights: Vec<f32>| ExpertRows {
        expert,
        rows,
        weights,
    };
    let cases = vec![
        (
            request(vec![work(expert, vec![0, 3], vec![1.0, 1.0])]),
            "row index 3 is out of range for 3 rows",
        ),
        (
            request(vec![work(expert, vec![1, 0], vec![1.0, 1.0])]),
            "strictly increasing",
        ),
        (
            request(vec![work(expert, vec![0, 1], vec![1.0])]),
            "2 rows but 1 weights",
        ),
        (
            request(vec![work(expert, vec![0], vec![f32::NAN])]),
            "not finite",
        ),
        (
            ComputeRequest {
                layer: 0,
                ..request(vec![])
            },
            "layer 0 has no MoE block",
        ),
        (
            ComputeRequest {
                model: "other".into(),
                ..request(vec![])
            },
            "unknown model",
        ),
    ];
    for (bad, needle) in cases {
        let status = expert_client.compute(bad).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{needle}: {status:?}"
        );
        assert!(
            status.message().contains(needle),
            "{:?} should mention {needle:?}",
            status.message()
        );
    }
    // An expert the node does not hold: a stale placement, not a bad request.
    let status = expert_client
        .compute(request(vec![work(not_held, vec![0], vec![1.0])]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let prefix = format!("not held: layer {layer} expert {not_held}");
    assert!(status.message().starts_with(&prefix), "{status:?}");
    let reply = expert_client
        .compute(request(vec![work(expert, vec![0, 2], vec![0.5, 1.0])]))
        .await
        .unwrap();
    // One answer row per assigned row: rows 0 and 2, weighted 0.5 and 1.0.
    let output = decode_rows(reply.into_inner().output.as_ref(), hidden).unwrap();
    assert_eq!(output.rows, 2);
    let doubled = expert_client
        .compute(request(vec![work(expert, vec![0, 2], vec![1.0, 1.0])]))
        .await
        .unwrap();
    let doubled = decode_rows(doubled.into_inner().output.as_ref(), hidden).unwrap();
    assert_eq!(&output.values[hidden..], &doubled.values[hidden..]);
    for (half, full) in output.values[..hidden]
        .iter()
        .zip(&doubled.values[..hidden])
    {
        assert_eq!(*half, full * 0.5);
    }
    let info = expert_client
        .info(InfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.family, "qwen2_moe");
    assert_eq!(info.hidden_size as usize, hidden);
    let load = info
        .load
        .iter()
        .find(|entry| (entry.layer as usize, entry.expert) == (layer, expert))
        .unwrap();
    assert_eq!(load.tokens, 4);
    assert!(info.weight_bytes > 0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_serves_and_results_agree() {
    // With two replicas of everything on three nodes, tokens spread over
    // replicas; the output still matches transformers for every token.
    let fixture = Fixture::open("qwen3_moe_f16");
    let hidden = fixture.hidden_size();
    let (input, expected) = &fixture.cases[&0];
    let cluster = ClusterSandbox::spread(&fixture.dir, 3, 2).await;
    let mut client = cluster.client().await;
    let mut order: Vec<usize> = (0..input.len() / hidden).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(3));
    let shuffled: Vec<f32> = order
        .iter()
        .flat_map(|&token| input[token * hidden..(token + 1) * hidden].to_vec())
        .collect();
    let output = client.forward_f32("", 0, &shuffled, hidden).await.unwrap();
    let unshuffled_expected: Vec<f32> = order
        .iter()
        .flat_map(|&token| expected[token * hidden..(token + 1) * hidden].to_vec())
        .collect();
    assert!(relative_l2(&output, &unshuffled_expected) < 1e-5);
    let mut nodes_used = 0;
    for node in cluster.placement.nodes() {
        let mut expert_client = ExpertServiceClient::connect(node.address.clone())
            .await
            .unwrap();
        let info = expert_client
            .info(InfoRequest {})
            .await
            .unwrap()
            .into_inner();
        if info.load.iter().any(|entry| entry.tokens > 0) {
            nodes_used += 1;
        }
    }
    assert_eq!(nodes_used, 3, "every node should have served some tokens");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_say_how_long_the_slowest_node_computed() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let cluster = ClusterSandbox::start(&fixture.dir, 2, partly_replicated(&fixture.dir)).await;
    let mut client = cluster.client().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let input = random_rows(&mut rng, 64, hidden);
    let started = std::time::Instant::now();
    let Timed {
        output,
        expert_compute: compute,
    } = client
        .forward_f32_timed("", 0, &input, hidden)
        .await
        .unwrap();
    let latency = started.elapsed();
    assert_eq!(output.len(), input.len());
    assert!(
        compute > std::time::Duration::ZERO,
        "no compute time reported"
    );
    assert!(
        compute < latency,
        "compute {compute:?} exceeds latency {latency:?}"
    );
    cluster.shutdown().await;
}
