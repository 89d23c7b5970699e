//! How a sandbox secures its members: plaintext that trusts everyone,
//! plaintext with a cluster secret, or mutual TLS from a test CA that
//! issues each member a certificate naming it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use moemesh_proto::identity::{Member, Role};
use moemesh_proto::tls::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// The secret sandboxes use in plaintext mode with a cluster secret.
pub const TEST_CLUSTER_SECRET: &str = "sandbox-cluster-secret-0123456789";

/// One security setting for every member of a sandbox.
#[derive(Clone, Default)]
pub enum SandboxSecurity {
    /// Plaintext without a secret: every caller is trusted.
    #[default]
    Open,
    /// Plaintext; every member carries this secret.
    Secret(String),
    /// Mutual TLS; each member presents its own certificate from this CA.
    Tls(Arc<TestAuthority>),
}

impl SandboxSecurity {
    /// Plaintext with [`TEST_CLUSTER_SECRET`].
    pub fn secret() -> Self {
        Self::Secret(TEST_CLUSTER_SECRET.into())
    }

    /// Mutual TLS from a fresh CA.
    pub fn tls() -> Self {
        Self::Tls(Arc::new(TestAuthority::new()))
    }

    /// What `member` secures its connections with.
    pub fn for_member(&self, member: &Member) -> TlsConfig {
        match self {
            Self::Open => TlsConfig::plaintext(),
            Self::Secret(secret) => TlsConfig::with_cluster_secret(secret.clone(), member.clone())
                .expect("a valid secret"),
            Self::Tls(authority) => authority.config(Some(member)),
        }
    }

    /// What member `role`/`id` secures its connections with.
    pub fn for_role(&self, role: Role, id: &str) -> TlsConfig {
        self.for_member(&Member::new(role, id).expect("a valid member id"))
    }

    /// `https` with TLS, `http` without.
    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Tls(_) => "https",
            _ => "http",
        }
    }
}

/// A CA for tests that issues certificates for 127.0.0.1 and localhost.
pub struct TestAuthority {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Default for TestAuthority {
    fn default() -> Self {
        Self::new()
    }
}

impl TestAuthority {
    pub fn new() -> Self {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_pem = params.self_signed(&key).expect("CA certificate").pem();
        Self {
            ca_pem,
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A certificate (and its key), PEM, naming `member` (or no one).
    pub fn issue(&self, member: Option<&Member>) -> (String, String) {
        let key = KeyPair::generate().expect("member key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("member params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        if let Some(member) = member {
            let uri = member.uri().try_into().expect("an ASCII URI");
            params.subject_alt_names.push(SanType::URI(uri));
        }
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("member certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// Mutual TLS with a certificate naming `member` (or no one).
    pub fn config(&self, member: Option<&Member>) -> TlsConfig {
        let (cert, key) = self.issue(member);
        TlsConfig::from_pem(cert.into(), key.into(), self.ca_pem.clone().into())
    }
}
