//! Measures how the CPU experts scale from one thread to several in one
//! process, and where the difference goes. Eight Mixtral-shaped experts
//! (hidden 1024, intermediate 2816), `rows` rows each:
//!
//! - **alone**: one thread computes them in turn;
//! - **side by side, loaded by one thread**: `threads` plain threads each
//!   compute their own share of the experts over and over, the weights laid
//!   out by the main thread, as the backend loads them;
//! - **side by side, loaded by each**: the same, each thread laying out
//!   its own experts' weights first (first touch puts them in its memory
//!   node where the machine has several);
//! - **the backend**: one call computing all eight, as a layer's forward
//!   does, on the backend's `threads`.
//!
//! Side by side at `threads` times the rate alone means the threads do not
//! slow each other; a gap between the two kinds of loading points at memory
//! placement; the backend below side by side points at how it hands out
//! work.
//!
//!     cargo run --release -p moemesh-core --example thread_scaling -- [rows] [threads] [seconds] [f32|bf16]

use std::sync::Arc;
use std::time::{Duration, Instant};

use mixtral_shaped::{HIDDEN, INTERMEDIATE, pseudo_random};
use moemesh_core::compute::{ComputeBackend, CpuBackend, Expert, ExpertWork, WeightFormat};

mod mixtral_shaped;

const EXPERTS: u32 = 8;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |index: usize, default: usize| {
        args.get(index)
            .map_or(default, |arg| arg.parse().expect("numeric arguments"))
    };
    let (rows, threads, seconds) = (number(0, 128), number(1, 2), number(2, 3));
    let format: WeightFormat = args
        .get(3)
        .map_or(Ok(WeightFormat::F32), |arg| arg.parse())
        .expect("f32 or bf16");
    let period = Duration::from_secs(seconds as u64);
    let input = pseudo_random(rows * HIDDEN, 4);
    let expert_flops = 2.0 * rows as f64 * 3.0 * (HIDDEN * INTERMEDIATE) as f64;
    let single = CpuBackend::with_format(1, format).expect("thread pool");
    let experts = mixtral_shaped::experts(&single, EXPERTS);
    println!(
        "{EXPERTS} experts of {rows} rows on {}, {threads} threads, {seconds} s a figure",
        single.describe()
    );

    let alone = rate(expert_flops, period, |count| {
        for index in 0..count {
            forward(&*experts[index % experts.len()], &input, rows);
        }
    });
    println!("alone:                            {alone:6.1} GFLOP/s");

    let shared = side_by_side(
        threads,
        period,
        expert_flops,
        |thread| {
            let share = experts.iter().skip(thread % experts.len()).step_by(threads);
            share.cloned().collect()
        },
        &input,
        rows,
    );
    println!(
        "side by side, loaded by one thread: {shared:6.1} GFLOP/s ({:.2} of {threads} alone)",
        shared / alone / threads as f64
    );
    let own = side_by_side(
        threads,
        period,
        expert_flops,
        |_| mixtral_shaped::experts(&single, (EXPERTS / threads as u32).max(1)),
        &input,
        rows,
    );
    println!(
        "side by side, loaded by each:       {own:6.1} GFLOP/s ({:.2} of {threads} alone)",
        own / alone / threads as f64
    );

    let backend = CpuBackend::with_format(threads, format).expect("thread pool");
    let experts = mixtral_shaped::experts(&backend, EXPERTS);
    let all_rows: Vec<u32> = (0..rows as u32).collect();
    let weights = vec![1.0f32; rows];
    let work: Vec<ExpertWork<'_>> = experts
        .iter()
        .map(|expert| ExpertWork {
            expert: expert.as_ref(),
            rows: &all_rows,
            weights: &weights,
        })
        .collect();
    let layer = rate(expert_flops * EXPERTS as f64, period, |count| {
        for _ in 0..count {
            std::hint::black_box(
                backend
                    .expert_outputs(&input, HIDDEN, &work)
                    .expect("forward"),
            );
        }
    });
    println!(
        "the backend, all {EXPERTS} in one call:     {layer:6.1} GFLOP/s ({:.2} of side by side)",
        layer / shared
    );
}

/// One expert's forward on `rows` rows of `input`.
fn forward(expert: &dyn Expert, input: &[f32], rows: usize) {
    let mut output = vec![0f32; rows * HIDDEN];
    expert.forward(input, rows, &mut output);
    std::hint::black_box(output);
}

/// GFLOP/s of `run(count)`, `flops` each, run in batches for `period`.
fn rate(flops: f64, period: Duration, mut run: impl FnMut(usize)) -> f64 {
    run(1);
    let (started, mut count) = (Instant::now(), 0);
    while started.elapsed() < period {
        run(EXPERTS as usize);
        count += EXPERTS as usize;
    }
    flops * count as f64 / started.elapsed().as_secs_f64() / 1e9
}

/// Aggregate GFLOP/s of `threads` threads computing, for `period`, each its
/// own experts (`experts_of(thread)`, called on that thread, so that it
/// lays out any experts it makes) in turn.
fn side_by_side(
    threads: usize,
    period: Duration,
    expert_flops: f64,
    experts_of: impl Fn(usize) -> Vec<Arc<dyn Expert>> + Sync,
    input: &[f32],
    rows: usize,
) -> f64 {
    let start = std::sync::Barrier::new(threads);
    let rates: Vec<f64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|thread| {
                let (start, experts_of) = (&start, &experts_of);
                scope.spawn(move || {
                    let mine = experts_of(thread);
                    start.wait();
                    rate(expert_flops, period, |count| {
                        for index in 0..count {
                            forward(&*mine[index % mine.len()], input, rows);
                        }
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    rates.iter().sum()
}
