//! moemesh-coordinator: the Raft-replicated source of truth for a cluster's
//! membership, models and expert placement.
//!
//! Start reading at [`server`]: [`server::run`] serves a coordinator on a
//! listener until shutdown; [`server::Coordinator`] starts one first when
//! the caller needs its [`node::RaftHandle`]. [`server::CoordinatorConfig`]
//! says where the other coordinators are and how the cluster is timed.
//!
//! The replicated core:
//! - [`node`]: the [`node::RaftNode`] actor that owns the raft-rs `RawNode`
//!   and runs its Ready loop; [`node::RaftHandle`], through which everything
//!   else proposes (once per request id) and reads; and the
//!   [`node::RaftTransport`] trait it sends raft messages through.
//! - [`state`]: the replicated state machine and its commands.
//! - [`history`]: what recent commands touched, so that placement watchers
//!   get only what changed since the revision they have.
//! - [`storage`]: the Raft log, hard state and snapshots in redb.
//! - [`transport`]: the transports: gRPC between coordinators, and a
//!   simulated network with faults for tests.
//!
//! What the coordinator does with it:
//! - [`placement`]: placement policy as plain functions over the state
//!   (describing models, first replicas, the placement on the wire).
//! - [`watch`]: the placement streams: a snapshot or the changes since a
//!   watcher's revision, then the changes as they are applied.
//! - [`membership`]: heartbeats, dead nodes, and moving replicas safely.
//! - [`rebalance`]: planning from the load window and carrying plans out,
//!   on request or periodically on the leader.
//! - [`load`]: the load window routers and expert nodes report into.
//! - [`metrics`]: what the coordinator tells Prometheus.
//!
//! On the network (private): `peer` serves the peer service (raft messages,
//! status); `admin` serves the admin service with thin handlers;
//! `registration` handles what expert nodes report; `auth` checks
//! operators' admin token; `forward` hands calls to the leader. `error`
//! maps errors to gRPC status codes in one place.

mod admin;
mod auth;
mod error;
mod forward;
pub mod history;
pub mod load;
pub mod membership;
pub mod metrics;
pub mod node;
mod peer;
pub mod placement;
pub mod rebalance;
mod registration;
pub mod server;
pub mod state;
pub mod storage;
pub mod transport;
pub mod watch;

pub use error::{CoordinatorError, CoordinatorResult};
