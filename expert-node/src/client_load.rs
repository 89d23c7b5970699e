//! The load one-hop clients put on this node, for the coordinators.
//!
//! A router reports the tokens it sends each expert itself. A one-hop
//! client in a secured cluster cannot: coordinators take load reports from
//! routers only, since a client could claim any load. So the expert node
//! counts what members of role client actually had it compute, and its
//! heartbeats carry the counts (cumulative since it started, as a router's
//! reports are). Calls from routers are not counted here, so no token is
//! counted twice.

use std::collections::BTreeMap;
use std::sync::Mutex;

use moemesh_proto::identity::Role;
use moemesh_proto::tls::Caller;
use moemesh_proto::v1::ExpertTokens;

use crate::worker::ComputeJob;

/// Cumulative tokens from one-hop clients, per layer and expert and in all.
#[derive(Debug, Default)]
pub struct ClientLoad {
    counts: Mutex<ClientCounts>,
}

#[derive(Debug, Default)]
struct ClientCounts {
    /// Per (layer, expert) the node computed for clients.
    experts: BTreeMap<(u32, u32), u64>,
    /// Token rows received.
    tokens: u64,
}

/// What one computed job adds to the counts.
#[derive(Debug)]
pub struct JobLoad {
    layer: u32,
    /// (expert, rows) in the job's order.
    experts: Vec<(u32, u64)>,
    tokens: u64,
}

impl JobLoad {
    /// The load of `job`, of `hidden`-wide rows, when `caller` is a
    /// one-hop client (a member of role client); None for anyone else.
    pub fn of_client(caller: &Caller, job: &ComputeJob, hidden: usize) -> Option<Self> {
        if caller.member()?.role() != Role::Client {
            return None;
        }
        let experts = job
            .assignments
            .iter()
            .map(|assignment| (assignment.expert, assignment.rows.len() as u64))
            .collect();
        Some(Self {
            layer: job.layer as u32,
            experts,
            tokens: (job.input.len() / hidden.max(1)) as u64,
        })
    }
}

impl ClientLoad {
    /// Adds a job the node computed.
    pub fn add(&self, job: &JobLoad) {
        let mut counts = self.counts.lock().expect("client load");
        counts.tokens = counts.tokens.saturating_add(job.tokens);
        for &(expert, rows) in &job.experts {
            let count = counts.experts.entry((job.layer, expert)).or_default();
            *count = count.saturating_add(rows);
        }
    }

    /// The counts so far, as a heartbeat carries them: per expert, then
    /// the tokens in all.
    pub fn snapshot(&self) -> (Vec<ExpertTokens>, u64) {
        let counts = self.counts.lock().expect("client load");
        let experts = counts
            .experts
            .iter()
            .map(|(&(layer, expert), &tokens)| ExpertTokens {
                layer,
                expert,
                tokens,
            })
            .collect();
        (experts, counts.tokens)
    }
}

#[cfg(test)]
mod tests {
    use moemesh_proto::identity::Member;

    use super::*;
    use crate::worker::ExpertAssignment;

    fn job(layer: usize, tokens: usize, experts: &[(u32, &[u32])]) -> ComputeJob {
        ComputeJob {
            layer,
            input: vec![0.0; tokens * 4],
            assignments: experts
                .iter()
                .map(|&(expert, rows)| ExpertAssignment {
                    expert,
                    rows: rows.to_vec(),
                    weights: vec![1.0; rows.len()],
                })
                .collect(),
        }
    }

    fn member(role: Role) -> Caller {
        Caller::Member(Member::new(role, "m").unwrap())
    }

    #[test]
    fn only_client_members_are_counted() {
        let job = job(1, 2, &[(3, &[0, 1])]);
        assert!(JobLoad::of_client(&member(Role::Client), &job, 4).is_some());
        for caller in [
            member(Role::Router),
            member(Role::Operator),
            Caller::Trusted,
            Caller::Unknown("no cluster secret".into()),
        ] {
            assert!(JobLoad::of_client(&caller, &job, 4).is_none(), "{caller}");
        }
    }

    #[test]
    fn jobs_add_up_per_layer_and_expert() {
        let load = ClientLoad::default();
        let client = member(Role::Client);
        for job in [
            job(1, 3, &[(0, &[0, 2]), (5, &[1])]),
            job(1, 2, &[(5, &[0, 1])]),
            job(3, 1, &[(2, &[0])]),
        ] {
            load.add(&JobLoad::of_client(&client, &job, 4).unwrap());
        }
        let (experts, tokens) = load.snapshot();
        assert_eq!(tokens, 6);
        let experts: Vec<_> = experts
            .iter()
            .map(|count| (count.layer, count.expert, count.tokens))
            .collect();
        assert_eq!(experts, [(1, 0, 2), (1, 5, 3), (3, 2, 1)]);
    }
}
