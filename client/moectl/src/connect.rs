//! The coordinator flags every admin command takes, and connecting with them.

use anyhow::Context;
use moemesh_client::{CoordinatorClient, TlsConfig};

/// Where the coordinators are, the token they demand, and how to print.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// Coordinator URLs, comma-separated: any one will do; when it cannot
    /// be reached or has no leader, the next is asked.
    #[arg(
        long,
        env = "MOEMESH_COORDINATOR",
        default_value = "http://127.0.0.1:7000"
    )]
    pub coordinator: String,
    /// The coordinators' admin token, when they were started with one.
    #[arg(long, env = "MOEMESH_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The URLs of a comma-separated `--coordinator` value.
fn coordinator_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

impl AdminArgs {
    /// Connects to the coordinator with the admin token; a failure names
    /// the flag that chooses the coordinator.
    pub async fn connect(&self, tls: &TlsConfig) -> anyhow::Result<CoordinatorClient> {
        Ok(
            CoordinatorClient::connect(coordinator_list(&self.coordinator), tls.clone())
                .await
                .context("set --coordinator or MOEMESH_COORDINATOR to any coordinator's URL")?
                .with_token(self.token.clone().unwrap_or_default()),
        )
    }
}
