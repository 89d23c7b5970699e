//! A group of coordinators in one process over a simulated network:
//! elections, leader loss, restarts, partitions, lost and delayed messages.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use moemesh_coordinator::CoordinatorError;
use moemesh_coordinator::node::{RaftHandle, RaftNode, RaftNodeConfig};
use moemesh_coordinator::state::{
    ClusterState, Command, NodeRecord, NodeStatus, Outcome, Proposal,
};
use moemesh_coordinator::transport::SimNetwork;

/// Long enough for elections on a slow, noisy machine; only an upper bound.
const PATIENCE: Duration = Duration::from_secs(60);

struct Group {
    _dirs: tempfile::TempDir,
    data_dirs: HashMap<u64, PathBuf>,
    voters: Vec<u64>,
    network: SimNetwork,
    handles: HashMap<u64, RaftHandle>,
    compact_after_entries: u64,
}

impl Group {
    fn new(size: u64, compact_after_entries: u64) -> Self {
        let dirs = tempfile::tempdir().unwrap();
        let voters: Vec<u64> = (1..=size).collect();
        let data_dirs = voters
            .iter()
            .map(|&id| (id, dirs.path().join(format!("coordinator-{id}"))))
            .collect();
        let mut group = Self {
            _dirs: dirs,
            data_dirs,
            voters: voters.clone(),
            network: SimNetwork::default(),
            handles: HashMap::new(),
            compact_after_entries,
        };
        for id in voters {
            group.start(id);
        }
        group
    }

    fn start(&mut self, id: u64) {
        let mut config = RaftNodeConfig::new(id, self.voters.clone(), self.data_dirs[&id].clone());
        config.tick_interval = Duration::from_millis(20);
        config.compact_after_entries = self.compact_after_entries;
        config.request_timeout = Duration::from_secs(3);
        let handle = RaftNode::spawn(config, self.network.transport()).unwrap();
        self.network.attach(id, handle.clone());
        self.handles.insert(id, handle);
    }

    async fn stop(&mut self, id: u64) {
        self.network.detach(id);
        let handle = self.handles.remove(&id).unwrap();
        handle.shutdown().await;
    }

    /// Waits until every running coordinator names the same leader, and returns it.
    async fn leader(&self) -> u64 {
        let started = Instant::now();
        loop {
            let mut leaders = Vec::new();
            for handle in self.handles.values() {
                leaders.push(handle.status().await.unwrap().leader_id);
            }
            if let Some(Some(leader)) = leaders.first().copied()
                && leaders.iter().all(|candidate| *candidate == Some(leader))
                && self.handles.contains_key(&leader)
            {
                return leader;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no agreed leader: {leaders:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes through coordinator `via` until the outcome is known.
    async fn propose_until_known(&self, via: u64, request_id: &str, command: Command) -> Outcome {
        propose_until_known(self.handles[&via].clone(), request_id.to_string(), command).await
    }

    /// Waits until every running coordinator has applied the same state, and returns it.
    async fn converged(&self) -> Arc<ClusterState> {
        let started = Instant::now();
        loop {
            let states: Vec<Arc<ClusterState>> = self
                .handles
                .values()
                .map(RaftHandle::applied_state)
                .collect();
            if states.windows(2).all(|pair| pair[0] == pair[1]) {
                return Arc::clone(&states[0]);
            }
            assert!(started.elapsed() < PATIENCE, "coordinators never converged");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        for id in self.handles.keys().copied().collect::<Vec<_>>() {
            self.stop(id).await;
        }
    }
}

/// Returns whether a proposal's outcome is unknown, so that a retry with
/// the same request id is the right response.
fn outcome_unknown(error: &CoordinatorError) -> bool {
    matches!(
        error,
        CoordinatorError::NoLeader(_)
            | CoordinatorError::ProposalTimedOut { .. }
            | CoordinatorError::LeaderChanged { .. }
    )
}

/// Proposes, retrying with the same request id until the outcome is known.
async fn propose_until_known(handle: RaftHandle, request_id: String, command: Command) -> Outcome {
    let started = Instant::now();
    loop {
        let proposal = Proposal {
            request_id: request_id.clone(),
            command: command.clone(),
        };
        match handle.propose(proposal).await {
            Ok(outcome) => return outcome,
            Err(error) if outcome_unknown(&error) => {
                assert!(
                    started.elapsed() < PATIENCE,
                    "{request_id} never committed: {error}"
                );
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            Err(error) => panic!("{request_id}: unexpected error {error}"),
        }
    }
}

fn register(id: &str) -> Command {
    Command::RegisterNode {
        node: NodeRecord {
            id: id.into(),
            address: format!("http://{id}:50061"),
            group: "rack-1".into(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            buffer_bytes: 0,
            weight_format: String::new(),
            status: NodeStatus::Ready,
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_every_committed_change_and_nothing_commits_twice() {
    let mut group = Group::new(3, 1000);
    let leader = group.leader().await;
    for index in 0..5 {
        let outcome = group
            .propose_until_known(
                leader,
                &format!("before-{index}"),
                register(&format!("node-{index}")),
            )
            .await;
        assert_eq!(outcome, Outcome::Applied { epoch: 0 });
    }
    let follower = *group.handles.keys().find(|&&id| id != leader).unwrap();
    // Proposals race with the leader's loss; each is retried until its outcome is known.
    let proposals: Vec<_> = (0..6)
        .map(|index| {
            let handle = group.handles[&follower].clone();
            tokio::spawn(propose_until_known(
                handle,
                format!("during-{index}"),
                register(&format!("late-{index}")),
            ))
        })
        .collect();
    group.stop(leader).await;
    let new_leader = group.leader().await;
    assert_ne!(new_leader, leader);
    for proposal in proposals {
        assert!(matches!(proposal.await.unwrap(), Outcome::Applied { .. }));
    }
    let state = group.converged().await;
    assert_eq!(
        state.nodes.len(),
        11,
        "every committed change survives the leader"
    );
    assert_eq!(state.applied_commands, 11, "no proposal was applied twice");
    // A proposal made while no leader is known fails clearly rather than hanging.
    let status = group.handles[&new_leader].status().await.unwrap();
    assert_eq!(status.role, "leader");
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_coordinators_recover_state_and_epoch_from_disk() {
    // Compact often so that recovery goes through snapshots and the log.
    let mut group = Group::new(3, 7);
    let leader = group.leader().await;
    for index in 0..23 {
        group
            .propose_until_known(
                leader,
                &format!("r-{index}"),
                register(&format!("n-{index}")),
            )
            .await;
    }
    let before = group.converged().await;
    for id in [1, 2, 3] {
        group.stop(id).await;
    }
    for id in [1, 2, 3] {
        group.start(id);
    }
    let leader = group.leader().await;
    // A linearizable read sees everything committed before the restart.
    let after = group.handles[&leader].read().await.unwrap();
    assert_eq!(after.nodes, before.nodes);
    assert_eq!(after.epoch, before.epoch);
    assert_eq!(after.applied_commands, 23);
    // And the group keeps committing.
    let outcome = group
        .propose_until_known(leader, "after-restart", register("n-after"))
        .await;
    assert_eq!(
        outcome,
        Outcome::Applied {
            epoch: before.epoch
        }
    );
    assert_eq!(group.converged().await.nodes.len(), 24);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_majority_commits_through_a_partition_and_the_minority_refuses_writes() {
    let group = Group::new(5, 10);
    let old_leader = group.leader().await;
    group
        .propose_until_known(old_leader, "first", register("a"))
        .await;

    // Isolate the leader with one follower: the minority side.
    let minority: Vec<u64> = std::iter::once(old_leader)
        .chain(
            group
                .voters
                .iter()
                .copied()
                .filter(|&id| id != old_leader)
                .take(1),
        )
        .collect();
    let majority: Vec<u64> = group
        .voters
        .iter()
        .copied()
        .filter(|id| !minority.contains(id))
        .collect();
    group
        .network
        .partition(vec![minority.clone(), majority.clone()]);
    group.network.set_faults(0.1, Duration::from_millis(15));

    for index in 0..25 {
        group
            .propose_until_known(
                majority[0],
                &format!("majority-{index}"),
                register(&format!("m-{index}")),
            )
            .await;
    }
    let minority_write = group.handles[&minority[0]]
        .propose(Proposal {
            request_id: "minority".into(),
            command: register("never"),
        })
        .await;
    assert!(
        minority_write.as_ref().is_err_and(outcome_unknown),
        "the minority must refuse writes, got {minority_write:?}"
    );
    assert!(
        group.handles[&minority[1]].read().await.is_err(),
        "the minority cannot serve linearizable reads"
    );

    group.network.heal();
    group.network.set_faults(0.0, Duration::ZERO);
    let leader = group.leader().await;
    assert!(majority.contains(&leader) || minority.contains(&leader));
    let state = group.converged().await;
    assert_eq!(
        state.nodes.len(),
        26 + usize::from(state.nodes.contains_key("never"))
    );
    assert!(state.nodes.contains_key("m-24"));
    // The minority's refused write may or may not have committed after healing
    // (it was forwarded once), but it never applies twice.
    assert!(state.applied_commands == 26 || state.applied_commands == 27);
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_every_coordinator_at_once_are_all_answered() {
    // Each coordinator counts its reads; the leader keeps one pending read
    // per context, so contexts must differ between coordinators.
    let group = Group::new(3, 1000);
    group.leader().await;
    for round in 0..10 {
        let reads = [1, 2, 3].map(|id| {
            let handle = group.handles[&id].clone();
            tokio::spawn(async move { handle.read().await.map(|_| ()) })
        });
        for (id, read) in [1, 2, 3].into_iter().zip(reads) {
            let answer = read.await.unwrap();
            assert!(
                answer.is_ok(),
                "round {round}: a read through {id}: {answer:?}"
            );
        }
    }
    group.shutdown().await;
}
