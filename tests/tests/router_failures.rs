//! How a router meets expert nodes that fail: a stale replica (a node that
//! restarted empty under the same id) has its share served by another
//! replica, a request error goes back to the client at once without
//! marking any node, a replica that hangs leaves time for another to
//! answer, and no `grpc-timeout` header, however large, brings a router
//! down.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use moemesh_client::ClientError;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::{LayerEntry, LayerExpert, NodeEntry, PlacementFile};
use moemesh_proto::v1::{
    ComputeRequest, ComputeResponse, ForwardRequest, InfoRequest, InfoResponse,
};
use moemesh_proto::{ExpertService, ExpertServiceClient, ExpertServiceServer, RouterServiceClient};
use moemesh_tests::{ClusterSandbox, Fixture, SandboxNode, relative_l2};
use tonic::service::Routes;
use tonic::{Code, Request, Response, Status};

/// How a fake expert node answers `Compute`.
#[derive(Clone)]
enum FakeAnswer {
    /// Never: the call waits until the caller gives up.
    Hang,
    /// Fails with this code and message.
    Fail(Code, String),
}

/// An expert node that answers every `Compute` as told and remembers the
/// experts each call asked for.
struct FakeExpertNode {
    answer: Mutex<FakeAnswer>,
    calls: Mutex<Vec<Vec<u32>>>,
}

impl FakeExpertNode {
    fn new(answer: FakeAnswer) -> Arc<Self> {
        Arc::new(Self {
            answer: Mutex::new(answer),
            calls: Mutex::new(Vec::new()),
        })
    }

    fn answer(&self, answer: FakeAnswer) {
        *self.answer.lock().unwrap() = answer;
    }

    /// The experts of every call so far, one list per call.
    fn calls(&self) -> Vec<Vec<u32>> {
        self.calls.lock().unwrap().clone()
    }

    /// The node as a sandbox node.
    fn serving(self: &Arc<Self>) -> SandboxNode {
        let service = FakeExpertService(Arc::clone(self));
        SandboxNode::Serving(Routes::new(ExpertServiceServer::new(service)))
    }
}

struct FakeExpertService(Arc<FakeExpertNode>);

#[tonic::async_trait]
impl ExpertService for FakeExpertService {
    async fn compute(
        &self,
        request: Request<ComputeRequest>,
    ) -> Result<Response<ComputeResponse>, Status> {
        let experts = request.get_ref().experts.iter().map(|rows| rows.expert);
        self.0.calls.lock().unwrap().push(experts.collect());
        let answer = self.0.answer.lock().unwrap().clone();
        match answer {
            FakeAnswer::Hang => std::future::pending().await,
            FakeAnswer::Fail(code, message) => Err(Status::new(code, message)),
        }
    }

    async fn info(&self, _request: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Err(Status::unimplemented("a fake expert node"))
    }
}

/// Every routed expert of every MoE layer.
fn every_expert(config: &ModelConfig) -> Vec<LayerExpert> {
    config
        .moe_layers()
        .into_iter()
        .flat_map(|layer| {
            (0..config.num_experts as u32).map(move |expert| LayerExpert { layer, expert })
        })
        .collect()
}

/// A placement of a model without shared experts: per MoE layer, which of
/// `nodes` (by index) hold every expert of it.
fn place_layers(
    config: &ModelConfig,
    holders: impl Fn(usize) -> Vec<usize>,
) -> impl FnOnce(Vec<NodeEntry>) -> PlacementFile {
    let layers = config.moe_layers();
    let experts = config.num_experts;
    move |nodes| PlacementFile {
        model: None,
        layers: layers
            .into_iter()
            .map(|layer| {
                let owners: Vec<String> = holders(layer)
                    .into_iter()
                    .map(|node| nodes[node].id.clone())
                    .collect();
                LayerEntry {
                    layer,
                    experts: vec![owners; experts],
                    shared: Vec::new(),
                }
            })
            .collect(),
        nodes,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_empty_has_its_share_served_by_another_replica() {
    let fixture = Fixture::open("mixtral");
    let config = fixture.checkpoint.config().clone();
    let hidden = fixture.hidden_size();
    // expert-0 restarted empty; the placement still lists it for every
    // expert: beside expert-1 in layer 0, alone in layer 1.
    let nodes = vec![
        SandboxNode::Holding(Vec::new()),
        SandboxNode::Holding(every_expert(&config)),
    ];
    let place = place_layers(
        &config,
        |layer| if layer == 0 { vec![0, 1] } else { vec![0] },
    );
    let cluster = ClusterSandbox::start_serving(&fixture.dir, nodes, place).await;
    let mut client = cluster.client().await;

    let (input, expected) = &fixture.cases[&0];
    for _ in 0..2 {
        let output = client.forward_f32("", 0, input, hidden).await.unwrap();
        assert!(relative_l2(&output, expected) < 1e-5);
    }
    let (input, _) = &fixture.cases[&1];
    match client.forward_f32("", 1, input, hidden).await {
        Err(ClientError::Unavailable(message)) => {
            assert!(message.contains("layer 1 experts"), "{message}");
            assert!(message.contains("no other replica holds them"), "{message}");
            assert!(message.contains("expert-0"), "{message}");
        }
        other => panic!("expected UNAVAILABLE naming the layer, got {other:?}"),
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_keeps_serving_the_experts_it_holds() {
    let fixture = Fixture::open("mixtral");
    let config = fixture.checkpoint.config().clone();
    let hidden = fixture.hidden_size();
    // expert-0 restarted and has loaded layer 1 again, not yet layer 0.
    let layer_1: Vec<LayerExpert> = every_expert(&config)
        .into_iter()
        .filter(|expert| expert.layer == 1)
        .collect();
    let nodes = vec![
        SandboxNode::Holding(layer_1),
        SandboxNode::Holding(every_expert(&config)),
    ];
    let cluster =
        ClusterSandbox::start_serving(&fixture.dir, nodes, place_layers(&config, |_| vec![0, 1]))
            .await;
    let mut client = cluster.client().await;
    for layer in [0, 1] {
        let (input, expected) = &fixture.cases[&layer];
        let output = client
            .forward_f32("", layer as u32, input, hidden)
            .await
            .unwrap();
        assert!(relative_l2(&output, expected) < 1e-5, "layer {layer}");
    }
    // The node that lacked layer 0 is alive: it computed its share of layer 1.
    let address = cluster.placement.nodes()[0].address.clone();
    let mut restarted = ExpertServiceClient::connect(address).await.unwrap();
    let info = restarted.info(InfoRequest {}).await.unwrap().into_inner();
    let layer_1_tokens: u64 = info
        .load
        .iter()
        .filter(|load| load.layer == 1)
        .map(|load| load.tokens)
        .sum();
    assert!(layer_1_tokens > 0, "{info:?}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_replica_is_avoided_for_the_experts_it_lacks() {
    let fixture = Fixture::open("mixtral");
    let config = fixture.checkpoint.config().clone();
    let hidden = fixture.hidden_size();
    let stale = FakeExpertNode::new(FakeAnswer::Fail(
        Code::FailedPrecondition,
        "not held: layer 0 is not loaded on this node".into(),
    ));
    let nodes = vec![stale.serving(), SandboxNode::Holding(every_expert(&config))];
    let cluster =
        ClusterSandbox::start_serving(&fixture.dir, nodes, place_layers(&config, |_| vec![0, 1]))
            .await;
    let mut client = cluster.client().await;
    let (input, expected) = &fixture.cases[&0];

    let output = client.forward_f32("", 0, input, hidden).await.unwrap();
    assert!(relative_l2(&output, expected) < 1e-5);
    let first_calls = stale.calls();
    assert_eq!(first_calls.len(), 1, "the stale node is tried once");
    let lacking: BTreeSet<u32> = first_calls[0].iter().copied().collect();

    let output = client.forward_f32("", 0, input, hidden).await.unwrap();
    assert!(relative_l2(&output, expected) < 1e-5);
    for later in &stale.calls()[1..] {
        assert!(
            later.iter().all(|expert| !lacking.contains(expert)),
            "asked again for {later:?} after lacking {lacking:?}"
        );
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_error_reaches_the_client_at_once_and_marks_no_node() {
    let fixture = Fixture::open("mixtral");
    let config = fixture.checkpoint.config().clone();
    let hidden = fixture.hidden_size();
    // What tonic reports when a reply is over the router's message limit.
    let too_large = "Error, decoded message length too large: found 300000000 bytes, the \
                     limit is: 268435456 bytes";
    let rejecting = FakeExpertNode::new(FakeAnswer::Fail(Code::OutOfRange, too_large.into()));
    let nodes = vec![
        rejecting.serving(),
        SandboxNode::Holding(every_expert(&config)),
    ];
    let cluster =
        ClusterSandbox::start_serving(&fixture.dir, nodes, place_layers(&config, |_| vec![0, 1]))
            .await;
    let mut client = cluster.client().await;
    let (input, _) = &fixture.cases[&0];

    // Each forward tries the node once and fails with its code; the node
    // stays in use, so the next forward tries it again.
    for forwards in 1..=2 {
        match client.forward_f32("", 0, input, hidden).await {
            Err(ClientError::Other {
                code: Code::OutOfRange,
                message,
            }) => {
                assert!(message.contains("expert-0"), "{message}");
                assert!(message.contains("the limit is"), "{message}");
            }
            other => panic!("expected OUT_OF_RANGE, got {other:?}"),
        }
        assert_eq!(rejecting.calls().len(), forwards, "no retry, no avoidance");
    }
    let invalid = "expert 3: routing weight NaN is not finite";
    rejecting.answer(FakeAnswer::Fail(Code::InvalidArgument, invalid.into()));
    match client.forward_f32("", 0, input, hidden).await {
        Err(ClientError::InvalidArgument(message)) => {
            assert!(message.contains(invalid), "{message}")
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }
    assert_eq!(rejecting.calls().len(), 3);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_hangs_leaves_time_for_another_to_answer() {
    let fixture = Fixture::open("mixtral");
    let config = fixture.checkpoint.config().clone();
    let hidden = fixture.hidden_size();
    let hanging = FakeExpertNode::new(FakeAnswer::Hang);
    let nodes = vec![
        hanging.serving(),
        SandboxNode::Holding(every_expert(&config)),
    ];
    let cluster =
        ClusterSandbox::start_serving(&fixture.dir, nodes, place_layers(&config, |_| vec![0, 1]))
            .await;
    let mut client = cluster.client().await.with_deadline(Duration::from_secs(6));
    let (input, expected) = &fixture.cases[&0];
    let output = client.forward_f32("", 0, input, hidden).await.unwrap();
    assert!(relative_l2(&output, expected) < 1e-5);
    assert!(!hanging.calls().is_empty(), "the hanging node had a share");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_grpc_timeout_headers_do_not_bring_a_router_down() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let cluster = ClusterSandbox::spread(&fixture.dir, 1, 1).await;
    let (input, expected) = &fixture.cases[&0];
    let mut client = cluster.client().await;
    let mut router = RouterServiceClient::connect(cluster.router_url.clone())
        .await
        .unwrap();
    let tokens = input.len() / hidden;
    for unit in ["H", "M", "S", "m", "u", "n"] {
        let mut request = Request::new(ForwardRequest {
            model: String::new(),
            layer: 0,
            hidden: Some(moemesh_proto::codec::encode(
                input,
                &[tokens, hidden],
                moemesh_proto::codec::WireDtype::F32,
            )),
        });
        let header = format!("{}{unit}", u64::MAX);
        request
            .metadata_mut()
            .insert("grpc-timeout", header.parse().unwrap());
        let reply = router.forward(request).await;
        assert!(reply.is_ok(), "{header}: {reply:?}");
    }
    let output = client.forward_f32("", 0, input, hidden).await.unwrap();
    assert!(relative_l2(&output, expected) < 1e-5);
    cluster.shutdown().await;
}
