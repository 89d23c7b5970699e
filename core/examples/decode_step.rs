//! Measures a decode step of the CPU backend against the machine's read
//! bandwidth, in the same run: `tokens` tokens routed top-2 over 8
//! Mixtral-shaped experts (hidden 1024, intermediate 2816) must stream the
//! weights of every expert they touch once, so the step's time is bounded
//! below by those bytes over the bandwidth a plain read reaches. With
//! `idle_ms`, the process sleeps that long before each step, as a node at
//! low load idles between requests: on a virtual machine the compute
//! threads then wake from halted vCPUs.
//!
//!     cargo run --release -p moemesh-core --example decode_step -- [tokens] [threads] [steps] [f32|bf16] [idle_ms]

use std::time::Instant;

use mixtral_shaped::{HIDDEN, pseudo_random};
use moemesh_core::compute::{ComputeBackend, CpuBackend, ExpertWork};

mod mixtral_shaped;

const EXPERTS: u32 = 8;
const TOP_K: usize = 2;

fn main() {
    let args = mixtral_shaped::Args::from_env();
    let (tokens, threads, steps) = (args.number(0, 8), args.number(1, 0), args.number(2, 40));
    let format = args.format(3);
    let idle = std::time::Duration::from_millis(args.number(4, 0) as u64);
    let hidden = HIDDEN;
    let backend = CpuBackend::with_format(threads, format).expect("thread pool");
    let experts = mixtral_shaped::experts(&backend, EXPERTS);
    let input = pseudo_random(tokens * hidden, 4);
    let mut step_seconds = Vec::with_capacity(steps);
    let mut step_bytes = Vec::with_capacity(steps);
    let read = ReadBuffer::new(512 << 20);
    let mut read_rates = Vec::new();
    for step in 0..=steps {
        let routes = routes(tokens, step as u32);
        let work: Vec<ExpertWork<'_>> = routes
            .iter()
            .filter(|(_, rows, _)| !rows.is_empty())
            .map(|(expert, rows, weights)| ExpertWork {
                expert: experts[*expert as usize].as_ref(),
                rows,
                weights,
            })
            .collect();
        std::thread::sleep(idle);
        let started = Instant::now();
        std::hint::black_box(backend.run_experts(&input, hidden, &work).expect("step"));
        let seconds = started.elapsed().as_secs_f64();
        if step > 0 {
            step_seconds.push(seconds);
            step_bytes.push(
                work.iter()
                    .map(|item| item.expert.weight_bytes())
                    .sum::<usize>(),
            );
        }
        if step % 10 == 0 {
            read_rates.push(read.rate(backend.threads()));
        }
    }
    let gbps = |bytes: usize, seconds: f64| bytes as f64 / seconds / 1e9;
    let mut rates: Vec<f64> = step_seconds
        .iter()
        .zip(&step_bytes)
        .map(|(&seconds, &bytes)| gbps(bytes, seconds))
        .collect();
    rates.sort_by(f64::total_cmp);
    read_rates.sort_by(f64::total_cmp);
    let (step_rate, read_rate) = (rates[rates.len() / 2], read_rates[read_rates.len() / 2]);
    let apart = if idle.is_zero() {
        String::new()
    } else {
        format!(" {} ms apart", idle.as_millis())
    };
    println!(
        "decode {tokens} tokens{apart} on {}: weights streamed at {step_rate:.1} GB/s (median of {steps} steps), \
         a plain read at {read_rate:.1} GB/s: {:.2} of the bound",
        backend.describe(),
        step_rate / read_rate
    );
}

/// Per expert, the tokens routed to it and their weights: top-2 of a
/// pseudo-random gate, different at every step.
fn routes(tokens: usize, step: u32) -> Vec<(u32, Vec<u32>, Vec<f32>)> {
    let mut routes: Vec<_> = (0..EXPERTS).map(|e| (e, Vec::new(), Vec::new())).collect();
    for token in 0..tokens as u32 {
        let mut scores: Vec<(u32, u32)> = (0..EXPERTS)
            .map(|e| {
                (
                    (token * 31 + e * 7 + step * 13).wrapping_mul(2654435761) >> 8,
                    e,
                )
            })
            .collect();
        scores.sort_unstable();
        for &(_, expert) in scores.iter().rev().take(TOP_K) {
            let (_, rows, weights) = &mut routes[expert as usize];
            rows.push(token);
            weights.push(0.5);
        }
    }
    routes
}

/// A buffer far past any cache, read by threads each taking a share.
struct ReadBuffer(Vec<u64>);

impl ReadBuffer {
    fn new(bytes: usize) -> Self {
        Self((0..bytes as u64 / 8).collect())
    }

    /// GB/s of one pass over the buffer by `threads` scoped threads.
    fn rate(&self, threads: usize) -> f64 {
        let share = self.0.len().div_ceil(threads);
        let started = Instant::now();
        std::thread::scope(|scope| {
            for part in self.0.chunks(share) {
                scope.spawn(move || {
                    std::hint::black_box(part.iter().fold(0u64, |sum, &w| sum.wrapping_add(w)))
                });
            }
        });
        (self.0.len() * 8) as f64 / started.elapsed().as_secs_f64() / 1e9
    }
}
