//! One coordinator on 127.0.0.1:0, reached over gRPC as expert nodes and
//! operators reach it: a node that comes back under the same id without
//! its experts gets them back as loading replicas (routers leave them
//! until it reports them ready again), replicas of one expert stay in one
//! compute format, and a node names its weight format when it registers.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{CoordinatorConfig, run};
use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{
    AddReplicaRequest, ClusterStatusRequest, LoadModelRequest, MoveReplicaRequest, NodeInfo,
    RegisterNodeRequest, ReportReplicaReadyRequest, ShowPlacementRequest,
};
use moemesh_proto::{ReplicaState, v1::ExpertPlacement};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;

/// Long enough for an election on a slow, noisy machine; only an upper bound.
const PATIENCE: Duration = Duration::from_secs(30);
const MODEL: &str = "tiny";

/// A one-layer Mixtral of 8 experts: all the coordinator reads of a checkpoint.
fn checkpoint(dir: &std::path::Path) -> String {
    let config = r#"{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":1,
        "intermediate_size":4,"num_local_experts":8,"num_experts_per_tok":2}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.display().to_string()
}

fn node(id: &str, device: &str, weight_format: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.local:1"),
        device: device.into(),
        memory_bytes: 1 << 30,
        weight_format: weight_format.into(),
        ..NodeInfo::default()
    }
}

async fn register(
    admin: &mut AdminServiceClient<Channel>,
    node: NodeInfo,
    request_id: &str,
) -> Result<u64, tonic::Status> {
    let request = RegisterNodeRequest {
        node: Some(node),
        request_id: request_id.into(),
        ..RegisterNodeRequest::default()
    };
    Ok(admin.register_node(request).await?.into_inner().epoch)
}

async fn placement(admin: &mut AdminServiceClient<Channel>) -> Vec<ExpertPlacement> {
    let request = ShowPlacementRequest {
        model: MODEL.into(),
        ..ShowPlacementRequest::default()
    };
    admin
        .show_placement(request)
        .await
        .unwrap()
        .into_inner()
        .experts
}

/// Per expert, the state of its replica on `node`.
fn states_on(experts: &[ExpertPlacement], node: &str) -> BTreeMap<u32, ReplicaState> {
    experts
        .iter()
        .filter_map(|expert| {
            let replica = expert
                .replicas
                .iter()
                .find(|replica| replica.node == node)?;
            Some((expert.expert, replica.state()))
        })
        .collect()
}

/// Reports every loading replica ready, as the nodes do once loaded.
async fn report_all_ready(admin: &mut AdminServiceClient<Channel>) {
    for expert in placement(admin).await {
        for replica in &expert.replicas {
            if replica.state() == ReplicaState::Loading {
                let report = ReportReplicaReadyRequest {
                    node: replica.node.clone(),
                    model: MODEL.into(),
                    layer: expert.layer,
                    expert: expert.expert,
                };
                admin.report_replica_ready(report).await.unwrap();
            }
        }
    }
}

#[tokio::test]
async fn nodes_come_back_loading_and_experts_keep_one_format() {
    let data = tempfile::tempdir().unwrap();
    let model_dir = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut raft = RaftNodeConfig::new(1, Vec::new(), data.path().join("coordinator-1"));
    raft.tick_interval = Duration::from_millis(10);
    let config = CoordinatorConfig::new(raft, BTreeMap::from([(1, url.clone())]));
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(run(config, listener, async {
        let _ = stop_rx.await;
    }));
    let mut admin = AdminServiceClient::connect(url).await.unwrap();
    let started = Instant::now();
    while admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .map_or(true, |status| status.into_inner().leader_id != 1)
    {
        assert!(started.elapsed() < PATIENCE, "no leader elected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    register(&mut admin, node("cpu", "cpu", "f32"), "cpu-1")
        .await
        .unwrap();
    register(&mut admin, node("gpu", "cuda:0", "bf16"), "gpu-1")
        .await
        .unwrap();
    let refused = register(&mut admin, node("odd", "cpu", "fp8"), "odd-1")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("\"fp8\""), "{refused:?}");

    let load = LoadModelRequest {
        model: MODEL.into(),
        checkpoint: checkpoint(model_dir.path()),
        replicas: 1,
        request_id: "load".into(),
    };
    admin.load_model(load).await.unwrap();
    report_all_ready(&mut admin).await;
    let experts = placement(&mut admin).await;
    let on_cpu = states_on(&experts, "cpu");
    let on_gpu = states_on(&experts, "gpu");
    assert!(!on_cpu.is_empty() && !on_gpu.is_empty(), "{experts:?}");
    assert!(
        on_cpu
            .values()
            .chain(on_gpu.values())
            .all(|state| *state == ReplicaState::Ready)
    );

    // No replica of a CPU f32 expert on the GPU, added or moved.
    let cpu_expert = *on_cpu.keys().next().unwrap();
    let add = AddReplicaRequest {
        model: MODEL.into(),
        layer: 0,
        expert: cpu_expert,
        node: "gpu".into(),
        request_id: "mixed-add".into(),
    };
    let refused = admin.add_replica(add).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        refused.message().contains("node gpu computes in cuda/bf16")
            && refused.message().contains("served in cpu/f32 (on cpu)"),
        "{refused:?}"
    );
    let moved = MoveReplicaRequest {
        model: MODEL.into(),
        layer: 0,
        expert: cpu_expert,
        from_node: "cpu".into(),
        to_node: "gpu".into(),
        request_id: "mixed-move".into(),
    };
    let refused = admin.move_replica(moved).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // The CPU node restarts empty under the same id: its replicas load again.
    register(&mut admin, node("cpu", "cpu", "f32"), "cpu-2")
        .await
        .unwrap();
    let experts = placement(&mut admin).await;
    let reloading = states_on(&experts, "cpu");
    assert_eq!(
        reloading.keys().collect::<Vec<_>>(),
        on_cpu.keys().collect::<Vec<_>>()
    );
    assert!(
        reloading
            .values()
            .all(|state| *state == ReplicaState::Loading),
        "{reloading:?}"
    );
    assert_eq!(
        states_on(&experts, "gpu"),
        on_gpu,
        "the other node is untouched"
    );
    report_all_ready(&mut admin).await;
    let experts = placement(&mut admin).await;
    assert_eq!(states_on(&experts, "cpu"), on_cpu);

    stop_tx.send(()).unwrap();
    server.await.unwrap().expect("a clean shutdown");
}
