//! moemesh-python: the native half of the `moemesh` Python package.
//!
//! - [`BlockingClient`]: a router's [`moemesh_client::Client`], or a
//!   one-hop [`moemesh_router_node::DirectClient`], with its own tokio
//!   runtime, so that callers without one (Python) forward with plain
//!   blocking calls.
//! - [`Security`]: how a Python client proves who it is, from its keyword
//!   arguments.
//! - [`grpc_code_and_message`]: the gRPC code name ("INVALID_ARGUMENT")
//!   and message each SDK error carries into a Python exception.
//! - `python` (cargo feature `python`, which maturin turns on): the PyO3
//!   module `moemesh._native`. Without the feature the crate builds and
//!   tests with no Python at all.

use std::path::PathBuf;

use moemesh_client::{ClientError, TlsConfig};
use moemesh_proto::identity::{Member, Role};

mod blocking;
#[cfg(feature = "python")]
mod python;

pub use blocking::{BlockingClient, OneHop};

/// How a Python client secures its connection: mutual TLS when all three
/// files are given, plaintext with the cluster secret when it is, and
/// bare plaintext (for clusters without a secret) otherwise.
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// The member id claimed, as `client/<client_id>`, beside the cluster
    /// secret; with TLS the certificate names the member instead.
    pub client_id: String,
    /// The secret `moemesh up` prints (MOEMESH_CLUSTER_SECRET).
    pub cluster_secret: Option<String>,
    /// The CA certificate (PEM) that signs every member of the cluster.
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), naming it as a member.
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    pub tls_key: Option<PathBuf>,
}

impl Security {
    /// The SDK's [`TlsConfig`]. Refuses some TLS files without the others,
    /// a cluster secret beside TLS, and a client id that is not a valid
    /// member id; the messages name the Python keyword arguments.
    pub fn tls_config(&self) -> Result<TlsConfig, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (None, None, None) => match &self.cluster_secret {
                None => Ok(TlsConfig::plaintext()),
                Some(secret) => {
                    let member = Member::new(Role::Client, self.client_id.clone())?;
                    TlsConfig::with_cluster_secret(secret.clone(), member)
                }
            },
            (Some(cert), Some(key), Some(ca)) => {
                if self.cluster_secret.is_some() {
                    return Err(
                        "cluster_secret is for plaintext; with TLS the certificate says who calls"
                            .into(),
                    );
                }
                TlsConfig::from_files(cert, key, ca)
            }
            _ => Err("mutual TLS needs all of tls_cert, tls_key and tls_ca".into()),
        }
    }
}

/// Expert ids, `[tokens, top_k]` row-major, as the wire carries them; a
/// negative id, or one past u32, is out of range for every model.
pub fn wire_expert_ids(expert_ids: &[i64], top_k: usize) -> Result<Vec<u32>, ClientError> {
    expert_ids
        .iter()
        .enumerate()
        .map(|(position, &id)| {
            u32::try_from(id).map_err(|_| {
                let token = position / top_k.max(1);
                ClientError::InvalidArgument(format!(
                    "token {token}: expert id {id} is out of range"
                ))
            })
        })
        .collect()
}

/// The gRPC code name of `error`, as gRPC spells it ("INVALID_ARGUMENT",
/// "UNAVAILABLE"), and its message without the code. A router that cannot
/// be reached is UNAVAILABLE, as gRPC clients report it; a reply that is
/// not a valid tensor is INTERNAL.
pub fn grpc_code_and_message(error: &ClientError) -> (String, String) {
    let (code, message) = match error {
        ClientError::Connect { .. } => ("UNAVAILABLE".to_string(), error.to_string()),
        ClientError::InvalidArgument(message) => ("INVALID_ARGUMENT".into(), message.clone()),
        ClientError::Overloaded(message) => ("RESOURCE_EXHAUSTED".into(), message.clone()),
        ClientError::Unavailable(message) => ("UNAVAILABLE".into(), message.clone()),
        ClientError::Refused(message) => ("FAILED_PRECONDITION".into(), message.clone()),
        ClientError::Other { code, message } => {
            (screaming_snake_case(&format!("{code:?}")), message.clone())
        }
        ClientError::BadReply(_) => ("INTERNAL".into(), error.to_string()),
    };
    (code, message)
}

/// `DeadlineExceeded` -> `DEADLINE_EXCEEDED`: tonic's code names as gRPC
/// writes them.
fn screaming_snake_case(camel_case: &str) -> String {
    let mut name = String::with_capacity(camel_case.len() + 4);
    for (index, character) in camel_case.chars().enumerate() {
        if character.is_ascii_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(character.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn code_of(status: tonic::Status) -> String {
        grpc_code_and_message(&ClientError::from(status)).0
    }

    #[test]
    fn every_status_keeps_its_grpc_code_name() {
        assert_eq!(
            code_of(tonic::Status::invalid_argument("x")),
            "INVALID_ARGUMENT"
        );
        assert_eq!(
            code_of(tonic::Status::resource_exhausted("x")),
            "RESOURCE_EXHAUSTED"
        );
        assert_eq!(code_of(tonic::Status::unavailable("x")), "UNAVAILABLE");
        assert_eq!(
            code_of(tonic::Status::failed_precondition("x")),
            "FAILED_PRECONDITION"
        );
        assert_eq!(
            code_of(tonic::Status::deadline_exceeded("x")),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(
            code_of(tonic::Status::permission_denied("x")),
            "PERMISSION_DENIED"
        );
        assert_eq!(
            code_of(tonic::Status::unauthenticated("x")),
            "UNAUTHENTICATED"
        );
        assert_eq!(code_of(tonic::Status::not_found("x")), "NOT_FOUND");
        assert_eq!(code_of(tonic::Status::data_loss("x")), "DATA_LOSS");
    }

    #[test]
    fn messages_leave_the_code_out() {
        let error = ClientError::from(tonic::Status::permission_denied("clients may not"));
        assert_eq!(grpc_code_and_message(&error).1, "clients may not");
    }

    #[test]
    fn expert_ids_outside_u32_are_invalid_arguments() {
        assert_eq!(
            wire_expert_ids(&[0, 7, 4_294_967_295], 3).unwrap(),
            [0, 7, u32::MAX]
        );
        for id in [-1, 4_294_967_296] {
            let error = wire_expert_ids(&[3, 4, 5, id], 2).unwrap_err();
            let (code, message) = grpc_code_and_message(&error);
            assert_eq!(code, "INVALID_ARGUMENT");
            assert!(
                message.contains(&format!("token 1: expert id {id} is out")),
                "{message}"
            );
        }
    }

    #[test]
    fn security_refuses_half_tls_and_a_secret_beside_tls() {
        let half = Security {
            tls_cert: Some("cert.pem".into()),
            ..Security::default()
        };
        assert!(half.tls_config().unwrap_err().contains("tls_key"));
        let both = Security {
            cluster_secret: Some("s".repeat(16)),
            tls_cert: Some("cert.pem".into()),
            tls_key: Some("key.pem".into()),
            tls_ca: Some("ca.pem".into()),
            ..Security::default()
        };
        assert!(both.tls_config().unwrap_err().contains("cluster_secret"));
    }

    #[test]
    fn a_cluster_secret_claims_the_client_member() {
        let security = Security {
            client_id: "notebook-1".into(),
            cluster_secret: Some("s".repeat(16)),
            ..Security::default()
        };
        let tls = security.tls_config().unwrap();
        assert_eq!(tls.own_member().unwrap().to_string(), "client/notebook-1");
        let bad_id = Security {
            client_id: "no spaces".into(),
            ..security
        };
        assert!(bad_id.tls_config().unwrap_err().contains("member id"));
    }

    #[test]
    fn an_unreachable_router_is_unavailable() {
        // Port 1 on the loopback refuses at once: nothing listens there.
        let result = BlockingClient::connect(
            "http://127.0.0.1:1",
            "",
            &TlsConfig::plaintext(),
            Duration::from_secs(30),
        );
        let error = result.err().expect("no router listens on port 1");
        assert_eq!(grpc_code_and_message(&error).0, "UNAVAILABLE");
    }
}
