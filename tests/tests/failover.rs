//! Losing an expert node under load: with every expert on two nodes no
//! request fails, and the cluster heals itself while serving.

use std::time::{Duration, Instant};

use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_proto::{NodeStatus, ReplicaState};
use moemesh_tests::{Fixture, ManagedCluster, SteadyLoad, relative_l2};

const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_under_load_fails_no_request_when_experts_have_two_replicas() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let (input, _) = fixture.cases[&1].clone();
    let reference = MoeLayer::load(&fixture.checkpoint, 1, &CpuBackend::new(1).unwrap())
        .unwrap()
        .forward(&input, input.len() / hidden)
        .unwrap();
    let mut cluster = ManagedCluster::start(&fixture.dir, 3, 2, Duration::from_millis(1500)).await;

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(cluster.client().await);
    }
    let load = SteadyLoad::start(clients, 1, input, reference, hidden, 1e-6);
    load.wait_for(20).await;

    let victim = cluster.node_ids()[1].clone();
    let killed_at = Instant::now();
    let served_before = load.served();
    cluster.kill_node(&victim).await;

    // The cluster heals while serving: the victim is dead and every expert
    // has two ready replicas on live nodes again.
    let mut admin = cluster.admin(3).await;
    loop {
        // A busy machine may time a coordinator's quorum read out: ask again.
        let (Ok(status), Ok(placement)) = (
            admin.cluster_status().await,
            admin.show_placement("test-model", Some(1)).await,
        ) else {
            assert!(
                killed_at.elapsed() < PATIENCE,
                "the coordinators never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let victim_dead = status
            .nodes
            .iter()
            .any(|node| node.id == victim && node.status() == NodeStatus::Dead);
        let healed = placement.experts.iter().all(|expert| {
            expert
                .replicas
                .iter()
                .filter(|replica| replica.state() == ReplicaState::Ready && replica.node != victim)
                .count()
                >= 2
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
    let healed_after = killed_at.elapsed();
    load.wait_for(10).await;
    let served = load.served() - served_before;
    let failures = load.stop().await;
    println!(
        "node killed under load: {served} requests served meanwhile, {} failed; healthy again after {healed_after:?}",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    cluster.shutdown().await;
}

/// Routers and expert nodes need no coordinator on the data path: losing
/// the coordinators' leader under load fails no request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_coordinator_leader_under_load_fails_no_request() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&0].clone();
    let mut cluster = ManagedCluster::start(&fixture.dir, 2, 1, Duration::from_secs(3600)).await;
    let clients = vec![cluster.client().await, cluster.client().await];
    let load = SteadyLoad::start(clients, 0, input, expected, hidden, 1e-5);
    load.wait_for(20).await;
    let leader = cluster.coordinators.leader(1).await;
    cluster.coordinators.stop(leader).await;
    // Serve on for a while with the leader gone, through the election.
    let started = Instant::now();
    load.wait_for(50).await;
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(started.elapsed())).await;
    let failures = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    cluster.shutdown().await;
}

/// More clients than a router admits: each request succeeds or is refused
/// with RESOURCE_EXHAUSTED (after the SDK's retries), and none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_quickly_and_nothing_hangs() {
    use moemesh_client::{Client, ClientError};
    use moemesh_router_node::{PlacementSource, RouterConfig};

    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&0].clone();
    let cluster = moemesh_tests::ClusterSandbox::spread(&fixture.dir, 1, 1).await;
    let config = fixture.checkpoint.config().clone();
    let placement_file = cluster
        .placement
        .to_file(&config, Some("test-model".into()));
    // A router that admits two forwards at a time.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router_config = RouterConfig {
        model_dir: fixture.dir.clone(),
        model_id: "test-model".into(),
        placement: PlacementSource::File(placement_file),
        group: String::new(),
        max_in_flight: 2,
        tls: cluster.tls.clone(),
        metrics: Default::default(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tokio::spawn(moemesh_router_node::run(router_config, listener, async {
        let _ = stop_rx.await;
    }));
    let deadline = Duration::from_millis(40);
    let mut calls = Vec::new();
    for _ in 0..32 {
        let mut client = loop {
            match Client::connect(url.clone()).await {
                Ok(client) => break client.with_deadline(deadline),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let input = input.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut outcomes = Vec::new();
            for _ in 0..5 {
                outcomes.push(client.forward_f32("", 0, &input, hidden).await);
            }
            (outcomes, started.elapsed())
        }));
    }
    let (mut succeeded, mut refused, mut timed_out) = (0, 0, 0);
    for call in calls {
        let (outcomes, took) = call.await.unwrap();
        // Five calls of a 40 ms budget each; generous slack for a slow machine.
        assert!(took < Duration::from_secs(10), "a client hung for {took:?}");
        for outcome in outcomes {
            match outcome {
                Ok(output) => {
                    assert!(relative_l2(&output, &expected) < 1e-5);
                    succeeded += 1;
                }
                Err(ClientError::Overloaded(message)) => {
                    assert!(message.contains("busy"), "{message}");
                    refused += 1;
                }
                // An admitted call that a busy machine could not finish in
                // 40 ms ends at its deadline (the server cancels it).
                Err(ClientError::Other {
                    code: tonic::Code::DeadlineExceeded | tonic::Code::Cancelled,
                    ..
                }) => timed_out += 1,
                Err(other) => panic!("neither served, refused nor timed out: {other}"),
            }
        }
    }
    println!("{succeeded} served, {refused} refused, {timed_out} past their deadline");
    assert!(succeeded > 0);
    assert_eq!(succeeded + refused + timed_out, 32 * 5);
    stop_tx.send(()).unwrap();
    router.await.unwrap().unwrap();
    cluster.shutdown().await;
}

/// With one replica per expert, losing a node fails only the requests
/// that need its experts, with UNAVAILABLE naming the layer and experts,
/// and full service returns once the coordinators re-place them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_single_replicas_only_requests_needing_the_lost_node_fail_until_it_is_replaced() {
    use moemesh_client::ClientError;

    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&0].clone();
    let mut cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_millis(1500)).await;
    let mut client = cluster.client().await;
    let layer = MoeLayer::load(&fixture.checkpoint, 0, &CpuBackend::new(1).unwrap()).unwrap();
    let victim = cluster.node_ids()[0].clone();
    let mut admin = cluster.admin(1).await;
    let placement = admin.show_placement("test-model", Some(0)).await.unwrap();
    let lost: Vec<u32> = placement
        .experts
        .iter()
        .filter(|expert| expert.replicas.iter().all(|replica| replica.node == victim))
        .map(|expert| expert.expert)
        .collect();
    assert!(!lost.is_empty());
    // One token at a time: which tokens need a lost expert is known here.
    let tokens = input.len() / hidden;
    let needs_lost: Vec<bool> = (0..tokens)
        .map(|token| {
            let row = &input[token * hidden..(token + 1) * hidden];
            layer
                .gate()
                .route(row, 1)
                .token(0)
                .any(|(expert, _)| lost.contains(&expert))
        })
        .collect();
    assert!(needs_lost.iter().any(|&needs| needs) && needs_lost.iter().any(|&needs| !needs));

    cluster.kill_node(&victim).await;
    let killed_at = Instant::now();
    // Before the coordinators re-place the lost experts (1.5 s of silence
    // first), tokens that need them fail clearly and the others are served.
    let (mut failed, mut served) = (0, 0);
    for token in 0..tokens {
        let row = &input[token * hidden..(token + 1) * hidden];
        match client.forward_f32("", 0, row, hidden).await {
            Ok(output) => {
                assert!(!needs_lost[token] || killed_at.elapsed() > Duration::from_millis(1000));
                let want = &expected[token * hidden..(token + 1) * hidden];
                assert!(relative_l2(&output, want) < 1e-5);
                served += 1;
            }
            Err(ClientError::Unavailable(message)) => {
                assert!(
                    needs_lost[token],
                    "token {token} failed needlessly: {message}"
                );
                assert!(message.contains("layer 0"), "{message}");
                failed += 1;
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    println!("single replicas: {failed} requests failed, {served} served after the node was lost");
    // Then everything is served again.
    let started = Instant::now();
    loop {
        match client.forward_f32("", 0, &input, hidden).await {
            Ok(output) => {
                assert!(relative_l2(&output, &expected) < 1e-5);
                break;
            }
            Err(error) => {
                assert!(started.elapsed() < PATIENCE, "never recovered: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    println!(
        "full service again {:?} after the node was lost",
        killed_at.elapsed()
    );
    cluster.shutdown().await;
}

/// A router's report that it cannot reach a node only shortens the silence
/// the leader waits for: a node that keeps heartbeating stays alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_report_does_not_kill_a_node_that_still_heartbeats() {
    let fixture = Fixture::open("mixtral");
    let cluster = ManagedCluster::start(&fixture.dir, 2, 1, Duration::from_millis(1500)).await;
    let node = cluster.node_ids()[0].clone();
    let mut raw = moemesh_proto::AdminServiceClient::connect(cluster.coordinators.urls[&2].clone())
        .await
        .unwrap();
    raw.report_unreachable(moemesh_proto::v1::ReportUnreachableRequest {
        node: node.clone(),
        reporter: "test".into(),
        reason: "connection refused".into(),
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let status = cluster.admin(1).await.cluster_status().await.unwrap();
    let reported = status.nodes.iter().find(|entry| entry.id == node).unwrap();
    assert_eq!(reported.status(), NodeStatus::Ready, "{status:?}");
    cluster.shutdown().await;
}
