//! The `moemesh` binary as users run it: `up` and `demo` with real processes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use moemesh_client::{Client, CoordinatorClient, TlsArgs};
use moemesh_proto::identity::{Member, Role};
use moemesh_proto::{NodeStatus, ReplicaState};
use moemesh_tests::{Fixture, relative_l2};

const MOEMESH: &str = env!("CARGO_BIN_EXE_moemesh");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_a_checkpoint_from_separate_processes_and_stops_on_sigint() {
    let fixture = Fixture::open("deepseek_v3");
    let mut up = Command::new(MOEMESH)
        .args(["up", "--model"])
        .arg(&fixture.dir)
        .args([
            "--router-addr",
            "127.0.0.1:0",
            "--expert-nodes",
            "3",
            "--replicas",
            "2",
            "--threads-per-node",
            "1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("moemesh up starts");
    let mut lines = BufReader::new(up.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    let router_url = loop {
        let line = lines
            .next()
            .expect("moemesh up prints its router before exiting")
            .unwrap();
        printed.push(line.clone());
        if let Some(url) = line.strip_prefix("router ") {
            break url.to_string();
        }
    };
    assert_eq!(
        printed
            .iter()
            .filter(|line| line.starts_with("expert expert-"))
            .count(),
        3,
        "{printed:?}"
    );

    let mut client = Client::connect(router_url).await.unwrap();
    for (&layer, (input, expected)) in &fixture.cases {
        let output = client
            .forward_f32("", layer as u32, input, fixture.hidden_size())
            .await
            .unwrap();
        let error = relative_l2(&output, expected);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }

    // The expert nodes registered with the coordinators, with what they serve.
    let coordinator = printed
        .iter()
        .find_map(|line| line.strip_prefix("coordinator "))
        .expect("a coordinator line")
        .to_string();
    // Calls to the coordinators carry the cluster secret up made and printed.
    let secret = lines
        .find_map(|line| {
            let line = line.unwrap();
            Some(
                line.strip_prefix("export MOEMESH_CLUSTER_SECRET=")?
                    .to_string(),
            )
        })
        .expect("moemesh up prints the cluster secret");
    let operator = Member::new(Role::Operator, "processes-test").unwrap();
    let tls = TlsArgs {
        cluster_secret: Some(secret),
        ..TlsArgs::default()
    }
    .config(operator)
    .unwrap();
    let mut admin = CoordinatorClient::connect([coordinator], tls)
        .await
        .unwrap();
    let status = admin.cluster_status().await.unwrap();
    assert_eq!(status.coordinators.len(), 3, "{status:?}");
    assert_eq!(
        status
            .coordinators
            .iter()
            .filter(|c| c.role == "leader")
            .count(),
        1,
        "{status:?}"
    );
    assert_eq!(
        status
            .nodes
            .iter()
            .filter(|node| node.status() == NodeStatus::Ready)
            .count(),
        3,
        "{status:?}"
    );
    let placement = admin.show_placement("", None).await.unwrap();
    // Two MoE layers of 16 routed experts and a shared one, each on two nodes.
    assert_eq!(placement.experts.len(), 2 * 17);
    assert!(placement.experts.iter().all(|expert| {
        expert.replicas.len() == 2
            && expert
                .replicas
                .iter()
                .all(|replica| replica.state() == ReplicaState::Ready)
    }));

    let interrupted = Command::new("kill")
        .args(["-INT", &up.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let status = up.wait().unwrap();
    assert!(status.success(), "moemesh up exited with {status}");
}

#[test]
fn bench_measures_every_contestant_and_reports_json() {
    let output = Command::new(MOEMESH)
        .args([
            "bench",
            "--small",
            "--json",
            "--rounds",
            "2",
            "--forwards",
            "1",
            "--tokens",
            "64",
            "--decode-steps",
            "3",
            "--python",
            "/nonexistent/python3",
        ])
        .output()
        .expect("moemesh bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON object");
    for key in [
        "ceiling_gflops",
        "inprocess_tokens_per_s",
        "inprocess_gflops",
        "cluster_tokens_per_s",
        "decode_p50_us_inprocess",
        "decode_p50_us_inprocess_bf16",
        "decode_bf16_over_f32",
        "memory_read_gbps",
        "decode_bound_us",
        "decode_inprocess_over_bound",
        "best_ceiling_gflops",
        "inprocess_over_best_ceiling",
        "decode_p50_us_cluster",
        "decode_p99_us_cluster",
        "decode_dispatch_p50_us",
        "decode_p50_us_one_hop",
        "decode_dispatch_p50_us_one_hop",
        "grpc_round_trip_p50_us",
        "bf16_tokens_per_s",
        "expert_node_rss_bytes",
        "expert_node_weight_bytes",
    ] {
        let value = report[key].as_f64();
        assert!(
            value.is_some_and(|value| value > 0.0),
            "{key} is {:?}",
            report[key]
        );
    }
    // Without a usable Python the PyTorch contestant is skipped, with the reason.
    assert!(report["torch_tokens_per_s"].is_null());
    assert!(report["torch_gemm_gflops"].is_null());
    assert_eq!(report["best_ceiling_gflops"], report["ceiling_gflops"]);
    let skipped = report["torch_skipped"].as_str().unwrap_or_default();
    assert!(skipped.contains("/nonexistent/python3"), "{skipped}");
    assert!(stderr.contains("skipping PyTorch"), "{stderr}");
    // The cluster computes exactly what the layer computes in process.
    let cluster_error = report["relative_l2_vs_inprocess"]["cluster"]
        .as_f64()
        .unwrap();
    assert!(cluster_error < 1e-6, "cluster error {cluster_error}");
    let loads: u64 = report["tokens_per_expert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|load| load.as_u64().unwrap())
        .sum();
    assert_eq!(loads, 64 * 2);
    // Decode against its bound is a median of per-round figures: within
    // their range, one per round; and the read rate is a median of reads
    // taken beside each round's decode steps.
    let per_round = report["range"]["decode_inprocess_over_bound"]
        .as_array()
        .expect("a range of per-round figures");
    let (low, high) = (
        per_round[0].as_f64().unwrap(),
        per_round[1].as_f64().unwrap(),
    );
    let over_bound = report["decode_inprocess_over_bound"].as_f64().unwrap();
    assert!(
        low > 0.0 && low <= over_bound && over_bound <= high,
        "{over_bound} outside its rounds' range {low}..{high}"
    );
    let reads = &report["range"]["memory_read_gbps"];
    assert!(reads[0].as_f64().unwrap() <= report["memory_read_gbps"].as_f64().unwrap());
}

#[test]
fn demo_runs_a_cluster_and_reports() {
    let output = Command::new(MOEMESH)
        .args([
            "demo",
            "--requests",
            "12",
            "--tokens",
            "16",
            "--concurrency",
            "3",
        ])
        .output()
        .expect("moemesh demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "check: layer 0",
        "throughput:",
        "latency per request: p50",
        "tokens per node:",
        "tokens per expert",
    ] {
        assert!(
            stdout.contains(expected),
            "demo output lacks {expected:?}:\n{stdout}"
        );
    }
    assert!(stderr.contains("cluster stopped cleanly"), "{stderr}");
    // Every routed token reached two experts: 12 requests x 16 tokens x top-2, plus the 16-token check.
    let pairs: u64 = stdout
        .lines()
        .filter(|line| line.contains("token-expert pairs"))
        .map(|line| {
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(pairs, (12 * 16 + 16) * 2, "{stdout}");
}

#[test]
fn bad_flags_get_a_clear_error() {
    let output = Command::new(MOEMESH)
        .args(["up", "--model", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/model/config.json"),
        "{stderr}"
    );

    let fixture = moemesh_tests::fixture_dir("mixtral");
    let output = Command::new(MOEMESH)
        .args([
            "expert",
            "--listen",
            "127.0.0.1:0",
            "--experts",
            "0:0-9",
            "--model",
        ])
        .arg(&fixture)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("0-9 is outside the experts 0..8"),
        "{stderr}"
    );
}

#[test]
fn a_gpu_that_cannot_be_used_is_a_clear_error_with_exit_code_2() {
    let fixture = moemesh_tests::fixture_dir("mixtral");
    for role_args in [
        &["expert", "--listen", "127.0.0.1:0", "--experts", "0:0"][..],
        &["up", "--router-addr", "127.0.0.1:0"][..],
    ] {
        let output = Command::new(MOEMESH)
            .args(role_args)
            .args(["--device", "cuda:0", "--model"])
            .arg(&fixture)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{role_args:?}: {stderr}");
        assert!(stderr.contains("cuda:0"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn plaintext_servers_need_the_secret_and_loopback_unless_insecure() {
    let data = tempfile::tempdir().unwrap();
    let coordinator = |listen: &str, secret: Option<&str>, insecure: bool| {
        let mut command = Command::new(MOEMESH);
        command
            .args([
                "coordinator",
                "--id",
                "1",
                "--peers",
                "1=http://127.0.0.1:1",
            ])
            .args(["--listen", listen, "--data-dir"])
            .arg(data.path())
            .env_remove("MOEMESH_CLUSTER_SECRET")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null());
        if let Some(secret) = secret {
            command.env("MOEMESH_CLUSTER_SECRET", secret);
        }
        if insecure {
            command.arg("--insecure");
        }
        command.output().unwrap()
    };
    let secret = Some("a-cluster-secret-long-enough");
    for (listen, secret, needle) in [
        ("127.0.0.1:0", None, "without a cluster secret"),
        ("0.0.0.0:0", secret, "in plaintext"),
    ] {
        let output = coordinator(listen, secret, false);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{listen}: {stderr}");
        assert!(stderr.contains(needle), "{listen}: {stderr}");
        assert!(stderr.contains("--insecure"), "{stderr}");
    }
    // A secret shorter than 16 characters is refused too.
    let output = coordinator("127.0.0.1:0", Some("short"), false);
    assert!(String::from_utf8_lossy(&output.stderr).contains("at least 16"));
}
