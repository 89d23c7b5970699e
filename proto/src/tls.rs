//! Mutual TLS for every connection of a moemesh process.
//!
//! A process is given one identity (certificate and key, PEM) and the CA
//! that signs every member of the cluster, as a [`TlsConfig`] that it hands
//! to each server it runs and each client it opens. With mutual TLS, servers
//! demand a client certificate signed by that CA, and every connection
//! presents its own certificate and verifies the peer's; peers are then
//! addressed with `https://` URLs. Kubernetes mounts the three files from a
//! secret. The default configuration is plaintext.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};

/// How a process secures its connections: plaintext (the default) or
/// mutual TLS with one identity and the cluster's CA. Cheap to clone.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// `None` for plaintext.
    mutual: Option<Arc<MutualTls>>,
}

/// The server and client halves of one identity.
struct MutualTls {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|error| format!("cannot read the {what} {}: {error}", path.display()))
}

impl TlsConfig {
    /// No TLS: `http://` URLs.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Mutual TLS from PEM files: this process's certificate, its private
    /// key, and the CA that signs every member of the cluster.
    pub fn from_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, String> {
        Ok(Self::from_pem(
            read(cert, "certificate")?,
            read(key, "private key")?,
            read(ca, "CA certificate")?,
        ))
    }

    /// Mutual TLS from PEM contents (see [`TlsConfig::from_files`]).
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Self {
        let identity = Identity::from_pem(cert, key);
        let ca = Certificate::from_pem(ca);
        let mutual = MutualTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(false),
            client: ClientTlsConfig::new().identity(identity).ca_certificate(ca),
        };
        Self {
            mutual: Some(Arc::new(mutual)),
        }
    }

    /// Whether connections are mutual TLS.
    pub fn is_mutual(&self) -> bool {
        self.mutual.is_some()
    }

    /// The URL scheme peers use: `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        if self.is_mutual() { "https" } else { "http" }
    }

    /// A server builder that demands client certificates when TLS is on.
    pub fn server(&self) -> Result<Server, tonic::transport::Error> {
        let builder = Server::builder();
        match &self.mutual {
            Some(mutual) => builder.tls_config(mutual.server.clone()),
            None => Ok(builder),
        }
    }

    /// An endpoint for `address` that presents this process's certificate
    /// and checks the peer's when TLS is on.
    pub fn endpoint(
        &self,
        address: impl Into<String>,
    ) -> Result<Endpoint, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(address.into())?;
        match &self.mutual {
            Some(mutual) => endpoint.tls_config(mutual.client.clone()),
            None => Ok(endpoint),
        }
    }

    /// Connects to `address` through [`TlsConfig::endpoint`].
    pub async fn connect(
        &self,
        address: impl Into<String>,
    ) -> Result<Channel, tonic::transport::Error> {
        self.endpoint(address)?.connect().await
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.is_mutual() {
            "mutual"
        } else {
            "plaintext"
        };
        formatter.debug_tuple("TlsConfig").field(&mode).finish()
    }
}
