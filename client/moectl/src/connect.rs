//! The connection options every command shares, given before or after the
//! subcommand, and [`Ctl`]: what a command runs with.

use std::io::IsTerminal;

use anyhow::Context;
use moemesh_client::{CoordinatorClient, TlsArgs, TlsConfig};
use moemesh_proto::identity::{Member, Role};

use crate::output::{OutputArg, OutputFormat};

/// Where the coordinators and the router are, and the token the
/// coordinators demand. Global: `moectl --coordinator URL cluster status`
/// and `moectl cluster status --coordinator URL` mean the same.
#[derive(clap::Args, Clone, Debug)]
pub struct ConnectionArgs {
    /// Coordinator URLs, comma-separated: any one will do; when it cannot
    /// be reached or has no leader, the next is asked.
    #[arg(
        long,
        global = true,
        env = "MOEMESH_COORDINATOR",
        value_name = "URL[,URL...]",
        default_value = "http://127.0.0.1:7000"
    )]
    pub coordinator: String,
    /// Router URL, for `moectl forward`.
    #[arg(
        long,
        global = true,
        env = "MOEMESH_ROUTER",
        value_name = "URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub router: String,
    /// The coordinators' admin token, when they were started with
    /// --admin-token.
    #[arg(
        long,
        global = true,
        env = "MOEMESH_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,
}

/// The URLs of a comma-separated `--coordinator` value.
fn coordinator_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .collect()
}

/// What every command runs with: the connection and security options and
/// the output format chosen before the subcommand.
pub struct Ctl {
    pub connection: ConnectionArgs,
    tls: TlsArgs,
    /// `--output` before the subcommand, or MOEMESH_OUTPUT, or table.
    output: OutputFormat,
    /// The hidden `--json` flag (older spelling of `--output json`).
    json: bool,
}

impl Ctl {
    pub fn new(connection: ConnectionArgs, tls: TlsArgs, output: OutputFormat, json: bool) -> Self {
        Self {
            connection,
            tls,
            output,
            json,
        }
    }

    /// The security of calls. In plaintext mode moectl calls as the
    /// operator `moectl`; with TLS its certificate says who it is (an
    /// operator's, to change placement). Checked only by commands that
    /// call, so `completions` and `placement plan` work whatever the
    /// environment holds.
    pub fn tls(&self) -> anyhow::Result<TlsConfig> {
        let operator = Member::new(Role::Operator, "moectl").expect("a valid member id");
        self.tls.config(operator)
    }

    /// Connects to the coordinators with the admin token; a failure names
    /// the flag that chooses the coordinator.
    pub async fn admin(&self) -> anyhow::Result<CoordinatorClient> {
        let urls = coordinator_list(&self.connection.coordinator);
        Ok(CoordinatorClient::connect(urls, self.tls()?)
            .await
            .context("set --coordinator or MOEMESH_COORDINATOR to any coordinator's URL")?
            .with_token(self.connection.token.clone().unwrap_or_default()))
    }

    /// The format a command prints in: `--json` wins, then `--output`
    /// after the subcommand, then the choice made before it.
    pub fn format(&self, command: &OutputArg) -> OutputFormat {
        if self.json {
            return OutputFormat::Json;
        }
        command.format.unwrap_or(self.output)
    }

    /// Whether a command prints JSON.
    pub fn is_json(&self, command: &OutputArg) -> bool {
        self.format(command) == OutputFormat::Json
    }

    /// Whether progress bars show: only for people, on a terminal's
    /// standard error, so that pipes and JSON stay clean.
    pub fn shows_progress(&self, command: &OutputArg) -> bool {
        !self.is_json(command) && std::io::stderr().is_terminal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_lists_skip_blanks() {
        assert_eq!(
            coordinator_list(" http://a:7000, ,http://b:7000,"),
            vec!["http://a:7000", "http://b:7000"]
        );
    }
}
