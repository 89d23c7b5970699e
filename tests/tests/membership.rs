//! Placement owned by the coordinators: moves under load, and dead nodes.

use std::time::{Duration, Instant};

use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_proto::{NodeStatus, ReplicaState};
use moemesh_tests::{Fixture, ManagedCluster, SteadyLoad, relative_l2};

const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_under_continuous_load_fail_no_request() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let (input, _) = fixture.cases[&1].clone();
    let reference = MoeLayer::load(&fixture.checkpoint, 1, &CpuBackend::new(1).unwrap())
        .unwrap()
        .forward(&input, input.len() / hidden)
        .unwrap();
    let cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_secs(3600)).await;

    // Three clients keep requests in flight through every step of every move.
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(cluster.client().await);
    }
    let load = SteadyLoad::start(clients, 1, input.clone(), reference.clone(), hidden, 1e-6);

    // Every placement a router could receive during the moves must route
    // every expert to a ready replica.
    let mut watcher =
        moemesh_proto::AdminServiceClient::connect(cluster.coordinators.urls[&3].clone())
            .await
            .unwrap();
    let mut stream = watcher
        .watch_placement(moemesh_proto::v1::WatchPlacementRequest {
            model: "test-model".into(),
            since_revision: None,
        })
        .await
        .unwrap()
        .into_inner();
    let snapshots = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut view = moemesh_proto::placement::PlacementView::new();
        while let Ok(Some(update)) = stream.message().await {
            view.apply(update, "test-model").unwrap();
            seen.push(view.snapshot());
        }
        seen
    });

    let mut admin = cluster.admin(2).await;
    let before = admin.show_placement("test-model", Some(1)).await.unwrap();
    let nodes = cluster.node_ids();
    let mut move_times = Vec::new();
    for expert in [0u32, 5, 16] {
        let holder = before
            .experts
            .iter()
            .find(|e| e.expert == expert)
            .unwrap()
            .replicas[0]
            .node
            .clone();
        let target = nodes.iter().find(|node| **node != holder).unwrap().clone();
        let moved = admin
            .move_replica("test-model", 1, expert, &holder, &target)
            .await
            .unwrap();
        move_times.push(moved.took_ms);
        let after = admin.show_placement("test-model", Some(1)).await.unwrap();
        let replicas = &after
            .experts
            .iter()
            .find(|e| e.expert == expert)
            .unwrap()
            .replicas;
        assert_eq!(replicas.len(), 1);
        assert_eq!(
            (replicas[0].node.as_str(), replicas[0].state()),
            (target.as_str(), ReplicaState::Ready)
        );
    }
    // Keep the load on a little after the last move.
    load.wait_for(20).await;
    let served = load.served();
    let failures = load.stop().await;
    println!("3 moves took {move_times:?} ms end to end; {served} requests served meanwhile");
    assert!(
        failures.is_empty(),
        "failed requests during moves: {failures:?}"
    );
    cluster.shutdown().await;
    let snapshots = snapshots.await.unwrap();
    assert!(
        snapshots.len() >= 3 * 3,
        "expected an epoch per step of each move, saw {}",
        snapshots.len()
    );
    for snapshot in &snapshots {
        for expert in snapshot.experts.iter().filter(|expert| expert.layer == 1) {
            assert!(
                expert
                    .replicas
                    .iter()
                    .any(|replica| replica.state() == ReplicaState::Ready),
                "epoch {}: expert {} had no ready replica: {:?}",
                snapshot.epoch,
                expert.expert,
                expert.replicas
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_is_declared_dead_and_its_experts_move_to_live_nodes() {
    let fixture = Fixture::open("qwen2_moe");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&1].clone();
    let mut cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_millis(1500)).await;
    let mut client = cluster.client().await;
    let output = client.forward_f32("", 1, &input, hidden).await.unwrap();
    assert!(relative_l2(&output, &expected) < 1e-5);

    let victim = cluster.node_ids()[0].clone();
    let killed_at = Instant::now();
    cluster.kill_node(&victim).await;

    // The cluster heals: the victim is dead, every expert is ready on a live node.
    let mut admin = cluster.admin(3).await;
    loop {
        let status = admin.cluster_status().await.unwrap();
        let placement = admin.show_placement("test-model", None).await.unwrap();
        let victim_dead = status
            .nodes
            .iter()
            .any(|node| node.id == victim && node.status() == NodeStatus::Dead);
        let healed = placement.experts.len() == 2 * 9
            && placement.experts.iter().all(|expert| {
                expert
                    .replicas
                    .iter()
                    .any(|replica| replica.state() == ReplicaState::Ready)
                    && expert.replicas.iter().all(|replica| replica.node != victim)
            });
        if victim_dead && healed {
            break;
        }
        assert!(
            killed_at.elapsed() < PATIENCE,
            "the cluster never healed: {status:?} {placement:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "healthy again {:?} after the node stopped",
        killed_at.elapsed()
    );

    // The router follows the new epoch and serves every layer correctly.
    let started = Instant::now();
    loop {
        match client.forward_f32("", 1, &input, hidden).await {
            Ok(output) => {
                assert!(relative_l2(&output, &expected) < 1e-5);
                break;
            }
            Err(error) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "router never recovered: {error}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let (input, expected) = &fixture.cases[&2];
    let output = client.forward_f32("", 2, input, hidden).await.unwrap();
    assert!(relative_l2(&output, expected) < 1e-5);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loaded_through_the_coordinators_is_placed_loaded_and_served() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    // Empty nodes; the coordinators place every expert twice and the nodes load them.
    let cluster = ManagedCluster::start(&fixture.dir, 3, 0, Duration::from_secs(3600)).await;
    let mut admin = cluster.admin(1).await;
    let started = Instant::now();
    loop {
        let placement = admin.show_placement("test-model", None).await.unwrap();
        let all_ready = placement.experts.len() == 2 * 17
            && placement.experts.iter().all(|expert| {
                expert.replicas.len() == 2
                    && expert
                        .replicas
                        .iter()
                        .all(|r| r.state() == ReplicaState::Ready)
            });
        if all_ready {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "experts never became ready: {placement:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = cluster.client().await;
    for (&layer, (input, expected)) in &fixture.cases {
        let started = Instant::now();
        let output = loop {
            match client.forward_f32("", layer as u32, input, hidden).await {
                Ok(output) => break output,
                Err(error) => {
                    // The router may still be on the epoch before the last replica became ready.
                    assert!(started.elapsed() < PATIENCE, "{error}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert!(relative_l2(&output, expected) < 1e-5, "layer {layer}");
    }
    cluster.shutdown().await;
}
