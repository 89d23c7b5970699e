//! One layer's forward from rows to the summed answers of the expert
//! nodes: the routing (the layer's gate, or the caller's routing checked
//! by [`crate::routed`]), the load counts the coordinators hear, and the
//! fan-out ([`crate::fanout`]). A router's service ([`crate::service`])
//! and a one-hop client ([`crate::direct`]) each hold a [`LayerForwarder`],
//! so both forward with the same code.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use moemesh_core::compute::add_zero_experts;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::gating::{Gate, Routing};
use moemesh_proto::codec::Rows;
use moemesh_proto::tls::TlsConfig;
use tokio::sync::{oneshot, watch};

use crate::describe::{GateFingerprint, gate_fingerprint};
use crate::fanout::{ExpertFanOut, LayerOutput};
use crate::load::LoadCounters;
use crate::metrics::RouterMetrics;
use crate::routed::caller_routing;
use crate::table::{RoutingSetup, RoutingTable};
use crate::{PlacementSource, RouterError, RouterResult};

/// Routing and splitting with at most this much work (a gate's
/// multiply-adds, or the row values a pre-routed split reads: about 50 µs)
/// run on the async worker that received the request.
const INLINE_ROUTING_WORK: usize = 1 << 20;

/// What a [`LayerForwarder`] knows of the model it forwards for.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A Hugging Face model directory: its `config.json`, and the gates of
    /// the MoE layers served (no expert weights are read), so that both
    /// gated and pre-routed forwards are served.
    Checkpoint(PathBuf),
    /// The model's config alone (`ModelConfig::from_dir` or `from_json` of
    /// its `config.json`): no gates, so pre-routed forwards only.
    Config(ModelConfig),
}

/// How a [`LayerForwarder`] starts.
pub struct ForwarderConfig {
    /// The model id every expert node call names.
    pub model_id: String,
    pub model: ModelSource,
    /// Expert nodes and which experts each holds.
    pub placement: PlacementSource,
    /// The name the coordinators hear load and unreachable nodes from:
    /// `router-…` for a router, `client-…` for a one-hop client.
    pub reporter: String,
    /// The forwarder's topology group: among equally busy replicas it
    /// prefers nodes of its own group. Empty: no preference.
    pub group: String,
    /// How connections to the coordinators and expert nodes are secured.
    pub tls: TlsConfig,
    /// Where routed tokens, bytes sent and the placement epoch are counted.
    pub metrics: RouterMetrics,
}

/// Forwards one layer's rows to the expert nodes and sums their answers:
/// the routing (a gate's or the caller's), the load counts the
/// coordinators hear, and the fan-out with its choice of replicas, retries
/// and combination in expert order. A router's service and a one-hop
/// client each hold one.
pub struct LayerForwarder {
    config: ModelConfig,
    /// The MoE layers served, ascending.
    layers: Vec<usize>,
    /// The gate of every layer served; empty when the model came as a
    /// config alone.
    gates: HashMap<usize, Arc<Gate>>,
    /// The SHA-256 of each gate, from the weights the gate was built from;
    /// empty with no gates.
    gate_fingerprints: BTreeMap<usize, GateFingerprint>,
    /// Sends each forward's routed rows to the expert nodes and gathers
    /// their answers.
    fanout: ExpertFanOut,
    /// The routing table the fan-out routes by, for its epoch.
    table_rx: watch::Receiver<Arc<RoutingTable>>,
    /// Tokens sent to each expert, reported to the coordinators.
    load: Arc<LoadCounters>,
    metrics: RouterMetrics,
    /// Dropped with the forwarder, which ends the task that keeps the
    /// placement epoch gauge current.
    _epoch_gauge: oneshot::Sender<()>,
}

impl LayerForwarder {
    /// Reads the model's config (and gates, from a checkpoint), takes the
    /// first routing table from the placement file or the coordinators
    /// (then following them) and starts reporting to the coordinators.
    pub async fn start(forwarder: ForwarderConfig) -> RouterResult<Self> {
        let (config, checkpoint) = match forwarder.model {
            ModelSource::Checkpoint(dir) => {
                let checkpoint = off_the_workers("checkpoint loading", move || {
                    Checkpoint::open(&dir).map_err(RouterError::from)
                })
                .await?;
                (checkpoint.config().clone(), Some(checkpoint))
            }
            ModelSource::Config(config) => (config, None),
        };
        let load = Arc::new(LoadCounters::new(
            &config.moe_layers(),
            config.experts_per_layer(),
        ));
        let RoutingSetup {
            mut layers,
            table_rx,
            health,
        } = RoutingSetup::start(
            forwarder.placement,
            &forwarder.model_id,
            &forwarder.reporter,
            &config,
            &forwarder.tls,
            &load,
        )
        .await?;
        layers.sort_unstable();
        let (gates, gate_fingerprints) = match checkpoint {
            Some(checkpoint) => load_gates(checkpoint, layers.clone()).await?,
            None => Default::default(),
        };
        let (epoch_gauge, forwarder_gone) = oneshot::channel();
        follow_epoch(forwarder.metrics.clone(), table_rx.clone(), forwarder_gone);
        let fanout = ExpertFanOut::new(
            forwarder.model_id,
            forwarder.group,
            table_rx.clone(),
            health,
        );
        Ok(Self {
            config,
            layers,
            gates,
            gate_fingerprints,
            fanout,
            table_rx,
            load,
            metrics: forwarder.metrics,
            _epoch_gauge: epoch_gauge,
        })
    }

    /// The SHA-256 of every served layer's gate (see
    /// [`crate::describe::gate_fingerprint`]); empty when the model came as
    /// a config alone.
    pub fn gate_fingerprints(&self) -> &BTreeMap<usize, GateFingerprint> {
        &self.gate_fingerprints
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The MoE layers served, ascending.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Whether `layer` is an MoE layer served here.
    pub fn serves(&self, layer: usize) -> bool {
        self.layers.binary_search(&layer).is_ok()
    }

    /// Waits until the placement holds a replica of at least one expert
    /// of the model: a model the coordinators do not place yet has an
    /// empty placement, on which every forward would fail.
    pub async fn wait_until_placed(&self) {
        let mut table_rx = self.table_rx.clone();
        // The sender lives as long as the placement is followed, which is
        // as long as `self`.
        let _ = table_rx
            .wait_for(|table| {
                let placement = &table.placement;
                placement.layers().into_iter().any(|layer| {
                    placement
                        .replicas(layer)
                        .is_some_and(|experts| experts.iter().any(|nodes| !nodes.is_empty()))
                })
            })
            .await;
    }

    /// The epoch of the placement forwards route by now (0 for a file).
    pub fn placement_epoch(&self) -> u64 {
        self.table_rx.borrow().epoch
    }

    /// Computes layer `layer` for `rows`, routed by the layer's gate: the
    /// routed experts and the shared expert, if the model has one.
    pub async fn forward_rows(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let gate = Arc::clone(self.gates.get(&layer).ok_or_else(|| self.no_gate(layer))?);
        let gate_macs = rows.values.len() * self.config.num_experts;
        let route = move |hidden: &[f32], tokens: usize| {
            let routing = gate.route(hidden, tokens);
            check_routing_finite(&routing)?;
            Ok(routing)
        };
        self.route_and_fan_out(layer, rows, deadline, gate_macs, route)
            .await
    }

    /// Computes the routed experts of layer `layer` for `rows` by the
    /// caller's routing: `top_k` experts per token, `expert_ids` and
    /// `weights` row-major `[tokens * top_k]`, checked as
    /// [`caller_routing`] does. No gate, no shared expert.
    pub async fn forward_routed(
        &self,
        layer: usize,
        rows: Rows,
        top_k: usize,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        let routing = caller_routing(
            rows.rows,
            top_k,
            expert_ids,
            weights,
            self.config.gate_experts(),
            self.config.top_k,
        )?;
        self.forward_routed_rows(layer, rows, routing, deadline)
            .await
    }

    /// Computes the routed experts of layer `layer` for `rows` by a
    /// `routing` already checked by [`caller_routing`].
    pub async fn forward_routed_rows(
        &self,
        layer: usize,
        rows: Rows,
        routing: Routing,
        deadline: Instant,
    ) -> RouterResult<LayerOutput> {
        if !self.serves(layer) {
            return Err(self.unknown_layer(layer));
        }
        if routing.tokens() != rows.rows || routing.weights.len() != routing.experts.len() {
            return Err(RouterError::InvalidArgument(format!(
                "a routing of {} tokens for {} rows",
                routing.tokens(),
                rows.rows
            )));
        }
        // Splitting reads each pair's row to choose among replicas.
        let split_work = routing.experts.len() * self.config.hidden_size;
        self.route_and_fan_out(layer, rows, deadline, split_work, move |_, _| Ok(routing))
            .await
    }

    /// Routes `rows` with `route`, counts the routing, splits it per expert
    /// node and runs the fan-out. `cpu_work` (in multiply-adds or row
    /// values) decides whether routing and splitting leave the async worker.
    async fn route_and_fan_out<F>(
        &self,
        layer: usize,
        rows: Rows,
        deadline: Instant,
        cpu_work: usize,
        route: F,
    ) -> RouterResult<LayerOutput>
    where
        F: FnOnce(&[f32], usize) -> RouterResult<Routing> + Send + 'static,
    {
        let hidden_size = self.config.hidden_size;
        let (num_experts, zero_experts) = (self.config.num_experts, self.config.zero_experts);
        if rows.rows == 0 {
            return Ok(LayerOutput::default());
        }
        let mut fanout = self.fanout.start(layer, hidden_size);
        let load = Arc::clone(&self.load);
        let metrics = self.metrics.clone();
        let route_and_split = move || {
            let routing = match route(&rows.values, rows.rows) {
                Ok(routing) => routing,
                Err(error) => return (rows, Err(error), fanout),
            };
            load.count(layer, &routing);
            metrics.count_routed(layer, routing.tokens(), routing.experts.len());
            let zero_picks = match zero_experts {
                0 => Vec::new(),
                _ => routing.zero_expert_picks(num_experts),
            };
            let batches = fanout.split(&routing, &rows.values);
            (rows, batches.map(|batches| (batches, zero_picks)), fanout)
        };
        // Gating and splitting are CPU work: large batches leave the async
        // workers for it; a decode step's few tokens take less than the
        // handoff would.
        let (rows, batches, fanout) = if cpu_work <= INLINE_ROUTING_WORK {
            route_and_split()
        } else {
            tokio::task::spawn_blocking(route_and_split)
                .await
                .map_err(|error| RouterError::Internal(format!("routing panicked: {error}")))?
        };
        let (batches, zero_picks) = batches?;
        let node_sends: usize = batches.iter().map(|batch| batch.tokens.len()).sum();
        let bytes_sent = node_sends * hidden_size * size_of::<f32>();
        self.load.count_dispatch(rows.rows, node_sends, bytes_sent);
        self.metrics.count_bytes_sent(bytes_sent);
        let mut output = fanout
            .run(&self.fanout, &rows.values, batches, deadline)
            .await?;
        add_zero_experts(&mut output.rows, &rows.values, hidden_size, &zero_picks);
        // Finite partial sums from the nodes can still add up to infinity.
        moemesh_proto::codec::check_no_overflow(&output.rows, hidden_size)?;
        Ok(output)
    }

    /// The refusal of a forward of `layer`, which is not served here.
    pub fn unknown_layer(&self, layer: usize) -> RouterError {
        RouterError::InvalidArgument(format!(
            "layer {layer} is not served; the MoE layers served are {:?}",
            self.layers
        ))
    }

    /// The refusal of a gated forward of `layer`, which has no gate here.
    fn no_gate(&self, layer: usize) -> RouterError {
        if !self.serves(layer) {
            return self.unknown_layer(layer);
        }
        RouterError::InvalidArgument(format!(
            "layer {layer} has no gate here: the model came as a config without its \
             checkpoint, so only pre-routed forwards are served"
        ))
    }
}

/// Runs `work` on the blocking pool; `what` names it if it panics.
async fn off_the_workers<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> RouterResult<T> + Send + 'static,
) -> RouterResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| RouterError::Internal(format!("{what} panicked: {error}")))?
}

/// The gates of `layers` from `checkpoint`, and their fingerprints, taken
/// from the same weights as they are read.
async fn load_gates(
    checkpoint: Checkpoint,
    layers: Vec<usize>,
) -> RouterResult<(HashMap<usize, Arc<Gate>>, BTreeMap<usize, GateFingerprint>)> {
    off_the_workers("gate loading", move || {
        let mut gates = HashMap::new();
        let mut fingerprints = BTreeMap::new();
        for layer in layers {
            let weights = checkpoint.load_gate(layer)?;
            fingerprints.insert(layer, gate_fingerprint(&weights));
            gates.insert(layer, Arc::new(Gate::new(checkpoint.config(), weights)));
        }
        Ok((gates, fingerprints))
    })
    .await
}

/// Refuses inputs so large that the gate's routing weights overflow f32:
/// the experts' outputs would be meaningless.
fn check_routing_finite(routing: &Routing) -> RouterResult<()> {
    let shared = routing.shared_weights.iter().flatten();
    if routing
        .weights
        .iter()
        .chain(shared)
        .all(|weight| weight.is_finite())
    {
        return Ok(());
    }
    Err(RouterError::InvalidArgument(
        "inputs out of range: the gate's routing weights overflow f32".into(),
    ))
}

/// Keeps the placement epoch gauge on the routing table's epoch until the
/// forwarder is gone (`forwarder_gone` resolves): holding `table_rx` past
/// it would keep the placement follower running for nobody.
fn follow_epoch(
    metrics: RouterMetrics,
    mut table_rx: watch::Receiver<Arc<RoutingTable>>,
    mut forwarder_gone: oneshot::Receiver<()>,
) {
    tokio::spawn(async move {
        loop {
            let epoch = table_rx.borrow_and_update().epoch;
            metrics.set_placement_epoch(epoch);
            tokio::select! {
                changed = table_rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = &mut forwarder_gone => return,
            }
        }
    });
}
