//! Who may call what on a coordinator: the one place that decides, from
//! the caller's certificate (or, in plaintext mode, the cluster secret and
//! the member it claims) and the admin token, and that lends this
//! coordinator's token to the calls it forwards to another coordinator.
//!
//! - Operators' reads (status, placement, statistics): any member, or the
//!   bearer of the admin token.
//! - Operators' writes (loading, moves, draining, rebalancing): operators
//!   and coordinators (which forward them), or the bearer of the token.
//! - What expert nodes report (registration, heartbeats, ready replicas):
//!   only the expert node the request names, or a coordinator forwarding.
//! - What routers report (load, unreachable nodes): routers, or a
//!   coordinator forwarding.
//!
//! Where callers are not authenticated (plaintext without a cluster
//! secret, for tests in one process), operators' calls need the admin
//! token when one is set and everything else is open.

use moemesh_proto::identity::{Member, Role};
use moemesh_proto::tls::{Caller, TlsConfig, constant_time_eq};
use tonic::{Request, Status};

/// The admin token operators' calls may present, and how callers are known.
#[derive(Clone)]
pub struct OperatorAuth {
    /// None: no token opens the operators' RPCs.
    admin_token: Option<String>,
    /// Says who each caller is.
    tls: TlsConfig,
}

/// A coordinator forwarding a call it was given, on its caller's behalf:
/// it checked the caller itself.
fn is_coordinator(member: &Member) -> bool {
    member.role() == Role::Coordinator
}

impl OperatorAuth {
    pub fn new(admin_token: Option<String>, tls: TlsConfig) -> Self {
        Self { admin_token, tls }
    }

    /// Who made `request`.
    pub fn caller<T>(&self, request: &Request<T>) -> Caller {
        self.tls.caller(request)
    }

    /// Allows an operator's read: any member, or the admin token.
    pub fn authorize_read<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        if !self.tls.authenticates() || self.has_token(request) {
            return self.token_if_set(request);
        }
        self.caller(request).permit_members(rpc)
    }

    /// Allows an operator's write: an operator or a coordinator, or the
    /// admin token.
    pub fn authorize_write<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        if !self.tls.authenticates() || self.has_token(request) {
            return self.token_if_set(request);
        }
        self.caller(request)
            .permit_roles(rpc, &[Role::Operator, Role::Coordinator])
    }

    /// Allows a report about expert node `node` only from that node (or a
    /// coordinator forwarding it): no one else may speak for a node, so a
    /// node's id never moves to another identity.
    pub fn authorize_node<T>(
        &self,
        request: &Request<T>,
        rpc: &str,
        node: &str,
    ) -> Result<(), Status> {
        self.caller(request).permit(rpc, |member| {
            if is_coordinator(member) || (member.role() == Role::Expert && member.id() == node) {
                Ok(())
            } else {
                Err(format!("{member} may not speak for expert node {node:?}"))
            }
        })
    }

    /// Allows a router's report (or a coordinator forwarding one).
    pub fn authorize_router<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        self.caller(request)
            .permit_roles(rpc, &[Role::Router, Role::Coordinator])
    }

    /// Allows any member.
    pub fn authorize_member<T>(&self, request: &Request<T>, rpc: &str) -> Result<(), Status> {
        self.caller(request).permit_members(rpc)
    }

    /// Whether `request` carries the admin token.
    fn has_token<T>(&self, request: &Request<T>) -> bool {
        let Some(token) = &self.admin_token else {
            return false;
        };
        request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .is_some_and(|presented| constant_time_eq(presented.as_bytes(), token.as_bytes()))
    }

    /// Refuses a call without the admin token, when one is set.
    fn token_if_set<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.admin_token.is_none() || self.has_token(request) {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "this coordinator requires an admin token: moectl --token or MOEMESH_ADMIN_TOKEN",
            ))
        }
    }

    /// `message` as a request to another coordinator, carrying this
    /// coordinator's admin token (the group shares one).
    pub fn request_to_peer<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.admin_token
            && let Ok(value) = format!("Bearer {token}").parse()
        {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_with(authorization: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = authorization {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn without_a_token_every_call_passes() {
        let auth = OperatorAuth::new(None, TlsConfig::plaintext());
        assert!(auth.authorize_write(&request_with(None), "Test").is_ok());
        assert!(
            auth.authorize_write(&request_with(Some("Bearer x")), "Test")
                .is_ok()
        );
    }

    #[test]
    fn with_a_token_only_the_bearer_of_it_passes() {
        let auth = OperatorAuth::new(Some("secret".into()), TlsConfig::plaintext());
        assert!(
            auth.authorize_write(&request_with(Some("Bearer secret")), "Test")
                .is_ok()
        );
        for wrong in [None, Some("Bearer secreT"), Some("secret"), Some("Bearer ")] {
            let refused = auth
                .authorize_write(&request_with(wrong), "Test")
                .unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    fn member_request(secret: &str, member: &str) -> Request<()> {
        let mut request = Request::new(());
        let metadata = request.metadata_mut();
        metadata.insert("x-moemesh-secret", secret.parse().unwrap());
        metadata.insert("x-moemesh-member", member.parse().unwrap());
        request
    }

    #[test]
    fn with_a_cluster_secret_each_call_is_checked_by_role_and_id() {
        let secret = "0123456789abcdef0123";
        let tls = TlsConfig::with_cluster_secret(secret.into(), Member::coordinator(1)).unwrap();
        let auth = OperatorAuth::new(Some("token".into()), tls);
        let as_member = |uri: &str| member_request(secret, &format!("spiffe://moemesh/{uri}"));
        let denied = |result: Result<(), Status>| {
            result.is_err_and(|status| status.code() == tonic::Code::PermissionDenied)
        };
        // Reads: any member; writes: operators and coordinators, or the token.
        assert!(auth.authorize_read(&as_member("router/r"), "Read").is_ok());
        assert!(denied(
            auth.authorize_write(&as_member("router/r"), "Write")
        ));
        assert!(
            auth.authorize_write(&as_member("operator/o"), "Write")
                .is_ok()
        );
        assert!(
            auth.authorize_write(&request_with(Some("Bearer token")), "Write")
                .is_ok()
        );
        // A node speaks only for itself.
        let register = |uri| auth.authorize_node(&as_member(uri), "RegisterNode", "expert-0");
        assert!(register("expert/expert-0").is_ok());
        assert!(register("coordinator/coordinator-2").is_ok());
        assert!(denied(register("expert/expert-1")));
        assert!(denied(register("router/expert-0")));
        // Load reports only from routers.
        assert!(
            auth.authorize_router(&as_member("router/r"), "ReportLoad")
                .is_ok()
        );
        assert!(denied(
            auth.authorize_router(&as_member("expert/expert-0"), "ReportLoad")
        ));
        // Without the secret, or with a wrong one, no one is a member.
        let forged = member_request("wrong-secret-0123456789", "spiffe://moemesh/operator/o");
        assert!(denied(auth.authorize_write(&forged, "Write")));
        assert!(denied(auth.authorize_member(&Request::new(()), "Read")));
    }

    #[test]
    fn forwarded_calls_carry_the_token_the_peer_checks() {
        let auth = OperatorAuth::new(Some("secret".into()), TlsConfig::plaintext());
        assert!(
            auth.authorize_write(&auth.request_to_peer(()), "Test")
                .is_ok()
        );
        let open = OperatorAuth::new(None, TlsConfig::plaintext());
        assert!(open.request_to_peer(()).metadata().is_empty());
    }
}
