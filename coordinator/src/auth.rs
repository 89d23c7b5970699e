//! Operator authentication: the one place that decides whether a call may
//! use the operators' RPCs (status, placement, loading, moves, statistics,
//! rebalancing), and that lends this coordinator's token to the calls it
//! forwards to another coordinator.
//!
//! With a token set, such calls must carry `authorization: Bearer <token>`;
//! without one, every caller may. Expert nodes' and routers' own calls
//! (registration, heartbeats, reports, placement streams) need no token.

use tonic::{Request, Status};

/// The admin token operators' calls must present, if any.
#[derive(Clone)]
pub struct OperatorAuth {
    /// None: the operators' RPCs are open.
    admin_token: Option<String>,
}

impl OperatorAuth {
    pub fn new(admin_token: Option<String>) -> Self {
        Self { admin_token }
    }

    /// Refuses an operator's call without the admin token, when one is set.
    pub fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let Some(token) = &self.admin_token else {
            return Ok(());
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if presented
            .is_some_and(|presented| constant_time_eq(presented.as_bytes(), token.as_bytes()))
        {
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

/// Compares without an early exit, so the time taken says nothing of
/// where a wrong token differs.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        let auth = OperatorAuth::new(None);
        assert!(auth.authorize(&request_with(None)).is_ok());
        assert!(auth.authorize(&request_with(Some("Bearer x"))).is_ok());
    }

    #[test]
    fn with_a_token_only_the_bearer_of_it_passes() {
        let auth = OperatorAuth::new(Some("secret".into()));
        assert!(auth.authorize(&request_with(Some("Bearer secret"))).is_ok());
        for wrong in [None, Some("Bearer secreT"), Some("secret"), Some("Bearer ")] {
            let refused = auth.authorize(&request_with(wrong)).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{wrong:?}");
        }
    }

    #[test]
    fn forwarded_calls_carry_the_token_the_peer_checks() {
        let auth = OperatorAuth::new(Some("secret".into()));
        assert!(auth.authorize(&auth.request_to_peer(())).is_ok());
        let open = OperatorAuth::new(None);
        assert!(open.request_to_peer(()).metadata().is_empty());
    }
}
