//! Expert Buffering on the CPU, for real: an expert node with a memory
//! budget of half its experts stays within it and computes exactly what a
//! node holding every expert computes.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use moemesh_proto::ExpertServiceClient;
use moemesh_proto::codec::{WireDtype, decode_rows, encode};
use moemesh_proto::v1::{ComputeRequest, ExpertRows};
use rand::{Rng, SeedableRng};

const MOEMESH: &str = env!("CARGO_BIN_EXE_moemesh");
const HIDDEN: usize = 512;
const INTERMEDIATE: usize = 1536;
const EXPERTS: usize = 8;
/// One expert's weights in f32.
const EXPERT_BYTES: u64 = (3 * HIDDEN * INTERMEDIATE * 4) as u64;

/// An expert node process, stopped when dropped.
struct Node {
    child: Child,
    url: String,
}

impl Node {
    fn start(model: &Path, budget: Option<u64>) -> Self {
        let mut command = Command::new(MOEMESH);
        command
            .args([
                "expert",
                "--listen",
                "127.0.0.1:0",
                "--insecure",
                "--experts",
                "*:*",
            ])
            .args(["--threads", "1", "--exit-with-parent", "--model"])
            .arg(model)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(budget) = budget {
            command.args(["--memory-budget", &budget.to_string()]);
        }
        let mut child = command.spawn().expect("moemesh expert starts");
        let stdout = child.stdout.take().unwrap();
        let line = BufReader::new(stdout)
            .lines()
            .next()
            .expect("the node prints its address")
            .unwrap();
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Self { child, url }
    }

    /// (resident now, peak resident) in bytes.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|line| line.starts_with(name)).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request routing `tokens` random rows to two experts each, skewed so
/// that low-numbered experts are hot and the others come and go.
fn skewed_request(rng: &mut rand::rngs::StdRng, tokens: usize) -> ComputeRequest {
    let input: Vec<f32> = (0..tokens * HIDDEN)
        .map(|_| rng.random_range(-1f32..1.0))
        .collect();
    let mut rows_of: Vec<Vec<u32>> = vec![Vec::new(); EXPERTS];
    for token in 0..tokens as u32 {
        let first = rng.random_range(0..3usize);
        let second = if rng.random_bool(0.7) {
            (first + 1) % 3
        } else {
            rng.random_range(3..EXPERTS)
        };
        rows_of[first].push(token);
        rows_of[second].push(token);
    }
    let experts = rows_of
        .into_iter()
        .enumerate()
        .filter(|(_, rows)| !rows.is_empty())
        .map(|(expert, rows)| ExpertRows {
            expert: expert as u32,
            weights: rows.iter().map(|_| rng.random_range(0f32..1.0)).collect(),
            rows,
        })
        .collect();
    ComputeRequest {
        model: String::new(),
        layer: 0,
        rows: Some(encode(&input, &[tokens, HIDDEN], WireDtype::F32)),
        experts,
    }
}

async fn compute(url: &str, request: ComputeRequest) -> Vec<u32> {
    let mut client = ExpertServiceClient::connect(url.to_string()).await.unwrap();
    let response = client.compute(request).await.unwrap().into_inner();
    let rows = decode_rows(response.output.as_ref(), HIDDEN).unwrap();
    rows.values.iter().map(|value| value.to_bits()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_half_its_experts_budgeted_stays_within_it_and_computes_the_same_bits() {
    let model = tempfile::tempdir().unwrap();
    let written = Command::new(MOEMESH)
        .args(["synth-model", "--layers", "1", "--top-k", "2"])
        .args(["--hidden-size", &HIDDEN.to_string()])
        .args(["--intermediate-size", &INTERMEDIATE.to_string()])
        .args(["--experts", &EXPERTS.to_string(), "--out"])
        .arg(model.path())
        .status()
        .unwrap();
    assert!(written.success());

    let budget = EXPERT_BYTES * EXPERTS as u64 / 2;
    let unlimited = Node::start(model.path(), None);
    let budgeted = Node::start(model.path(), Some(budget));
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for round in 0..16 {
        let request = skewed_request(&mut rng, 48);
        let want = compute(&unlimited.url, request.clone()).await;
        let got = compute(&budgeted.url, request).await;
        assert!(
            got == want,
            "round {round}: outputs differ from the unbudgeted node"
        );
    }

    let (unlimited_rss, _) = unlimited.memory();
    let (budgeted_rss, budgeted_peak) = budgeted.memory();
    // What a node needs besides its weights: the unbudgeted node's memory
    // less the weights it holds.
    let overhead = unlimited_rss.saturating_sub(EXPERT_BYTES * EXPERTS as u64);
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    // Between jobs the node holds its budget and little more.
    assert!(
        budgeted_rss <= overhead + budget + EXPERT_BYTES,
        "RSS {:.1} MiB over budget {:.1} MiB + overhead {:.1} MiB + one expert",
        mib(budgeted_rss),
        mib(budget),
        mib(overhead),
    );
    // Paging an expert in holds it up to three times over for a moment:
    // the checkpoint's mapped pages, the values read from them, and the
    // laid-out copy.
    assert!(
        budgeted_peak <= overhead + budget + 3 * EXPERT_BYTES,
        "peak RSS {:.1} MiB over budget {:.1} MiB + overhead {:.1} MiB + three experts",
        mib(budgeted_peak),
        mib(budget),
        mib(overhead),
    );
    assert!(
        budgeted_rss + EXPERT_BYTES * 2 < unlimited_rss,
        "budgeted {:.1} MiB, unbudgeted {:.1} MiB",
        mib(budgeted_rss),
        mib(unlimited_rss)
    );
}
