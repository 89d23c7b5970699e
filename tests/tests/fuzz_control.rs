//! Property tests of the control plane: what coordinators and model
//! loading are handed from outside.
//!
//! - Raft batches (undecodable bytes, corrupted encodings and well-formed
//!   raft-rs messages of every kind with any field values) sent to the peer
//!   service of three coordinators that trust every caller are answered
//!   and never take a coordinator down; afterwards every coordinator
//!   follows a leader and a write commits on a majority. Not on every
//!   coordinator: a message that lies in a member's name (an append or a
//!   snapshot from the leader that does not match its log, an
//!   acknowledgement of entries the sender lacks) can leave one follower
//!   behind for good, and no guard can tell it from the truth; that is what
//!   member authentication is for. Acknowledgements are kept truthful, as
//!   lies in both followers' names could stop the group committing at all.
//! - Any `config.json` loads or is refused with an error naming the file,
//!   never a panic, and whatever loads is within moemesh's limits.
//! - Arbitrary requests of every `AdminService` call, sent to a whole
//!   cluster, are answered in time, and afterwards every coordinator
//!   answers and a forward through the router is exact.
//!
//! Each live-cluster property runs a few dozen generated cases against one
//! cluster, and the config property 256; PROPTEST_CASES sets every count.
//! State carries over from case to case, so the live properties do not
//! shrink: a failure reports the case that failed as it was generated.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use moemesh_coordinator::state::{
    ClusterState, Command, ExpertKey, ModelRecord, NodeRecord, NodeStatus, Proposal,
};
use moemesh_core::model::config::{Family, ModelConfig, limits};
use moemesh_proto::tls::MemberChannel;
use moemesh_proto::v1::{
    AddReplicaRequest, ClusterStatusRequest, CoordinatorStatus, DrainNodeRequest, ExpertTokens,
    HeartbeatRequest, LayerLoad, LoadModelRequest, LoadStatsRequest, MoveReplicaRequest, NodeInfo,
    PeerStatusRequest, RaftBatch, RebalanceRequest, RegisterNodeRequest, ReportLoadRequest,
    ReportReplicaReadyRequest, ReportUnreachableRequest, ShowPlacementRequest,
    WatchPlacementRequest,
};
use moemesh_proto::{AdminServiceClient, CoordinatorPeerServiceClient, LayerExperts};
use moemesh_proto::{MAX_MESSAGE_BYTES, ReplicaState};
use moemesh_tests::{CoordinatorSandbox, Fixture, ManagedCluster, relative_l2};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use protobuf::{Message as _, ProtobufEnum};
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, Message, MessageType, Snapshot,
};
use serde_json::{Value, json};
use tonic::{Code, Status};

/// How long any one call may take before it counts as a hang.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the cluster may take to settle after the fuzzing.
const PATIENCE: Duration = Duration::from_secs(60);

fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(default)
}

/// A runner for cases that share one live cluster: no shrinking (a
/// smaller case would run against the state the failing one left).
fn live_runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Runs `call` under [`CALL_TIMEOUT`]; not answering in time fails the case.
async fn answered<T>(
    what: impl FnOnce() -> String,
    call: impl Future<Output = Result<T, Status>>,
) -> Result<Result<T, Status>, TestCaseError> {
    tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| {
        TestCaseError::fail(format!("{} did not answer within {CALL_TIMEOUT:?}", what()))
    })
}

/// Retries `attempt` until it succeeds, for up to [`PATIENCE`]; then
/// fails with its last error.
async fn eventually<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> T {
    let started = Instant::now();
    loop {
        let error = match attempt().await {
            Ok(value) => return value,
            Err(error) => error,
        };
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: gave up after {PATIENCE:?}; last: {error}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `call` under [`CALL_TIMEOUT`], any failure as a line of text.
async fn within<T>(
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(format!("{status:?}")),
        Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
    }
}

/// Counts of outcomes (a gRPC code, or OK) by call, printed after a run.
#[derive(Default)]
struct Outcomes(Mutex<BTreeMap<String, BTreeMap<String, usize>>>);

impl Outcomes {
    fn record(&self, call: &str, outcome: String) {
        let mut counts = self.0.lock().unwrap();
        *counts
            .entry(call.to_string())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }

    fn print(&self, title: &str) {
        println!("{title}:");
        for (call, counts) in self.0.lock().unwrap().iter() {
            println!("  {call}: {counts:?}");
        }
    }
}

// Numbers and strings for every target: small values where the system
// lives, the extremes, and anything at all.

fn small_or_extreme(small: u64) -> BoxedStrategy<u64> {
    prop_oneof![
        6 => 0..=small,
        1 => Just(u64::MAX),
        1 => Just(u64::MAX / 2),
        1 => Just(u64::MAX / 2 + 1),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn any_u32(small: u32) -> BoxedStrategy<u32> {
    prop_oneof![4 => 0..=small, 1 => Just(u32::MAX), 1 => any::<u32>()].boxed()
}

/// Strings: empty, ASCII names, any printable or control characters, and
/// now and then a huge one (up to 192 KiB).
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        1 => Just(String::new()),
        3 => "[a-z0-9./_-]{1,12}",
        3 => "\\PC{0,16}",
        1 => ".{0,4}",
        1 => (1usize..=4).prop_map(|size| "界".repeat(size * 16 * 1024)),
    ]
    .boxed()
}

// Target 1: raft batches.

/// Coordinators of the raft sandbox: ids 1 to 3.
const MEMBERS: u64 = 3;
/// How many of them make a majority.
const MAJORITY: usize = 2;

/// Mostly a member's id, sometimes none (0), a stranger or anything.
fn raft_id() -> BoxedStrategy<u64> {
    prop_oneof![8 => 1..=MEMBERS, 1 => Just(0u64), 1 => Just(MEMBERS + 1), 1 => any::<u64>()]
        .boxed()
}

/// The term above which the coordinators' raft guard refuses any message
/// (`u64::MAX / 2`), and how far ahead of a coordinator's own term it lets
/// a peer's be.
const GUARD_TERM_LIMIT: u64 = u64::MAX / 2;
const GUARD_TERM_LEAD: u64 = 1 << 20;

/// Terms: near the target's own (see [`Bases`]), at and past the absolute
/// limit, or anything (almost always far beyond the lead the guard allows).
/// Terms just within that lead are left out: see
/// `a_term_at_the_guard_s_lead_does_not_cut_a_coordinator_off`.
fn term() -> BoxedStrategy<u64> {
    prop_oneof![
        12 => 0u64..=8,
        1 => Just(GUARD_TERM_LIMIT),
        1 => Just(GUARD_TERM_LIMIT + 1),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
    .boxed()
}

/// Indexes: around the end of a young group's log, further on, extreme,
/// or anything.
fn log_index() -> BoxedStrategy<u64> {
    prop_oneof![4 => 0u64..=8, 1 => small_or_extreme(64)].boxed()
}

/// The message types raft-rs sends between members (most of the time),
/// or any type at all, local ones included.
fn message_type() -> BoxedStrategy<MessageType> {
    use MessageType::*;
    let between_members = vec![
        MsgAppend,
        MsgAppendResponse,
        MsgHeartbeat,
        MsgHeartbeatResponse,
        MsgSnapshot,
        MsgPropose,
        MsgReadIndex,
        MsgReadIndexResp,
        MsgRequestVote,
        MsgRequestVoteResponse,
        MsgRequestPreVote,
        MsgRequestPreVoteResponse,
        MsgTimeoutNow,
        MsgTransferLeader,
    ];
    prop_oneof![
        3 => prop::sample::select(between_members),
        1 => prop::sample::select(MessageType::values().to_vec()),
    ]
    .boxed()
}

/// The sender of a message to `target`: mostly another member, sometimes
/// the target itself, no one, a stranger or anyone.
fn sender(target: u64) -> BoxedStrategy<u64> {
    let others: Vec<u64> = (1..=MEMBERS).filter(|&id| id != target).collect();
    prop_oneof![8 => prop::sample::select(others), 1 => Just(target), 1 => raft_id()].boxed()
}

fn node_status() -> impl Strategy<Value = NodeStatus> {
    prop_oneof![
        Just(NodeStatus::Joining),
        Just(NodeStatus::Ready),
        Just(NodeStatus::Draining),
        Just(NodeStatus::Dead),
    ]
}

fn short_name() -> BoxedStrategy<String> {
    prop_oneof![3 => "[a-c]{1,2}", 1 => Just(String::new()), 1 => "\\PC{0,6}"].boxed()
}

fn expert_key() -> impl Strategy<Value = ExpertKey> {
    (
        short_name(),
        prop_oneof![4 => 0usize..4, 1 => any::<usize>()],
        any_u32(9),
    )
        .prop_map(|(model, layer, expert)| ExpertKey {
            model,
            layer,
            expert,
        })
}

fn node_record() -> impl Strategy<Value = NodeRecord> {
    (
        short_name(),
        short_name(),
        prop_oneof![
            Just("cpu".to_string()),
            Just("cuda:0".to_string()),
            short_name()
        ],
        any::<u64>(),
        any::<u64>(),
        prop_oneof![Just(String::new()), Just("bf16".to_string()), short_name()],
        node_status(),
    )
        .prop_map(
            |(id, group, device, memory_bytes, buffer_bytes, weight_format, status)| NodeRecord {
                address: format!("http://{id}:1"),
                id,
                group,
                device,
                memory_bytes,
                buffer_bytes,
                weight_format,
                status,
            },
        )
}

fn model_record() -> impl Strategy<Value = ModelRecord> {
    (
        short_name(),
        short_name(),
        prop::collection::vec(prop_oneof![4 => 0usize..4, 1 => any::<usize>()], 0..4),
        prop_oneof![4 => 0usize..10, 1 => Just(usize::MAX), 1 => any::<usize>()],
    )
        .prop_map(|(id, family, moe_layers, experts_per_layer)| ModelRecord {
            checkpoint: format!("/models/{id}"),
            id,
            family,
            moe_layers,
            experts_per_layer,
        })
}

/// Every command of the coordinators' state machine, with any values.
fn command() -> impl Strategy<Value = Command> {
    let key_and_node = || (expert_key(), short_name());
    prop_oneof![
        node_record().prop_map(|node| Command::RegisterNode { node }),
        (short_name(), node_status())
            .prop_map(|(node, status)| Command::SetNodeStatus { node, status }),
        model_record().prop_map(|model| Command::AddModel { model }),
        key_and_node().prop_map(|(key, node)| Command::AddReplica { key, node }),
        key_and_node().prop_map(|(key, node)| Command::ReplicaReady { key, node }),
        key_and_node().prop_map(|(key, node)| Command::DrainReplica { key, node }),
        key_and_node().prop_map(|(key, node)| Command::RemoveReplica { key, node }),
        key_and_node().prop_map(|(key, node)| Command::RemoveDrainedReplica { key, node }),
        key_and_node().prop_map(|(key, node)| Command::RestoreReplica { key, node }),
        prop::collection::vec(key_and_node(), 0..4)
            .prop_map(|replicas| Command::AddReplicas { replicas }),
        (short_name(), prop::collection::vec(expert_key(), 0..4))
            .prop_map(|(node, keys)| Command::AddServingReplicas { node, keys }),
        (short_name(), prop::collection::vec(expert_key(), 0..4))
            .prop_map(|(node, serving)| Command::ReconcileNodeReplicas { node, serving }),
    ]
}

/// What a log entry may carry: nothing, noise, a state-machine command
/// (which the state machine must take whatever it says), or a
/// configuration change.
fn entry_data() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => Just(Vec::new()),
        2 => prop::collection::vec(any::<u8>(), 1..64),
        3 => (short_name(), command()).prop_map(|(request_id, command)| {
            serde_json::to_vec(&Proposal { request_id, command }).unwrap()
        }),
        1 => (0..3i32, raft_id()).prop_map(|(change, node_id)| {
            let mut change_message = ConfChange::default();
            change_message.set_change_type(ConfChangeType::from_i32(change).unwrap());
            change_message.node_id = node_id;
            change_message.write_to_bytes().unwrap()
        }),
    ]
    .boxed()
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        prop_oneof![6 => Just(EntryType::EntryNormal), 1 => Just(EntryType::EntryConfChange), 1 => Just(EntryType::EntryConfChangeV2)],
        term(),
        log_index(),
        entry_data(),
        prop::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(|(entry_type, term, index, data, context)| {
            let mut entry = Entry {
                term,
                index,
                data: data.into(),
                context: context.into(),
                ..Default::default()
            };
            entry.set_entry_type(entry_type);
            entry
        })
}

/// Voters as the group has them, reordered or repeated, another group's,
/// or anything.
fn voters() -> BoxedStrategy<Vec<u64>> {
    prop_oneof![
        3 => Just(vec![1, 2, 3]),
        1 => Just(vec![3, 1, 2]),
        1 => Just(vec![1, 1, 2, 3]),
        1 => Just(vec![1, 2]),
        1 => Just(vec![1, 2, 3, 4]),
        1 => prop::collection::vec(raft_id(), 0..5),
    ]
    .boxed()
}

/// Snapshots with any metadata, holding a state that decodes or not.
fn snapshot() -> impl Strategy<Value = Snapshot> {
    let state = serde_json::to_vec(&ClusterState::default()).unwrap();
    (
        log_index(),
        term(),
        voters(),
        prop_oneof![4 => Just(Vec::new()), 1 => voters()],
        prop_oneof![4 => Just(Vec::new()), 1 => voters()],
        prop::bool::weighted(0.1),
        prop_oneof![
            3 => Just(state),
            1 => Just(b"{}".to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..32),
        ],
    )
        .prop_map(
            |(index, term, voters, learners, outgoing, auto_leave, data)| {
                let mut snapshot = Snapshot::default();
                snapshot.set_data(data.into());
                let metadata = snapshot.mut_metadata();
                metadata.index = index;
                metadata.term = term;
                metadata.set_conf_state(ConfState {
                    voters,
                    learners,
                    voters_outgoing: outgoing,
                    auto_leave,
                    ..Default::default()
                });
                snapshot
            },
        )
}

/// A well-formed raft-rs message to coordinator `target` (mostly): every
/// message type, any term, indexes, flags, entries and snapshot. With
/// `chained`, the entries follow the message's anchor in its term, as a
/// leader's append does.
fn raft_message(target: u64) -> impl Strategy<Value = Message> {
    let addressing = (
        message_type(),
        prop_oneof![6 => Just(target), 1 => raft_id()],
        sender(target),
        term(),
    );
    let log = (
        log_index(),
        term(),
        log_index(),
        term(),
        any::<bool>(),
        log_index(),
        prop_oneof![6 => Just(0u64), 1 => log_index()],
    );
    let payload = (
        prop::collection::vec(entry(), 0..4),
        any::<bool>(),
        prop::option::weighted(0.3, snapshot()),
        prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(any::<u8>(), 1..9)],
        any::<i64>(),
        prop::bool::weighted(0.8),
    );
    (addressing, log, payload).prop_map(
        |(
            (kind, to, from, term),
            (index, log_term, commit, commit_term, reject, reject_hint, request_snapshot),
            (mut entries, chained, snapshot, context, priority, forwarded_as_such),
        )| {
            // Members forward proposals and read requests without a term.
            let forwarded = matches!(kind, MessageType::MsgPropose | MessageType::MsgReadIndex);
            let term = if forwarded && forwarded_as_such {
                0
            } else {
                term
            };
            if chained {
                for (entry, next) in entries.iter_mut().zip(1u64..) {
                    entry.index = index.wrapping_add(next);
                    entry.term = term;
                }
            }
            let mut message = Message {
                to,
                from,
                term,
                log_term,
                index,
                commit,
                commit_term,
                reject,
                reject_hint,
                request_snapshot,
                context: context.into(),
                priority,
                ..Default::default()
            };
            message.set_msg_type(kind);
            message.set_entries(entries.into());
            if let Some(snapshot) = snapshot {
                message.set_snapshot(snapshot);
            }
            message
        },
    )
}

/// One message of a raft batch, as it goes on the wire.
#[derive(Debug, Clone)]
enum RaftItem {
    /// A well-formed raft-rs message.
    Message(Message),
    /// Its encoding with bytes flipped (position, xor mask).
    Corrupted(Message, Vec<(usize, u8)>),
    /// Any bytes.
    Noise(Vec<u8>),
}

/// Generated terms and indexes from 1 to this stand for values near the
/// target's own; see [`Bases`].
const RELATIVE_MAX: u64 = 16;

/// What a batch is adjusted to when it is sent: its small terms and
/// indexes move to just below the target's term and commit index, and an
/// acknowledgement claims no more of its sender's log than the sender has
/// committed.
#[derive(Debug, Clone)]
struct Bases {
    term: u64,
    index: u64,
    /// Each coordinator's commit index.
    committed: BTreeMap<u64, u64>,
}

impl Bases {
    /// Bases around `target`'s term and commit index, a little behind to a
    /// little ahead, given every coordinator's status.
    fn around(target: u64, statuses: &BTreeMap<u64, CoordinatorStatus>) -> Self {
        let own = &statuses[&target];
        Self {
            term: own.term.saturating_sub(RELATIVE_MAX / 2),
            index: own.commit_index.saturating_sub(RELATIVE_MAX / 2),
            committed: statuses
                .iter()
                .map(|(&id, status)| (id, status.commit_index))
                .collect(),
        }
    }

    fn shift(value: u64, base: u64) -> u64 {
        if (1..=RELATIVE_MAX).contains(&value) {
            value + base
        } else {
            value
        }
    }

    /// `message` with its small terms and indexes moved by the bases (0 and
    /// the extremes stay as they are). An acknowledgement of entries the
    /// sender does not have is a lie no guard can tell from the truth, and
    /// the leader would stop replicating to that follower until the next
    /// election: acknowledgements claim at most the sender's commit index.
    fn rebase(&self, message: &Message) -> Message {
        let (term, index) = (
            |value| Self::shift(value, self.term),
            |value| Self::shift(value, self.index),
        );
        let mut message = message.clone();
        message.term = term(message.term);
        message.log_term = term(message.log_term);
        message.commit_term = term(message.commit_term);
        message.index = index(message.index);
        message.commit = index(message.commit);
        message.reject_hint = index(message.reject_hint);
        message.request_snapshot = index(message.request_snapshot);
        for entry in message.mut_entries().iter_mut() {
            entry.term = term(entry.term);
            entry.index = index(entry.index);
        }
        if message.has_snapshot() {
            let metadata = message.mut_snapshot().mut_metadata();
            metadata.term = term(metadata.term);
            metadata.index = index(metadata.index);
        }
        let acknowledges =
            message.get_msg_type() == MessageType::MsgAppendResponse && !message.reject;
        if let Some(&committed) = self.committed.get(&message.from)
            && acknowledges
        {
            message.index = message.index.min(committed);
        }
        message
    }
}

impl RaftItem {
    /// The bytes sent, with the message's terms and indexes rebased.
    fn encode(&self, bases: &Bases) -> Vec<u8> {
        match self {
            Self::Message(message) => bases.rebase(message).write_to_bytes().unwrap(),
            Self::Corrupted(message, flips) => {
                let mut bytes = bases.rebase(message).write_to_bytes().unwrap();
                if !bytes.is_empty() {
                    let length = bytes.len();
                    for &(position, mask) in flips {
                        bytes[position % length] ^= mask;
                    }
                }
                bytes
            }
            Self::Noise(bytes) => bytes.clone(),
        }
    }
}

/// A batch for one coordinator of the sandbox.
fn raft_case() -> impl Strategy<Value = (u64, Vec<RaftItem>)> {
    (1..=MEMBERS).prop_flat_map(|target| {
        let item = prop_oneof![
            6 => raft_message(target).prop_map(RaftItem::Message),
            1 => (raft_message(target), prop::collection::vec((any::<usize>(), 1..=255u8), 1..4))
                .prop_map(|(message, flips)| RaftItem::Corrupted(message, flips)),
            1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(RaftItem::Noise),
        ];
        (Just(target), prop::collection::vec(item, 0..4))
    })
}

type Peer = CoordinatorPeerServiceClient<MemberChannel>;
type Admin = AdminServiceClient<MemberChannel>;

/// Each coordinator's peer and admin clients, by id.
async fn clients(
    urls: &BTreeMap<u64, String>,
    tls: &moemesh_proto::tls::TlsConfig,
) -> BTreeMap<u64, (Peer, Admin)> {
    let mut clients = BTreeMap::new();
    for (&id, url) in urls {
        let channel = tls.connect(url.clone()).await.expect("coordinator accepts");
        let admin =
            AdminServiceClient::new(channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES);
        clients.insert(id, (CoordinatorPeerServiceClient::new(channel), admin));
    }
    clients
}

/// Every coordinator's raft node still answers for itself; returns what
/// each says of the group.
async fn raft_nodes_alive(
    clients: &BTreeMap<u64, (Peer, Admin)>,
) -> Result<BTreeMap<u64, CoordinatorStatus>, TestCaseError> {
    let mut statuses = BTreeMap::new();
    for (&id, (peer, _)) in clients {
        let what = || format!("PeerStatus of coordinator {id}");
        match answered(what, peer.clone().peer_status(PeerStatusRequest {})).await? {
            Ok(status) => statuses.insert(id, status.into_inner()),
            Err(status) => {
                return Err(TestCaseError::fail(format!(
                    "coordinator {id} lost its raft node: {status:?}"
                )));
            }
        };
    }
    Ok(statuses)
}

/// Registers node `node_id` through the leader and waits until at least
/// `needed` coordinators have applied it; returns how many had then.
async fn a_write_commits(
    sandbox: &CoordinatorSandbox,
    clients: &BTreeMap<u64, (Peer, Admin)>,
    node_id: &str,
    needed: usize,
) -> usize {
    let request = RegisterNodeRequest {
        node: Some(NodeInfo {
            id: node_id.into(),
            address: "http://127.0.0.1:1".into(),
            ..Default::default()
        }),
        request_id: format!("register-{node_id}"),
        ..Default::default()
    };
    eventually("a write commits", || async {
        let leader = sandbox.leader(1).await;
        within(clients[&leader].1.clone().register_node(request.clone())).await
    })
    .await;
    let what = format!("{needed} coordinators apply the write");
    eventually(&what, || async {
        let mut applied = Vec::new();
        let mut missing = Vec::new();
        for (&id, (_, admin)) in clients {
            match within(admin.clone().cluster_status(ClusterStatusRequest {})).await {
                Ok(status) if status.nodes.iter().any(|node| node.id == node_id) => {
                    applied.push(id)
                }
                Ok(status) => missing.push(format!("{id} knows only {:?}", status.nodes)),
                Err(error) => missing.push(format!("{id}: {error}")),
            }
        }
        match applied.len() >= needed {
            true => Ok(applied.len()),
            false => Err(format!("applied on {applied:?}; {missing:?}")),
        }
    })
    .await
}

/// Every batch is answered, every raft node survives every batch, and
/// afterwards each coordinator follows a leader and a write commits.
#[test]
fn raft_batches_never_take_a_coordinator_down() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let sandbox = runtime.block_on(CoordinatorSandbox::start(MEMBERS));
    let clients = runtime.block_on(async {
        sandbox.leader(1).await;
        clients(&sandbox.urls, &sandbox.tls).await
    });
    runtime.block_on(a_write_commits(
        &sandbox,
        &clients,
        "before-fuzz",
        MEMBERS as usize,
    ));
    let outcomes = Outcomes::default();
    let mut runner = live_runner(cases(48));
    let result = runner.run(&raft_case(), |(target, items)| {
        runtime.block_on(async {
            let bases = Bases::around(target, &raft_nodes_alive(&clients).await?);
            let batch = RaftBatch {
                messages: items
                    .iter()
                    .map(|item| item.encode(&bases).into())
                    .collect(),
            };
            let what = || format!("Raft on coordinator {target} (sent as adjusted by {bases:?})");
            let answer = answered(what, clients[&target].0.clone().raft(batch)).await?;
            let outcome = match answer {
                Ok(_) => "OK".into(),
                Err(status) => format!("{:?}", status.code()),
            };
            outcomes.record("Raft", outcome);
            raft_nodes_alive(&clients).await.map(drop)
        })
    });
    if let Err(failure) = result {
        panic!("{failure}");
    }
    outcomes.print("raft batches");
    runtime.block_on(async {
        for &id in sandbox.urls.keys() {
            let leader = sandbox.leader(id).await;
            println!("coordinator {id} follows leader {leader}");
        }
        // A majority, not every coordinator: see the module's documentation.
        let applied = a_write_commits(&sandbox, &clients, "after-fuzz", MAJORITY).await;
        println!("{applied} of {MEMBERS} coordinators applied a write after the batches");
        sandbox.shutdown().await;
    });
}

/// A fresh group as a forged message sees it: its leader, a follower, and
/// the leader's term and commit index.
#[derive(Debug, Clone, Copy)]
struct Group {
    leader: u64,
    follower: u64,
    term: u64,
    commit: u64,
}

/// Sends the messages `forge` makes for a fresh group, one by one, each to
/// the coordinator it is addressed to; then every coordinator must still
/// run its raft node and commit a write.
fn group_survives(forge: impl FnOnce(Group) -> Vec<Message>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let sandbox = CoordinatorSandbox::start(MEMBERS).await;
        let leader = sandbox.leader(1).await;
        let clients = clients(&sandbox.urls, &sandbox.tls).await;
        let own = clients[&leader]
            .0
            .clone()
            .peer_status(PeerStatusRequest {})
            .await;
        let own = own.unwrap().into_inner();
        let group = Group {
            leader,
            follower: (1..=MEMBERS).find(|&id| id != leader).unwrap(),
            term: own.term,
            commit: own.commit_index,
        };
        let forged = forge(group);
        for message in &forged {
            let batch = RaftBatch {
                messages: vec![message.write_to_bytes().unwrap().into()],
            };
            let mut peer = clients[&message.to].0.clone();
            peer.raft(batch)
                .await
                .expect("the peer service takes the batch");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if let Err(failure) = raft_nodes_alive(&clients).await {
            panic!("after {forged:?}: {failure}");
        }
        a_write_commits(&sandbox, &clients, "after-forged-message", MEMBERS as usize).await;
        sandbox.shutdown().await;
    });
}

fn forged(kind: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut message = Message::default();
    message.set_msg_type(kind);
    message.from = from;
    message.to = to;
    message.term = term;
    message
}

/// A heartbeat at term `u64::MAX / 2`, where the next election's term
/// would lie beyond the guard's limit, must not leave the group unable to
/// elect: afterwards it elects a leader and commits on every coordinator.
#[test]
fn a_term_at_the_guard_limit_still_lets_the_group_elect() {
    group_survives(|group| {
        let (from, to) = (group.leader, group.follower);
        vec![forged(
            MessageType::MsgHeartbeat,
            from,
            to,
            GUARD_TERM_LIMIT,
        )]
    });
}

/// A heartbeat whose term leads a follower's by as much as the guard
/// allows moves that follower, and through its answer the leader, to that
/// term; an election between the two right away (a leadership hand-over)
/// takes them one term further, which the other follower, still at the old
/// term, refuses as too far ahead: it is cut off from the group for good.
#[test]
fn a_term_at_the_guard_s_lead_does_not_cut_a_coordinator_off() {
    group_survives(|group| {
        let (leader, follower) = (group.leader, group.follower);
        let ahead = group.term + GUARD_TERM_LEAD;
        vec![
            forged(MessageType::MsgHeartbeat, leader, follower, ahead),
            forged(MessageType::MsgTimeoutNow, leader, follower, ahead),
        ]
    });
}

/// A follower forwards a leadership transfer to its leader, and raft-rs
/// panics sending one that carries a term ("term should not be set when
/// sending MsgTransferLeader"): one sent to a follower must leave it running.
#[test]
fn a_leadership_transfer_sent_to_a_follower_does_not_crash_it() {
    group_survives(|group| {
        let (from, to) = (group.leader, group.follower);
        vec![forged(MessageType::MsgTransferLeader, from, to, group.term)]
    });
}

/// A rejected append's answer that asks for a snapshot the leader's store
/// cannot give (its index is past any snapshot) would make raft-rs stop
/// replicating to that follower until the leader changes: the follower
/// must go on applying writes.
#[test]
fn a_snapshot_request_past_the_leader_s_snapshots_does_not_stall_a_follower() {
    group_survives(|group| {
        let (from, to) = (group.follower, group.leader);
        let mut answer = forged(MessageType::MsgAppendResponse, from, to, group.term);
        answer.reject = true;
        answer.index = group.commit;
        answer.reject_hint = group.commit;
        answer.request_snapshot = group.commit + 100;
        vec![answer]
    });
}

// Target 2: config.json.

/// The fields of every family's config.json that moemesh reads, and some
/// it does not.
const CONFIG_FIELDS: [&str; 24] = [
    "model_type",
    "architectures",
    "hidden_size",
    "num_hidden_layers",
    "hidden_act",
    "intermediate_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
    "first_k_dense_replace",
    "n_shared_experts",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "topk_method",
    "scoring_func",
    "vocab_size",
    "torch_dtype",
];

/// Any JSON value a field could hold: zero, negatives, huge, floats,
/// strings, nulls, booleans, arrays and objects.
fn wild_value() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => (0u64..80).prop_map(Value::from),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => any::<i64>().prop_map(Value::from),
        1 => Just(json!(u64::MAX)),
        1 => any::<u64>().prop_map(Value::from),
        1 => Just(json!(1e300)),
        1 => Just(json!(-0.0)),
        1 => Just(json!(2.5)),
        1 => any::<f64>().prop_map(|float| json!(float)),
        1 => "\\PC{0,8}".prop_map(Value::from),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => prop::collection::vec(0u64..6, 0..4).prop_map(|items| json!(items)),
        1 => Just(json!([-1, "x", null])),
        1 => Just(json!({"nested": 1})),
    ]
    .boxed()
}

/// A plausible config of one family: sizes that mostly fit together.
fn family_config() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    let sizes = (1u64..=96, 1u64..=6, 1u64..=160, 1u64..=160, 1u64..=16);
    let routing = (
        1u64..=8,
        1u64..=4,
        0u64..=3,
        0u64..=4,
        1u64..=4,
        1u64..=4,
        0.5f64..4.0,
    );
    (0usize..4, sizes, routing).prop_map(
        |(family, (hidden, layers, intermediate, shared, experts), routing)| {
            let (top_k, step, first_dense, shared_experts, groups, top_groups, scaling) = routing;
            let experts_field = [
                "num_local_experts",
                "num_experts",
                "num_experts",
                "n_routed_experts",
            ];
            let model_type = ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"][family];
            let mut config = json!({
                "model_type": model_type,
                "hidden_size": hidden,
                "num_hidden_layers": layers,
                "num_experts_per_tok": top_k,
                "hidden_act": "silu",
                experts_field[family]: experts,
            });
            let fields = config.as_object_mut().unwrap();
            let mut set = |name: &str, value: Value| {
                fields.insert(name.to_string(), value);
            };
            match family {
                0 => set("intermediate_size", json!(intermediate)),
                1 | 2 => {
                    set("moe_intermediate_size", json!(intermediate));
                    set("shared_expert_intermediate_size", json!(shared));
                    set("decoder_sparse_step", json!(step));
                    set("mlp_only_layers", json!([0]));
                }
                _ => {
                    set("moe_intermediate_size", json!(intermediate));
                    set("first_k_dense_replace", json!(first_dense));
                    set("n_shared_experts", json!(shared_experts));
                    set("n_group", json!(groups));
                    set("topk_group", json!(top_groups));
                    set("routed_scaling_factor", json!(scaling));
                    set("topk_method", json!("noaux_tc"));
                }
            }
            fields.clone()
        },
    )
}

/// config.json text: a family's config with fields replaced by wild
/// values, removed, added or repeated; or text that is not a config.
fn config_text() -> impl Strategy<Value = String> {
    let field = || prop::sample::select(CONFIG_FIELDS.to_vec());
    let edited = (
        family_config(),
        prop::collection::vec((field(), wild_value()), 0..4),
        prop::collection::vec(field(), 0..3),
        prop::option::weighted(0.1, (field(), wild_value())),
    )
        .prop_map(|(mut config, replaced, removed, repeated)| {
            for (name, value) in replaced {
                config.insert(name.to_string(), value);
            }
            for name in removed {
                config.remove(name);
            }
            let mut text = Value::Object(config).to_string();
            if let Some((name, value)) = repeated {
                // A key twice: serde_json keeps one, so write it out.
                text.truncate(text.len() - 1);
                text.push_str(&format!(",\"{name}\":{value}}}"));
            }
            text
        });
    prop_oneof![
        12 => edited,
        1 => wild_value().prop_map(|value| value.to_string()),
        1 => "\\PC{0,40}",
        1 => family_config().prop_map(|config| {
            let text = Value::Object(config).to_string();
            text[..text.len() / 2].to_string()
        }),
    ]
}

/// What a config that loaded must satisfy: every size within moemesh's
/// limits, top-k within the experts, and the values the file gave.
fn check_loaded(config: &ModelConfig, json: &Value) -> Result<(), TestCaseError> {
    prop_assert!((1..=limits::MAX_HIDDEN_SIZE).contains(&config.hidden_size));
    prop_assert!((1..=limits::MAX_LAYERS).contains(&config.num_hidden_layers));
    prop_assert!((1..=limits::MAX_EXPERTS).contains(&config.num_experts));
    prop_assert!((1..=config.num_experts).contains(&config.top_k));
    prop_assert!((1..=limits::MAX_INTERMEDIATE_SIZE).contains(&config.expert_intermediate_size));
    if let Some(shared) = config.shared_intermediate_size {
        prop_assert!((1..=limits::MAX_INTERMEDIATE_SIZE).contains(&shared));
    }
    let factor = config.routed_scaling_factor;
    prop_assert!(factor.is_finite() && factor > 0.0 && factor <= limits::MAX_ROUTED_SCALING_FACTOR);
    if let Some(limit) = config.group_limit {
        prop_assert!(limit.groups >= 1 && config.num_experts.is_multiple_of(limit.groups));
        prop_assert!((1..=limit.groups).contains(&limit.top_groups));
        prop_assert!(config.top_k <= limit.top_groups * (config.num_experts / limit.groups));
    }
    let moe_layers = config.moe_layers();
    prop_assert!(!moe_layers.is_empty());
    prop_assert!(
        moe_layers
            .iter()
            .all(|&layer| layer < config.num_hidden_layers)
    );
    prop_assert_eq!(
        config.family,
        Family::from_model_type(json["model_type"].as_str().unwrap()).unwrap()
    );
    prop_assert_eq!(
        Some(config.hidden_size as u64),
        json["hidden_size"].as_u64()
    );
    prop_assert_eq!(
        Some(config.top_k as u64),
        json["num_experts_per_tok"].as_u64()
    );
    for expert in 0..config.experts_per_layer() as u32 {
        prop_assert!(config.expert_weight_count(expert) > 0);
    }
    Ok(())
}

#[test]
fn any_config_json_loads_sanely_or_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let mut runner = TestRunner::new(Config {
        cases: cases(256),
        failure_persistence: None,
        ..Config::default()
    });
    let (loaded, refused) = (Cell::new(0), Cell::new(0));
    runner
        .run(&config_text(), |text| {
            std::fs::write(&path, &text).unwrap();
            let loading = std::panic::catch_unwind(|| ModelConfig::from_dir(dir.path()));
            let result =
                loading.map_err(|_| TestCaseError::fail("loading config.json panicked"))?;
            match result {
                Ok(config) => {
                    loaded.set(loaded.get() + 1);
                    let json: Value = serde_json::from_str(&text).unwrap();
                    check_loaded(&config, &json)?;
                }
                Err(error) => {
                    refused.set(refused.get() + 1);
                    // The file is named once, and a reason follows it.
                    let message = error.to_string();
                    let file = format!("invalid model config: {}: ", path.display());
                    prop_assert!(message.starts_with(&file), "{message}");
                    prop_assert!(message.len() > file.len(), "{message}");
                    prop_assert_eq!(
                        message.matches("invalid model config").count(),
                        1,
                        "{}",
                        message
                    );
                }
            }
            Ok(())
        })
        .unwrap();
    let (loaded, refused) = (loaded.get(), refused.get());
    println!("config.json: {loaded} loaded, {refused} refused");
    assert!(
        loaded > 0,
        "no generated config loaded: the generator is off"
    );
}

// Target 3: every AdminService call.

/// The model the managed cluster serves, and its expert nodes.
const MODEL: &str = "test-model";
const REAL_NODES: [&str; 2] = ["expert-0", "expert-1"];

fn model_name() -> BoxedStrategy<String> {
    prop_oneof![3 => Just(MODEL.to_string()), 1 => Just(String::new()), 1 => text()].boxed()
}

/// One of the fixture's MoE layers (1 and 2), mostly.
fn layer() -> BoxedStrategy<u32> {
    prop_oneof![3 => 1u32..=2, 1 => any_u32(4)].boxed()
}

/// One of the fixture's experts (0 to 8, the shared one last), mostly.
fn expert() -> BoxedStrategy<u32> {
    prop_oneof![3 => 0u32..9, 1 => any_u32(12)].boxed()
}

fn count() -> BoxedStrategy<u64> {
    small_or_extreme(1000)
}

/// A real expert node, or a name no node has.
fn real_or_unknown_node() -> BoxedStrategy<String> {
    prop_oneof![
        2 => prop::sample::select(REAL_NODES.to_vec()).prop_map(String::from),
        1 => text(),
    ]
    .boxed()
}

/// Nodes that register without serving anything (so that draining them
/// moves nothing) and that nothing else is placed on before they drain.
fn idle_node() -> BoxedStrategy<String> {
    (0..4).prop_map(|index| format!("idle-{index}")).boxed()
}

/// A checkpoint directory: the fixture's, paths that do not exist, a
/// file, or any string.
fn checkpoint(fixture: &Path) -> BoxedStrategy<String> {
    let fixture = fixture.to_string_lossy().into_owned();
    prop_oneof![
        2 => Just(fixture.clone()),
        1 => Just(format!("{fixture}/config.json")),
        1 => text().prop_map(|path| format!("/nonexistent/{path}")),
        1 => text(),
    ]
    .boxed()
}

fn node_info(id: BoxedStrategy<String>) -> impl Strategy<Value = NodeInfo> {
    // Nobody listens at these: no replica of the served model is ever
    // placed on the nodes registered here.
    let address = prop_oneof![
        3 => Just("http://127.0.0.1:1".to_string()),
        1 => Just("https://expert.example:50061".to_string()),
        1 => Just("http://[::1]:9".to_string()),
        2 => text(),
    ];
    let group = prop_oneof![3 => "[a-z0-9-]{0,12}", 1 => text()];
    let device = prop_oneof![
        2 => Just("cpu".to_string()),
        1 => Just("cuda:0".to_string()),
        1 => text(),
    ];
    let weights = prop_oneof![
        2 => Just(String::new()),
        1 => Just("f32".to_string()),
        1 => Just("bf16".to_string()),
        1 => text(),
    ];
    (
        id,
        address,
        group,
        device,
        count(),
        count(),
        weights,
        any::<i32>(),
    )
        .prop_map(
            |(id, address, group, device, memory_bytes, buffer_bytes, weight_format, status)| {
                NodeInfo {
                    id,
                    address,
                    group,
                    device,
                    memory_bytes,
                    buffer_bytes,
                    weight_format,
                    status,
                }
            },
        )
}

/// Registrations of nodes that do not exist: never a real node's id (that
/// would take its place) and never the served model (whose replicas would
/// then point at nowhere).
fn registration(fixture: &Path) -> impl Strategy<Value = RegisterNodeRequest> {
    let id = prop_oneof![
        1 => Just(String::new()),
        3 => idle_node(),
        5 => text().prop_map(|name| format!("fuzz-{name}")),
    ];
    let layer_experts = (layer(), prop::collection::vec(expert(), 0..6))
        .prop_map(|(layer, experts)| LayerExperts { layer, experts });
    let serving = prop_oneof![Just(Vec::new()), prop::collection::vec(layer_experts, 1..3),];
    let model = prop_oneof![Just(String::new()), text()];
    (
        prop::option::weighted(0.9, node_info(id.boxed())),
        text(),
        model,
        checkpoint(fixture),
        serving,
    )
        .prop_map(|(node, request_id, model, checkpoint, mut serving)| {
            if node
                .as_ref()
                .is_some_and(|node| node.id.starts_with("idle-"))
            {
                serving.clear();
            }
            RegisterNodeRequest {
                node,
                request_id,
                model,
                checkpoint,
                serving,
            }
        })
}

/// Sends generated requests of one call after another through the three
/// coordinators, and counts how each was answered.
struct AdminFuzz<'a> {
    runtime: &'a tokio::runtime::Runtime,
    admins: Vec<Admin>,
    cases: u32,
    outcomes: Outcomes,
}

impl AdminFuzz<'_> {
    /// Every request must be answered within [`CALL_TIMEOUT`], and an error
    /// must be a deliberate one with a message (not UNKNOWN or INTERNAL).
    fn fuzz<S, F, Fut, T>(&self, call: &str, requests: S, send: F)
    where
        S: Strategy,
        F: Fn(Admin, S::Value) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut runner = live_runner(self.cases);
        let result = runner.run(&(0..self.admins.len(), requests), |(via, request)| {
            let what = || format!("{call} via coordinator {}", via + 1);
            let answer = self
                .runtime
                .block_on(answered(what, send(self.admins[via].clone(), request)))?;
            let outcome = match answer {
                Ok(_) => "OK".to_string(),
                Err(status) => {
                    prop_assert!(!status.message().is_empty(), "{call}: {status:?}");
                    prop_assert!(
                        !matches!(status.code(), Code::Unknown | Code::Internal),
                        "{call}: {status:?}"
                    );
                    format!("{:?}", status.code())
                }
            };
            self.outcomes.record(call, outcome);
            Ok(())
        });
        if let Err(failure) = result {
            panic!("{call}: {failure}");
        }
        self.runtime.block_on(self.every_coordinator_answers(call));
    }

    async fn every_coordinator_answers(&self, after: &str) {
        for (index, admin) in self.admins.iter().enumerate() {
            let status = tokio::time::timeout(
                CALL_TIMEOUT,
                admin.clone().cluster_status(ClusterStatusRequest {}),
            )
            .await;
            assert!(
                matches!(status, Ok(Ok(_))),
                "after {after}, coordinator {} does not answer ClusterStatus: {status:?}",
                index + 1
            );
        }
    }

    fn reads(&self) {
        self.fuzz(
            "ClusterStatus",
            Just(ClusterStatusRequest {}),
            |mut admin, request| async move { admin.cluster_status(request).await },
        );
        let placement =
            (model_name(), any::<bool>(), layer()).prop_map(|(model, has_layer, layer)| {
                ShowPlacementRequest {
                    model,
                    has_layer,
                    layer,
                }
            });
        self.fuzz(
            "ShowPlacement",
            placement,
            |mut admin, request| async move { admin.show_placement(request).await },
        );
        let since = prop_oneof![
            Just(None),
            (0..64u64).prop_map(Some),
            any::<u64>().prop_map(Some)
        ];
        let watch =
            (model_name(), since).prop_map(|(model, since_revision)| WatchPlacementRequest {
                model,
                since_revision,
            });
        self.fuzz("WatchPlacement", watch, |mut admin, request| async move {
            let mut updates = admin.watch_placement(request).await?.into_inner();
            // An update comes first, whatever the filter or revision (one
            // ahead of the coordinator's gets a snapshot after a while).
            updates.message().await?.ok_or_else(|| {
                Status::internal("the placement stream ended before its first update")
            })
        });
        let stats = model_name().prop_map(|model| LoadStatsRequest { model });
        self.fuzz("LoadStats", stats, |mut admin, request| async move {
            admin.load_stats(request).await
        });
    }

    /// What expert nodes and routers report.
    fn reports(&self) {
        let counters = (
            count(),
            count(),
            count(),
            count(),
            count(),
            count(),
            count(),
        );
        let expert_tokens =
            (layer(), expert(), count()).prop_map(|(layer, expert, tokens)| ExpertTokens {
                layer,
                expert,
                tokens,
            });
        let client_experts = prop::collection::vec(expert_tokens, 0..12);
        let clients = (model_name(), client_experts, count());
        let heartbeat = (real_or_unknown_node(), counters, clients).prop_map(
            |(node, counters, (model, client_experts, client_tokens))| {
                let (queue_depth, busy_micros, pairs, hits, misses, paged, fallbacks) = counters;
                HeartbeatRequest {
                    node,
                    queue_depth,
                    busy_micros,
                    pairs,
                    buffer_hits: hits,
                    buffer_misses: misses,
                    bytes_paged_in: paged,
                    host_fallbacks: fallbacks,
                    model,
                    client_experts,
                    client_tokens,
                }
            },
        );
        self.fuzz("Heartbeat", heartbeat, |mut admin, request| async move {
            admin.heartbeat(request).await
        });
        let unreachable =
            (real_or_unknown_node(), text(), text()).prop_map(|(node, reporter, reason)| {
                ReportUnreachableRequest {
                    node,
                    reporter,
                    reason,
                }
            });
        self.fuzz(
            "ReportUnreachable",
            unreachable,
            |mut admin, request| async move { admin.report_unreachable(request).await },
        );
        let layers = prop::collection::vec(
            (layer(), prop::collection::vec(count(), 0..12))
                .prop_map(|(layer, tokens)| LayerLoad { layer, tokens }),
            0..4,
        );
        let load = (text(), model_name(), layers, count(), count(), count()).prop_map(
            |(router, model, layers, tokens, node_sends, bytes_sent)| ReportLoadRequest {
                router,
                model,
                layers,
                tokens,
                node_sends,
                bytes_sent,
            },
        );
        self.fuzz("ReportLoad", load, |mut admin, request| async move {
            admin.report_load(request).await
        });
        let ready = (real_or_unknown_node(), model_name(), layer(), expert()).prop_map(
            |(node, model, layer, expert)| ReportReplicaReadyRequest {
                node,
                model,
                layer,
                expert,
            },
        );
        self.fuzz(
            "ReportReplicaReady",
            ready,
            |mut admin, request| async move { admin.report_replica_ready(request).await },
        );
    }

    /// Placement changes among the real nodes, which load what is placed
    /// on them, so every one of these completes.
    fn moves(&self) {
        let rebalance = (model_name(), any::<bool>())
            .prop_map(|(model, dry_run)| RebalanceRequest { model, dry_run });
        self.fuzz("Rebalance", rebalance, |mut admin, request| async move {
            admin.rebalance(request).await
        });
        let add = (
            model_name(),
            layer(),
            expert(),
            real_or_unknown_node(),
            text(),
        )
            .prop_map(
                |(model, layer, expert, node, request_id)| AddReplicaRequest {
                    model,
                    layer,
                    expert,
                    node,
                    request_id,
                },
            );
        self.fuzz("AddReplica", add, |mut admin, request| async move {
            admin.add_replica(request).await
        });
        let nodes = (real_or_unknown_node(), real_or_unknown_node());
        let moved = (model_name(), layer(), expert(), nodes, text()).prop_map(
            |(model, layer, expert, (from_node, to_node), request_id)| MoveReplicaRequest {
                model,
                layer,
                expert,
                from_node,
                to_node,
                request_id,
            },
        );
        self.fuzz("MoveReplica", moved, |mut admin, request| async move {
            admin.move_replica(request).await
        });
    }

    /// Registrations, draining and loading models. Nodes registered here
    /// never load anything, so nothing after this may wait for them.
    fn membership(&self, fixture: &Path) {
        self.fuzz(
            "RegisterNode",
            registration(fixture),
            |mut admin, request| async move { admin.register_node(request).await },
        );
        let drained = prop_oneof![1 => Just(String::new()), 3 => idle_node(), 1 => text()]
            .prop_map(|node| DrainNodeRequest { node });
        self.fuzz("DrainNode", drained, |mut admin, request| async move {
            admin.drain_node(request).await
        });
        let replicas = prop_oneof![4 => 0u32..4, 1 => Just(u32::MAX), 1 => any::<u32>()];
        let load = (
            prop_oneof![Just(MODEL.to_string()), Just(String::new()), text()],
            checkpoint(fixture),
            replicas,
            text(),
        )
            .prop_map(
                |(model, checkpoint, replicas, request_id)| LoadModelRequest {
                    model,
                    checkpoint,
                    replicas,
                    request_id,
                },
            );
        self.fuzz("LoadModel", load, |mut admin, request| async move {
            admin.load_model(request).await
        });
    }
}

/// The served model's replicas, as (layer, expert, node, state).
async fn served_replicas(admin: &Admin) -> Result<Vec<(u32, u32, String, ReplicaState)>, String> {
    let request = ShowPlacementRequest {
        model: MODEL.into(),
        ..Default::default()
    };
    let placement = within(admin.clone().show_placement(request)).await?;
    Ok(placement
        .experts
        .iter()
        .flat_map(|expert| {
            expert.replicas.iter().map(|replica| {
                (
                    expert.layer,
                    expert.expert,
                    replica.node.clone(),
                    replica.state(),
                )
            })
        })
        .collect())
}

/// After the fuzzing: every expert of the served model has settled on
/// the real nodes, placement changes still reach them (a move completes),
/// and every layer forwards exactly.
async fn still_serving_exactly(
    cluster: &ManagedCluster,
    fixture: &Fixture,
    admin: &Admin,
    move_id: &str,
) {
    let replicas = eventually("the served model's replicas settle", || async {
        let replicas = served_replicas(admin).await?;
        let settled = replicas.len() >= 2 * 9
            && replicas.iter().all(|(_, _, node, state)| {
                *state == ReplicaState::Ready && REAL_NODES.contains(&node.as_str())
            });
        match settled {
            true => Ok(replicas),
            false => Err(format!("{replicas:?}")),
        }
    })
    .await;
    let held_once = replicas.iter().find(|(layer, expert, _, _)| {
        replicas
            .iter()
            .filter(|(other_layer, other, _, _)| other_layer == layer && other == expert)
            .count()
            == 1
    });
    if let Some((layer, expert, holder, _)) = held_once {
        let target = REAL_NODES.iter().find(|node| *node != holder).unwrap();
        let request = MoveReplicaRequest {
            model: MODEL.into(),
            layer: *layer,
            expert: *expert,
            from_node: holder.clone(),
            to_node: target.to_string(),
            request_id: move_id.into(),
        };
        let moved = tokio::time::timeout(CALL_TIMEOUT, admin.clone().move_replica(request)).await;
        assert!(
            matches!(moved, Ok(Ok(_))),
            "a move after the fuzzing: {moved:?}"
        );
    } else {
        println!("every expert is on both nodes; no move to try");
    }
    let client = cluster.client().await;
    for (&layer, (input, expected)) in &fixture.cases {
        let output = eventually(&format!("layer {layer} forwards"), || {
            let mut client = client.clone();
            async move {
                client
                    .forward_f32("", layer as u32, input, fixture.hidden_size())
                    .await
                    .map_err(|error| error.to_string())
            }
        })
        .await;
        let error = relative_l2(&output, expected);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }
}

#[test]
fn arbitrary_admin_requests_are_answered_and_the_cluster_keeps_serving() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fixture = Fixture::open("qwen2_moe");
    let cluster = runtime.block_on(ManagedCluster::start(
        &fixture.dir,
        2,
        1,
        Duration::from_secs(3600),
    ));
    let clients = runtime.block_on(clients(
        &cluster.coordinators.urls,
        &cluster.coordinators.tls,
    ));
    let fuzz = AdminFuzz {
        runtime: &runtime,
        admins: clients.into_values().map(|(_, admin)| admin).collect(),
        cases: cases(16),
        outcomes: Outcomes::default(),
    };
    // Serving first: both nodes have registered and loaded their experts.
    let admin = &fuzz.admins[0];
    runtime.block_on(still_serving_exactly(
        &cluster,
        &fixture,
        admin,
        "move-before-fuzz",
    ));
    // In this order: moves only ever target the real nodes, which exist
    // alone until `membership` registers nodes that never load.
    fuzz.reads();
    fuzz.reports();
    fuzz.moves();
    fuzz.membership(&fixture.dir);
    fuzz.reads();
    fuzz.outcomes.print("admin calls");
    runtime.block_on(still_serving_exactly(
        &cluster,
        &fixture,
        admin,
        "move-after-fuzz",
    ));
    runtime.block_on(cluster.shutdown());
}
