//! Three coordinators on 127.0.0.1:0, each with its own Prometheus
//! registry: every member exposes the placement epoch and the nodes by
//! state it applied, only the leader says it leads, and moves, rebalance
//! runs and heartbeats are counted by the coordinator that handled them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_coordinator::metrics::CoordinatorMetrics;
use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{Coordinator, CoordinatorConfig};
use moemesh_proto::v1::{
    ClusterStatusRequest, HeartbeatRequest, LoadModelRequest, MoveReplicaRequest, NodeInfo,
    RebalanceRequest, RegisterNodeRequest, ReportReplicaReadyRequest, ShowPlacementRequest,
};
use moemesh_proto::{AdminServiceClient, ReplicaState};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

/// Long enough for elections and replication on a slow, noisy machine;
/// only an upper bound.
const PATIENCE: Duration = Duration::from_secs(60);
const MODEL: &str = "tiny";
const NODES: [&str; 2] = ["a", "b"];

type Admin = AdminServiceClient<Channel>;

/// The registry's Prometheus text.
fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text
}

/// The value of the sample `series` (name and labels, as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        Some(value.parse().unwrap())
    })
}

/// Waits until `registry`'s text satisfies `done`; returns that text.
async fn scrape_until(registry: &Registry, what: &str, done: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let text = scrape(registry);
        if done(&text) {
            return text;
        }
        assert!(started.elapsed() < PATIENCE, "never {what}:\n{text}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A one-layer Mixtral of 8 experts: all the coordinator reads of a checkpoint.
fn checkpoint(dir: &std::path::Path) -> String {
    let config = r#"{"model_type":"mixtral","hidden_size":8,"num_hidden_layers":1,
        "intermediate_size":4,"num_local_experts":8,"num_experts_per_tok":2}"#;
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.display().to_string()
}

async fn register(admin: &mut Admin, id: &str) {
    let node = NodeInfo {
        id: id.into(),
        address: format!("http://{id}.local:1"),
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        weight_format: "f32".into(),
        ..NodeInfo::default()
    };
    let request = RegisterNodeRequest {
        node: Some(node),
        request_id: format!("register-{id}"),
        ..RegisterNodeRequest::default()
    };
    admin.register_node(request).await.unwrap();
}

/// Reports every loading replica ready, as the nodes do once loaded;
/// returns how many it reported.
async fn report_all_ready(admin: &mut Admin) -> usize {
    let request = ShowPlacementRequest {
        model: MODEL.into(),
        ..ShowPlacementRequest::default()
    };
    let experts = admin.show_placement(request).await.unwrap().into_inner();
    let mut reported = 0;
    for expert in experts.experts {
        for replica in &expert.replicas {
            if replica.state() == ReplicaState::Loading {
                let report = ReportReplicaReadyRequest {
                    node: replica.node.clone(),
                    model: MODEL.into(),
                    layer: expert.layer,
                    expert: expert.expert,
                };
                admin.report_replica_ready(report).await.unwrap();
                reported += 1;
            }
        }
    }
    reported
}

/// Starts coordinators 1 to 3, each registering its metrics in a registry
/// of its own; returns their admin URLs and registries.
async fn start_group(
    data: &std::path::Path,
    stop: &watch::Receiver<bool>,
    servers: &mut Vec<tokio::task::JoinHandle<moemesh_coordinator::CoordinatorResult<()>>>,
) -> (BTreeMap<u64, String>, BTreeMap<u64, Registry>) {
    let mut listeners = Vec::new();
    let mut urls = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.insert(id, format!("http://{}", listener.local_addr().unwrap()));
        listeners.push((id, listener));
    }
    let mut registries = BTreeMap::new();
    for (id, listener) in listeners {
        let mut raft = RaftNodeConfig::new(id, Vec::new(), data.join(format!("c{id}")));
        raft.tick_interval = Duration::from_millis(50);
        let mut config = CoordinatorConfig::new(raft, urls.clone());
        // Nodes of this test never send heartbeats of their own.
        config.dead_after = Duration::from_secs(3600);
        config.drain_grace = Duration::from_millis(50);
        let mut registry = Registry::with_prefix("moemesh");
        config.metrics = CoordinatorMetrics::register(&mut registry);
        registries.insert(id, registry);
        let coordinator = Coordinator::start(config).unwrap();
        let mut stop = stop.clone();
        servers.push(tokio::spawn(coordinator.serve(listener, async move {
            let _ = stop.wait_for(|stop| *stop).await;
        })));
    }
    (urls, registries)
}

async fn elected_leader(url: &str) -> u64 {
    let mut admin = Admin::connect(url.to_string()).await.unwrap();
    let started = Instant::now();
    loop {
        let status = admin.cluster_status(ClusterStatusRequest {}).await;
        if let Ok(status) = status
            && status.get_ref().leader_id != 0
        {
            return status.into_inner().leader_id;
        }
        assert!(started.elapsed() < PATIENCE, "no leader elected");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Moves expert 0's replica from one node to the other through `admin`,
/// reporting the new replica loaded as a node would.
async fn move_expert_zero(admin: &mut Admin) {
    let request = ShowPlacementRequest {
        model: MODEL.into(),
        ..ShowPlacementRequest::default()
    };
    let experts = admin.show_placement(request).await.unwrap().into_inner();
    let holder = experts.experts.iter().find(|expert| expert.expert == 0);
    let from_node = holder.unwrap().replicas[0].node.clone();
    let to_node = NODES.iter().find(|node| **node != from_node).unwrap();
    let moved = MoveReplicaRequest {
        model: MODEL.into(),
        layer: 0,
        expert: 0,
        from_node,
        to_node: to_node.to_string(),
        request_id: "move-0".into(),
    };
    let mut mover = admin.clone();
    let mut call = tokio::spawn(async move { mover.move_replica(moved).await });
    let started = Instant::now();
    loop {
        tokio::select! {
            result = &mut call => { result.unwrap().unwrap(); return; }
            _ = tokio::time::sleep(Duration::from_millis(25)) => {}
        }
        report_all_ready(admin).await;
        assert!(started.elapsed() < PATIENCE, "the move never finished");
    }
}

/// Every member, once it applied what the leader did, shows the same
/// epoch, both nodes ready and all replicas ready; only `leader_now` leads.
async fn assert_applied_everywhere(
    registries: &BTreeMap<u64, Registry>,
    leader: u64,
    leader_now: u64,
) {
    let epoch_series = "moemesh_placement_epoch";
    let leader_text = scrape(&registries[&leader]);
    let epoch = sample(&leader_text, epoch_series).unwrap();
    assert!(epoch > 0.0, "{leader_text}");
    for (id, registry) in registries {
        let text = scrape_until(registry, "applied every change", |text| {
            sample(text, epoch_series) == Some(epoch)
                && sample(text, "moemesh_coordinator_nodes{state=\"ready\"}")
                    == Some(NODES.len() as f64)
        })
        .await;
        let leads = if *id == leader_now { 1.0 } else { 0.0 };
        assert_eq!(
            sample(&text, "moemesh_coordinator_is_leader"),
            Some(leads),
            "{text}"
        );
        for state in ["joining", "draining", "dead"] {
            let series = format!("moemesh_coordinator_nodes{{state=\"{state}\"}}");
            assert_eq!(sample(&text, &series), Some(0.0), "{text}");
        }
        let ready_replicas = "moemesh_coordinator_replicas{state=\"ready\"}";
        assert_eq!(sample(&text, ready_replicas), Some(8.0), "{text}");
        assert!(sample(&text, "moemesh_coordinator_term").unwrap() > 0.0);
        assert!(sample(&text, "moemesh_coordinator_commit_index").unwrap() > 0.0);
        assert!(sample(&text, "moemesh_coordinator_applied_index").unwrap() > 0.0);
    }
}

/// Moves and rebalance runs count where they were carried out (the
/// leader here); heartbeats where they arrived and where they were handed.
fn assert_counted_where_handled(leader_text: &str, follower_text: &str) {
    let moves = |outcome: &str| format!("moemesh_coordinator_moves_total{{outcome=\"{outcome}\"}}");
    assert_eq!(
        sample(leader_text, &moves("done")),
        Some(1.0),
        "{leader_text}"
    );
    assert_eq!(
        sample(leader_text, &moves("failed")),
        Some(1.0),
        "{leader_text}"
    );
    assert_eq!(
        sample(follower_text, &moves("done")),
        None,
        "{follower_text}"
    );
    let nothing_to_do = "moemesh_coordinator_rebalances_total{outcome=\"nothing_to_do\"}";
    assert_eq!(
        sample(leader_text, nothing_to_do),
        Some(1.0),
        "{leader_text}"
    );
    assert_eq!(
        sample(follower_text, nothing_to_do),
        None,
        "{follower_text}"
    );
    // The follower received the heartbeat and handed it to the leader.
    let heartbeats = "moemesh_coordinator_heartbeats_total";
    assert_eq!(
        sample(follower_text, heartbeats),
        Some(1.0),
        "{follower_text}"
    );
    assert_eq!(sample(leader_text, heartbeats), Some(1.0), "{leader_text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_exposes_the_applied_state_and_counts_its_work() {
    let data = tempfile::tempdir().unwrap();
    let model_dir = tempfile::tempdir().unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    let (urls, registries) = start_group(data.path(), &stop_rx, &mut servers).await;
    let leader = elected_leader(&urls[&1]).await;
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let mut at_leader = Admin::connect(urls[&leader].clone()).await.unwrap();
    let mut at_follower = Admin::connect(urls[&follower].clone()).await.unwrap();

    for node in NODES {
        register(&mut at_follower, node).await;
    }
    let load = LoadModelRequest {
        model: MODEL.into(),
        checkpoint: checkpoint(model_dir.path()),
        replicas: 1,
        request_id: "load".into(),
    };
    at_leader.load_model(load).await.unwrap();
    assert!(report_all_ready(&mut at_leader).await > 0);
    move_expert_zero(&mut at_leader).await;
    let same_node = MoveReplicaRequest {
        model: MODEL.into(),
        layer: 0,
        expert: 1,
        from_node: "a".into(),
        to_node: "a".into(),
        request_id: "move-nowhere".into(),
    };
    at_leader.move_replica(same_node).await.unwrap_err();
    let heartbeat = HeartbeatRequest {
        node: "a".into(),
        ..HeartbeatRequest::default()
    };
    at_follower.heartbeat(heartbeat).await.unwrap();
    // No load was reported, so the plan moves nothing; the follower hands
    // the run to the leader, which counts it.
    let rebalance = RebalanceRequest {
        model: MODEL.into(),
        dry_run: false,
    };
    at_follower.rebalance(rebalance).await.unwrap();

    let leader_now = elected_leader(&urls[&follower]).await;
    assert_applied_everywhere(&registries, leader, leader_now).await;
    let leader_text = scrape(&registries[&leader]);
    let follower_text = scrape(&registries[&follower]);
    assert_counted_where_handled(&leader_text, &follower_text);

    stop_tx.send_replace(true);
    for server in servers {
        server.await.unwrap().expect("a clean shutdown");
    }
}
