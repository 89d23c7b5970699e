//! The routing table: the placement a router routes by, with one channel
//! per expert node, replaced whole when the placement changes; and
//! [`RoutingSetup`], which gets the tables from a placement file or by
//! following the coordinators.
//!
//! A request takes the table current when it starts and keeps it to the
//! end, so a new epoch never changes a request half-way; the old table
//! (and channels only it uses) goes away with its last request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::StreamExt;
use moemesh_client::CoordinatorClient;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::placement::{NodeEntry, Placement};
use moemesh_proto::tls::{MemberChannel, TlsConfig};
use moemesh_proto::v1::PlacementSnapshot;
use moemesh_proto::{
    ExpertServiceClient, MAX_MESSAGE_BYTES, NodeStatus, ReplicaState, data_path_channel_lazy,
};
use tokio::sync::watch;

use crate::health::NodeHealth;
use crate::load::{LoadCounters, report_load_task};
use crate::{PlacementSource, RouterError, RouterResult};

/// One long-lived channel to an expert node.
#[derive(Clone)]
pub struct NodeLink {
    pub node: NodeEntry,
    /// The node's topology group as the coordinators know it; empty when unknown.
    pub group: String,
    pub client: ExpertServiceClient<MemberChannel>,
    /// Token-expert pairs sent to the node and not yet answered, by every
    /// request of this router; kept across placement epochs.
    pub in_flight: Arc<AtomicU64>,
    /// Until when (on [`crate::health::health_clock`]) the node is avoided
    /// after a failure; kept across placement epochs.
    pub unhealthy_until: Arc<AtomicU64>,
}

impl NodeLink {
    /// Opens a channel that connects on first use and reconnects as needed.
    pub fn connect_lazy(node: NodeEntry, group: String, tls: &TlsConfig) -> RouterResult<Self> {
        let endpoint = tls.endpoint(node.address.clone()).map_err(|error| {
            RouterError::InvalidArgument(format!(
                "node {} address {:?}: {error}",
                node.id, node.address
            ))
        })?;
        let channel = tls.channel(data_path_channel_lazy(endpoint));
        let client = ExpertServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            node,
            group,
            client,
            in_flight: Arc::new(AtomicU64::new(0)),
            unhealthy_until: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// A placement and the channels to its nodes, `links[i]` for `placement.nodes()[i]`.
pub struct RoutingTable {
    /// The coordinators' epoch; 0 for a placement file.
    pub epoch: u64,
    pub placement: Placement,
    pub links: Vec<NodeLink>,
}

impl RoutingTable {
    /// Builds a table, reusing the channels of `previous` for unchanged
    /// nodes and opening new ones with `tls`; `groups` gives each node's
    /// topology group (empty: unknown).
    pub fn new(
        epoch: u64,
        placement: Placement,
        groups: &[String],
        previous: Option<&RoutingTable>,
        tls: &TlsConfig,
    ) -> RouterResult<Self> {
        let mut reusable: HashMap<(&str, &str), &NodeLink> = HashMap::new();
        if let Some(previous) = previous {
            for link in &previous.links {
                reusable.insert((link.node.id.as_str(), link.node.address.as_str()), link);
            }
        }
        let links = placement
            .nodes()
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let group = groups.get(index).cloned().unwrap_or_default();
                match reusable.get(&(node.id.as_str(), node.address.as_str())) {
                    Some(link) => Ok(NodeLink {
                        group,
                        ..(*link).clone()
                    }),
                    None => NodeLink::connect_lazy(node.clone(), group, tls),
                }
            })
            .collect::<RouterResult<_>>()?;
        Ok(Self {
            epoch,
            placement,
            links,
        })
    }
}

/// How long a router waits for the coordinators' first placement.
const FIRST_PLACEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Where a router's routing tables come from, set up: the layers it
/// serves, the table every forward reads, and who hears of unreachable nodes.
pub struct RoutingSetup {
    pub layers: Vec<usize>,
    pub table_rx: watch::Receiver<Arc<RoutingTable>>,
    pub health: NodeHealth,
}

impl RoutingSetup {
    /// A placement file gives one table for good. With coordinators, the
    /// router (or one-hop client) follows their placement (waiting for the
    /// first epoch), reports `load` to them and tells them of nodes it
    /// cannot reach, both as `reporter`.
    pub async fn start(
        source: PlacementSource,
        model_id: &str,
        reporter: &str,
        config: &ModelConfig,
        tls: &TlsConfig,
        load: &Arc<LoadCounters>,
    ) -> RouterResult<Self> {
        let addresses = match source {
            PlacementSource::File(file) => {
                let placement = Placement::from_file(&file, config)?;
                let layers = placement.layers();
                let table = RoutingTable::new(0, placement, &[], None, tls)?;
                let (_, table_rx) = watch::channel(Arc::new(table));
                return Ok(Self {
                    layers,
                    table_rx,
                    health: NodeHealth::without_coordinators(),
                });
            }
            PlacementSource::Coordinators(addresses) => addresses,
        };
        let coordinators = CoordinatorClient::new(addresses, tls.clone())
            .map_err(|error| RouterError::InvalidArgument(error.to_string()))?;
        let empty = Placement::from_parts(Vec::new(), HashMap::new());
        let empty = RoutingTable::new(0, empty, &[], None, tls)?;
        let (table_tx, mut table_rx) = watch::channel(Arc::new(empty));
        tokio::spawn(report_load_task(
            coordinators.clone(),
            model_id.to_string(),
            reporter.to_string(),
            Arc::downgrade(load),
        ));
        let health = NodeHealth::reporting_to(coordinators.clone(), reporter.to_string());
        tokio::spawn(follow_coordinators_task(
            coordinators,
            model_id.to_string(),
            config.clone(),
            table_tx,
            tls.clone(),
        ));
        tokio::time::timeout(FIRST_PLACEMENT_TIMEOUT, table_rx.changed())
            .await
            .map_err(|_| {
                RouterError::Unavailable("no placement from the coordinators within 60 s".into())
            })?
            .map_err(|_| RouterError::Internal("placement follower stopped".into()))?;
        Ok(Self {
            layers: config.moe_layers(),
            table_rx,
            health,
        })
    }
}

/// Turns a published placement into the routable one: live nodes, and per
/// MoE layer and expert the replicas that are ready (loading ones are not
/// yet routable; draining ones take no new requests). Also returns each
/// node's topology group.
fn placement_from_snapshot(
    snapshot: &PlacementSnapshot,
    config: &ModelConfig,
) -> (Placement, Vec<String>) {
    let live: Vec<_> = snapshot
        .nodes
        .iter()
        .filter(|node| node.status() != NodeStatus::Dead)
        .collect();
    let groups = live.iter().map(|node| node.group.clone()).collect();
    let nodes: Vec<NodeEntry> = live
        .iter()
        .map(|node| NodeEntry {
            id: node.id.clone(),
            address: node.address.clone(),
        })
        .collect();
    let index_of: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(index, node)| (node.id.as_str(), index))
        .collect();
    let mut layers: HashMap<usize, Vec<Vec<usize>>> = config
        .moe_layers()
        .into_iter()
        .map(|layer| (layer, vec![Vec::new(); config.experts_per_layer()]))
        .collect();
    for expert in &snapshot.experts {
        let Some(replicas) = layers
            .get_mut(&(expert.layer as usize))
            .and_then(|layer| layer.get_mut(expert.expert as usize))
        else {
            continue;
        };
        for replica in expert
            .replicas
            .iter()
            .filter(|replica| replica.state() == ReplicaState::Ready)
        {
            if let Some(&node) = index_of.get(replica.node.as_str()) {
                replicas.push(node);
            }
        }
        // Replica order must not depend on publication order: it picks nodes for tokens.
        replicas.sort_unstable();
    }
    (Placement::from_parts(nodes, layers), groups)
}

/// Follows the coordinators' placement of `model_id`, publishing a new
/// table on `table_tx` for every new epoch; ends once the router is gone.
pub async fn follow_coordinators_task(
    coordinators: CoordinatorClient,
    model_id: String,
    config: ModelConfig,
    table_tx: watch::Sender<Arc<RoutingTable>>,
    tls: TlsConfig,
) {
    let mut placements = coordinators.watch_placement(&model_id, 0);
    loop {
        // Stop once the router is gone: nobody reads the tables any more.
        let snapshot = tokio::select! {
            snapshot = placements.next() => snapshot,
            _ = table_tx.closed() => return,
        };
        let Some(snapshot) = snapshot else {
            return;
        };
        let current = table_tx.borrow().clone();
        let (placement, groups) = placement_from_snapshot(&snapshot, &config);
        match RoutingTable::new(snapshot.epoch, placement, &groups, Some(&current), &tls) {
            Ok(table) => {
                tracing::info!(
                    epoch = table.epoch,
                    nodes = table.links.len(),
                    "placement epoch"
                );
                table_tx.send_replace(Arc::new(table));
            }
            Err(error) => tracing::warn!(%error, "ignoring an unusable placement"),
        }
    }
}
