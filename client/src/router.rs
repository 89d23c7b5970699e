//! [`Client`]: forwards through a moemesh router, gated there
//! ([`Client::forward`]) or by the caller's own routing
//! ([`Client::forward_routed`]), and what it serves ([`Client::describe`]).

use std::time::Duration;

use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::tls::{MemberChannel, TlsConfig};
use moemesh_proto::v1::{
    DescribeRequest, DescribeResponse, ForwardRequest, ForwardResponse, ForwardRoutedRequest,
    Tensor,
};
use moemesh_proto::{DEFAULT_DEADLINE, MAX_MESSAGE_BYTES, RouterServiceClient};

use crate::ClientError;

/// A forward's output with how long the slowest expert node computed; the
/// rest of the latency is dispatch.
#[derive(Debug, Clone, PartialEq)]
pub struct Timed<T> {
    pub output: T,
    pub expert_compute: Duration,
}

/// A connection to one moemesh router.
#[derive(Clone)]
pub struct Client {
    router: RouterServiceClient<MemberChannel>,
    /// How long one forward may take, retries included.
    deadline: Duration,
}

/// The first wait before retrying a refused (overloaded) forward; each
/// retry doubles it, up to [`MAX_BACKOFF`], with up to half again of jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// A call to the router that answers with a layer's output.
enum LayerCall {
    Forward(ForwardRequest),
    ForwardRouted(ForwardRoutedRequest),
}

/// A pseudo-random fraction in [0, 1) from the clock: spreads the retries
/// of clients refused at the same moment.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.subsec_nanos());
    let mixed = (u64::from(nanos) ^ 0x9e37_79b9_7f4a_7c15).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

impl Client {
    /// Connects to a router over plaintext, for example `http://127.0.0.1:50051`.
    pub async fn connect(address: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with_tls(address, &TlsConfig::plaintext()).await
    }

    /// Connects to a router, with mutual TLS when `tls` says so.
    pub async fn connect_with_tls(
        address: impl Into<String>,
        tls: &TlsConfig,
    ) -> Result<Self, ClientError> {
        let address = address.into();
        let connect_error = |message: String| ClientError::Connect {
            address: address.clone(),
            message,
        };
        let endpoint = tls
            .endpoint(address.clone())
            .map_err(|error| connect_error(error.to_string()))?;
        let channel = moemesh_proto::data_path_channel(endpoint)
            .await
            .map_err(|error| connect_error(format!("{error:?}")))?;
        let router = RouterServiceClient::new(tls.channel(channel))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        Ok(Self {
            router,
            deadline: DEFAULT_DEADLINE,
        })
    }

    /// Sets how long each forward may take, retries included (the router
    /// receives it as the call's deadline).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Computes MoE layer `layer` of `model` (empty: the router's only
    /// model) for `hidden`, a `[tokens, hidden_size]` tensor; the output
    /// has the same shape and dtype.
    pub async fn forward(
        &mut self,
        model: &str,
        layer: u32,
        hidden: Tensor,
    ) -> Result<Tensor, ClientError> {
        Ok(self.forward_timed(model, layer, hidden).await?.output)
    }

    /// Like [`Client::forward`], also returning how long the slowest expert
    /// node computed (the rest of the latency is dispatch).
    pub async fn forward_timed(
        &mut self,
        model: &str,
        layer: u32,
        hidden: Tensor,
    ) -> Result<Timed<Tensor>, ClientError> {
        let request = ForwardRequest {
            model: model.to_string(),
            layer,
            hidden: Some(hidden),
        };
        timed_output(self.call(LayerCall::Forward(request)).await?)
    }

    /// Computes the routed experts of MoE layer `layer` of `model` (empty:
    /// the router's only model) for `hidden`, a `[tokens, hidden_size]`
    /// tensor, by the caller's routing: `expert_ids` and `weights` are
    /// `[tokens * top_k]` row-major, each token's `top_k` distinct routed
    /// experts (any order) and their weights. Each output row is the
    /// weighted sum of its token's experts; a model's shared experts are
    /// not run (they stay with the caller). Same shape and dtype as `hidden`.
    pub async fn forward_routed(
        &mut self,
        model: &str,
        layer: u32,
        hidden: Tensor,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
        top_k: u32,
    ) -> Result<Tensor, ClientError> {
        Ok(self
            .forward_routed_timed(model, layer, hidden, expert_ids, weights, top_k)
            .await?
            .output)
    }

    /// [`Client::forward_routed`] with the slowest expert node's compute time.
    pub async fn forward_routed_timed(
        &mut self,
        model: &str,
        layer: u32,
        hidden: Tensor,
        expert_ids: Vec<u32>,
        weights: Vec<f32>,
        top_k: u32,
    ) -> Result<Timed<Tensor>, ClientError> {
        let request = ForwardRoutedRequest {
            model: model.to_string(),
            layer,
            hidden: Some(hidden),
            top_k,
            expert_ids,
            weights,
        };
        timed_output(self.call(LayerCall::ForwardRouted(request)).await?)
    }

    /// What the router serves as `model` (empty: its only model): the
    /// family, hidden size, routed experts and experts per token, and the
    /// SHA-256 of each MoE layer's gate (`LayerGate` in the proto says
    /// which bytes), so that a caller gating itself can check that it holds
    /// the same checkpoint.
    pub async fn describe(&mut self, model: &str) -> Result<DescribeResponse, ClientError> {
        let mut call = tonic::Request::new(DescribeRequest {
            model: model.to_string(),
        });
        call.set_timeout(self.deadline);
        Ok(self.router.describe(call).await?.into_inner())
    }

    /// Sends `request`; a refusal because the cluster is overloaded is
    /// tried again after a growing, jittered pause while the deadline
    /// allows.
    async fn call(&mut self, request: LayerCall) -> Result<ForwardResponse, ClientError> {
        let deadline = std::time::Instant::now() + self.deadline;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            let timeout = remaining.max(Duration::from_millis(1));
            let answer = match &request {
                LayerCall::Forward(request) => {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(timeout);
                    self.router.forward(call).await
                }
                LayerCall::ForwardRouted(request) => {
                    let mut call = tonic::Request::new(request.clone());
                    call.set_timeout(timeout);
                    self.router.forward_routed(call).await
                }
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                    let pause = backoff.mul_f64(1.0 + 0.5 * jitter());
                    if std::time::Instant::now() + pause >= deadline {
                        return Err(status.into());
                    }
                    tokio::time::sleep(pause).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(status) => return Err(status.into()),
            }
        }
    }

    /// Like [`Client::forward`] for f32 rows: `hidden` is `[tokens,
    /// hidden_size]` row-major, and so is the result.
    pub async fn forward_f32(
        &mut self,
        model: &str,
        layer: u32,
        hidden: &[f32],
        hidden_size: usize,
    ) -> Result<Vec<f32>, ClientError> {
        Ok(self
            .forward_f32_timed(model, layer, hidden, hidden_size)
            .await?
            .output)
    }

    /// [`Client::forward_f32`] with the slowest expert node's compute time.
    pub async fn forward_f32_timed(
        &mut self,
        model: &str,
        layer: u32,
        hidden: &[f32],
        hidden_size: usize,
    ) -> Result<Timed<Vec<f32>>, ClientError> {
        let tokens = token_count(hidden, hidden_size)?;
        let timed = self
            .forward_timed(
                model,
                layer,
                encode(hidden, &[tokens, hidden_size], WireDtype::F32),
            )
            .await?;
        output_rows(timed, tokens, hidden_size)
    }

    /// Like [`Client::forward_routed`] for f32 rows: `hidden` is `[tokens,
    /// hidden_size]` row-major, `expert_ids` and `weights` `[tokens *
    /// top_k]` row-major, and the result `[tokens, hidden_size]`.
    #[allow(
        clippy::too_many_arguments,
        reason = "the f32 form of forward_routed: the model, layer, rows and routing each stand alone"
    )]
    pub async fn forward_routed_f32(
        &mut self,
        model: &str,
        layer: u32,
        hidden: &[f32],
        hidden_size: usize,
        expert_ids: &[u32],
        weights: &[f32],
        top_k: usize,
    ) -> Result<Vec<f32>, ClientError> {
        let tokens = token_count(hidden, hidden_size)?;
        let top_k = u32::try_from(top_k).map_err(|_| {
            ClientError::InvalidArgument(format!(
                "top_k {top_k} is larger than any model's experts"
            ))
        })?;
        let timed = self
            .forward_routed_timed(
                model,
                layer,
                encode(hidden, &[tokens, hidden_size], WireDtype::F32),
                expert_ids.to_vec(),
                weights.to_vec(),
                top_k,
            )
            .await?;
        Ok(output_rows(timed, tokens, hidden_size)?.output)
    }
}

/// The rows of `hidden` at `hidden_size` values each.
fn token_count(hidden: &[f32], hidden_size: usize) -> Result<usize, ClientError> {
    if hidden_size == 0 || !hidden.len().is_multiple_of(hidden_size) {
        return Err(ClientError::InvalidArgument(format!(
            "{} values do not form rows of hidden size {hidden_size}",
            hidden.len()
        )));
    }
    Ok(hidden.len() / hidden_size)
}

/// The output tensor of a router's answer, with its compute time.
fn timed_output(response: ForwardResponse) -> Result<Timed<Tensor>, ClientError> {
    let output = response
        .output
        .ok_or_else(|| ClientError::BadReply("reply has no output tensor".into()))?;
    Ok(Timed {
        output,
        expert_compute: Duration::from_micros(response.expert_compute_micros),
    })
}

/// The f32 rows of an output tensor that must hold `tokens` rows.
fn output_rows(
    timed: Timed<Tensor>,
    tokens: usize,
    hidden_size: usize,
) -> Result<Timed<Vec<f32>>, ClientError> {
    let rows = decode_rows(Some(&timed.output), hidden_size)
        .map_err(|error| ClientError::BadReply(error.to_string()))?;
    if rows.rows != tokens {
        return Err(ClientError::BadReply(format!(
            "{} output rows for {tokens} tokens",
            rows.rows
        )));
    }
    Ok(Timed {
        output: rows.values,
        expert_compute: timed.expert_compute,
    })
}
