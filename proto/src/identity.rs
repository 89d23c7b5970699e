//! Who a cluster member is: its role and its id, as its certificate names
//! them with one SPIFFE-style URI SAN, `spiffe://moemesh/<role>/<id>`
//! (`moemesh certs issue` writes such certificates). In plaintext mode a
//! member claims the same URI in a header, next to the cluster secret.
//!
//! Servers authorize each call by the caller's [`Member`]: raft traffic only
//! from coordinators, registrations from the expert node they name, and so
//! on (see the services).

use std::fmt;
use std::str::FromStr;

/// The URI prefix every member identity starts with.
const URI_PREFIX: &str = "spiffe://moemesh/";
/// The longest member id.
const MAX_ID_LEN: usize = 64;

/// What a member does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// A member of the Raft group that owns membership and placement.
    Coordinator,
    /// An expert node: registers, heartbeats, serves Compute.
    Expert,
    /// A router: watches the placement, calls expert nodes, reports load.
    Router,
    /// A person (moectl) changing placement.
    Operator,
    /// A client of the routers (or, one hop, of the expert nodes).
    Client,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Coordinator,
        Role::Expert,
        Role::Router,
        Role::Operator,
        Role::Client,
    ];

    /// The lower-case name used in URIs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Coordinator => "coordinator",
            Role::Expert => "expert",
            Role::Router => "router",
            Role::Operator => "operator",
            Role::Client => "client",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == name)
            .ok_or_else(|| {
                format!("unknown role {name:?}: expected coordinator, expert, router, operator or client")
            })
    }
}

/// One member of the cluster: a role and an id unique within it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    role: Role,
    id: String,
}

impl Member {
    /// A member, if `id` is a valid id for `role`: 1 to 64 of
    /// `[A-Za-z0-9._-]`, and `coordinator-N` (N ≥ 1, its raft id) for a
    /// coordinator.
    pub fn new(role: Role, id: impl Into<String>) -> Result<Self, String> {
        let id = id.into();
        let valid_chars = id
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        if id.is_empty() || id.len() > MAX_ID_LEN || !valid_chars {
            return Err(format!(
                "member id {id:?} must be 1 to {MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -"
            ));
        }
        let member = Self { role, id };
        if role == Role::Coordinator && member.coordinator_raft_id().is_none() {
            return Err(format!(
                "a coordinator's id is coordinator-N with N its raft id (1 or more), not {:?}",
                member.id
            ));
        }
        Ok(member)
    }

    /// The coordinator whose raft id is `raft_id`.
    pub fn coordinator(raft_id: u64) -> Self {
        Self {
            role: Role::Coordinator,
            id: format!("coordinator-{raft_id}"),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// This member's raft id, when it is a coordinator.
    pub fn coordinator_raft_id(&self) -> Option<u64> {
        if self.role != Role::Coordinator {
            return None;
        }
        let digits = self.id.strip_prefix("coordinator-")?;
        if digits.starts_with('0') || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok().filter(|&id| id >= 1)
    }

    /// `spiffe://moemesh/<role>/<id>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.id)
    }

    /// Reads a member from its URI.
    pub fn from_uri(uri: &str) -> Result<Self, String> {
        let rest = uri.strip_prefix(URI_PREFIX).ok_or_else(|| {
            format!("{uri:?} is not a moemesh identity ({URI_PREFIX}<role>/<id>)")
        })?;
        let (role, id) = rest
            .split_once('/')
            .ok_or_else(|| format!("{uri:?} names no id ({URI_PREFIX}<role>/<id>)"))?;
        Self::new(role.parse()?, id)
    }

    /// The member a certificate (DER) names: its one `spiffe://moemesh/`
    /// URI SAN. A certificate without one, or with two, names no member.
    pub fn from_certificate(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, certificate) = x509_parser::parse_x509_certificate(der)
            .map_err(|error| format!("unreadable certificate: {error}"))?;
        let names = certificate
            .subject_alternative_name()
            .map_err(|error| format!("unreadable subject alternative names: {error}"))?;
        let mut uris = names
            .into_iter()
            .flat_map(|names| &names.value.general_names);
        let members: Vec<&str> = uris
            .by_ref()
            .filter_map(|name| match name {
                GeneralName::URI(uri) if uri.starts_with(URI_PREFIX) => Some(*uri),
                _ => None,
            })
            .collect();
        match members.as_slice() {
            [uri] => Self::from_uri(uri),
            [] => Err(format!(
                "the certificate names no moemesh member (a URI SAN {URI_PREFIX}<role>/<id>; \
                 `moemesh certs issue` makes one)"
            )),
            _ => Err(format!(
                "the certificate names several members: {members:?}"
            )),
        }
    }
}

impl fmt::Display for Member {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}/{}", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip_and_bad_ones_are_refused() {
        for member in [
            Member::new(Role::Expert, "expert-0").unwrap(),
            Member::coordinator(3),
            Member::new(Role::Operator, "alice.ops_1").unwrap(),
        ] {
            assert_eq!(Member::from_uri(&member.uri()).unwrap(), member);
        }
        assert_eq!(
            Member::from_uri("spiffe://moemesh/router/r-1")
                .unwrap()
                .role(),
            Role::Router
        );
        for bad in [
            "spiffe://other/expert/e",
            "spiffe://moemesh/expert",
            "spiffe://moemesh/expert/",
            "spiffe://moemesh/king/e",
            "spiffe://moemesh/expert/a/b",
            "spiffe://moemesh/coordinator/1",
            "spiffe://moemesh/coordinator/coordinator-0",
            "spiffe://moemesh/coordinator/coordinator-01",
            "spiffe://moemesh/coordinator/coordinator-99999999999999999999999",
        ] {
            assert!(Member::from_uri(bad).is_err(), "{bad}");
        }
        assert!(Member::new(Role::Client, "x".repeat(65)).is_err());
    }

    #[test]
    fn only_coordinators_have_raft_ids() {
        assert_eq!(Member::coordinator(12).coordinator_raft_id(), Some(12));
        let expert = Member::new(Role::Expert, "coordinator-1").unwrap();
        assert_eq!(expert.coordinator_raft_id(), None);
    }

    fn certificate_with(uris: &[&str]) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        for uri in uris {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.to_string().try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_names_its_one_member() {
        let der = certificate_with(&["https://example.com", "spiffe://moemesh/expert/expert-7"]);
        let member = Member::from_certificate(&der).unwrap();
        assert_eq!((member.role(), member.id()), (Role::Expert, "expert-7"));
        assert!(Member::from_certificate(&certificate_with(&[])).is_err());
        let two = certificate_with(&["spiffe://moemesh/expert/a", "spiffe://moemesh/router/b"]);
        assert!(Member::from_certificate(&two).is_err());
        assert!(Member::from_certificate(b"not a certificate").is_err());
    }
}
