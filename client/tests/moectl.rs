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
