//! A token's output is the same bits whichever replica serves it: two
//! expert nodes holding the same experts with different thread counts,
//! each behind its own router, answer every forward identically, with f32
//! and with bf16 weights.

use std::path::Path;

use moemesh_client::Client;
use moemesh_core::compute::WeightFormat;
use moemesh_core::model::checkpoint::Checkpoint;
use moemesh_core::model::placement::{NodeEntry, Placement};
use moemesh_expert_node::{ExpertNode, ExpertNodeConfig};
use moemesh_proto::tls::TlsConfig;
use moemesh_router_node::{PlacementSource, RouterConfig};
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Deeper than gemm's smallest depth block (512) in both products: the
/// gate/up product sums 600 inputs, the down product 640.
const HIDDEN: usize = 600;
const INTERMEDIATE: usize = 640;
const EXPERTS: usize = 4;

/// Writes a one-layer Mixtral checkpoint with random f32 weights to `dir`.
fn write_model(dir: &Path) {
    let config = format!(
        r#"{{"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "hidden_size": {HIDDEN}, "intermediate_size": {INTERMEDIATE},
            "num_hidden_layers": 1, "num_local_experts": {EXPERTS},
            "num_experts_per_tok": 2, "hidden_act": "silu",
            "num_attention_heads": 8, "num_key_value_heads": 8,
            "vocab_size": 32000, "torch_dtype": "float32"}}"#
    );
    std::fs::write(dir.join("config.json"), config).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let mut matrix = |rows: usize, columns: usize| -> (Vec<usize>, Vec<u8>) {
        let scale = (3.0 / columns as f32).sqrt();
        let bytes = (0..rows * columns)
            .flat_map(|_| rng.random_range(-scale..scale).to_le_bytes())
            .collect();
        (vec![rows, columns], bytes)
    };
    let prefix = "model.layers.0.block_sparse_moe";
    let mut tensors = vec![(format!("{prefix}.gate.weight"), matrix(EXPERTS, HIDDEN))];
    for expert in 0..EXPERTS {
        for (name, rows, columns) in [
            ("w1", INTERMEDIATE, HIDDEN),
            ("w3", INTERMEDIATE, HIDDEN),
            ("w2", HIDDEN, INTERMEDIATE),
        ] {
            let name = format!("{prefix}.experts.{expert}.{name}.weight");
            tensors.push((name, matrix(rows, columns)));
        }
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, (shape, bytes))| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    (listener, url)
}

/// One replica: an expert node holding every expert, computing on
/// `threads` threads, and a router that sends it every token.
async fn start_replica(
    model_dir: &Path,
    threads: usize,
    weight_format: WeightFormat,
    servers: &mut JoinSet<Result<(), String>>,
    shutdown_rx: &watch::Receiver<bool>,
) -> String {
    let config = Checkpoint::open(model_dir).unwrap().config().clone();
    let (node_listener, node_url) = bind().await;
    let node_id = format!("expert-{threads}-threads");
    let node = NodeEntry {
        id: node_id.clone(),
        address: node_url,
    };
    let placement = Placement::spread(&config, vec![node], 1).unwrap();
    let node_config = ExpertNodeConfig {
        model_dir: model_dir.to_path_buf(),
        model_id: "test-model".into(),
        experts: placement.experts_of(&node_id),
        threads,
        queue_capacity: 64,
        weight_format,
        device: Default::default(),
        memory_budget: None,
        device_memory_budget: None,
        tls: TlsConfig::plaintext(),
        registration: None,
        metrics: Default::default(),
    };
    let node = ExpertNode::start(node_config, node_listener).await.unwrap();
    let shutdown = wait_for_shutdown(shutdown_rx.clone());
    servers.spawn(async move { node.serve(shutdown).await.map_err(|e| e.to_string()) });
    let (router_listener, router_url) = bind().await;
    let router_config = RouterConfig {
        model_dir: model_dir.to_path_buf(),
        model_id: "test-model".into(),
        placement: PlacementSource::File(placement.to_file(&config, None)),
        group: String::new(),
        max_in_flight: 0,
        tls: TlsConfig::plaintext(),
        metrics: Default::default(),
    };
    let shutdown = wait_for_shutdown(shutdown_rx.clone());
    servers.spawn(async move {
        moemesh_router_node::run(router_config, router_listener, shutdown)
            .await
            .map_err(|e| e.to_string())
    });
    router_url
}

async fn wait_for_shutdown(mut shutdown_rx: watch::Receiver<bool>) {
    let _ = shutdown_rx.wait_for(|stop| *stop).await;
}

/// Connects to a router, retrying while it loads.
async fn connect(url: &str) -> Client {
    for _ in 0..400 {
        if let Ok(client) = Client::connect(url.to_string()).await {
            return client;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("router at {url} never accepted a connection");
}

async fn replicas_serve_the_same_bits(weight_format: WeightFormat) {
    let model = tempfile::tempdir().unwrap();
    write_model(model.path());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut servers = JoinSet::new();
    let mut clients = Vec::new();
    for threads in [1, 2, 3] {
        let url = start_replica(
            model.path(),
            threads,
            weight_format,
            &mut servers,
            &shutdown_rx,
        )
        .await;
        clients.push((threads, connect(&url).await));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for tokens in [1, 7, 64, 300] {
        let input: Vec<f32> = (0..tokens * HIDDEN)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let mut answers = Vec::new();
        for (threads, client) in &mut clients {
            let output = client.forward_f32("", 0, &input, HIDDEN).await.unwrap();
            let bits: Vec<u32> = output.iter().map(|value| value.to_bits()).collect();
            answers.push((*threads, bits));
        }
        let (first_threads, first) = &answers[0];
        assert!(first.iter().any(|&bits| bits != 0));
        for (threads, bits) in &answers[1..] {
            let differing = bits.iter().zip(first).filter(|(a, b)| a != b).count();
            assert_eq!(
                differing, 0,
                "{weight_format}, {tokens} tokens: the node with {threads} threads differs \
                 from the node with {first_threads} in {differing} values"
            );
        }
    }
    shutdown_tx.send_replace(true);
    while let Some(result) = servers.join_next().await {
        result.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f32_replicas_on_different_thread_counts_serve_the_same_bits() {
    replicas_serve_the_same_bits(WeightFormat::F32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_replicas_on_different_thread_counts_serve_the_same_bits() {
    replicas_serve_the_same_bits(WeightFormat::Bf16).await;
}
