//! How the processes of a local cluster prove who they are.
//!
//! Three ways: every process with this process's TLS flags (none:
//! plaintext); every process with its own certificate from a CA directory
//! (`moemesh up --tls-dir`), which names its role and id so servers can
//! authorize each call; and, in plaintext, a cluster secret that every
//! internal call carries. The secret reaches the children in the
//! environment, never on the command line, so it does not show in `ps`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use moemesh_client::{TlsArgs, TlsConfig};
use moemesh_proto::identity::{Member, Role};
use rand::RngCore;

use crate::certs::{self, MemberRole};

/// The environment variable servers and clients read the cluster secret from.
pub const CLUSTER_SECRET_ENV: &str = "MOEMESH_CLUSTER_SECRET";

/// Where each process's TLS identity comes from.
enum MemberTls {
    /// Every process uses the same flags as this one (none: plaintext).
    Shared(TlsArgs),
    /// Each process has its own certificate in this directory (absolute).
    PerMember(PathBuf),
}

/// The security of one local cluster: TLS identities and, in plaintext,
/// the cluster secret.
pub struct ClusterSecurity {
    tls: MemberTls,
    /// The secret of a plaintext cluster; None with TLS.
    cluster_secret: Option<String>,
}

/// The flags and environment that secure one process.
pub struct MemberSecurity {
    /// Global TLS flags, placed before the role.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Variables of this process's environment the child must not
    /// inherit: a cluster secret beside TLS makes a process refuse to start.
    pub env_remove: Vec<String>,
}

/// The id of the certificate `moemesh up` itself and moectl use.
pub const OPERATOR_ID: &str = "operator";

impl ClusterSecurity {
    /// With `tls_dir`, each process gets its own certificate from the CA
    /// there (made when missing); otherwise every process uses `tls`.
    /// Without TLS, the cluster secret is `tls`'s (`--cluster-secret`,
    /// `MOEMESH_CLUSTER_SECRET`) or a new random one.
    pub fn prepare(tls: &TlsArgs, tls_dir: Option<&Path>) -> anyhow::Result<Self> {
        if let Some(dir) = tls_dir {
            if tls.is_mutual() || tls.cluster_secret.is_some() {
                eprintln!(
                    "moemesh up: ignoring --tls-cert, --tls-key, --tls-ca and --cluster-secret: --tls-dir gives every process its own certificate"
                );
            }
            return Ok(Self {
                tls: MemberTls::PerMember(prepare_ca_dir(dir)?),
                cluster_secret: None,
            });
        }
        if tls.is_mutual() {
            anyhow::bail!(
                "one certificate cannot name every process of a local cluster: give moemesh up \
                 --tls-dir DIR instead of --tls-cert, --tls-key and --tls-ca, and it makes a CA \
                 and a certificate per process there"
            );
        }
        let cluster_secret = (!tls.is_mutual()).then(|| {
            tls.cluster_secret
                .clone()
                .filter(|secret| !secret.is_empty())
                .unwrap_or_else(random_secret)
        });
        let shared = TlsArgs {
            cluster_secret: cluster_secret.clone(),
            ..tls.clone()
        };
        // Refuse unusable flags here, not in every child.
        shared.config(operator())?;
        Ok(Self {
            tls: MemberTls::Shared(shared),
            cluster_secret,
        })
    }

    /// The flags and environment for member `id` in `role`; issues its
    /// certificate first when it has none.
    pub fn member(&self, role: MemberRole, id: &str) -> anyhow::Result<MemberSecurity> {
        let args = match &self.tls {
            MemberTls::Shared(tls) => tls.to_args(),
            MemberTls::PerMember(dir) => member_tls_args(dir, role, id)?.to_args(),
        };
        let (env, env_remove) = match &self.cluster_secret {
            Some(secret) => (
                vec![(CLUSTER_SECRET_ENV.to_string(), secret.clone())],
                vec![],
            ),
            None => (vec![], vec![CLUSTER_SECRET_ENV.to_string()]),
        };
        Ok(MemberSecurity {
            args,
            env,
            env_remove,
        })
    }

    /// How this process connects to the cluster, as the operator: with the
    /// operator's certificate under `--tls-dir`, with its own TLS flags or
    /// the cluster secret otherwise.
    pub fn client_tls(&self) -> anyhow::Result<TlsConfig> {
        match &self.tls {
            MemberTls::Shared(tls) => tls.config(operator()),
            MemberTls::PerMember(dir) => {
                member_tls_args(dir, MemberRole::Operator, OPERATOR_ID)?.config(operator())
            }
        }
    }

    /// How an application (member of role client, id `id`) connects:
    /// a one-hop client's credentials, which expert nodes accept for
    /// `Compute`.
    pub fn application_tls(&self, id: &str) -> anyhow::Result<TlsConfig> {
        self.member_tls(MemberRole::Client, id)
    }

    /// How a process of this machine connects as member `id` in `role`:
    /// for tools that stand in for expert nodes or routers.
    pub fn member_tls(&self, role: MemberRole, id: &str) -> anyhow::Result<TlsConfig> {
        let identity_role = match role {
            MemberRole::Coordinator => Role::Coordinator,
            MemberRole::Expert => Role::Expert,
            MemberRole::Router => Role::Router,
            MemberRole::Operator => Role::Operator,
            MemberRole::Client => Role::Client,
        };
        let member = Member::new(identity_role, id).map_err(anyhow::Error::msg)?;
        match &self.tls {
            MemberTls::Shared(tls) => tls.config(member),
            MemberTls::PerMember(dir) => member_tls_args(dir, role, id)?.config(member),
        }
    }

    /// The URL scheme of the cluster's servers.
    pub fn scheme(&self) -> &'static str {
        let mutual = match &self.tls {
            MemberTls::Shared(tls) => tls.is_mutual(),
            MemberTls::PerMember(_) => true,
        };
        if mutual { "https" } else { "http" }
    }

    /// `export` lines that point moectl in another shell at this cluster.
    pub fn moectl_environment(&self) -> Vec<(String, String)> {
        let mut variables = Vec::new();
        if let Some(secret) = &self.cluster_secret {
            variables.push((CLUSTER_SECRET_ENV.to_string(), secret.clone()));
        }
        if let MemberTls::PerMember(dir) = &self.tls {
            let operator = [
                (
                    "MOEMESH_TLS_CERT",
                    certs::member_cert_path(dir, OPERATOR_ID),
                ),
                ("MOEMESH_TLS_KEY", certs::member_key_path(dir, OPERATOR_ID)),
                ("MOEMESH_TLS_CA", certs::ca_cert_path(dir)),
            ];
            for (name, path) in operator {
                variables.push((name.to_string(), path.display().to_string()));
            }
        }
        variables
    }
}

/// Makes `dir` and its CA when missing, and the operator's certificate;
/// returns `dir` made absolute, so the printed paths work from anywhere.
fn prepare_ca_dir(dir: &Path) -> anyhow::Result<PathBuf> {
    if certs::ensure_ca(dir)? {
        eprintln!(
            "moemesh up: made the cluster CA {}",
            certs::ca_cert_path(dir).display()
        );
    }
    let dir = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve --tls-dir {}", dir.display()))?;
    member_tls_args(&dir, MemberRole::Operator, OPERATOR_ID)?;
    Ok(dir)
}

/// The TLS flags of member `id`, issuing its certificate when needed.
fn member_tls_args(dir: &Path, role: MemberRole, id: &str) -> anyhow::Result<TlsArgs> {
    if let Some(reason) = certs::ensure_member(dir, role, id)? {
        let path = certs::member_cert_path(dir, id);
        eprintln!(
            "moemesh up: issued {} for {} ({reason})",
            path.display(),
            certs::member_uri(role, id)
        );
    }
    Ok(TlsArgs {
        tls_cert: Some(certs::member_cert_path(dir, id)),
        tls_key: Some(certs::member_key_path(dir, id)),
        tls_ca: Some(certs::ca_cert_path(dir)),
        ..TlsArgs::default()
    })
}

/// The member this process is to the cluster.
fn operator() -> Member {
    Member::new(Role::Operator, OPERATOR_ID).expect("a valid operator id")
}

/// 32 random bytes, hex.
fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
