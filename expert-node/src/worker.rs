//! The device worker: the one owner of the experts resident on a device.
//!
//! Compute work arrives through a bounded queue; a full queue is refused at
//! once (the router then tries another replica) so memory never grows with
//! load. Experts are added and removed through the same queue, so a change
//! of placement takes effect between two jobs, never during one. The worker
//! runs on its own OS thread and drops work whose caller has already gone.
//! A small job (a decode step's) that finds the worker idle and nothing
//! queued computes on its caller's thread instead, under the same lock,
//! where the backend allows it (CPU experts, all resident): it saves the
//! two thread wake-ups of the hand-off, a large share of a decode step's
//! time on the node. A job whose outputs overflow f32 (inputs or routing
//! weights far out of range) is refused, never answered with infinities.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use moemesh_core::compute::buffering::BufferCounters;
use moemesh_core::compute::{Expert, scale_by_weight, weighted_inputs};
use tokio::sync::{mpsc, oneshot, watch};

use crate::metrics::{ExpertMetrics, Queued};
use crate::residency::{ExpertKey, Residency};
use crate::{ExpertNodeError, ExpertNodeResult};

/// One expert's rows within a [`ComputeJob`].
#[derive(Debug)]
pub struct ExpertAssignment {
    pub expert: u32,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

/// This node's share of one layer's forward, already validated.
#[derive(Debug)]
pub struct ComputeJob {
    pub layer: usize,
    /// `[rows, hidden]`.
    pub input: Vec<f32>,
    /// By ascending expert id.
    pub assignments: Vec<ExpertAssignment>,
}

impl ComputeJob {
    /// For families whose routing weight multiplies an expert's input
    /// (Llama 4): the same job on the weighted rows
    /// ([`moemesh_core::compute::weighted_inputs`]), each expert taking
    /// its own in order with weight one, so that its output rows come
    /// back in the same places.
    fn weighting_inputs(&self, hidden: usize) -> Self {
        let input = weighted_inputs(
            &self.input,
            hidden,
            self.assignments
                .iter()
                .map(|assignment| (&assignment.rows[..], &assignment.weights[..])),
        );
        let mut first = 0u32;
        let assignments = self
            .assignments
            .iter()
            .map(|assignment| {
                let count = assignment.rows.len() as u32;
                let weighted = ExpertAssignment {
                    expert: assignment.expert,
                    rows: (first..first + count).collect(),
                    weights: vec![1.0; count as usize],
                };
                first += count;
                weighted
            })
            .collect();
        Self {
            layer: self.layer,
            input,
            assignments,
        }
    }
}

/// The experts a worker holds, per layer.
pub type HeldExperts = BTreeMap<usize, BTreeSet<u32>>;

/// A job's result and the time the worker spent computing it.
#[derive(Debug)]
pub struct Computed {
    /// Per expert of the job in order, each of its rows in order, the
    /// expert's output times the row's routing weight: `[Σ rows, hidden]`.
    pub output: Vec<f32>,
    /// Compute time alone: the wait in the queue is not counted.
    pub compute_time: std::time::Duration,
}

enum WorkerCommand {
    Compute {
        job: ComputeJob,
        /// The handler awaiting the combined rows.
        reply_tx: oneshot::Sender<ExpertNodeResult<Computed>>,
        /// Counts the job in the queue until the worker takes it up.
        queued: Queued,
    },
    AddExpert {
        layer: usize,
        expert: u32,
        /// Its resident form, when the node loads experts before serving them.
        loaded: Option<Arc<dyn Expert>>,
        done_tx: oneshot::Sender<ExpertNodeResult<()>>,
    },
    RemoveExpert {
        layer: usize,
        expert: u32,
        done_tx: oneshot::Sender<ExpertNodeResult<()>>,
    },
}

/// Counters the worker writes and `Info` reads.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Tokens processed per served (layer, expert).
    pub tokens: Mutex<BTreeMap<(usize, u32), u64>>,
    /// Jobs dropped because their caller went away before they ran.
    pub cancelled_jobs: AtomicU64,
    /// Jobs computed.
    pub completed_jobs: AtomicU64,
    /// Microseconds spent computing jobs.
    pub busy_micros: AtomicU64,
    /// Token-expert pairs computed.
    pub pairs: AtomicU64,
    /// Bytes of resident expert weights.
    pub weight_bytes: AtomicU64,
    /// Experts a job found resident.
    pub buffer_hits: AtomicU64,
    /// Experts a job needed that were not resident.
    pub buffer_misses: AtomicU64,
    /// Bytes of expert weights moved into the resident tier.
    pub bytes_paged_in: AtomicU64,
    /// Experts computed on the host instead of being paged in.
    pub host_fallbacks: AtomicU64,
}

/// Cloneable handle to a running [`DeviceWorker`].
#[derive(Clone)]
pub struct DeviceWorkerHandle {
    command_tx: mpsc::Sender<WorkerCommand>,
    stats: Arc<WorkerStats>,
    metrics: ExpertMetrics,
    held_rx: watch::Receiver<Arc<HeldExperts>>,
    /// The worker, for jobs computed on the caller's thread when it is idle.
    shared: Arc<Mutex<DeviceWorker>>,
    /// Whether small jobs may run on the caller's thread: every expert is
    /// resident on the CPU, so none waits for a page-in or a GPU context.
    inline: bool,
}

/// Owns the served experts and computes queued jobs in order.
pub struct DeviceWorker {
    /// The served experts, which of them are resident, and the backend
    /// they run on.
    residency: Residency,
    hidden_size: usize,
    stats: Arc<WorkerStats>,
    metrics: ExpertMetrics,
    /// Publishes the held set after every change; the service validates against it.
    held_tx: watch::Sender<Arc<HeldExperts>>,
}

/// How long the worker must have finished no job before the memory its
/// jobs freed goes back to the OS.
const IDLE_BEFORE_TRIM: std::time::Duration = std::time::Duration::from_millis(250);

/// Returns the allocator's free memory to the OS each time the worker
/// falls idle: a batch's activations are megabytes, which the allocator
/// would keep after a burst of traffic. Under steady traffic it never
/// runs, so requests never pay for faulting the memory back in.
fn trim_memory_when_idle(stats: &WorkerStats, stopped: &AtomicBool) {
    let mut trimmed_at = 0;
    let mut seen = 0;
    while !stopped.load(Ordering::Relaxed) {
        std::thread::sleep(IDLE_BEFORE_TRIM);
        let completed = stats.completed_jobs.load(Ordering::Relaxed);
        if completed == seen && completed != trimmed_at {
            crate::release_freed_memory();
            trimmed_at = completed;
        }
        seen = completed;
    }
}

impl DeviceWorker {
    /// Starts the worker thread; it exits when every handle is dropped.
    /// Its work is counted in `metrics`.
    pub fn spawn(
        residency: Residency,
        hidden_size: usize,
        queue_capacity: usize,
        metrics: ExpertMetrics,
    ) -> DeviceWorkerHandle {
        let stats = Arc::new(WorkerStats::default());
        let (held_tx, held_rx) = watch::channel(Arc::new(HeldExperts::new()));
        let worker = Self {
            residency,
            hidden_size,
            stats: Arc::clone(&stats),
            metrics: metrics.clone(),
            held_tx,
        };
        {
            let mut tokens = worker.stats.tokens.lock().expect("worker stats");
            for &key in worker.residency.served() {
                tokens.insert(key, 0);
            }
        }
        worker.publish_held();
        worker.publish_residency();
        let (command_tx, command_rx) = mpsc::channel(queue_capacity.max(1));
        let stopped = Arc::new(AtomicBool::new(false));
        let inline = worker.residency.computes_on_any_thread();
        let shared = Arc::new(Mutex::new(worker));
        std::thread::Builder::new()
            .name("moemesh-device-worker".into())
            .spawn({
                let stopped = Arc::clone(&stopped);
                let shared = Arc::clone(&shared);
                move || {
                    Self::run(&shared, command_rx);
                    stopped.store(true, Ordering::Relaxed);
                }
            })
            .expect("the OS can start the device worker thread");
        std::thread::Builder::new()
            .name("moemesh-memory-trimmer".into())
            .spawn({
                let stats = Arc::clone(&stats);
                move || trim_memory_when_idle(&stats, &stopped)
            })
            .expect("the OS can start the memory trimmer thread");
        DeviceWorkerHandle {
            command_tx,
            stats,
            metrics,
            held_rx,
            shared,
            inline,
        }
    }

    /// Carries out queued commands until every handle is dropped.
    fn run(shared: &Mutex<DeviceWorker>, mut command_rx: mpsc::Receiver<WorkerCommand>) {
        while let Some(command) = command_rx.blocking_recv() {
            let mut worker = shared.lock().expect("device worker");
            worker.carry_out(command);
        }
    }

    /// Computes `job`, counting it in the metrics and stats.
    fn run_job(&mut self, job: &ComputeJob) -> ExpertNodeResult<Computed> {
        let started = std::time::Instant::now();
        let result = self.compute(job).map(|output| Computed {
            output,
            compute_time: started.elapsed(),
        });
        let elapsed = started.elapsed();
        let pairs: usize = job.assignments.iter().map(|a| a.rows.len()).sum();
        self.metrics.observe_compute(elapsed);
        if result.is_ok() {
            let tokens = job.input.len() / self.hidden_size.max(1);
            self.metrics.count_computed(tokens, pairs);
        }
        self.stats.pairs.fetch_add(pairs as u64, Ordering::Relaxed);
        self.stats
            .busy_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.stats.completed_jobs.fetch_add(1, Ordering::Relaxed);
        result
    }

    /// Carries out one command from the queue.
    fn carry_out(&mut self, command: WorkerCommand) {
        match command {
            WorkerCommand::Compute {
                job,
                reply_tx,
                queued,
            } => {
                drop(queued);
                if reply_tx.is_closed() {
                    self.stats.cancelled_jobs.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // A send error means the caller left while we computed: nothing to do.
                let _ = reply_tx.send(self.run_job(&job));
            }
            WorkerCommand::AddExpert {
                layer,
                expert,
                loaded,
                done_tx,
            } => {
                let _ = done_tx.send(self.add((layer, expert), loaded));
            }
            WorkerCommand::RemoveExpert {
                layer,
                expert,
                done_tx,
            } => {
                if self.residency.stop_serving(&(layer, expert)) {
                    self.stats
                        .tokens
                        .lock()
                        .expect("worker stats")
                        .remove(&(layer, expert));
                    self.publish_held();
                }
                self.publish_residency();
                let _ = done_tx.send(Ok(()));
            }
        }
    }

    fn add(&mut self, key: ExpertKey, loaded: Option<Arc<dyn Expert>>) -> ExpertNodeResult<()> {
        self.residency.serve(key, loaded)?;
        self.stats
            .tokens
            .lock()
            .expect("worker stats")
            .entry(key)
            .or_insert(0);
        self.publish_held();
        self.publish_residency();
        Ok(())
    }

    fn publish_held(&self) {
        let mut held = HeldExperts::new();
        for &(layer, expert) in self.residency.served() {
            held.entry(layer).or_default().insert(expert);
        }
        self.held_tx.send_replace(Arc::new(held));
    }

    /// Publishes the resident bytes and Expert Buffering's counts, and
    /// counts the hits and misses since the last time in the metrics.
    fn publish_residency(&self) {
        let stats = &self.stats;
        let counters = self.residency.counters();
        stats
            .weight_bytes
            .store(self.residency.resident_bytes(), Ordering::Relaxed);
        let before = BufferCounters {
            hits: stats.buffer_hits.swap(counters.hits, Ordering::Relaxed),
            misses: stats.buffer_misses.swap(counters.misses, Ordering::Relaxed),
            ..BufferCounters::default()
        };
        self.metrics
            .record_buffering(before, counters, self.residency.resident_count());
        stats
            .bytes_paged_in
            .store(counters.bytes_paged_in, Ordering::Relaxed);
        stats
            .host_fallbacks
            .store(counters.computed_where_waiting, Ordering::Relaxed);
    }

    /// Runs every assigned expert on its rows and weights each output row
    /// (see [`Computed::output`]); the router adds them up in expert order.
    /// The service validates jobs, but an expert removed since is refused
    /// here rather than taking the worker down.
    pub fn compute(&mut self, job: &ComputeJob) -> ExpertNodeResult<Vec<f32>> {
        let weighted;
        let job = if self.residency.weights_scale_input() {
            weighted = job.weighting_inputs(self.hidden_size);
            &weighted
        } else {
            job
        };
        let result = self.residency.compute(job, self.hidden_size);
        self.publish_residency();
        let mut outputs = result?;
        let weights = job
            .assignments
            .iter()
            .flat_map(|assignment| &assignment.weights);
        for (row, &weight) in outputs.chunks_exact_mut(self.hidden_size).zip(weights) {
            scale_by_weight(row, weight);
        }
        check_outputs_finite(job, self.hidden_size, &outputs)?;
        {
            let mut tokens = self.stats.tokens.lock().expect("worker stats");
            for assignment in &job.assignments {
                *tokens.entry((job.layer, assignment.expert)).or_insert(0) +=
                    assignment.rows.len() as u64;
            }
        }
        Ok(outputs)
    }
}

/// Refuses a job whose weighted `outputs` hold an infinity or NaN: finite
/// inputs and weights (the service checks both) so large that an expert's
/// products overflow f32. The message names the first such row, its
/// largest input and its routing weight.
fn check_outputs_finite(job: &ComputeJob, hidden: usize, outputs: &[f32]) -> ExpertNodeResult<()> {
    let Some(position) = moemesh_proto::codec::first_non_finite(outputs) else {
        return Ok(());
    };
    let mut pair = position / hidden;
    for assignment in &job.assignments {
        if let (Some(&row), Some(&weight)) =
            (assignment.rows.get(pair), assignment.weights.get(pair))
        {
            let inputs = &job.input[row as usize * hidden..][..hidden];
            let largest_input = inputs
                .iter()
                .fold(0f32, |largest, value| largest.max(value.abs()));
            return Err(ExpertNodeError::InvalidArgument(format!(
                "inputs out of range: expert {} of layer {} overflows f32 on row {row} \
                 (largest input magnitude {largest_input:?}, routing weight {weight:?})",
                assignment.expert, job.layer
            )));
        }
        pair -= assignment.rows.len();
    }
    Err(ExpertNodeError::Internal(format!(
        "output row {} lies beyond the job's rows",
        position / hidden
    )))
}

/// A place in the worker's queue, taken before a request is decoded so
/// that an overloaded node refuses work before spending memory on it.
/// Dropping it gives the place back.
pub struct ComputeSlot {
    permit: mpsc::OwnedPermit<WorkerCommand>,
    queued: Queued,
    /// The worker, when small jobs may run on the caller's thread.
    inline: Option<(Arc<Mutex<DeviceWorker>>, mpsc::Sender<WorkerCommand>)>,
}

/// Token-expert pairs up to which a job may run on its caller's thread:
/// decode steps, not prefills, whose compute would hold the caller's
/// (async) thread long enough to delay the node's other requests.
const INLINE_PAIRS: usize = 64;

impl ComputeSlot {
    /// Queues `job` in this place and waits for its result. A small job
    /// that finds the worker idle and nothing queued before it computes at
    /// once on this thread instead: no hand-off to the worker and back.
    pub async fn compute(self, job: ComputeJob) -> ExpertNodeResult<Computed> {
        if let Some((shared, command_tx)) = &self.inline {
            let pairs: usize = job.assignments.iter().map(|a| a.rows.len()).sum();
            // Only this slot's place is taken: nothing queued before it.
            let alone = command_tx.capacity() + 1 == command_tx.max_capacity();
            if pairs <= INLINE_PAIRS
                && alone
                && let Ok(mut worker) = shared.try_lock()
            {
                drop(self.queued);
                return worker.run_job(&job);
            }
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        self.permit.send(WorkerCommand::Compute {
            job,
            reply_tx,
            queued: self.queued,
        });
        reply_rx
            .await
            .map_err(|_| ExpertNodeError::Unavailable("device worker stopped".into()))?
    }
}

impl DeviceWorkerHandle {
    /// Takes a place in the queue for one job; refuses at once when the
    /// queue is full.
    pub fn reserve_compute(&self) -> ExpertNodeResult<ComputeSlot> {
        match self.command_tx.clone().try_reserve_owned() {
            Ok(permit) => Ok(ComputeSlot {
                permit,
                queued: self.metrics.enqueue(),
                inline: self
                    .inline
                    .then(|| (Arc::clone(&self.shared), self.command_tx.clone())),
            }),
            Err(mpsc::error::TrySendError::Full(_)) => Err(ExpertNodeError::Overloaded(format!(
                "work queue full ({} jobs waiting)",
                self.command_tx.max_capacity()
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(ExpertNodeError::Unavailable("device worker stopped".into()))
            }
        }
    }

    /// Queues a job and waits for its result; refuses at once when the
    /// queue is full.
    pub async fn compute(&self, job: ComputeJob) -> ExpertNodeResult<Computed> {
        self.reserve_compute()?.compute(job).await
    }

    /// Serves an expert: `loaded` is its resident form, or None where the
    /// worker pages experts in itself (a memory budget). Waits behind
    /// queued work, never refused.
    pub async fn add_expert(
        &self,
        layer: usize,
        expert: u32,
        loaded: Option<Arc<dyn Expert>>,
    ) -> ExpertNodeResult<()> {
        self.send_and_wait(|done_tx| WorkerCommand::AddExpert {
            layer,
            expert,
            loaded,
            done_tx,
        })
        .await
    }

    /// Drops an expert once the work queued before this call is done.
    pub async fn remove_expert(&self, layer: usize, expert: u32) -> ExpertNodeResult<()> {
        self.send_and_wait(|done_tx| WorkerCommand::RemoveExpert {
            layer,
            expert,
            done_tx,
        })
        .await
    }

    /// Queues a management command (waiting for room, never refused) and
    /// waits until the worker has carried it out.
    async fn send_and_wait(
        &self,
        command: impl FnOnce(oneshot::Sender<ExpertNodeResult<()>>) -> WorkerCommand,
    ) -> ExpertNodeResult<()> {
        let stopped = || ExpertNodeError::Unavailable("device worker stopped".into());
        let (done_tx, done_rx) = oneshot::channel();
        self.command_tx
            .send(command(done_tx))
            .await
            .map_err(|_| stopped())?;
        done_rx.await.map_err(|_| stopped())?
    }

    /// Returns the experts held now.
    pub fn held(&self) -> Arc<HeldExperts> {
        self.held_rx.borrow().clone()
    }

    /// Jobs waiting in the queue now.
    pub fn queue_depth(&self) -> usize {
        self.command_tx.max_capacity() - self.command_tx.capacity()
    }

    /// Returns the worker's counters.
    pub fn stats(&self) -> &WorkerStats {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::mpsc as std_mpsc;

    use super::*;

    /// An identity expert that waits for a go-ahead before each forward.
    struct GatedExpert {
        started_tx: Mutex<std_mpsc::Sender<()>>,
        go_rx: Mutex<std_mpsc::Receiver<()>>,
    }

    impl Expert for GatedExpert {
        fn hidden_size(&self) -> usize {
            1
        }
        fn weight_bytes(&self) -> usize {
            7
        }
        fn forward(&self, input: &[f32], _rows: usize, output: &mut [f32]) {
            self.started_tx.lock().unwrap().send(()).unwrap();
            self.go_rx.lock().unwrap().recv().unwrap();
            output.copy_from_slice(input);
        }
    }

    fn job(weight: f32) -> ComputeJob {
        rows_job(1, weight)
    }

    /// `rows` rows of 2.0 to expert 0 of layer 0, each weighted `weight`.
    fn rows_job(rows: u32, weight: f32) -> ComputeJob {
        ComputeJob {
            layer: 0,
            input: vec![2.0; rows as usize],
            assignments: vec![ExpertAssignment {
                expert: 0,
                rows: (0..rows).collect(),
                weights: vec![weight; rows as usize],
            }],
        }
    }

    /// A worker of one thread on the CPU backend (which computes on any
    /// thread) serving `expert` as expert 0 of layer 0, with room for one
    /// job in its queue.
    fn worker_serving(expert: Arc<dyn Expert>) -> DeviceWorkerHandle {
        let backend = Arc::new(moemesh_core::compute::CpuBackend::new(1).unwrap());
        let fixture = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/mixtral");
        let checkpoint = moemesh_core::model::checkpoint::Checkpoint::open(fixture.as_ref());
        let mut residency = Residency::new(Arc::new(checkpoint.unwrap()), backend, None);
        residency.serve((0, 0), Some(expert)).unwrap();
        DeviceWorker::spawn(residency, 1, 1, ExpertMetrics::default())
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once_and_abandoned_work_is_skipped() {
        let (started_tx, started_rx) = std_mpsc::channel();
        let (go_tx, go_rx) = std_mpsc::channel();
        let expert: Arc<dyn Expert> = Arc::new(GatedExpert {
            started_tx: Mutex::new(started_tx),
            go_rx: Mutex::new(go_rx),
        });
        let worker = worker_serving(expert);
        assert_eq!(worker.stats().weight_bytes.load(Ordering::Relaxed), 7);

        // Too large to compute on the caller's thread: the worker takes it.
        let large = INLINE_PAIRS as u32 + 1;
        let running = tokio::spawn({
            let worker = worker.clone();
            async move { worker.compute(rows_job(large, 1.5)).await }
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // The worker is busy; one job fits in the queue, and its caller leaves.
        let abandoned = tokio::spawn({
            let worker = worker.clone();
            async move { worker.compute(job(1.0)).await }
        });
        tokio::task::yield_now().await;
        while worker.command_tx.capacity() > 0 {
            tokio::task::yield_now().await;
        }
        let refused = worker.compute(job(1.0)).await.unwrap_err();
        assert!(
            matches!(refused, ExpertNodeError::Overloaded(_)),
            "{refused:?}"
        );
        abandoned.abort();
        let _ = abandoned.await;

        go_tx.send(()).unwrap();
        let output = running.await.unwrap().unwrap().output;
        assert_eq!(output, vec![3.0; large as usize]);
        // The abandoned job is dropped without running: the expert never starts again.
        while worker.stats().cancelled_jobs.load(Ordering::Relaxed) == 0 {
            tokio::task::yield_now().await;
        }
        let tokens = worker.stats().tokens.lock().unwrap()[&(0, 0)];
        assert_eq!(tokens, u64::from(large));
    }

    /// An identity expert that records the name of each thread it ran on.
    #[derive(Default)]
    struct ThreadRecorder {
        threads: Mutex<Vec<String>>,
    }

    impl Expert for ThreadRecorder {
        fn hidden_size(&self) -> usize {
            1
        }
        fn weight_bytes(&self) -> usize {
            4
        }
        fn forward(&self, input: &[f32], _rows: usize, output: &mut [f32]) {
            let name = std::thread::current().name().unwrap_or("").to_string();
            self.threads.lock().unwrap().push(name);
            output.copy_from_slice(input);
        }
    }

    #[test]
    fn small_jobs_compute_on_the_callers_thread_when_the_worker_is_idle() {
        let recorder = Arc::new(ThreadRecorder::default());
        let worker = worker_serving(recorder.clone());
        // A current-thread runtime polls on this thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let caller = std::thread::current().name().unwrap().to_string();
        let small = runtime.block_on(worker.compute(rows_job(2, 0.5))).unwrap();
        assert_eq!(small.output, vec![1.0, 1.0]);
        let large = INLINE_PAIRS as u32 + 1;
        let computed = runtime.block_on(worker.compute(rows_job(large, 1.0)));
        assert_eq!(computed.unwrap().output.len(), large as usize);
        // Both counted as the worker counts its own jobs.
        let tokens = worker.stats().tokens.lock().unwrap()[&(0, 0)];
        assert_eq!(tokens, 2 + u64::from(large));
        assert_eq!(worker.stats().completed_jobs.load(Ordering::Relaxed), 2);
        let threads = recorder.threads.lock().unwrap().clone();
        assert_eq!(threads, [caller.as_str(), "moemesh-device-worker"]);
    }
}
