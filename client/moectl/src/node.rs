//! `moectl node`: acting on one expert node.

use moemesh_client::TlsConfig;
use serde_json::json;

use crate::connect::AdminArgs;
use crate::output::print_outcome;

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Moves every replica off a node (one at a time, no request fails) and keeps new ones away.
    Drain(DrainArgs),
}

#[derive(clap::Args)]
pub struct DrainArgs {
    /// The node's id.
    node: String,
    #[command(flatten)]
    admin: AdminArgs,
}

pub async fn drain(args: DrainArgs, tls: &TlsConfig) -> anyhow::Result<()> {
    let mut admin = args.admin.connect(tls).await?;
    let drained = admin.drain_node(&args.node).await?;
    print_outcome(
        args.admin.json,
        json!({"node": args.node, "moved": drained.moved, "epoch": drained.epoch}),
        || {
            format!(
                "{} drained: {} replicas moved; placement epoch {}",
                args.node, drained.moved, drained.epoch
            )
        },
    );
    Ok(())
}
