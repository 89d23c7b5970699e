//! Three coordinators as gRPC servers on 127.0.0.1: the admin API from any
//! of them, and losing the leader.

use std::time::{Duration, Instant};

use futures::StreamExt;
use moemesh_client::{CoordinatorClient, TlsConfig};
use moemesh_proto::AdminServiceClient;
use moemesh_proto::ReplicaState;
use moemesh_proto::v1::{
    ClusterStatusRequest, LoadModelRequest, NodeInfo, PlacementSnapshot, RegisterNodeRequest,
    ShowPlacementRequest,
};
use moemesh_tests::{CoordinatorSandbox, fixture_dir};
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

async fn admin(address: &str) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::connect(address.to_string())
        .await
        .unwrap()
}

fn node(id: &str, group: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        address: format!("http://{id}.local:50061"),
        group: group.into(),
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        buffer_bytes: 0,
        weight_format: String::new(),
        status: moemesh_proto::NodeStatus::Unspecified.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_coordinator_serves_the_admin_api_and_the_group_survives_its_leader() {
    let mut group = CoordinatorSandbox::start(3).await;
    let peers = group.urls.clone();
    let leader = group.leader(1).await;
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
    let fixture = fixture_dir("deepseek_v3");
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
                .all(|replica| replica.state() == ReplicaState::Loading)
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
    group.stop(leader).await;
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
    let new_leader = group.leader(survivors[1]).await;
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
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_already_serves_experts_registers_them_as_ready() {
    let group = CoordinatorSandbox::start(3).await;
    let peers = group.urls.clone();
    group.leader(2).await;
    let fixture = fixture_dir("qwen2_moe");
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
    assert_eq!(
        first.epoch, 1,
        "the served experts become routable in one epoch"
    );
    // A retry of the same registration changes nothing.
    let again = client.register_node(request).await.unwrap().into_inner();
    assert_eq!(again.epoch, 1);
    let placement = client
        .show_placement(ShowPlacementRequest {
            model: "qwen".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let listed: Vec<(u32, u32, String, ReplicaState)> = placement
        .experts
        .iter()
        .flat_map(|expert| {
            expert
                .replicas
                .iter()
                .map(|r| (expert.layer, expert.expert, r.node.clone(), r.state()))
        })
        .collect();
    assert_eq!(
        listed,
        [0, 1, 8]
            .map(|expert| (1, expert, "expert-0".to_string(), ReplicaState::Ready))
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
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_calls_need_the_admin_token_and_membership_does_not() {
    let coordinators = CoordinatorSandbox::with_admin_token(3, "s3cret-token").await;
    let leader = coordinators.leader_with_token(1, "s3cret-token").await;
    let url = coordinators.urls[&leader].clone();
    let mut anonymous = coordinators.admin(leader).await.unwrap();
    let refused = anonymous.cluster_status().await.unwrap_err().to_string();
    assert!(refused.contains("admin token"), "{refused}");
    let mut wrong = coordinators
        .admin(leader)
        .await
        .unwrap()
        .with_token("s3cret-tokem");
    assert!(wrong.show_placement("", None).await.is_err());
    let mut operator = coordinators
        .admin(leader)
        .await
        .unwrap()
        .with_token("s3cret-token");
    assert_eq!(operator.cluster_status().await.unwrap().leader_id, leader);
    // Expert nodes join without it (mutual TLS is what guards the cluster's own calls).
    let mut raw = admin(&url).await;
    raw.register_node(RegisterNodeRequest {
        node: Some(node("expert-a", "rack-1")),
        request_id: String::new(),
        ..RegisterNodeRequest::default()
    })
    .await
    .unwrap();
    let status = raw
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let nodes = operator.cluster_status().await.unwrap().nodes;
    assert!(nodes.iter().any(|node| node.id == "expert-a"));
    coordinators.shutdown().await;
}

/// The next placement snapshot `placements` delivers that holds node `id`.
async fn snapshot_with_node(
    placements: &mut (impl futures::Stream<Item = PlacementSnapshot> + Unpin),
    id: &str,
) -> PlacementSnapshot {
    let wait = async {
        loop {
            let snapshot = placements.next().await.expect("the stream goes on");
            if snapshot.nodes.iter().any(|node| node.id == id) {
                return snapshot;
            }
        }
    };
    tokio::time::timeout(PATIENCE, wait)
        .await
        .unwrap_or_else(|_| panic!("no snapshot with node {id}"))
}

/// One `CoordinatorClient` for the whole group: a coordinator that cannot
/// be reached is skipped, and the placement stream moves to another
/// coordinator when the one it follows stops, never going back an epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_client_skips_lost_coordinators_and_keeps_following_the_placement() {
    let mut group = CoordinatorSandbox::start(3).await;
    let leader = group.leader(1).await;
    let followed = *group.urls.keys().find(|&&id| id != leader).unwrap();
    // Nobody listens at the first address; the stream follows `followed`.
    let mut addresses = vec![
        "http://127.0.0.1:1".to_string(),
        group.urls[&followed].clone(),
    ];
    addresses.extend(
        group
            .urls
            .iter()
            .filter(|&(&id, _)| id != followed)
            .map(|(_, url)| url.clone()),
    );
    let mut client = CoordinatorClient::connect(addresses, TlsConfig::plaintext())
        .await
        .unwrap();
    assert_eq!(client.cluster_status().await.unwrap().leader_id, leader);
    let mut placements = client.watch_placement("", 0);

    let register = |id: &'static str| {
        let mut client = client.clone();
        async move {
            let request = RegisterNodeRequest {
                node: Some(node(id, "rack-1")),
                request_id: format!("register-{id}"),
                ..RegisterNodeRequest::default()
            };
            client.register_node(request).await.unwrap()
        }
    };
    register("expert-a").await;
    let before = snapshot_with_node(&mut placements, "expert-a").await;

    group.stop(followed).await;
    register("expert-b").await;
    let after = snapshot_with_node(&mut placements, "expert-b").await;
    assert!(
        after.epoch >= before.epoch,
        "{} then {}",
        before.epoch,
        after.epoch
    );
    assert!(after.nodes.iter().any(|node| node.id == "expert-a"));
    group.shutdown().await;
}
