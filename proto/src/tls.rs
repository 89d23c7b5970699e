//! Mutual TLS for every connection of a moemesh process.
//!
//! A process is given one identity (certificate and key, PEM) and the CA
//! that signs every member of the cluster. Once [`install`]ed, every server
//! it runs demands a client certificate signed by that CA, and every
//! connection it opens presents its own certificate and verifies the
//! peer's. Peers are then addressed with `https://` URLs. Kubernetes
//! mounts the three files from a secret.

use std::path::Path;
use std::sync::OnceLock;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig};

struct Tls {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
}

static TLS: OnceLock<Tls> = OnceLock::new();

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path)
        .map_err(|error| format!("cannot read the {what} {}: {error}", path.display()))
}

/// Turns mutual TLS on for this process, from PEM files: its certificate,
/// its private key, and the CA that signs every member of the cluster.
pub fn install(cert: &Path, key: &Path, ca: &Path) -> Result<(), String> {
    install_pem(
        read(cert, "certificate")?,
        read(key, "private key")?,
        read(ca, "CA certificate")?,
    )
}

/// [`install`] from PEM contents.
pub fn install_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Result<(), String> {
    let identity = Identity::from_pem(cert, key);
    let ca = Certificate::from_pem(ca);
    let tls = Tls {
        server: ServerTlsConfig::new()
            .identity(identity.clone())
            .client_ca_root(ca.clone())
            .client_auth_optional(false),
        client: ClientTlsConfig::new().identity(identity).ca_certificate(ca),
    };
    TLS.set(tls)
        .map_err(|_| "TLS is already set up in this process".to_string())
}

/// Whether mutual TLS is on.
pub fn enabled() -> bool {
    TLS.get().is_some()
}

/// The URL scheme peers of this process use: `https` with TLS.
pub fn scheme() -> &'static str {
    if enabled() { "https" } else { "http" }
}

/// A server builder, with mutual TLS when it is on.
pub fn server() -> Result<Server, tonic::transport::Error> {
    let builder = Server::builder();
    match TLS.get() {
        Some(tls) => builder.tls_config(tls.server.clone()),
        None => Ok(builder),
    }
}

/// An endpoint for `address`, presenting this process's certificate and
/// checking the peer's when TLS is on.
pub fn endpoint(address: impl Into<String>) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(address.into())?;
    match TLS.get() {
        Some(tls) => endpoint.tls_config(tls.client.clone()),
        None => Ok(endpoint),
    }
}

/// Connects to `address` through [`endpoint`].
pub async fn connect(
    address: impl Into<String>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint(address)?.connect().await
}
