//! One hop: a `DirectClient` follows the coordinators' placement itself
//! and calls the expert nodes with no router in between. Its answers are
//! the router's bit for bit and the in-process experts', a token's output
//! does not depend on its batch, and it keeps serving through a lost
//! expert node and through replica moves.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moemesh_client::{Client, ClientError};
use moemesh_core::model::config::ModelConfig;
use moemesh_core::model::gating::{Gate, Routing};
use moemesh_proto::identity::Role;
use moemesh_proto::{NodeStatus, ReplicaState};
use moemesh_router_node::{DirectClient, ModelSource, RouterError};
use moemesh_tests::routing::{in_process_parts, random_routing, random_rows};
use moemesh_tests::{FIXTURES, Fixture, ManagedCluster, SandboxSecurity, relative_l2};
use rand::{Rng, SeedableRng};

/// What every one-hop forward of these tests may take.
const DEADLINE: Duration = Duration::from_secs(30);

/// How long the cluster may take to heal or a change to show.
const PATIENCE: Duration = Duration::from_secs(60);

/// A one-hop client of `cluster`'s model, secured as a client member.
async fn one_hop_client(cluster: &ManagedCluster, model: ModelSource) -> DirectClient {
    let coordinators = cluster.coordinators.urls.values().cloned().collect();
    let tls = cluster
        .coordinators
        .security
        .for_role(Role::Client, "one-hop-test");
    DirectClient::connect(coordinators, "test-model", model, tls)
        .await
        .expect("the one-hop client follows the placement")
}

/// Whether `got` and `want` hold the same values, bit for bit.
fn same_bits(got: &[f32], want: &[f32]) -> bool {
    got.len() == want.len() && first_difference(got, want).is_none()
}

fn first_difference(got: &[f32], want: &[f32]) -> Option<usize> {
    got.iter()
        .zip(want)
        .position(|(got, want)| got.to_bits() != want.to_bits())
}

/// Fails naming the first value whose bits differ.
fn assert_same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(index) = first_difference(got, want) {
        panic!(
            "{what}: value {index} is {} here and {} there",
            got[index], want[index]
        );
    }
}

/// A pre-routed forward of `rows` through the one-hop client.
async fn one_hop_routed(
    direct: &DirectClient,
    layer: u32,
    rows: &[f32],
    routing: &Routing,
) -> Result<Vec<f32>, RouterError> {
    let (ids, weights) = (&routing.experts, &routing.weights);
    direct
        .forward_routed_f32(layer, rows, ids, weights, routing.top_k, DEADLINE)
        .await
}

/// The same forward through the router.
async fn router_routed(
    router: &mut Client,
    layer: u32,
    rows: &[f32],
    hidden: usize,
    routing: &Routing,
) -> Result<Vec<f32>, ClientError> {
    let (ids, weights) = (&routing.experts, &routing.weights);
    router
        .forward_routed_f32("", layer, rows, hidden, ids, weights, routing.top_k)
        .await
}

/// The one-hop client's refusal as a router's status: (code, message).
fn one_hop_refusal(result: Result<Vec<f32>, RouterError>) -> (tonic::Code, String) {
    let status = tonic::Status::from(result.expect_err("the one-hop client should refuse"));
    (status.code(), status.message().to_string())
}

/// Malformed variants of two tokens of `input` routed to experts 0..2k of
/// `layer`, each as (what its refusal says, layer, rows, routing).
fn malformed_requests(
    config: &ModelConfig,
    layer: u32,
    input: &[f32],
) -> Vec<(&'static str, u32, Vec<f32>, Routing)> {
    let (hidden, top_k, experts) = (config.hidden_size, config.top_k, config.gate_experts());
    let good = Routing {
        top_k,
        experts: (0..2 * top_k as u32)
            .map(|id| id % experts as u32)
            .collect(),
        weights: vec![0.25; 2 * top_k],
        shared_weights: None,
    };
    type Change<'a> = &'a dyn Fn(&mut u32, &mut Vec<f32>, &mut Routing);
    let changes: [(&'static str, Change<'_>); 9] = [
        ("is out of range", &|_, _, r| r.experts[1] = experts as u32),
        ("token 0: duplicate expert id", &|_, _, r| {
            r.experts[1] = r.experts[0]
        }),
        ("is NaN, not a finite number", &|_, _, r| {
            r.weights[1] = f32::NAN
        }),
        ("expert_ids has", &|_, _, r| {
            r.experts.truncate(2 * top_k - 1)
        }),
        ("top_k is 0", &|_, _, r| r.top_k = 0),
        ("experts per token", &|_, _, r| r.top_k = top_k + 1),
        ("layer 99 is not served", &|layer, _, _| *layer = 99),
        ("token 1, column 5 is NaN", &|_, rows, _| {
            rows[hidden + 5] = f32::NAN
        }),
        ("overflows f32", &|_, rows, r| {
            rows.fill(1e3);
            r.weights.fill(f32::MAX);
        }),
    ];
    changes
        .into_iter()
        .map(|(needle, change)| {
            let (mut layer, mut rows, mut routing) =
                (layer, input[..2 * hidden].to_vec(), good.clone());
            change(&mut layer, &mut rows, &mut routing);
            (needle, layer, rows, routing)
        })
        .collect()
}

/// Both paths refuse each malformed request with the same code and message.
async fn refusals_match(
    router: &mut Client,
    direct: &DirectClient,
    config: &ModelConfig,
    input: &[f32],
    layer: u32,
) {
    for (needle, layer, rows, routing) in malformed_requests(config, layer, input) {
        let hidden = config.hidden_size;
        let message = match router_routed(router, layer, &rows, hidden, &routing).await {
            Err(ClientError::InvalidArgument(message)) => message,
            other => panic!("the router should refuse ({needle}): {other:?}"),
        };
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        let one_hop = one_hop_routed(direct, layer, &rows, &routing).await;
        assert_eq!(
            one_hop_refusal(one_hop),
            (tonic::Code::InvalidArgument, message)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hop_answers_and_refusals_are_the_routers_bit_for_bit() {
    for (index, name) in FIXTURES.into_iter().enumerate() {
        let fixture = Fixture::open(name);
        let hidden = fixture.hidden_size();
        let config = fixture.checkpoint.config();
        // The client calls as a member of role client: over plaintext, with
        // the cluster secret, and over mutual TLS.
        let security = [
            SandboxSecurity::Open,
            SandboxSecurity::secret(),
            SandboxSecurity::tls(),
        ];
        let security = security[index % 3].clone();
        let dead_after = Duration::from_secs(3600);
        let cluster = ManagedCluster::start_secured(&fixture.dir, 3, 2, dead_after, security).await;
        let mut router = cluster.client().await;
        let direct = one_hop_client(&cluster, ModelSource::Checkpoint(fixture.dir.clone())).await;
        assert_eq!(direct.layers(), config.moe_layers());
        for (&layer, (input, expected)) in &fixture.cases {
            let what = format!("{name} layer {layer}");
            let tokens = input.len() / hidden;
            let gate = Gate::new(config, fixture.checkpoint.load_gate(layer).unwrap());
            let routing = gate.route(input, tokens);
            let one_hop = one_hop_routed(&direct, layer as u32, input, &routing)
                .await
                .unwrap();
            let routed = router_routed(&mut router, layer as u32, input, hidden, &routing)
                .await
                .unwrap();
            assert_same_bits(&one_hop, &routed, &format!("{what}: pre-routed"));
            let error = relative_l2(
                &one_hop,
                &in_process_parts(&fixture, layer, input, &routing).0,
            );
            assert!(
                error < 1e-6,
                "{what}: vs in-process experts, relative L2 {error:e}"
            );

            // Gated by the checkpoint's gate, shared expert included.
            let one_hop = direct
                .forward_f32(layer as u32, input, DEADLINE)
                .await
                .unwrap();
            let routed = router
                .forward_f32("", layer as u32, input, hidden)
                .await
                .unwrap();
            assert_same_bits(&one_hop, &routed, &format!("{what}: gated"));
            let error = relative_l2(&one_hop, expected);
            assert!(
                error < 1e-5,
                "{what}: gated vs transformers, relative L2 {error:e}"
            );
        }
        let (&layer, (input, _)) = fixture.cases.iter().next().unwrap();
        refusals_match(&mut router, &direct, config, input, layer as u32).await;
        drop(direct);
        cluster.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_hop_tokens_output_does_not_depend_on_its_batch() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let config = ModelConfig::from_dir(&fixture.dir).unwrap();
    let layer = *fixture.cases.keys().min().unwrap() as u32;
    let cluster = ManagedCluster::start(&fixture.dir, 3, 2, Duration::from_secs(3600)).await;
    // The config alone: pre-routed forwards only.
    let direct = one_hop_client(&cluster, ModelSource::Config(config.clone())).await;
    let gated = direct
        .forward_f32(layer, &vec![0.5; hidden], DEADLINE)
        .await;
    let (code, message) = one_hop_refusal(gated);
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(message.contains("has no gate here"), "{message}");

    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    for _ in 0..12 {
        let top_k = rng.random_range(1..=config.top_k);
        let victim_tokens = rng.random_range(1..4);
        let victim = random_rows(&mut rng, victim_tokens, hidden);
        let victim_routing = random_routing(&mut rng, victim_tokens, top_k, config.num_experts);
        let alone = one_hop_routed(&direct, layer, &victim, &victim_routing)
            .await
            .unwrap();

        let others = rng.random_range(1..100);
        let position = rng.random_range(0..=others);
        let mut batch = random_rows(&mut rng, others, hidden);
        batch.splice(position * hidden..position * hidden, victim.iter().copied());
        let mut routing = random_routing(&mut rng, others, top_k, config.num_experts);
        let at = position * top_k;
        routing
            .experts
            .splice(at..at, victim_routing.experts.iter().copied());
        routing
            .weights
            .splice(at..at, victim_routing.weights.iter().copied());
        let together = one_hop_routed(&direct, layer, &batch, &routing)
            .await
            .unwrap();
        assert_same_bits(
            &together[position * hidden..(position + victim_tokens) * hidden],
            &alone,
            &format!(
                "victim at {position} of {} tokens, top_k {top_k}",
                others + victim_tokens
            ),
        );
    }
    drop(direct);
    cluster.shutdown().await;
}

/// Tasks that share one one-hop client and forward the same rows without
/// pause, alternating pre-routed and gated forwards, until stopped; every
/// answer must have the bits of the first ones.
struct OneHopLoad {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl OneHopLoad {
    /// Starts `tasks` tasks forwarding `input` through `layer` by `routing`
    /// (pre-routed) and by the gate.
    async fn start(
        direct: Arc<DirectClient>,
        tasks: usize,
        layer: u32,
        input: Vec<f32>,
        routing: Routing,
    ) -> Self {
        let routed = one_hop_routed(&direct, layer, &input, &routing)
            .await
            .unwrap();
        let gated = direct.forward_f32(layer, &input, DEADLINE).await.unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let shared = Arc::new((input, routing, routed, gated));
        let tasks = (0..tasks)
            .map(|_| {
                let (direct, shared) = (Arc::clone(&direct), Arc::clone(&shared));
                let (stop, served) = (Arc::clone(&stop), Arc::clone(&served));
                tokio::spawn(async move {
                    let (input, routing, routed, gated) = &*shared;
                    let mut failures = Vec::new();
                    let mut pre_routed = true;
                    while !stop.load(Ordering::Relaxed) {
                        let (answer, want) = if pre_routed {
                            (one_hop_routed(&direct, layer, input, routing).await, routed)
                        } else {
                            (direct.forward_f32(layer, input, DEADLINE).await, gated)
                        };
                        match answer {
                            Ok(output) if same_bits(&output, want) => {}
                            Ok(_) => {
                                failures.push(format!("other bits (pre-routed: {pre_routed})"))
                            }
                            Err(error) => failures.push(error.to_string()),
                        }
                        served.fetch_add(1, Ordering::Relaxed);
                        pre_routed = !pre_routed;
                    }
                    failures
                })
            })
            .collect();
        Self {
            stop,
            served,
            tasks,
        }
    }

    fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }

    /// Waits until `more` forwards past now have been answered.
    async fn wait_for(&self, more: usize) {
        let target = self.served() + more;
        let started = Instant::now();
        while self.served() < target {
            assert!(
                started.elapsed() < PATIENCE,
                "forwards stalled at {}",
                self.served()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the tasks and returns every failure they saw.
    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut failures = Vec::new();
        for task in self.tasks {
            failures.extend(task.await.expect("load task"));
        }
        failures
    }
}

/// Each token of `tokens` routed to `top_k` consecutive experts (so that
/// every expert of `num_experts` is used when there are enough tokens).
fn covering_routing(tokens: usize, top_k: usize, num_experts: usize) -> Routing {
    let experts = (0..tokens * top_k)
        .map(|pair| (pair % num_experts) as u32)
        .collect();
    let weights = (0..tokens * top_k)
        .map(|pair| 0.1 + 0.05 * (pair % top_k) as f32)
        .collect();
    Routing {
        top_k,
        experts,
        weights,
        shared_weights: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_fails_no_one_hop_forward_when_experts_have_two_replicas() {
    let fixture = Fixture::open("deepseek_v3");
    let (input, _) = fixture.cases[&1].clone();
    let config = fixture.checkpoint.config();
    let tokens = input.len() / config.hidden_size;
    let routing = covering_routing(tokens, config.top_k, config.num_experts);
    let mut cluster = ManagedCluster::start(&fixture.dir, 3, 2, Duration::from_millis(1500)).await;
    let direct =
        Arc::new(one_hop_client(&cluster, ModelSource::Checkpoint(fixture.dir.clone())).await);
    let load = OneHopLoad::start(Arc::clone(&direct), 3, 1, input, routing).await;
    load.wait_for(20).await;

    let victim = cluster.node_ids()[1].clone();
    let killed_at = Instant::now();
    let served_before = load.served();
    cluster.kill_node(&victim).await;

    // The cluster heals while the client forwards: the victim is dead and
    // every expert has two ready replicas on live nodes again.
    let mut admin = cluster.admin(3).await;
    loop {
        let (Ok(status), Ok(placement)) = (
            admin.cluster_status().await,
            admin.show_placement("test-model", Some(1)).await,
        ) else {
            assert!(
                killed_at.elapsed() < PATIENCE,
                "the coordinators never answered"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let victim_dead = status
            .nodes
            .iter()
            .any(|node| node.id == victim && node.status() == NodeStatus::Dead);
        let healed = placement.experts.iter().all(|expert| {
            let ready = expert
                .replicas
                .iter()
                .filter(|replica| replica.state() == ReplicaState::Ready && replica.node != victim);
            ready.count() >= 2
        });
        if victim_dead && healed && direct.placement_epoch() >= placement.epoch {
            break;
        }
        assert!(
            killed_at.elapsed() < PATIENCE,
            "the cluster never healed: {status:?} {placement:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    load.wait_for(20).await;
    let served = load.served() - served_before;
    let failures = load.stop().await;
    println!(
        "node killed under one-hop load: {served} forwards meanwhile, {} failed; healed after {:?}",
        failures.len(),
        killed_at.elapsed()
    );
    assert!(failures.is_empty(), "{failures:?}");
    drop(direct);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_hop_client_follows_replica_moves_and_reports_its_load() {
    let fixture = Fixture::open("deepseek_v3");
    let (input, _) = fixture.cases[&1].clone();
    let config = fixture.checkpoint.config();
    let tokens = input.len() / config.hidden_size;
    let routing = covering_routing(tokens, config.top_k, config.num_experts);
    // One replica per expert: a client still calling a moved expert's old
    // node would fail once the old replica is gone.
    let cluster = ManagedCluster::start(&fixture.dir, 3, 1, Duration::from_secs(3600)).await;
    let direct =
        Arc::new(one_hop_client(&cluster, ModelSource::Checkpoint(fixture.dir.clone())).await);
    let first_epoch = direct.placement_epoch();
    let load = OneHopLoad::start(Arc::clone(&direct), 2, 1, input, routing).await;
    load.wait_for(10).await;

    let mut admin = cluster.admin(1).await;
    let before = admin.show_placement("test-model", Some(1)).await.unwrap();
    let nodes = cluster.node_ids();
    let mut last_epoch = 0;
    for expert in [0u32, 7, 13] {
        let holder = &before
            .experts
            .iter()
            .find(|e| e.expert == expert)
            .unwrap()
            .replicas[0]
            .node;
        let target = nodes.iter().find(|node| *node != holder).unwrap();
        last_epoch = admin
            .move_replica("test-model", 1, expert, holder, target)
            .await
            .unwrap()
            .epoch;
        load.wait_for(5).await;
    }
    let started = Instant::now();
    while direct.placement_epoch() < last_epoch {
        assert!(
            started.elapsed() < PATIENCE,
            "the client never saw epoch {last_epoch}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(last_epoch > first_epoch);
    // Forward on past the drained replicas' grace.
    tokio::time::sleep(Duration::from_millis(600)).await;
    load.wait_for(20).await;
    let failures = load.stop().await;
    assert!(
        failures.is_empty(),
        "failed one-hop forwards during moves: {failures:?}"
    );

    // The coordinators' load window counts the client's tokens, as a
    // router's (this cluster's router forwarded nothing).
    let started = Instant::now();
    loop {
        let stats = admin.load_stats("test-model").await.unwrap();
        let counted: u64 = stats
            .layers
            .iter()
            .filter(|layer| layer.layer == 1)
            .flat_map(|layer| layer.tokens.iter())
            .sum();
        if counted > 0 {
            break;
        }
        assert!(started.elapsed() < PATIENCE, "no load reported: {stats:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(direct);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secured_cluster_counts_one_hop_load_through_its_expert_nodes() {
    let fixture = Fixture::open("mixtral");
    let (input, _) = fixture.cases[&0].clone();
    let config = fixture.checkpoint.config();
    let tokens = input.len() / config.hidden_size;
    let routing = covering_routing(tokens, config.top_k, config.num_experts);
    let dead_after = Duration::from_secs(3600);
    let cluster =
        ManagedCluster::start_secured(&fixture.dir, 2, 1, dead_after, SandboxSecurity::secret())
            .await;
    let direct = one_hop_client(&cluster, ModelSource::Checkpoint(fixture.dir.clone())).await;
    // Every node's first heartbeat is its baseline: let them all come
    // before the client sends anything.
    tokio::time::sleep(Duration::from_secs(1)).await;
    const FORWARDS: u64 = 5;
    for _ in 0..FORWARDS {
        one_hop_routed(&direct, 0, &input, &routing).await.unwrap();
    }
    let mut want = vec![0u64; config.num_experts];
    for &expert in &routing.experts {
        want[expert as usize] += FORWARDS;
    }
    let want_total: u64 = want.iter().sum();

    // The client's own reports are refused (it is a member of role
    // client), so the window holds exactly what the nodes computed for it.
    let mut admin = cluster.admin(1).await;
    let started = Instant::now();
    let counted = loop {
        let stats = admin.load_stats("test-model").await.unwrap();
        let counted = stats
            .layers
            .iter()
            .find(|layer| layer.layer == 0)
            .map(|layer| layer.tokens.clone())
            .unwrap_or_default();
        if counted.iter().sum::<u64>() >= want_total {
            assert_eq!(stats.nodes_per_token, 0.0, "no router forwarded anything");
            break counted;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the one-hop load never reached the coordinators: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut counted = counted;
    counted.resize(config.num_experts, 0);
    assert_eq!(counted, want, "tokens per expert of layer 0");
    drop(direct);
    cluster.shutdown().await;
}
