//! `moectl model`: registering models with the cluster.

use std::path::PathBuf;

use anyhow::Context;
use moemesh_client::CoordinatorClient;
use serde_json::json;
use tokio::time::Instant;

use crate::connect::Ctl;
use crate::output::{OutputArg, print_outcome};
use crate::wait::{
    POLL_INTERVAL, Progress, WaitArgs, is_transient, not_ready_by_node, ready_count,
};

#[derive(clap::Subcommand)]
pub enum ModelCommand {
    /// Registers a model from its checkpoint directory and places its
    /// experts on the ready nodes. The nodes then load their replicas; with
    /// --wait moectl stays until every replica of the model serves, with a
    /// bar of replicas ready out of placed.
    Load(LoadArgs),
    /// Reports what moemesh makes of a checkpoint directory, with no
    /// cluster: the family and its routing, which layers are MoE (dense
    /// layers stay with the model), each layer's expert storage format and
    /// bytes per expert, and what moemesh does with it. Exits with an
    /// error when moemesh cannot serve the checkpoint, saying why.
    Inspect(crate::inspect::InspectArgs),
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
    wait: WaitArgs,
    #[command(flatten)]
    format: OutputArg,
}

pub async fn load(args: LoadArgs, ctl: &Ctl) -> anyhow::Result<()> {
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
    let mut admin = ctl.admin().await?;
    let loaded = admin
        .load_model(
            &args.model,
            &dir.to_string_lossy(),
            args.replicas,
            &request_id,
        )
        .await?;
    let mut outcome = json!({"model": loaded.model, "replicas_added": loaded.replicas_added, "epoch": loaded.epoch});
    let mut line = format!(
        "model {} loaded: {} replicas placed, placement epoch {}",
        loaded.model, loaded.replicas_added, loaded.epoch
    );
    if args.wait.wait {
        let visible = ctl.shows_progress(&args.format);
        let ready = wait_until_ready(&mut admin, &loaded.model, &args.wait, visible)
            .await
            .with_context(|| {
                format!(
                    "model {} is loaded ({} replicas placed) but not yet served",
                    loaded.model, loaded.replicas_added
                )
            })?;
        outcome["replicas_ready"] = ready.into();
        line += &format!("; all {ready} replicas ready");
    }
    print_outcome(ctl.is_json(&args.format), outcome, || line);
    Ok(())
}

/// Reads the placement of `model` until each of its replicas serves;
/// returns how many there are. Fails at the deadline, naming the nodes
/// still loading.
async fn wait_until_ready(
    admin: &mut CoordinatorClient,
    model: &str,
    wait: &WaitArgs,
    visible: bool,
) -> anyhow::Result<u64> {
    let deadline = wait.deadline();
    let progress = Progress::new(visible, format!("loading {model}"));
    let mut status: String;
    loop {
        match admin.show_placement(model, None).await {
            Ok(placement) => {
                let (ready, total) = ready_count(&placement);
                if total > 0 && ready == total {
                    return Ok(total);
                }
                status = if total == 0 {
                    "the placement holds no replica of it".to_string()
                } else {
                    format!(
                        "{ready} of {total} replicas serve; still loading on {}",
                        not_ready_by_node(&placement)
                    )
                };
                progress.set(ready, total, "replicas ready");
            }
            Err(error) if is_transient(&error) => status = format!("{error}"),
            Err(error) => return Err(error.into()),
        }
        if Instant::now() >= deadline {
            anyhow::bail!("after {} s (--timeout): {status}", wait.timeout);
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
