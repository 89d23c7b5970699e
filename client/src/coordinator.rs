//! [`CoordinatorClient`]: the one way into a coordinator group, for
//! operators (moectl), expert nodes (registration, heartbeats, placement),
//! routers (placement, load reports) and tools.
//!
//! A client is given every coordinator's URL it knows. Any coordinator
//! answers: followers hand writes and moves to their leader. When the
//! coordinator in use cannot be reached, or answers UNAVAILABLE (no leader
//! during an election, shutting down), the call goes to the next one, once
//! round the list. Calls that change the cluster carry a request id made
//! here, so a call retried on another coordinator applies once.
//!
//! The calls themselves live in [`crate::admin`] (operators) and
//! [`crate::membership`] (nodes and routers); this module owns the
//! connection and the placement stream.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use moemesh_proto::AdminServiceClient;
use moemesh_proto::placement::PlacementView;
use moemesh_proto::tls::{MemberChannel, TlsConfig};
use moemesh_proto::v1::{
    PlacementSnapshot, PlacementUpdate, WatchPlacementRequest, placement_update,
};
use tokio::sync::mpsc;
use tonic::Code;

use crate::ClientError;

/// Calls the admin service's `$method` with `$request` through
/// [`CoordinatorClient::call`]: on the coordinator in use, moving on to the
/// next when it fails.
macro_rules! call_rpc {
    ($client:expr, $method:ident, $request:expr) => {
        $client
            .call($request, |mut admin, request| async move {
                admin.$method(request).await
            })
            .await
    };
}
pub(crate) use call_rpc;

/// How long connecting to one coordinator may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The pause before a placement stream that ended is opened again.
const REWATCH_PAUSE: Duration = Duration::from_millis(200);

/// A client of a coordinator group that moves to another coordinator when
/// the one in use fails. Cheap to clone; each clone keeps its own connection.
#[derive(Clone)]
pub struct CoordinatorClient {
    /// Every coordinator URL given; any one will do.
    addresses: Arc<[String]>,
    tls: TlsConfig,
    /// Sent as `authorization: Bearer <token>` with operators' calls.
    token: Option<String>,
    /// Limit on each call (not on the placement stream); None: no limit.
    call_timeout: Option<Duration>,
    /// The coordinator in use: an index into `addresses`, and its
    /// connection once made.
    current: usize,
    connected: Option<AdminServiceClient<MemberChannel>>,
}

impl CoordinatorClient {
    /// A client of the coordinators at `addresses` (for example
    /// `http://127.0.0.1:7000`); it connects on the first call.
    pub fn new(
        addresses: impl IntoIterator<Item = impl Into<String>>,
        tls: TlsConfig,
    ) -> Result<Self, ClientError> {
        let addresses: Arc<[String]> = addresses.into_iter().map(Into::into).collect();
        if addresses.is_empty() {
            return Err(ClientError::Connect {
                address: String::new(),
                message: "no coordinator address given".into(),
            });
        }
        for address in addresses.iter() {
            tls.endpoint(address.clone())
                .map_err(|error| ClientError::Connect {
                    address: address.clone(),
                    message: error.to_string(),
                })?;
        }
        Ok(Self {
            addresses,
            tls,
            token: None,
            call_timeout: None,
            current: 0,
            connected: None,
        })
    }

    /// Connects to the first coordinator that answers, to fail early when
    /// none does.
    pub async fn connect(
        addresses: impl IntoIterator<Item = impl Into<String>>,
        tls: TlsConfig,
    ) -> Result<Self, ClientError> {
        let mut client = Self::new(addresses, tls)?;
        client.connection().await?;
        Ok(client)
    }

    /// Sends `token` with operators' calls, for coordinators started with
    /// `--admin-token` (an empty token sends none).
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = (!token.is_empty()).then_some(token);
        self
    }

    /// Gives up on a coordinator that takes longer than `timeout` to answer
    /// one call, and asks the next.
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// Wraps a message, with the operator's token when there is one.
    fn authorized<M>(&self, message: M) -> tonic::Request<M> {
        let mut request = tonic::Request::new(message);
        if let Some(token) = &self.token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// The connection to the coordinator in use, connecting to it (or,
    /// failing that, to the next ones) when there is none.
    async fn connection(&mut self) -> Result<AdminServiceClient<MemberChannel>, ClientError> {
        if let Some(connected) = &self.connected {
            return Ok(connected.clone());
        }
        let mut last_error = None;
        for _ in 0..self.addresses.len() {
            let address = self.addresses[self.current].clone();
            match connect(&self.tls, &address).await {
                Ok(client) => {
                    self.connected = Some(client.clone());
                    return Ok(client);
                }
                Err(error) => last_error = Some(error),
            }
            self.move_on();
        }
        Err(last_error.expect("a client has at least one address"))
    }

    /// Leaves the coordinator in use for the next one.
    fn move_on(&mut self) {
        self.connected = None;
        self.current = (self.current + 1) % self.addresses.len();
    }

    /// Sends `message` through `call` to the coordinator in use, moving on
    /// to the others (once round) while it cannot be reached or answers
    /// UNAVAILABLE.
    pub(crate) async fn call<M, T, F, Fut>(
        &mut self,
        message: M,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        M: Clone,
        F: FnMut(AdminServiceClient<MemberChannel>, tonic::Request<M>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut last_error = None;
        for _ in 0..self.addresses.len() {
            let admin = self.connection().await?;
            let answer = call(admin, self.authorized(message.clone()));
            let answer = match self.call_timeout {
                Some(timeout) => tokio::time::timeout(timeout, answer)
                    .await
                    .unwrap_or_else(|_| {
                        Err(tonic::Status::unavailable(
                            "the coordinator did not answer in time",
                        ))
                    }),
                None => answer.await,
            };
            match answer {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if status.code() == Code::Unavailable => {
                    tracing::debug!(
                        coordinator = %self.addresses[self.current],
                        error = status.message(),
                        "coordinator unavailable; trying the next"
                    );
                    last_error = Some(status.into());
                    self.move_on();
                }
                Err(status) => return Err(status.into()),
            }
        }
        Err(last_error.expect("a client has at least one address"))
    }

    /// The placement updates of `model` (empty: every model) forever: a
    /// snapshot first (or, given the revision of a [`PlacementView`] kept
    /// from an earlier stream, what changed since), then what changes. When
    /// a coordinator's stream ends, the next coordinator's is opened from
    /// the revision already delivered, so the updates go on applying in
    /// order to one view, and never go back to an older revision (from a
    /// coordinator that lags). The stream ends when dropped.
    pub fn watch_placement_updates(
        &self,
        model: &str,
        since_revision: Option<u64>,
    ) -> impl Stream<Item = PlacementUpdate> + Send + Unpin + 'static {
        // One update at a time: a slow reader holds the coordinator's
        // stream back, and the coordinator folds what changes meanwhile
        // into its next update.
        let (update_tx, update_rx) = mpsc::channel(1);
        let watcher = PlacementWatcher {
            client: self.clone(),
            model: model.to_string(),
            revision: since_revision,
            update_tx,
        };
        tokio::spawn(watcher.run());
        tokio_stream::wrappers::ReceiverStream::new(update_rx)
    }

    /// The placement of `model` (empty: every model) after every update
    /// from `from_epoch` on, forever, as whole snapshots kept from the
    /// updates of [`watch_placement_updates`](Self::watch_placement_updates).
    /// The stream ends when dropped.
    pub fn watch_placement(
        &self,
        model: &str,
        from_epoch: u64,
    ) -> impl Stream<Item = PlacementSnapshot> + Send + Unpin + 'static {
        let model = model.to_string();
        let mut view = PlacementView::new();
        self.watch_placement_updates(&model, None)
            .filter_map(move |update| {
                let snapshot = match view.apply(update, &model) {
                    Ok(_) if view.epoch() >= from_epoch => Some(view.snapshot()),
                    Ok(_) => None,
                    Err(error) => {
                        tracing::warn!(%error, "placement update dropped");
                        None
                    }
                };
                std::future::ready(snapshot)
            })
            .boxed()
    }
}

/// Connects to one coordinator.
async fn connect(
    tls: &TlsConfig,
    address: &str,
) -> Result<AdminServiceClient<MemberChannel>, ClientError> {
    let connect_error = |message: String| ClientError::Connect {
        address: address.to_string(),
        message,
    };
    let channel = tls
        .endpoint(address.to_string())
        .map_err(|error| connect_error(error.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .connect()
        .await
        .map_err(|error| connect_error(format!("{error:?}")))?;
    Ok(AdminServiceClient::new(tls.channel(channel)))
}

/// The task behind [`CoordinatorClient::watch_placement_updates`].
struct PlacementWatcher {
    client: CoordinatorClient,
    model: String,
    /// The revision of the updates delivered so far; None before the first
    /// snapshot.
    revision: Option<u64>,
    /// The stream the caller holds; closed when the caller drops it.
    update_tx: mpsc::Sender<PlacementUpdate>,
}

impl PlacementWatcher {
    async fn run(mut self) {
        loop {
            let update_tx = self.update_tx.clone();
            tokio::select! {
                result = self.follow_one() => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "placement stream ended; trying the next coordinator");
                    }
                }
                _ = update_tx.closed() => return,
            }
            self.client.move_on();
            tokio::select! {
                _ = tokio::time::sleep(REWATCH_PAUSE) => {}
                _ = self.update_tx.closed() => return,
            }
        }
    }

    /// Follows one coordinator's stream, from the revision delivered so
    /// far, until it ends or fails.
    async fn follow_one(&mut self) -> Result<(), ClientError> {
        let mut admin = self.client.connection().await?;
        let request = WatchPlacementRequest {
            model: self.model.clone(),
            since_revision: self.revision,
        };
        let mut stream = admin.watch_placement(request).await?.into_inner();
        while let Some(update) = stream.message().await? {
            let revision = match &update.update {
                Some(placement_update::Update::Snapshot(snapshot)) => snapshot.revision,
                Some(placement_update::Update::Delta(delta)) if self.revision.is_some() => {
                    delta.revision
                }
                _ => {
                    // Nothing to apply it to: start again from a snapshot.
                    self.revision = None;
                    return Err(ClientError::Other {
                        code: Code::Internal,
                        message: "the coordinator sent a placement update that does not apply"
                            .into(),
                    });
                }
            };
            if self.revision.is_some_and(|have| revision < have) {
                // This coordinator is behind the one before: its updates
                // apply again once it has caught up (see `PlacementView`).
                continue;
            }
            self.revision = Some(revision);
            if self.update_tx.send(update).await.is_err() {
                return Ok(());
            }
        }
        Ok(())
    }
}
