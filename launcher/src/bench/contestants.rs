//! The contestants of `moemesh bench` that run on this machine beside the
//! cluster: the plain GEMM ceiling, moemesh's layer in process (f32 and
//! bf16 weights) and PyTorch's Mixtral block in a Python process.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use gemm::Parallelism;
use moemesh_core::compute::{CpuBackend, WeightFormat, matmul};
use moemesh_core::layer::MoeLayer;
use moemesh_core::model::checkpoint::Checkpoint;
use rand::SeedableRng;

use crate::stats::{random_hidden, relative_l2};
use crate::synthetic::SyntheticShape;

/// The PyTorch contestant, run by the bench when torch and transformers are installed.
const TORCH_SCRIPT: &str = include_str!("../../bench/torch_mixtral_block.py");

/// The plain GEMM every expert runs, alone: the machine's practical ceiling.
pub(super) struct Ceiling {
    pool: rayon::ThreadPool,
    threads: usize,
    lhs: Vec<f32>,
    rhs: Vec<f32>,
    dst: Vec<f32>,
    m: usize,
    k: usize,
    n: usize,
}

impl Ceiling {
    pub(super) fn new(threads: usize, m: usize, shape: SyntheticShape) -> anyhow::Result<Self> {
        let (k, n) = (shape.hidden_size, shape.intermediate_size);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        Ok(Self {
            pool,
            threads,
            lhs: random_hidden(&mut rng, m, k),
            rhs: random_hidden(&mut rng, k, n),
            dst: vec![0f32; m * n],
            m,
            k,
            n,
        })
    }

    pub(super) fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }

    /// Runs the product `count` times and returns the seconds they took.
    pub(super) fn run(&mut self, count: usize) -> f64 {
        let parallelism = if self.threads > 1 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        };
        let Self {
            pool,
            lhs,
            rhs,
            dst,
            m,
            k,
            n,
            ..
        } = self;
        let started = Instant::now();
        pool.install(|| {
            for _ in 0..count {
                matmul(dst, lhs, rhs, *m, *k, *n, parallelism);
            }
        });
        started.elapsed().as_secs_f64()
    }
}

/// moemesh's layer in this process, with f32 and with bf16 weights, and
/// what the f32 layer computes on the full batch: the output every other
/// contestant is checked against.
pub(super) struct InProcessLayers {
    pub(super) f32_layer: MoeLayer,
    pub(super) bf16_layer: MoeLayer,
    pub(super) reference: Vec<f32>,
    /// Tokens routed to each expert in the full batch.
    pub(super) expert_loads: Vec<usize>,
    /// The bf16 layer's relative L2 error against `reference`.
    pub(super) bf16_error: f64,
}

impl InProcessLayers {
    /// Loads layer 0 of `model` twice and runs both on `input` (`tokens` rows).
    pub(super) fn load(
        model: &Path,
        threads: usize,
        input: &[f32],
        tokens: usize,
        experts: usize,
    ) -> anyhow::Result<Self> {
        let checkpoint = Checkpoint::open(model)?;
        let f32_layer = MoeLayer::load(
            &checkpoint,
            0,
            &CpuBackend::with_format(threads, WeightFormat::F32)?,
        )?;
        let bf16_layer = MoeLayer::load(
            &checkpoint,
            0,
            &CpuBackend::with_format(threads, WeightFormat::Bf16)?,
        )?;
        let reference = f32_layer.forward(input, tokens)?;
        let mut expert_loads = vec![0usize; experts];
        for &expert in &f32_layer.gate().route(input, tokens).experts {
            expert_loads[expert as usize] += 1;
        }
        let bf16_error = relative_l2(&bf16_layer.forward(input, tokens)?, &reference);
        Ok(Self {
            f32_layer,
            bf16_layer,
            reference,
            expert_loads,
            bf16_error,
        })
    }
}

/// The transformers block in a Python process that runs forwards on request.
pub(super) struct TorchContestant {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub(super) version: String,
}

impl TorchContestant {
    /// Starts the script, or says why the PyTorch contestant is skipped.
    pub(super) fn start(
        python: &str,
        workdir: &Path,
        model: &Path,
        input: &Path,
        output: &Path,
        threads: usize,
    ) -> Result<Self, String> {
        let probe = Command::new(python)
            .args(["-c", "import torch, transformers, safetensors, numpy"])
            .stdin(Stdio::null())
            .output()
            .map_err(|error| format!("cannot run {python}: {error}"))?;
        if !probe.status.success() {
            let stderr = String::from_utf8_lossy(&probe.stderr);
            let reason = stderr.lines().last().unwrap_or("import failed").to_string();
            return Err(format!(
                "{python} cannot import torch and transformers ({reason}); pip install torch transformers safetensors numpy"
            ));
        }
        let script = workdir.join("torch_mixtral_block.py");
        std::fs::write(&script, TORCH_SCRIPT).map_err(|error| error.to_string())?;
        let mut child = Command::new(python)
            .arg(&script)
            .arg("--model")
            .arg(model)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|error| format!("cannot start {python}: {error}"))?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut line = String::new();
        match stdout.read_line(&mut line) {
            Ok(read) if read > 0 && line.starts_with("ready ") => {}
            _ => {
                let _ = child.kill();
                return Err("the PyTorch script failed to start; its errors are above".into());
            }
        }
        let version = line.trim_start_matches("ready ").trim().to_string();
        Ok(Self {
            child,
            stdin,
            stdout,
            version,
        })
    }

    /// Runs `count` forwards in the Python process; returns their seconds.
    pub(super) fn run(&mut self, count: usize) -> anyhow::Result<f64> {
        self.ask(&count.to_string())
    }

    /// Runs `count` of PyTorch's plain f32 GEMMs of the ceiling's shape
    /// (`[tokens, hidden] · [hidden, intermediate]`); returns their seconds.
    pub(super) fn run_gemm(&mut self, count: usize) -> anyhow::Result<f64> {
        self.ask(&format!("gemm {count}"))
    }

    /// Sends one request line; returns the seconds the script answers,
    /// once PyTorch's threads have gone to sleep ([`TORCH_SETTLE`]).
    fn ask(&mut self, request: &str) -> anyhow::Result<f64> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        std::thread::sleep(TORCH_SETTLE);
        line.trim()
            .parse()
            .with_context(|| format!("the PyTorch script answered {line:?}"))
    }
}

/// How long the bench waits after each PyTorch request before the next
/// contestant starts. PyTorch's OpenMP threads spin after a parallel
/// region before they sleep (libgomp's default wait policy): after one
/// GEMM of the ceiling's shape on a 2-vCPU guest, its worker threads ran
/// 8-10 ms more. On cores every contestant shares, that spinning fell on
/// whichever ran next: the layer in process, timed right after PyTorch's
/// GEMM, ran at 423-445 GFLOP/s against 442-456 with a 100 ms wait (two
/// interleaved pairs of `bench --rounds 5`). 50 ms is five times the
/// spin. PyTorch times itself, so the wait changes none of its figures.
const TORCH_SETTLE: Duration = Duration::from_millis(50);

impl Drop for TorchContestant {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
