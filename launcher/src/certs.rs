//! `moemesh certs`: a cluster CA and member certificates that say who each
//! member is.
//!
//! `certs init` makes the CA (`DIR/ca.pem`, `DIR/ca.key`); `certs issue`
//! writes `DIR/NAME.pem` and `DIR/NAME.key` signed by it. Every member
//! certificate names its holder with exactly one URI SAN,
//! `spiffe://moemesh/<role>/<id>`: servers read the caller's role and id
//! from the verified certificate, never from a field the caller fills in.
//! Member certificates serve both server and client authentication (every
//! member is both) and are valid for localhost, 127.0.0.1 and ::1 plus the
//! hosts given. Private keys are written with mode 0600, each file
//! atomically (a temporary file renamed into place).

use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Every member's URI SAN starts with this, followed by `<role>/<id>`.
pub const SPIFFE_PREFIX: &str = "spiffe://moemesh/";
/// Days a CA made by `certs init` (or `moemesh up --tls-dir`) is valid.
pub const CA_DAYS: u32 = 3650;
/// Days a member certificate is valid unless `--days` says otherwise.
pub const MEMBER_DAYS: u32 = 365;
/// The longest an id may be (bytes).
const MAX_ID_LEN: usize = 64;
/// Certificates start being valid a little before they are made, so that a
/// member whose clock runs slightly behind accepts them at once.
const CLOCK_SKEW: Duration = Duration::minutes(5);

#[derive(clap::Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    command: CertsCommand,
}

#[derive(clap::Subcommand)]
enum CertsCommand {
    /// Makes a cluster CA: DIR/ca.pem (give it to every member with
    /// --tls-ca) and DIR/ca.key (keep it secret; written with mode 0600).
    /// Refuses to replace an existing CA unless --force is given.
    Init(InitArgs),
    /// Issues a member certificate signed by DIR/ca.pem and DIR/ca.key:
    /// DIR/NAME.pem and DIR/NAME.key (mode 0600), naming the member as
    /// spiffe://moemesh/ROLE/NAME, valid for localhost, 127.0.0.1, ::1 and
    /// every --host, for both server and client authentication.
    Issue(IssueArgs),
}

#[derive(clap::Args)]
struct InitArgs {
    /// Directory to write ca.pem and ca.key to (created when missing).
    #[arg(long)]
    dir: PathBuf,
    /// Replace an existing CA. Certificates it signed stop being accepted
    /// by members given the new ca.pem.
    #[arg(long)]
    force: bool,
    /// Days the CA is valid.
    #[arg(long, default_value_t = CA_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

#[derive(clap::Args)]
struct IssueArgs {
    /// Directory holding ca.pem and ca.key (from `moemesh certs init`);
    /// NAME.pem and NAME.key are written there.
    #[arg(long)]
    dir: PathBuf,
    /// What the member is; servers allow each call only to some roles.
    #[arg(long, value_enum)]
    role: MemberRole,
    /// The member's id, 1 to 64 of A-Z a-z 0-9 . _ -: the expert node's
    /// --node-id, `coordinator-N` for the coordinator with raft id N, any
    /// name for the others. It also names the files.
    #[arg(long)]
    id: String,
    /// Another host name or IP address the member serves at (repeatable).
    #[arg(long = "host", value_name = "HOST")]
    hosts: Vec<String>,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = MEMBER_DAYS, value_parser = clap::value_parser!(u32).range(1..=36500))]
    days: u32,
}

/// The role a member certificate names; servers authorize calls by it.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberRole {
    /// A member of the Raft group that owns membership and placement.
    Coordinator,
    /// An expert node.
    Expert,
    /// A router.
    Router,
    /// A person or tool managing the cluster (moectl).
    Operator,
    /// An application sending forwards.
    Client,
}

impl MemberRole {
    /// The role as it appears in the URI SAN.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Coordinator => "coordinator",
            Self::Expert => "expert",
            Self::Router => "router",
            Self::Operator => "operator",
            Self::Client => "client",
        }
    }
}

/// The URI SAN naming `id` in `role`.
pub fn member_uri(role: MemberRole, id: &str) -> String {
    format!("{SPIFFE_PREFIX}{}/{id}", role.as_str())
}

/// Refuses ids servers could not parse back, and a coordinator id that is
/// not `coordinator-N` (N ≥ 1, its raft id), which servers compare with
/// the `from` of raft messages.
pub fn validate_member_id(role: MemberRole, id: &str) -> anyhow::Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if id.is_empty() || id.len() > MAX_ID_LEN || !id.chars().all(allowed) {
        bail!(
            "--id {id:?} is not a valid member id: use 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_' and '-'"
        );
    }
    if id == "ca" {
        bail!("--id \"ca\" would overwrite the CA's files ca.pem and ca.key: choose another id");
    }
    if role == MemberRole::Coordinator {
        let raft_id = id
            .strip_prefix("coordinator-")
            .and_then(|number| number.parse::<u64>().ok().map(|n| (n, number)));
        match raft_id {
            Some((n, number)) if n >= 1 && n.to_string() == number => {}
            _ => bail!(
                "--id {id:?} is not a coordinator id: coordinators are named coordinator-N after their raft id N (1, 2, ...), e.g. coordinator-1"
            ),
        }
    }
    Ok(())
}

/// The CA certificate of the cluster in `dir`.
pub fn ca_cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

/// The CA's private key in `dir`.
pub fn ca_key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

/// The certificate of member `id` in `dir`.
pub fn member_cert_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.pem"))
}

/// The private key of member `id` in `dir`.
pub fn member_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.key"))
}

pub fn run_certs(args: CertsArgs) -> anyhow::Result<()> {
    match args.command {
        CertsCommand::Init(init) => {
            init_ca(&init.dir, init.days, init.force)?;
            eprintln!(
                "wrote the cluster CA {} and its key {} (keep the key secret)",
                ca_cert_path(&init.dir).display(),
                ca_key_path(&init.dir).display()
            );
        }
        CertsCommand::Issue(issue) => {
            let member = Member {
                role: issue.role,
                id: &issue.id,
                hosts: &issue.hosts,
                days: issue.days,
            };
            issue_member(&issue.dir, &member)?;
            eprintln!(
                "wrote {} and {} for {}",
                member_cert_path(&issue.dir, &issue.id).display(),
                member_key_path(&issue.dir, &issue.id).display(),
                member_uri(issue.role, &issue.id)
            );
        }
    }
    Ok(())
}

/// Makes a CA in `dir`, valid for `days`; refuses to replace one unless `force`.
pub fn init_ca(dir: &Path, days: u32, force: bool) -> anyhow::Result<()> {
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    if !force {
        for existing in [&cert_path, &key_path] {
            if existing.exists() {
                bail!(
                    "{} already exists: refusing to replace the cluster CA (certificates it signed would stop being accepted); pass --force to replace it",
                    existing.display()
                );
            }
        }
    }
    create_private_dir(dir)?;
    let key = KeyPair::generate().context("cannot generate the CA key")?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name("moemesh cluster CA", None);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, days);
    let cert = params
        .self_signed(&key)
        .context("cannot sign the CA certificate")?;
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// What one member certificate says.
pub struct Member<'a> {
    pub role: MemberRole,
    pub id: &'a str,
    /// Host names and IP addresses beyond localhost, 127.0.0.1 and ::1.
    pub hosts: &'a [String],
    pub days: u32,
}

/// Writes `dir/ID.pem` and `dir/ID.key` for `member`, signed by the CA in `dir`.
pub fn issue_member(dir: &Path, member: &Member<'_>) -> anyhow::Result<()> {
    validate_member_id(member.role, member.id)?;
    let issuer = read_issuer(dir)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(member.id, Some(member.role.as_str()));
    params.subject_alt_names = subject_alt_names(member)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, member.days);
    let key = KeyPair::generate().context("cannot generate the member key")?;
    let cert = params
        .signed_by(&key, &issuer)
        .with_context(|| format!("cannot sign the certificate of {}", member.id))?;
    write_atomically(
        &member_key_path(dir, member.id),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomically(
        &member_cert_path(dir, member.id),
        cert.pem().as_bytes(),
        0o644,
    )
}

/// Makes a CA in `dir` unless one is there; returns whether it made one.
pub fn ensure_ca(dir: &Path) -> anyhow::Result<bool> {
    let (cert_exists, key_exists) = (ca_cert_path(dir).exists(), ca_key_path(dir).exists());
    match (cert_exists, key_exists) {
        (true, true) => Ok(false),
        (false, false) => init_ca(dir, CA_DAYS, false).map(|()| true),
        _ => bail!(
            "{} holds only one of ca.pem and ca.key: restore the other, or make a new CA with `moemesh certs init --dir {} --force`",
            dir.display(),
            dir.display()
        ),
    }
}

/// Issues `dir/ID.pem` for `id` in `role` unless a usable one is there
/// (signed by the CA in `dir`, naming this member, not expiring within a
/// day, matching its key); returns why it issued a new one, if it did.
pub fn ensure_member(dir: &Path, role: MemberRole, id: &str) -> anyhow::Result<Option<String>> {
    let reason = match reason_to_issue(dir, role, id) {
        Ok(None) => return Ok(None),
        Ok(Some(reason)) => reason,
        Err(error) => format!("{error:#}"),
    };
    let member = Member {
        role,
        id,
        hosts: &[],
        days: MEMBER_DAYS,
    };
    issue_member(dir, &member)?;
    Ok(Some(reason))
}

/// Why the certificate of `id` in `dir` cannot serve as `role`; None when it can.
fn reason_to_issue(dir: &Path, role: MemberRole, id: &str) -> anyhow::Result<Option<String>> {
    let (cert_path, key_path) = (member_cert_path(dir, id), member_key_path(dir, id));
    if !cert_path.exists() || !key_path.exists() {
        return Ok(Some("it did not exist".into()));
    }
    let ca_pem = fs::read(ca_cert_path(dir))?;
    let member_pem = fs::read(&cert_path)?;
    let key = KeyPair::from_pem(&fs::read_to_string(&key_path)?)?;
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(&ca_pem)?;
    let ca = ca_pem.parse_x509()?;
    let (_, member_pem) = x509_parser::pem::parse_x509_pem(&member_pem)?;
    let member = member_pem.parse_x509()?;
    let uris: Vec<&str> = member
        .subject_alternative_name()?
        .map(|names| {
            names
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let want = member_uri(role, id);
    Ok(if uris != [want.as_str()] {
        Some(format!("it names {uris:?}, not {want}"))
    } else if member.verify_signature(Some(ca.public_key())).is_err() {
        Some(format!("{} did not sign it", ca_cert_path(dir).display()))
    } else if member
        .validity()
        .time_to_expiration()
        .is_none_or(|left| left < Duration::days(1))
    {
        Some("it has expired or expires within a day".into())
    } else if member.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        Some(format!("{} is not its key", key_path.display()))
    } else {
        None
    })
}

/// The CA in `dir` as an issuer of member certificates.
fn read_issuer(dir: &Path) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let (cert_path, key_path) = (ca_cert_path(dir), ca_key_path(dir));
    let cert_pem = fs::read_to_string(&cert_path).with_context(|| {
        format!(
            "cannot read the CA certificate {} (make a CA with `moemesh certs init --dir {}`)",
            cert_path.display(),
            dir.display()
        )
    })?;
    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem)
        .with_context(|| format!("{} is not a PEM private key", key_path.display()))?;
    Issuer::from_ca_cert_pem(&cert_pem, key)
        .with_context(|| format!("{} is not a PEM CA certificate", cert_path.display()))
}

fn distinguished_name(common_name: &str, unit: Option<&str>) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "moemesh");
    if let Some(unit) = unit {
        name.push(DnType::OrganizationalUnitName, unit);
    }
    name.push(DnType::CommonName, common_name);
    name
}

/// localhost, 127.0.0.1, ::1, the hosts given, and the member's URI.
fn subject_alt_names(member: &Member<'_>) -> anyhow::Result<Vec<SanType>> {
    let mut names = vec![
        SanType::DnsName("localhost".try_into()?),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for host in member.hosts {
        let name = match host.parse::<IpAddr>() {
            Ok(address) => SanType::IpAddress(address),
            Err(_) if is_dns_name(host) => SanType::DnsName(host.as_str().try_into()?),
            Err(_) => bail!(
                "--host {host:?} is neither an IP address nor a DNS name (letters, digits, '-' and '.', labels of at most 63 characters, an optional leading '*.')"
            ),
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.push(SanType::URI(
        member_uri(member.role, member.id).as_str().try_into()?,
    ));
    Ok(names)
}

fn is_dns_name(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn set_validity(params: &mut CertificateParams, days: u32) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + Duration::days(i64::from(days));
}

/// Creates `dir` (mode 0700 when new), as a CA's key lives there.
fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))
}

/// Writes `contents` to `path` with `mode` through a temporary file in the
/// same directory, so a reader never sees half a key.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let write = || -> std::io::Result<()> {
        let mut file = tempfile::Builder::new()
            .prefix(".moemesh-")
            .tempfile_in(dir)?;
        file.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.as_file().sync_all()?;
        file.persist(path)?;
        Ok(())
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_checked_against_their_role() {
        assert!(validate_member_id(MemberRole::Expert, "expert-0").is_ok());
        assert!(validate_member_id(MemberRole::Operator, "alice.ops_1").is_ok());
        assert!(validate_member_id(MemberRole::Coordinator, "coordinator-12").is_ok());
        for (role, id) in [
            (MemberRole::Expert, ""),
            (MemberRole::Expert, "a/b"),
            (MemberRole::Expert, "ca"),
            (MemberRole::Client, &"x".repeat(65)),
            (MemberRole::Coordinator, "coordinator-0"),
            (MemberRole::Coordinator, "coordinator-01"),
            (MemberRole::Coordinator, "coordinator-"),
            (MemberRole::Coordinator, "leader"),
        ] {
            assert!(validate_member_id(role, id).is_err(), "{role:?} {id:?}");
        }
    }

    #[test]
    fn a_usable_member_certificate_is_kept_and_any_other_reissued() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        assert!(ensure_ca(dir).unwrap());
        assert!(!ensure_ca(dir).unwrap());
        let made = ensure_member(dir, MemberRole::Router, "router-0").unwrap();
        assert_eq!(made.as_deref(), Some("it did not exist"));
        let first = fs::read(member_cert_path(dir, "router-0")).unwrap();
        assert_eq!(
            ensure_member(dir, MemberRole::Router, "router-0").unwrap(),
            None
        );
        assert_eq!(fs::read(member_cert_path(dir, "router-0")).unwrap(), first);

        // Another identity under the same name.
        let reason = ensure_member(dir, MemberRole::Client, "router-0").unwrap();
        assert!(reason.unwrap().contains("spiffe://moemesh/client/router-0"));
        // A new CA did not sign the old certificate.
        init_ca(dir, CA_DAYS, true).unwrap();
        let reason = ensure_member(dir, MemberRole::Client, "router-0").unwrap();
        assert!(reason.unwrap().contains("did not sign it"));
        assert_eq!(
            ensure_member(dir, MemberRole::Client, "router-0").unwrap(),
            None
        );

        fs::remove_file(ca_key_path(dir)).unwrap();
        let error = ensure_ca(dir).unwrap_err().to_string();
        assert!(error.contains("only one of ca.pem and ca.key"), "{error}");
    }

    #[test]
    fn hosts_are_ip_addresses_or_dns_names() {
        for good in ["node1.example.com", "*.moemesh.svc", "a-b"] {
            assert!(is_dns_name(good), "{good}");
        }
        for bad in ["", "a..b", "-a", "a b", "a_b.com", "*."] {
            assert!(!is_dns_name(bad), "{bad}");
        }
    }
}
