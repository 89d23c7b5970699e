//! Mutual TLS for every connection of a moemesh process.
//!
//! A process is given one identity (certificate and key, PEM) and the CA
//! that signs every member of the cluster, as a [`TlsConfig`] that it hands
//! to each server it runs and each client it opens. With mutual TLS, servers
//! demand a client certificate signed by that CA, and every connection
//! presents its own certificate and verifies the peer's; peers are then
//! addressed with `https://` URLs. Kubernetes mounts the three files from a
//! secret. The default configuration is plaintext.
//!
//! It also says who calls: each member's certificate names it (see
//! [`crate::identity`]), and [`TlsConfig::caller`] reads that name from the
//! peer's certificate. In plaintext mode with a cluster secret, every call
//! carries the secret and the member the caller claims to be
//! ([`Credentials`] stamps them on each call of a [`MemberChannel`]); calls
//! without the secret come from no one. Plaintext without a secret
//! ([`TlsConfig::plaintext`], for tests in one process) trusts every caller.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Status};

use crate::end_of_stream::EndOfStreamChannel;
use crate::identity::Member;

/// The metadata key that carries the cluster secret in plaintext mode.
const SECRET_HEADER: &str = "x-moemesh-secret";
/// The metadata key that carries the member a plaintext caller claims to be.
const MEMBER_HEADER: &str = "x-moemesh-member";

/// A channel whose every call carries this process's [`Credentials`], and
/// whose requests end with their data ([`EndOfStreamChannel`]).
pub type MemberChannel = InterceptedService<EndOfStreamChannel, Credentials>;

/// How a process secures its connections: plaintext (the default) or
/// mutual TLS with one identity and the cluster's CA. Cheap to clone.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// `None` for plaintext.
    mutual: Option<Arc<MutualTls>>,
    /// Plaintext with a cluster secret: what each call carries.
    secret: Option<Arc<SharedSecret>>,
}

/// The server and client halves of one identity.
struct MutualTls {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
    /// The member this process's certificate names, or why it names none.
    own: Result<Member, String>,
}

/// Plaintext mode's proof of membership.
struct SharedSecret {
    secret: String,
    /// Who this process says it is.
    member: Member,
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

    /// Plaintext, with every call carrying `secret` and claiming to come
    /// from `member`; callers without the secret are no one.
    pub fn with_cluster_secret(secret: String, member: Member) -> Result<Self, String> {
        if secret.len() < 16 || AsciiMetadataValue::try_from(secret.as_str()).is_err() {
            return Err("the cluster secret must be at least 16 printable ASCII characters".into());
        }
        Ok(Self {
            mutual: None,
            secret: Some(Arc::new(SharedSecret { secret, member })),
        })
    }

    /// Mutual TLS from PEM contents (see [`TlsConfig::from_files`]).
    pub fn from_pem(cert: Vec<u8>, key: Vec<u8>, ca: Vec<u8>) -> Self {
        let own = own_member(&cert);
        let identity = Identity::from_pem(cert, key);
        let ca = Certificate::from_pem(ca);
        let mutual = MutualTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone())
                .client_auth_optional(false),
            client: ClientTlsConfig::new().identity(identity).ca_certificate(ca),
            own,
        };
        Self {
            mutual: Some(Arc::new(mutual)),
            secret: None,
        }
    }

    /// Whether connections are mutual TLS.
    pub fn is_mutual(&self) -> bool {
        self.mutual.is_some()
    }

    /// Whether callers prove who they are (a certificate or the cluster
    /// secret); plaintext without a secret trusts everyone.
    pub fn authenticates(&self) -> bool {
        self.mutual.is_some() || self.secret.is_some()
    }

    /// The member this process is: the one its certificate names, or the
    /// one it claims with the cluster secret. Fails when its certificate
    /// names none, or when callers are not authenticated.
    pub fn own_member(&self) -> Result<Member, String> {
        match (&self.mutual, &self.secret) {
            (Some(mutual), _) => mutual.own.clone(),
            (None, Some(secret)) => Ok(secret.member.clone()),
            (None, None) => Err("plaintext without a cluster secret names no member".into()),
        }
    }

    /// Refuses a certificate that names another member than `expected`, so
    /// a process started with the wrong files says so at once.
    pub fn check_own_member(&self, expected: &Member) -> Result<(), String> {
        let Some(mutual) = &self.mutual else {
            return Ok(());
        };
        match &mutual.own {
            Ok(own) if own == expected => Ok(()),
            Ok(own) => Err(format!(
                "this process is {expected} but its certificate names {own}"
            )),
            Err(why) => Err(format!("this process is {expected}, but {why}")),
        }
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
    ) -> Result<MemberChannel, tonic::transport::Error> {
        Ok(self.channel(self.endpoint(address)?.connect().await?))
    }

    /// `channel` with this process's credentials on every call.
    pub fn channel(&self, channel: Channel) -> MemberChannel {
        InterceptedService::new(EndOfStreamChannel::new(channel), self.credentials())
    }

    /// What each call of this process carries to prove who it is.
    pub fn credentials(&self) -> Credentials {
        let stamp = self.secret.as_ref().map(|secret| {
            let value = |text: &str| AsciiMetadataValue::try_from(text).expect("checked ASCII");
            (value(&secret.secret), value(&secret.member.uri()))
        });
        Credentials { stamp }
    }

    /// Who sent `request`: the member its certificate names (TLS), the
    /// member it claims along with the cluster secret (plaintext with a
    /// secret), or anyone (plaintext without a secret).
    pub fn caller<T>(&self, request: &Request<T>) -> Caller {
        if self.mutual.is_some() {
            let certificates = request.peer_certs();
            return match certificates.as_deref().and_then(|chain| chain.first()) {
                Some(certificate) => match Member::from_certificate(certificate) {
                    Ok(member) => Caller::Member(member),
                    Err(why) => Caller::Unknown(why),
                },
                None => Caller::Unknown("no client certificate".into()),
            };
        }
        match &self.secret {
            Some(secret) => claimed_member(request.metadata(), &secret.secret),
            None => Caller::Trusted,
        }
    }

    /// A server-side interceptor that refuses, before the message is even
    /// decoded, every call whose caller is not a member.
    pub fn members_only(&self) -> MembersOnly {
        MembersOnly { tls: self.clone() }
    }
}

/// The member a certificate in PEM names.
fn own_member(cert_pem: &[u8]) -> Result<Member, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem)
        .map_err(|error| format!("its certificate is not PEM: {error}"))?;
    Member::from_certificate(&pem.contents).map_err(|why| format!("its certificate: {why}"))
}

/// The member a plaintext call claims to be, if it carries the secret.
fn claimed_member(metadata: &MetadataMap, secret: &str) -> Caller {
    let text = |key| metadata.get(key).and_then(|value| value.to_str().ok());
    let Some(presented) = text(SECRET_HEADER) else {
        return Caller::Unknown("no cluster secret".into());
    };
    if !constant_time_eq(presented.as_bytes(), secret.as_bytes()) {
        return Caller::Unknown("a wrong cluster secret".into());
    }
    match text(MEMBER_HEADER).map(Member::from_uri) {
        Some(Ok(member)) => Caller::Member(member),
        Some(Err(why)) => Caller::Unknown(why),
        None => Caller::Unknown("the cluster secret but no member name".into()),
    }
}

/// Compares without an early exit, so the time taken says nothing of
/// where a wrong secret differs.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who made a call, as far as the server can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Plaintext without a cluster secret: every caller is trusted.
    Trusted,
    /// A member, proven by its certificate or the cluster secret.
    Member(Member),
    /// No proven member, and why.
    Unknown(String),
}

impl Caller {
    /// Allows the call when the caller is trusted, or a member that `rule`
    /// accepts; otherwise PERMISSION_DENIED, logged with the caller.
    /// `rule` says why it refuses a member.
    pub fn permit(
        &self,
        rpc: &str,
        rule: impl FnOnce(&Member) -> Result<(), String>,
    ) -> Result<(), Status> {
        let why = match self {
            Caller::Trusted => return Ok(()),
            Caller::Member(member) => match rule(member) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            },
            Caller::Unknown(why) => format!("the caller is not a member: {why}"),
        };
        tracing::warn!(rpc, caller = %self, reason = %why, "call refused");
        Err(Status::permission_denied(format!("{rpc} refused: {why}")))
    }

    /// Allows members of `roles` (and trusted callers).
    pub fn permit_roles(&self, rpc: &str, roles: &[crate::identity::Role]) -> Result<(), Status> {
        self.permit(rpc, |member| {
            if roles.contains(&member.role()) {
                Ok(())
            } else {
                let names: Vec<_> = roles.iter().map(|role| role.as_str()).collect();
                Err(format!(
                    "{member} may not call it (only {})",
                    names.join(", ")
                ))
            }
        })
    }

    /// Allows any member (and trusted callers).
    pub fn permit_members(&self, rpc: &str) -> Result<(), Status> {
        self.permit(rpc, |_| Ok(()))
    }

    /// The proven member, if any.
    pub fn member(&self) -> Option<&Member> {
        match self {
            Caller::Member(member) => Some(member),
            _ => None,
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Trusted => formatter.write_str("trusted"),
            Caller::Member(member) => write!(formatter, "{member}"),
            Caller::Unknown(why) => write!(formatter, "unknown ({why})"),
        }
    }
}

/// Stamps the cluster secret and this process's member name on each call
/// (plaintext mode; with TLS or without a secret it adds neither), and the
/// current span's W3C trace context when spans are exported.
#[derive(Clone)]
pub struct Credentials {
    stamp: Option<(AsciiMetadataValue, AsciiMetadataValue)>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some((secret, member)) = &self.stamp {
            let metadata = request.metadata_mut();
            metadata.insert(SECRET_HEADER, secret.clone());
            metadata.insert(MEMBER_HEADER, member.clone());
        }
        moemesh_telemetry::traces::inject(request.metadata_mut());
        Ok(request)
    }
}

/// Refuses calls from non-members before their messages are decoded.
#[derive(Clone)]
pub struct MembersOnly {
    tls: TlsConfig,
}

impl Interceptor for MembersOnly {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if let Caller::Unknown(why) = self.tls.caller(&request) {
            tracing::warn!(reason = %why, "call from a non-member refused");
            return Err(Status::permission_denied(format!(
                "refused: the caller is not a member: {why}"
            )));
        }
        Ok(request)
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match (&self.mutual, &self.secret) {
            (Some(_), _) => "mutual",
            (None, Some(_)) => "plaintext with a cluster secret",
            (None, None) => "plaintext",
        };
        formatter.debug_tuple("TlsConfig").field(&mode).finish()
    }
}
