//! Three coordinators as gRPC servers on 127.0.0.1: the admin API from any
//! of them, and losing the leader.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use moemesh_coordinator::grpc::{Coordinator, CoordinatorConfig};
use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{
    ClusterStatusRequest, LoadModelRequest, NodeInfo, RegisterNodeRequest, ShowPlacementRequest,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

struct RunningCoordinator {
    stop_tx: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

async fn start_group(
    data_dir: &Path,
) -> (BTreeMap<u64, String>, BTreeMap<u64, RunningCoordinator>) {
    let mut listeners = BTreeMap::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, format!("http://{}", listener.local_addr().unwrap()));
        listeners.insert(id, listener);
    }
    let mut running = BTreeMap::new();
    for (id, listener) in listeners {
        let mut raft = RaftNodeConfig::new(id, Vec::new(), data_dir.join(format!("c{id}")));
        raft.tick_interval = Duration::from_millis(25);
        let coordinator = Coordinator::start(CoordinatorConfig {
            raft,
            peers: peers.clone(),
        })
        .unwrap();
        let (stop_tx, stop_rx) = oneshot::channel();
        let server = tokio::spawn(async move {
            coordinator
                .serve(listener, async {
                    let _ = stop_rx.await;
                })
                .await
                .unwrap();
        });
        running.insert(id, RunningCoordinator { stop_tx, server });
    }
    (peers, running)
}

async fn admin(address: &str) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::connect(address.to_string())
        .await
        .unwrap()
}

/// Waits until coordinator `via` reports a leader among `alive`, and returns it.
async fn wait_for_leader(address: &str, alive: &[u64]) -> u64 {
    let started = Instant::now();
    let mut client = admin(address).await;
    loop {
        if let Ok(status) = client.cluster_status(ClusterStatusRequest {}).await {
            let status = status.into_inner();
            if alive.contains(&status.leader_id) {
                return status.leader_id;
            }
        }
        assert!(started.elapsed() < PATIENCE, "no leader");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node(id: &str, group: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.local:50061"),
        group: group.into(),
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        status: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_coordinator_serves_the_admin_api_and_the_group_survives_its_leader() {
    let data = tempfile::tempdir().unwrap();
    let (peers, mut running) = start_group(data.path()).await;
    let leader = wait_for_leader(&peers[&1], &[1, 2, 3]).await;
    let follower = *peers.keys().find(|&&id| id != leader).unwrap();

    // Writes through a follower.
    let mut client = admin(&peers[&follower]).await;
    for (index, group) in ["rack-a", "rack-a", "rack-b"].iter().enumerate() {
        let request = RegisterNodeRequest {
            node: Some(node(&format!("expert-{index}"), group)),
            request_id: format!("reg-{index}"),
            ..Default::default()
        };
        client.register_node(request).await.unwrap();
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/deepseek_v3");
    let loaded = client
        .load_model(LoadModelRequest {
            model: "ds".into(),
            checkpoint: fixture.to_string_lossy().into_owned(),
            replicas: 2,
            request_id: "load-ds".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // Two MoE layers of 16 routed experts and one shared expert, twice each.
    assert_eq!(loaded.replicas_added, 2 * 17 * 2);

    // Reads through another coordinator see it all.
    let mut other = admin(&peers[&leader]).await;
    let placement = other
        .show_placement(ShowPlacementRequest {
            model: "ds".into(),
            has_layer: true,
            layer: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placement.experts.len(), 17);
    for expert in &placement.experts {
        assert_eq!(expert.replicas.len(), 2);
        assert!(
            expert
                .replicas
                .iter()
                .all(|replica| replica.state == "loading")
        );
        assert_ne!(expert.replicas[0].node, expert.replicas[1].node);
    }
    let status = other
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.coordinators.len(), 3);
    assert_eq!(
        status
            .coordinators
            .iter()
            .filter(|c| c.role == "leader")
            .count(),
        1
    );
    assert_eq!(status.nodes.len(), 3);
    assert_eq!(status.models, vec!["ds".to_string()]);

    // A bad checkpoint is refused with a clear error.
    let error = client
        .load_model(LoadModelRequest {
            model: "x".into(),
            checkpoint: "/nonexistent".into(),
            replicas: 1,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::InvalidArgument);
    assert!(
        error.message().contains("/nonexistent/config.json"),
        "{}",
        error.message()
    );

    // Stop the leader; the survivors elect another and keep committing.
    let stopped_at = Instant::now();
    let stopping = running.remove(&leader).unwrap();
    let _ = stopping.stop_tx.send(());
    stopping.server.await.unwrap();
    let survivors: Vec<u64> = peers.keys().copied().filter(|&id| id != leader).collect();
    let mut survivor = admin(&peers[&survivors[0]]).await;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let request = RegisterNodeRequest {
            node: Some(node("expert-3", "rack-b")),
            request_id: "reg-after".into(),
            ..Default::default()
        };
        match survivor.register_node(request).await {
            Ok(_) => break,
            Err(status) => {
                assert!(
                    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "{status:?}"
                );
                assert!(
                    stopped_at.elapsed() < PATIENCE,
                    "no commit after losing the leader"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    println!(
        "first commit {:?} after stopping the leader ({attempt} attempts)",
        stopped_at.elapsed()
    );
    let new_leader = wait_for_leader(&peers[&survivors[1]], &survivors).await;
    assert_ne!(new_leader, leader);
    let status = survivor
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.nodes.len(),
        4,
        "every committed change is still there"
    );
    assert_eq!(
        status
            .coordinators
            .iter()
            .filter(|c| c.role == "unreachable")
            .count(),
        1
    );

    for (_, coordinator) in running {
        let _ = coordinator.stop_tx.send(());
        coordinator.server.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_already_serves_experts_registers_them_as_ready() {
    let data = tempfile::tempdir().unwrap();
    let (peers, running) = start_group(data.path()).await;
    wait_for_leader(&peers[&2], &[1, 2, 3]).await;
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/qwen2_moe");
    let mut client = admin(&peers[&3]).await;
    let serving = vec![moemesh_proto::v1::LayerExperts {
        layer: 1,
        experts: vec![0, 1, 8],
    }];
    let request = RegisterNodeRequest {
        node: Some(node("expert-0", "rack-a")),
        request_id: "boot-expert-0".into(),
        model: "qwen".into(),
        checkpoint: fixture.to_string_lossy().into_owned(),
        serving: serving.clone(),
    };
    let first = client
        .register_node(request.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.epoch, 3, "each ready replica publishes an epoch");
    // A retry of the same registration changes nothing.
    let again = client.register_node(request).await.unwrap().into_inner();
    assert_eq!(again.epoch, 3);
    let placement = client
        .show_placement(ShowPlacementRequest {
            model: "qwen".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(u32, u32, String, String)> = placement
        .experts
        .iter()
        .flat_map(|expert| {
            expert
                .replicas
                .iter()
                .map(|r| (expert.layer, expert.expert, r.node.clone(), r.state.clone()))
        })
        .collect();
    assert_eq!(
        listed,
        [0, 1, 8]
            .map(|expert| (1, expert, "expert-0".to_string(), "ready".to_string()))
            .to_vec()
    );
    // An expert the model does not have is refused.
    let bad = RegisterNodeRequest {
        node: Some(node("expert-1", "rack-a")),
        model: "qwen".into(),
        checkpoint: fixture.to_string_lossy().into_owned(),
        serving: vec![moemesh_proto::v1::LayerExperts {
            layer: 1,
            experts: vec![42],
        }],
        ..Default::default()
    };
    let error = client.register_node(bad).await.unwrap_err();
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(
        error.message().contains("expert 42 does not exist"),
        "{}",
        error.message()
    );
    for (_, coordinator) in running {
        let _ = coordinator.stop_tx.send(());
        coordinator.server.await.unwrap();
    }
}
