//! The measuring tools of the `moemesh` binary, apart from the roles it
//! starts. Each writes a synthetic model, starts a local cluster on it as
//! separate processes, drives a workload and reports:
//!
//! - `moemesh bench` ([`layer`]): one MoE layer in process, through the
//!   cluster and in PyTorch, beside the machine's GEMM ceiling. Its
//!   contestants are in [`contestants`], what it measures in [`figures`],
//!   its table and JSON in [`report`].
//! - `moemesh bench-rebalance` ([`rebalance`]): a skewed workload before,
//!   during and after one live rebalance.
//! - `moemesh bench-control-plane` ([`control_plane`]): coordinators
//!   with a thousand simulated expert nodes and routers, through a
//!   rebalance: placement bytes, propagation, coordinator CPU and memory.
//! - `moemesh soak` ([`soak`]): many clients for a bounded time, watching
//!   errors and memory.
//! - `moemesh bench-device` ([`device`]): one node's backend on a device
//!   (a GPU), in process: correctness against the CPU, throughput,
//!   decode latency, Expert Buffering.

mod bandwidth;
mod contestants;
pub mod control_plane;
pub mod device;
mod figures;
pub mod layer;
pub mod rebalance;
mod report;
mod round;
pub mod soak;

use anyhow::Context;
use moemesh_proto::ExpertServiceClient;
use moemesh_proto::v1::{InfoRequest, InfoResponse};

use crate::local_cluster::{LocalCluster, ProcessInfo};

/// Each expert node of `cluster`: its pid (when it runs as a process here)
/// and what it answers to Info.
async fn expert_node_info(
    cluster: &LocalCluster,
) -> anyhow::Result<Vec<(Option<u32>, InfoResponse)>> {
    let mut nodes = Vec::new();
    for ProcessInfo { pid, url } in cluster.processes("expert") {
        let channel = cluster
            .tls
            .connect(url.clone())
            .await
            .with_context(|| format!("cannot reach the expert node at {url}"))?;
        let mut client = ExpertServiceClient::new(channel);
        nodes.push((pid, client.info(InfoRequest {}).await?.into_inner()));
    }
    Ok(nodes)
}

/// Resident and peak resident memory of a process, from /proc.
fn resident_bytes(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
