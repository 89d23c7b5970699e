//! `moemesh expert` and `moemesh router`: one node each.

use std::path::PathBuf;

use anyhow::{Context, bail};
use moemesh_core::checkpoint::Checkpoint;
use moemesh_core::placement::{Placement, PlacementFile};
use moemesh_expert_node::ExpertNodeConfig;
use moemesh_router_node::RouterConfig;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use crate::expert_spec::parse_expert_specs;

/// Printed on stdout, followed by the node's URL, once a node serves.
pub const READY_LINE_PREFIX: &str = "listening on ";

#[derive(clap::Args)]
pub struct ExpertArgs {
    /// Hugging Face model directory (config.json and safetensors weights).
    #[arg(long, env = "MOEMESH_MODEL")]
    model: PathBuf,
    /// Model id clients and routers use; defaults to the directory name.
    #[arg(long, env = "MOEMESH_MODEL_ID")]
    model_id: Option<String>,
    /// Address to serve on; port 0 picks a free port (printed once ready).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50061")]
    listen: String,
    /// Experts to hold, as LAYER:EXPERTS (repeatable): `1:0-3`, `1:0,5,shared`, `*:*` for all.
    #[arg(
        long = "experts",
        value_name = "LAYER:EXPERTS",
        conflicts_with = "placement"
    )]
    experts: Vec<String>,
    /// Take the experts from a placement file instead (with --node-id).
    #[arg(long, env = "MOEMESH_PLACEMENT", requires = "node_id")]
    placement: Option<PathBuf>,
    /// This node's id in the placement file.
    #[arg(long, env = "MOEMESH_NODE_ID")]
    node_id: Option<String>,
    /// Compute threads; 0 uses every core.
    #[arg(long, env = "MOEMESH_THREADS", default_value_t = 0)]
    threads: usize,
    /// Requests that may wait for compute before new ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "MOEMESH_QUEUE_CAPACITY", default_value_t = 64)]
    queue_capacity: usize,
    /// Exit when standard input closes (used by `moemesh up` for its children).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

#[derive(clap::Args)]
pub struct RouterArgs {
    /// Hugging Face model directory; the router reads only the gate weights.
    #[arg(long, env = "MOEMESH_MODEL")]
    model: PathBuf,
    /// Model id clients use; defaults to the placement file's model, then the directory name.
    #[arg(long, env = "MOEMESH_MODEL_ID")]
    model_id: Option<String>,
    /// Placement file: the expert nodes and which experts each holds.
    #[arg(long, env = "MOEMESH_PLACEMENT")]
    placement: PathBuf,
    /// Address to serve on; port 0 picks a free port (printed once ready).
    #[arg(long, env = "MOEMESH_LISTEN", default_value = "127.0.0.1:50051")]
    listen: String,
    /// Exit when standard input closes (used by `moemesh up` for its children).
    #[arg(long, hide = true)]
    exit_with_parent: bool,
}

/// The model id a node uses when none is given: the model directory's name.
pub fn default_model_id(model_dir: &std::path::Path) -> String {
    model_dir
        .canonicalize()
        .ok()
        .and_then(|path| {
            path.file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into())
}

/// Completes on Ctrl-C, SIGTERM, or (with `exit_with_parent`) when stdin closes.
pub async fn shutdown_signal(exit_with_parent: bool) {
    let parent_gone = async {
        if exit_with_parent {
            let mut stdin = tokio::io::stdin();
            let mut buffer = [0u8; 64];
            while matches!(stdin.read(&mut buffer).await, Ok(read) if read > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = parent_gone => {}
    }
}

async fn bind(listen: &str) -> anyhow::Result<(TcpListener, String)> {
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    Ok((listener, url))
}

pub async fn run_expert(args: ExpertArgs) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let config = checkpoint.config().clone();
    let experts = match (&args.placement, &args.node_id) {
        (Some(path), Some(node_id)) => {
            let placement = Placement::from_file(&PlacementFile::read(path)?, &config)?;
            let held = placement.experts_of(node_id);
            if held.is_empty() {
                bail!("node {node_id:?} holds no experts in {}", path.display());
            }
            held
        }
        _ if args.experts.is_empty() => bail!(
            "say which experts to hold: --experts LAYER:EXPERTS or --placement FILE --node-id ID"
        ),
        _ => parse_expert_specs(&args.experts, &config)?,
    };
    let model_id = args
        .model_id
        .clone()
        .unwrap_or_else(|| default_model_id(&args.model));
    let (listener, url) = bind(&args.listen).await?;
    let node_config = ExpertNodeConfig {
        model_dir: args.model.clone(),
        model_id,
        experts,
        threads: args.threads,
        queue_capacity: args.queue_capacity,
    };
    let service = moemesh_expert_node::load(node_config).await?;
    println!("{READY_LINE_PREFIX}{url}");
    tracing::info!(%url, "expert node serving");
    moemesh_expert_node::serve(service, listener, shutdown_signal(args.exit_with_parent)).await?;
    Ok(())
}

pub async fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let placement = PlacementFile::read(&args.placement)?;
    let model_id = args
        .model_id
        .clone()
        .or_else(|| placement.model.clone())
        .unwrap_or_else(|| default_model_id(&args.model));
    let (listener, url) = bind(&args.listen).await?;
    let config = RouterConfig {
        model_dir: args.model.clone(),
        model_id,
        placement,
    };
    let service = moemesh_router_node::load(config).await?;
    println!("{READY_LINE_PREFIX}{url}");
    tracing::info!(%url, "router serving");
    moemesh_router_node::serve(service, listener, shutdown_signal(args.exit_with_parent)).await?;
    Ok(())
}
