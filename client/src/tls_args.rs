//! The mutual-TLS flags every moemesh binary takes.

use std::path::PathBuf;

use moemesh_proto::tls::TlsConfig;

/// `--tls-cert`, `--tls-key` and `--tls-ca` (or `MOEMESH_TLS_*`), flattened
/// into a binary's top-level arguments.
#[derive(clap::Args, Debug, Clone, Default)]
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
    /// Mutual TLS when all three files are given, plaintext when none is;
    /// refuses some without the others.
    pub fn config(&self) -> anyhow::Result<TlsConfig> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => Ok(TlsConfig::plaintext()),
            (Some(cert), Some(key), Some(ca)) => {
                TlsConfig::from_files(cert, key, ca).map_err(anyhow::Error::msg)
            }
            _ => anyhow::bail!("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca"),
        }
    }

    /// The same flags, for a child process that must use this process's TLS.
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
