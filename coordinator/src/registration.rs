//! What expert nodes and routers tell the coordinator about expert nodes:
//! a node registering (with the experts it already serves), a replica that
//! finished loading, heartbeats, and routers' reports that a node is
//! unreachable. Liveness itself is [`Membership`]'s.

use std::str::FromStr;

use moemesh_core::compute::WeightFormat;
use moemesh_proto::v1::{
    HeartbeatRequest, NodeInfo, RegisterNodeRequest, ReportReplicaReadyRequest,
    ReportUnreachableRequest,
};
use tonic::Status;

use crate::load::LoadTracker;
use crate::membership::Membership;
use crate::node::{RaftHandle, fresh_request_id};
use crate::placement::{describe_model, expert_key, serving_keys};
use crate::state::{ClusterState, Command, ExpertKey, NodeRecord, NodeStatus, ReplicaState};

/// Registers (or re-registers) a node as ready, with the experts it says
/// it serves: replicas placed on it that it does not serve go back to
/// loading (a node restarted empty loads them again and reports them
/// ready; routers leave them meanwhile), and when it already serves
/// experts of a model, records the model and those experts as ready
/// replicas. Returns the epoch afterwards.
pub async fn register_node(
    raft: &RaftHandle,
    membership: &Membership,
    request: RegisterNodeRequest,
) -> Result<u64, Status> {
    let RegisterNodeRequest {
        node,
        request_id,
        model,
        checkpoint,
        serving,
    } = request;
    let node = node.ok_or_else(|| Status::invalid_argument("node is missing"))?;
    if node.id.is_empty() || node.address.is_empty() {
        return Err(Status::invalid_argument("node id and address are required"));
    }
    check_node_fields(&node)?;
    let record = ready_node_record(node)?;
    let served_model = if serving.is_empty() {
        None
    } else {
        let model_record = describe_model(model, &checkpoint)?.record;
        let keys = serving_keys(&model_record.id, serving);
        Some((model_record, keys))
    };
    let request_id = fresh_request_id(request_id, "register");
    let node_id = record.id.clone();
    let register = Command::RegisterNode { node: record };
    raft.propose_applied(format!("{request_id}/node"), register)
        .await?;
    // Registering counts as being heard from.
    membership.heard_from(&node_id);
    let reconcile = Command::ReconcileNodeReplicas {
        node: node_id.clone(),
        serving: served_model
            .as_ref()
            .map(|(_, keys)| keys.clone())
            .unwrap_or_default(),
    };
    let epoch = raft
        .propose_applied(format!("{request_id}/reconcile"), reconcile)
        .await?;
    let Some((model_record, keys)) = served_model else {
        return Ok(epoch);
    };
    // The node already serves these experts: record them as ready replicas.
    let add_model = Command::AddModel {
        model: model_record,
    };
    raft.propose_applied(format!("{request_id}/model"), add_model)
        .await?;
    let add_serving = Command::AddServingReplicas {
        node: node_id.clone(),
        keys: keys.clone(),
    };
    let epoch = raft
        .propose_applied(format!("{request_id}/serving"), add_serving)
        .await?;
    warn_of_experts_left_out(&raft.applied_state(), &node_id, &keys);
    Ok(epoch)
}

/// Logs the experts a joining node serves that the placement left out,
/// because other nodes serve them in another compute format.
fn warn_of_experts_left_out(state: &ClusterState, node_id: &str, keys: &[ExpertKey]) {
    let left_out: Vec<String> = keys
        .iter()
        .filter(|key| {
            !state
                .replicas
                .get(key)
                .is_some_and(|replicas| replicas.iter().any(|replica| replica.node == node_id))
        })
        .map(ToString::to_string)
        .collect();
    if !left_out.is_empty() {
        let format = state.nodes.get(node_id).map(NodeRecord::compute_format);
        tracing::warn!(
            node = node_id,
            ?format,
            experts = ?left_out,
            "experts this node serves stay unplaced here: other nodes serve them in another format"
        );
    }
}

/// Longest node id, group, device or weight format a registration may
/// give: every placement snapshot carries every node to every router and
/// expert node.
const MAX_NODE_FIELD_BYTES: usize = 256;
/// Longest address a registration may give.
const MAX_ADDRESS_BYTES: usize = 2048;

/// Refuses what a node must not register: a field long enough to bloat
/// every placement snapshot, or an address routers cannot dial (a router
/// refuses a whole placement naming a node whose address does not parse,
/// and so would stop following the placement).
fn check_node_fields(node: &NodeInfo) -> Result<(), Status> {
    let fields = [
        ("id", &node.id, MAX_NODE_FIELD_BYTES),
        ("group", &node.group, MAX_NODE_FIELD_BYTES),
        ("device", &node.device, MAX_NODE_FIELD_BYTES),
        ("weight format", &node.weight_format, MAX_NODE_FIELD_BYTES),
        ("address", &node.address, MAX_ADDRESS_BYTES),
    ];
    for (field, value, limit) in fields {
        if value.len() > limit {
            return Err(Status::invalid_argument(format!(
                "node {field} is {} bytes long; at most {limit} are allowed",
                value.len()
            )));
        }
    }
    let dialable = node
        .address
        .parse::<tonic::transport::Uri>()
        .is_ok_and(|uri| {
            matches!(uri.scheme_str(), Some("http" | "https"))
                && uri.host().is_some_and(|host| !host.is_empty())
        });
    if !dialable {
        return Err(Status::invalid_argument(format!(
            "node {}: address {:?} is not a URL routers can dial; give http://HOST:PORT \
             or https://HOST:PORT",
            node.id, node.address
        )));
    }
    Ok(())
}

/// A registering node as the cluster records it: ready, in group
/// `default` and on `cpu` unless it says otherwise; its weight format
/// must be one moemesh knows (or empty, for the device's default).
fn ready_node_record(node: NodeInfo) -> Result<NodeRecord, Status> {
    let weight_format = if node.weight_format.is_empty() {
        String::new()
    } else {
        WeightFormat::from_str(&node.weight_format)
            .map_err(|error| Status::invalid_argument(format!("node {}: {error}", node.id)))?
            .to_string()
    };
    Ok(NodeRecord {
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
        buffer_bytes: node.buffer_bytes,
        weight_format,
        status: NodeStatus::Ready,
    })
}

/// Marks a node's loading replica ready, so routers may use it; a replica
/// already past loading is left as it is. Returns the epoch afterwards.
pub async fn report_replica_ready(
    raft: &RaftHandle,
    request: ReportReplicaReadyRequest,
) -> Result<u64, Status> {
    let ReportReplicaReadyRequest {
        node,
        model,
        layer,
        expert,
    } = request;
    let key = expert_key(model, layer, expert)?;
    let state = raft.read().await?;
    let replica_state = state
        .replicas
        .get(&key)
        .and_then(|replicas| replicas.iter().find(|replica| replica.node == node))
        .map(|replica| replica.state)
        .ok_or_else(|| Status::failed_precondition(format!("{node} has no replica of {key}")))?;
    if replica_state != ReplicaState::Loading {
        return Ok(state.epoch);
    }
    let request_id = format!(
        "ready/{node}/{}/{layer}/{expert}/{}",
        key.model, state.epoch
    );
    Ok(raft
        .propose_applied(request_id, Command::ReplicaReady { key, node })
        .await?)
}

/// Records a node's heartbeat: it is alive, this busy, and buffering so.
pub fn record_heartbeat(membership: &Membership, load: &LoadTracker, heartbeat: &HeartbeatRequest) {
    membership.heard_from(&heartbeat.node);
    load.record_node(heartbeat);
}

/// Records that a router could not reach a node, which then has less
/// time to be heard from before it is declared dead.
pub fn record_unreachable(membership: &Membership, report: &ReportUnreachableRequest) {
    tracing::warn!(node = %report.node, reporter = %report.reporter, reason = %report.reason, "expert node reported unreachable");
    membership.suspect(&report.node);
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    fn node(id: &str, address: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            address: address.into(),
            group: "rack-1".into(),
            device: "cpu".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_node_registers_only_with_an_address_routers_can_dial() {
        for address in [
            "http://127.0.0.1:50061",
            "https://expert-0.cluster.local:50061",
            "http://[::1]:7",
        ] {
            assert!(
                check_node_fields(&node("expert-0", address)).is_ok(),
                "{address}"
            );
        }
        for address in [
            "界",
            "http://a b:1",
            "127.0.0.1:50061",
            "ftp://host:1",
            "http://",
            "/path",
        ] {
            let refused = check_node_fields(&node("expert-0", address)).unwrap_err();
            assert_eq!(refused.code(), Code::InvalidArgument, "{address}");
            assert!(
                refused.message().contains("not a URL routers can dial"),
                "{address}: {}",
                refused.message()
            );
        }
    }

    #[test]
    fn node_fields_are_bounded() {
        let long = "x".repeat(MAX_NODE_FIELD_BYTES + 1);
        let mut cases = vec![node(&long, "http://127.0.0.1:1")];
        cases.push(NodeInfo {
            group: long.clone(),
            ..node("a", "http://127.0.0.1:1")
        });
        cases.push(NodeInfo {
            device: long.clone(),
            ..node("a", "http://127.0.0.1:1")
        });
        cases.push(NodeInfo {
            weight_format: long.clone(),
            ..node("a", "http://127.0.0.1:1")
        });
        let long_host = "h".repeat(MAX_ADDRESS_BYTES);
        cases.push(node("a", &format!("http://{long_host}:1")));
        for node in cases {
            let refused = check_node_fields(&node).unwrap_err();
            assert!(
                refused.message().contains("bytes long; at most"),
                "{}",
                refused.message()
            );
            assert!(
                refused.message().len() < 200,
                "the message does not echo the value"
            );
        }
        let longest = "x".repeat(MAX_NODE_FIELD_BYTES);
        assert!(check_node_fields(&node(&longest, "http://127.0.0.1:1")).is_ok());
    }
}
