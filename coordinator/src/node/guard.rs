//! Defence in depth for raft messages from peers: refuses, before raft-rs
//! sees them, messages that no well-behaved member of the group sends.
//!
//! raft-rs trusts its peers: a heartbeat committing past the end of the
//! log, an append anchored where the log has no entry, an empty proposal or
//! read request, or an acknowledgement of entries the leader never had
//! makes it panic, and a snapshot that our state machine cannot decode
//! would stop the node once raft-rs restored it. Authentication keeps
//! strangers away from the peer port; these checks keep a member that
//! misbehaves (or a forged message that got through) from taking a
//! coordinator down. Each one holds for every message raft-rs itself sends,
//! whatever the timing.
//!
//! The group's voters are fixed when it starts (moemesh never changes them
//! through raft), so messages carrying configuration changes, or snapshots
//! of another configuration, are refused too.

use raft::prelude::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{Raft, StateRole, Storage};

/// Terms grow by one per election; no group comes near this, and a term
/// beyond it would overflow the next election's increment.
const MAX_TERM: u64 = u64::MAX / 2;

/// How far ahead of ours a peer's term may be: a coordinator that missed
/// this many elections is implausible (an election takes a second or
/// more), while a forged term far ahead would push the group towards
/// [`MAX_TERM`], past which it could never elect again.
const MAX_TERM_LEAD: u64 = 1 << 40;

/// Returns why `message` must not be stepped into `raft`, if it must not.
pub(super) fn refusal<S: Storage>(raft: &Raft<S>, message: &Message) -> Option<String> {
    let kind = message.get_msg_type();
    if message.to != raft.id {
        return Some(format!(
            "it is addressed to coordinator {}, not to this one ({})",
            message.to, raft.id
        ));
    }
    let members = raft.prs().conf().to_conf_state();
    if message.from == raft.id
        || !members.voters.contains(&message.from) && !members.learners.contains(&message.from)
    {
        return Some(format!(
            "its sender {} is not another member of the group {:?}",
            message.from, members.voters
        ));
    }
    if let Some(reason) = refuse_term(kind, message.term) {
        return Some(reason);
    }
    if message.term > raft.term.saturating_add(MAX_TERM_LEAD) {
        return Some(format!(
            "its term {} is more than {MAX_TERM_LEAD} ahead of ours ({})",
            message.term, raft.term
        ));
    }
    if message.request_snapshot != 0 {
        // The leader would stop replicating to the asker until a snapshot
        // at that index exists, which may be never.
        return Some(format!(
            "it asks for a snapshot at index {}; coordinators never ask for one",
            message.request_snapshot
        ));
    }
    if message.term != 0 && message.term < raft.term {
        // raft-rs answers a stale message with its term and reads nothing else.
        return None;
    }
    let last_index = raft.raft_log.last_index();
    match kind {
        MessageType::MsgHeartbeat => (message.commit > last_index).then(|| {
            format!(
                "it commits index {} past the end of the log ({last_index})",
                message.commit
            )
        }),
        MessageType::MsgAppend => refuse_append(message),
        MessageType::MsgSnapshot => refuse_snapshot(&members, message),
        MessageType::MsgPropose => refuse_proposal(&message.entries),
        MessageType::MsgReadIndex | MessageType::MsgReadIndexResp => (message.entries.len() != 1)
            .then(|| {
                format!(
                    "it carries {} entries instead of one read context",
                    message.entries.len()
                )
            }),
        MessageType::MsgAppendResponse | MessageType::MsgHeartbeatResponse
            if raft.state == StateRole::Leader =>
        {
            refuse_acknowledgement(message, last_index)
        }
        _ => None,
    }
}

/// Local messages never come from a peer; a term of 0 marks one, and only
/// forwarded proposals and read requests (which raft-rs sends without a
/// term) carry it over the network.
fn refuse_term(kind: MessageType, term: u64) -> Option<String> {
    let local = matches!(
        kind,
        MessageType::MsgHup
            | MessageType::MsgBeat
            | MessageType::MsgUnreachable
            | MessageType::MsgSnapStatus
            | MessageType::MsgCheckQuorum
    );
    // A follower forwards a leadership transfer to the leader as it got it,
    // and raft-rs refuses to send one with a term.
    let termless = matches!(
        kind,
        MessageType::MsgPropose | MessageType::MsgReadIndex | MessageType::MsgTransferLeader
    );
    if local {
        Some(format!("{kind:?} is a local message"))
    } else if termless && term != 0 {
        Some(format!(
            "a forwarded {kind:?} carries no term, this one has term {term}"
        ))
    } else if !termless && term == 0 {
        Some(format!("{kind:?} without a term"))
    } else if term > MAX_TERM {
        Some(format!(
            "its term {term} is beyond any election (limit {MAX_TERM})"
        ))
    } else {
        None
    }
}

/// An append must be anchored on an entry (a term of 0 only at index 0:
/// raft-rs takes term 0 past the end of the log as a match) and carry
/// consecutive entries of non-decreasing terms up to the message's.
fn refuse_append(message: &Message) -> Option<String> {
    let (index, log_term) = (message.index, message.log_term);
    if (index == 0) != (log_term == 0) {
        return Some(format!(
            "it is anchored at index {index} with term {log_term}"
        ));
    }
    if log_term > message.term {
        return Some(format!(
            "its anchor's term {log_term} is after the message's term {}",
            message.term
        ));
    }
    let mut previous = (index, log_term);
    for entry in message.entries.iter() {
        if previous.0.checked_add(1) != Some(entry.index) {
            return Some(format!(
                "entry {} does not follow index {}",
                entry.index, previous.0
            ));
        }
        if entry.term < previous.1 || entry.term > message.term {
            return Some(format!(
                "entry {} has term {}, outside [{}, {}]",
                entry.index, entry.term, previous.1, message.term
            ));
        }
        if let Some(reason) = refuse_conf_change(entry) {
            return Some(reason);
        }
        previous = (entry.index, entry.term);
    }
    None
}

/// A snapshot must be of a real entry, no later than the message's term,
/// of the group's own configuration, and hold a state that decodes.
fn refuse_snapshot(members: &ConfState, message: &Message) -> Option<String> {
    let snapshot: &Snapshot = message.get_snapshot();
    let metadata = snapshot.get_metadata();
    if metadata.index == 0 || metadata.term == 0 || metadata.term > message.term {
        return Some(format!(
            "its snapshot is at index {} of term {}, message term {}",
            metadata.index, metadata.term, message.term
        ));
    }
    if !same_configuration(metadata.get_conf_state(), members) {
        return Some(format!(
            "its snapshot's configuration {:?} is not the group's {:?}",
            metadata.get_conf_state(),
            members
        ));
    }
    super::decode_state(&snapshot.data)
        .err()
        .map(|error| format!("its snapshot at index {}: {error}", metadata.index))
}

fn same_configuration(theirs: &ConfState, ours: &ConfState) -> bool {
    let sorted = |ids: &[u64]| {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        ids
    };
    theirs.voters.len() == sorted(&theirs.voters).len()
        && sorted(&theirs.voters) == sorted(&ours.voters)
        && sorted(&theirs.learners) == sorted(&ours.learners)
        && theirs.voters_outgoing.is_empty()
        && theirs.learners_next.is_empty()
        && !theirs.auto_leave
}

/// A forwarded proposal carries at least one entry and no configuration change.
fn refuse_proposal(entries: &[Entry]) -> Option<String> {
    if entries.is_empty() {
        return Some("a proposal without entries".into());
    }
    entries.iter().find_map(refuse_conf_change)
}

fn refuse_conf_change(entry: &Entry) -> Option<String> {
    (entry.get_entry_type() != EntryType::EntryNormal).then(|| {
        format!(
            "entry {} is a {:?}; the group's voters are fixed",
            entry.index,
            entry.get_entry_type()
        )
    })
}

/// A follower acknowledges, hints at and reports committed only entries
/// the leader sent it, so none past the end of the leader's log.
fn refuse_acknowledgement(message: &Message, last_index: u64) -> Option<String> {
    [
        ("acknowledges", message.index),
        ("hints at", message.reject_hint),
        ("reports committed", message.commit),
    ]
    .into_iter()
    .find(|&(_, index)| index > last_index)
    .map(|(what, index)| format!("it {what} index {index} past the end of the log ({last_index})"))
}

#[cfg(test)]
mod tests {
    use std::panic::{AssertUnwindSafe, catch_unwind};

    use raft::prelude::{ConfChange, HardState};
    use raft::storage::MemStorage;
    use raft::{Config, RawNode};

    use super::*;

    /// Coordinator 1 of the group {1, 2, 3}, a follower of 2 in term 3,
    /// whose log holds entries 1..=5 committed up to 4; `leader` makes it
    /// the leader of term 4 instead, with its first entry of that term
    /// committed (so that it serves read requests).
    fn node(leader: bool) -> RawNode<MemStorage> {
        let storage = MemStorage::new_with_conf_state((vec![1, 2, 3], vec![]));
        let entries: Vec<Entry> = (1..=5)
            .map(|index| Entry {
                index,
                term: if index < 4 { 2 } else { 3 },
                ..Default::default()
            })
            .collect();
        storage.wl().append(&entries).unwrap();
        storage.wl().set_hardstate(HardState {
            term: 3,
            vote: 2,
            commit: 4,
            ..Default::default()
        });
        let config = Config {
            id: 1,
            applied: 4,
            ..Config::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw_node = RawNode::new(&config, storage, &logger).unwrap();
        if leader {
            raw_node.raft.become_candidate();
            raw_node.raft.become_leader();
            let last_index = raw_node.raft.raft_log.last_index();
            raw_node.raft.raft_log.commit_to(last_index);
        } else {
            raw_node.raft.become_follower(3, 2);
        }
        raw_node
    }

    fn message(kind: MessageType, term: u64) -> Message {
        let mut message = Message::default();
        message.set_msg_type(kind);
        message.from = 2;
        message.to = 1;
        message.term = term;
        message
    }

    fn entries(first: u64, terms: &[u64]) -> Vec<Entry> {
        terms
            .iter()
            .zip(first..)
            .map(|(&term, index)| Entry {
                index,
                term,
                ..Default::default()
            })
            .collect()
    }

    fn snapshot_message(index: u64, term: u64, voters: Vec<u64>, data: &[u8]) -> Message {
        let mut message = message(MessageType::MsgSnapshot, 3);
        let snapshot = message.mut_snapshot();
        snapshot.set_data(data.to_vec().into());
        snapshot.mut_metadata().index = index;
        snapshot.mut_metadata().term = term;
        snapshot.mut_metadata().mut_conf_state().set_voters(voters);
        message
    }

    /// Messages raft-rs panics on, for a follower (false) or a leader (true).
    fn fatal_messages() -> Vec<(&'static str, bool, Message)> {
        let mut forged = Vec::new();
        let mut heartbeat = message(MessageType::MsgHeartbeat, 9);
        heartbeat.commit = u64::MAX;
        forged.push(("heartbeat past the log", false, heartbeat));
        let mut append = message(MessageType::MsgAppend, 3);
        append.index = 100;
        append.commit = 100;
        forged.push(("append anchored on nothing", false, append));
        let mut append = message(MessageType::MsgAppend, 3);
        append.index = 100;
        append.set_entries(entries(2, &[3]).into());
        forged.push(("append over committed entries", false, append));
        let mut append = message(MessageType::MsgAppend, 3);
        append.index = u64::MAX;
        append.set_entries(entries(5, &[3]).into());
        forged.push(("append overflowing the index", false, append));
        let mut read = message(MessageType::MsgReadIndexResp, 0);
        read.index = u64::MAX;
        read.set_entries(entries(0, &[0]).into());
        forged.push(("read response without a term", false, read));
        forged.push((
            "snapshot of term 0 past the log",
            false,
            snapshot_message(100, 0, vec![1, 2, 3], b"{}"),
        ));
        forged.push((
            "leadership transfer with a term, which a follower forwards",
            false,
            message(MessageType::MsgTransferLeader, 3),
        ));
        forged.push(("empty proposal", true, message(MessageType::MsgPropose, 0)));
        forged.push((
            "read request without context",
            true,
            message(MessageType::MsgReadIndex, 0),
        ));
        let mut response = message(MessageType::MsgAppendResponse, 4);
        response.index = u64::MAX;
        forged.push(("acknowledgement past the log", true, response));
        forged
    }

    #[test]
    fn every_message_raft_would_panic_on_is_refused() {
        for (what, leader, forged) in fatal_messages() {
            let mut unguarded = node(leader);
            let stepped = catch_unwind(AssertUnwindSafe(|| unguarded.step(forged.clone())));
            assert!(
                stepped.is_err(),
                "raft-rs survives {what}; drop it from this list"
            );
            assert!(
                refusal(&node(leader).raft, &forged).is_some(),
                "{what} was not refused"
            );
        }
    }

    #[test]
    fn snapshot_requests_are_refused() {
        let leader = node(true);
        let mut answer = message(MessageType::MsgAppendResponse, 3);
        answer.reject = true;
        answer.request_snapshot = 105;
        assert!(refusal(&leader.raft, &answer).is_some());
    }

    #[test]
    fn a_term_far_ahead_of_ours_is_refused_before_it_strands_the_group() {
        let follower = node(false);
        let ours = follower.raft.term;
        let mut ahead = message(MessageType::MsgHeartbeat, ours + MAX_TERM_LEAD);
        ahead.commit = 0;
        assert_eq!(refusal(&follower.raft, &ahead), None);
        for term in [ours + MAX_TERM_LEAD + 1, MAX_TERM, MAX_TERM - 1] {
            let mut far = message(MessageType::MsgRequestVote, term);
            far.index = 5;
            far.log_term = 3;
            assert!(refusal(&follower.raft, &far).is_some(), "term {term}");
        }
    }

    #[test]
    fn messages_a_member_sends_pass() {
        let follower = node(false);
        let leader = node(true);
        let mut heartbeat = message(MessageType::MsgHeartbeat, 3);
        heartbeat.commit = 5;
        let mut append = message(MessageType::MsgAppend, 3);
        append.index = 5;
        append.log_term = 3;
        append.commit = 7;
        append.set_entries(entries(6, &[3, 3]).into());
        let mut probe_past_the_log = message(MessageType::MsgAppend, 3);
        probe_past_the_log.index = 9;
        probe_past_the_log.log_term = 3;
        let mut stale = message(MessageType::MsgHeartbeat, 1);
        stale.commit = u64::MAX;
        let mut vote = message(MessageType::MsgRequestVote, 4);
        vote.index = 5;
        vote.log_term = 3;
        let mut proposal = message(MessageType::MsgPropose, 0);
        proposal.set_entries(entries(0, &[0]).into());
        let state = serde_json::to_vec(&crate::state::ClusterState::default()).unwrap();
        let snapshot = snapshot_message(8, 3, vec![3, 2, 1], &state);
        for (what, forwarded) in [
            ("heartbeat", heartbeat),
            ("append", append),
            ("probe past the log", probe_past_the_log),
            ("stale heartbeat", stale),
            ("vote request", vote),
            ("snapshot", snapshot),
            ("proposal", proposal.clone()),
        ] {
            assert_eq!(refusal(&follower.raft, &forwarded), None, "{what}");
        }
        let mut response = message(MessageType::MsgAppendResponse, 4);
        response.index = 5;
        response.commit = 4;
        assert_eq!(refusal(&leader.raft, &proposal), None);
        assert_eq!(refusal(&leader.raft, &response), None);
    }

    #[test]
    fn strangers_other_addressees_and_configuration_changes_are_refused() {
        let follower = node(false);
        let mut heartbeat = message(MessageType::MsgHeartbeat, 3);
        heartbeat.from = 7;
        assert!(
            refusal(&follower.raft, &heartbeat)
                .unwrap()
                .contains("sender 7")
        );
        heartbeat.from = 2;
        heartbeat.to = 3;
        assert!(
            refusal(&follower.raft, &heartbeat)
                .unwrap()
                .contains("coordinator 3")
        );
        heartbeat.to = 1;
        heartbeat.term = u64::MAX;
        assert!(
            refusal(&follower.raft, &heartbeat)
                .unwrap()
                .contains("beyond")
        );

        let mut change = Entry::default();
        change.set_entry_type(EntryType::EntryConfChange);
        change.data = protobuf::Message::write_to_bytes(&ConfChange::default())
            .unwrap()
            .into();
        let mut proposal = message(MessageType::MsgPropose, 0);
        proposal.set_entries(vec![change.clone()].into());
        assert!(
            refusal(&follower.raft, &proposal)
                .unwrap()
                .contains("fixed")
        );
        change.index = 6;
        change.term = 3;
        let mut append = message(MessageType::MsgAppend, 3);
        append.index = 5;
        append.log_term = 3;
        append.set_entries(vec![change].into());
        assert!(refusal(&follower.raft, &append).unwrap().contains("fixed"));

        let other_group = snapshot_message(8, 3, vec![1, 2], b"{}");
        assert!(
            refusal(&follower.raft, &other_group)
                .unwrap()
                .contains("configuration")
        );
        let undecodable = snapshot_message(8, 3, vec![1, 2, 3], b"not a state");
        let reason = refusal(&follower.raft, &undecodable).unwrap();
        assert!(reason.contains("snapshot at index 8"), "{reason}");
    }
}
