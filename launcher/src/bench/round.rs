//! One round of `moemesh bench`: every contestant once, in turn, each
//! adding one sample to its figures.

use std::time::{Duration, Instant};

use anyhow::Context;
use moemesh_client::{Client, DEFAULT_DEADLINE};
use moemesh_core::layer::MoeLayer;
use moemesh_proto::tls::MemberChannel;
use moemesh_router_node::DirectClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::bandwidth::ReadBandwidth;
use super::contestants::{Ceiling, InProcessLayers, TorchContestant};
use super::figures::{Figures, Samples};
use super::layer::BenchArgs;

/// The contestants and inputs one round runs, each contestant once.
pub(super) struct Round<'a> {
    pub(super) args: &'a BenchArgs,
    pub(super) hidden: usize,
    /// A client of the cluster's router.
    pub(super) client: Client,
    /// A client that sends to the expert nodes itself.
    pub(super) one_hop: DirectClient,
    pub(super) ceiling: &'a mut Ceiling,
    pub(super) bandwidth: &'a ReadBandwidth,
    pub(super) in_process: &'a InProcessLayers,
    pub(super) torch: Option<&'a mut TorchContestant>,
    pub(super) input: &'a [f32],
    pub(super) decode_inputs: &'a [Vec<f32>],
    /// Per decode input, the bytes of f32 expert weights its forward reads.
    pub(super) decode_bytes: &'a [u64],
    /// The router's health service, for the bare round trip.
    pub(super) round_trip: HealthClient<MemberChannel>,
}

impl Round<'_> {
    /// Runs every contestant once, in turn, and adds one sample to each figure.
    pub(super) async fn run(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let args = self.args;
        let tokens = (args.tokens * args.forwards) as f64;
        let ceiling_count = args.forwards * 4;
        let seconds = tokio::task::block_in_place(|| self.ceiling.run(ceiling_count));
        figures
            .ceiling_gflops
            .push(self.ceiling.flops() * ceiling_count as f64 / seconds / 1e9);
        if let Some(torch) = self.torch.as_deref_mut() {
            let seconds = tokio::task::block_in_place(|| torch.run_gemm(ceiling_count))?;
            figures
                .torch_gemm_gflops
                .push(self.ceiling.flops() * ceiling_count as f64 / seconds / 1e9);
        }
        figures
            .inprocess_tokens_per_s
            .push(tokens / self.time_layer(&self.in_process.f32_layer));

        if let Some(torch) = self.torch.as_deref_mut() {
            let seconds = tokio::task::block_in_place(|| torch.run(args.forwards))?;
            figures.torch_tokens_per_s.push(tokens / seconds);
        }

        figures
            .cluster_sequential_tokens_per_s
            .push(tokens / self.time_cluster_sequential().await?);
        figures
            .cluster_tokens_per_s
            .push(tokens * args.in_flight as f64 / self.time_cluster_in_flight().await?);

        figures
            .bf16_tokens_per_s
            .push(tokens / self.time_layer(&self.in_process.bf16_layer));

        self.run_decode_steps(figures).await
    }

    /// Seconds `layer` takes for --forwards forwards of the full batch.
    fn time_layer(&self, layer: &MoeLayer) -> f64 {
        tokio::task::block_in_place(|| {
            let started = Instant::now();
            for _ in 0..self.args.forwards {
                // A CPU layer does not fail; its outputs were checked already.
                std::hint::black_box(layer.forward(self.input, self.args.tokens).ok());
            }
            started.elapsed().as_secs_f64()
        })
    }

    /// Seconds the cluster takes for --forwards forwards, one at a time.
    async fn time_cluster_sequential(&mut self) -> anyhow::Result<f64> {
        let started = Instant::now();
        for _ in 0..self.args.forwards {
            self.client
                .forward_f32("", 0, self.input, self.hidden)
                .await?;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    /// Seconds the cluster takes for --forwards forwards from each of
    /// --in-flight streams at once, with its pipeline full. Each stream
    /// sends one forward more, and the clock runs from the moment as many
    /// forwards have come back as there are streams to the last one back:
    /// over that window, --forwards × --in-flight come back. Timed from
    /// the first send instead, a window held the pipeline's filling too
    /// (the first forwards cross client, router and wire before any node
    /// computes): 5% of a window of six 512-token forwards on a 2-vCPU
    /// guest, a cost a serving cluster pays once per burst, not per forward.
    async fn time_cluster_in_flight(&self) -> anyhow::Result<f64> {
        let (input, hidden, forwards) = (self.input, self.hidden, self.args.forwards);
        let streams = (0..self.args.in_flight).map(|_| {
            let mut client = self.client.clone();
            async move {
                let mut returned = Vec::with_capacity(forwards + 1);
                for _ in 0..=forwards {
                    client.forward_f32("", 0, input, hidden).await?;
                    returned.push(Instant::now());
                }
                Ok::<_, moemesh_client::ClientError>(returned)
            }
        });
        let mut returned: Vec<Instant> = futures::future::try_join_all(streams)
            .await?
            .into_iter()
            .flatten()
            .collect();
        returned.sort_unstable();
        let pipeline_full = returned[self.args.in_flight - 1];
        let last = returned[returned.len() - 1];
        Ok(last.duration_since(pipeline_full).as_secs_f64())
    }

    /// Decode-sized forwards, alternating between the two paths step by
    /// step, between two reads of memory. The read rate is measured beside
    /// the steps it bounds, not once per round: on a shared host it moves
    /// from one second to the next (a 2-vCPU guest read at 40-65 GB/s in
    /// one run), and a read taken seconds apart may see another rate.
    async fn run_decode_steps(&mut self, figures: &mut Figures) -> anyhow::Result<()> {
        let (decode_tokens, hidden) = (self.args.decode_tokens, self.hidden);
        let read_before = self.read_memory(figures);
        let mut stream_gbps = Samples::default();
        for step in 0..self.args.decode_steps {
            let input_index = step % self.decode_inputs.len();
            let decode_input = &self.decode_inputs[input_index];
            let bytes = self.decode_bytes[input_index] as f64;
            figures.decode_expert_bytes.push(bytes);
            for (layer, samples) in [
                (&self.in_process.f32_layer, &mut figures.decode_inprocess_us),
                (
                    &self.in_process.bf16_layer,
                    &mut figures.decode_inprocess_bf16_us,
                ),
            ] {
                let started = Instant::now();
                tokio::task::block_in_place(|| {
                    std::hint::black_box(layer.forward(decode_input, decode_tokens).ok())
                });
                samples.push(started.elapsed().as_secs_f64() * 1e6);
            }
            if let Some(us) = figures.decode_inprocess_us.last() {
                stream_gbps.push(bytes / us / 1e3);
            }
            let started = Instant::now();
            let timed = self
                .client
                .forward_f32_timed("", 0, decode_input, hidden)
                .await?;
            let latency = started.elapsed();
            figures.decode_cluster_us.push(latency.as_secs_f64() * 1e6);
            figures
                .decode_dispatch_us
                .push(latency.saturating_sub(timed.expert_compute).as_secs_f64() * 1e6);
            let started = Instant::now();
            let output = self
                .one_hop
                .forward(0, decode_input.clone(), DEFAULT_DEADLINE)
                .await?;
            let latency = started.elapsed();
            let compute = Duration::from_micros(output.slowest_compute_micros);
            figures.decode_one_hop_us.push(latency.as_secs_f64() * 1e6);
            figures
                .decode_one_hop_dispatch_us
                .push(latency.saturating_sub(compute).as_secs_f64() * 1e6);
            let started = Instant::now();
            self.round_trip
                .check(HealthCheckRequest::default())
                .await
                .context("the router's health check failed")?;
            figures
                .grpc_round_trip_us
                .push(started.elapsed().as_secs_f64() * 1e6);
        }
        let read_after = self.read_memory(figures);
        if let Some(stream_gbps) = stream_gbps.median() {
            figures
                .decode_inprocess_over_bound
                .push(stream_gbps / ((read_before + read_after) / 2.0));
        }
        Ok(())
    }

    /// Reads the bench's buffer with every thread; records the rate and
    /// returns it, in GB/s.
    fn read_memory(&self, figures: &mut Figures) -> f64 {
        let bandwidth = self.bandwidth;
        let gbps = tokio::task::block_in_place(|| bandwidth.measure(2));
        figures.memory_read_gbps.push(gbps);
        gbps
    }
}
