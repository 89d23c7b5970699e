//! Losing an expert node under load: with every expert on two nodes no
//! request fails, and the cluster heals itself while serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use moemesh_core::backend::CpuBackend;
use moemesh_core::layer::MoeLayer;
use moemesh_tests::{Fixture, ManagedCluster, relative_l2};

const PATIENCE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_under_load_fails_no_request_when_experts_have_two_replicas() {
    let fixture = Fixture::open("deepseek_v3");
    let hidden = fixture.hidden_size();
    let (input, _) = fixture.cases[&1].clone();
    let reference = MoeLayer::load(&fixture.checkpoint, 1, &CpuBackend::new(1).unwrap())
        .unwrap()
        .forward(&input, input.len() / hidden);
    let mut cluster = ManagedCluster::start(&fixture.dir, 3, 2, Duration::from_millis(1500)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..3 {
        let mut client = cluster.client().await;
        let (stop, served, input, reference) = (
            Arc::clone(&stop),
            Arc::clone(&served),
            input.clone(),
            reference.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.forward_f32("", 1, &input, hidden).await {
                    Ok(output) => {
                        let error = relative_l2(&output, &reference);
                        if error >= 1e-6 {
                            failures.push(format!("relative L2 error {error:e}"));
                        }
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(error) => failures.push(error.to_string()),
                }
            }
            failures
        }));
    }
    while served.load(Ordering::Relaxed) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let victim = cluster.node_ids()[1].clone();
    let killed_at = Instant::now();
    let served_before = served.load(Ordering::Relaxed);
    cluster.kill_node(&victim).await;

    // The cluster heals while serving: the victim is dead and every expert
    // has two ready replicas on live nodes again.
    let mut admin = cluster.admin(3).await;
    loop {
        let status = admin.cluster_status().await.unwrap();
        let placement = admin.show_placement("test-model", Some(1)).await.unwrap();
        let victim_dead = status
            .nodes
            .iter()
            .any(|node| node.id == victim && node.status == "dead");
        let healed = placement.experts.iter().all(|expert| {
            expert
                .replicas
                .iter()
                .filter(|replica| replica.state == "ready" && replica.node != victim)
                .count()
                >= 2
        });
        if victim_dead && healed {
            break;
        }
        assert!(
            killed_at.elapsed() < PATIENCE,
            "the cluster never healed: {status:?} {placement:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let healed_after = killed_at.elapsed();
    let served_at_heal = served.load(Ordering::Relaxed);
    while served.load(Ordering::Relaxed) < served_at_heal + 10 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for task in load {
        failures.extend(task.await.unwrap());
    }
    println!(
        "node killed under load: {} requests served meanwhile, {} failed; healthy again after {healed_after:?}",
        served.load(Ordering::Relaxed) - served_before,
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(served.load(Ordering::Relaxed) > served_before);
    cluster.shutdown().await;
}
