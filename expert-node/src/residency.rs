//! Which of a worker's experts are resident, and how a job reaches the rest.
//!
//! Without a memory budget every expert the node serves is resident. With
//! one, an [`ExpertBuffer`] keeps the hot experts resident within it and
//! the others wait where the backend keeps them (the checkpoint's pages in
//! the page cache for the CPU, pinned host memory for a GPU); a job pages
//! them in, streams them through one at a time, or has the backend compute
//! them where they wait. Paging in and streaming run the same expert code
//! on the same weights, so a row's result does not depend on whether its
//! expert was resident: on the CPU every path gives the same bits. A GPU
//! node's host path (few tokens of a cold expert computed on the CPU)
//! agrees with the GPU to bf16 precision, not bit for bit, and whether it
//! is taken depends on how many tokens the batch gives that expert.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use moemesh_core::compute::buffering::{BufferCounters, Decision, ExpertBuffer};
use moemesh_core::compute::{ComputeBackend, Expert, ExpertWork, gather_rows};
use moemesh_core::model::checkpoint::Checkpoint;

use crate::worker::ComputeJob;
use crate::{ExpertNodeError, ExpertNodeResult};

/// A served expert: (layer, expert).
pub type ExpertKey = (usize, u32);

/// How one of a job's experts is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Resident,
    /// Paged in for this job and dropped after it.
    Streamed,
    WhereItWaits,
}

/// The experts a worker serves and the ones among them that are resident.
pub struct Residency {
    served: BTreeSet<ExpertKey>,
    resident: HashMap<ExpertKey, Arc<dyn Expert>>,
    /// None: no budget, every served expert is resident.
    buffer: Option<ExpertBuffer<ExpertKey>>,
    /// Without a budget: the experts jobs needed, all found resident.
    unbuffered_hits: u64,
    /// Where experts that are not resident are paged in from.
    checkpoint: Arc<Checkpoint>,
    backend: Arc<dyn ComputeBackend>,
}

impl Residency {
    /// Serves nothing yet; `budget` bounds the resident bytes (None: all
    /// served experts stay resident).
    pub fn new(
        checkpoint: Arc<Checkpoint>,
        backend: Arc<dyn ComputeBackend>,
        budget: Option<u64>,
    ) -> Self {
        Self {
            served: BTreeSet::new(),
            resident: HashMap::new(),
            buffer: budget.map(ExpertBuffer::new),
            unbuffered_hits: 0,
            checkpoint,
            backend,
        }
    }

    /// Whether the model's routing weights multiply the experts' inputs
    /// (Llama 4) rather than their outputs.
    pub fn weights_scale_input(&self) -> bool {
        self.checkpoint.config().weights_scale_input
    }

    /// Whether a job may compute on its caller's thread: every served
    /// expert is resident (none waits to be paged in) and the backend
    /// computes on any thread.
    pub fn computes_on_any_thread(&self) -> bool {
        self.loads_eagerly() && self.backend.computes_on_any_thread()
    }

    /// Whether serving a new expert needs its weights loaded first (no
    /// budget); with a budget the worker pages experts in itself.
    pub fn loads_eagerly(&self) -> bool {
        self.buffer.is_none()
    }

    /// Serves `key`. Without a budget `loaded` must be its resident form;
    /// with one, it is paged in now if the budget has room and otherwise
    /// waits until a job needs it.
    pub fn serve(
        &mut self,
        key: ExpertKey,
        loaded: Option<Arc<dyn Expert>>,
    ) -> ExpertNodeResult<()> {
        let (layer, expert) = key;
        match (&mut self.buffer, loaded) {
            (None, Some(loaded)) => {
                self.resident.insert(key, loaded);
            }
            (None, None) => {
                let loaded = self.backend.page_in(&self.checkpoint, layer, expert)?;
                self.resident.insert(key, loaded);
            }
            (Some(buffer), _) => {
                let bytes = self
                    .backend
                    .resident_bytes(self.checkpoint.config(), expert);
                if !self.resident.contains_key(&key) && buffer.admit(key, bytes) {
                    match self.backend.page_in(&self.checkpoint, layer, expert) {
                        Ok(loaded) => {
                            self.resident.insert(key, loaded);
                        }
                        Err(error) => {
                            buffer.remove(&key);
                            return Err(error.into());
                        }
                    }
                }
            }
        }
        self.served.insert(key);
        Ok(())
    }

    /// Stops serving `key` and drops its resident weights.
    pub fn stop_serving(&mut self, key: &ExpertKey) -> bool {
        self.resident.remove(key);
        if let Some(buffer) = &mut self.buffer {
            buffer.forget(key);
        }
        self.served.remove(key)
    }

    /// The experts served, resident or not.
    pub fn served(&self) -> &BTreeSet<ExpertKey> {
        &self.served
    }

    /// Bytes of resident expert weights.
    pub fn resident_bytes(&self) -> u64 {
        self.resident
            .values()
            .map(|expert| expert.weight_bytes() as u64)
            .sum()
    }

    /// The experts whose weights are resident now.
    pub fn resident_count(&self) -> usize {
        self.resident.len()
    }

    /// Expert Buffering's counts. Without a budget every expert a job
    /// needs is resident: each is a hit, and nothing is ever paged in.
    pub fn counters(&self) -> BufferCounters {
        match &self.buffer {
            Some(buffer) => buffer.counters(),
            None => BufferCounters {
                hits: self.unbuffered_hits,
                ..BufferCounters::default()
            },
        }
    }

    /// Per expert of the job in order, each of its rows in order, the
    /// expert's output, unweighted: `[Σ rows, hidden]`.
    pub fn compute(&mut self, job: &ComputeJob, hidden: usize) -> ExpertNodeResult<Vec<f32>> {
        let removed: Vec<u32> = job
            .assignments
            .iter()
            .map(|assignment| assignment.expert)
            .filter(|&expert| !self.served.contains(&(job.layer, expert)))
            .collect();
        if !removed.is_empty() {
            // Removed by a placement change after the service checked them.
            return Err(ExpertNodeError::NotHeld {
                layer: job.layer,
                experts: removed,
                detail: "this node stopped serving them".into(),
            });
        }
        let routes = self.route(job)?;
        let resident: Vec<usize> = (0..routes.len())
            .filter(|&index| routes[index] == Route::Resident)
            .collect();
        let work: Vec<ExpertWork<'_>> = resident
            .iter()
            .map(|&index| {
                let assignment = &job.assignments[index];
                ExpertWork {
                    expert: self.resident[&(job.layer, assignment.expert)].as_ref(),
                    rows: &assignment.rows,
                    weights: &assignment.weights,
                }
            })
            .collect();
        let computed = self.backend.expert_outputs(&job.input, hidden, &work)?;
        if resident.len() == routes.len() {
            // Every expert resident (always, without a budget): the
            // backend's outputs are already in the job's order.
            return Ok(computed);
        }
        self.complete_with_misses(job, hidden, &routes, &resident, &computed)
    }

    /// The job's outputs from the resident experts' `computed` outputs
    /// (for the `resident` assignments, in order) and the other experts,
    /// streamed or computed where they wait, one at a time.
    fn complete_with_misses(
        &self,
        job: &ComputeJob,
        hidden: usize,
        routes: &[Route],
        resident: &[usize],
        computed: &[f32],
    ) -> ExpertNodeResult<Vec<f32>> {
        let mut starts = Vec::with_capacity(job.assignments.len());
        let mut total_rows = 0;
        for assignment in &job.assignments {
            starts.push(total_rows * hidden);
            total_rows += assignment.rows.len();
        }
        let mut outputs = vec![0f32; total_rows * hidden];
        let mut taken = 0;
        for &index in resident {
            let len = job.assignments[index].rows.len() * hidden;
            outputs[starts[index]..starts[index] + len]
                .copy_from_slice(&computed[taken..taken + len]);
            taken += len;
        }
        for (index, route) in routes.iter().enumerate() {
            let assignment = &job.assignments[index];
            let output = &mut outputs[starts[index]..][..assignment.rows.len() * hidden];
            match route {
                Route::Resident => {}
                Route::Streamed => self.stream(job, index, hidden, output)?,
                Route::WhereItWaits => {
                    let gathered = gather_rows(&job.input, hidden, &assignment.rows);
                    self.backend.compute_where_waiting(
                        &self.checkpoint,
                        job.layer,
                        assignment.expert,
                        &gathered,
                        output,
                    )?;
                }
            }
        }
        Ok(outputs)
    }

    /// Decides how each of the job's experts is computed, paging in (and
    /// evicting) as the buffer decides. Experts already resident are
    /// decided first, so that no miss of this job evicts one of them.
    fn route(&mut self, job: &ComputeJob) -> ExpertNodeResult<Vec<Route>> {
        let Some(buffer) = &mut self.buffer else {
            self.unbuffered_hits += job.assignments.len() as u64;
            return Ok(vec![Route::Resident; job.assignments.len()]);
        };
        let config = self.checkpoint.config();
        buffer.begin_job(
            job.assignments
                .iter()
                .map(|assignment| ((job.layer, assignment.expert), assignment.rows.len())),
        );
        let cost = self.backend.cost_model();
        let mut order: Vec<usize> = (0..job.assignments.len()).collect();
        order.sort_by_key(|&index| {
            !self
                .resident
                .contains_key(&(job.layer, job.assignments[index].expert))
        });
        let mut routes = vec![Route::Resident; job.assignments.len()];
        for index in order {
            let assignment = &job.assignments[index];
            let key = (job.layer, assignment.expert);
            let bytes = self.backend.resident_bytes(config, assignment.expert);
            let weights = config.expert_weight_count(assignment.expert);
            let flops = 2.0 * assignment.rows.len() as f64 * weights as f64;
            routes[index] = match buffer.decide(key, bytes, flops, &cost) {
                Decision::Hit => Route::Resident,
                Decision::PageIn { evict } => {
                    for victim in &evict {
                        self.resident.remove(victim);
                    }
                    crate::release_freed_memory();
                    match self
                        .backend
                        .page_in(&self.checkpoint, job.layer, assignment.expert)
                    {
                        Ok(loaded) => {
                            self.resident.insert(key, loaded);
                        }
                        Err(error) => {
                            buffer.remove(&key);
                            return Err(error.into());
                        }
                    }
                    Route::Resident
                }
                Decision::Stream => Route::Streamed,
                Decision::ComputeWhereItWaits => Route::WhereItWaits,
            };
        }
        Ok(routes)
    }

    /// Pages one expert in for this job alone, computes its rows and drops
    /// it, so that streamed experts never sit in memory together.
    fn stream(
        &self,
        job: &ComputeJob,
        index: usize,
        hidden: usize,
        output: &mut [f32],
    ) -> ExpertNodeResult<()> {
        let assignment = &job.assignments[index];
        let expert = self
            .backend
            .page_in(&self.checkpoint, job.layer, assignment.expert)?;
        let work = [ExpertWork {
            expert: expert.as_ref(),
            rows: &assignment.rows,
            weights: &assignment.weights,
        }];
        output.copy_from_slice(&self.backend.expert_outputs(&job.input, hidden, &work)?);
        drop(expert);
        crate::release_freed_memory();
        Ok(())
    }
}
