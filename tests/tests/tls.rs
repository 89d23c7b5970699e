//! Mutual TLS: with TLS on, the cluster serves clients that present a
//! certificate signed by its CA, and no one else can call any service.

use moemesh_proto::identity::{Member, Role};
use moemesh_proto::v1::{ClusterStatusRequest, ForwardRequest, InfoRequest};
use moemesh_proto::{AdminServiceClient, ExpertServiceClient, RouterServiceClient};
use moemesh_tests::{
    ClusterSandbox, CoordinatorSandbox, Fixture, SandboxSecurity, TestAuthority, partly_replicated,
    relative_l2,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// An endpoint that verifies the server against `ca` and presents
/// `identity`, if any.
fn endpoint(url: &str, ca: &str, identity: Option<(&str, &str)>) -> Endpoint {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Endpoint::from_shared(url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_the_clusters_certificates_get_in() {
    let security = SandboxSecurity::tls();
    let SandboxSecurity::Tls(authority) = &security else {
        unreachable!()
    };
    let ca = authority.ca_pem().to_string();
    let sdk_client = Member::new(Role::Client, "c").unwrap();
    let (cert, key) = authority.issue(Some(&sdk_client));

    let fixture = Fixture::open("qwen2_moe");
    let hidden = fixture.hidden_size();
    let (input, expected) = fixture.cases[&1].clone();
    let cluster = ClusterSandbox::start_secured(
        &fixture.dir,
        2,
        partly_replicated(&fixture.dir),
        security.clone(),
    )
    .await;
    assert!(cluster.router_url.starts_with("https://"));
    // A client with the cluster's identity: the router (and through it the
    // expert nodes) serve it.
    let mut client = cluster.client().await;
    let output = client.forward_f32("", 1, &input, hidden).await.unwrap();
    assert!(relative_l2(&output, &expected) < 1e-5);

    // Without a client certificate, nothing is served: not the router...
    let request = ForwardRequest {
        model: String::new(),
        layer: 1,
        hidden: None,
    };
    let anonymous = endpoint(&cluster.router_url, &ca, None);
    let refused = match anonymous.connect().await {
        Ok(channel) => RouterServiceClient::new(channel)
            .forward(request.clone())
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
    // ...nor an expert node...
    let node_url = cluster.placement.nodes()[0].address.clone();
    let anonymous = endpoint(&node_url, &ca, None);
    let refused = match anonymous.connect().await {
        Ok(channel) => ExpertServiceClient::new(channel)
            .info(InfoRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "an expert node served a client without a certificate"
    );
    // ...and a certificate from another authority does not help.
    let other = TestAuthority::new();
    let other_ca = other.ca_pem().to_string();
    let (other_cert, other_key) = other.issue(Some(&sdk_client));
    let stranger = endpoint(&cluster.router_url, &ca, Some((&other_cert, &other_key)));
    let refused = match stranger.connect().await {
        Ok(channel) => RouterServiceClient::new(channel)
            .forward(request.clone())
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate from another CA was accepted");
    // Plain HTTP gets nowhere either.
    let plain_url = cluster.router_url.replacen("https://", "http://", 1);
    if let Ok(channel) = Endpoint::from_shared(plain_url).unwrap().connect().await {
        assert!(
            RouterServiceClient::new(channel)
                .forward(request)
                .await
                .is_err()
        );
    }
    // A client that trusts the wrong CA does not trust the cluster either.
    let mistrusting = endpoint(&cluster.router_url, &other_ca, Some((&cert, &key)));
    assert!(mistrusting.connect().await.is_err());
    cluster.shutdown().await;

    // Coordinators too.
    let coordinators = CoordinatorSandbox::start_secured(3, security).await;
    let leader = coordinators.leader(1).await;
    let url = coordinators.urls[&leader].clone();
    assert!(url.starts_with("https://"));
    let anonymous = endpoint(&url, &ca, None);
    let refused = match anonymous.connect().await {
        Ok(channel) => AdminServiceClient::new(channel)
            .cluster_status(ClusterStatusRequest {})
            .await
            .is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "a coordinator served a client without a certificate"
    );
    coordinators.shutdown().await;
}
