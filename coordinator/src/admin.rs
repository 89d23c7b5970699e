//! The `AdminService` every coordinator serves: expert nodes register and
//! report there, routers watch the placement and report load, and
//! operators (`moectl`) inspect and change the cluster.
//!
//! Handlers stay thin: they [`authorize`] the caller, decode the request, hand the work to its owner (the Raft node, [`crate::placement`],
//! [`crate::registration`], [`crate::membership`], the [`Rebalancer`], or
//! the leader through [`LeaderForwarding`]) and encode the answer.
//!
//! [`authorize`]: crate::auth

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::{
    AddReplicaRequest, AddReplicaResponse, ClusterStatusRequest, ClusterStatusResponse,
    DrainNodeRequest, DrainNodeResponse, HeartbeatRequest, HeartbeatResponse, LayerRebalance,
    LoadModelRequest, LoadModelResponse, LoadStatsRequest, LoadStatsResponse, MoveReplicaRequest,
    MoveReplicaResponse, PlacementUpdate, RebalanceRequest, RebalanceResponse, RegisterNodeRequest,
    RegisterNodeResponse, ReplicaMove, ReportLoadRequest, ReportLoadResponse,
    ReportReplicaReadyRequest, ReportReplicaReadyResponse, ReportUnreachableRequest,
    ReportUnreachableResponse, ShowPlacementRequest, ShowPlacementResponse, WatchPlacementRequest,
};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::auth::OperatorAuth;
use crate::forward::LeaderForwarding;
use crate::load::LoadTracker;
use crate::membership::{self, Membership};
use crate::metrics::{CoordinatorMetrics, MoveOutcome};
use crate::node::{RaftHandle, fresh_request_id};
use crate::peer::coordinator_statuses;
use crate::placement::{
    DescribedModel, describe_model, expert_key, initial_replicas, node_info, placement_snapshot,
    resolve_model,
};
use crate::rebalance::{RebalanceOutcome, Rebalancer};
use crate::registration;
use crate::state::Command;
use crate::watch::{PlacementStream, run_placement_stream};

/// What the `AdminService` handlers of one coordinator work with; the
/// server wires it up.
#[derive(Clone)]
pub(crate) struct AdminApi {
    pub(crate) own_id: u64,
    pub(crate) raft: RaftHandle,
    /// Every coordinator's URL, for gathering their statuses.
    pub(crate) peers: BTreeMap<u64, String>,
    pub(crate) tls: TlsConfig,
    pub(crate) auth: OperatorAuth,
    pub(crate) forward: LeaderForwarding,
    /// Heartbeats and suspicions, acted on by the leader's monitor.
    pub(crate) membership: Arc<Membership>,
    /// What routers and expert nodes report of their load.
    pub(crate) load: Arc<LoadTracker>,
    pub(crate) rebalancer: Rebalancer,
    /// How long a drained replica stays before removal during a move.
    pub(crate) drain_grace: Duration,
    /// Counts heartbeats and the moves operators ask for.
    pub(crate) metrics: CoordinatorMetrics,
    /// Turns true when the server shuts down, ending placement streams,
    /// which would otherwise hold the graceful shutdown open forever. The
    /// server holds another clone to send it.
    pub(crate) streams_closing: Arc<watch::Sender<bool>>,
}

fn rebalance_response(
    model: String,
    dry_run: bool,
    outcome: RebalanceOutcome,
) -> RebalanceResponse {
    let moves = |moves: &[(String, u32)]| {
        moves
            .iter()
            .map(|(node, expert)| ReplicaMove {
                expert: *expert,
                node: node.clone(),
            })
            .collect()
    };
    RebalanceResponse {
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
        dry_run,
        moves_done: outcome.moves_done,
        moves_failed: outcome.moves_failed,
        errors: outcome.errors,
    }
}

#[tonic::async_trait]
impl moemesh_proto::AdminService for AdminApi {
    type WatchPlacementStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<PlacementUpdate, Status>> + Send + 'static>,
    >;

    async fn watch_placement(
        &self,
        request: Request<WatchPlacementRequest>,
    ) -> Result<Response<Self::WatchPlacementStream>, Status> {
        self.auth.authorize_member(&request, "WatchPlacement")?;
        let request = request.into_inner();
        let stream = PlacementStream::new(request.model, request.since_revision);
        // One update waits at a time: a slow watcher's next one folds in
        // whatever changes meanwhile.
        let (update_tx, update_rx) = mpsc::channel(1);
        tokio::spawn(run_placement_stream(
            stream,
            self.raft.watch_applied(),
            self.raft.placement_history(),
            self.streams_closing.subscribe(),
            update_tx,
            self.metrics.clone(),
        ));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(update_rx),
        )))
    }

    #[instrument(skip_all, fields(node = %request.get_ref().node))]
    async fn report_replica_ready(
        &self,
        request: Request<ReportReplicaReadyRequest>,
    ) -> Result<Response<ReportReplicaReadyResponse>, Status> {
        let node = &request.get_ref().node;
        self.auth
            .authorize_node(&request, "ReportReplicaReady", node)?;
        let epoch = registration::report_replica_ready(&self.raft, request.into_inner()).await?;
        Ok(Response::new(ReportReplicaReadyResponse { epoch }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        self.auth
            .authorize_node(&request, "Heartbeat", &request.get_ref().node)?;
        let heartbeat = request.into_inner();
        self.metrics.count_heartbeat();
        registration::record_heartbeat(&self.membership, &self.load, &heartbeat);
        // Only the leader acts on heartbeats: hand it this one.
        if let Some(mut leader) = self.forward.leader_if_not_self().await? {
            let _ = leader.heartbeat(heartbeat).await;
        }
        Ok(Response::new(HeartbeatResponse {}))
    }

    async fn report_unreachable(
        &self,
        request: Request<ReportUnreachableRequest>,
    ) -> Result<Response<ReportUnreachableResponse>, Status> {
        self.auth.authorize_router(&request, "ReportUnreachable")?;
        let report = request.into_inner();
        registration::record_unreachable(&self.membership, &report);
        if let Some(mut leader) = self.forward.leader_if_not_self().await? {
            let _ = leader.report_unreachable(report).await;
        }
        Ok(Response::new(ReportUnreachableResponse {}))
    }

    async fn report_load(
        &self,
        request: Request<ReportLoadRequest>,
    ) -> Result<Response<ReportLoadResponse>, Status> {
        self.auth.authorize_router(&request, "ReportLoad")?;
        let report = request.into_inner();
        self.load.record_router(
            &report.model,
            &report.router,
            &report.layers,
            [report.tokens, report.node_sends, report.bytes_sent],
        );
        // The leader's window is the one the rebalancer plans with.
        if let Some(mut leader) = self.forward.leader_if_not_self().await? {
            let _ = leader.report_load(report).await;
        }
        Ok(Response::new(ReportLoadResponse {}))
    }

    async fn load_stats(
        &self,
        request: Request<LoadStatsRequest>,
    ) -> Result<Response<LoadStatsResponse>, Status> {
        self.auth.authorize_read(&request, "LoadStats")?;
        let request = request.into_inner();
        // The leader hears every report; ask it, and answer from here only
        // when it cannot be reached.
        if let Some(mut leader) = self.forward.leader_if_not_self().await?
            && let Ok(reply) = leader
                .load_stats(self.forward.to_peer(request.clone()))
                .await
        {
            return Ok(reply);
        }
        let state = self.raft.read().await?;
        let model = resolve_model(&state, &request.model)?;
        let loads = self.load.layer_loads(&model);
        let dispatch = self.load.dispatch(&model);
        let mut nodes = self.load.node_work();
        for work in &mut nodes {
            if let Some(record) = state.nodes.get(&work.node) {
                work.device.clone_from(&record.device);
            }
        }
        Ok(Response::new(LoadStatsResponse {
            window_seconds: loads.seconds,
            layers: loads.layers,
            nodes,
            nodes_per_token: dispatch.nodes,
            bytes_per_token: dispatch.bytes,
            model,
        }))
    }

    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.auth.authorize_write(&request, "Rebalance")?;
        let request = request.into_inner();
        // The leader holds the load window and carries out moves, which
        // take longer than the peer clients' timeout: call it afresh.
        if let Some(mut leader) = self.forward.leader_if_not_self_untimed().await? {
            return leader.rebalance(self.forward.to_peer(request)).await;
        }
        let state = self.raft.read().await?;
        let model = resolve_model(&state, &request.model)?;
        let outcome = self
            .rebalancer
            .rebalance_model(&model, request.dry_run)
            .await?;
        Ok(Response::new(rebalance_response(
            model,
            request.dry_run,
            outcome,
        )))
    }

    #[instrument(skip_all, fields(expert = request.get_ref().expert, from = %request.get_ref().from_node, to = %request.get_ref().to_node))]
    async fn move_replica(
        &self,
        request: Request<MoveReplicaRequest>,
    ) -> Result<Response<MoveReplicaResponse>, Status> {
        self.auth.authorize_write(&request, "MoveReplica")?;
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
        let started = Instant::now();
        tracing::info!(%key, from = %from_node, to = %to_node, "moving a replica");
        let result = membership::move_replica(
            &self.raft,
            &self.metrics,
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
        self.auth.authorize_write(&request, "DrainNode")?;
        let node = request.into_inner().node;
        tracing::info!(%node, "draining a node");
        let moved =
            membership::drain_node(&self.raft, &self.metrics, &node, self.drain_grace).await?;
        tracing::info!(%node, moved, "node drained");
        Ok(Response::new(DrainNodeResponse {
            moved,
            epoch: self.raft.applied_state().epoch,
        }))
    }

    #[instrument(skip_all, fields(expert = request.get_ref().expert, node = %request.get_ref().node))]
    async fn add_replica(
        &self,
        request: Request<AddReplicaRequest>,
    ) -> Result<Response<AddReplicaResponse>, Status> {
        self.auth.authorize_write(&request, "AddReplica")?;
        let AddReplicaRequest {
            model,
            layer,
            expert,
            node,
            request_id,
        } = request.into_inner();
        let key = expert_key(model, layer, expert)?;
        let request_id = fresh_request_id(request_id, "replicate");
        let result = membership::add_replica(&self.raft, &request_id, key, &node).await;
        self.metrics.count_move(match result {
            Ok(_) => MoveOutcome::Done,
            Err(_) => MoveOutcome::Failed,
        });
        Ok(Response::new(AddReplicaResponse { epoch: result? }))
    }

    #[instrument(skip_all)]
    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.auth.authorize_read(&request, "ClusterStatus")?;
        let own = self.raft.status().await?;
        // Diagnostics should work during an election: fall back to the
        // state applied here when no quorum confirms a read.
        let state = match self.raft.read().await {
            Ok(state) => state,
            Err(_) => self.raft.applied_state(),
        };
        let coordinators =
            coordinator_statuses(self.own_id, &self.raft, &self.peers, &self.tls).await;
        let counters = self.rebalancer.counters();
        Ok(Response::new(ClusterStatusResponse {
            coordinators,
            leader_id: own.leader_id.unwrap_or(0),
            term: own.term,
            epoch: state.epoch,
            nodes: state.nodes.values().map(node_info).collect(),
            models: state.models.keys().cloned().collect(),
            rebalance_runs: counters.runs.load(Ordering::Relaxed),
            rebalance_moves_done: counters.moves_done.load(Ordering::Relaxed),
            rebalance_moves_failed: counters.moves_failed.load(Ordering::Relaxed),
        }))
    }

    #[instrument(skip_all, fields(node = request.get_ref().node.as_ref().map(|node| node.id.as_str())))]
    async fn register_node(
        &self,
        request: Request<RegisterNodeRequest>,
    ) -> Result<Response<RegisterNodeResponse>, Status> {
        let node = request.get_ref().node.as_ref();
        let node_id = node.map(|node| node.id.as_str()).unwrap_or_default();
        self.auth
            .authorize_node(&request, "RegisterNode", node_id)?;
        let epoch =
            registration::register_node(&self.raft, &self.membership, request.into_inner()).await?;
        Ok(Response::new(RegisterNodeResponse { epoch }))
    }

    #[instrument(skip_all, fields(checkpoint = %request.get_ref().checkpoint))]
    async fn load_model(
        &self,
        request: Request<LoadModelRequest>,
    ) -> Result<Response<LoadModelResponse>, Status> {
        self.auth.authorize_write(&request, "LoadModel")?;
        let LoadModelRequest {
            model,
            checkpoint,
            replicas,
            request_id,
        } = request.into_inner();
        let request_id = fresh_request_id(request_id, "load");
        let DescribedModel { config, record } = describe_model(model, &checkpoint)?;
        let model = record.id.clone();
        let add_model = Command::AddModel { model: record };
        let mut epoch = self
            .raft
            .propose_applied(format!("{request_id}/model"), add_model)
            .await?;
        let state = self.raft.read().await?;
        let replicas = initial_replicas(&state, &config, &model, replicas as usize)?;
        let replicas_added = replicas.len() as u32;
        // One log entry for the whole model, however many experts it has.
        if !replicas.is_empty() {
            epoch = self
                .raft
                .propose_applied(
                    format!("{request_id}/replicas"),
                    Command::AddReplicas { replicas },
                )
                .await?;
        }
        Ok(Response::new(LoadModelResponse {
            model,
            replicas_added,
            epoch,
        }))
    }

    #[instrument(skip_all)]
    async fn show_placement(
        &self,
        request: Request<ShowPlacementRequest>,
    ) -> Result<Response<ShowPlacementResponse>, Status> {
        self.auth.authorize_read(&request, "ShowPlacement")?;
        let filter = request.into_inner();
        let state = self.raft.read().await?;
        let layer = filter.has_layer.then_some(filter.layer as usize);
        let snapshot = placement_snapshot(&state, &filter.model, layer);
        Ok(Response::new(ShowPlacementResponse {
            epoch: snapshot.epoch,
            experts: snapshot.experts,
        }))
    }
}
