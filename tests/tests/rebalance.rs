//! Load statistics and live rebalancing: skewed traffic is counted, the
//! rebalancer gives the hot expert more replicas, and every request before,
//! during and after matches the in-process layer.

use std::time::{Duration, Instant};

use moemesh_core::compute::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_proto::ReplicaState;
use moemesh_tests::{Fixture, ManagedCluster, SteadyLoad};
use rand::{Rng, SeedableRng};

const PATIENCE: Duration = Duration::from_secs(60);
const LAYER: usize = 0;
const HOT: u32 = 5;

/// Tokens whose gate puts expert `hot` first: a scaled copy of its gate
/// row plus unit noise (which varies the second expert).
fn skewed_tokens(fixture: &Fixture, hot: u32, tokens: usize, seed: u64) -> Vec<f32> {
    let hidden = fixture.hidden_size();
    let gate = fixture.checkpoint.load_gate(LAYER).unwrap().weight;
    let row = &gate[hot as usize * hidden..(hot as usize + 1) * hidden];
    let norm2: f32 = row.iter().map(|value| value * value).sum();
    let scale = 8.0 / norm2;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..tokens * hidden)
        .map(|index| row[index % hidden] * scale + rng.random_range(-1.0f32..1.0))
        .collect()
}

fn replicas_of(placement: &moemesh_proto::v1::ShowPlacementResponse, expert: u32) -> usize {
    placement
        .experts
        .iter()
        .find(|entry| entry.layer as usize == LAYER && entry.expert == expert)
        .map_or(0, |entry| {
            entry
                .replicas
                .iter()
                .filter(|replica| replica.state() == ReplicaState::Ready)
                .count()
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_load_is_counted_and_the_rebalancer_replicates_the_hot_expert() {
    let fixture = Fixture::open("mixtral");
    let hidden = fixture.hidden_size();
    let input = skewed_tokens(&fixture, HOT, 48, 1);
    let tokens = input.len() / hidden;
    let layer = MoeLayer::load(&fixture.checkpoint, LAYER, &CpuBackend::new(1).unwrap()).unwrap();
    let routing = layer.gate().route(&input, tokens);
    assert!(
        (0..tokens).all(|token| routing.token(token).any(|(expert, _)| expert == HOT)),
        "the crafted tokens must all reach expert {HOT}"
    );
    let reference = layer.forward(&input, tokens).unwrap();
    let cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_secs(3600)).await;
    let mut admin = cluster.admin(1).await;
    let before = admin.show_placement("", Some(LAYER as u32)).await.unwrap();
    assert_eq!(replicas_of(&before, HOT), 1);

    // Two clients send the skewed batch without pause, before, during and
    // after the rebalance, and check every answer.
    let mut clients = Vec::new();
    for _ in 0..2 {
        clients.push(cluster.client().await);
    }
    let load = SteadyLoad::start(
        clients,
        LAYER as u32,
        input.clone(),
        reference.clone(),
        hidden,
        1e-6,
    );

    // The window fills: expert HOT carries the most tokens.
    let started = Instant::now();
    let stats = loop {
        let stats = admin.load_stats("").await.unwrap();
        let hottest = stats
            .layers
            .iter()
            .find(|entry| entry.layer as usize == LAYER)
            .filter(|entry| entry.tokens.iter().sum::<u64>() > 0)
            .map(|entry| {
                (0..entry.tokens.len())
                    .max_by_key(|&expert| entry.tokens[expert])
                    .unwrap()
            });
        if hottest == Some(HOT as usize)
            && stats.nodes.iter().any(|node| node.pairs_per_second > 0.0)
        {
            break stats;
        }
        assert!(started.elapsed() < PATIENCE, "no load window: {stats:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(stats.window_seconds > 0.0);
    assert_eq!(stats.nodes.len(), 3, "{stats:?}");
    // Every node keeps all its experts resident: nothing to miss.
    assert!(
        stats
            .nodes
            .iter()
            .all(|node| node.device == "cpu" && node.buffer_hit_rate == 1.0),
        "{stats:?}"
    );
    // Top-2 over three nodes: a token reaches one or two of them, and each
    // node it reaches gets its row of f32s once.
    assert!((1.0..=2.0).contains(&stats.nodes_per_token), "{stats:?}");
    let row_bytes = (hidden * size_of::<f32>()) as f64;
    assert!((stats.bytes_per_token - stats.nodes_per_token * row_bytes).abs() < 1e-6 * row_bytes);

    // A dry run plans more replicas of HOT and moves nothing.
    let dry = admin.rebalance("", true).await.unwrap();
    let planned = dry
        .layers
        .iter()
        .find(|entry| entry.layer as usize == LAYER)
        .expect("layer 0 is planned");
    assert!(
        planned.max_over_mean_after < planned.max_over_mean_before,
        "{planned:?}"
    );
    assert!(
        planned.added.iter().any(|added| added.expert == HOT),
        "{planned:?}"
    );
    assert_eq!((dry.moves_done, dry.moves_failed), (0, 0));
    let unchanged = admin.show_placement("", Some(LAYER as u32)).await.unwrap();
    assert_eq!(unchanged.epoch, before.epoch);

    // The real thing, through another coordinator.
    let mut other = cluster.admin(2).await;
    let done = other.rebalance("", false).await.unwrap();
    assert_eq!(done.moves_failed, 0, "{:?}", done.errors);
    assert!(done.moves_done > 0);
    let after = admin.show_placement("", Some(LAYER as u32)).await.unwrap();
    assert!(replicas_of(&after, HOT) >= 2, "{after:?}");
    for expert in 0..8 {
        assert!(
            replicas_of(&after, expert) >= 1,
            "expert {expert} lost its replicas"
        );
    }
    // The leader carried the moves out, and counts them.
    let leader = admin.cluster_status().await.unwrap().leader_id;
    let status = cluster.admin(leader).await.cluster_status().await.unwrap();
    assert!(status.rebalance_runs >= 1, "{status:?}");
    assert!(status.rebalance_moves_done >= done.moves_done, "{status:?}");

    // Serving went on throughout, and still does on the new placement.
    load.wait_for(5).await;
    let failures = load.stop().await;
    assert!(failures.is_empty(), "{failures:?}");
    cluster.shutdown().await;
}

/// DeepSeek-V3 limits each token to `topk_group` expert groups; with each
/// group on its own node and the shared experts on every node, a token
/// reaches at most `topk_group` nodes, and its output is unchanged.
#[test]
fn group_limited_routing_reaches_at_most_topk_group_nodes() {
    use moemesh_router_node::dispatch::{ReplicaPicker, split_by_node};

    let fixture = Fixture::open("deepseek_v3");
    let config = fixture.checkpoint.config().clone();
    let limit = config.group_limit.expect("the fixture limits groups");
    let (groups, top_groups) = (limit.groups, limit.top_groups);
    let hidden = fixture.hidden_size();
    let per_group = config.num_experts / groups;
    // Routed expert e on node e / per_group; the shared expert on every node.
    let mut replicas: Vec<Vec<usize>> = (0..config.num_experts)
        .map(|expert| vec![expert / per_group])
        .collect();
    replicas.push((0..groups).collect());
    let layer = MoeLayer::load(&fixture.checkpoint, 1, &CpuBackend::new(1).unwrap()).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let tokens = 300;
    let input: Vec<f32> = (0..tokens * hidden)
        .map(|_| rng.random_range(-2.0f32..2.0))
        .collect();
    let routing = layer.gate().route(&input, tokens);
    let mut picker = ReplicaPicker::new(vec![0; groups], vec![false; groups]);
    let batches = split_by_node(&routing, &input, hidden, &replicas, &mut picker).unwrap();
    let mut nodes_per_token = vec![0usize; tokens];
    for batch in &batches {
        for &token in &batch.tokens {
            nodes_per_token[token as usize] += 1;
        }
    }
    assert!(
        nodes_per_token
            .iter()
            .all(|&nodes| (1..=top_groups).contains(&nodes)),
        "{nodes_per_token:?}"
    );
    let mean = nodes_per_token.iter().sum::<usize>() as f64 / tokens as f64;
    assert!(mean <= top_groups as f64, "{mean}");
}
