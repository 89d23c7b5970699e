//! moemesh-coordinator: the Raft-replicated source of truth for a cluster's
//! membership, models and expert placement.
//!
//! - [`storage`]: the Raft log, hard state and snapshots in redb.
//! - [`state`]: the replicated state machine and its commands.
//! - [`node`]: the [`node::RaftNode`] actor that owns the raft-rs `RawNode`
//!   and runs its Ready loop, and its handle.
//! - [`transport`]: how raft messages reach other coordinators.
//! - [`grpc`]: the peer transport over gRPC and the admin API.
//! - [`membership`]: heartbeats, dead nodes, and moving replicas safely.

mod error;
pub mod grpc;
pub mod load;
pub mod membership;
pub mod node;
pub mod rebalance;
pub mod state;
pub mod storage;
pub mod transport;

pub use error::{CoordinatorError, CoordinatorResult};
