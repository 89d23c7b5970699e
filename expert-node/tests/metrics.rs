//! An expert node's metrics as Prometheus scrapes them: Compute calls over
//! gRPC on 127.0.0.1, then the registry encoded as Prometheus text, with
//! every call counted under its code and the work it did counted once.

use moemesh_core::model::placement::LayerExpert;
use moemesh_expert_node::{ExpertMetrics, ExpertNode, ExpertNodeConfig};
use moemesh_proto::ExpertServiceClient;
use moemesh_proto::codec::{WireDtype, encode};
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::{ComputeRequest, ExpertRows};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

/// The qwen2_moe fixture: hidden size 64, experts 0 to 7 and the shared
/// expert 8, top-4, MoE layers 1 and 2.
const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen2_moe");
const HIDDEN: usize = 64;
const F32_BYTES: usize = 4;

/// A node of the fixture holding experts 0 and 1 of layer 1 with the
/// resident budget `memory_budget`, counting into a fresh registry.
async fn start_node(
    memory_budget: Option<u64>,
) -> (Registry, ExpertServiceClient<Channel>, oneshot::Sender<()>) {
    let mut registry = Registry::with_prefix("moemesh");
    let metrics = ExpertMetrics::register(&mut registry);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = ExpertNodeConfig {
        model_dir: FIXTURE.into(),
        model_id: "test-model".into(),
        experts: [0, 1]
            .into_iter()
            .map(|expert| LayerExpert { layer: 1, expert })
            .collect(),
        threads: 1,
        queue_capacity: 8,
        weight_format: Default::default(),
        device: Default::default(),
        memory_budget,
        device_memory_budget: None,
        tls: TlsConfig::plaintext(),
        registration: None,
        metrics,
    };
    let node = ExpertNode::start(config, listener).await.unwrap();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        node.serve(async move {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    });
    let client = ExpertServiceClient::connect(url).await.unwrap();
    (registry, client, stop_tx)
}

/// `rows` rows of layer `layer`, each sent to every one of `experts`.
fn request(layer: u32, rows: usize, experts: &[u32]) -> ComputeRequest {
    ComputeRequest {
        model: String::new(),
        layer,
        rows: Some(encode(
            &vec![0.25; rows * HIDDEN],
            &[rows, HIDDEN],
            WireDtype::F32,
        )),
        experts: experts
            .iter()
            .map(|&expert| ExpertRows {
                expert,
                rows: (0..rows as u32).collect(),
                weights: vec![0.5; rows],
            })
            .collect(),
    }
}

/// The registry as a scrape of `/metrics` returns it.
fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

fn assert_lines(text: &str, expected: &[String]) {
    for line in expected {
        assert!(
            text.lines().any(|candidate| candidate == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn compute_calls_are_counted_by_code_and_their_work_once() {
    let (registry, mut client, _stop) = start_node(None).await;
    // Before any call: the experts loaded at start are resident.
    assert_lines(
        &scrape(&registry),
        &[
            "moemesh_expert_resident_experts 2".into(),
            "moemesh_expert_tokens_total 0".into(),
        ],
    );

    client.compute(request(1, 3, &[0, 1])).await.unwrap();
    let not_held = client.compute(request(1, 2, &[2])).await.unwrap_err();
    assert_eq!(not_held.code(), Code::FailedPrecondition, "{not_held:?}");
    let no_moe_layer = client.compute(request(0, 1, &[0])).await.unwrap_err();
    assert_eq!(
        no_moe_layer.code(),
        Code::InvalidArgument,
        "{no_moe_layer:?}"
    );

    let text = scrape(&registry);
    let received = (3 + 2 + 1) * HIDDEN * F32_BYTES;
    // Three rows, each computed by two experts.
    let sent = 3 * 2 * HIDDEN * F32_BYTES;
    assert_lines(
        &text,
        &[
            "moemesh_expert_requests_total{code=\"ok\"} 1".into(),
            "moemesh_expert_requests_total{code=\"failed_precondition\"} 1".into(),
            "moemesh_expert_requests_total{code=\"invalid_argument\"} 1".into(),
            "moemesh_expert_tokens_total 3".into(),
            "moemesh_expert_pairs_total 6".into(),
            // Only the accepted call reached the worker.
            "moemesh_expert_compute_seconds_count 1".into(),
            "moemesh_expert_request_seconds_count 3".into(),
            "moemesh_expert_queue_depth 0".into(),
            "moemesh_expert_in_flight 0".into(),
            format!("moemesh_expert_bytes_received_total {received}"),
            format!("moemesh_expert_bytes_sent_total {sent}"),
            // No budget: both experts the call needed were resident.
            "moemesh_expert_buffer_hits_total 2".into(),
            "moemesh_expert_buffer_misses_total 0".into(),
            "moemesh_expert_resident_experts 2".into(),
            // A node without coordinators follows no placement.
            "moemesh_placement_epoch 0".into(),
        ],
    );
    assert!(
        text.contains("# TYPE moemesh_expert_compute_seconds histogram"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[tokio::test]
async fn experts_beyond_the_budget_are_counted_as_misses() {
    // One byte holds no expert: each is streamed in for the call needing it.
    let (registry, mut client, _stop) = start_node(Some(1)).await;
    client.compute(request(1, 2, &[0, 1])).await.unwrap();
    client.compute(request(1, 1, &[1])).await.unwrap();
    assert_lines(
        &scrape(&registry),
        &[
            "moemesh_expert_requests_total{code=\"ok\"} 2".into(),
            "moemesh_expert_buffer_hits_total 0".into(),
            "moemesh_expert_buffer_misses_total 3".into(),
            "moemesh_expert_resident_experts 0".into(),
            "moemesh_expert_tokens_total 3".into(),
            "moemesh_expert_compute_seconds_count 2".into(),
        ],
    );
}

#[tokio::test]
async fn a_call_the_worker_refuses_is_timed_but_computes_no_tokens() {
    let (registry, mut client, _stop) = start_node(None).await;
    // Valid on arrival; the worker finds that its outputs overflow f32.
    let mut overflowing = request(1, 2, &[0]);
    overflowing.rows = Some(encode(
        &vec![1e21; 2 * HIDDEN],
        &[2, HIDDEN],
        WireDtype::F32,
    ));
    let status = client.compute(overflowing).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_lines(
        &scrape(&registry),
        &[
            "moemesh_expert_requests_total{code=\"invalid_argument\"} 1".into(),
            "moemesh_expert_compute_seconds_count 1".into(),
            "moemesh_expert_tokens_total 0".into(),
            "moemesh_expert_pairs_total 0".into(),
            "moemesh_expert_bytes_sent_total 0".into(),
            "moemesh_expert_buffer_hits_total 1".into(),
        ],
    );
}
