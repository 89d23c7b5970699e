//! The coordinator on the network: raft messages over gRPC between peers,
//! and the admin API every coordinator serves.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moemesh_core::config::ModelConfig;
use moemesh_core::placement::{NodeCapacity, initial_assignment};
use moemesh_proto::v1::{
    AddReplicaRequest, AddReplicaResponse, ClusterStatusRequest, ClusterStatusResponse,
    CoordinatorStatus, DrainNodeRequest, DrainNodeResponse, ExpertPlacement, HeartbeatRequest,
    HeartbeatResponse, LayerRebalance, LoadModelRequest, LoadModelResponse, LoadStatsRequest,
    LoadStatsResponse, MoveReplicaRequest, MoveReplicaResponse, NodeInfo, PeerStatusRequest,
    PlacementSnapshot, RaftAck, RaftBatch, RebalanceRequest, RebalanceResponse,
    RegisterNodeRequest, RegisterNodeResponse, ReplicaInfo, ReplicaMove, ReportLoadRequest,
    ReportLoadResponse, ReportReplicaReadyRequest, ReportReplicaReadyResponse,
    ReportUnreachableRequest, ReportUnreachableResponse, ShowPlacementRequest,
    ShowPlacementResponse, WatchPlacementRequest,
};
use moemesh_proto::{
    AdminServiceClient, AdminServiceServer, CoordinatorPeerServiceClient,
    CoordinatorPeerServiceServer, MAX_MESSAGE_BYTES,
};
use protobuf::Message as _;
use raft::prelude::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::load::LoadTracker;
use crate::membership::{self, Membership};
use crate::node::{RaftHandle, RaftNode, RaftNodeConfig, RaftStatus};
use crate::rebalance::{self, RebalanceCounters, RebalanceOptions, RebalanceOutcome};
use crate::state::{
    ClusterState, Command, ExpertKey, ModelRecord, NodeRecord, NodeStatus, Outcome, Proposal,
    ReplicaState,
};
use crate::transport::RaftTransport;
use crate::{CoordinatorError, CoordinatorResult};

/// Raft messages queued per peer before new ones are dropped (raft resends).
const PEER_QUEUE: usize = 4096;
/// How long one peer call may take before the peer counts as unreachable.
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

/// Where the other coordinators are, and membership timing.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub raft: RaftNodeConfig,
    /// Every coordinator's id and URL, this one included.
    pub peers: BTreeMap<u64, String>,
    /// Silence after which the leader declares an expert node dead.
    pub dead_after: Duration,
    /// How long a drained replica stays before removal during a move.
    pub drain_grace: Duration,
    /// How far back the load statistics reach.
    pub load_window: Duration,
    /// How the rebalancer plans and moves.
    pub rebalance: RebalanceOptions,
    /// Rebalance every model this often on the leader; None: only on request.
    pub rebalance_interval: Option<Duration>,
    /// Operators' calls (status, placement, loading, moves, statistics,
    /// rebalancing) must carry `authorization: Bearer <token>`; None: open.
    pub admin_token: Option<String>,
}

impl CoordinatorConfig {
    /// Defaults: nodes are dead after 5 s of silence; moves drain for 2 s;
    /// load statistics cover a minute.
    pub fn new(raft: RaftNodeConfig, peers: BTreeMap<u64, String>) -> Self {
        Self {
            raft,
            peers,
            dead_after: Duration::from_secs(5),
            drain_grace: membership::DRAIN_GRACE,
            load_window: Duration::from_secs(60),
            rebalance: RebalanceOptions::default(),
            rebalance_interval: None,
            admin_token: None,
        }
    }
}

/// Sends raft messages to peers over gRPC, one queue and task per peer.
struct GrpcTransport {
    queues: BTreeMap<u64, mpsc::Sender<Message>>,
}

impl GrpcTransport {
    fn start(
        own_id: u64,
        peers: &BTreeMap<u64, String>,
        node: Arc<OnceLock<RaftHandle>>,
    ) -> CoordinatorResult<Self> {
        let mut queues = BTreeMap::new();
        for (&peer, address) in peers.iter().filter(|(id, _)| **id != own_id) {
            let endpoint = moemesh_proto::tls::endpoint(address.clone())
                .map_err(|error| {
                    CoordinatorError::Rejected(format!(
                        "coordinator {peer} address {address:?}: {error}"
                    ))
                })?
                .tcp_nodelay(true)
                .connect_timeout(PEER_TIMEOUT)
                .timeout(PEER_TIMEOUT);
            let client = CoordinatorPeerServiceClient::new(endpoint.connect_lazy())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            let (message_tx, message_rx) = mpsc::channel(PEER_QUEUE);
            tokio::spawn(peer_sender_task(
                peer,
                client,
                message_rx,
                Arc::clone(&node),
            ));
            queues.insert(peer, message_tx);
        }
        Ok(Self { queues })
    }
}

/// Sends one peer's messages in batches, in order; reports it unreachable on failure.
async fn peer_sender_task(
    peer: u64,
    mut client: CoordinatorPeerServiceClient<Channel>,
    mut message_rx: mpsc::Receiver<Message>,
    node: Arc<OnceLock<RaftHandle>>,
) {
    while let Some(first) = message_rx.recv().await {
        let mut messages = vec![first.write_to_bytes().expect("raft messages encode").into()];
        while let Ok(message) = message_rx.try_recv() {
            messages.push(
                message
                    .write_to_bytes()
                    .expect("raft messages encode")
                    .into(),
            );
        }
        if let Err(status) = client.raft(RaftBatch { messages }).await {
            tracing::debug!(peer, code = ?status.code(), "coordinator unreachable");
            if let Some(handle) = node.get() {
                handle.report_unreachable(peer);
            }
        }
    }
}

impl RaftTransport for GrpcTransport {
    fn send(&self, messages: Vec<Message>) {
        for message in messages {
            if let Some(queue) = self.queues.get(&message.to) {
                // A full queue means the peer is slow or gone: raft resends.
                let _ = queue.try_send(message);
            }
        }
    }
}

/// The gRPC services of one coordinator.
#[derive(Clone)]
pub struct CoordinatorService {
    id: u64,
    peers: BTreeMap<u64, String>,
    node: RaftHandle,
    membership: Arc<Membership>,
    /// Lazily connected admin clients of the other coordinators, for
    /// forwarding heartbeats to the leader.
    peer_admin: BTreeMap<u64, AdminServiceClient<Channel>>,
    /// How long a drained replica stays before removal during a move.
    drain_grace: Duration,
    /// What routers and expert nodes report of their load.
    load: Arc<LoadTracker>,
    rebalancer: Rebalancer,
    /// See [`CoordinatorConfig::admin_token`].
    admin_token: Option<String>,
    /// Turns true when the server shuts down, ending placement streams,
    /// which would otherwise hold the graceful shutdown open forever.
    streams_closing: Arc<watch::Sender<bool>>,
}

fn status_to_proto(status: &RaftStatus, address: &str) -> CoordinatorStatus {
    CoordinatorStatus {
        id: status.id,
        address: address.to_string(),
        role: status.role.to_string(),
        term: status.term,
        leader_id: status.leader_id.unwrap_or(0),
        commit_index: status.commit_index,
        applied_index: status.applied_index,
    }
}

impl From<CoordinatorError> for Status {
    fn from(error: CoordinatorError) -> Self {
        let message = error.to_string();
        match error {
            CoordinatorError::NoLeader(_)
            | CoordinatorError::LeaderChanged { .. }
            | CoordinatorError::ShuttingDown => Status::unavailable(message),
            CoordinatorError::ProposalTimedOut { .. } | CoordinatorError::ReadTimedOut(_) => {
                Status::deadline_exceeded(message)
            }
            CoordinatorError::Rejected(_) => Status::failed_precondition(message),
            CoordinatorError::Storage(_) | CoordinatorError::Raft(_) => Status::internal(message),
        }
    }
}

fn fresh_request_id(given: String, kind: &str) -> String {
    if given.is_empty() {
        format!("{kind}-{:032x}", rand::random::<u128>())
    } else {
        given
    }
}

fn node_status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Joining => "joining",
        NodeStatus::Ready => "ready",
        NodeStatus::Draining => "draining",
        NodeStatus::Dead => "dead",
    }
}

/// Reads a checkpoint's config and describes the model for the cluster state.
fn describe_model(model: String, checkpoint: &str) -> Result<(ModelConfig, ModelRecord), Status> {
    let config = ModelConfig::from_dir(std::path::Path::new(checkpoint))
        .map_err(|error| Status::invalid_argument(error.to_string()))?;
    let model = if model.is_empty() {
        std::path::Path::new(checkpoint)
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .ok_or_else(|| {
                Status::invalid_argument(
                    "give a model id: the checkpoint path has no directory name",
                )
            })?
    } else {
        model
    };
    let record = ModelRecord {
        id: model,
        checkpoint: checkpoint.to_string(),
        family: config.family.to_string(),
        moe_layers: config.moe_layers(),
        experts_per_layer: config.experts_per_layer(),
    };
    Ok((config, record))
}

/// Compares without an early exit, so the time taken says nothing of
/// where a wrong token differs.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a rebalance needs, cloneable into the periodic task.
#[derive(Clone)]
struct Rebalancer {
    raft: RaftHandle,
    load: Arc<LoadTracker>,
    options: RebalanceOptions,
    counters: Arc<RebalanceCounters>,
    /// Held while a rebalance runs: one at a time.
    running: Arc<tokio::sync::Mutex<()>>,
}

impl Rebalancer {
    async fn rebalance_model(
        &self,
        model: &str,
        dry_run: bool,
    ) -> CoordinatorResult<RebalanceOutcome> {
        let _one_at_a_time = self.running.lock().await;
        rebalance::rebalance(
            &self.raft,
            &self.load,
            model,
            &self.options,
            dry_run,
            &self.counters,
        )
        .await
    }
}

/// On the leader, rebalances every model each `interval`.
async fn periodic_rebalance_task(rebalancer: Rebalancer, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Ok(status) = rebalancer.raft.status().await else {
            return;
        };
        if status.leader_id != Some(status.id) {
            continue;
        }
        let Ok(state) = rebalancer.raft.read().await else {
            continue;
        };
        for model in state.models.keys() {
            match rebalancer.rebalance_model(model, false).await {
                Ok(outcome) => tracing::info!(
                    model,
                    layers_changed = outcome
                        .layers
                        .iter()
                        .filter(|layer| !layer.added.is_empty() || !layer.removed.is_empty())
                        .count(),
                    moves_done = outcome.moves_done,
                    moves_failed = outcome.moves_failed,
                    "periodic rebalance"
                ),
                Err(error) => tracing::warn!(model, %error, "periodic rebalance failed"),
            }
        }
    }
}

/// The model `requested` names; empty names the only model loaded.
fn resolve_model(state: &ClusterState, requested: &str) -> Result<String, Status> {
    if !requested.is_empty() {
        return if state.models.contains_key(requested) {
            Ok(requested.to_string())
        } else {
            Err(Status::not_found(format!(
                "no model {requested:?}; loaded: {:?}",
                state.models.keys().collect::<Vec<_>>()
            )))
        };
    }
    match state.models.keys().collect::<Vec<_>>()[..] {
        [only] => Ok(only.clone()),
        [] => Err(Status::failed_precondition("no model is loaded")),
        ref several => Err(Status::invalid_argument(format!(
            "several models are loaded ({several:?}); name one"
        ))),
    }
}

impl CoordinatorService {
    /// Refuses an operator's call without the admin token, when one is set.
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.admin_token else {
            return Ok(());
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if presented
            .is_some_and(|presented| constant_time_eq(presented.as_bytes(), token.as_bytes()))
        {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this coordinator requires an admin token: moectl --token or MOEMESH_ADMIN_TOKEN",
            ))
        }
    }

    /// `message` as a request to another coordinator, with this one's
    /// admin token.
    fn to_peer<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.admin_token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// A client of the leader when it is another coordinator; None when
    /// this coordinator leads or no leader is known.
    async fn leader_if_not_self(&self) -> Result<Option<AdminServiceClient<Channel>>, Status> {
        let status = self.node.status().await?;
        Ok(status
            .leader_id
            .filter(|&leader| leader != self.id)
            .and_then(|leader| self.peer_admin.get(&leader).cloned()))
    }

    async fn propose(&self, request_id: String, command: Command) -> Result<u64, Status> {
        match self
            .node
            .propose(Proposal {
                request_id,
                command,
            })
            .await?
        {
            Outcome::Applied { epoch } => Ok(epoch),
            Outcome::Rejected { reason } => Err(Status::failed_precondition(reason)),
        }
    }

    /// The state for an answer: linearizable when a quorum confirms it in time.
    async fn current_state(&self) -> Result<Arc<ClusterState>, Status> {
        Ok(self.node.read().await?)
    }

    async fn peer_statuses(&self) -> Vec<CoordinatorStatus> {
        let calls = self.peers.iter().map(|(&id, address)| async move {
            if id == self.id {
                return match self.node.status().await {
                    Ok(status) => status_to_proto(&status, address),
                    Err(_) => unreachable_status(id, address),
                };
            }
            let Ok(endpoint) = moemesh_proto::tls::endpoint(address.clone()) else {
                return unreachable_status(id, address);
            };
            let endpoint = endpoint
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_millis(500));
            let Ok(channel) = endpoint.connect().await else {
                return unreachable_status(id, address);
            };
            match CoordinatorPeerServiceClient::new(channel)
                .peer_status(PeerStatusRequest {})
                .await
            {
                Ok(response) => response.into_inner(),
                Err(_) => unreachable_status(id, address),
            }
        });
        futures::future::join_all(calls).await
    }
}

fn unreachable_status(id: u64, address: &str) -> CoordinatorStatus {
    CoordinatorStatus {
        id,
        address: address.to_string(),
        role: "unreachable".into(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl moemesh_proto::CoordinatorPeerService for CoordinatorService {
    async fn raft(&self, request: Request<RaftBatch>) -> Result<Response<RaftAck>, Status> {
        for bytes in request.into_inner().messages {
            let message = Message::parse_from_bytes(&bytes).map_err(|error| {
                Status::invalid_argument(format!("undecodable raft message: {error}"))
            })?;
            self.node.step(message);
        }
        Ok(Response::new(RaftAck {}))
    }

    async fn peer_status(
        &self,
        _request: Request<PeerStatusRequest>,
    ) -> Result<Response<CoordinatorStatus>, Status> {
        let status = self.node.status().await?;
        Ok(Response::new(status_to_proto(
            &status,
            &self.peers[&self.id],
        )))
    }
}

fn node_info(node: &NodeRecord) -> NodeInfo {
    NodeInfo {
        id: node.id.clone(),
        address: node.address.clone(),
        group: node.group.clone(),
        device: node.device.clone(),
        memory_bytes: node.memory_bytes,
        status: node_status_name(node.status).into(),
    }
}

fn replica_state_name(state: ReplicaState) -> &'static str {
    match state {
        ReplicaState::Loading => "loading",
        ReplicaState::Ready => "ready",
        ReplicaState::Draining => "draining",
    }
}

/// The placement of `model` (all models when empty) with every node.
fn placement_snapshot(
    state: &ClusterState,
    model: &str,
    layer: Option<usize>,
) -> PlacementSnapshot {
    let experts = state
        .replicas
        .iter()
        .filter(|(key, _)| model.is_empty() || key.model == model)
        .filter(|(key, _)| layer.is_none_or(|layer| key.layer == layer))
        .map(|(key, replicas)| ExpertPlacement {
            model: key.model.clone(),
            layer: key.layer as u32,
            expert: key.expert,
            replicas: replicas
                .iter()
                .map(|replica| ReplicaInfo {
                    node: replica.node.clone(),
                    state: replica_state_name(replica.state).into(),
                })
                .collect(),
        })
        .collect();
    PlacementSnapshot {
        epoch: state.epoch,
        nodes: state.nodes.values().map(node_info).collect(),
        experts,
    }
}

fn expert_key(model: String, layer: u32, expert: u32) -> Result<ExpertKey, Status> {
    if model.is_empty() {
        return Err(Status::invalid_argument("model is required"));
    }
    Ok(ExpertKey {
        model,
        layer: layer as usize,
        expert,
    })
}

#[tonic::async_trait]
impl moemesh_proto::AdminService for CoordinatorService {
    type WatchPlacementStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<PlacementSnapshot, Status>> + Send + 'static>,
    >;

    async fn watch_placement(
        &self,
        request: Request<WatchPlacementRequest>,
    ) -> Result<Response<Self::WatchPlacementStream>, Status> {
        let model = request.into_inner().model;
        let mut applied = self.node.watch_applied();
        let mut closing = self.streams_closing.subscribe();
        let (snapshot_tx, snapshot_rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let mut last_sent: Option<PlacementSnapshot> = None;
            loop {
                let snapshot = placement_snapshot(&applied.borrow_and_update(), &model, None);
                if last_sent.as_ref() != Some(&snapshot) {
                    if snapshot_tx.send(Ok(snapshot.clone())).await.is_err() {
                        return;
                    }
                    last_sent = Some(snapshot);
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    _ = snapshot_tx.closed() => return,
                    _ = closing.wait_for(|closing| *closing) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(snapshot_rx),
        )))
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node))]
    async fn report_replica_ready(
        &self,
        request: Request<ReportReplicaReadyRequest>,
    ) -> Result<Response<ReportReplicaReadyResponse>, Status> {
        let ReportReplicaReadyRequest {
            node,
            model,
            layer,
            expert,
        } = request.into_inner();
        let key = expert_key(model, layer, expert)?;
        let state = self.current_state().await?;
        let replica_state = state
            .replicas
            .get(&key)
            .and_then(|replicas| replicas.iter().find(|replica| replica.node == node))
            .map(|replica| replica.state)
            .ok_or_else(|| {
                Status::failed_precondition(format!("{node} has no replica of {key}"))
            })?;
        let epoch = if replica_state == ReplicaState::Loading {
            let request_id = format!(
                "ready/{node}/{}/{layer}/{expert}/{}",
                key.model, state.epoch
            );
            self.propose(request_id, Command::ReplicaReady { key, node })
                .await?
        } else {
            state.epoch
        };
        Ok(Response::new(ReportReplicaReadyResponse { epoch }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let heartbeat = request.into_inner();
        self.membership.heard_from(&heartbeat.node);
        self.load.record_node(
            &heartbeat.node,
            heartbeat.queue_depth,
            heartbeat.busy_micros,
            heartbeat.pairs,
        );
        // Only the leader acts on heartbeats: hand it this one.
        if let Some(mut client) = self.leader_if_not_self().await? {
            let _ = client.heartbeat(heartbeat).await;
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn report_unreachable(
        &self,
        request: Request<ReportUnreachableRequest>,
    ) -> Result<Response<ReportUnreachableResponse>, Status> {
        let report = request.into_inner();
        tracing::warn!(node = %report.node, reporter = %report.reporter, reason = %report.reason, "expert node reported unreachable");
        self.membership.suspect(&report.node);
        if let Some(mut client) = self.leader_if_not_self().await? {
            let _ = client.report_unreachable(report).await;
        }
        Ok(Response::new(ReportUnreachableResponse {}))
    }

    async fn report_load(
        &self,
        request: Request<ReportLoadRequest>,
    ) -> Result<Response<ReportLoadResponse>, Status> {
        let report = request.into_inner();
        self.load.record_router(
            &report.model,
            &report.router,
            &report.layers,
            [report.tokens, report.node_sends, report.bytes_sent],
        );
        // The leader's window is the one the rebalancer plans with.
        if let Some(mut client) = self.leader_if_not_self().await? {
            let _ = client.report_load(report).await;
        }
        Ok(Response::new(ReportLoadResponse {}))
    }

    async fn load_stats(
        &self,
        request: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        // The leader hears every report; ask it, and answer from here only
        // when it cannot be reached.
        if let Some(mut client) = self.leader_if_not_self().await?
            && let Ok(reply) = client.load_stats(self.to_peer(request.clone())).await
        {
            return Ok(reply);
        }
        let state = self.current_state().await?;
        let model = resolve_model(&state, &request.model)?;
        let (window_seconds, layers) = self.load.layer_loads(&model);
        let (nodes_per_token, bytes_per_token) = self.load.dispatch(&model);
        Ok(Response::new(LoadStatsResponse {
            window_seconds,
            layers,
            nodes: self.load.node_loads(),
            nodes_per_token,
            bytes_per_token,
            model,
        }))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        // The leader holds the load window and carries out moves, which
        // take longer than the peer clients' timeout: call it afresh.
        let status = self.node.status().await?;
        if let Some(leader) = status.leader_id.filter(|&leader| leader != self.id)
            && let Some(address) = self.peers.get(&leader)
        {
            let channel = moemesh_proto::tls::endpoint(address.clone())
                .map_err(|error| Status::internal(format!("leader {leader} address: {error}")))?
                .connect()
                .await
                .map_err(|error| Status::unavailable(format!("leader {leader}: {error}")))?;
            let mut client = AdminServiceClient::new(channel);
            return client.rebalance(self.to_peer(request)).await;
        }
        let state = self.current_state().await?;
        let model = resolve_model(&state, &request.model)?;
        let outcome = self
            .rebalancer
            .rebalance_model(&model, request.dry_run)
            .await
            .map_err(Status::from)?;
        let moves = |moves: &[(String, u32)]| {
            moves
                .iter()
                .map(|(node, expert)| ReplicaMove {
                    expert: *expert,
                    node: node.clone(),
                })
                .collect()
        };
        Ok(Response::new(RebalanceResponse {
            model,
            window_seconds: outcome.window_seconds,
            layers: outcome
                .layers
                .iter()
                .map(|layer| LayerRebalance {
                    layer: layer.layer as u32,
                    max_over_mean_before: layer.before,
                    max_over_mean_after: layer.after,
                    added: moves(&layer.added),
                    removed: moves(&layer.removed),
                })
                .collect(),
            dry_run: request.dry_run,
            moves_done: outcome.moves_done,
            moves_failed: outcome.moves_failed,
            errors: outcome.errors,
        }))
    }

    #[instrument(skip_all, fields(expert = request.get_ref().expert, from = %request.get_ref().from_node, to = %request.get_ref().to_node))]
    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        self.authorize(&request)?;
        let MoveReplicaRequest {
            model,
            layer,
            expert,
            from_node,
            to_node,
            request_id,
        } = request.into_inner();
        let key = expert_key(model, layer, expert)?;
        let request_id = fresh_request_id(request_id, "move");
        let started = std::time::Instant::now();
        tracing::info!(%key, from = %from_node, to = %to_node, "moving a replica");
        let result = membership::move_replica(
            &self.node,
            &request_id,
            key.clone(),
            &from_node,
            &to_node,
            self.drain_grace,
        )
        .await;
        match &result {
            Ok(_) => tracing::info!(%key, took = ?started.elapsed(), "move done"),
            Err(error) => tracing::warn!(%key, %error, "move failed"),
        }
        Ok(Response::new(MoveReplicaResponse {
            epoch: result?,
            took_ms: started.elapsed().as_millis() as u64,
        }))
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node))]
    async fn drain_node(
        &self,
        request: Request<DrainNodeRequest>,
    ) -> Result<Response<DrainNodeResponse>, Status> {
        self.authorize(&request)?;
        let node = request.into_inner().node;
        tracing::info!(%node, "draining a node");
        let moved = membership::drain_node(&self.node, &node, self.drain_grace).await?;
        tracing::info!(%node, moved, "node drained");
        Ok(Response::new(DrainNodeResponse {
            moved,
            epoch: self.node.applied_state().epoch,
        }))
    }

    #[instrument(skip_all, fields(expert = request.get_ref().expert, node = %request.get_ref().node))]
    async fn add_replica(
        &self,
        request: Request<AddReplicaRequest>,
    ) -> Result<Response<AddReplicaResponse>, Status> {
        self.authorize(&request)?;
        let AddReplicaRequest {
            model,
            layer,
            expert,
            node,
            request_id,
        } = request.into_inner();
        let key = expert_key(model, layer, expert)?;
        let request_id = fresh_request_id(request_id, "replicate");
        let epoch = membership::add_replica(&self.node, &request_id, key, &node).await?;
        Ok(Response::new(AddReplicaResponse { epoch }))
    }

    #[instrument(skip_all)]
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.authorize(&request)?;
        let own = self.node.status().await?;
        // Diagnostics should work during an election: fall back to the
        // state applied here when no quorum confirms a read.
        let state = match self.node.read().await {
            Ok(state) => state,
            Err(_) => self.node.applied_state(),
        };
        let coordinators = self.peer_statuses().await;
        Ok(Response::new(ClusterStatusResponse {
            coordinators,
            leader_id: own.leader_id.unwrap_or(0),
            term: own.term,
            epoch: state.epoch,
            nodes: state.nodes.values().map(node_info).collect(),
            models: state.models.keys().cloned().collect(),
            rebalance_runs: self
                .rebalancer
                .counters
                .runs
                .load(std::sync::atomic::Ordering::Relaxed),
            rebalance_moves_done: self
                .rebalancer
                .counters
                .moves_done
                .load(std::sync::atomic::Ordering::Relaxed),
            rebalance_moves_failed: self
                .rebalancer
                .counters
                .moves_failed
                .load(std::sync::atomic::Ordering::Relaxed),
        }))
    }

    #[instrument(skip_all, fields(node = request.get_ref().node.as_ref().map(|node| node.id.as_str())))]
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let RegisterNodeRequest {
            node,
            request_id,
            model,
            checkpoint,
            serving,
        } = request.into_inner();
        let node = node.ok_or_else(|| Status::invalid_argument("node is missing"))?;
        if node.id.is_empty() || node.address.is_empty() {
            return Err(Status::invalid_argument("node id and address are required"));
        }
        let request_id = fresh_request_id(request_id, "register");
        let node_id = node.id.clone();
        // Registering counts as being heard from.
        self.membership.heard_from(&node_id);
        let record = NodeRecord {
            id: node.id,
            address: node.address,
            group: if node.group.is_empty() {
                "default".into()
            } else {
                node.group
            },
            device: if node.device.is_empty() {
                "cpu".into()
            } else {
                node.device
            },
            memory_bytes: node.memory_bytes,
            status: NodeStatus::Ready,
        };
        let epoch = self
            .propose(
                format!("{request_id}/node"),
                Command::RegisterNode { node: record },
            )
            .await?;
        if serving.is_empty() {
            return Ok(Response::new(RegisterNodeResponse { epoch }));
        }
        // The node already serves these experts: record them as ready replicas.
        let (_, model_record) = describe_model(model, &checkpoint)?;
        let model = model_record.id.clone();
        self.propose(
            format!("{request_id}/model"),
            Command::AddModel {
                model: model_record,
            },
        )
        .await?;
        let keys: Vec<ExpertKey> = serving
            .into_iter()
            .flat_map(|layer| {
                let model = model.clone();
                layer.experts.into_iter().map(move |expert| ExpertKey {
                    model: model.clone(),
                    layer: layer.layer as usize,
                    expert,
                })
            })
            .collect();
        let epoch = self
            .propose(
                format!("{request_id}/serving"),
                Command::AddServingReplicas {
                    node: node_id,
                    keys,
                },
            )
            .await?;
        Ok(Response::new(RegisterNodeResponse { epoch }))
    }

    #[instrument(skip_all, fields(checkpoint = %request.get_ref().checkpoint))]
    async fn load_model(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        self.authorize(&request)?;
        let LoadModelRequest {
            model,
            checkpoint,
            replicas,
            request_id,
        } = request.into_inner();
        let request_id = fresh_request_id(request_id, "load");
        let (config, record) = describe_model(model, &checkpoint)?;
        let model = record.id.clone();
        let mut epoch = self
            .propose(
                format!("{request_id}/model"),
                Command::AddModel { model: record },
            )
            .await?;

        let state = self.current_state().await?;
        let ready_nodes: Vec<NodeCapacity> = state
            .nodes
            .values()
            .filter(|node| node.status == NodeStatus::Ready)
            .map(|node| NodeCapacity {
                id: node.id.clone(),
                group: node.group.clone(),
                memory_bytes: node.memory_bytes,
            })
            .collect();
        let mut experts = Vec::new();
        for layer in config.moe_layers() {
            for expert in 0..config.experts_per_layer() as u32 {
                let key = ExpertKey {
                    model: model.clone(),
                    layer,
                    expert,
                };
                if state
                    .replicas
                    .get(&key)
                    .is_some_and(|replicas| !replicas.is_empty())
                {
                    continue;
                }
                let bytes =
                    3 * config.hidden_size * config.intermediate_size_of(expert) * size_of::<f32>();
                experts.push((layer, expert, bytes as u64));
            }
        }
        let assignment = initial_assignment(&ready_nodes, &experts, replicas.max(1) as usize)
            .map_err(Status::failed_precondition)?;
        let replicas: Vec<(ExpertKey, String)> = assignment
            .iter()
            .map(|&(layer, expert, node)| {
                (
                    ExpertKey {
                        model: model.clone(),
                        layer,
                        expert,
                    },
                    ready_nodes[node].id.clone(),
                )
            })
            .collect();
        // One log entry for the whole model, however many experts it has.
        if !replicas.is_empty() {
            epoch = self
                .propose(
                    format!("{request_id}/replicas"),
                    Command::AddReplicas { replicas },
                )
                .await?;
        }
        Ok(Response::new(LoadModelResponse {
            model,
            replicas_added: assignment.len() as u32,
            epoch,
        }))
    }

    #[instrument(skip_all)]
    async fn show_placement(
        &self,
        request: Request<ShowPlacementRequest>,
    ) -> Result<Response<ShowPlacementResponse>, Status> {
        self.authorize(&request)?;
        let filter = request.into_inner();
        let state = self.current_state().await?;
        let layer = filter.has_layer.then_some(filter.layer as usize);
        let snapshot = placement_snapshot(&state, &filter.model, layer);
        Ok(Response::new(ShowPlacementResponse {
            epoch: snapshot.epoch,
            experts: snapshot.experts,
        }))
    }
}

/// A running coordinator: its Raft node and the services around it.
pub struct Coordinator {
    pub service: CoordinatorService,
}

impl Coordinator {
    /// Opens the store, starts the Raft node and the peer transport.
    pub fn start(config: CoordinatorConfig) -> CoordinatorResult<Self> {
        let id = config.raft.id;
        if !config.peers.contains_key(&id) {
            return Err(CoordinatorError::Rejected(format!(
                "--peers must include this coordinator's id {id}"
            )));
        }
        let mut raft_config = config.raft.clone();
        raft_config.voters = config.peers.keys().copied().collect();
        let handle_slot = Arc::new(OnceLock::new());
        let transport = GrpcTransport::start(id, &config.peers, Arc::clone(&handle_slot))?;
        let node = RaftNode::spawn(raft_config, Arc::new(transport))?;
        let _ = handle_slot.set(node.clone());
        let membership = Membership::new(node.clone(), config.dead_after);
        tokio::spawn(Arc::clone(&membership).monitor_task());
        let mut peer_admin = BTreeMap::new();
        for (&peer, address) in config.peers.iter().filter(|(peer, _)| **peer != id) {
            let endpoint = moemesh_proto::tls::endpoint(address.clone())
                .map_err(|error| {
                    CoordinatorError::Rejected(format!(
                        "coordinator {peer} address {address:?}: {error}"
                    ))
                })?
                .timeout(PEER_TIMEOUT);
            peer_admin.insert(peer, AdminServiceClient::new(endpoint.connect_lazy()));
        }
        let load = Arc::new(LoadTracker::new(config.load_window));
        let rebalancer = Rebalancer {
            raft: node.clone(),
            load: Arc::clone(&load),
            options: RebalanceOptions {
                drain_grace: config.drain_grace,
                ..config.rebalance
            },
            counters: Arc::new(RebalanceCounters::default()),
            running: Arc::new(tokio::sync::Mutex::new(())),
        };
        let service = CoordinatorService {
            streams_closing: Arc::new(watch::channel(false).0),
            id,
            peers: config.peers,
            node,
            membership,
            peer_admin,
            drain_grace: config.drain_grace,
            load: Arc::clone(&load),
            rebalancer: rebalancer.clone(),
            admin_token: config.admin_token.clone(),
        };
        if let Some(interval) = config.rebalance_interval {
            tokio::spawn(periodic_rebalance_task(rebalancer, interval));
        }
        Ok(Self { service })
    }

    /// Returns the Raft node's handle.
    pub fn node(&self) -> &RaftHandle {
        &self.service.node
    }

    /// Serves the peer and admin services (and gRPC health) on `listener`
    /// until `shutdown`, then stops the Raft node and closes its store.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> CoordinatorResult<()> {
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_serving::<AdminServiceServer<CoordinatorService>>()
            .await;
        let node = self.service.node.clone();
        let streams_closing = Arc::clone(&self.service.streams_closing);
        let raft_stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shutdown = {
            let node = node.clone();
            let raft_stopped = Arc::clone(&raft_stopped);
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    // Without its Raft node a coordinator can only refuse: stop
                    // serving so that a supervisor restarts it from its store.
                    _ = node.stopped() => raft_stopped.store(true, std::sync::atomic::Ordering::Relaxed),
                }
                streams_closing.send_replace(true);
            }
        };
        let result = moemesh_proto::tls::server()
            .map_err(|error| CoordinatorError::Rejected(format!("TLS setup failed: {error}")))?
            .add_service(health_service)
            .add_service(
                CoordinatorPeerServiceServer::new(self.service.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(AdminServiceServer::new(self.service))
            .serve_with_incoming_shutdown(moemesh_proto::incoming_without_delay(listener), shutdown)
            .await;
        node.shutdown().await;
        result.map_err(|error| CoordinatorError::Storage(format!("server failed: {error}")))?;
        if raft_stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(CoordinatorError::Storage(
                "the raft node stopped; see the errors above".into(),
            ));
        }
        Ok(())
    }
}
