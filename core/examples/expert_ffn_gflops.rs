//! Measures the CPU expert FFN: one Mixtral-shaped expert (hidden 1024,
//! intermediate 2816) on a batch of tokens, as GFLOP/s.
//!
//! Eight experts run in turn, so that their weights come from memory.
//! With `idle_ms`, the process sleeps that long before each forward, as a
//! node at low load idles between requests.
//!
//!     cargo run --release -p moemesh-core --example expert_ffn_gflops -- [tokens] [threads] [repeats] [f32|bf16] [idle_ms]

use std::time::Instant;

use gemm::Parallelism;
use mixtral_shaped::{HIDDEN, INTERMEDIATE, pseudo_random};
use moemesh_core::compute::{ComputeBackend, CpuBackend, matmul};

mod mixtral_shaped;

fn main() {
    let args = mixtral_shaped::Args::from_env();
    let (tokens, threads, repeats) = (args.number(0, 512), args.number(1, 0), args.number(2, 20));
    let format = args.format(3);
    let idle = std::time::Duration::from_millis(args.number(4, 0) as u64);
    let (hidden, intermediate) = (HIDDEN, INTERMEDIATE);
    let backend = CpuBackend::with_format(threads, format).expect("thread pool");
    let experts = mixtral_shaped::experts(&backend, 8);
    let input = pseudo_random(tokens * hidden, 4);
    let mut output = vec![0f32; tokens * hidden];
    experts[0].forward(&input, tokens, &mut output);
    let mut seconds = Vec::with_capacity(repeats);
    for repeat in 0..repeats {
        std::thread::sleep(idle);
        let started = Instant::now();
        experts[repeat % experts.len()].forward(&input, tokens, &mut output);
        seconds.push(started.elapsed().as_secs_f64());
    }
    let weight_bytes = experts[0].weight_bytes() as f64;
    seconds.sort_by(f64::total_cmp);
    report_plain_gemm(tokens, hidden, intermediate, threads, repeats);
    let flops = 2.0 * tokens as f64 * 3.0 * hidden as f64 * intermediate as f64;
    let gflops = |s: f64| flops / s / 1e9;
    let median = seconds[seconds.len() / 2];
    println!(
        "expert FFN {tokens}x{hidden}x{intermediate} on {}: median {:.1} GFLOP/s, weights read at {:.1} GB/s (best {:.1}, worst {:.1} GFLOP/s) over {repeats} runs",
        backend.describe(),
        gflops(median),
        weight_bytes / median / 1e9,
        gflops(seconds[0]),
        gflops(seconds[seconds.len() - 1]),
    );
}

/// The same GEMM library on one plain [tokens, hidden] x [hidden, intermediate]
/// product, for comparison: the machine's practical ceiling.
fn report_plain_gemm(m: usize, k: usize, n: usize, threads: usize, repeats: usize) {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |c| c.get())
    } else {
        threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("pool");
    let lhs = vec![0.01f32; m * k];
    let rhs = vec![0.02f32; k * n];
    let mut dst = vec![0f32; m * n];
    let mut seconds = Vec::with_capacity(repeats);
    for repeat in 0..=repeats {
        let started = Instant::now();
        pool.install(|| matmul(&mut dst, &lhs, &rhs, m, k, n, Parallelism::Rayon(threads)));
        if repeat > 0 {
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    seconds.sort_by(f64::total_cmp);
    let flops = 2.0 * (m * k * n) as f64;
    println!(
        "plain GEMM {m}x{k}x{n} on {threads} threads: median {:.1} GFLOP/s",
        flops / seconds[seconds.len() / 2] / 1e9
    );
}
