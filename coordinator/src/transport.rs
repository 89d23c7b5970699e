//! How raft messages reach other coordinators.
//!
//! Raft tolerates lost, delayed and reordered messages, so sending is fire
//! and forget. [`SimNetwork`] is an in-process network for tests and local
//! groups that can drop, delay and partition messages.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::prelude::Message;
use rand::Rng;

use crate::node::RaftHandle;

/// Carries raft messages to their destinations.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends each message to `message.to`; never blocks.
    fn send(&self, messages: Vec<Message>);
}

/// Fault settings of a [`SimNetwork`].
#[derive(Debug, Clone, Default)]
struct SimFaults {
    /// Coordinators split into sides; messages cross no side boundary.
    sides: Option<Vec<HashSet<u64>>>,
    /// Probability that any message is lost.
    drop_rate: f64,
    /// Extra latency of every message, up to this much, uniformly.
    max_delay: Duration,
}

#[derive(Default)]
struct SimState {
    members: HashMap<u64, RaftHandle>,
    faults: SimFaults,
}

/// An in-process network of coordinators with injectable faults.
#[derive(Clone, Default)]
pub struct SimNetwork {
    state: Arc<Mutex<SimState>>,
}

impl SimNetwork {
    /// Connects a coordinator (or reconnects a restarted one).
    pub fn attach(&self, id: u64, handle: RaftHandle) {
        self.state
            .lock()
            .expect("sim network")
            .members
            .insert(id, handle);
    }

    /// Disconnects a coordinator, as if it had crashed.
    pub fn detach(&self, id: u64) {
        self.state.lock().expect("sim network").members.remove(&id);
    }

    /// Splits the network: messages only flow within each side.
    pub fn partition(&self, sides: Vec<Vec<u64>>) {
        self.state.lock().expect("sim network").faults.sides = Some(
            sides
                .into_iter()
                .map(|side| side.into_iter().collect())
                .collect(),
        );
    }

    /// Removes any partition.
    pub fn heal(&self) {
        self.state.lock().expect("sim network").faults.sides = None;
    }

    /// Loses each message with probability `drop_rate` and delays each by up to `max_delay`.
    pub fn set_faults(&self, drop_rate: f64, max_delay: Duration) {
        let mut state = self.state.lock().expect("sim network");
        state.faults.drop_rate = drop_rate;
        state.faults.max_delay = max_delay;
    }

    /// Returns the transport one coordinator sends through.
    pub fn transport(&self) -> Arc<dyn RaftTransport> {
        Arc::new(self.clone())
    }
}

impl RaftTransport for SimNetwork {
    fn send(&self, messages: Vec<Message>) {
        let state = self.state.lock().expect("sim network");
        let mut rng = rand::rng();
        for message in messages {
            let connected = match &state.faults.sides {
                Some(sides) => sides
                    .iter()
                    .any(|side| side.contains(&message.from) && side.contains(&message.to)),
                None => true,
            };
            if !connected || rng.random_bool(state.faults.drop_rate.clamp(0.0, 1.0)) {
                continue;
            }
            let Some(handle) = state.members.get(&message.to).cloned() else {
                continue;
            };
            let max_delay = state.faults.max_delay;
            if max_delay.is_zero() {
                handle.step(message);
            } else {
                let delay = max_delay.mul_f64(rng.random_range(0.0..1.0));
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    handle.step(message);
                });
            }
        }
    }
}
