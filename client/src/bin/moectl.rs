//! moectl: talk to a moemesh cluster from the command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use moemesh_client::Client;
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};

/// Talk to a moemesh cluster.
#[derive(Parser)]
#[command(name = "moectl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one MoE layer on hidden states from a .npy file and writes the output as .npy.
    Forward(ForwardArgs),
}

#[derive(clap::Args)]
struct ForwardArgs {
    /// Router URL.
    #[arg(long, env = "MOEMESH_ROUTER", default_value = "http://127.0.0.1:50051")]
    router: String,
    /// Model id; empty selects the router's only model.
    #[arg(long, default_value = "")]
    model: String,
    /// Decoder layer index (an MoE layer of the model).
    #[arg(long)]
    layer: u32,
    /// Hidden states, a float32 .npy of shape [tokens, hidden_size].
    #[arg(long)]
    input: PathBuf,
    /// Where to write the layer's output, float32 .npy of the same shape.
    #[arg(long)]
    output: PathBuf,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Forward(args) => forward(args).await,
    }
}

async fn forward(args: ForwardArgs) -> anyhow::Result<()> {
    let input = read_matrix(&args.input)?;
    let mut client = Client::connect(&args.router).await?;
    let values = client
        .forward_f32(&args.model, args.layer, &input.values, input.columns)
        .await
        .with_context(|| format!("forward of layer {} through {}", args.layer, args.router))?;
    write_matrix(
        &args.output,
        &Matrix {
            rows: input.rows,
            columns: input.columns,
            values,
        },
    )?;
    eprintln!(
        "wrote {} tokens x {} to {}",
        input.rows,
        input.columns,
        args.output.display()
    );
    Ok(())
}
