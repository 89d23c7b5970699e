//! The admin side of the SDK: talks to any coordinator of a cluster.

use moemesh_proto::AdminServiceClient;
use moemesh_proto::v1::{
    AddReplicaRequest, AddReplicaResponse, ClusterStatusRequest, ClusterStatusResponse,
    DrainNodeRequest, DrainNodeResponse, LoadModelRequest, LoadModelResponse, LoadStatsRequest,
    LoadStatsResponse, MoveReplicaRequest, MoveReplicaResponse, RebalanceRequest,
    RebalanceResponse, ShowPlacementRequest, ShowPlacementResponse,
};
use tonic::transport::Channel;

use crate::ClientError;

/// A connection to one coordinator; any coordinator of the group answers.
#[derive(Clone)]
pub struct AdminClient {
    admin: AdminServiceClient<Channel>,
    /// Sent as `authorization: Bearer <token>` with every call.
    token: Option<String>,
}

impl AdminClient {
    /// Connects to a coordinator, for example `http://127.0.0.1:7000`.
    pub async fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        let address = address.into();
        let connect_error = |message: String| ClientError::Connect {
            address: address.clone(),
            message,
        };
        let channel = moemesh_proto::tls::endpoint(address.clone())
            .map_err(|error| connect_error(error.to_string()))?
            .connect()
            .await
            .map_err(|error| connect_error(format!("{error:?}")))?;
        Ok(Self {
            admin: AdminServiceClient::new(channel),
            token: None,
        })
    }

    /// Sends `token` with every call, for coordinators started with
    /// `--admin-token` (an empty token sends none).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Wraps a message, with the token when there is one.
    fn authorized<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Returns the coordinators, the leader, the epoch and the expert nodes.
    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, ClientError> {
        Ok(self
            .admin
            .cluster_status(self.authorized(ClusterStatusRequest {}))
            .await?
            .into_inner())
    }

    /// Returns the load window of `model` (empty: the only model): tokens
    /// per layer and expert, and each expert node's recent work.
    pub async fn load_stats(&mut self, model: &str) -> Result<LoadStatsResponse, ClientError> {
        let request = LoadStatsRequest {
            model: model.to_string(),
        };
        Ok(self
            .admin
            .load_stats(self.authorized(request))
            .await?
            .into_inner())
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
        Ok(self
            .admin
            .rebalance(self.authorized(request))
            .await?
            .into_inner())
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
        Ok(self
            .admin
            .show_placement(self.authorized(request))
            .await?
            .into_inner())
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
        Ok(self
            .admin
            .load_model(self.authorized(request))
            .await?
            .into_inner())
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
            request_id: String::new(),
        };
        Ok(self
            .admin
            .move_replica(self.authorized(request))
            .await?
            .into_inner())
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
            request_id: String::new(),
        };
        Ok(self
            .admin
            .add_replica(self.authorized(request))
            .await?
            .into_inner())
    }

    /// Moves every replica off a node, one at a time; returns when it is empty.
    pub async fn drain_node(&mut self, node: &str) -> Result<DrainNodeResponse, ClientError> {
        Ok(self
            .admin
            .drain_node(DrainNodeRequest {
                node: node.to_string(),
            })
            .await?
            .into_inner())
    }
}
