//! Measures how long a three-coordinator group takes to commit again after
//! losing its leader: gRPC on 127.0.0.1, the default election settings
//! (100 ms ticks, elections after 10-20 silent ticks) unless given.
//!
//!     cargo run --release -p moemesh-coordinator --example failover_time -- [runs] [tick_ms]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moemesh_coordinator::node::RaftNodeConfig;
use moemesh_coordinator::server::{Coordinator, CoordinatorConfig};
use moemesh_coordinator::state::{Command, NodeRecord, NodeStatus, Proposal};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Running {
    stop_tx: oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
    node: moemesh_coordinator::node::RaftHandle,
}

async fn start(
    id: u64,
    listener: TcpListener,
    peers: &BTreeMap<u64, String>,
    dir: &std::path::Path,
    tick: Duration,
) -> Running {
    let mut raft = RaftNodeConfig::new(id, Vec::new(), dir.join(format!("c{id}")));
    raft.tick_interval = tick;
    let coordinator = Coordinator::start(CoordinatorConfig::new(raft, peers.clone()))
        .expect("coordinator starts");
    let node = coordinator.node().clone();
    let (stop_tx, stop_rx) = oneshot::channel();
    let server = tokio::spawn(async move {
        coordinator
            .serve(listener, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("coordinator serves");
    });
    Running {
        stop_tx,
        server,
        node,
    }
}

fn register(index: usize) -> Proposal {
    let node = NodeRecord {
        id: format!("node-{index}"),
        address: "http://127.0.0.1:1".into(),
        group: "g".into(),
        device: "cpu".into(),
        memory_bytes: 1,
        buffer_bytes: 0,
        weight_format: String::new(),
        status: NodeStatus::Ready,
    };
    Proposal {
        request_id: format!("failover-{index}"),
        command: Command::RegisterNode { node },
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args()
        .skip(1)
        .map(|arg| arg.parse::<u64>().expect("numeric arguments"));
    let runs = args.next().unwrap_or(7) as usize;
    let tick = Duration::from_millis(args.next().unwrap_or(100));
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut peers = BTreeMap::new();
    let mut listeners = BTreeMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(
            id,
            format!("http://{}", listener.local_addr().expect("address")),
        );
        listeners.insert(id, listener);
    }
    let mut running = BTreeMap::new();
    for (id, listener) in listeners {
        running.insert(id, start(id, listener, &peers, dir.path(), tick).await);
    }
    let mut times = Vec::new();
    for run in 0..runs {
        // Wait for a leader and a commit under it.
        let leader = loop {
            let status = running
                .values()
                .next()
                .expect("a coordinator")
                .node
                .status()
                .await
                .expect("status");
            if let Some(leader) = status
                .leader_id
                .filter(|leader| running.contains_key(leader))
                && running[&leader]
                    .node
                    .propose(register(1000 + run))
                    .await
                    .is_ok()
            {
                break leader;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let stopped = running.remove(&leader).expect("the leader runs");
        let stopped_at = Instant::now();
        let _ = stopped.stop_tx.send(());
        stopped.server.await.expect("server task");
        let survivor = running.values().next().expect("a survivor").node.clone();
        while survivor.propose(register(run)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = stopped_at.elapsed();
        println!("run {run}: coordinator {leader} stopped, first commit after {took:?}");
        times.push(took);
        // Bring it back from its data directory for the next run.
        let address = peers[&leader].trim_start_matches("http://").to_string();
        let listener = TcpListener::bind(&address)
            .await
            .expect("rebind the stopped coordinator's port");
        running.insert(
            leader,
            start(leader, listener, &peers, dir.path(), tick).await,
        );
    }
    times.sort();
    println!(
        "first commit after losing the leader: median {:?}, min {:?}, max {:?} over {runs} runs ({tick:?} ticks, elections after 10-20 ticks)",
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
    for (_, coordinator) in running {
        let _ = coordinator.stop_tx.send(());
        let _ = coordinator.server.await;
    }
}
