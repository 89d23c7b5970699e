//! Coordinators that serve raft on a peer listener of their own: the
//! group elects and replicates over the peer URLs, followers hand writes to
//! the leader there, and the admin listener serves no raft at all, so a
//! network policy can keep raft traffic among coordinators.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{Coordinator, CoordinatorConfig};
use moemesh_proto::v1::{ClusterStatusRequest, NodeInfo, RaftBatch, RegisterNodeRequest};
use moemesh_proto::{AdminServiceClient, CoordinatorPeerServiceClient};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

async fn bound() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_travels_on_the_peer_listener_and_nowhere_else() {
    let data = tempfile::tempdir().unwrap();
    let mut admin_urls = BTreeMap::new();
    let mut peer_urls = BTreeMap::new();
    let mut listeners = Vec::new();
    for id in 1..=3u64 {
        let (admin, admin_url) = bound().await;
        let (peer, peer_url) = bound().await;
        admin_urls.insert(id, admin_url);
        peer_urls.insert(id, peer_url);
        listeners.push((id, admin, peer));
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut servers = Vec::new();
    for (id, admin, peer) in listeners {
        let mut raft = RaftNodeConfig::new(id, Vec::new(), data.path().join(format!("c{id}")));
        raft.tick_interval = Duration::from_millis(25);
        let config = CoordinatorConfig::new(raft, peer_urls.clone());
        let coordinator = Coordinator::start(config).unwrap();
        let mut stop = stop_rx.clone();
        servers.push(tokio::spawn(coordinator.serve_split(
            admin,
            Some(peer),
            async move {
                let _ = stop.wait_for(|stop| *stop).await;
            },
        )));
    }

    // A leader is elected over the peer listeners.
    let started = Instant::now();
    let leader = loop {
        let mut admin = AdminServiceClient::connect(admin_urls[&1].clone())
            .await
            .unwrap();
        let status = admin
            .cluster_status(ClusterStatusRequest {})
            .await
            .unwrap()
            .into_inner();
        if status.leader_id != 0 {
            break status.leader_id;
        }
        assert!(started.elapsed() < PATIENCE, "no leader elected");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };

    // A follower's admin listener takes a registration and hands it to
    // the leader through the peer listener; every coordinator applies it.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let mut admin = AdminServiceClient::connect(admin_urls[&follower].clone())
        .await
        .unwrap();
    let node = NodeInfo {
        id: "expert-0".into(),
        address: "http://127.0.0.1:1".into(),
        ..Default::default()
    };
    let register = RegisterNodeRequest {
        node: Some(node),
        ..Default::default()
    };
    admin.register_node(register).await.unwrap();
    for url in admin_urls.values() {
        let started = Instant::now();
        loop {
            let mut admin = AdminServiceClient::connect(url.clone()).await.unwrap();
            let status = admin.cluster_status(ClusterStatusRequest {}).await.unwrap();
            if status.into_inner().nodes.len() == 1 {
                break;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "{url} never applied the registration"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    // The admin listeners serve no raft.
    for url in admin_urls.values() {
        let mut peer = CoordinatorPeerServiceClient::connect(url.clone())
            .await
            .unwrap();
        let refused = peer.raft(RaftBatch::default()).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unimplemented, "{url}");
    }

    stop_tx.send_replace(true);
    for server in servers {
        server.await.unwrap().expect("a clean shutdown");
    }
}
