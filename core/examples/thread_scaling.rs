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
//! - **in step, waiting asleep / awake**: the same threads meet after
//!   every round of all eight experts, as a layer's forwards make them, and
//!   wait out a serial gap (the gate and the combine) on one thread; the
//!   others wait blocked in the kernel, or spinning;
//! - **the backend**: one call computing all eight, as a layer's forward
//!   does, on the backend's `threads`.
//!
//! Side by side at `threads` times the rate alone means the threads do not
//! slow each other; a gap between the two kinds of loading points at memory
//! placement. In step asleep below awake points at the wake-ups: under a
//! hypervisor a woken vCPU may be placed beside its waker on one physical
//! core, which two processes that never wake each other escape. The
//! backend below in step points at how it hands out work.
//!
//!     cargo run --release -p moemesh-core --example thread_scaling -- [rows] [threads] [seconds] [f32|bf16] [gap µs]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mixtral_shaped::{HIDDEN, INTERMEDIATE, pseudo_random};
use moemesh_core::compute::{ComputeBackend, CpuBackend, Expert, ExpertWork, WeightFormat};

mod mixtral_shaped;

const EXPERTS: u32 = 8;

fn main() {
    let args = mixtral_shaped::Args::from_env();
    let (rows, threads, seconds) = (args.number(0, 128), args.number(1, 2), args.number(2, 3));
    let format = args.format(3);
    let gap = Duration::from_micros(args.number(4, 500) as u64);
    let period = Duration::from_secs(seconds as u64);
    let input = pseudo_random(rows * HIDDEN, 4);
    let expert_flops = expert_flops(rows);
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

    for awake in [false, true] {
        let work = Work {
            experts: &experts,
            input: &input,
            rows,
            expert_flops,
        };
        let in_step = in_step(threads, period, gap, awake, &work);
        println!(
            "in step, waiting {}:           {in_step:6.1} GFLOP/s ({:.2} of side by side)",
            if awake { "awake " } else { "asleep" },
            in_step / shared
        );
    }

    let layer = backend_calls(threads, format, period, &input, rows);
    println!(
        "the backend, all {EXPERTS} in one call:     {layer:6.1} GFLOP/s ({:.2} of side by side)",
        layer / shared
    );
}

/// GFLOP/s of a `threads`-thread backend's calls on all eight experts at
/// once, as a layer's forward makes them.
fn backend_calls(
    threads: usize,
    format: WeightFormat,
    period: Duration,
    input: &[f32],
    rows: usize,
) -> f64 {
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
    rate(expert_flops(rows) * EXPERTS as f64, period, |count| {
        for _ in 0..count {
            std::hint::black_box(
                backend
                    .expert_outputs(input, HIDDEN, &work)
                    .expect("forward"),
            );
        }
    })
}

/// FLOPs of one expert's forward on `rows` rows: three products.
fn expert_flops(rows: usize) -> f64 {
    2.0 * rows as f64 * 3.0 * (HIDDEN * INTERMEDIATE) as f64
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

/// The experts `in_step` computes, on what, and the FLOPs of one.
struct Work<'a> {
    experts: &'a [Arc<dyn Expert>],
    input: &'a [f32],
    rows: usize,
    expert_flops: f64,
}

/// GFLOP/s of `threads` threads computing rounds of all the experts, each
/// its share, then waiting for the others and for a serial `gap` on thread
/// 0; waiting `awake` spins, else blocks.
fn in_step(threads: usize, period: Duration, gap: Duration, awake: bool, work: &Work<'_>) -> f64 {
    let meeting = Meeting::new(threads, awake);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let compute_share = |thread: usize| {
        for expert in work.experts.iter().skip(thread).step_by(threads) {
            forward(&**expert, work.input, work.rows);
        }
    };
    let started = Instant::now();
    let rounds = std::thread::scope(|scope| {
        for thread in 1..threads {
            let (meeting, stop, compute_share) = (&meeting, &stop, &compute_share);
            scope.spawn(move || {
                loop {
                    meeting.wait();
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    compute_share(thread);
                    meeting.wait();
                }
            });
        }
        let mut rounds = 0;
        loop {
            let serial = Instant::now();
            while serial.elapsed() < gap {
                std::hint::spin_loop();
            }
            let done = started.elapsed() >= period;
            stop.store(done, Ordering::Release);
            meeting.wait();
            if done {
                return rounds;
            }
            compute_share(0);
            meeting.wait();
            rounds += 1;
        }
    });
    let flops = rounds as f64 * work.experts.len() as f64 * work.expert_flops;
    flops / started.elapsed().as_secs_f64() / 1e9
}

/// Where `in_step`'s threads wait for each other: the standard barrier
/// (blocked in the kernel) or one that spins.
enum Meeting {
    Asleep(std::sync::Barrier),
    Awake {
        threads: usize,
        arrived: AtomicUsize,
        generation: AtomicUsize,
    },
}

impl Meeting {
    fn new(threads: usize, awake: bool) -> Self {
        if awake {
            Self::Awake {
                threads,
                arrived: AtomicUsize::new(0),
                generation: AtomicUsize::new(0),
            }
        } else {
            Self::Asleep(std::sync::Barrier::new(threads))
        }
    }

    fn wait(&self) {
        match self {
            Self::Asleep(barrier) => {
                barrier.wait();
            }
            Self::Awake {
                threads,
                arrived,
                generation,
            } => {
                let current = generation.load(Ordering::Acquire);
                if arrived.fetch_add(1, Ordering::AcqRel) + 1 == *threads {
                    arrived.store(0, Ordering::Relaxed);
                    generation.fetch_add(1, Ordering::Release);
                } else {
                    while generation.load(Ordering::Acquire) == current {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }
}
