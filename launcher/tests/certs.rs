//! `moemesh certs` and `moemesh up --tls-dir` as users run them: a cluster
//! CA, member certificates that name their role and id, and a local
//! cluster on mutual TLS made from them.

mod up_process;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use moemesh_client::{Client, CoordinatorClient, TlsConfig};
use moemesh_proto::NodeStatus;
use moemesh_tests::{Fixture, relative_l2};
use up_process::{MOEMESH, UpProcess};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

fn moemesh(args: &[&str]) -> Output {
    Command::new(MOEMESH)
        .args(args)
        .output()
        .expect("moemesh runs")
}

fn succeeds(args: &[&str]) {
    let output = moemesh(args);
    assert!(
        output.status.success(),
        "moemesh {args:?} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Exits with a failure and says `expected` on stderr.
fn fails_saying(args: &[&str], expected: &[&str]) {
    let output = moemesh(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "moemesh {args:?} succeeded");
    assert_ne!(output.status.code(), Some(0));
    for needle in expected {
        assert!(
            stderr.contains(needle),
            "{args:?}: no {needle:?} in\n{stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn pem_der(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&bytes).expect("a PEM certificate");
    pem.contents
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).expect("an X.509 certificate");
    assert!(rest.is_empty());
    cert
}

fn alt_names<'a>(cert: &'a X509Certificate<'_>) -> Vec<GeneralName<'a>> {
    cert.subject_alternative_name()
        .unwrap()
        .expect("a subjectAltName")
        .value
        .general_names
        .clone()
}

fn uris(cert: &X509Certificate<'_>) -> Vec<String> {
    alt_names(cert)
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .collect()
}

/// Checks that `dir/id.pem` is signed by `dir/ca.pem` and names `uri`.
fn assert_member(dir: &Path, id: &str, uri: &str) {
    let ca_der = pem_der(&dir.join("ca.pem"));
    let ca = parse(&ca_der);
    let member_der = pem_der(&dir.join(format!("{id}.pem")));
    let member = parse(&member_der);
    assert_eq!(member.issuer(), ca.subject());
    member
        .verify_signature(Some(ca.public_key()))
        .expect("the CA signed the member certificate");
    assert_eq!(uris(&member), [uri]);
    // The servers read the same member from it.
    let named = moemesh_proto::identity::Member::from_certificate(&member_der).unwrap();
    assert_eq!(named.uri(), uri);
    assert_eq!(mode(&dir.join(format!("{id}.key"))), 0o600);
}

#[test]
fn certs_init_and_issue_make_a_ca_and_members_that_chain_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let ca_dir_arg = ca_dir.to_str().unwrap();
    succeeds(&["certs", "init", "--dir", ca_dir_arg]);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    let ca_der = pem_der(&ca_dir.join("ca.pem"));
    let ca = parse(&ca_der);
    assert!(ca.is_ca());
    ca.verify_signature(None).expect("the CA signs itself");
    let ca_years = (ca.validity().not_after - ca.validity().not_before).unwrap();
    assert!(ca_years.whole_days() >= 3650, "{ca_years}");

    succeeds(&[
        "certs",
        "issue",
        "--dir",
        ca_dir_arg,
        "--role",
        "expert",
        "--id",
        "expert-0",
        "--host",
        "node1.example.com",
        "--host",
        "10.0.0.5",
    ]);
    assert_member(&ca_dir, "expert-0", "spiffe://moemesh/expert/expert-0");
    let member_der = pem_der(&ca_dir.join("expert-0.pem"));
    let member = parse(&member_der);
    assert!(!member.is_ca());
    let names = alt_names(&member);
    for expected in [
        GeneralName::DNSName("localhost"),
        GeneralName::DNSName("node1.example.com"),
        GeneralName::IPAddress(&[127, 0, 0, 1]),
        GeneralName::IPAddress(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
        GeneralName::IPAddress(&[10, 0, 0, 5]),
    ] {
        assert!(names.contains(&expected), "{expected:?} not in {names:?}");
    }
    let usage = member
        .extended_key_usage()
        .unwrap()
        .expect("an extended key usage");
    assert!(usage.value.server_auth && usage.value.client_auth);
    let days = (member.validity().not_after - member.validity().not_before).unwrap();
    assert!((365..=366).contains(&days.whole_days()), "{days}");

    succeeds(&[
        "certs",
        "issue",
        "--dir",
        ca_dir_arg,
        "--role",
        "coordinator",
        "--id",
        "coordinator-2",
        "--days",
        "30",
    ]);
    assert_member(
        &ca_dir,
        "coordinator-2",
        "spiffe://moemesh/coordinator/coordinator-2",
    );
}

#[test]
fn certs_init_refuses_to_replace_a_ca_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    succeeds(&["certs", "init", "--dir", dir_arg]);
    let first = std::fs::read(dir.path().join("ca.pem")).unwrap();
    fails_saying(
        &["certs", "init", "--dir", dir_arg],
        &["ca.pem already exists", "--force"],
    );
    assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), first);
    succeeds(&["certs", "init", "--dir", dir_arg, "--force"]);
    assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), first);
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
}

#[test]
fn certs_issue_refuses_bad_roles_and_ids_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    fails_saying(
        &[
            "certs", "issue", "--dir", dir_arg, "--role", "expert", "--id", "expert-0",
        ],
        &["ca.pem", "moemesh certs init"],
    );
    succeeds(&["certs", "init", "--dir", dir_arg]);
    let issue = |role: &'static str, id: &'static str| {
        [
            "certs", "issue", "--dir", dir_arg, "--role", role, "--id", id,
        ]
    };
    fails_saying(
        &issue("admin", "x"),
        &["admin", "coordinator, expert, router, operator, client"],
    );
    fails_saying(&issue("expert", "a/b"), &["\"a/b\"", "1 to 64", "A-Z"]);
    fails_saying(&issue("client", ""), &["1 to 64"]);
    let long = "x".repeat(65);
    let long_id = [
        "certs", "issue", "--dir", dir_arg, "--role", "client", "--id", &long,
    ];
    fails_saying(&long_id, &["1 to 64"]);
    fails_saying(&issue("operator", "ca"), &["ca.pem and ca.key"]);
    fails_saying(
        &issue("coordinator", "leader"),
        &["\"leader\"", "coordinator-N"],
    );
    fails_saying(&issue("coordinator", "coordinator-0"), &["coordinator-N"]);
    let bad_host = [
        "certs", "issue", "--dir", dir_arg, "--role", "router", "--id", "r", "--host", "a b",
    ];
    fails_saying(&bad_host, &["--host \"a b\""]);
    let written: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut written = written;
    written.sort();
    assert_eq!(written, ["ca.key", "ca.pem"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_a_tls_dir_serves_mutual_tls_with_a_certificate_per_member() {
    let fixture = Fixture::open("mixtral");
    let dir = tempfile::tempdir().unwrap();
    let tls_dir = dir.path().join("tls");
    let mut up = UpProcess::start(
        &[
            "up",
            "--model",
            fixture.dir.to_str().unwrap(),
            "--tls-dir",
            tls_dir.to_str().unwrap(),
            "--router-addr",
            "127.0.0.1:0",
            "--expert-nodes",
            "2",
            "--threads-per-node",
            "1",
        ],
        "MOEMESH_TLS_CA",
    );
    assert_eq!(up.coordinators.len(), 3);
    let mut urls = up.coordinators.clone();
    urls.push(up.router.clone());
    urls.extend(up.experts.iter().map(|(_, url)| url.clone()));
    assert!(
        urls.iter().all(|url| url.starts_with("https://")),
        "{urls:?}"
    );
    // A certificate per process, naming its role and id.
    for (role, id) in [
        ("coordinator", "coordinator-1"),
        ("coordinator", "coordinator-2"),
        ("coordinator", "coordinator-3"),
        ("expert", "expert-0"),
        ("expert", "expert-1"),
        ("router", "router-0"),
        ("operator", "operator"),
    ] {
        assert_member(&tls_dir, id, &format!("spiffe://moemesh/{role}/{id}"));
    }
    for member in up.members() {
        let flag = member
            .cmdline
            .iter()
            .position(|arg| arg == "--tls-cert")
            .unwrap();
        assert!(
            member.cmdline[flag + 1].ends_with(&format!("{}.pem", member.id)),
            "{member:?}"
        );
    }
    // moectl's environment names the operator's files.
    let tls_dir = tls_dir.canonicalize().unwrap();
    let exports = up.exports.clone();
    let exported = |name: &str| exports.get(name).cloned().unwrap_or_default();
    assert_eq!(
        exported("MOEMESH_TLS_CERT"),
        tls_dir.join("operator.pem").to_str().unwrap()
    );
    assert_eq!(
        exported("MOEMESH_TLS_KEY"),
        tls_dir.join("operator.key").to_str().unwrap()
    );
    assert_eq!(
        exported("MOEMESH_TLS_CA"),
        tls_dir.join("ca.pem").to_str().unwrap()
    );
    assert_eq!(exported("MOEMESH_ROUTER"), up.router);
    assert!(!up.exports.contains_key("MOEMESH_CLUSTER_SECRET"));

    let operator = TlsConfig::from_files(
        &tls_dir.join("operator.pem"),
        &tls_dir.join("operator.key"),
        &tls_dir.join("ca.pem"),
    )
    .unwrap();
    let mut admin = CoordinatorClient::connect(up.coordinators.clone(), operator.clone())
        .await
        .unwrap();
    let status = admin.cluster_status().await.unwrap();
    let ready = status
        .nodes
        .iter()
        .filter(|node| node.status() == NodeStatus::Ready);
    assert_eq!(ready.count(), 2, "{status:?}");
    let mut client = Client::connect_with_tls(up.router.clone(), &operator)
        .await
        .unwrap();
    for (&layer, (input, expected)) in &fixture.cases {
        let output = client
            .forward_f32("", layer as u32, input, fixture.hidden_size())
            .await
            .unwrap();
        let error = relative_l2(&output, expected);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }
    // Without a certificate the cluster does not answer.
    let plaintext = Client::connect(up.router.replace("https://", "http://")).await;
    if let Ok(mut plaintext) = plaintext {
        let (input, _) = fixture.cases.values().next().unwrap();
        let refused = plaintext
            .forward_f32("", 0, input, fixture.hidden_size())
            .await;
        assert!(refused.is_err());
    }

    let status = up.terminate(std::time::Duration::from_secs(120));
    assert!(status.success(), "moemesh up exited with {status}");
}
