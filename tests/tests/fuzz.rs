//! Property tests against a live cluster: arbitrary requests never crash
//! or wedge a router or an expert node (they answer, with INVALID_ARGUMENT
//! when the request is bad), and no request can change another's output.
//!
//! Each property runs a few dozen generated cases against one sandbox
//! cluster; raise PROPTEST_CASES to fuzz longer.

use moemesh_proto::v1::{ComputeRequest, ExpertRows, ForwardRequest, Tensor};
use moemesh_proto::{ExpertServiceClient, RouterServiceClient};
use moemesh_tests::{ClusterSandbox, Fixture, partly_replicated};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message;
use tonic::Code;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(48)
}

/// Tensors of any dtype and shape, with data that may or may not match
/// the shape, holding any bit patterns (NaN and infinities included).
fn tensor(hidden: usize) -> impl Strategy<Value = Tensor> {
    (
        0i32..5,
        prop::collection::vec(0u64..9, 0..4),
        prop_oneof![Just(hidden as u64), 0u64..200],
        prop::collection::vec(any::<u8>(), 0..2048),
        any::<bool>(),
    )
        .prop_map(move |(dtype, mut shape, width, mut data, exact)| {
            if shape.len() == 2 {
                shape[1] = width;
            }
            if exact {
                // Make the byte count match the shape for the dtype.
                let elements: u64 = shape.iter().product();
                let size = if dtype == 0 { 4 } else { 2 };
                data.resize((elements as usize * size).min(1 << 16), 0x7f);
            }
            Tensor {
                dtype,
                shape,
                data: data.into(),
            }
        })
}

/// A request the router must answer: served, or refused as invalid (or,
/// from an expert node, as naming an expert it does not hold).
fn accepted_codes(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument | Code::NotFound | Code::ResourceExhausted | Code::FailedPrecondition
    )
}

#[test]
fn arbitrary_requests_are_answered_and_never_wedge_a_node() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = Fixture::open("qwen2_moe");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&1].clone();
    let cluster = runtime.block_on(ClusterSandbox::start(
        &fixture.dir,
        2,
        partly_replicated(&fixture.dir),
    ));
    let node_url = cluster.placement.nodes()[0].address.clone();
    let (router, node) = runtime.block_on(async {
        (
            RouterServiceClient::connect(cluster.router_url.clone())
                .await
                .unwrap()
                .max_decoding_message_size(moemesh_proto::MAX_MESSAGE_BYTES),
            ExpertServiceClient::connect(node_url).await.unwrap(),
        )
    });
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });

    // Forward requests: any model name, layer and tensor.
    let forward = (
        prop_oneof![
            Just(String::new()),
            Just("test-model".to_string()),
            ".{0,12}"
        ],
        0u32..4,
        prop::option::of(tensor(hidden)),
    );
    runner
        .run(&forward, |(model, layer, hidden_tensor)| {
            let request = ForwardRequest {
                model,
                layer,
                hidden: hidden_tensor,
            };
            let result = runtime.block_on(router.clone().forward(request));
            if let Err(status) = result {
                prop_assert!(accepted_codes(status.code()), "{status:?}");
                prop_assert!(!status.message().is_empty());
            }
            Ok(())
        })
        .unwrap();

    // Compute requests straight to an expert node: any experts, rows,
    // weights (NaN included) and tensor.
    let experts = prop::collection::vec(
        (
            0u32..12,
            prop::collection::vec(0u32..40, 0..6),
            prop::collection::vec(any::<f32>(), 0..6),
        ),
        0..4,
    );
    let compute = (0u32..4, prop::option::of(tensor(hidden)), experts);
    runner
        .run(&compute, |(layer, rows, experts)| {
            let request = ComputeRequest {
                model: String::new(),
                layer,
                rows,
                experts: experts
                    .into_iter()
                    .map(|(expert, rows, weights)| ExpertRows {
                        expert,
                        rows,
                        weights,
                    })
                    .collect(),
            };
            let result = runtime.block_on(node.clone().compute(request));
            if let Err(status) = result {
                prop_assert!(accepted_codes(status.code()), "{status:?}");
            }
            Ok(())
        })
        .unwrap();

    // Arbitrary bytes as a message: decoding fails cleanly or yields a
    // request the router answers.
    runner
        .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
            if let Ok(request) = ForwardRequest::decode(&bytes[..])
                && let Err(status) = runtime.block_on(router.clone().forward(request))
            {
                prop_assert!(accepted_codes(status.code()), "{status:?}");
            }
            Ok(())
        })
        .unwrap();

    // Both still serve correctly.
    let mut client = runtime.block_on(cluster.client());
    let output = runtime
        .block_on(client.forward_f32("", 1, &input, hidden))
        .unwrap();
    assert!(moemesh_tests::relative_l2(&output, &expected) < 1e-5);
    runtime.block_on(cluster.shutdown());
}

/// Batch isolation: a victim request's output is bit-identical whatever
/// is batched with it and wherever it sits in the batch.
#[test]
fn a_requests_output_never_depends_on_its_batch() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let cluster = runtime.block_on(ClusterSandbox::start(
        &fixture.dir,
        3,
        partly_replicated(&fixture.dir),
    ));
    let client = runtime.block_on(cluster.client());
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let values = |rows: usize| prop::collection::vec(-3.0f32..3.0, rows * hidden);
    let case = (1usize..4, 0usize..48).prop_flat_map(move |(victim_rows, other_rows)| {
        (values(victim_rows), values(other_rows), 0..=other_rows)
    });
    runner
        .run(&case, |(victim, others, position)| {
            let alone = runtime
                .block_on(client.clone().forward_f32("", 1, &victim, hidden))
                .unwrap();
            let mut batch = others.clone();
            batch.splice(position * hidden..position * hidden, victim.iter().copied());
            let together = runtime
                .block_on(client.clone().forward_f32("", 1, &batch, hidden))
                .unwrap();
            prop_assert_eq!(
                &together[position * hidden..position * hidden + victim.len()],
                &alone[..]
            );
            Ok(())
        })
        .unwrap();
    runtime.block_on(cluster.shutdown());
}
