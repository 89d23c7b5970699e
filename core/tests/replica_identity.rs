//! A token's output is the same bits whichever replica computes it: CPU
//! backends with other thread counts and other blockings (columns per
//! thread, task sizes) agree bit for bit, in f32 and in bf16.

use std::sync::Arc;

use moemesh_core::compute::{
    ComputeBackend, CpuBackend, CpuBlocking, Expert, ExpertWork, WeightFormat,
};
use moemesh_core::model::checkpoint::ExpertWeights;
use moemesh_core::model::config::Activation;
use rand::{Rng, SeedableRng};

/// Dimensions that are multiples of neither a panel nor a register: the
/// gate/up product sums 1100 inputs, the down product an intermediate
/// slice of 672 or 628.
const HIDDEN: usize = 1100;
const INTERMEDIATE: usize = 1300;
const EXPERTS: u64 = 4;
const TOKEN_COUNTS: [usize; 4] = [1, 7, 64, 300];

fn random_expert(seed: u64) -> ExpertWeights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut matrix =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-0.05f32..0.05)).collect() };
    ExpertWeights {
        hidden_size: HIDDEN,
        intermediate_size: INTERMEDIATE,
        gate_proj: matrix(INTERMEDIATE * HIDDEN),
        up_proj: matrix(INTERMEDIATE * HIDDEN),
        down_proj: matrix(HIDDEN * INTERMEDIATE),
        activation: Activation::SiluGlu,
        biases: None,
    }
}

/// A replica: a backend with `threads` threads cut by `blocking`, and the
/// same experts loaded on it.
struct Replica {
    label: String,
    backend: CpuBackend,
    experts: Vec<Arc<dyn Expert>>,
}

impl Replica {
    fn new(threads: usize, format: WeightFormat, blocking: CpuBlocking) -> Self {
        let backend = CpuBackend::with_blocking(threads, format, blocking).unwrap();
        let experts = (0..EXPERTS)
            .map(|seed| backend.load_expert(random_expert(seed)).unwrap())
            .collect();
        Self {
            label: format!("{format}, {threads} threads, {blocking:?}"),
            backend,
            experts,
        }
    }
}

/// The replicas compared with the first: other thread counts, columns per
/// thread fewer and more than the default (one panel each), tasks cut
/// finer.
fn replicas(format: WeightFormat) -> Vec<Replica> {
    let default = CpuBlocking::default();
    vec![
        Replica::new(1, format, default),
        Replica::new(
            2,
            format,
            CpuBlocking {
                panel_columns: 48,
                min_task_rows: 5,
            },
        ),
        Replica::new(
            3,
            format,
            CpuBlocking {
                panel_columns: 300,
                min_task_rows: 33,
            },
        ),
        Replica::new(
            2,
            format,
            CpuBlocking {
                panel_columns: 1,
                ..default
            },
        ),
    ]
}

/// Top-2 routing of `tokens` tokens over the experts: per expert, its rows
/// (increasing) and their weights.
fn routing(tokens: usize, rng: &mut impl Rng) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut routed = vec![(Vec::new(), Vec::new()); EXPERTS as usize];
    for token in 0..tokens as u32 {
        let first = rng.random_range(0..EXPERTS as usize);
        let second = (first + rng.random_range(1..EXPERTS as usize)) % EXPERTS as usize;
        for expert in [first, second] {
            routed[expert].0.push(token);
            routed[expert].1.push(rng.random_range(0.1f32..0.9));
        }
    }
    routed
}

fn bits(values: &[f32]) -> Vec<u32> {
    values.iter().map(|value| value.to_bits()).collect()
}

/// The layer's combined output and each expert's own forward on the batch.
fn outputs(replica: &Replica, input: &[f32], routed: &[(Vec<u32>, Vec<f32>)]) -> Vec<Vec<u32>> {
    let work: Vec<ExpertWork<'_>> = replica
        .experts
        .iter()
        .zip(routed)
        .map(|(expert, (rows, weights))| ExpertWork {
            expert: expert.as_ref(),
            rows,
            weights,
        })
        .collect();
    let mut all = vec![bits(
        &replica.backend.run_experts(input, HIDDEN, &work).unwrap(),
    )];
    let tokens = input.len() / HIDDEN;
    for expert in &replica.experts {
        let mut output = vec![0f32; input.len()];
        expert.forward(input, tokens, &mut output);
        all.push(bits(&output));
    }
    all
}

fn replicas_agree_bit_for_bit(format: WeightFormat) {
    let replicas = replicas(format);
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for tokens in TOKEN_COUNTS {
        let input: Vec<f32> = (0..tokens * HIDDEN)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let routed = routing(tokens, &mut rng);
        let reference = outputs(&replicas[0], &input, &routed);
        assert!(reference[0].iter().any(|&value| value != 0));
        for replica in &replicas[1..] {
            let got = outputs(replica, &input, &routed);
            for (index, (got, want)) in got.iter().zip(&reference).enumerate() {
                let what = match index {
                    0 => "the combined layer".to_string(),
                    expert => format!("expert {}", expert - 1),
                };
                let differing = got.iter().zip(want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differing, 0,
                    "{tokens} tokens, {what}: {} differs from {} in {differing} values",
                    replica.label, replicas[0].label
                );
            }
        }
    }
}

#[test]
fn f32_replicas_cut_differently_agree_bit_for_bit() {
    replicas_agree_bit_for_bit(WeightFormat::F32);
}

#[test]
fn bf16_replicas_cut_differently_agree_bit_for_bit() {
    replicas_agree_bit_for_bit(WeightFormat::Bf16);
}

#[test]
fn blockings_that_cannot_run_are_refused_with_the_bad_value() {
    let refused = |blocking: CpuBlocking| {
        CpuBackend::with_blocking(1, WeightFormat::Bf16, blocking)
            .err()
            .expect("refused")
            .to_string()
    };
    let default = CpuBlocking::default();
    let error = refused(CpuBlocking {
        panel_columns: 0,
        ..default
    });
    assert!(error.contains("panel_columns is 0"), "{error}");
    let error = refused(CpuBlocking {
        min_task_rows: 0,
        ..default
    });
    assert!(error.contains("min_task_rows is 0"), "{error}");
}
