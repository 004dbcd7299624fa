//! gRPC health (`grpc.health.v1`) on the mutual-TLS listener: SERVING while
//! the gateway serves, NOT_SERVING to watchers once shutdown starts, and the
//! watch streams end so they do not hold the drain open.

use crate::support;

use support::TestGateway;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const HANDOVER: &str = "throughcare.v1.HandoverService";

async fn health(gw: &TestGateway, name: &str) -> HealthClient<tonic::transport::Channel> {
    let channel = throughcare::client::channel(&gw.endpoint, &gw.certs(), name)
        .await
        .expect("client connects");
    HealthClient::new(channel)
}

fn ask(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.into(),
    }
}

#[tokio::test]
async fn check_reports_serving_for_the_server_and_the_handover_service() {
    let gw = TestGateway::start().await;
    for caller in ["YG001", "operator-oncall"] {
        let mut client = health(&gw, caller).await;
        for service in ["", HANDOVER] {
            let status = client
                .check(ask(service))
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(
                status,
                ServingStatus::Serving as i32,
                "{caller} {service:?}"
            );
        }
        let unknown = client
            .check(ask("throughcare.v1.Nothing"))
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
    }
    gw.stop().await;
}

#[tokio::test]
async fn watchers_see_not_serving_when_shutdown_starts_and_their_stream_ends() {
    // A grace period far longer than the bounds below: a watch stream left
    // open would hold the drain (and this test) until it ran out.
    let gw = TestGateway::start_with(
        |c| c.shutdown_grace_ms = 600_000,
        std::sync::Arc::new(throughcare::store::SystemClock),
    )
    .await;
    let mut client = health(&gw, "YP001").await;
    let mut watch = client.watch(ask(HANDOVER)).await.unwrap().into_inner();
    let first = watch.message().await.unwrap().expect("a first status");
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let stopping = tokio::spawn(gw.stop());
    let next = watch
        .message()
        .await
        .unwrap()
        .expect("a status on shutdown");
    assert_eq!(next.status, ServingStatus::NotServing as i32);
    // The stream ends rather than staying open, and the drain finishes.
    let bound = std::time::Duration::from_secs(30);
    let ended = tokio::time::timeout(bound, async {
        while let Ok(Some(m)) = watch.message().await {
            assert_eq!(m.status, ServingStatus::NotServing as i32);
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch stream stayed open after shutdown");
    tokio::time::timeout(bound, stopping)
        .await
        .expect("the drain finishes without waiting out the grace period")
        .unwrap();
}
