//! The Kubernetes manifests start a working cluster. The committed render
//! of the `dev` overlay (`k8s/rendered/dev.yaml`, which
//! `scripts/k8s-render.sh` keeps equal to `kubectl kustomize
//! k8s/overlays/dev`) is run pod by pod as local processes, with exactly
//! the command, args and env each container declares: coordinators, expert
//! nodes, the router, the model-load Job, their init containers, probes and
//! the expert nodes' preStop drain. A forward through the router's Service
//! then matches the layer computed in this process.

mod kubelet;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kubelet::Cluster;
use moemesh_client::{Client, CoordinatorClient, TlsConfig};
use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_proto::identity::{Member, Role};
use moemesh_tests::relative_l2;

/// Weight loading, raft elections and registration on a slow 2-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

fn rendered_dev() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/rendered/dev.yaml")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_overlay_runs_as_processes_and_serves_the_layer() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(&rendered_dev()))
        .await
        .unwrap();
    for pod in &cluster.pods {
        if pod.owner_kind == "Job" {
            cluster.wait_succeeded(&pod.name, READY_TIMEOUT).await;
        } else {
            cluster.wait_ready(pod, READY_TIMEOUT).await;
        }
    }

    let router_pod = cluster.pods_named("moemesh-router")[0].clone();
    let model_dir = model_dir_of(&cluster, &router_pod);
    let router_port = cluster
        .network
        .service_port("moemesh-router", 50051)
        .expect("a moemesh-router Service on 50051");
    let mut client = Client::connect(format!("http://127.0.0.1:{router_port}"))
        .await
        .unwrap();
    let checkpoint = Checkpoint::open(&model_dir).unwrap();
    check_every_layer(&mut client, &checkpoint).await;

    // Scale-in of one expert node: the kubelet runs its preStop hook, which
    // drains it through the coordinators, then stops it.
    let leaving = cluster
        .pods_named("moemesh-expert")
        .last()
        .copied()
        .unwrap()
        .clone();
    let drained = tokio::task::block_in_place(|| cluster.run_pre_stop(&leaving));
    assert!(
        drained.status.success(),
        "the preStop drain failed: {}{}",
        String::from_utf8_lossy(&drained.stdout),
        String::from_utf8_lossy(&drained.stderr)
    );
    assert!(
        replicas_on(&cluster, &leaving.name).await == 0,
        "{} still holds replicas after its preStop drain",
        leaving.name
    );
    cluster.stop_pod(&leaving.name);
    check_every_layer(&mut client, &checkpoint).await;
}

/// Forwards every MoE layer through `client` and compares with the layer
/// computed in this process from the same checkpoint.
async fn check_every_layer(client: &mut Client, checkpoint: &Checkpoint) {
    let config = checkpoint.config();
    let backend = CpuBackend::new(1).unwrap();
    for layer in config.moe_layers() {
        let tokens = 7;
        let hidden: Vec<f32> = (0..tokens * config.hidden_size)
            .map(|index| ((index * 37 % 101) as f32 / 50.0) - 1.0)
            .collect();
        let served = client
            .forward_f32("", layer as u32, &hidden, config.hidden_size)
            .await
            .unwrap_or_else(|error| panic!("layer {layer}: {error}"));
        let reference = MoeLayer::load(checkpoint, layer, &backend)
            .unwrap()
            .forward(&hidden, tokens)
            .unwrap();
        let error = relative_l2(&served, &reference);
        assert!(error < 1e-5, "layer {layer}: relative L2 error {error:e}");
    }
}

/// The local directory behind the router container's `--model`.
fn model_dir_of(cluster: &Cluster, pod: &kubelet::manifests::Pod) -> PathBuf {
    let container = &kubelet::manifests::sequence(&pod.spec, &["containers"])[0];
    let prepared = cluster.prepare(pod, container);
    let model = prepared
        .line
        .iter()
        .find_map(|word| word.strip_prefix("--model="))
        .or_else(|| prepared.env.get("MOEMESH_MODEL").map(String::as_str))
        .expect("the router is given its model");
    PathBuf::from(model)
}

/// How many replicas the coordinators place on `node`, asked as an operator
/// with the cluster secret the manifests give.
async fn replicas_on(cluster: &Cluster, node: &str) -> usize {
    let coordinator = cluster
        .network
        .service_port("moemesh-coordinator", 7000)
        .expect("a moemesh-coordinator Service on 7000");
    let secret = cluster
        .manifests
        .secret_named_like("moemesh-cluster-secret", "secret");
    let operator = Member::new(Role::Operator, "k8s-test").unwrap();
    let tls = TlsConfig::with_cluster_secret(secret, operator).unwrap();
    let mut admin = CoordinatorClient::connect([format!("http://127.0.0.1:{coordinator}")], tls)
        .await
        .unwrap();
    let placement = admin.show_placement("", None).await.unwrap();
    placement
        .experts
        .iter()
        .flat_map(|expert| &expert.replicas)
        .filter(|replica| replica.node == node)
        .count()
}
