//! `moectl forward` against a cluster, on checkpoints of every family.

use std::process::Command;

use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_tests::{ClusterSandbox, FIXTURES, Fixture, partly_replicated, relative_l2};

const MOECTL: &str = env!("CARGO_BIN_EXE_moectl");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_forward_matches_transformers_for_every_family() {
    let scratch = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let cluster = ClusterSandbox::start(&fixture.dir, 2, partly_replicated(&fixture.dir)).await;
        let _ready = cluster.client().await;
        for (&layer, (input, expected)) in &fixture.cases {
            let input_path = scratch.path().join(format!("{name}-{layer}-in.npy"));
            let output_path = scratch.path().join(format!("{name}-{layer}-out.npy"));
            let hidden = fixture.hidden_size();
            write_matrix(
                &input_path,
                &Matrix {
                    rows: input.len() / hidden,
                    columns: hidden,
                    values: input.clone(),
                },
            )
            .unwrap();
            let router = cluster.router_url.clone();
            let layer_arg = layer.to_string();
            let (input_arg, output_arg) = (input_path.clone(), output_path.clone());
            let output = tokio::task::spawn_blocking(move || {
                Command::new(MOECTL)
                    .args([
                        "forward", "--router", &router, "--layer", &layer_arg, "--input",
                    ])
                    .arg(&input_arg)
                    .arg("--output")
                    .arg(&output_arg)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(
                output.status.success(),
                "{}",
                String::from_utf8_lossy(&output.stderr)
            );
            let result = read_matrix(&output_path).unwrap();
            assert_eq!(
                (result.rows, result.columns),
                (input.len() / hidden, hidden)
            );
            let error = relative_l2(&result.values, expected);
            assert!(
                error < 1e-5,
                "{name} layer {layer}: relative L2 error {error:e}"
            );
        }
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_reports_refused_requests() {
    let fixture = Fixture::open("mixtral");
    let cluster = ClusterSandbox::spread(&fixture.dir, 1, 1).await;
    let _ready = cluster.client().await;
    let scratch = tempfile::tempdir().unwrap();
    let input_path = scratch.path().join("narrow.npy");
    write_matrix(
        &input_path,
        &Matrix {
            rows: 2,
            columns: 3,
            values: vec![0.0; 6],
        },
    )
    .unwrap();
    let router = cluster.router_url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(MOECTL)
            .args(["forward", "--router", &router, "--layer", "0", "--input"])
            .arg(&input_path)
            .args(["--output", "/dev/null"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("hidden size is 3, this model's is 64"),
        "{stderr}"
    );
    cluster.shutdown().await;
}

fn moectl(args: &[&str]) -> std::process::Output {
    Command::new(MOECTL)
        .args(args)
        .output()
        .expect("moectl runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_manages_and_shows_the_cluster_through_any_coordinator() {
    let group = moemesh_tests::CoordinatorSandbox::start(3).await;
    let leader = group.leader(1).await;
    let follower = group.urls.keys().copied().find(|&id| id != leader).unwrap();
    let via = group.urls[&follower].clone();
    let mut admin = moemesh_proto::AdminServiceClient::connect(via.clone())
        .await
        .unwrap();
    for (index, group_name) in ["rack-a", "rack-b"].iter().enumerate() {
        let node = moemesh_proto::v1::NodeInfo {
            id: format!("expert-{index}"),
            address: format!("http://10.0.0.{index}:50061"),
            group: group_name.to_string(),
            device: "cpu".into(),
            memory_bytes: 1 << 30,
            status: String::new(),
        };
        admin
            .register_node(moemesh_proto::v1::RegisterNodeRequest {
                node: Some(node),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let fixture = moemesh_tests::fixture_dir("mixtral")
        .to_string_lossy()
        .into_owned();
    let output = tokio::task::spawn_blocking({
        let via = via.clone();
        move || {
            moectl(&[
                "model",
                "load",
                &fixture,
                "--model",
                "mx",
                "--replicas",
                "2",
                "--coordinator",
                &via,
                "--json",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let loaded: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(loaded["replicas_added"], 2 * 8 * 2);

    let output = tokio::task::spawn_blocking({
        let via = via.clone();
        move || {
            moectl(&[
                "placement",
                "show",
                "--layer",
                "1",
                "--coordinator",
                &via,
                "--json",
            ])
        }
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let placement: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let experts = placement["experts"].as_array().unwrap();
    assert_eq!(experts.len(), 8);
    for expert in experts {
        assert_eq!(expert["layer"], 1);
        let nodes: Vec<&str> = expert["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["node"].as_str().unwrap())
            .collect();
        assert_eq!(nodes.len(), 2);
        assert_ne!(
            nodes[0], nodes[1],
            "replicas of one expert on distinct nodes (and racks)"
        );
    }

    let output =
        tokio::task::spawn_blocking(move || moectl(&["cluster", "status", "--coordinator", &via]))
            .await
            .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains(&format!("leader {leader},")), "{table}");
    assert_eq!(table.matches("follower").count(), 2, "{table}");
    assert!(
        table.contains("expert-1") && table.contains("rack-b") && table.contains("ready"),
        "{table}"
    );

    let output = tokio::task::spawn_blocking(|| {
        moectl(&["cluster", "status", "--coordinator", "http://127.0.0.1:1"])
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot connect to http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("MOEMESH_COORDINATOR"), "{stderr}");
    group.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_moves_replicates_and_drains_while_the_cluster_serves() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&0].clone();
    let cluster = moemesh_tests::ManagedCluster::start(
        &fixture.dir,
        3,
        1,
        std::time::Duration::from_secs(3600),
    )
    .await;
    let coordinator = cluster.coordinators.urls[&1].clone();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            moectl(&args)
        })
    };
    let placement_of = |json: &serde_json::Value, expert: u64| -> Vec<String> {
        json["experts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|entry| entry["layer"] == 0 && entry["expert"] == expert)
            .map(|entry| {
                entry["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r["node"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    let show = || {
        run(vec![
            "placement".into(),
            "show".into(),
            "--coordinator".into(),
            coordinator.clone(),
            "--json".into(),
        ])
    };

    let before: serde_json::Value = serde_json::from_slice(&show().await.unwrap().stdout).unwrap();
    let holder = placement_of(&before, 0)[0].clone();
    let others: Vec<String> = cluster
        .node_ids()
        .into_iter()
        .filter(|node| *node != holder)
        .collect();

    let output = run(vec![
        "placement".into(),
        "replicate".into(),
        "--layer".into(),
        "0".into(),
        "--expert".into(),
        "0".into(),
        "--to".into(),
        others[0].clone(),
        "--coordinator".into(),
        coordinator.clone(),
    ])
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = run(vec![
        "placement".into(),
        "move".into(),
        "--layer".into(),
        "0".into(),
        "--expert".into(),
        "0".into(),
        "--from".into(),
        holder.clone(),
        "--to".into(),
        others[1].clone(),
        "--coordinator".into(),
        coordinator.clone(),
    ])
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let after: serde_json::Value = serde_json::from_slice(&show().await.unwrap().stdout).unwrap();
    let mut replicas = placement_of(&after, 0);
    replicas.sort();
    let mut want = others.clone();
    want.sort();
    assert_eq!(replicas, want);

    let output = run(vec![
        "node".into(),
        "drain".into(),
        holder.clone(),
        "--coordinator".into(),
        coordinator.clone(),
        "--json".into(),
    ])
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let drained: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(drained["moved"].as_u64().unwrap() > 0);
    let after: serde_json::Value = serde_json::from_slice(&show().await.unwrap().stdout).unwrap();
    assert!(after["experts"].as_array().unwrap().iter().all(|entry| {
        entry["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|replica| replica["node"] != holder.as_str())
    }));

    let mut client = cluster.client().await;
    let output = client.forward_f32("", 0, &input, hidden).await.unwrap();
    assert!(relative_l2(&output, &expected) < 1e-5);

    let output = run(vec![
        "placement".into(),
        "move".into(),
        "--layer".into(),
        "0".into(),
        "--expert".into(),
        "1".into(),
        "--from".into(),
        "nobody".into(),
        "--to".into(),
        others[0].clone(),
        "--coordinator".into(),
        coordinator.clone(),
    ])
    .await
    .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("nobody holds no replica"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    cluster.shutdown().await;
}
