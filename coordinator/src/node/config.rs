//! [`RaftNodeConfig`]: how one coordinator's Raft node is set up and timed.

use std::path::PathBuf;
use std::time::Duration;

use crate::metrics::CoordinatorMetrics;

/// Settings of one coordinator's Raft node.
#[derive(Debug, Clone)]
pub struct RaftNodeConfig {
    /// This coordinator's id, non-zero and unique in the group.
    pub id: u64,
    /// Ids of every coordinator of the group (its first configuration).
    pub voters: Vec<u64>,
    /// Where the log, hard state and snapshots are kept.
    pub data_dir: PathBuf,
    /// Length of one raft tick.
    pub tick_interval: Duration,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this).
    pub election_ticks: usize,
    /// Ticks between a leader's heartbeats.
    pub heartbeat_ticks: usize,
    /// Applied entries after which the log is compacted behind a snapshot.
    pub compact_after_entries: u64,
    /// How long a proposal or read may wait to be applied.
    pub request_timeout: Duration,
    /// Node and expert ids the placement history keeps (see
    /// [`crate::history`]); watchers further behind get a snapshot.
    pub history_ids: usize,
    /// Where the node reports its applied state and place in the group; a
    /// coordinator puts its `CoordinatorConfig::metrics` here.
    pub metrics: CoordinatorMetrics,
}

impl RaftNodeConfig {
    /// Defaults for a coordinator on a LAN: 100 ms ticks, elections after 1-2 s.
    pub fn new(id: u64, voters: Vec<u64>, data_dir: PathBuf) -> Self {
        Self {
            id,
            voters,
            data_dir,
            tick_interval: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            compact_after_entries: 1000,
            request_timeout: Duration::from_secs(5),
            history_ids: crate::history::DEFAULT_HISTORY_IDS,
            metrics: CoordinatorMetrics::default(),
        }
    }
}
