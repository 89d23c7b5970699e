//! The operations listener: health follows readiness and shutdown, and
//! `/metrics` serves the registry.

use std::io::{Read, Write};
use std::sync::Arc;

use moemesh_telemetry::ops::OpsListener;
use prometheus_client::metrics::counter::Counter;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

async fn status(address: &str) -> ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = HealthCheckRequest {
        service: String::new(),
    };
    HealthClient::new(channel)
        .check(request)
        .await
        .unwrap()
        .into_inner()
        .status()
}

fn get_metrics(address: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[tokio::test]
async fn health_follows_readiness_and_metrics_serve_the_registry() {
    let mut registry = moemesh_telemetry::new_registry();
    let tokens = Counter::<u64>::default();
    registry.register("test_tokens", "Tokens", tokens.clone());
    tokens.inc_by(42);

    let listener = OpsListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let health = listener.health();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(listener.serve(Arc::new(registry), async {
        let _ = stop_rx.await;
    }));
    let url = format!("http://{address}");
    assert_eq!(status(&url).await, ServingStatus::NotServing);
    moemesh_telemetry::ops::set_serving(&health).await;
    assert_eq!(status(&url).await, ServingStatus::Serving);

    let answer = tokio::task::spawn_blocking(move || get_metrics(address))
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer
            .lines()
            .any(|line| line == "moemesh_test_tokens_total 42"),
        "{answer}"
    );
    assert!(answer.trim_end().ends_with("# EOF"), "{answer}");

    stop_tx.send(()).unwrap();
    served.await.unwrap().unwrap();
}
