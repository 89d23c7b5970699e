//! What `moemesh bench` measures: one sample of each figure per round, and
//! the expert nodes' memory after the run.

/// One figure measured once per round.
#[derive(Default)]
pub(super) struct Samples(Vec<f64>);

impl Samples {
    pub(super) fn push(&mut self, value: f64) {
        self.0.push(value);
    }

    /// The sample of the latest round.
    pub(super) fn last(&self) -> Option<f64> {
        self.0.last().copied()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut values = self.0.clone();
        values.sort_by(f64::total_cmp);
        values
    }

    pub(super) fn median(&self) -> Option<f64> {
        let values = self.sorted();
        if values.is_empty() {
            return None;
        }
        let middle = values.len() / 2;
        Some(if values.len() % 2 == 1 {
            values[middle]
        } else {
            (values[middle - 1] + values[middle]) / 2.0
        })
    }

    /// The sum of the samples.
    pub(super) fn total(&self) -> f64 {
        self.0.iter().sum()
    }

    pub(super) fn range(&self) -> Option<(f64, f64)> {
        let values = self.sorted();
        Some((*values.first()?, *values.last()?))
    }
}

/// Everything the bench measured.
#[derive(Default)]
pub(super) struct Figures {
    pub(super) ceiling_gflops: Samples,
    /// PyTorch's plain GEMM of the ceiling's shape.
    pub(super) torch_gemm_gflops: Samples,
    /// The machine's memory read rate, every thread reading: right before
    /// and right after each round's decode steps.
    pub(super) memory_read_gbps: Samples,
    pub(super) inprocess_tokens_per_s: Samples,
    pub(super) torch_tokens_per_s: Samples,
    pub(super) cluster_tokens_per_s: Samples,
    /// The cluster with one request at a time.
    pub(super) cluster_sequential_tokens_per_s: Samples,
    pub(super) bf16_tokens_per_s: Samples,
    pub(super) decode_inprocess_us: Vec<f64>,
    /// The same decode steps in process with bf16 weights.
    pub(super) decode_inprocess_bf16_us: Vec<f64>,
    /// Per decode step, the bytes of f32 expert weights its forward reads.
    pub(super) decode_expert_bytes: Samples,
    /// Per round, the rate at which the in-process f32 decode steps
    /// streamed their experts' weights (the median over the round's steps)
    /// over the read rate beside them (the mean of the reads before and
    /// after the steps).
    pub(super) decode_inprocess_over_bound: Samples,
    pub(super) decode_cluster_us: Vec<f64>,
    /// Per cluster decode step, its latency minus the slowest node's compute.
    pub(super) decode_dispatch_us: Vec<f64>,
    /// The same decode steps from a one-hop client (no router).
    pub(super) decode_one_hop_us: Vec<f64>,
    /// Per one-hop decode step, its latency minus the slowest node's compute.
    pub(super) decode_one_hop_dispatch_us: Vec<f64>,
    /// Per decode step, an empty unary call to the router (a health check)
    /// on a channel set up as the client's: the floor any dispatch stands on.
    pub(super) grpc_round_trip_us: Vec<f64>,
}

/// Memory of one expert node after the run.
pub(super) struct NodeMemory {
    pub(super) rss_bytes: Option<u64>,
    pub(super) peak_rss_bytes: Option<u64>,
    pub(super) weight_bytes: u64,
}
