//! Input at and past the limits, against live expert nodes and a router on
//! 127.0.0.1: an expert a node does not hold is a stale placement
//! (FAILED_PRECONDITION), a body larger than the model allows is refused
//! before it is buffered, values whose products overflow f32 are an
//! INVALID_ARGUMENT, and each node keeps serving after all of them.

use moemesh_core::model::placement::LayerExpert;
use moemesh_expert_node::service::limits::MAX_ROWS_PER_REQUEST;
use moemesh_expert_node::{ExpertNode, ExpertNodeConfig};
use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::{ComputeRequest, ExpertRows};
use moemesh_proto::{ExpertServiceClient, Tensor};
use moemesh_tests::{ClusterSandbox, Fixture, fixture_dir};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

/// The qwen2_moe fixture: hidden size 64, experts 0 to 7 and the shared
/// expert 8, top-4, MoE layers 1 and 2.
const FIXTURE: &str = "qwen2_moe";
const HIDDEN: usize = 64;

/// An expert node of the fixture holding `experts`, served on 127.0.0.1
/// until the returned sender is dropped or fires.
async fn start_node(
    experts: Vec<LayerExpert>,
) -> (
    ExpertServiceClient<Channel>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ExpertNodeConfig {
        model_dir: fixture_dir(FIXTURE),
        model_id: "test-model".into(),
        experts,
        threads: 1,
        queue_capacity: 8,
        weight_format: Default::default(),
        device: Default::default(),
        memory_budget: None,
        device_memory_budget: None,
        tls: TlsConfig::plaintext(),
        registration: None,
        metrics: Default::default(),
    };
    let node = ExpertNode::start(config, listener).await.unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        node.serve(async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    let client = ExpertServiceClient::connect(url).await.unwrap();
    (client, stop_tx, serving)
}

/// `rows` rows of `value`, each sent to `experts` with weight 1.
fn request(rows: usize, value: f32, experts: &[u32]) -> ComputeRequest {
    ComputeRequest {
        model: String::new(),
        layer: 1,
        rows: Some(encode(
            &vec![value; rows * HIDDEN],
            &[rows, HIDDEN],
            WireDtype::F32,
        )),
        experts: experts
            .iter()
            .map(|&expert| ExpertRows {
                expert,
                rows: (0..rows as u32).collect(),
                weights: vec![1.0; rows],
            })
            .collect(),
    }
}

/// Asserts that the node still computes a good request.
async fn still_serves(client: &mut ExpertServiceClient<Channel>, expert: u32) {
    let reply = client
        .compute(request(2, 0.25, &[expert]))
        .await
        .expect("the node still serves")
        .into_inner();
    let output = decode_rows(reply.output.as_ref(), HIDDEN).unwrap();
    assert_eq!(output.rows, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_answers_failed_precondition_naming_the_expert() {
    let (mut empty, stop_tx, serving) = start_node(Vec::new()).await;
    let status = empty.compute(request(3, 0.25, &[2, 5])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().starts_with(
            "not held: layer 1 expert 2, expert 5; this node holds no expert of layer 1"
        ),
        "{status:?}"
    );
    // Asking for an expert the model does not have is not a stale placement.
    let status = empty.compute(request(1, 0.25, &[9])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("expert 9 does not exist"));
    stop_tx.send(()).unwrap();
    serving.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_larger_than_the_model_allows_are_refused_before_they_are_read() {
    let held = vec![LayerExpert {
        layer: 1,
        expert: 0,
    }];
    let (mut node, stop_tx, serving) = start_node(held).await;
    // The largest legitimate request: the most rows a request may carry,
    // each routed to a full top-4 and the shared expert. Its size passes;
    // the experts are not held here, so it is answered without computing.
    let largest = request(MAX_ROWS_PER_REQUEST, 0.0, &[4, 5, 6, 7, 8]);
    let status = node.compute(largest).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // Sixty megabytes of rows at hidden size 64: within the wire's 256 MiB
    // but far beyond what a request to this model can hold.
    let rows = 4 * MAX_ROWS_PER_REQUEST;
    let oversized = ComputeRequest {
        rows: Some(Tensor {
            dtype: WireDtype::F32.to_proto() as i32,
            shape: vec![rows as u64, HIDDEN as u64],
            data: vec![0u8; rows * HIDDEN * 4].into(),
        }),
        ..request(0, 0.0, &[])
    };
    let status = node.compute(oversized).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains("message length too large"),
        "{status:?}"
    );

    // A request within the byte limit but over the row limit (in bf16).
    let rows = MAX_ROWS_PER_REQUEST + 1;
    let too_many_rows = ComputeRequest {
        rows: Some(encode(
            &vec![0.0; rows * HIDDEN],
            &[rows, HIDDEN],
            WireDtype::Bf16,
        )),
        ..request(0, 0.0, &[])
    };
    let status = node.compute(too_many_rows).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status
            .message()
            .contains("65537 rows; a node takes at most 65536"),
        "{status:?}"
    );

    // A small message naming one row for many experts.
    let fan_out = request(1, 0.25, &[0, 1, 2, 3, 4, 5, 6, 7, 8]);
    let status = node.compute(fan_out).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("9 token-expert pairs to 1 rows"),
        "{status:?}"
    );

    still_serves(&mut node, 0).await;
    stop_tx.send(()).unwrap();
    serving.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_overflow_f32_are_invalid_through_compute() {
    let held = vec![LayerExpert {
        layer: 1,
        expert: 3,
    }];
    let (mut node, stop_tx, serving) = start_node(held).await;
    for value in [1e20, 1e21, 1e30] {
        let mut huge = request(2, 0.5, &[3]);
        huge.rows = Some(encode(
            &[vec![0.5; HIDDEN], vec![value; HIDDEN]].concat(),
            &[2, HIDDEN],
            WireDtype::F32,
        ));
        // A weight that carries an output of 1e20's inputs past f32's range.
        huge.experts[0].weights = vec![1.0, 1e6];
        let status = node.compute(huge).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{value}: {status:?}");
        assert!(
            status
                .message()
                .starts_with("inputs out of range: expert 3 of layer 1 overflows f32 on row 1"),
            "{status:?}"
        );
    }
    still_serves(&mut node, 3).await;
    stop_tx.send(()).unwrap();
    serving.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_that_overflow_f32_are_invalid_through_the_router() {
    let fixture = Fixture::open(FIXTURE);
    let (input, expected) = &fixture.cases[&1];
    let cluster = ClusterSandbox::spread(&fixture.dir, 2, 1).await;
    let mut client = cluster.client().await;
    // 1e20: each expert's output is finite, their sum is not. 1e21: an
    // expert's own products overflow. 1e37 and the largest f32: the gate's
    // logits overflow before any expert is asked.
    for value in [1e20f32, 1e21, 1e37, f32::MAX, -f32::MAX] {
        let huge = encode(&vec![value; 2 * HIDDEN], &[2, HIDDEN], WireDtype::F32);
        let status = client.forward("", 1, huge).await.unwrap_err();
        let message = status.to_string();
        assert!(
            matches!(status, moemesh_client::ClientError::InvalidArgument(_)),
            "{value}: {status:?}"
        );
        assert!(message.contains("out of range"), "{message}");
        let output = client
            .forward_f32("", 1, input, HIDDEN)
            .await
            .expect("the router still serves");
        assert!(moemesh_tests::relative_l2(&output, expected) < 1e-5);
    }
    cluster.shutdown().await;
}
