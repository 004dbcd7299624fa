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
    let channel = throughcare::cli::client::channel(&gw.endpoint, &gw.certs(), name)
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

/// `throughcare health` (the compose health check) run as a process against
/// the real server: exit 0 while it serves, 1 for a service it does not
/// serve, for a certificate from another CA, and once it has stopped.
#[tokio::test]
async fn the_health_command_exits_zero_only_while_serving() {
    let gw = TestGateway::start().await;
    let paths = gw.paths();
    let (cert, key) = paths.client("operator-oncall");
    let run = |server: String, cert: std::path::PathBuf, key: std::path::PathBuf, service: &str| {
        let ca = paths.ca_cert();
        let service = service.to_owned();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_throughcare"))
                .arg("health")
                .arg("--server")
                .arg(server)
                .arg("--ca")
                .arg(ca)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key)
                .args(["--service", &service, "--timeout-ms", "5000"])
                .output()
                .await
                .unwrap()
        }
    };
    let ok = run(gw.endpoint.clone(), cert.clone(), key.clone(), "").await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "SERVING");
    let ok = run(gw.endpoint.clone(), cert.clone(), key.clone(), HANDOVER).await;
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");

    let unknown = run(
        gw.endpoint.clone(),
        cert.clone(),
        key.clone(),
        "throughcare.v1.Nothing",
    )
    .await;
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");

    // A certificate the gateway's CA did not issue is refused at the handshake.
    let stranger = throughcare::certs::CertAuthority::generate("another CA")
        .unwrap()
        .issue_client_now("urn:operator:oncall")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (s_cert, s_key) = (dir.path().join("s.pem"), dir.path().join("s.key"));
    std::fs::write(&s_cert, &stranger.cert_pem).unwrap();
    std::fs::write(&s_key, &stranger.key_pem).unwrap();
    let refused = run(gw.endpoint.clone(), s_cert, s_key, "").await;
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");

    let endpoint = gw.endpoint.clone();
    gw.stop().await;
    let stopped = run(endpoint, cert, key, "").await;
    assert_eq!(stopped.status.code(), Some(1), "{stopped:?}");
    assert!(
        String::from_utf8_lossy(&stopped.stderr).contains("unhealthy"),
        "{stopped:?}"
    );
}

/// The real binary under a service manager: `READY=1` on `NOTIFY_SOCKET`
/// once it answers health checks (a `Type=notify` unit's start), and
/// `STOPPING=1` when SIGTERM starts the drain.
#[tokio::test]
async fn the_binary_tells_the_service_manager_when_it_is_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    throughcare::certs::init_dev_pki(&certs).unwrap();
    let socket_path = dir.path().join("notify");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let port = support::free_port();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_throughcare"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(&certs)
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let bound = std::time::Duration::from_secs(60);
    let mut next = async || {
        let n = tokio::time::timeout(bound, socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next().await.trim(), "READY=1");
    // Ready means serving: the first health check after it succeeds.
    let endpoint = format!("https://127.0.0.1:{port}");
    let channel = throughcare::cli::client::channel(&endpoint, &certs, "operator-oncall")
        .await
        .expect("the gateway accepts once it said READY=1");
    let status = HealthClient::new(channel)
        .check(ask(""))
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert_eq!(next().await.trim(), "STOPPING=1");
    let exit = tokio::time::timeout(bound, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
