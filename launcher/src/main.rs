//! moemesh: one binary for every role of a moemesh cluster.
//!
//! - `moemesh coordinator`: one member of the Raft-replicated coordinator group.
//! - `moemesh expert`: an expert node serving the experts it is given.
//! - `moemesh router`: a router in front of expert nodes.
//! - `moemesh up`: a whole local cluster as separate processes on 127.0.0.1,
//!   restarted when they exit.
//! - `moemesh certs`: a cluster CA and member certificates naming each member.
//! - `moemesh config`: checks a configuration file (`--config`) or prints an example.
//! - `moemesh demo`: `up` on a synthetic (or given) model, plus a workload
//!   and a report.
//! - `moemesh bench`: moemesh beside the GEMM ceiling and PyTorch.

mod bench;
mod certs;
mod config_file;
mod demo;
mod expert_spec;
mod local_cluster;
mod memory_tiers;
mod ops;
mod roles;
mod stats;
mod synth_model;
mod synthetic;

use clap::{CommandFactory, Parser, Subcommand};

/// Serve the Mixture-of-Experts layers of large models across machines.
#[derive(Parser)]
#[command(name = "moemesh", version)]
struct Cli {
    #[command(flatten)]
    tls: moemesh_client::TlsArgs,
    /// Threads of the async runtime that carries this process's network
    /// work; 0 gives one per core. Processes that share a machine's cores
    /// answer sooner with fewer: idle runtime threads are woken to look for
    /// work on every call. `moemesh up`, `demo` and `bench` give each
    /// member its share of the cores
    #[arg(long, global = true, env = "MOEMESH_IO_THREADS", default_value_t = 0)]
    io_threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a coordinator: one member of the Raft group that owns membership and placement.
    Coordinator(roles::CoordinatorArgs),
    /// Runs an expert node: holds experts and serves ExpertService.
    Expert(roles::ExpertArgs),
    /// Runs a router: gates tokens and dispatches them to expert nodes.
    Router(roles::RouterArgs),
    /// Starts a local cluster (three coordinators, N expert nodes, a router) as separate processes, restarts those that exit, and serves until Ctrl-C.
    Up(local_cluster::UpCommandArgs),
    /// Starts a local cluster on a synthetic Mixtral-shaped model, drives a workload through it and reports.
    Demo(demo::DemoArgs),
    /// Measures moemesh beside the machine's GEMM ceiling and PyTorch: in process, through a local cluster, decode latency, bf16 weights, memory.
    Bench(bench::layer::BenchArgs),
    /// Runs a skewed (Zipf) workload on a local cluster before, during and after one live rebalance, and reports node balance, throughput and latency.
    BenchRebalance(bench::rebalance::BenchRebalanceArgs),
    /// Runs three coordinators with simulated expert nodes and routers (a thousand of each by default) through a rebalance, and reports placement bytes per watcher, propagation latency, coordinator CPU and memory, and Raft log growth.
    BenchControlPlane(bench::control_plane::BenchControlPlaneArgs),
    /// Runs many clients against a local cluster for a bounded time and reports errors, throughput and memory over time.
    Soak(bench::soak::SoakArgs),
    /// Measures one expert node's backend on a device (a GPU) in process: correctness against the CPU on test checkpoints, throughput, decode latency and Expert Buffering, as one JSON object.
    BenchDevice(bench::device::BenchDeviceArgs),
    /// Makes a cluster CA and member certificates that name each member's role and id, for mutual TLS.
    Certs(certs::CertsArgs),
    /// Writes a random Mixtral-shaped checkpoint (real tensor names) of any size, to try or measure moemesh without downloading weights.
    SynthModel(synth_model::SynthModelArgs),
    /// Checks a configuration file for coordinator, expert and router (`--config FILE`), or prints a commented example.
    Config(config_file::ConfigArgs),
}

/// Keeps glibc to two malloc arenas unless the operator chose with
/// MALLOC_ARENA_MAX. By default each thread that allocates may get its own
/// arena, and buffers freed on another thread than they were allocated on
/// (request bytes, activations) stay in them: an expert node's resident
/// memory grew by a sixth of its weights under load, for no speed gain.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// Keeps a router's freed activation buffers in its heap. Each forward
/// allocates and frees a few MB per request and reply; glibc gave the top
/// of the heap back after each and the next forward faulted it in again,
/// zeroed page by page: a third of a router's CPU under a prefill load.
/// Below 32 MiB, buffers come from the heap, and up to 64 MiB of free heap
/// top is kept. MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ still win.
fn keep_freed_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;
        const TRIM_THRESHOLD_BYTES: i32 = 64 << 20;
        // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
        unsafe {
            if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
            }
            if std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_none() {
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
            }
        }
    }
}

/// The exit code of a run that asked for a device this machine cannot
/// give (no GPU, no driver, or a build without CUDA).
const EXIT_DEVICE_UNAVAILABLE: i32 = 2;

fn main() -> anyhow::Result<()> {
    match run() {
        Err(error) if is_device_unavailable(&error) => {
            eprintln!("error: {error:#}");
            std::process::exit(EXIT_DEVICE_UNAVAILABLE);
        }
        result => result,
    }
}

fn is_device_unavailable(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<moemesh_core::CoreError>(),
            Some(moemesh_core::CoreError::DeviceUnavailable(_))
        )
    })
}

fn run() -> anyhow::Result<()> {
    limit_malloc_arenas();
    let cli: Cli = config_file::parse_with_config(std::env::args_os())?;
    if matches!(cli.command, Command::Router(_)) {
        keep_freed_buffers();
    }
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if cli.io_threads > 0 {
        runtime.worker_threads(cli.io_threads);
    }
    let runtime = runtime.enable_all().build()?;
    // The span exporter's connection lives on the runtime; the guard
    // flushes what is left when it drops, before the runtime does.
    let _tracing = {
        let _entered = runtime.enter();
        moemesh_telemetry::traces::init(service_name(&cli.command))?
    };
    match cli.command {
        Command::SynthModel(args) => return synth_model::run_synth_model(args),
        Command::BenchDevice(args) => return bench::device::run_bench_device(args),
        Command::Certs(args) => return certs::run_certs(args),
        Command::Config(args) => return config_file::run_config(args, Cli::command()),
        _ => {}
    }
    runtime.block_on(async move {
        match cli.command {
            Command::Coordinator(args) => roles::run_coordinator(args, &cli.tls).await,
            Command::Expert(args) => roles::run_expert(args, &cli.tls).await,
            Command::Router(args) => roles::run_router(args, &cli.tls).await,
            Command::Up(args) => local_cluster::run_up(args, &cli.tls).await,
            Command::Demo(args) => demo::run_demo(args, &cli.tls).await,
            Command::Bench(args) => bench::layer::run_bench(args, &cli.tls).await,
            Command::BenchRebalance(args) => {
                bench::rebalance::run_bench_rebalance(args, &cli.tls).await
            }
            Command::Soak(args) => bench::soak::run_soak(args, &cli.tls).await,
            Command::BenchControlPlane(args) => {
                bench::control_plane::run_bench_control_plane(args, &cli.tls).await
            }
            Command::SynthModel(_)
            | Command::BenchDevice(_)
            | Command::Certs(_)
            | Command::Config(_) => {
                unreachable!("runs before the runtime starts")
            }
        }
    })
}

/// The service name a process's spans carry.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Coordinator(_) => "moemesh-coordinator",
        Command::Expert(_) => "moemesh-expert",
        Command::Router(_) => "moemesh-router",
        _ => "moemesh",
    }
}
