//! `moectl` against real clusters: forward on checkpoints of every family,
//! and cluster administration through the coordinators.

use std::process::{Command, Output};
use std::time::Duration;

use moemesh_client::npy::{Matrix, read_matrix, write_matrix};
use moemesh_tests::{
    ClusterSandbox, CoordinatorSandbox, FIXTURES, Fixture, ManagedCluster, partly_replicated,
    relative_l2,
};
use serde_json::Value;

const MOECTL: &str = env!("CARGO_BIN_EXE_moectl");

/// Runs moectl off the async runtime.
async fn run_moectl(args: &[&str]) -> Output {
    run_moectl_with_env(args, &[]).await
}

/// Runs moectl off the async runtime with `env` added to its environment.
async fn run_moectl_with_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        Command::new(MOECTL)
            .args(&args)
            .env_remove("MOEMESH_OUTPUT")
            .envs(env)
            .output()
            .expect("moectl runs")
    })
    .await
    .expect("moectl task")
}

/// Checks that moectl succeeded and returns its standard output.
fn succeeded(args: &[&str], output: Output) -> String {
    assert!(
        output.status.success(),
        "moectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

/// Runs moectl, checks that it succeeded and returns its standard output.
async fn moectl_ok(args: &[&str]) -> String {
    succeeded(args, run_moectl(args).await)
}

/// Runs moectl with `--json` and parses what it prints.
async fn moectl_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&moectl_ok(&args).await).expect("moectl prints JSON")
}

/// Runs moectl, checks that it failed and returns its standard error.
async fn moectl_err(args: &[&str]) -> String {
    let output = run_moectl(args).await;
    assert!(!output.status.success(), "moectl {args:?} should fail");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_forward_matches_transformers_for_every_family() {
    let scratch = tempfile::tempdir().unwrap();
    for name in FIXTURES {
        let fixture = Fixture::open(name);
        let cluster = ClusterSandbox::start(&fixture.dir, 2, partly_replicated(&fixture.dir)).await;
        let _ready = cluster.client().await;
        let hidden = fixture.hidden_size();
        for (&layer, (input, expected)) in &fixture.cases {
            let input_path = scratch.path().join(format!("{name}-{layer}-in.npy"));
            let output_path = scratch.path().join(format!("{name}-{layer}-out.npy"));
            write_matrix(
                &input_path,
                &Matrix {
                    rows: input.len() / hidden,
                    columns: hidden,
                    values: input.clone(),
                },
            )
            .unwrap();
            let layer_arg = layer.to_string();
            // The router URL and the output format before the subcommand;
            // after it, --output names the file.
            let summary = moectl_ok(&[
                "--router",
                &cluster.router_url,
                "--output",
                "json",
                "forward",
                "--layer",
                &layer_arg,
                "--input",
                &input_path.to_string_lossy(),
                "--output",
                &output_path.to_string_lossy(),
            ])
            .await;
            let summary: Value = serde_json::from_str(&summary).expect("forward prints JSON");
            assert_eq!(summary["tokens"], input.len() / hidden, "{summary}");
            assert_eq!(summary["output"], output_path.to_string_lossy().as_ref());
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
    let input = input_path.to_string_lossy();
    let stderr = moectl_err(&[
        "forward",
        "--router",
        &cluster.router_url,
        "--layer",
        "0",
        "--input",
        &input,
        "--output",
        "/dev/null",
    ])
    .await;
    assert!(
        stderr.contains("hidden size is 3, this model's is 64"),
        "{stderr}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_manages_and_shows_the_cluster_through_any_coordinator() {
    let group = CoordinatorSandbox::start(3).await;
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
            // The second node buffers experts beyond its memory.
            buffer_bytes: index as u64 * (2 << 30),
            weight_format: String::new(),
            status: moemesh_proto::v1::NodeStatus::Unspecified.into(),
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
    let loaded = moectl_json(&[
        "model",
        "load",
        &fixture,
        "--model",
        "mx",
        "--replicas",
        "2",
        "--coordinator",
        &via,
    ])
    .await;
    assert_eq!(loaded["replicas_added"], 2 * 8 * 2);

    let placement =
        moectl_json(&["placement", "show", "--layer", "1", "--coordinator", &via]).await;
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

    let table = moectl_ok(&["cluster", "status", "--coordinator", &via]).await;
    assert!(table.contains(&format!("leader {leader},")), "{table}");
    assert_eq!(table.matches("follower").count(), 2, "{table}");
    assert!(
        table.contains("expert-1") && table.contains("rack-b") && table.contains("ready"),
        "{table}"
    );
    assert!(
        table.contains("BUFFER") && table.contains("2.0 GiB"),
        "{table}"
    );
    let status = moectl_json(&["cluster", "status", "--coordinator", &via]).await;
    let buffers: Vec<u64> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| node["buffer_bytes"].as_u64().unwrap())
        .collect();
    assert_eq!(buffers, vec![0, 2 << 30]);

    check_options_before_the_subcommand_and_from_the_environment(&via).await;
    check_load_wait_gives_up_at_the_timeout(&via, &fixture).await;

    let stderr = moectl_err(&["cluster", "status", "--coordinator", "http://127.0.0.1:1"]).await;
    assert!(
        stderr.contains("cannot connect to http://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("MOEMESH_COORDINATOR"), "{stderr}");
    group.shutdown().await;
}

/// `cluster status` of the coordinator at `via`, one model "mx" and two
/// nodes, with the connection options and the output format before the
/// subcommand, and from the environment.
async fn check_options_before_the_subcommand_and_from_the_environment(via: &str) {
    let before = moectl_ok(&[
        "--coordinator",
        via,
        "--output",
        "json",
        "cluster",
        "status",
    ])
    .await;
    let before: Value = serde_json::from_str(&before).expect("--output json prints JSON");
    assert_eq!(before["nodes"].as_array().unwrap().len(), 2, "{before}");
    assert_eq!(before["models"], serde_json::json!(["mx"]));
    // From the environment, and the flag after the subcommand wins over it.
    let env = [("MOEMESH_COORDINATOR", via), ("MOEMESH_OUTPUT", "json")];
    let from_env = succeeded(&[], run_moectl_with_env(&["cluster", "status"], &env).await);
    let from_env: Value = serde_json::from_str(&from_env).expect("MOEMESH_OUTPUT=json prints JSON");
    assert_eq!(from_env["models"], before["models"]);
    let args = ["cluster", "status", "--output", "table"];
    let table = succeeded(&args, run_moectl_with_env(&args, &env).await);
    assert!(table.contains("placement epoch"), "{table}");
}

/// Loading model "mx" again through the coordinator at `via` with --wait:
/// the registered nodes never load their replicas, so the wait gives up at
/// --timeout and says how far loading got.
async fn check_load_wait_gives_up_at_the_timeout(via: &str, fixture: &str) {
    let load = [
        "--coordinator",
        via,
        "model",
        "load",
        fixture,
        "--model",
        "mx",
    ];
    let stderr = moectl_err(&[&load[..], &["--wait", "--timeout", "1"]].concat()).await;
    assert!(stderr.contains("model mx is loaded"), "{stderr}");
    assert!(
        stderr.contains("after 1 s (--timeout): 0 of 32 replicas serve"),
        "{stderr}"
    );
}

/// The nodes holding layer 0's `expert` in a `placement show --json` answer.
fn holders(placement: &Value, expert: u64) -> Vec<String> {
    let entry = placement["experts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["layer"] == 0 && entry["expert"] == expert);
    let mut nodes: Vec<String> = entry
        .map(|entry| {
            entry["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["node"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_moves_replicates_and_drains_while_the_cluster_serves() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&0].clone();
    let cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_secs(3600)).await;
    let coordinator = cluster.coordinators.urls[&1].clone();
    let show = ["placement", "show", "--coordinator", coordinator.as_str()];

    let holder = holders(&moectl_json(&show).await, 0)[0].clone();
    let mut others: Vec<String> = cluster
        .node_ids()
        .into_iter()
        .filter(|node| *node != holder)
        .collect();
    others.sort();
    let expert_0 = ["--layer", "0", "--expert", "0"];
    let replicate = [
        "--coordinator",
        &coordinator,
        "placement",
        "replicate",
        "--to",
        &others[0],
        "--wait",
    ];
    moectl_ok(&[&replicate[..], &expert_0].concat()).await;
    let move_away = [
        "placement",
        "move",
        "--from",
        &holder,
        "--to",
        &others[1],
        "--wait",
        "--coordinator",
        &coordinator,
    ];
    moectl_ok(&[&move_away[..], &expert_0].concat()).await;
    assert_eq!(holders(&moectl_json(&show).await, 0), others);

    // As an expert pod's preStop hook runs it: the node and the
    // coordinator come from the environment.
    let drain = ["--output", "json", "node", "drain", "--wait"];
    let env = [
        ("MOEMESH_NODE_ID", holder.as_str()),
        ("MOEMESH_COORDINATOR", coordinator.as_str()),
    ];
    let drained = succeeded(&drain, run_moectl_with_env(&drain, &env).await);
    let drained: Value = serde_json::from_str(&drained).expect("drain prints JSON");
    assert_eq!(drained["node"], holder.as_str());
    assert!(drained["moved"].as_u64().unwrap() > 0, "{drained}");
    assert_eq!(drained["replicas_left"], 0);
    let placement = moectl_json(&show).await;
    let mut replicas = placement["experts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|entry| entry["replicas"].as_array().unwrap());
    assert!(replicas.all(|replica| replica["node"] != holder.as_str()));

    let output = cluster
        .client()
        .await
        .forward_f32("", 0, &input, hidden)
        .await
        .unwrap();
    assert!(relative_l2(&output, &expected) < 1e-5);

    let stderr = moectl_err(
        &[
            &["placement", "move", "--from", "nobody", "--to", &others[0]][..],
            &["--coordinator", &coordinator],
            &expert_0,
        ]
        .concat(),
    )
    .await;
    assert!(stderr.contains("nobody holds no replica"), "{stderr}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn moectl_plans_a_balanced_placement_from_recorded_loads() {
    let dir = tempfile::tempdir().unwrap();
    // Zipf(1.2) popularity over 64 experts, and a second, uniform layer.
    let weights: Vec<f64> = (1..=64).map(|rank| 1.0 / (rank as f64).powf(1.2)).collect();
    let total: f64 = weights.iter().sum();
    let skewed: Vec<f64> = weights.iter().map(|weight| weight / total * 1e5).collect();
    let loads = dir.path().join("loads.json");
    std::fs::write(
        &loads,
        serde_json::json!({"layers": [skewed, vec![10.0; 64]]}).to_string(),
    )
    .unwrap();
    let loads = loads.to_str().unwrap();
    let plan = moectl_json(&[
        "placement",
        "plan",
        "--loads",
        loads,
        "--nodes",
        "4",
        "--slots",
        "20",
        "--groups",
        "2",
    ])
    .await;
    let layers = plan["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for layer in layers {
        assert!(layer["max_over_mean"].as_f64().unwrap() <= 1.10, "{layer}");
        let nodes = layer["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 4);
        let mut seen = std::collections::BTreeSet::new();
        for node in nodes {
            let experts: Vec<u64> = node
                .as_array()
                .unwrap()
                .iter()
                .map(|expert| expert.as_u64().unwrap())
                .collect();
            assert!(experts.len() <= 20);
            let distinct: std::collections::BTreeSet<_> = experts.iter().collect();
            assert_eq!(distinct.len(), experts.len(), "an expert twice on a node");
            seen.extend(experts);
        }
        assert_eq!(seen, (0..64).collect());
    }
    // The hottest expert got extra replicas.
    let hottest = layers[0]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|node| node.as_array().unwrap().contains(&Value::from(0)))
        .count();
    assert!(hottest >= 2, "{hottest}");

    let four_nodes = [
        "placement",
        "plan",
        "--loads",
        loads,
        "--nodes",
        "4",
        "--slots",
        "20",
    ];
    let table = moectl_ok(&four_nodes).await;
    assert!(table.contains("max/mean node load"), "{table}");

    // Nodes that keep 8 of their 20 slots resident: still every expert
    // placed, no node over its slots.
    let tiered = moectl_json(&[&four_nodes[..], &["--resident-slots", "8"]].concat()).await;
    for layer in tiered["layers"].as_array().unwrap() {
        let nodes = layer["nodes"].as_array().unwrap();
        assert!(
            nodes
                .iter()
                .all(|node| node.as_array().unwrap().len() <= 20)
        );
        let placed: std::collections::BTreeSet<u64> = nodes
            .iter()
            .flat_map(|node| node.as_array().unwrap())
            .map(|expert| expert.as_u64().unwrap())
            .collect();
        assert_eq!(placed, (0..64).collect());
    }

    let too_small = moectl_err(&[
        "placement",
        "plan",
        "--loads",
        loads,
        "--nodes",
        "2",
        "--slots",
        "20",
    ])
    .await;
    assert!(
        too_small.contains("64 experts need 64 slots"),
        "{too_small}"
    );
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"experts": [1, 2]}"#).unwrap();
    let missing = moectl_err(&[
        "placement",
        "plan",
        "--loads",
        bad.to_str().unwrap(),
        "--nodes",
        "2",
        "--slots",
        "2",
    ])
    .await;
    assert!(missing.contains("\"layers\""), "{missing}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moectl_model_load_waits_until_every_replica_serves() {
    let fixture = Fixture::open("mixtral");
    // The nodes start empty and the model is loaded through the
    // coordinators: its replicas are loading now.
    let cluster = ManagedCluster::start(&fixture.dir, 2, 0, Duration::from_secs(3600)).await;
    let coordinator = cluster.coordinators.urls[&1].clone();
    let dir = fixture.dir.to_string_lossy().into_owned();
    let load = [
        "--coordinator",
        &coordinator,
        "model",
        "load",
        &dir,
        "--model",
        "test-model",
        "--replicas",
        "2",
        "--wait",
    ];
    let loaded = moectl_json(&load).await;
    // Every expert of the 2 MoE layers of 8 experts, twice.
    assert_eq!(loaded["replicas_ready"], 2 * 8 * 2, "{loaded}");
    let placement = moectl_json(&["placement", "show", "--coordinator", &coordinator]).await;
    let states: Vec<&str> = placement["experts"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|entry| entry["replicas"].as_array().unwrap())
        .map(|replica| replica["state"].as_str().unwrap())
        .collect();
    assert_eq!(states.len(), 2 * 8 * 2);
    assert!(states.iter().all(|state| *state == "ready"), "{states:?}");
    cluster.shutdown().await;
}

#[tokio::test]
async fn moectl_prints_completion_scripts() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = moectl_ok(&["completions", shell]).await;
        assert!(script.contains("moectl"), "{shell}: {script}");
        // Subcommands and the options that go before them complete.
        assert!(script.contains("drain"), "{shell}");
        assert!(script.contains("coordinator"), "{shell}");
    }
    let bash = moectl_ok(&["completions", "bash"]).await;
    assert!(bash.contains("complete -F _moectl"), "{bash}");
    // The completions need no cluster and no valid TLS settings.
    let env = [("MOEMESH_TLS_CERT", "/nonexistent.pem")];
    let output = run_moectl_with_env(&["completions", "bash"], &env).await;
    assert_eq!(succeeded(&[], output), bash);
}
