//! Starting and serving a coordinator: its configuration, the wiring of
//! the Raft node, membership monitor, rebalancer and the two gRPC services
//! (peer and admin, plus gRPC health), and an orderly shutdown.
//!
//! A coordinator serves on one listener, or on two as etcd does: the admin
//! listener for expert nodes, routers and operators, and a peer listener
//! for the other coordinators (raft traffic, and the calls they forward to
//! the leader), so a network policy can keep raft among coordinators.
//! Every call must come from a member ([`TlsConfig::members_only`]); each
//! handler then checks the caller's role.
//!
//! [`run`] serves on a listener until a shutdown future completes, so a test
//! binds `127.0.0.1:0`, spawns it and connects. [`Coordinator`] splits that
//! in two for callers that need the Raft handle, or need to know the
//! coordinator started before it serves.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use moemesh_proto::tls::TlsConfig;
use moemesh_proto::{AdminServiceServer, CoordinatorPeerServiceServer, MAX_MESSAGE_BYTES};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::service::interceptor::InterceptedService;

use crate::admin::AdminApi;
use crate::auth::OperatorAuth;
use crate::forward::LeaderForwarding;
use crate::load::LoadTracker;
use crate::membership::{self, Membership};
use crate::metrics::CoordinatorMetrics;
use crate::node::{RaftHandle, RaftNode, RaftNodeConfig};
use crate::peer::PeerService;
use crate::rebalance::{RebalanceOptions, Rebalancer, periodic_rebalance_task};
use crate::transport::GrpcTransport;
use crate::{CoordinatorError, CoordinatorResult};

/// Where the other coordinators are, and membership timing.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub raft: RaftNodeConfig,
    /// Every coordinator's id and URL, this one included.
    pub peers: BTreeMap<u64, String>,
    /// Silence after which the leader declares an expert node dead.
    pub dead_after: Duration,
    /// How long a drained replica stays before removal during a move.
    pub drain_grace: Duration,
    /// How far back the load statistics reach.
    pub load_window: Duration,
    /// How the rebalancer plans and moves.
    pub rebalance: RebalanceOptions,
    /// Rebalance every model this often on the leader; None: only on request.
    pub rebalance_interval: Option<Duration>,
    /// Operators' calls (status, placement, loading, moves, statistics,
    /// rebalancing) must carry `authorization: Bearer <token>`; None: open.
    pub admin_token: Option<String>,
    /// How connections to and from peers are secured.
    pub tls: TlsConfig,
    /// Where the coordinator's metrics go; the default is registered nowhere.
    pub metrics: CoordinatorMetrics,
}

impl CoordinatorConfig {
    /// Defaults: nodes are dead after 5 s of silence; moves drain for 2 s;
    /// load statistics cover a minute.
    pub fn new(raft: RaftNodeConfig, peers: BTreeMap<u64, String>) -> Self {
        Self {
            raft,
            peers,
            dead_after: Duration::from_secs(5),
            drain_grace: membership::DRAIN_GRACE,
            load_window: Duration::from_secs(60),
            rebalance: RebalanceOptions::default(),
            rebalance_interval: None,
            admin_token: None,
            tls: TlsConfig::plaintext(),
            metrics: CoordinatorMetrics::default(),
        }
    }
}

/// Largest request the admin service decodes: its requests are small (a
/// registration lists at most every expert of a model).
const ADMIN_MESSAGE_BYTES: usize = 16 << 20;

/// Starts a coordinator and serves it on `listener` until `shutdown`
/// completes; see [`Coordinator::serve`].
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> CoordinatorResult<()> {
    Coordinator::start(config)?.serve(listener, shutdown).await
}

/// A started coordinator, not yet serving: its Raft node and the services
/// around it.
pub struct Coordinator {
    raft: RaftHandle,
    tls: TlsConfig,
    peer: PeerService,
    admin: AdminApi,
    /// Ends the admin service's placement streams at shutdown.
    streams_closing: Arc<watch::Sender<bool>>,
}

impl Coordinator {
    /// Opens the store, starts the Raft node and the peer transport, the
    /// membership monitor and, when configured, periodic rebalancing.
    pub fn start(config: CoordinatorConfig) -> CoordinatorResult<Self> {
        let id = config.raft.id;
        let Some(own_address) = config.peers.get(&id).cloned() else {
            return Err(CoordinatorError::Rejected(format!(
                "--peers must include this coordinator's id {id}"
            )));
        };
        let mut raft_config = config.raft.clone();
        raft_config.voters = config.peers.keys().copied().collect();
        raft_config.metrics = config.metrics.clone();
        let handle_slot = Arc::new(OnceLock::new());
        let transport =
            GrpcTransport::start(id, &config.peers, &config.tls, Arc::clone(&handle_slot))?;
        let raft = RaftNode::spawn(raft_config, Arc::new(transport))?;
        let _ = handle_slot.set(raft.clone());
        let membership = Membership::with_drain_grace(
            raft.clone(),
            config.dead_after,
            config.drain_grace,
            config.metrics.clone(),
        );
        tokio::spawn(Arc::clone(&membership).monitor_task());
        let auth = OperatorAuth::new(config.admin_token.clone(), config.tls.clone());
        let forward =
            LeaderForwarding::new(id, &config.peers, &config.tls, raft.clone(), auth.clone())?;
        let load =
            Arc::new(LoadTracker::new(config.load_window).with_metrics(config.metrics.clone()));
        let rebalance_options = RebalanceOptions {
            drain_grace: config.drain_grace,
            ..config.rebalance
        };
        let rebalancer = Rebalancer::new(
            raft.clone(),
            Arc::clone(&load),
            rebalance_options,
            config.metrics.clone(),
        );
        if let Some(interval) = config.rebalance_interval {
            tokio::spawn(periodic_rebalance_task(rebalancer.clone(), interval));
        }
        let streams_closing = Arc::new(watch::channel(false).0);
        let admin = AdminApi {
            own_id: id,
            raft: raft.clone(),
            peers: config.peers,
            tls: config.tls.clone(),
            auth,
            forward,
            membership,
            load,
            rebalancer,
            drain_grace: config.drain_grace,
            metrics: config.metrics,
            streams_closing: Arc::clone(&streams_closing),
        };
        Ok(Self {
            peer: PeerService::new(raft.clone(), own_address, config.tls.clone()),
            raft,
            tls: config.tls,
            admin,
            streams_closing,
        })
    }

    /// Returns the Raft node's handle.
    pub fn node(&self) -> &RaftHandle {
        &self.raft
    }

    /// Serves the peer and admin services (and gRPC health) on `listener`
    /// until `shutdown`, then stops the Raft node and closes its store.
    /// Also stops, with an error, if the Raft node stops on its own.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> CoordinatorResult<()> {
        self.serve_split(listener, None, shutdown).await
    }

    /// Like [`Coordinator::serve`], with the peer service on a listener of
    /// its own when `peer_listener` is given: then `listener` serves only
    /// the admin service (and health), and the peer listener serves the
    /// peer service and the admin calls other coordinators forward.
    pub async fn serve_split(
        self,
        listener: TcpListener,
        peer_listener: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> CoordinatorResult<()> {
        let Self {
            raft,
            tls,
            peer,
            admin,
            streams_closing,
        } = self;
        let raft_stopped = Arc::new(AtomicBool::new(false));
        let shutdown = {
            let raft = raft.clone();
            let raft_stopped = Arc::clone(&raft_stopped);
            async move {
                tokio::select! {
                    _ = shutdown => {}
                    // Without its Raft node a coordinator can only refuse: stop
                    // serving so that a supervisor restarts it from its store.
                    _ = raft.stopped() => raft_stopped.store(true, Ordering::Relaxed),
                }
                streams_closing.send_replace(true);
            }
        };
        let (stopping_tx, stopping) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            stopping_tx.send_replace(true);
        });
        let until_stopping = move || {
            let mut stopping = stopping.clone();
            async move {
                let _ = stopping.wait_for(|stopping| *stopping).await;
            }
        };
        let services = [<AdminServiceServer<AdminApi> as NamedService>::NAME];
        let with_peer = [
            services[0],
            <CoordinatorPeerServiceServer<PeerService> as NamedService>::NAME,
        ];
        let guard = tls.members_only();
        let peer = InterceptedService::new(
            CoordinatorPeerServiceServer::new(peer)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            guard.clone(),
        );
        let admin = || {
            let server = AdminServiceServer::new(admin.clone())
                .max_decoding_message_size(ADMIN_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES);
            InterceptedService::new(server, guard.clone())
        };
        let result = match peer_listener {
            None => {
                let routes = Routes::new(peer).add_service(admin());
                serve_routes(&tls, routes, &with_peer, listener, until_stopping()).await
            }
            Some(peer_listener) => {
                let peer_routes = Routes::new(peer).add_service(admin());
                let (admin_result, peer_result) = tokio::join!(
                    serve_routes(
                        &tls,
                        Routes::new(admin()),
                        &services,
                        listener,
                        until_stopping()
                    ),
                    serve_routes(
                        &tls,
                        peer_routes,
                        &with_peer,
                        peer_listener,
                        until_stopping()
                    ),
                );
                admin_result.and(peer_result)
            }
        };
        raft.shutdown().await;
        result?;
        if raft_stopped.load(Ordering::Relaxed) {
            return Err(CoordinatorError::Storage(
                "the raft node stopped; see the errors above".into(),
            ));
        }
        Ok(())
    }
}

/// Serves `routes` (and health) on `listener` until `shutdown`.
async fn serve_routes(
    tls: &TlsConfig,
    routes: Routes,
    services: &[&'static str],
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> CoordinatorResult<()> {
    let builder = tls
        .server()
        .map_err(|error| CoordinatorError::Rejected(format!("TLS setup failed: {error}")))?;
    moemesh_proto::serve_with_health(builder, routes, services, listener, shutdown)
        .await
        .map_err(|error| CoordinatorError::Storage(format!("server failed: {error}")))
}
