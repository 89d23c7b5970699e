//! Members prove who they are: forged cluster-internal calls are refused,
//! in TLS mode from a valid certificate of the wrong role or id, and in
//! plaintext mode without the cluster secret. Afterwards every coordinator
//! is alive, no node record changed, and serving is exact.

use std::time::Duration;

use moemesh_proto::identity::{Member, Role};
use moemesh_proto::tls::{MemberChannel, TlsConfig};
use moemesh_proto::v1::{
    ClusterStatusRequest, ComputeRequest, ExpertRows, HeartbeatRequest, LoadModelRequest,
    MoveReplicaRequest, NodeInfo, RaftBatch, RegisterNodeRequest, ReportLoadRequest,
    ReportReplicaReadyRequest, ReportUnreachableRequest,
};
use moemesh_proto::{AdminServiceClient, CoordinatorPeerServiceClient, ExpertServiceClient};
use moemesh_tests::{Fixture, ManagedCluster, SandboxSecurity, relative_l2};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tonic::Code;

fn member(role: Role, id: &str) -> Member {
    Member::new(role, id).unwrap()
}

async fn channel(tls: &TlsConfig, url: &str) -> MemberChannel {
    tls.connect(url.to_string()).await.expect("connects")
}

/// A heartbeat that, unguarded, makes raft-rs panic: a high term and a
/// commit index past any log.
fn forged_heartbeat(from: u64, to: u64) -> RaftBatch {
    let mut message = Message::default();
    message.set_msg_type(MessageType::MsgHeartbeat);
    message.from = from;
    message.to = to;
    message.term = 1_000_000;
    message.commit = u64::MAX;
    RaftBatch {
        messages: vec![message.write_to_bytes().unwrap().into()],
    }
}

/// The node records as an operator sees them: (id, address, status).
async fn node_records(cluster: &ManagedCluster, coordinator: u64) -> Vec<(String, String, i32)> {
    let status = cluster
        .admin(coordinator)
        .await
        .cluster_status()
        .await
        .unwrap();
    let mut nodes: Vec<_> = status
        .nodes
        .into_iter()
        .map(|node| (node.id, node.address, node.status))
        .collect();
    nodes.sort();
    nodes
}

fn assert_refused<T: std::fmt::Debug>(result: Result<T, tonic::Status>, what: &str) {
    match result {
        Err(status) => assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}"),
        Ok(reply) => panic!("{what} was accepted: {reply:?}"),
    }
}

/// Every forged call `caller` may not make, against every coordinator and
/// (unless it is a router, which may compute) the expert node at
/// `node_url`. `victim` is an expert node id; `claimed_raft_id` the
/// coordinator a forged raft message claims to come from.
async fn forge_everything(
    cluster: &ManagedCluster,
    caller: &TlsConfig,
    victim: &str,
    claimed_raft_id: u64,
    node_url: Option<&str>,
) {
    let bogus = NodeInfo {
        id: victim.to_string(),
        address: "http://127.0.0.1:1".into(),
        ..Default::default()
    };
    for (&id, url) in &cluster.coordinators.urls {
        let mut peer = CoordinatorPeerServiceClient::new(channel(caller, url).await);
        let raft = peer.raft(forged_heartbeat(claimed_raft_id, id)).await;
        assert_refused(raft, "a forged raft heartbeat");
        let mut admin = AdminServiceClient::new(channel(caller, url).await);
        let register = RegisterNodeRequest {
            node: Some(bogus.clone()),
            ..Default::default()
        };
        assert_refused(
            admin.register_node(register).await,
            "a hijacking registration",
        );
        let heartbeat = HeartbeatRequest {
            node: victim.to_string(),
            ..Default::default()
        };
        assert_refused(admin.heartbeat(heartbeat).await, "a forged heartbeat");
        let ready = ReportReplicaReadyRequest {
            node: victim.to_string(),
            layer: 1,
            ..Default::default()
        };
        assert_refused(
            admin.report_replica_ready(ready).await,
            "a forged ready report",
        );
        let moved = MoveReplicaRequest {
            layer: 1,
            from_node: victim.to_string(),
            to_node: "elsewhere".into(),
            ..Default::default()
        };
        assert_refused(admin.move_replica(moved).await, "a move by a non-operator");
        let load = LoadModelRequest {
            checkpoint: "/nonexistent".into(),
            ..Default::default()
        };
        assert_refused(admin.load_model(load).await, "a load by a non-operator");
    }
    let Some(node_url) = node_url else {
        return;
    };
    let mut expert = ExpertServiceClient::new(channel(caller, node_url).await);
    let compute = ComputeRequest {
        layer: 1,
        experts: vec![ExpertRows::default()],
        ..Default::default()
    };
    assert_refused(expert.compute(compute).await, "Compute from a non-router");
}

/// Router reports from a member that is not a router.
async fn forge_router_reports(cluster: &ManagedCluster, caller: &TlsConfig, victim: &str) {
    for url in cluster.coordinators.urls.values() {
        let mut admin = AdminServiceClient::new(channel(caller, url).await);
        let load = ReportLoadRequest {
            router: "forged".into(),
            tokens: u64::MAX,
            ..Default::default()
        };
        assert_refused(
            admin.report_load(load).await,
            "a load report from a non-router",
        );
        let unreachable = ReportUnreachableRequest {
            node: victim.to_string(),
            reporter: "forged".into(),
            reason: "forged".into(),
        };
        assert_refused(
            admin.report_unreachable(unreachable).await,
            "an unreachable report from a non-router",
        );
    }
}

/// Every coordinator answers, the node records are as they were, and a
/// forward is exact.
async fn assert_unharmed(cluster: &ManagedCluster, before: &[(String, String, i32)]) {
    for &id in cluster.coordinators.urls.keys() {
        assert_eq!(node_records(cluster, id).await, before, "coordinator {id}");
    }
    let fixture = Fixture::open("qwen2_moe");
    let (input, expected) = fixture.cases[&1].clone();
    let mut client = cluster.client().await;
    let output = client
        .forward_f32("", 1, &input, fixture.hidden_size())
        .await
        .unwrap();
    assert!(relative_l2(&output, &expected) < 1e-5);
}

async fn started(security: SandboxSecurity) -> (ManagedCluster, Vec<(String, String, i32)>) {
    let fixture = Fixture::open("qwen2_moe");
    let cluster =
        ManagedCluster::start_secured(&fixture.dir, 2, 1, Duration::from_secs(3600), security)
            .await;
    // Serving first, so every node has registered.
    assert_unharmed(&cluster, &node_records(&cluster, 1).await).await;
    let before = node_records(&cluster, 1).await;
    assert_eq!(before.len(), 2);
    (cluster, before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_tls_mode_certificates_of_the_wrong_role_or_id_are_refused() {
    let security = SandboxSecurity::tls();
    let (cluster, before) = started(security.clone()).await;
    let victim = before[0].0.clone();
    let node_url = before[0].1.clone();
    let other_node = before[1].0.clone();
    let SandboxSecurity::Tls(authority) = &security else {
        unreachable!()
    };
    // Valid certificates of the cluster's CA, of every wrong kind: a
    // router, another expert node, an operator, a client, no member at
    // all, and a coordinator speaking for another coordinator.
    let router = security.for_role(Role::Router, "router-9");
    forge_everything(&cluster, &router, &victim, 2, None).await;
    let expert = security.for_role(Role::Expert, &other_node);
    forge_everything(&cluster, &expert, &victim, 2, Some(&node_url)).await;
    forge_router_reports(&cluster, &expert, &victim).await;
    let nobody = authority.config(None);
    forge_everything(&cluster, &nobody, &victim, 2, Some(&node_url)).await;
    forge_router_reports(&cluster, &nobody, &victim).await;
    let client = security.for_role(Role::Client, "c");
    forge_router_reports(&cluster, &client, &victim).await;
    let coordinator = security.for_member(&Member::coordinator(3));
    for (&id, url) in &cluster.coordinators.urls {
        let mut peer = CoordinatorPeerServiceClient::new(channel(&coordinator, url).await);
        let speaking_for_another = peer.raft(forged_heartbeat(1, id)).await;
        assert_refused(
            speaking_for_another,
            "a raft message from another coordinator's id",
        );
    }
    assert_unharmed(&cluster, &before).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_plaintext_mode_calls_without_the_cluster_secret_are_refused() {
    let (cluster, before) = started(SandboxSecurity::secret()).await;
    let victim = before[0].0.clone();
    let node_url = before[0].1.clone();
    // No secret at all, claiming nothing.
    let anonymous = TlsConfig::plaintext();
    forge_everything(&cluster, &anonymous, &victim, 2, Some(&node_url)).await;
    forge_router_reports(&cluster, &anonymous, &victim).await;
    // A wrong secret, claiming to be whoever may make each call.
    let guess = "not-the-cluster-secret-but-long".to_string();
    for claimed in [
        Member::coordinator(2),
        member(Role::Expert, &victim),
        member(Role::Operator, "o"),
        member(Role::Router, "r"),
    ] {
        let forger = TlsConfig::with_cluster_secret(guess.clone(), claimed).unwrap();
        forge_everything(&cluster, &forger, &victim, 2, Some(&node_url)).await;
    }
    // The secret, but the wrong role: the role checks hold here too.
    let router = SandboxSecurity::secret().for_role(Role::Router, "router-9");
    forge_everything(&cluster, &router, &victim, 2, None).await;
    assert_unharmed(&cluster, &before).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_that_may_make_a_call_are_served() {
    let security = SandboxSecurity::secret();
    let (cluster, before) = started(security.clone()).await;
    let url = &cluster.coordinators.urls[&1];
    // An operator reads, as does any member; an expert node heartbeats as
    // itself; a router reports load.
    let operator = security.for_role(Role::Operator, "o");
    let mut admin = AdminServiceClient::new(channel(&operator, url).await);
    assert!(admin.cluster_status(ClusterStatusRequest {}).await.is_ok());
    let expert = security.for_role(Role::Expert, &before[0].0);
    let mut admin = AdminServiceClient::new(channel(&expert, url).await);
    let heartbeat = HeartbeatRequest {
        node: before[0].0.clone(),
        ..Default::default()
    };
    assert!(admin.heartbeat(heartbeat).await.is_ok());
    assert!(admin.cluster_status(ClusterStatusRequest {}).await.is_ok());
    let router = security.for_role(Role::Router, "r");
    let mut admin = AdminServiceClient::new(channel(&router, url).await);
    let load = ReportLoadRequest {
        router: "r".into(),
        ..Default::default()
    };
    assert!(admin.report_load(load).await.is_ok());
    assert_unharmed(&cluster, &before).await;
    cluster.shutdown().await;
}
