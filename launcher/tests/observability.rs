//! What an operator sees of a cluster that `moemesh up` runs: every
//! process serves Prometheus metrics and gRPC health on its metrics
//! listener, and gRPC health and reflection on its gRPC port.

mod up_process;

use std::io::{Read, Write};
use std::time::Duration;

use moemesh_client::Client;
use moemesh_tests::Fixture;
use moemesh_tests::exposition::{self, Exposition};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use up_process::UpProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_health_and_reflection() {
    let fixture = Fixture::open("mixtral");
    let model = fixture.dir.to_string_lossy().into_owned();
    let up = tokio::task::spawn_blocking(move || UpProcess::two_expert_nodes(&model, &[]))
        .await
        .unwrap();
    assert_eq!(
        up.metrics.len(),
        6,
        "three coordinators, two experts, a router: {:?}",
        up.metrics
    );

    let mut client = Client::connect(up.router.clone()).await.unwrap();
    let mut forwarded_tokens = 0;
    for (&layer, (input, _)) in &fixture.cases {
        client
            .forward_f32("", layer as u32, input, fixture.hidden_size())
            .await
            .unwrap();
        forwarded_tokens += input.len() / fixture.hidden_size();
    }

    for (id, url) in &up.metrics {
        let scrape = scrape(url);
        let exposition = exposition::parse(&scrape)
            .unwrap_or_else(|error| panic!("{id}'s scrape is not valid: {error}\n{scrape}"));
        check_counts(id, &exposition, forwarded_tokens);
        let address = url.trim_end_matches("/metrics").to_string();
        assert_eq!(
            health(&address).await,
            ServingStatus::Serving,
            "{id} on its metrics listener"
        );
        let listed = reflected_services(&address).await;
        assert!(
            listed.iter().any(|name| name == "grpc.health.v1.Health"),
            "{id}'s metrics listener lists {listed:?}"
        );
    }

    // Routers report their counts every second; the leader's load window
    // takes each report's increase, so a forward after the first report
    // shows there.
    let leader = up
        .metrics
        .iter()
        .find(|(id, url)| {
            id.starts_with("coordinator")
                && exposition::parse(&scrape(url))
                    .unwrap()
                    .sum("moemesh_coordinator_is_leader", &[])
                    == 1.0
        })
        .map(|(_, url)| url.clone())
        .expect("a coordinator leads");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (&layer, (input, _)) = fixture.cases.iter().next().unwrap();
        client
            .forward_f32("", layer as u32, input, fixture.hidden_size())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reported = exposition::parse(&scrape(&leader))
            .unwrap()
            .sum("moemesh_coordinator_reported_tokens_total", &[]);
        if reported > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leader's load window took no tokens"
        );
    }

    let mut servers: Vec<(String, &[&str])> = Vec::new();
    for url in &up.coordinators {
        servers.push((url.clone(), &["moemesh.v1.AdminService"]));
    }
    for (_, url) in &up.experts {
        servers.push((url.clone(), &["moemesh.v1.ExpertService"]));
    }
    servers.push((up.router.clone(), &["moemesh.v1.RouterService"]));
    for (url, own) in servers {
        let listed = reflected_services(&url).await;
        for service in own.iter().chain(&[
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]) {
            assert!(
                listed.iter().any(|name| name == service),
                "{url} does not list {service}: {listed:?}"
            );
        }
        assert_eq!(health(&url).await, ServingStatus::Serving, "{url}");
    }
}

/// What each role must show after the forwards.
fn check_counts(id: &str, exposition: &Exposition, forwarded_tokens: usize) {
    if id.starts_with("router") {
        let tokens = exposition.sum("moemesh_router_tokens_total", &[]);
        assert_eq!(tokens, forwarded_tokens as f64, "router tokens");
        assert!(exposition.sum("moemesh_router_forwards_total", &[("code", "ok")]) >= 1.0);
        assert!(exposition.sum("moemesh_router_bytes_sent_total", &[]) > 0.0);
        assert!(exposition.sum("moemesh_placement_epoch", &[]) >= 1.0);
    } else if id.starts_with("expert") {
        assert!(
            exposition.sum("moemesh_expert_tokens_total", &[]) > 0.0,
            "{id} computed no tokens"
        );
        assert!(exposition.sum("moemesh_expert_compute_seconds_count", &[]) > 0.0);
    } else {
        assert!(
            exposition.sum("moemesh_placement_epoch", &[]) >= 1.0,
            "{id}'s epoch"
        );
        assert!(exposition.has("moemesh_coordinator_is_leader"));
        assert!(exposition.has("moemesh_coordinator_reported_tokens_total"));
    }
}

/// GET `url` over HTTP/1.1; returns the body of a 200 answer.
fn scrape(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (address, path) = rest.split_once('/').expect("URL with a path");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    body.to_string()
}

async fn channel(address: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(address.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn health(address: &str) -> ServingStatus {
    let mut client = HealthClient::new(channel(address).await);
    let answer = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    answer.into_inner().status()
}

/// The services a server lists through gRPC reflection (v1).
async fn reflected_services(address: &str) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel(address).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let answer = answers.message().await.unwrap().expect("one answer");
    match answer.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect(),
        other => panic!("not a service list: {other:?}"),
    }
}
