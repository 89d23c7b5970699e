//! The security flags every moemesh binary takes: mutual TLS, or in
//! plaintext the cluster secret.

use std::path::PathBuf;

use moemesh_proto::identity::Member;
use moemesh_proto::tls::TlsConfig;

/// `--tls-cert`, `--tls-key`, `--tls-ca` and `--cluster-secret` (or
/// `MOEMESH_TLS_*`, `MOEMESH_CLUSTER_SECRET`), flattened into a binary's
/// top-level arguments.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This process's TLS certificate (PEM), naming it as a member
    /// (`moemesh certs issue`). With --tls-key and --tls-ca, every
    /// connection is mutual TLS: servers demand a client certificate
    /// signed by the CA, clients present theirs; peers are https:// URLs.
    #[arg(long, global = true, env = "MOEMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This process's TLS private key (PEM).
    #[arg(long, global = true, env = "MOEMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) that signs every member of the cluster.
    #[arg(long, global = true, env = "MOEMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Without TLS: the secret every cluster-internal call carries (16 or
    /// more characters); servers refuse calls without it. `moemesh up`
    /// makes one and prints it.
    #[arg(
        long,
        global = true,
        env = "MOEMESH_CLUSTER_SECRET",
        hide_env_values = true
    )]
    pub cluster_secret: Option<String>,
}

impl TlsArgs {
    /// Mutual TLS when all three files are given; plaintext, claiming to
    /// be `member` with the cluster secret when there is one, when none
    /// is. Refuses some TLS files without the others, and a secret beside
    /// TLS.
    pub fn config(&self, member: Member) -> anyhow::Result<TlsConfig> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => match &self.cluster_secret {
                None => Ok(TlsConfig::plaintext()),
                Some(secret) => TlsConfig::with_cluster_secret(secret.clone(), member)
                    .map_err(anyhow::Error::msg),
            },
            (Some(cert), Some(key), Some(ca)) => {
                if self.cluster_secret.is_some() {
                    anyhow::bail!(
                        "--cluster-secret is for plaintext mode; with TLS, certificates say who calls"
                    );
                }
                TlsConfig::from_files(cert, key, ca).map_err(anyhow::Error::msg)
            }
            _ => anyhow::bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }

    /// Whether these flags turn mutual TLS on.
    pub fn is_mutual(&self) -> bool {
        self.tls_cert.is_some() || self.tls_key.is_some() || self.tls_ca.is_some()
    }

    /// The TLS flags, for a child process that must use this process's
    /// TLS files. The cluster secret is not among them: it goes in the
    /// child's environment, where `ps` does not show it.
    pub fn to_args(&self) -> Vec<String> {
        let flags = [
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
            ("--tls-ca", &self.tls_ca),
        ];
        flags
            .into_iter()
            .filter_map(|(flag, path)| {
                Some([flag.to_string(), path.as_ref()?.display().to_string()])
            })
            .flatten()
            .collect()
    }
}
