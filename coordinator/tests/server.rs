//! One coordinator served by `server::run` on 127.0.0.1:0, reached over
//! gRPC: it elects itself, refuses operators without the admin token,
//! registers an expert node, reports itself healthy, and stops cleanly
//! when told to.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{CoordinatorConfig, run};
use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, NodeInfo, RegisterNodeRequest,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic::{Code, Request};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Long enough for an election on a slow, noisy machine; only an upper bound.
const PATIENCE: Duration = Duration::from_secs(30);

async fn cluster_status(admin: &mut AdminServiceClient<Channel>) -> ClusterStatusResponse {
    let mut request = Request::new(ClusterStatusRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer secret".parse().unwrap());
    admin.cluster_status(request).await.unwrap().into_inner()
}

#[tokio::test]
async fn a_coordinator_serves_its_admin_api_until_shutdown() {
    let data = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut raft = RaftNodeConfig::new(1, Vec::new(), data.path().join("coordinator-1"));
    raft.tick_interval = Duration::from_millis(10);
    let mut config = CoordinatorConfig::new(raft, BTreeMap::from([(1, url.clone())]));
    config.admin_token = Some("secret".into());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(run(config, listener, async {
        let _ = stop_rx.await;
    }));

    let mut admin = AdminServiceClient::connect(url.clone()).await.unwrap();
    let refused = admin
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let started = Instant::now();
    while cluster_status(&mut admin).await.leader_id != 1 {
        assert!(started.elapsed() < PATIENCE, "no leader elected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Expert nodes register without the operators' token.
    let node = NodeInfo {
        id: "node-a".into(),
        address: "http://127.0.0.1:1".into(),
        memory_bytes: 1 << 30,
        ..NodeInfo::default()
    };
    admin
        .register_node(RegisterNodeRequest {
            node: Some(node),
            ..RegisterNodeRequest::default()
        })
        .await
        .unwrap();
    let status = cluster_status(&mut admin).await;
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.nodes[0].group, "default");
    assert_eq!(status.nodes[0].status(), moemesh_proto::NodeStatus::Ready);
    assert_eq!(status.coordinators.len(), 1);
    assert_eq!(status.coordinators[0].role, "leader");

    // The standard gRPC health service reports the admin service serving.
    let channel = Channel::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let answer = health
        .check(HealthCheckRequest {
            service: "moemesh.v1.AdminService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.status(), ServingStatus::Serving);

    stop_tx.send(()).unwrap();
    server.await.unwrap().expect("a clean shutdown");
}
