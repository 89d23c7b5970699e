//! `moectl model`: registering models with the cluster.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_client::TlsConfig;
use serde_json::json;

use crate::connect::AdminArgs;
use crate::output::print_outcome;

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Registers a model from its checkpoint directory and places its experts on the ready nodes.
    Load(LoadArgs),
}

#[derive(clap::Args)]
pub struct LoadArgs {
    /// The checkpoint directory, as the coordinators and nodes see it.
    dir: PathBuf,
    /// Model id; defaults to the directory name.
    #[arg(long, default_value = "")]
    model: String,
    /// Replicas per expert.
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    #[command(flatten)]
    admin: AdminArgs,
}

pub async fn load(args: LoadArgs, tls: &TlsConfig) -> anyhow::Result<()> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("cannot find {}", args.dir.display()))?;
    // The coordinators apply a request id once; each invocation gets its own.
    let request_id = format!(
        "moectl-load-{}-{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let mut admin = args.admin.connect(tls).await?;
    let loaded = admin
        .load_model(
            &args.model,
            &dir.to_string_lossy(),
            args.replicas,
            &request_id,
        )
        .await?;
    print_outcome(
        args.admin.json,
        json!({"model": loaded.model, "replicas_added": loaded.replicas_added, "epoch": loaded.epoch}),
        || {
            format!(
                "model {} loaded: {} replicas placed, placement epoch {}",
                loaded.model, loaded.replicas_added, loaded.epoch
            )
        },
    );
    Ok(())
}
