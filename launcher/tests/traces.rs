//! Traces cross processes: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the
//! router and the expert nodes of `moemesh up` export their spans to an
//! OTLP collector (here, one in this test), and the spans of one forward
//! share a trace id, the expert nodes' calls nested under the router's.

mod up_process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moemesh_client::Client;
use moemesh_tests::Fixture;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use up_process::UpProcess;

/// A span as the collector received it.
#[derive(Clone, Debug)]
struct ReceivedSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// An OTLP trace collector that keeps every span.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|resource| &resource.attributes)
                .find(|attribute| attribute.key == "service.name")
                .and_then(
                    |attribute| match attribute.value.as_ref()?.value.as_ref()? {
                        Value::StringValue(name) => Some(name.clone()),
                        _ => None,
                    },
                )
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwards_spans_share_one_trace_from_router_to_expert_nodes() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );

    let fixture = Fixture::open("mixtral");
    let model = fixture.dir.to_string_lossy().into_owned();
    let up = tokio::task::spawn_blocking(move || {
        let env = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            // Batches leave every 100 ms instead of every 5 s.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ];
        UpProcess::two_expert_nodes(&model, &env)
    })
    .await
    .unwrap();

    let mut client = Client::connect(up.router.clone()).await.unwrap();
    let (&layer, (input, _)) = fixture.cases.iter().next().unwrap();
    client
        .forward_f32("", layer as u32, input, fixture.hidden_size())
        .await
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let spans = collector.spans.lock().unwrap().clone();
        match nested_forward(&spans) {
            Ok(()) => break,
            Err(why) if Instant::now() > deadline => {
                panic!("{why}; spans received: {spans:#?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    drop(up);
}

/// Checks that some router `Forward` call's trace holds expert-node
/// `Compute` calls whose parents are spans of the router in that trace.
fn nested_forward(spans: &[ReceivedSpan]) -> Result<(), String> {
    let by_id: HashMap<&[u8], &ReceivedSpan> = spans
        .iter()
        .map(|span| (span.span_id.as_slice(), span))
        .collect();
    let forward = spans
        .iter()
        .find(|span| span.service == "moemesh-router" && span.name.ends_with("/Forward"))
        .ok_or("no router span for a Forward call")?;
    let computes: Vec<&ReceivedSpan> = spans
        .iter()
        .filter(|span| span.service == "moemesh-expert" && span.name.ends_with("/Compute"))
        .filter(|span| span.trace_id == forward.trace_id)
        .collect();
    if computes.is_empty() {
        return Err("no expert-node Compute span in the Forward's trace".into());
    }
    for compute in computes {
        let parent = by_id
            .get(compute.parent_span_id.as_slice())
            .ok_or("a Compute span's parent has not arrived")?;
        if parent.service != "moemesh-router" {
            return Err(format!("a Compute span's parent is {parent:?}"));
        }
        // Walk up the router's spans to the Forward call.
        let mut ancestor = *parent;
        while ancestor.span_id != forward.span_id {
            ancestor = by_id
                .get(ancestor.parent_span_id.as_slice())
                .ok_or_else(|| format!("{ancestor:?} does not lead to the Forward span"))?;
        }
    }
    Ok(())
}
