//! `moectl node`: acting on one expert node.

use anyhow::Context;
use moemesh_client::CoordinatorClient;
use serde_json::json;
use tokio::time::Instant;

use crate::connect::Ctl;
use crate::output::{OutputArg, print_outcome};
use crate::wait::{
    POLL_INTERVAL, Progress, RETRY_PAUSE, WaitArgs, held_by, is_transient, placement_reader,
    poll_while,
};

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Moves every replica off a node (one at a time, no request fails)
    /// and keeps new ones away.
    ///
    /// The coordinators move the replicas during the call, which returns
    /// once the node is empty. With --wait moectl also shows a bar of
    /// replicas moved, makes the call again when a coordinator fails
    /// midway (a leader change), checks in the placement that the node
    /// holds no replica, and gives up after --timeout with a non-zero exit.
    /// In an expert node's pod, `moectl node drain --wait` (a preStop hook)
    /// finds the node in MOEMESH_NODE_ID and the coordinators in
    /// MOEMESH_COORDINATOR.
    Drain(DrainArgs),
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node's id; defaults to MOEMESH_NODE_ID, which an expert node's
    /// environment carries.
    #[arg(env = "MOEMESH_NODE_ID", value_name = "NODE")]
    node: String,
    #[command(flatten)]
    wait: WaitArgs,
    #[command(flatten)]
    format: OutputArg,
}

/// What a drain did: replicas moved and the placement epoch after.
struct Drained {
    moved: u32,
    epoch: u64,
}

pub async fn drain(args: DrainArgs, ctl: &Ctl) -> anyhow::Result<()> {
    let mut admin = ctl.admin().await?;
    let node = &args.node;
    let drained = if args.wait.wait {
        let visible = ctl.shows_progress(&args.format);
        drain_and_wait(&mut admin, node, &args.wait, visible).await?
    } else {
        let drained = admin.drain_node(node).await?;
        Drained {
            moved: drained.moved,
            epoch: drained.epoch,
        }
    };
    let mut outcome = json!({"node": node, "moved": drained.moved, "epoch": drained.epoch});
    if args.wait.wait {
        outcome["replicas_left"] = 0.into();
    }
    print_outcome(ctl.is_json(&args.format), outcome, || {
        format!(
            "{node} drained: {} replicas moved; placement epoch {}",
            drained.moved, drained.epoch
        )
    });
    Ok(())
}

/// Drains `node` until the placement shows it holds no replica: the drain
/// call is made again after a coordinator failed midway, and refusals
/// (an unknown node, nowhere to move a replica) end the wait at once.
async fn drain_and_wait(
    admin: &mut CoordinatorClient,
    node: &str,
    wait: &WaitArgs,
    visible: bool,
) -> anyhow::Result<Drained> {
    let deadline = wait.deadline();
    let mut reader = placement_reader(admin);
    // Unknown when no coordinator answers yet; the drain call retries.
    let held_at_start = match reader.show_placement("", None).await {
        Ok(placement) => held_by(&placement, node),
        Err(_) => 0,
    };
    let progress = Progress::new(visible, format!("draining {node}"));
    progress.set(0, held_at_start, "replicas moved off");
    let mut drained = Drained { moved: 0, epoch: 0 };
    loop {
        let show_progress = async || {
            if let Ok(placement) = reader.show_placement("", None).await {
                let held = held_by(&placement, node);
                let total = held_at_start.max(held);
                progress.set(total - held, total, "replicas moved off");
            }
        };
        match poll_while(deadline, admin.drain_node(node), show_progress).await {
            None => return Err(timed_out(&mut reader, node, wait).await),
            Some(Ok(answer)) => {
                drained.moved += answer.moved;
                drained.epoch = answer.epoch;
                let placement = reader
                    .show_placement("", None)
                    .await
                    .context("reading the placement after the drain")?;
                if held_by(&placement, node) == 0 {
                    return Ok(drained);
                }
                // The coordinator read may trail the drain by a moment.
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            Some(Err(error)) if is_transient(&error) => {
                if Instant::now() + RETRY_PAUSE >= deadline {
                    return Err(timed_out(&mut reader, node, wait).await);
                }
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Some(Err(error)) => return Err(error.into()),
        }
    }
}

/// The error of a drain that did not finish within --timeout, saying how
/// many replicas the node still holds when the placement can be read.
async fn timed_out(reader: &mut CoordinatorClient, node: &str, wait: &WaitArgs) -> anyhow::Error {
    let left = match reader.show_placement("", None).await {
        Ok(placement) => format!("{} replicas", held_by(&placement, node)),
        Err(_) => "replicas".to_string(),
    };
    anyhow::anyhow!(
        "{node} still holds {left} after {} s (--timeout); it stays draining (it takes no new \
         replicas); run `moectl node drain {node} --wait` again to finish",
        wait.timeout
    )
}
