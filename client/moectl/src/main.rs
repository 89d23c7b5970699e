//! moectl: talk to a moemesh cluster from the command line.
//!
//! This file holds the top level (the global TLS flags and the command
//! groups); each group lives in its own module: [`forward`] runs a layer
//! through a router, [`cluster`], [`model`], [`placement`], [`node`] and
//! [`stats`] talk to the coordinators. [`connect`] holds the coordinator
//! flags every admin command shares and [`output`] the JSON printing.

mod cluster;
mod connect;
mod forward;
mod model;
mod node;
mod output;
mod placement;
mod stats;

use clap::{Parser, Subcommand};
use moemesh_proto::identity::{Member, Role};

use crate::cluster::ClusterCommand;
use crate::model::ModelCommand;
use crate::node::NodeCommand;
use crate::placement::PlacementCommand;
use crate::stats::StatsCommand;

/// Talk to a moemesh cluster: run layers through a router, inspect and
/// manage the cluster through any coordinator.
#[derive(Parser)]
#[command(name = "moectl", version)]
struct Cli {
    #[command(flatten)]
    tls: moemesh_client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one MoE layer on hidden states from a .npy file and writes the output as .npy.
    Forward(forward::ForwardArgs),
    /// The cluster as a whole.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Models served by the cluster.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Load per node and per expert, refreshed every second until Ctrl-C.
    Top(stats::TopArgs),
    /// The load window.
    #[command(subcommand)]
    Stats(StatsCommand),
    /// Which node holds which expert.
    #[command(subcommand)]
    Placement(PlacementCommand),
    /// Expert nodes.
    #[command(subcommand)]
    Node(NodeCommand),
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // In plaintext mode moectl calls as the operator `moectl`; with TLS
    // its certificate says who it is (an operator's, to change placement).
    let operator = Member::new(Role::Operator, "moectl").expect("a valid member id");
    let tls = cli.tls.config(operator)?;
    match cli.command {
        Command::Forward(args) => forward::forward(args, &tls).await,
        Command::Cluster(ClusterCommand::Status(args)) => cluster::status(args, &tls).await,
        Command::Model(ModelCommand::Load(args)) => model::load(args, &tls).await,
        Command::Placement(PlacementCommand::Show(args)) => placement::show(args, &tls).await,
        Command::Placement(PlacementCommand::Move(args)) => {
            placement::move_replica(args, &tls).await
        }
        Command::Placement(PlacementCommand::Replicate(args)) => {
            placement::replicate(args, &tls).await
        }
        Command::Placement(PlacementCommand::Plan(args)) => placement::plan(args),
        Command::Placement(PlacementCommand::Rebalance(args)) => {
            placement::rebalance(args, &tls).await
        }
        Command::Top(args) => stats::top(args, &tls).await,
        Command::Stats(StatsCommand::Export(args)) => stats::export(args, &tls).await,
        Command::Node(NodeCommand::Drain(args)) => node::drain(args, &tls).await,
    }
}
