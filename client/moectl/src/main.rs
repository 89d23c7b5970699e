//! moectl: talk to a moemesh cluster from the command line.
//!
//! This file holds the top level (the options every command shares and
//! the command groups); each group lives in its own module: [`forward`]
//! runs a layer through a router, [`cluster`], [`model`], [`placement`],
//! [`node`] and [`stats`] talk to the coordinators. [`connect`] holds the
//! connection options, [`output`] the table/JSON choice and [`wait`] the
//! `--wait` progress bars.

mod cluster;
mod connect;
mod forward;
mod inspect;
mod model;
mod node;
mod output;
mod placement;
mod stats;
mod wait;

use clap::{CommandFactory, Parser, Subcommand};

use crate::cluster::ClusterCommand;
use crate::connect::{ConnectionArgs, Ctl};
use crate::model::ModelCommand;
use crate::node::NodeCommand;
use crate::output::{OutputArg, OutputFormat};
use crate::placement::PlacementCommand;
use crate::stats::StatsCommand;

/// Talk to a moemesh cluster: run layers through a router, inspect and
/// manage the cluster through any coordinator.
///
/// The connection and security options (--coordinator, --router, --token,
/// --tls-*, --cluster-secret) and --output go before or after the
/// subcommand: `moectl --coordinator URL cluster status` and `moectl
/// cluster status --coordinator URL` mean the same. Each has an
/// environment variable, shown with it.
#[derive(Parser)]
#[command(name = "moectl", version, after_help = EXAMPLES)]
struct Cli {
    /// How every command prints: `table` for people, `json` for scripts
    /// (progress bars stay hidden). After the subcommand, `--output` sets
    /// it for that command, except for `forward` and `stats export`,
    /// where it names the file to write.
    #[arg(
        long = "output",
        value_enum,
        value_name = "FORMAT",
        env = "MOEMESH_OUTPUT",
        default_value = "table"
    )]
    output: OutputFormat,
    /// The same as --output json.
    #[arg(long, global = true, hide = true)]
    json: bool,
    #[command(flatten, next_help_heading = "Connection")]
    connection: ConnectionArgs,
    #[command(flatten, next_help_heading = "Security")]
    tls: moemesh_client::TlsArgs,
    #[command(subcommand)]
    command: Command,
}

/// Shown after the options in `moectl --help`.
const EXAMPLES: &str = "\
Examples:
  moectl --coordinator http://coordinator-0:7000 cluster status
  moectl --output json placement show --layer 3 | jq .
  moectl model load /models/mixtral --replicas 2 --wait
  MOEMESH_NODE_ID=expert-0 moectl node drain --wait --timeout 300
  source <(moectl completions bash)";

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
    /// Prints a shell completion script for moectl.
    ///
    /// bash: `source <(moectl completions bash)` (or write it to
    /// /etc/bash_completion.d/moectl); zsh: `moectl completions zsh >
    /// "${fpath[1]}/_moectl"`; fish: `moectl completions fish >
    /// ~/.config/fish/completions/moectl.fish`.
    Completions(CompletionsArgs),
}

#[derive(clap::Args)]
struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    shell: clap_complete::Shell,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let ctl = Ctl::new(cli.connection, cli.tls, cli.output, cli.json);
    match cli.command {
        Command::Completions(args) => {
            let mut command = Cli::command();
            clap_complete::generate(args.shell, &mut command, "moectl", &mut std::io::stdout());
            Ok(())
        }
        Command::Forward(args) => {
            let format = ctl.format(&OutputArg::default());
            forward::forward(args, &ctl, format).await
        }
        Command::Cluster(ClusterCommand::Status(args)) => cluster::status(args, &ctl).await,
        Command::Model(ModelCommand::Load(args)) => model::load(args, &ctl).await,
        Command::Model(ModelCommand::Inspect(args)) => {
            let json = ctl.is_json(&args.format);
            inspect::inspect(args, json)
        }
        Command::Placement(PlacementCommand::Show(args)) => placement::show(args, &ctl).await,
        Command::Placement(PlacementCommand::Move(args)) => {
            placement::move_replica(args, &ctl).await
        }
        Command::Placement(PlacementCommand::Replicate(args)) => {
            placement::replicate(args, &ctl).await
        }
        Command::Placement(PlacementCommand::Plan(args)) => placement::plan(args, &ctl),
        Command::Placement(PlacementCommand::Rebalance(args)) => {
            placement::rebalance(args, &ctl).await
        }
        Command::Top(args) => stats::top(args, &ctl).await,
        Command::Stats(StatsCommand::Export(args)) => stats::export(args, &ctl).await,
        Command::Node(NodeCommand::Drain(args)) => node::drain(args, &ctl).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn connection_options_parse_before_and_after_the_subcommand() {
        for args in [
            &[
                "moectl",
                "--coordinator",
                "http://c:7000",
                "--token",
                "t",
                "cluster",
                "status",
            ][..],
            &[
                "moectl",
                "cluster",
                "status",
                "--coordinator",
                "http://c:7000",
                "--token",
                "t",
            ],
        ] {
            let cli = Cli::try_parse_from(args).expect("parses");
            assert_eq!(cli.connection.coordinator, "http://c:7000");
            assert_eq!(cli.connection.token.as_deref(), Some("t"));
        }
        let cli = Cli::try_parse_from([
            "moectl",
            "forward",
            "--router",
            "http://r:1",
            "--layer",
            "1",
            "--input",
            "i",
            "--output",
            "o",
        ])
        .expect("parses");
        assert_eq!(cli.connection.router, "http://r:1");
    }

    #[test]
    fn the_output_format_comes_from_either_side_and_json_is_an_alias() {
        let format = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("parses");
            let Command::Cluster(ClusterCommand::Status(status)) = &cli.command else {
                panic!("cluster status");
            };
            Ctl::new(
                cli.connection.clone(),
                cli.tls.clone(),
                cli.output,
                cli.json,
            )
            .format(&status.format)
        };
        assert_eq!(
            format(&["moectl", "--output", "json", "cluster", "status"]),
            OutputFormat::Json
        );
        assert_eq!(
            format(&["moectl", "cluster", "status", "--output", "json"]),
            OutputFormat::Json
        );
        assert_eq!(
            format(&[
                "moectl", "--output", "json", "cluster", "status", "--output", "table"
            ]),
            OutputFormat::Table
        );
        assert_eq!(
            format(&["moectl", "cluster", "status", "--json"]),
            OutputFormat::Json
        );
        assert_eq!(
            format(&["moectl", "--json", "cluster", "status"]),
            OutputFormat::Json
        );
        assert!(Cli::try_parse_from(["moectl", "--output", "yaml", "cluster", "status"]).is_err());
    }
}
