//! `moectl forward`: one MoE layer through a router, from .npy to .npy.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_client::{Client, TlsConfig};

#[derive(clap::Args)]
pub struct ForwardArgs {
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

pub async fn forward(args: ForwardArgs, tls: &TlsConfig) -> anyhow::Result<()> {
    let input = read_matrix(&args.input)?;
    let mut client = Client::connect_with_tls(&args.router, tls).await?;
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
