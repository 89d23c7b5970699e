//! The service's refusals: each names what is wrong, under the code that
//! tells the caller whether to retry elsewhere.

use moemesh_core::compute::CpuBackend;
use moemesh_proto::ExpertService;
use moemesh_proto::tls::TlsConfig;
use tonic::Code;

use super::*;

const HIDDEN: usize = 64;

/// A node of the qwen2_moe fixture (8 routed experts, top-4, a shared
/// expert as 8; MoE layers 1 and 2) holding `experts` of layer 1.
fn node(experts: &[u32]) -> ExpertNodeService {
    let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/qwen2_moe");
    let checkpoint = Arc::new(Checkpoint::open(fixture.as_ref()).unwrap());
    let config = ExpertNodeConfig {
        model_dir: fixture.into(),
        model_id: "test-model".into(),
        experts: experts
            .iter()
            .map(|&expert| LayerExpert { layer: 1, expert })
            .collect(),
        threads: 1,
        queue_capacity: 4,
        weight_format: Default::default(),
        device: Default::default(),
        memory_budget: None,
        device_memory_budget: None,
        tls: TlsConfig::plaintext(),
        registration: None,
        metrics: Default::default(),
    };
    ExpertNodeService::load(checkpoint, Arc::new(CpuBackend::new(1).unwrap()), &config).unwrap()
}

fn request(rows: usize, value: f32, experts: Vec<ExpertRows>) -> ComputeRequest {
    ComputeRequest {
        model: String::new(),
        layer: 1,
        rows: Some(encode(
            &vec![value; rows * HIDDEN],
            &[rows, HIDDEN],
            WireDtype::F32,
        )),
        experts,
    }
}

fn work(expert: u32, rows: Vec<u32>, weight: f32) -> ExpertRows {
    ExpertRows {
        expert,
        weights: vec![weight; rows.len()],
        rows,
    }
}

async fn refusal(node: &ExpertNodeService, request: ComputeRequest) -> Status {
    node.compute(Request::new(request)).await.unwrap_err()
}

#[tokio::test]
async fn an_expert_of_the_model_that_the_node_does_not_hold_is_a_failed_precondition() {
    let node = node(&[0, 1]);
    let status = refusal(&node, request(2, 0.5, vec![work(2, vec![0, 1], 1.0)])).await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("not held: layer 1 expert 2; this node holds experts [0, 1] of layer 1"),
        "{status:?}"
    );
    // Every missing expert is named, held ones are not.
    let status = refusal(
        &node,
        request(
            1,
            0.5,
            vec![
                work(0, vec![0], 1.0),
                work(3, vec![0], 1.0),
                work(8, vec![0], 1.0),
            ],
        ),
    )
    .await;
    assert!(
        status.message().starts_with(
            "not held: layer 1 expert 3, expert 8; this node holds experts [0, 1] of layer 1"
        ),
        "{status:?}"
    );
    // A layer the node holds nothing of.
    let status = refusal(
        &node,
        ComputeRequest {
            layer: 2,
            ..request(1, 0.5, vec![work(0, vec![0], 1.0)])
        },
    )
    .await;
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status
            .message()
            .starts_with("not held: layer 2 expert 0; this node holds no expert of layer 2"),
        "{status:?}"
    );
}

#[tokio::test]
async fn what_the_model_does_not_have_is_an_invalid_argument() {
    let node = node(&[0, 1]);
    let cases = [
        (
            request(1, 0.5, vec![work(9, vec![0], 1.0)]),
            "expert 9 does not exist: this model's layers have experts 0 to 8 (8 is the shared expert)",
        ),
        (
            ComputeRequest {
                layer: 0,
                ..request(1, 0.5, vec![work(0, vec![0], 1.0)])
            },
            "layer 0 has no MoE block in this model (its MoE layers are [1, 2])",
        ),
        (
            ComputeRequest {
                layer: 7,
                ..request(1, 0.5, vec![])
            },
            "layer 7 has no MoE block",
        ),
        // Malformed work is refused as such even for an expert not held.
        (
            request(1, 0.5, vec![work(5, vec![0, 1], 1.0)]),
            "row index 1 is out of range for 1 rows",
        ),
    ];
    for (bad, needle) in cases {
        let status = refusal(&node, bad).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
}

#[tokio::test]
async fn sizes_are_checked_before_the_rows_are_decoded() {
    let node = node(&[0, 1, 2, 3, 4, 5, 6, 7, 8]);
    // One row sent to all nine experts: a token has at most top-4 and
    // the shared expert, and a small message must not buy Σ rows × hidden
    // floats of output.
    let everything = (0..9).map(|expert| work(expert, vec![0], 1.0)).collect();
    let status = refusal(&node, request(1, 0.5, everything)).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(
            "9 token-expert pairs to 1 rows; this model routes a token to at most 5 experts"
        ),
        "{status:?}"
    );
    // More tokens than one request may carry.
    let rows = limits::MAX_ROWS_PER_REQUEST + 1;
    let status = refusal(&node, request(rows, 0.0, vec![])).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "request too large: {rows} rows; a node takes at most 65536 rows"
        )),
        "{status:?}"
    );
    // The node still computes good work.
    let reply = node
        .compute(Request::new(request(
            2,
            0.5,
            vec![work(0, vec![0, 1], 1.0)],
        )))
        .await
        .unwrap();
    let output = decode_rows(reply.into_inner().output.as_ref(), HIDDEN).unwrap();
    assert_eq!(output.rows, 2);
}

#[tokio::test]
async fn inputs_that_overflow_f32_are_invalid_arguments() {
    let node = node(&[0, 1]);
    // Inputs whose products overflow, and finite routing weights that
    // carry a finite output past f32's range.
    for (value, weight) in [(1e21, 1.0), (1e19, 1e30), (1e3, f32::MAX)] {
        let status = refusal(&node, request(2, value, vec![work(1, vec![0, 1], weight)])).await;
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{value} × {weight}: {status:?}"
        );
        assert!(
            status
                .message()
                .starts_with("inputs out of range: expert 1 of layer 1 overflows f32 on row 0"),
            "{status:?}"
        );
    }
    let reply = node
        .compute(Request::new(request(1, 1e3, vec![work(1, vec![0], 1.0)])))
        .await
        .unwrap();
    let output = decode_rows(reply.into_inner().output.as_ref(), HIDDEN).unwrap();
    assert!(output.values.iter().all(|value| value.is_finite()));
}
