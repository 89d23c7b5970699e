//! The calls cluster members make on the coordinators: expert nodes
//! register, heartbeat and report loaded replicas; routers report load and
//! nodes they cannot reach.

use moemesh_proto::v1::{
    HeartbeatRequest, HeartbeatResponse, RegisterNodeRequest, ReportLoadRequest,
    ReportLoadResponse, ReportReplicaReadyRequest, ReportReplicaReadyResponse,
    ReportUnreachableRequest, ReportUnreachableResponse,
};

use crate::coordinator::call_rpc;
use crate::{ClientError, CoordinatorClient};

impl CoordinatorClient {
    /// Registers an expert node and the experts it serves; returns the
    /// placement epoch that holds the registration. Give the same
    /// `request_id` to every retry so that it applies once.
    pub async fn register_node(
        &mut self,
        request: RegisterNodeRequest,
    ) -> Result<u64, ClientError> {
        Ok(call_rpc!(self, register_node, request)?.epoch)
    }

    /// Tells the coordinators an expert node is alive, with its recent work.
    pub async fn heartbeat(
        &mut self,
        request: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, ClientError> {
        call_rpc!(self, heartbeat, request)
    }

    /// Tells the coordinators a replica placed on a node has loaded.
    pub async fn report_replica_ready(
        &mut self,
        request: ReportReplicaReadyRequest,
    ) -> Result<ReportReplicaReadyResponse, ClientError> {
        call_rpc!(self, report_replica_ready, request)
    }

    /// Reports a router's cumulative token counts.
    pub async fn report_load(
        &mut self,
        request: ReportLoadRequest,
    ) -> Result<ReportLoadResponse, ClientError> {
        call_rpc!(self, report_load, request)
    }

    /// Reports an expert node a router could not reach.
    pub async fn report_unreachable(
        &mut self,
        request: ReportUnreachableRequest,
    ) -> Result<ReportUnreachableResponse, ClientError> {
        call_rpc!(self, report_unreachable, request)
    }
}
