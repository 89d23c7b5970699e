//! Operators' calls on a coordinator group: status, placement, loading
//! models, moves, load statistics and rebalancing.

use moemesh_proto::v1::{
    AddReplicaRequest, AddReplicaResponse, ClusterStatusRequest, ClusterStatusResponse,
    DrainNodeRequest, DrainNodeResponse, LoadModelRequest, LoadModelResponse, LoadStatsRequest,
    LoadStatsResponse, MoveReplicaRequest, MoveReplicaResponse, RebalanceRequest,
    RebalanceResponse, ShowPlacementRequest, ShowPlacementResponse,
};

use crate::coordinator::call_rpc;
use crate::{ClientError, CoordinatorClient};

/// A request id no other call uses, so that a call retried on another
/// coordinator applies once.
pub(crate) fn fresh_request_id(kind: &str) -> String {
    use std::hash::{BuildHasher, RandomState};
    let state = RandomState::new();
    let high = state.hash_one(std::time::SystemTime::now());
    let low = state.hash_one(std::process::id());
    format!("{kind}-{high:016x}{low:016x}")
}

impl CoordinatorClient {
    /// Returns the coordinators, the leader, the epoch and the expert nodes.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, ClientError> {
        call_rpc!(self, cluster_status, ClusterStatusRequest {})
    }

    /// Returns the load window of `model` (empty: the only model): tokens
    /// per layer and expert, and each expert node's recent work.
    pub async fn load_stats(&mut self, model: &str) -> Result<LoadStatsResponse, ClientError> {
        let request = LoadStatsRequest {
            model: model.to_string(),
        };
        call_rpc!(self, load_stats, request)
    }

    /// Plans every MoE layer of `model` from the load window and, unless
    /// `dry_run`, carries the plan out; returns what it planned and did.
    pub async fn rebalance(
        &mut self,
        model: &str,
        dry_run: bool,
    ) -> Result<RebalanceResponse, ClientError> {
        let request = RebalanceRequest {
            model: model.to_string(),
            dry_run,
        };
        call_rpc!(self, rebalance, request)
    }

    /// Returns the placement, optionally of one model and one layer.
    pub async fn show_placement(
        &mut self,
        model: &str,
        layer: Option<u32>,
    ) -> Result<ShowPlacementResponse, ClientError> {
        let request = ShowPlacementRequest {
            model: model.to_string(),
            has_layer: layer.is_some(),
            layer: layer.unwrap_or(0),
        };
        call_rpc!(self, show_placement, request)
    }

    /// Registers a model from a checkpoint directory and places its experts.
    /// `request_id` makes a retry apply once.
    pub async fn load_model(
        &mut self,
        model: &str,
        checkpoint: &str,
        replicas: u32,
        request_id: &str,
    ) -> Result<LoadModelResponse, ClientError> {
        let request = LoadModelRequest {
            model: model.to_string(),
            checkpoint: checkpoint.to_string(),
            replicas,
            request_id: request_id.to_string(),
        };
        call_rpc!(self, load_model, request)
    }

    /// Moves one replica of an expert to another node without failing
    /// requests; returns when the old replica is gone.
    pub async fn move_replica(
        &mut self,
        model: &str,
        layer: u32,
        expert: u32,
        from_node: &str,
        to_node: &str,
    ) -> Result<MoveReplicaResponse, ClientError> {
        let request = MoveReplicaRequest {
            model: model.to_string(),
            layer,
            expert,
            from_node: from_node.to_string(),
            to_node: to_node.to_string(),
            request_id: fresh_request_id("move"),
        };
        call_rpc!(self, move_replica, request)
    }

    /// Adds a replica of an expert on a node; returns once it serves.
    pub async fn add_replica(
        &mut self,
        model: &str,
        layer: u32,
        expert: u32,
        node: &str,
    ) -> Result<AddReplicaResponse, ClientError> {
        let request = AddReplicaRequest {
            model: model.to_string(),
            layer,
            expert,
            node: node.to_string(),
            request_id: fresh_request_id("replicate"),
        };
        call_rpc!(self, add_replica, request)
    }

    /// Moves every replica off a node, one at a time; returns when it is empty.
    pub async fn drain_node(&mut self, node: &str) -> Result<DrainNodeResponse, ClientError> {
        let request = DrainNodeRequest {
            node: node.to_string(),
        };
        call_rpc!(self, drain_node, request)
    }
}
