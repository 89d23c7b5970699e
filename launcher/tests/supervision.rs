//! `moemesh up` survives its own processes: a killed expert node or
//! coordinator leader is reported and restarted while the rest serves, the
//! plaintext cluster secret reaches the children only through their
//! environment, and SIGTERM stops every child.

mod up_process;

use std::time::{Duration, Instant};

use moemesh_client::{Client, CoordinatorClient, TlsArgs, TlsConfig};
use moemesh_proto::NodeStatus;
use moemesh_proto::identity::{Member, Role};
use moemesh_proto::v1::ClusterStatusResponse;
use moemesh_tests::{Fixture, relative_l2};
use up_process::{UpProcess, is_alive, read_environment, signal};

/// How long a restart and re-election may take on a slow, busy machine.
const RECOVERY: Duration = Duration::from_secs(240);

/// How this test connects to a plaintext cluster whose secret is
/// `secret`: as an operator, with the secret on every call.
fn plaintext_with_secret(secret: &str) -> TlsConfig {
    let flags = TlsArgs {
        cluster_secret: Some(secret.to_string()),
        ..TlsArgs::default()
    };
    flags
        .config(Member::new(Role::Operator, "supervision-test").unwrap())
        .unwrap()
}

fn up_args(fixture: &Fixture) -> Vec<String> {
    [
        "up",
        "--model",
        fixture.dir.to_str().unwrap(),
        "--router-addr",
        "127.0.0.1:0",
        "--expert-nodes",
        "2",
        "--replicas",
        "2",
        "--threads-per-node",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// Whether every coordinator answers, one leads, and both nodes are ready.
fn healthy(status: &ClusterStatusResponse) -> bool {
    status.coordinators.len() == 3
        && status.coordinators.iter().all(|c| c.role != "unreachable")
        && status
            .coordinators
            .iter()
            .filter(|c| c.role == "leader")
            .count()
            == 1
        && status
            .nodes
            .iter()
            .filter(|node| node.status() == NodeStatus::Ready)
            .count()
            == 2
}

/// Waits until the cluster is healthy; returns its status.
async fn wait_until_healthy(up: &UpProcess, tls: &TlsConfig) -> ClusterStatusResponse {
    let deadline = Instant::now() + RECOVERY;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        let connected = CoordinatorClient::connect(up.coordinators.clone(), tls.clone()).await;
        match connected {
            Ok(mut admin) => match admin.cluster_status().await {
                Ok(status) if healthy(&status) => return status,
                Ok(status) => last = format!("{status:?}"),
                Err(error) => last = error.to_string(),
            },
            Err(error) => last = error.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!(
        "the cluster was not healthy within {RECOVERY:?}: {last}\n{}",
        up.stderr()
    );
}

/// Forwards every fixture case through the router, retrying until it
/// answers exactly or `RECOVERY` passes.
async fn assert_serves_exactly(up: &UpProcess, fixture: &Fixture, tls: &TlsConfig) {
    let deadline = Instant::now() + RECOVERY;
    let mut client = Client::connect_with_tls(up.router.clone(), tls)
        .await
        .unwrap();
    for (&layer, (input, expected)) in &fixture.cases {
        let output = loop {
            match client
                .forward_f32("", layer as u32, input, fixture.hidden_size())
                .await
            {
                Ok(output) => break output,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("forward of layer {layer} failed, retrying: {error}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(error) => panic!("forward of layer {layer}: {error}\n{}", up.stderr()),
            }
        };
        let error = relative_l2(&output, expected);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }
}

/// Waits until member `id` runs again under a pid other than `old_pid`.
fn wait_for_new_pid(up: &UpProcess, id: &str, old_pid: u32) -> u32 {
    let deadline = Instant::now() + RECOVERY;
    loop {
        if let Some(member) = up.member(id).filter(|member| member.pid != old_pid) {
            return member.pid;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not come back within {RECOVERY:?}:\n{}",
            up.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM stops up cleanly, and every child with it.
fn assert_sigterm_stops_everything(up: &mut UpProcess) {
    let children: Vec<u32> = up.members().iter().map(|member| member.pid).collect();
    assert!(!children.is_empty());
    let status = up.terminate(Duration::from_secs(180));
    assert!(
        status.success(),
        "moemesh up exited with {status}:\n{}",
        up.stderr()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while children.iter().any(|&pid| is_alive(pid)) {
        assert!(
            Instant::now() < deadline,
            "children outlived moemesh up: {children:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_restarts_a_killed_expert_node_and_coordinator_leader_and_stops_on_sigterm() {
    let fixture = Fixture::open("mixtral");
    let args = up_args(&fixture);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = UpProcess::start(&args, "MOEMESH_CLUSTER_SECRET");

    // A random secret, handed to every child in its environment only.
    let secret = up.exports["MOEMESH_CLUSTER_SECRET"].clone();
    assert_eq!(secret.len(), 64, "{secret}");
    assert!(secret.chars().all(|c| c.is_ascii_hexdigit()), "{secret}");
    let members = up.members();
    assert_eq!(members.len(), 3 + 2 + 1, "{members:?}");
    for member in &members {
        assert!(
            !member.cmdline.iter().any(|arg| arg.contains(&secret)),
            "{member:?}"
        );
        let environment = read_environment(member.pid);
        let expected = format!("MOEMESH_CLUSTER_SECRET={secret}");
        assert!(
            environment.contains(&expected),
            "{} lacks the secret",
            member.id
        );
    }
    let tls = plaintext_with_secret(&secret);
    let status = wait_until_healthy(&up, &tls).await;
    assert_serves_exactly(&up, &fixture, &tls).await;

    // Kill -9 an expert node and the coordinator leader.
    let expert = up.member("expert-0").expect("expert-0 runs");
    let leader_id = format!("coordinator-{}", status.leader_id);
    let leader = up.member(&leader_id).expect("the leader runs");
    signal(expert.pid, "-KILL");
    signal(leader.pid, "-KILL");
    up.wait_for_stderr(
        &[
            &format!("expert expert-0 (pid {}) exited (signal: 9", expert.pid),
            &format!(
                "coordinator {leader_id} (pid {}) exited (signal: 9",
                leader.pid
            ),
            "restarting it in",
            "expert expert-0 restarted",
            &format!("coordinator {leader_id} restarted"),
        ],
        RECOVERY,
    );
    assert!(up.child.try_wait().unwrap().is_none(), "moemesh up exited");
    wait_for_new_pid(&up, "expert-0", expert.pid);
    wait_for_new_pid(&up, &leader_id, leader.pid);
    assert_eq!(up.members().len(), 6);

    // The restarted node serves again and the coordinators agree.
    wait_until_healthy(&up, &tls).await;
    assert_serves_exactly(&up, &fixture, &tls).await;
    assert!(up.child.try_wait().unwrap().is_none(), "moemesh up exited");

    assert_sigterm_stops_everything(&mut up);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_no_restart_reports_an_exit_and_keeps_the_rest_serving() {
    let fixture = Fixture::open("mixtral");
    let mut args = up_args(&fixture);
    args.extend(["--coordinators", "0", "--no-restart"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = UpProcess::start(&args, "MOEMESH_CLUSTER_SECRET");
    let tls = plaintext_with_secret(&up.exports["MOEMESH_CLUSTER_SECRET"]);
    assert_serves_exactly(&up, &fixture, &tls).await;

    let expert = up.member("expert-1").expect("expert-1 runs");
    signal(expert.pid, "-KILL");
    up.wait_for_stderr(
        &[&format!(
            "expert expert-1 (pid {}) exited (signal: 9 (SIGKILL)); not restarting it",
            expert.pid
        )],
        RECOVERY,
    );
    // The other replica serves every expert.
    assert_serves_exactly(&up, &fixture, &tls).await;
    assert!(up.member("expert-1").is_none(), "expert-1 was restarted");
    assert!(up.child.try_wait().unwrap().is_none(), "moemesh up exited");
    assert!(
        !up.stderr().contains("expert-1 restarted"),
        "{}",
        up.stderr()
    );

    assert_sigterm_stops_everything(&mut up);
}
