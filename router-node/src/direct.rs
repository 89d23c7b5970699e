//! One hop: a client that follows the coordinators' placement itself and
//! sends each token straight to the expert nodes that hold its experts,
//! with no router in between. It runs a router's own [`LayerForwarder`] in
//! the caller's process: the same replica choice by outstanding work, the
//! same retries of failed shares on other replicas within the deadline,
//! the same health marks, reports to the coordinators and sum in expert
//! order, so its answers are a router's, bit for bit. Routers remain for
//! thin clients.
//!
//! The client needs the model's config (hidden size, experts, experts per
//! token, MoE layers) from its `config.json`; given the checkpoint
//! directory it also loads the gates (never expert weights), and then
//! computes gated forwards too.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use moemesh_core::model::config::ModelConfig;
use moemesh_proto::codec::{Rows, WireDtype, check_finite};
use moemesh_proto::tls::TlsConfig;
use moemesh_proto::v1::DescribeResponse;

use crate::fanout::LayerOutput;
use crate::forwarder::{ForwarderConfig, LayerForwarder, ModelSource};
use crate::metrics::RouterMetrics;
use crate::service::MAX_FORWARD_DEADLINE;
use crate::{PlacementSource, RouterError, RouterResult};

/// A one-hop client of one model's expert nodes. Its calls take `&self`:
/// share it (in an `Arc`) between tasks rather than connecting again, so
/// that replica choice sees all of the process's outstanding work.
/// Dropping it ends its placement following and its reports.
pub struct DirectClient {
    forwarder: LayerForwarder,
    /// The model id every expert node call names.
    model_id: String,
    /// The name the coordinators hear this client's load reports from.
    id: String,
}

impl DirectClient {
    /// Follows the placement of `model_id` from the coordinators at
    /// `coordinators` (any of them answers) and waits until it places the
    /// model ([`PLACEMENT_WAIT`] at most: a model not loaded yet, or one of
    /// another id, is refused as UNAVAILABLE, naming it). `model` gives the
    /// model's config: a checkpoint directory (config and gates) or a
    /// parsed `config.json`. `tls` secures the calls to the coordinators
    /// and the expert nodes; in a secured cluster it names a member of
    /// role client, which expert
    /// nodes accept for `Compute` and coordinators for the placement
    /// stream. Such coordinators take load and unreachable reports from
    /// routers only: a client member's are refused (logged at debug) and
    /// its forwards are unaffected; its load reaches them through the
    /// expert nodes' heartbeats instead. Needs a tokio runtime: the
    /// placement and the reports follow in tasks of their own.
    pub async fn connect(
        coordinators: Vec<String>,
        model_id: &str,
        model: ModelSource,
        tls: TlsConfig,
    ) -> RouterResult<Self> {
        Self::start(
            PlacementSource::Coordinators(coordinators),
            model_id,
            model,
            tls,
        )
        .await
    }

    /// [`DirectClient::connect`] with the placement from `placement`: the
    /// coordinators, or a fixed placement file (no coordinators to follow
    /// or report to, as a router started with `--placement`).
    pub async fn start(
        placement: PlacementSource,
        model_id: &str,
        model: ModelSource,
        tls: TlsConfig,
    ) -> RouterResult<Self> {
        let id = client_id();
        let forwarder = LayerForwarder::start(ForwarderConfig {
            model_id: model_id.to_string(),
            model,
            placement,
            reporter: id.clone(),
            group: String::new(),
            tls,
            metrics: RouterMetrics::default(),
        })
        .await?;
        if tokio::time::timeout(PLACEMENT_WAIT, forwarder.wait_until_placed())
            .await
            .is_err()
        {
            return Err(RouterError::Unavailable(format!(
                "the placement holds no expert of model {model_id:?} after {PLACEMENT_WAIT:?}: is it loaded (moectl model load), and under this id?"
            )));
        }
        tracing::info!(model = %model_id, client = %id, epoch = forwarder.placement_epoch(), "one-hop client ready");
        Ok(Self {
            forwarder,
            model_id: model_id.to_string(),
            id,
        })
    }

    /// The name the coordinators hear this client's reports from:
    /// `client-<pid>-<random>`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        self.forwarder.config()
    }

    /// The MoE layers served, ascending.
    pub fn layers(&self) -> &[usize] {
        self.forwarder.layers()
    }

    /// What this client forwards for, as a router's `Describe` answers:
    /// the model's shape and each served layer's gate fingerprint (none
    /// when connected with [`ModelSource::Config`]).
    pub fn describe(&self) -> RouterResult<DescribeResponse> {
        crate::describe::describe(
            "",
            &self.model_id,
            self.config(),
            self.forwarder.gate_fingerprints(),
        )
    }

    /// The placement epoch forwards route by now.
    pub fn placement_epoch(&self) -> u64 {
        self.forwarder.placement_epoch()
    }

    /// The routed experts of MoE layer `layer` for `hidden` (`[tokens,
    /// hidden_size]` row-major) by the caller's routing: `top_k` experts
    /// per token, `expert_ids` and `weights` row-major `[tokens * top_k]`.
    /// Returns `sum_k weights[t,k] * expert[expert_ids[t,k]](hidden[t])`
    /// per token, `[tokens, hidden_size]`; shared experts stay with the
    /// caller. Refuses what `ForwardRouted` refuses, with the same
    /// messages. The whole forward, retries included, ends within
    /// `deadline`.
    pub async fn forward_routed_f32(
        &self,
        layer: u32,
        hidden: &[f32],
        expert_ids: &[u32],
        weights: &[f32],
        top_k: usize,
        deadline: Duration,
    ) -> RouterResult<Vec<f32>> {
        let output = self
            .forward_routed(
                layer,
                hidden.to_vec(),
                expert_ids.to_vec(),
                weights.to_vec(),
                top_k,
                deadline,
            )
            .await?;
        Ok(output.rows)
    }

    /// [`DirectClient::forward_routed_f32`] taking its inputs by value (no
    /// copies) and answering with the slowest node's compute time too.
    pub async fn forward_routed(
        &self,
        layer: u32,
        hidden: Vec<f32>,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
        top_k: usize,
        deadline: Duration,
    ) -> RouterResult<LayerOutput> {
        let deadline = deadline_from_now(deadline);
        let (layer, rows) = self.layer_and_rows(layer, hidden)?;
        self.forwarder
            .forward_routed(layer, rows, top_k, expert_ids, weights, deadline)
            .await
    }

    /// MoE layer `layer` for `hidden` (`[tokens, hidden_size]` row-major),
    /// routed by the layer's gate as a router's `Forward` is: the routed
    /// experts and the shared expert, if the model has one. Needs the
    /// gates: a client connected with [`ModelSource::Checkpoint`].
    pub async fn forward_f32(
        &self,
        layer: u32,
        hidden: &[f32],
        deadline: Duration,
    ) -> RouterResult<Vec<f32>> {
        Ok(self.forward(layer, hidden.to_vec(), deadline).await?.rows)
    }

    /// [`DirectClient::forward_f32`] taking its rows by value and
    /// answering with the slowest node's compute time too.
    pub async fn forward(
        &self,
        layer: u32,
        hidden: Vec<f32>,
        deadline: Duration,
    ) -> RouterResult<LayerOutput> {
        let deadline = deadline_from_now(deadline);
        let (layer, rows) = self.layer_and_rows(layer, hidden)?;
        self.forwarder.forward_rows(layer, rows, deadline).await
    }

    /// The layer a call names, if served, and its rows, checked as a
    /// router checks a request's: whole rows of finite values.
    fn layer_and_rows(&self, layer: u32, hidden: Vec<f32>) -> RouterResult<(usize, Rows)> {
        let layer = layer as usize;
        if !self.forwarder.serves(layer) {
            return Err(self.forwarder.unknown_layer(layer));
        }
        Ok((layer, rows_of(hidden, self.config().hidden_size)?))
    }
}

/// How long [`DirectClient::start`] waits for the placement to hold the
/// model: long enough for `moectl model load` on a cluster starting.
pub const PLACEMENT_WAIT: Duration = Duration::from_secs(60);

/// When a forward given `deadline` from now must be done; a deadline past
/// [`MAX_FORWARD_DEADLINE`] is clamped to it, as a router clamps its
/// callers'.
fn deadline_from_now(deadline: Duration) -> Instant {
    Instant::now() + deadline.min(MAX_FORWARD_DEADLINE)
}

/// `hidden` as `[tokens, width]` rows, refusing a partial row, and values
/// that are not finite with the error a router's decoding gives.
fn rows_of(hidden: Vec<f32>, width: usize) -> RouterResult<Rows> {
    if width == 0 || !hidden.len().is_multiple_of(width) {
        return Err(RouterError::InvalidArgument(format!(
            "{} values do not form rows of hidden size {width}",
            hidden.len()
        )));
    }
    check_finite(&hidden, width).map_err(RouterError::Codec)?;
    Ok(Rows {
        rows: hidden.len() / width,
        width,
        values: hidden,
        wire_dtype: WireDtype::F32,
    })
}

/// A name for this client's reports, fresh for every client: several in
/// one process, or in processes of the same id on different hosts, keep
/// apart in the coordinators' load window.
fn client_id() -> String {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("client-{}-{:08x}", std::process::id(), random as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(result: RouterResult<Rows>) -> String {
        let error = result.expect_err("a refusal");
        let status = tonic::Status::from(error);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        status.message().to_string()
    }

    #[test]
    fn whole_rows_of_finite_values_pass_unchanged() {
        let rows = rows_of(vec![1.0, -2.0, 3.5, 0.0, 5.0, 6.0], 3).unwrap();
        assert_eq!((rows.rows, rows.width), (2, 3));
        assert_eq!(rows.values, [1.0, -2.0, 3.5, 0.0, 5.0, 6.0]);
        assert_eq!(rows_of(Vec::new(), 3).unwrap().rows, 0);
    }

    #[test]
    fn partial_rows_and_values_that_are_not_finite_are_refused() {
        let message = refusal(rows_of(vec![1.0; 7], 3));
        assert_eq!(message, "7 values do not form rows of hidden size 3");
        let nan = vec![1.0, 2.0, 3.0, 4.0, f32::NAN, 6.0];
        let message = refusal(rows_of(nan.clone(), 3));
        let tensor = moemesh_proto::codec::encode(&nan, &[2, 3], WireDtype::F32);
        let decoded = moemesh_proto::codec::decode_rows(Some(&tensor), 3);
        assert_eq!(message, decoded.unwrap_err().to_string());
        assert!(message.contains("token 1, column 1 is NaN"), "{message}");
        let message = refusal(rows_of(vec![f32::NEG_INFINITY], 1));
        assert!(message.contains("is -inf"), "{message}");
    }

    #[test]
    fn client_ids_name_the_process_and_differ() {
        let id = client_id();
        assert!(
            id.starts_with(&format!("client-{}-", std::process::id())),
            "{id}"
        );
        assert_ne!(id, client_id());
    }

    #[test]
    fn deadlines_past_the_longest_are_clamped_not_a_panic() {
        let now = Instant::now();
        let far = deadline_from_now(Duration::MAX);
        assert!(far > now && far <= Instant::now() + MAX_FORWARD_DEADLINE);
    }
}
