//! The mutual-TLS flags every moemesh binary takes.

use std::path::PathBuf;

/// `--tls-cert`, `--tls-key` and `--tls-ca` (or `MOEMESH_TLS_*`), flattened
/// into a binary's top-level arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct TlsArgs {
    /// This process's TLS certificate (PEM). With --tls-key and --tls-ca,
    /// every connection is mutual TLS: servers demand a client certificate
    /// signed by the CA, clients present theirs; peers are https:// URLs.
    #[arg(long, global = true, env = "MOEMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// This process's TLS private key (PEM).
    #[arg(long, global = true, env = "MOEMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificate (PEM) that signs every member of the cluster.
    #[arg(long, global = true, env = "MOEMESH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// Turns mutual TLS on for this process when all three files are
    /// given; refuses some without the others.
    pub fn install(&self) -> anyhow::Result<()> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(()),
            (Some(cert), Some(key), Some(ca)) => {
                moemesh_proto::tls::install(cert, key, ca).map_err(anyhow::Error::msg)
            }
            _ => anyhow::bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }
}
