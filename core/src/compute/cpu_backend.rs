//! [`CpuBackend`]: experts on the CPU. Every GEMM runs on the backend's own
//! rayon pool, never on the async runtime, and a batch's experts run at
//! once: whole experts, large ones cut into row ranges, one task per
//! thread at a time, largest first, the last few (and small ones) in
//! slices of the expert. How the work is cut ([`CpuBlocking`],
//! the thread count) changes its speed, never a result: each row's output
//! is the same bits with every cut and on every host (bf16 weights: on
//! every host without AMX; see `panel_gemm`).

use std::sync::{Arc, Mutex};

use super::buffering::CostModel;
use super::cpu_expert::CpuExpert;
use super::{ComputeBackend, Expert, ExpertWork};
use crate::model::checkpoint::ExpertWeights;
use crate::model::config::ModelConfig;
use crate::{CoreError, CoreResult};

/// How the CPU backend keeps expert weights resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// Four bytes per weight; products in f32.
    #[default]
    F32,
    /// Two bytes per weight (half the memory); each product rounds its
    /// activations to bf16 and sums in f32 (AVX512-BF16 where the CPU has
    /// it). Exact for bf16 checkpoints; f32 checkpoints are rounded to
    /// nearest even once, at load.
    Bf16,
}

impl WeightFormat {
    /// Bytes per resident weight.
    pub fn bytes_per_weight(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::Bf16 => 2,
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown weight format {other:?}; expected f32 or bf16"
            )),
        }
    }
}

/// How the CPU backend cuts its work. None of it changes a result, only
/// speed: replicas cut differently (other hosts, other settings) give the
/// same bits, which tests check by comparing backends cut differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuBlocking {
    /// Output columns a multi-threaded product hands to one thread at a
    /// time (rounded up to the kernel's 64-column panels).
    pub panel_columns: usize,
    /// The fewest rows worth a task of their own when experts are cut into
    /// row ranges: below it the GEMM loses efficiency.
    pub min_task_rows: usize,
}

/// Output columns a product hands to one thread at a time unless a
/// backend sets its own: two kernel panels.
const DEFAULT_PANEL_COLUMNS: usize = 128;

impl Default for CpuBlocking {
    fn default() -> Self {
        Self {
            panel_columns: DEFAULT_PANEL_COLUMNS,
            min_task_rows: MIN_TASK_ROWS,
        }
    }
}

impl CpuBlocking {
    /// Checks that every setting is one the backend can run with.
    pub fn validate(&self) -> CoreResult<()> {
        if self.panel_columns == 0 {
            return Err(CoreError::Config(
                "cpu blocking: panel_columns is 0; it must be at least 1".into(),
            ));
        }
        if self.min_task_rows == 0 {
            return Err(CoreError::Config(
                "cpu blocking: min_task_rows is 0; it must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

/// The multi-threaded CPU backend; clones share its threads.
#[derive(Clone)]
pub struct CpuBackend {
    /// Runs every GEMM of this backend's experts; sized once at start.
    pool: Arc<rayon::ThreadPool>,
    threads: usize,
    format: WeightFormat,
    blocking: CpuBlocking,
}

impl CpuBackend {
    /// Creates a backend with `threads` compute threads (0: one per core)
    /// that keeps weights in f32.
    pub fn new(threads: usize) -> CoreResult<Self> {
        Self::with_format(threads, WeightFormat::F32)
    }

    /// Creates a backend with `threads` compute threads (0: one per core)
    /// that keeps weights in `format`.
    pub fn with_format(threads: usize, format: WeightFormat) -> CoreResult<Self> {
        Self::with_blocking(threads, format, CpuBlocking::default())
    }

    /// Like [`CpuBackend::with_format`], with the work cut by `blocking`.
    pub fn with_blocking(
        threads: usize,
        format: WeightFormat,
        blocking: CpuBlocking,
    ) -> CoreResult<Self> {
        blocking.validate()?;
        let (pool, threads) = compute_pool(threads, "moemesh-cpu")?;
        Ok(Self {
            pool: Arc::new(pool),
            threads,
            format,
            blocking,
        })
    }

    /// Returns the number of compute threads.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

impl ComputeBackend for CpuBackend {
    fn describe(&self) -> String {
        format!(
            "cpu ({} threads, {} weights on {})",
            self.threads,
            self.format,
            super::panel_gemm::kernel_name(super::panel_gemm::Words::of(self.format))
        )
    }

    fn computes_on_any_thread(&self) -> bool {
        true
    }

    fn load_expert(&self, weights: ExpertWeights) -> CoreResult<Arc<dyn Expert>> {
        let expert = CpuExpert::new(
            weights,
            self.format,
            self.blocking,
            Arc::clone(&self.pool),
            self.threads,
        )?;
        Ok(Arc::new(expert))
    }

    fn resident_bytes(&self, config: &ModelConfig, expert: u32) -> u64 {
        config.expert_weight_count(expert) as u64 * self.format.bytes_per_weight()
    }

    /// Paging in reads the checkpoint from the page cache and lays the
    /// weights out again: about a gigabyte per second per thread. The CPU
    /// computes every expert itself, so there is nowhere else to compute.
    fn cost_model(&self) -> CostModel {
        CostModel {
            page_in_bytes_per_second: 1e9 * self.threads as f64,
            resident_flops: 50e9 * self.threads as f64,
            waiting_flops: None,
        }
    }

    /// Splits the work into tasks of whole experts (large ones cut into row
    /// ranges) and runs them at once, one per compute thread, largest
    /// first: small per-expert batches keep every thread busy without the
    /// synchronisation a multi-threaded GEMM pays inside each product.
    /// Pieces of few rows (a decode step's) cost their weights' bytes
    /// whatever their rows, so they go out in parts (slices of the
    /// expert) for the threads to share evenly; the task that brings a
    /// piece's last term adds them in order ([`PartSum`]).
    fn expert_outputs(
        &self,
        input: &[f32],
        width: usize,
        work: &[ExpertWork<'_>],
    ) -> CoreResult<Vec<f32>> {
        let pieces = self.pieces(work);
        let total_rows: usize = pieces.iter().map(|piece| piece.rows.len()).sum();
        let mut outputs = vec![0f32; total_rows * width];
        let mut rest = &mut outputs[..];
        let (mut whole, mut in_parts) = (Vec::new(), Vec::new());
        for piece in &pieces {
            let (output, tail) = std::mem::take(&mut rest).split_at_mut(piece.rows.len() * width);
            rest = tail;
            if piece.parts == 1 {
                whole.push(ExpertTask::whole(piece, output));
            } else {
                in_parts.push((piece, PartSum::new(piece, output)));
            }
        }
        let mut tasks = whole;
        for (piece, sum) in &in_parts {
            tasks.extend((0..piece.parts).map(|part| ExpertTask::part(piece, part, sum)));
        }
        // Stable: an expert's parts stay together, in order.
        tasks.sort_by_key(|task| std::cmp::Reverse(task.rows.len()));
        self.run_tasks(input, width, tasks);
        Ok(outputs)
    }
}

impl CpuBackend {
    /// The work cut into pieces of at most `max_rows` rows, enough pieces
    /// for every thread to take two, but never below `min_task_rows` rows,
    /// where the GEMM loses efficiency; each piece with the parts it is
    /// computed in: small pieces in parts, and the last pieces handed out
    /// too ([`split_the_tail`]).
    fn pieces<'work>(&self, work: &[ExpertWork<'work>]) -> Vec<Piece<'work>> {
        let total_rows: usize = work.iter().map(|item| item.rows.len()).sum();
        let min_rows = self.blocking.min_task_rows;
        let max_rows = min_rows.max(total_rows.div_ceil(self.threads * 2));
        let mut pieces = Vec::new();
        for item in work {
            let rows = item.rows.len();
            let count = rows.div_ceil(max_rows).max(1);
            for piece in 0..count {
                let range = piece * rows / count..(piece + 1) * rows / count;
                let parts = if self.threads > 1 && !range.is_empty() && range.len() < min_rows {
                    item.expert.parts()
                } else {
                    1
                };
                pieces.push(Piece {
                    expert: item.expert,
                    rows: &item.rows[range],
                    parts,
                });
            }
        }
        if self.threads > 1 {
            split_the_tail(&mut pieces, self.threads);
        }
        pieces
    }

    /// Runs `tasks`, each on one thread: the caller and `threads - 1` of
    /// the pool's threads take the next as they finish. The caller starts
    /// at once, so a step never waits for a sleeping pool thread to wake.
    /// The call wakes every pool thread, one more than take tasks
    /// ([`wake_an_extra_thread`]): on a 2-vCPU guest, with 10 ms idle
    /// before each step, the helper then started 53 µs late at p50 (72 at
    /// p90) where it had started 1.7 ms late (4.1 ms).
    fn run_tasks(&self, input: &[f32], width: usize, tasks: Vec<ExpertTask<'_, '_, '_>>) {
        let task_count = tasks.len();
        let queue = std::sync::Mutex::new(tasks.into_iter());
        let next = || queue.lock().expect("task queue").next();
        let run = |task: ExpertTask<'_, '_, '_>| {
            GATHERED.with_borrow_mut(|gathered| {
                gathered.clear();
                for &row in task.rows {
                    let row = row as usize;
                    gathered.extend_from_slice(&input[row * width..(row + 1) * width]);
                }
                let rows = task.rows.len();
                match task.destination {
                    Destination::Whole(output) => {
                        task.expert.forward_serial(gathered, rows, output)
                    }
                    Destination::Part { part, sum } => {
                        let mut term = vec![0f32; rows * width];
                        task.expert.forward_part(part, gathered, rows, &mut term);
                        sum.add(task.expert, part, term);
                    }
                }
            });
        };
        if self.threads == 1 || task_count <= 1 {
            // One thread's work runs on the caller's thread (the node's
            // device worker): handing it to a pool thread and back costs
            // two wake-ups, a sizeable part of a decode step's latency.
            while let Some(task) = next() {
                run(task);
            }
        } else {
            self.pool.in_place_scope(|scope| {
                for _ in 1..self.threads {
                    scope.spawn(|_| {
                        while let Some(task) = next() {
                            run(task);
                        }
                    });
                }
                // The pool's queue is first in, first out, so the first
                // `threads - 1` threads to start take the helpers' jobs, and
                // the call does not wait for the last to be scheduled.
                wake_an_extra_thread(&self.pool);
                while let Some(task) = next() {
                    run(task);
                }
            });
        }
    }
}

/// Cuts the `threads` pieces handed out last (the smallest: tasks go out
/// largest first) into their parts, so that the work ends in tasks a
/// fraction of an expert long. Whole experts alone end unevenly whenever
/// one thread runs slower for a while (another process, a busy host under
/// a virtual machine): its last expert holds up the call while the other
/// threads wait. Parts cost no GEMM speed (each is the expert's slices
/// for all the piece's rows, as the whole expert computes them), only
/// their terms' memory and the pass that adds them.
fn split_the_tail(pieces: &mut [Piece<'_>], threads: usize) {
    let mut whole: Vec<&mut Piece<'_>> = pieces
        .iter_mut()
        .filter(|piece| piece.parts == 1 && !piece.rows.is_empty())
        .collect();
    if whole.len() <= threads {
        return;
    }
    // Stable, as the tasks' order is: among equals the later goes last.
    whole.sort_by_key(|piece| std::cmp::Reverse(piece.rows.len()));
    let first_of_tail = whole.len() - threads;
    for piece in &mut whole[first_of_tail..] {
        piece.parts = piece.expert.parts();
    }
}

/// A rayon pool of `threads` threads (0: one per core) named
/// `{name}-{index}`, and its size: where a backend's CPU work runs, never
/// on the async runtime.
pub(super) fn compute_pool(threads: usize, name: &str) -> CoreResult<(rayon::ThreadPool, usize)> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |cores| cores.get())
    } else {
        threads
    };
    let name = name.to_string();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |index| format!("{name}-{index}"))
        .build()
        .map_err(|error| {
            CoreError::Config(format!("cannot start {threads} compute threads: {error}"))
        })?;
    Ok((pool, threads))
}

/// Wakes one more thread of `pool` than a call's own jobs do, with a job
/// that does nothing; a call queues it before (or, when it computes on
/// the caller too, after) its own jobs and never waits for it.
///
/// On a virtual machine, a thread woken after its vCPU has idled a while
/// is often queued on the waker's own vCPU (the guest scheduler takes the
/// halted vCPU for a busy one) and starts only when the waker's time slice
/// ends: on a 2-vCPU guest, 1.9 ms after 10 ms idle, as long as a decode
/// step, which then ran at one thread's speed. Of two threads woken at
/// once, one reaches the idle vCPU.
pub(super) fn wake_an_extra_thread(pool: &rayon::ThreadPool) {
    if pool.current_num_threads() > 1 {
        pool.spawn(|| {});
    }
}

/// The fewest rows worth a task of their own by default: fewer rows run
/// under the kernels' peak (measured on one Zen 4 core, `expert_ffn_gflops
/// -- ROWS 1`: 78-88 GFLOP/s at 32 rows, 90-94 at 64, 96-100 at 128).
const MIN_TASK_ROWS: usize = 96;

/// A range of one expert's rows, and the parts it is computed in.
struct Piece<'work> {
    expert: &'work dyn Expert,
    rows: &'work [u32],
    parts: usize,
}

/// A piece or one part of it, computed by one thread.
struct ExpertTask<'work, 'out, 'sum> {
    expert: &'work dyn Expert,
    rows: &'work [u32],
    destination: Destination<'out, 'sum>,
}

/// Where a task's result goes.
enum Destination<'out, 'sum> {
    /// The whole FFN, into the piece's own slice of the outputs.
    Whole(&'out mut [f32]),
    /// One part's term ([`Expert::forward_part`]), to its piece's sum.
    Part {
        part: usize,
        sum: &'sum PartSum<'out>,
    },
}

impl<'work, 'out, 'sum> ExpertTask<'work, 'out, 'sum> {
    fn whole(piece: &Piece<'work>, output: &'out mut [f32]) -> Self {
        Self {
            expert: piece.expert,
            rows: piece.rows,
            destination: Destination::Whole(output),
        }
    }

    fn part(piece: &Piece<'work>, part: usize, sum: &'sum PartSum<'out>) -> Self {
        Self {
            expert: piece.expert,
            rows: piece.rows,
            destination: Destination::Part { part, sum },
        }
    }
}

/// A piece computed in parts: the terms its tasks have brought so far,
/// and its slice of the outputs, which the task that brings the last
/// term fills ([`Expert::sum_parts`], in part order). So the sums run on
/// every thread while other tasks go on, not on one thread after all.
struct PartSum<'out> {
    arrived: Mutex<ArrivedTerms<'out>>,
}

/// What a [`PartSum`] holds under its lock.
struct ArrivedTerms<'out> {
    /// By part; empty until that part's task brings it.
    terms: Vec<Vec<f32>>,
    count: usize,
    output: Option<&'out mut [f32]>,
}

impl<'out> PartSum<'out> {
    fn new(piece: &Piece<'_>, output: &'out mut [f32]) -> Self {
        let arrived = ArrivedTerms {
            terms: vec![Vec::new(); piece.parts],
            count: 0,
            output: Some(output),
        };
        Self {
            arrived: Mutex::new(arrived),
        }
    }

    /// Takes part `part`'s term of `expert`; with the last, sums them
    /// into the output.
    fn add(&self, expert: &dyn Expert, part: usize, term: Vec<f32>) {
        let mut arrived = self.arrived.lock().expect("part sum");
        arrived.terms[part] = term;
        arrived.count += 1;
        if arrived.count < arrived.terms.len() {
            return;
        }
        let terms = std::mem::take(&mut arrived.terms);
        let output = arrived.output.take().expect("a piece is summed once");
        drop(arrived);
        expert.sum_parts(&terms, output);
    }
}

thread_local! {
    /// The input rows of the task running on this thread, gathered.
    static GATHERED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::compute::cpu_expert::tests::random_expert;
    use crate::model::checkpoint::ExpertBiases;

    /// An expert that passes its input through, noting the thread of each
    /// call; each takes a millisecond, so that every thread woken for a
    /// call finds tasks left to take.
    #[derive(Default)]
    struct ThreadRecorder {
        threads: Mutex<Vec<std::thread::ThreadId>>,
    }

    impl Expert for ThreadRecorder {
        fn hidden_size(&self) -> usize {
            4
        }
        fn weight_bytes(&self) -> usize {
            0
        }
        fn forward(&self, input: &[f32], _rows: usize, output: &mut [f32]) {
            self.threads
                .lock()
                .unwrap()
                .push(std::thread::current().id());
            std::thread::sleep(std::time::Duration::from_millis(1));
            output.copy_from_slice(input);
        }
    }

    #[test]
    fn a_call_computes_on_no_more_threads_than_the_backend_has() {
        const WIDTH: usize = 4;
        for threads in [2, 3] {
            let backend = CpuBackend::new(threads).unwrap();
            let experts: Vec<ThreadRecorder> = (0..24).map(|_| ThreadRecorder::default()).collect();
            let rows: Vec<[u32; 1]> = (0..experts.len() as u32).map(|row| [row]).collect();
            let work: Vec<ExpertWork<'_>> = experts
                .iter()
                .zip(&rows)
                .map(|(expert, rows)| ExpertWork {
                    expert,
                    rows,
                    weights: &[1.0],
                })
                .collect();
            let input: Vec<f32> = (0..experts.len() * WIDTH)
                .map(|value| value as f32)
                .collect();
            for call in 0..3 {
                // Every pool thread is woken; one of them must not compute.
                let output = backend.run_experts(&input, WIDTH, &work).unwrap();
                assert_eq!(output, input, "{threads} threads, call {call}");
                let calls: Vec<_> = experts
                    .iter()
                    .flat_map(|expert| std::mem::take(&mut *expert.threads.lock().unwrap()))
                    .collect();
                assert_eq!(calls.len(), experts.len(), "each task runs once");
                let computing: std::collections::HashSet<_> = calls.into_iter().collect();
                assert!(
                    computing.len() <= threads,
                    "{threads} threads, call {call}: {computing:?}"
                );
            }
        }
    }

    /// The experts' work run one expert after another, as the trait's
    /// provided method does.
    struct Sequential;

    impl ComputeBackend for Sequential {
        fn describe(&self) -> String {
            "sequential".into()
        }
        fn load_expert(&self, _: ExpertWeights) -> CoreResult<Arc<dyn Expert>> {
            unreachable!()
        }
        fn resident_bytes(&self, _: &ModelConfig, _: u32) -> u64 {
            unreachable!()
        }
        fn cost_model(&self) -> CostModel {
            unreachable!()
        }
    }

    /// Each expert's work: its rows and their routing weights.
    fn work_of<'a>(
        experts: &'a [Arc<dyn Expert>],
        assignments: &'a [(Vec<u32>, Vec<f32>)],
    ) -> Vec<ExpertWork<'a>> {
        experts
            .iter()
            .zip(assignments)
            .map(|(expert, (rows, weights))| ExpertWork {
                expert: expert.as_ref(),
                rows,
                weights,
            })
            .collect()
    }

    #[test]
    fn parallel_expert_tasks_combine_exactly_as_one_after_another() {
        let (hidden, intermediate, tokens) = (128, 192, 700);
        let backend = CpuBackend::new(2).unwrap();
        let experts: Vec<_> = (0..5)
            .map(|seed| {
                backend
                    .load_expert(random_expert(hidden, intermediate, seed))
                    .unwrap()
            })
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let input: Vec<f32> = (0..tokens * hidden)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        // Uneven loads: expert 0 takes most tokens (and is cut into
        // pieces), expert 4 takes none.
        let shares = [0.9, 0.3, 0.05, 0.01, 0.0];
        let assignments: Vec<(Vec<u32>, Vec<f32>)> = shares
            .iter()
            .map(|&share| {
                let rows: Vec<u32> = (0..tokens as u32)
                    .filter(|_| rng.random_bool(share))
                    .collect();
                let weights = rows.iter().map(|_| rng.random_range(0f32..1.0)).collect();
                (rows, weights)
            })
            .collect();
        let work = work_of(&experts, &assignments);
        let got = backend.run_experts(&input, hidden, &work).unwrap();
        let want = Sequential.run_experts(&input, hidden, &work).unwrap();
        assert_eq!(got, want);
        assert!(got.iter().any(|&value| value != 0.0));
    }

    #[test]
    fn decode_sized_work_in_parts_gives_the_bits_of_whole_experts() {
        // Three slices of the intermediate dimension, biases after them,
        // and both weight formats: the parts' terms must add up exactly as
        // one thread computing each expert whole.
        let (hidden, intermediate, tokens) = (64, 1600, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for format in [WeightFormat::F32, WeightFormat::Bf16] {
            let parallel = CpuBackend::with_format(2, format).unwrap();
            let serial = CpuBackend::with_format(1, format).unwrap();
            let weights: Vec<ExpertWeights> = (0..3)
                .map(|seed| {
                    let mut weights = random_expert(hidden, intermediate, seed);
                    let mut bias = |len: usize| -> Vec<f32> {
                        (0..len).map(|_| rng.random_range(-0.5f32..0.5)).collect()
                    };
                    weights.biases = Some(ExpertBiases {
                        gate: bias(intermediate),
                        up: bias(intermediate),
                        down: bias(hidden),
                    });
                    weights
                })
                .collect();
            let load = |backend: &CpuBackend| -> Vec<Arc<dyn Expert>> {
                weights
                    .iter()
                    .map(|weights| backend.load_expert(weights.clone()).unwrap())
                    .collect()
            };
            let (in_parts, whole) = (load(&parallel), load(&serial));
            assert_eq!(in_parts[0].parts(), 3);
            let input: Vec<f32> = (0..tokens * hidden)
                .map(|_| rng.random_range(-1f32..1.0))
                .collect();
            let rows: [&[u32]; 3] = [&[0, 3, 5, 7], &[1, 2], &[6]];
            let weights = [0.25f32; 4];
            let outputs = |backend: &CpuBackend, experts: &[Arc<dyn Expert>]| -> Vec<f32> {
                let work: Vec<ExpertWork<'_>> = experts
                    .iter()
                    .zip(rows)
                    .map(|(expert, rows)| ExpertWork {
                        expert: expert.as_ref(),
                        rows,
                        weights: &weights[..rows.len()],
                    })
                    .collect();
                backend.expert_outputs(&input, hidden, &work).unwrap()
            };
            let (got, want) = (outputs(&parallel, &in_parts), outputs(&serial, &whole));
            assert_eq!(got, want, "{format}");
            assert!(got.iter().all(|value| value.is_finite()) && got.iter().any(|&v| v != 0.0));
        }
    }

    #[test]
    fn the_last_pieces_go_out_in_parts_with_the_bits_of_whole_experts() {
        // Prefill-sized pieces (each of at least the rows a task needs) of
        // experts in three slices: the two handed out last, the smallest,
        // go out in parts, and every output is as one thread computes it.
        let (hidden, intermediate) = (64, 1600);
        let loads = [300, 120, 250, 100, 180];
        let tokens = 300;
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let input: Vec<f32> = (0..tokens * hidden)
            .map(|_| rng.random_range(-1f32..1.0))
            .collect();
        let assignments: Vec<(Vec<u32>, Vec<f32>)> = loads
            .iter()
            .map(|&load| {
                let rows: Vec<u32> = (0..tokens as u32)
                    .step_by(tokens / load)
                    .take(load)
                    .collect();
                let weights = rows.iter().map(|_| rng.random_range(0f32..1.0)).collect();
                (rows, weights)
            })
            .collect();
        for format in [WeightFormat::F32, WeightFormat::Bf16] {
            let backend = CpuBackend::with_format(2, format).unwrap();
            let experts: Vec<_> = (0..loads.len() as u64)
                .map(|seed| {
                    backend
                        .load_expert(random_expert(hidden, intermediate, seed))
                        .unwrap()
                })
                .collect();
            let work = work_of(&experts, &assignments);
            let cut: Vec<(usize, usize)> = backend
                .pieces(&work)
                .iter()
                .map(|piece| (piece.rows.len(), piece.parts))
                .collect();
            assert_eq!(
                cut,
                [
                    (150, 1),
                    (150, 1),
                    (120, 3),
                    (125, 1),
                    (125, 1),
                    (100, 3),
                    (180, 1)
                ],
                "{format}"
            );
            let got = backend.run_experts(&input, hidden, &work).unwrap();
            let want = Sequential.run_experts(&input, hidden, &work).unwrap();
            assert_eq!(got, want, "{format}");
            assert!(got.iter().any(|&value| value != 0.0));
        }
    }

    #[test]
    fn weight_formats_parse_and_print() {
        for format in [WeightFormat::F32, WeightFormat::Bf16] {
            assert_eq!(format.to_string().parse::<WeightFormat>(), Ok(format));
        }
        assert_eq!("BF16".parse::<WeightFormat>(), Ok(WeightFormat::Bf16));
        assert!("fp8".parse::<WeightFormat>().unwrap_err().contains("fp8"));
    }
}
