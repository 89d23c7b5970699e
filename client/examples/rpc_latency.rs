//! Round-trip latency of small calls to an expert node's Info RPC.
//!
//!     cargo run --release -p moemesh-client --example rpc_latency -- http://127.0.0.1:50061 [calls]

use std::time::Instant;

use moemesh_proto::ExpertServiceClient;
use moemesh_proto::v1::InfoRequest;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let address = args.next().expect("an expert node URL");
    let calls: usize = args
        .next()
        .map_or(1000, |calls| calls.parse().expect("a count"));
    let endpoint = tonic::transport::Endpoint::from_shared(address)?;
    let mut client = ExpertServiceClient::new(moemesh_proto::data_path_channel(endpoint).await?);
    let mut micros = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        client.info(InfoRequest {}).await?;
        micros.push(started.elapsed().as_micros() as u64);
    }
    micros.sort_unstable();
    println!(
        "{calls} Info calls: p50 {} us, p90 {} us, p99 {} us",
        micros[calls / 2],
        micros[calls * 9 / 10],
        micros[calls * 99 / 100]
    );
    Ok(())
}
