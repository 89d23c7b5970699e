//! `moectl forward`: one MoE layer through a router, from .npy to .npy.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_client::Client;
use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use serde_json::json;

use crate::connect::Ctl;
use crate::output::OutputFormat;

/// The router comes from `--router` (MOEMESH_ROUTER), before or after the
/// subcommand. Here `--output` names the file to write; the output format
/// is chosen before the subcommand (`moectl --output json forward ...`).
#[derive(clap::Args)]
pub struct ForwardArgs {
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

pub async fn forward(args: ForwardArgs, ctl: &Ctl, format: OutputFormat) -> anyhow::Result<()> {
    let input = read_matrix(&args.input)?;
    let router = &ctl.connection.router;
    let mut client = Client::connect_with_tls(router, &ctl.tls()?).await?;
    let values = client
        .forward_f32(&args.model, args.layer, &input.values, input.columns)
        .await
        .with_context(|| format!("forward of layer {} through {router}", args.layer))?;
    write_matrix(
        &args.output,
        &Matrix {
            rows: input.rows,
            columns: input.columns,
            values,
        },
    )?;
    if format == OutputFormat::Json {
        let summary = json!({
        "router": router, "model": args.model, "layer": args.layer,
        "tokens": input.rows, "hidden_size": input.columns, "output": args.output,
        });
        println!("{summary}");
    } else {
        // Standard output stays free for scripts; the note is for people.
        eprintln!(
            "wrote {} tokens x {} to {}",
            input.rows,
            input.columns,
            args.output.display()
        );
    }
    Ok(())
}
