use std::collections::BTreeSet;

use rand::{Rng, SeedableRng};

use super::*;

/// A device of `capacity` bytes that carries decisions out and fails if
/// the ledger ever lets it overflow or disagrees with what it holds.
struct FakeDevice {
    capacity: u64,
    held: BTreeSet<u32>,
    used: u64,
    expert_bytes: u64,
    paged_in: u64,
    streamed: u64,
    waiting_computes: u64,
}

impl FakeDevice {
    fn new(capacity: u64, expert_bytes: u64) -> Self {
        Self {
            capacity,
            held: BTreeSet::new(),
            used: 0,
            expert_bytes,
            paged_in: 0,
            streamed: 0,
            waiting_computes: 0,
        }
    }

    /// Runs one job through `buffer`, as an expert node's worker does.
    fn run_job(
        &mut self,
        buffer: &mut ExpertBuffer<u32>,
        demand: &[(u32, usize)],
        cost: &CostModel,
    ) {
        buffer.begin_job(demand.iter().copied());
        for &(expert, tokens) in demand {
            let flops = 2.0 * tokens as f64 * self.expert_bytes as f64;
            match buffer.decide(expert, self.expert_bytes, flops, cost) {
                Decision::Hit => assert!(self.held.contains(&expert), "hit on {expert}, not held"),
                Decision::PageIn { evict } => {
                    for victim in evict {
                        assert!(self.held.remove(&victim), "evicted {victim}, not held");
                        self.used -= self.expert_bytes;
                    }
                    self.used += self.expert_bytes;
                    assert!(self.used <= self.capacity, "device overflows");
                    self.held.insert(expert);
                    self.paged_in += self.expert_bytes;
                }
                // A stream slot sits outside the budget, freed after the job.
                Decision::Stream => self.streamed += self.expert_bytes,
                Decision::ComputeWhereItWaits => self.waiting_computes += 1,
            }
        }
        assert_eq!(buffer.used(), self.used);
        assert_eq!(
            buffer.resident(),
            self.held.iter().copied().collect::<Vec<_>>()
        );
    }
}

/// PCIe-like: paging an expert in always pays off against computing it on
/// a host 100 times slower... unless it has only a few tokens.
fn gpu_like() -> CostModel {
    CostModel {
        page_in_bytes_per_second: 25e9,
        resident_flops: 500e12,
        waiting_flops: Some(1e12),
    }
}

fn cpu_like() -> CostModel {
    CostModel {
        page_in_bytes_per_second: 5e9,
        resident_flops: 1e11,
        waiting_flops: None,
    }
}

/// Skewed traffic: expert e takes tokens with weight 1/(e+1).
fn skewed_job(rng: &mut rand::rngs::StdRng, experts: u32, tokens: usize) -> Vec<(u32, usize)> {
    let weights: Vec<f64> = (0..experts).map(|e| 1.0 / (e as f64 + 1.0)).collect();
    let total: f64 = weights.iter().sum();
    let mut counts = vec![0usize; experts as usize];
    for _ in 0..tokens {
        let mut pick = rng.random_range(0.0..total);
        for (expert, weight) in weights.iter().enumerate() {
            if pick < *weight {
                counts[expert] += 1;
                break;
            }
            pick -= weight;
        }
    }
    (0..experts)
        .zip(counts)
        .filter(|&(_, count)| count > 0)
        .collect()
}

#[test]
fn the_hot_experts_settle_resident_and_the_budget_is_never_exceeded() {
    let expert_bytes = 1000;
    let mut buffer = ExpertBuffer::new(4 * expert_bytes);
    let mut device = FakeDevice::new(4 * expert_bytes, expert_bytes);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let (mut tokens_total, mut tokens_resident) = (0, 0);
    for _ in 0..300 {
        let job = skewed_job(&mut rng, 8, 64);
        for &(expert, tokens) in &job {
            tokens_total += tokens;
            if buffer.is_resident(&expert) {
                tokens_resident += tokens;
            }
        }
        device.run_job(&mut buffer, &job, &cpu_like());
    }
    // The four hottest of eight skewed experts end resident: they take
    // 2.08/2.72 of the tokens. Every expert appears in nearly every job, so
    // plain LRU would thrash and serve few tokens from resident experts.
    assert_eq!(buffer.resident(), vec![0, 1, 2, 3]);
    let token_hit_rate = tokens_resident as f64 / tokens_total as f64;
    assert!(token_hit_rate > 0.7, "token hit rate {token_hit_rate}");
    let counters = buffer.counters();
    assert_eq!(
        counters.computed_where_waiting, 0,
        "the CPU has nowhere else to compute"
    );
    assert_eq!(counters.bytes_paged_in, device.paged_in + device.streamed);
}

#[test]
fn eviction_takes_the_coldest_and_breaks_ties_by_least_recent_use() {
    let mut buffer = ExpertBuffer::new(3);
    let cost = cpu_like();
    for (expert, tokens) in [(0u32, 5usize), (1, 1), (2, 1)] {
        buffer.begin_job([(expert, tokens)]);
        assert_eq!(
            buffer.decide(expert, 1, 1.0, &cost),
            Decision::PageIn { evict: vec![] }
        );
    }
    // 1 and 2 are equally cold; 1 was used longer ago.
    buffer.begin_job([(3, 2)]);
    assert_eq!(
        buffer.decide(3, 1, 1.0, &cost),
        Decision::PageIn { evict: vec![1] }
    );
    assert_eq!(buffer.resident(), vec![0, 2, 3]);
    // An expert colder than everything resident streams through.
    buffer.begin_job([(4, 0)]);
    assert_eq!(buffer.decide(4, 1, 1.0, &cost), Decision::Stream);
    assert_eq!(buffer.resident(), vec![0, 2, 3]);
}

#[test]
fn experts_of_the_running_job_are_never_evicted_for_another_of_it() {
    let mut buffer = ExpertBuffer::new(2);
    let cost = cpu_like();
    buffer.begin_job([(0, 1), (1, 1)]);
    buffer.decide(0, 1, 1.0, &cost);
    buffer.decide(1, 1, 1.0, &cost);
    buffer.begin_job([(0, 1), (1, 1), (2, 50)]);
    assert_eq!(buffer.decide(0, 1, 1.0, &cost), Decision::Hit);
    assert_eq!(buffer.decide(1, 1, 1.0, &cost), Decision::Hit);
    assert_eq!(buffer.decide(2, 1, 1.0, &cost), Decision::Stream);
    // Next job, 2 is hottest and displaces the colder of the two.
    buffer.begin_job([(2, 50)]);
    assert_eq!(
        buffer.decide(2, 1, 1.0, &cost),
        Decision::PageIn { evict: vec![0] }
    );
}

#[test]
fn an_expert_larger_than_the_budget_streams_and_evicts_nothing() {
    let mut buffer = ExpertBuffer::new(10);
    buffer.begin_job([(0, 1)]);
    assert!(buffer.admit(0, 6));
    buffer.begin_job([(1, 100)]);
    assert_eq!(buffer.decide(1, 11, 1.0, &cpu_like()), Decision::Stream);
    assert_eq!(buffer.resident(), vec![0]);
    assert!(!buffer.admit(2, 5), "admitting past the budget");
}

#[test]
fn the_cost_model_computes_a_few_tokens_where_they_wait_and_pages_in_for_many() {
    let cost = gpu_like();
    // A Mixtral expert: 3 × 4096 × 14336 bf16 weights, 2 FLOP per weight per token.
    let bytes = 3 * 4096 * 14336 * 2u64;
    let flops = |tokens: f64| 2.0 * tokens * (bytes / 2) as f64;
    // 352 MB over 25 GB/s is 14 ms; the host does 1 TFLOP/s, 0.35 GFLOP per token.
    assert!(cost.prefers_waiting_tier(bytes, flops(1.0)));
    assert!(cost.prefers_waiting_tier(bytes, flops(30.0)));
    assert!(!cost.prefers_waiting_tier(bytes, flops(100.0)));
    assert!(!cpu_like().prefers_waiting_tier(bytes, flops(1.0)));

    let mut buffer = ExpertBuffer::new(bytes);
    buffer.begin_job([(0, 1)]);
    assert_eq!(
        buffer.decide(0, bytes, flops(1.0), &cost),
        Decision::ComputeWhereItWaits
    );
    buffer.begin_job([(0, 500)]);
    assert_eq!(
        buffer.decide(0, bytes, flops(500.0), &cost),
        Decision::PageIn { evict: vec![] }
    );
    let counters = buffer.counters();
    assert_eq!((counters.misses, counters.computed_where_waiting), (2, 1));
    assert_eq!(counters.bytes_paged_in, bytes);
}

#[test]
fn sizes_parse_with_units() {
    assert_eq!(parse_byte_size("6MiB"), Ok(6 << 20));
    assert_eq!(parse_byte_size("1.5 GiB"), Ok(3 << 29));
    assert_eq!(parse_byte_size("2GB"), Ok(2_000_000_000));
    assert_eq!(parse_byte_size("4096"), Ok(4096));
    assert!(parse_byte_size("lots").unwrap_err().contains("lots"));
    assert_eq!(format_byte_size(6 << 20), "6.0 MiB");
}
