//! The delta property: a watcher that applies its stream's updates, read
//! at any points and reconnecting at any points (to a coordinator whose
//! history may not reach back), has exactly the snapshot the coordinator
//! would send at the same revision.

use moemesh_proto::placement::PlacementView;
use moemesh_proto::v1::PlacementSnapshot;
use proptest::prelude::*;
use tokio::sync::{mpsc, watch};

use super::*;
use crate::history::apply_recorded;
use crate::state::{
    Command, ExpertKey, ModelRecord, NodeRecord, NodeStatus, Proposal, ReplicaState,
};

const MODELS: [&str; 2] = ["m1", "m2"];
const NODES: [&str; 4] = ["a", "b", "c", "d"];

fn node_record(id: usize, bf16: bool, status: NodeStatus) -> NodeRecord {
    NodeRecord {
        id: NODES[id].into(),
        address: format!("http://{}:1", NODES[id]),
        group: format!("g{}", id % 2),
        device: "cpu".into(),
        memory_bytes: 1 << 30,
        buffer_bytes: 0,
        weight_format: if bf16 { "bf16" } else { "f32" }.into(),
        status,
    }
}

fn key() -> impl Strategy<Value = ExpertKey> {
    // Layer 3 is not an MoE layer: commands naming it are refused.
    (
        0..MODELS.len(),
        prop_oneof![Just(0usize), Just(1), Just(3)],
        0..4u32,
    )
        .prop_map(|(model, layer, expert)| ExpertKey {
            model: MODELS[model].into(),
            layer,
            expert,
        })
}

fn status() -> impl Strategy<Value = NodeStatus> {
    prop_oneof![
        Just(NodeStatus::Joining),
        Just(NodeStatus::Ready),
        Just(NodeStatus::Draining),
        Just(NodeStatus::Dead),
    ]
}

fn node() -> impl Strategy<Value = String> {
    (0..NODES.len()).prop_map(|id| NODES[id].to_string())
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        1 => (0..NODES.len(), any::<bool>(), status())
            .prop_map(|(id, bf16, status)| Command::RegisterNode {
                node: node_record(id, bf16, status)
            }),
        1 => (node(), status()).prop_map(|(node, status)| Command::SetNodeStatus { node, status }),
        4 => (key(), node()).prop_map(|(key, node)| Command::AddReplica { key, node }),
        4 => (key(), node()).prop_map(|(key, node)| Command::ReplicaReady { key, node }),
        2 => (key(), node()).prop_map(|(key, node)| Command::DrainReplica { key, node }),
        1 => (key(), node()).prop_map(|(key, node)| Command::RemoveReplica { key, node }),
        1 => (key(), node()).prop_map(|(key, node)| Command::RemoveDrainedReplica { key, node }),
        1 => (key(), node()).prop_map(|(key, node)| Command::RestoreReplica { key, node }),
        1 => prop::collection::vec((key(), node()), 1..6)
            .prop_map(|replicas| Command::AddReplicas { replicas }),
        1 => (node(), prop::collection::vec(key(), 1..6))
            .prop_map(|(node, keys)| Command::AddServingReplicas { node, keys }),
        1 => (node(), prop::collection::vec(key(), 0..4))
            .prop_map(|(node, serving)| Command::ReconcileNodeReplicas { node, serving }),
    ]
}

/// What happens next: the leader applies a command (the follower later),
/// the follower catches up by some commands, watcher `w` reads its
/// stream, drops it and watches again (from its revision or from nothing,
/// on the leader or the follower), or waits out its coordinator being
/// behind it (and is sent that coordinator's snapshot).
#[derive(Debug, Clone)]
enum Step {
    Apply(Command),
    CatchUp(usize),
    Read(usize),
    Reconnect {
        watcher: usize,
        keep_revision: bool,
        to_follower: bool,
    },
    Patience(usize),
}

fn step(watchers: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => command().prop_map(Step::Apply),
        2 => (1..8usize).prop_map(Step::CatchUp),
        4 => (0..watchers).prop_map(Step::Read),
        2 => (0..watchers, any::<bool>(), any::<bool>()).prop_map(
            |(watcher, keep_revision, to_follower)| Step::Reconnect {
                watcher,
                keep_revision,
                to_follower,
            }
        ),
        1 => (0..watchers).prop_map(Step::Patience),
    ]
}

/// One coordinator: its state and its history.
struct Coordinator {
    state: ClusterState,
    history: Mutex<PlacementHistory>,
}

impl Coordinator {
    fn new(state: ClusterState, history_ids: usize) -> Self {
        let history = PlacementHistory::new(state.applied_commands, history_ids);
        Self {
            state,
            history: Mutex::new(history),
        }
    }

    fn apply(&mut self, proposal: Proposal) {
        apply_recorded(&mut self.state, &mut self.history.lock().unwrap(), proposal);
    }
}

struct Watcher {
    model: &'static str,
    on_follower: bool,
    stream: PlacementStream,
    view: PlacementView,
}

impl Watcher {
    /// Reads what the stream sends now from `coordinator`, as
    /// `run_placement_stream` would, and checks the view.
    fn read(&mut self, coordinator: &Coordinator) {
        let state = &coordinator.state;
        let before = self.view.clone();
        if !self.stream.is_ahead_of(state)
            && let Some(update) = self.stream.next_update(state, &coordinator.history)
        {
            self.view
                .apply(update, self.model)
                .expect("an update applies");
        }
        let revision = self.view.revision().expect("a first update came");
        assert!(
            before.revision() <= self.view.revision(),
            "the view went back"
        );
        if revision > state.applied_commands {
            // Its coordinator is behind it: nothing changes.
            assert_eq!(self.view, before);
            return;
        }
        // Changes that concern no one of this stream are not sent: its
        // revision may stay behind while its placement is the same.
        let expected = placement_snapshot(state, self.model, None);
        let seen = PlacementSnapshot {
            revision: expected.revision,
            ..self.view.snapshot()
        };
        assert_eq!(
            seen, expected,
            "watcher of {:?} at revision {}",
            self.model, state.applied_commands
        );
    }
}

/// A cluster with both models and two nodes, as a test starts from.
fn seeded() -> ClusterState {
    let mut state = ClusterState::default();
    let commands = MODELS
        .iter()
        .map(|id| Command::AddModel {
            model: ModelRecord {
                id: id.to_string(),
                checkpoint: format!("/models/{id}"),
                family: "mixtral".into(),
                moe_layers: vec![0, 1],
                experts_per_layer: 4,
            },
        })
        .chain((0..2).map(|id| Command::RegisterNode {
            node: node_record(id, false, NodeStatus::Ready),
        }));
    for (index, command) in commands.enumerate() {
        state.apply(Proposal {
            request_id: format!("seed-{index}"),
            command,
        });
    }
    state
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn deltas_give_the_snapshot_whatever_the_reads_and_reconnections(
        steps in prop::collection::vec(step(3), 1..100),
        history_ids in 1usize..40,
    ) {
        let mut leader = Coordinator::new(seeded(), history_ids);
        let mut follower = Coordinator::new(seeded(), history_ids);
        let mut lagging = std::collections::VecDeque::new();
        let mut watchers: Vec<Watcher> = ["", "m1", "m2"]
            .into_iter()
            .map(|model| Watcher {
                model,
                on_follower: false,
                stream: PlacementStream::new(model.into(), None),
                view: PlacementView::new(),
            })
            .collect();
        for watcher in &mut watchers {
            watcher.read(&leader);
        }
        for (index, step) in steps.into_iter().enumerate() {
            match step {
                Step::Apply(command) => {
                    let proposal = Proposal { request_id: format!("r{index}"), command };
                    leader.apply(proposal.clone());
                    lagging.push_back(proposal);
                }
                Step::CatchUp(commands) => {
                    for proposal in lagging.drain(..commands.min(lagging.len())) {
                        follower.apply(proposal);
                    }
                }
                Step::Read(watcher) => {
                    let watcher = &mut watchers[watcher];
                    watcher.read(if watcher.on_follower { &follower } else { &leader });
                }
                Step::Reconnect { watcher, keep_revision, to_follower } => {
                    let watcher = &mut watchers[watcher];
                    let since = if keep_revision { watcher.view.revision() } else { None };
                    if since.is_none() {
                        watcher.view = PlacementView::new();
                    }
                    watcher.on_follower = to_follower;
                    watcher.stream = PlacementStream::new(watcher.model.into(), since);
                    watcher.read(if to_follower { &follower } else { &leader });
                }
                Step::Patience(watcher) => {
                    let watcher = &mut watchers[watcher];
                    let coordinator = if watcher.on_follower { &follower } else { &leader };
                    if watcher.stream.is_ahead_of(&coordinator.state) {
                        watcher.stream.sent_revision = None;
                    }
                    watcher.read(coordinator);
                }
            }
        }
        for proposal in lagging {
            follower.apply(proposal);
        }
        for watcher in &mut watchers {
            watcher.read(if watcher.on_follower { &follower } else { &leader });
            prop_assert!(watcher.view.revision().unwrap() <= leader.state.applied_commands);
        }
    }
}

/// `key` served on `from`, then moved to `to` as `MoveReplica` does.
fn serve_then_move(key: &ExpertKey, from: &str, to: &str) -> [Command; 5] {
    let (key, from, to) = (key.clone(), from.to_string(), to.to_string());
    [
        Command::AddServingReplicas {
            node: from.clone(),
            keys: vec![key.clone()],
        },
        Command::AddReplica {
            key: key.clone(),
            node: to.clone(),
        },
        Command::ReplicaReady {
            key: key.clone(),
            node: to,
        },
        Command::DrainReplica {
            key: key.clone(),
            node: from.clone(),
        },
        Command::RemoveReplica { key, node: from },
    ]
}

#[test]
fn a_move_costs_each_watcher_a_few_bytes_per_step() {
    use moemesh_proto::placement::update_wire_bytes;
    let mut state = seeded();
    let history = Mutex::new(PlacementHistory::new(state.applied_commands, 1000));
    let key = ExpertKey {
        model: "m1".into(),
        layer: 1,
        expert: 2,
    };
    let mut stream = PlacementStream::new("m1".into(), None);
    stream
        .next_update(&state, &history)
        .expect("a first snapshot");
    for (index, command) in serve_then_move(&key, "a", "b").into_iter().enumerate() {
        let proposal = Proposal {
            request_id: format!("move-{index}"),
            command,
        };
        let outcome = apply_recorded(&mut state, &mut history.lock().unwrap(), proposal);
        assert!(
            matches!(outcome, crate::state::Outcome::Applied { .. }),
            "{outcome:?}"
        );
        let update = stream.next_update(&state, &history).expect("a delta");
        let Some(placement_update::Update::Delta(delta)) = &update.update else {
            panic!("expected a delta, got {update:?}");
        };
        assert_eq!(delta.experts.len(), 1);
        assert!(delta.nodes.is_empty());
        assert!(
            update_wire_bytes(&update) < 60,
            "{} bytes",
            update_wire_bytes(&update)
        );
    }
    assert_eq!(
        state.replicas[&key]
            .iter()
            .map(|r| (r.node.as_str(), r.state))
            .collect::<Vec<_>>(),
        [("b", ReplicaState::Ready)]
    );
    // Nothing changed for this stream: nothing is sent.
    assert!(stream.next_update(&state, &history).is_none());
}

#[test]
fn a_watcher_resuming_at_the_coordinators_revision_hears_an_empty_delta_first() {
    let state = seeded();
    let history = Mutex::new(PlacementHistory::new(state.applied_commands, 1000));
    let mut stream = PlacementStream::new("m1".into(), Some(state.applied_commands));
    let Some(placement_update::Update::Delta(delta)) = stream
        .next_update(&state, &history)
        .and_then(|update| update.update)
    else {
        panic!("a first update, as a delta");
    };
    assert_eq!(
        (delta.epoch, delta.revision),
        (state.epoch, state.applied_commands)
    );
    assert!(delta.nodes.is_empty() && delta.experts.is_empty());
    // Then nothing until something changes.
    assert!(stream.next_update(&state, &history).is_none());
}

#[tokio::test]
async fn a_watcher_that_reads_late_gets_every_change_folded_into_few_updates() {
    let mut state = seeded();
    let history = Arc::new(Mutex::new(PlacementHistory::new(
        state.applied_commands,
        1000,
    )));
    let (applied_tx, applied_rx) = watch::channel(Arc::new(state.clone()));
    let (_closing_tx, closing_rx) = watch::channel(false);
    let (update_tx, mut update_rx) = mpsc::channel(1);
    let mut registry = prometheus_client::registry::Registry::with_prefix("moemesh");
    let metrics = CoordinatorMetrics::register(&mut registry);
    let stream = PlacementStream::new("m1".into(), None);
    tokio::spawn(run_placement_stream(
        stream,
        applied_rx,
        Arc::clone(&history),
        closing_rx,
        update_tx,
        metrics,
    ));
    // Forty changes while the watcher reads nothing.
    for (index, (layer, expert)) in (0..2).flat_map(|l| (0..4).map(move |e| (l, e))).enumerate() {
        let key = ExpertKey {
            model: "m1".into(),
            layer,
            expert,
        };
        for (step, command) in serve_then_move(&key, "a", "b").into_iter().enumerate() {
            let proposal = Proposal {
                request_id: format!("c{index}-{step}"),
                command,
            };
            apply_recorded(&mut state, &mut history.lock().unwrap(), proposal);
            applied_tx.send_replace(Arc::new(state.clone()));
            tokio::task::yield_now().await;
        }
    }
    let mut view = PlacementView::new();
    let mut updates = 0;
    while view.revision() != Some(state.applied_commands) {
        let update = tokio::time::timeout(Duration::from_secs(10), update_rx.recv())
            .await
            .expect("the stream keeps up")
            .expect("the stream stays open")
            .expect("no error");
        view.apply(update, "m1").unwrap();
        updates += 1;
    }
    // The first snapshot, at most the one update built while the channel
    // was full, then one with everything since.
    assert!(updates <= 3, "{updates} updates for 40 changes");
    assert_eq!(view.snapshot(), placement_snapshot(&state, "m1", None));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        "moemesh_coordinator_placement_watchers 1".to_string(),
        "moemesh_coordinator_placement_updates_total{kind=\"snapshot\"} 1".to_string(),
        format!(
            "moemesh_coordinator_placement_updates_total{{kind=\"delta\"}} {}",
            updates - 1
        ),
    ] {
        assert!(text.lines().any(|found| found == line), "{line} in\n{text}");
    }
}
