//! Handshake admission under attack, with many source addresses in
//! 127.0.0.0/8 (each client socket is bound to its own 127.x.y.z before it
//! connects):
//! - a slow-client flood (500 half-open TLS connections, kept up, from 32
//!   addresses in 4 networks) against the real binary cannot lock out a
//!   well-behaved client, from outside the flooding networks or inside one;
//! - 60 organisations behind one NAT address connecting at once all get in;
//! - handshakes without a client certificate from many addresses do not grow
//!   the audit trail one entry each: they are summarised per address and
//!   reason per second, and every one is counted.

use crate::support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use support::*;
use throughcare::grpc::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

fn tls_config(certs: &Path, name: Option<&str>) -> Arc<rustls::ClientConfig> {
    let pem = |p: std::path::PathBuf| std::fs::read(p).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem(certs.join("ca.pem"))) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match name {
        Some(name) => {
            let paths = throughcare::certs::DevPaths {
                dir: certs.to_owned(),
            };
            let (cert, key) = paths.client(name);
            let chain = CertificateDer::pem_slice_iter(&pem(cert))
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(&pem(key)).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// A complete mutual-TLS handshake from `from`, and proof the server accepted
/// the client certificate (it answers the HTTP/2 preface with its SETTINGS).
async fn handshake_from(from: IpAddr, to: SocketAddr, config: Arc<rustls::ClientConfig>) -> bool {
    let attempt = async {
        let tcp = connect_from(from, to).await.ok()?;
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .ok()?;
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .ok()?;
        let mut buf = [0u8; 9];
        tls.read_exact(&mut buf).await.ok()?;
        (buf[3] == 0x04).then_some(()) // a SETTINGS frame
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// One slow client: connects from `from`, sends the first five bytes of a
/// TLS record that never comes, waits to be closed, and does it again (after
/// a short pause) until `stop`.
async fn stall(from: IpAddr, to: SocketAddr, stop: Arc<AtomicBool>, opened: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(mut s) = connect_from(from, to).await {
            opened.fetch_add(1, Ordering::Relaxed);
            let _ = s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
            let mut buf = [0u8; 16];
            let closed = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
            let stopped = async {
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                () = closed => {}
                () = stopped => return,
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_handshake_flood_from_32_addresses_does_not_lock_out_a_well_behaved_client() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    throughcare::certs::init_dev_pki(&certs).unwrap();
    let port = support::free_port();
    // Default limits: 256 handshake slots, a 10 s handshake timeout.
    let child = Command::new(BIN)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(&certs)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _gateway = Binary(child);
    let server: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..150 {
        if tokio::net::TcpStream::connect(server).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "gateway listens");

    // 500 slow clients from 32 addresses in four /24 networks, kept up.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let attackers: Vec<_> = (0..500u32)
        .map(|i| {
            let a = i % 32;
            let from = ip(&format!("127.10.{}.{}", a / 8, a + 1));
            tokio::spawn(stall(from, server, stop.clone(), opened.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Meanwhile, well-behaved clients keep getting in: a practice opening a
    // new gRPC connection and calling, and fresh handshakes from an address
    // inside a flooding network and from a network of its own.
    let good = tls_config(&certs, Some("YG002"));
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    let mut rounds = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let call = async {
            let mut practice = throughcare::cli::client::handover(&endpoint, &certs, "YG001")
                .await
                .ok()?;
            practice.pull(pull(1)).await.ok()
        };
        let answered = tokio::time::timeout(Duration::from_secs(5), call).await;
        assert!(
            matches!(answered, Ok(Some(_))),
            "round {rounds}: a new connection and call during the flood: {answered:?}"
        );
        assert!(
            handshake_from(ip("127.10.0.200"), server, good.clone()).await,
            "round {rounds}: a handshake from inside a flooding /24"
        );
        assert!(
            handshake_from(ip("127.20.0.1"), server, good.clone()).await,
            "round {rounds}: a handshake from another network"
        );
        worst = worst.max(t.elapsed());
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        let _ = a.await;
    }
    eprintln!(
        "flood: {} slow connections opened from 32 addresses; {rounds} well-behaved rounds, slowest {worst:?}",
        opened.load(Ordering::Relaxed)
    );
    assert!(rounds >= 5);
    assert!(opened.load(Ordering::Relaxed) >= 500, "the flood was real");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_organisations_behind_one_address_all_connect_at_the_start_of_the_day() {
    let gw = TestGateway::start().await;
    let mut op = gw.operator().await;
    let ca = gw.ca();
    let ca_pem = gw.ca_pem();
    let mut identities = Vec::new();
    for i in 0..60 {
        let code = format!("YN{i:03}");
        let name = format!("NAT practice {i}");
        op.put_organisation(organisation(&code, pb::OrganisationKind::GpPractice, &name))
            .await
            .unwrap();
        identities.push(ca.issue_client_now(&format!("urn:ods:{code}")).unwrap());
    }
    // All at once, from one address (the NAT's: 127.0.0.1).
    let start = Arc::new(tokio::sync::Barrier::new(60));
    let calls: Vec<_> = identities
        .into_iter()
        .map(|id| {
            let (endpoint, ca_pem, start) = (gw.endpoint.clone(), ca_pem.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                let channel = throughcare::tls::client_channel(
                    &endpoint,
                    &ca_pem,
                    id.cert_pem.as_bytes(),
                    id.key_pem.as_bytes(),
                )
                .await
                .map_err(|e| format!("connect: {e}"))?;
                pb::handover_service_client::HandoverServiceClient::new(channel)
                    .pull(pull(1))
                    .await
                    .map(|_| ())
                    .map_err(|s| format!("pull: {s:?}"))
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 60 refused: {failed:?}",
        failed.len()
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_without_a_certificate_are_summarised_per_address_and_reason() {
    let gw = TestGateway::start().await;
    let server: SocketAddr = gw.endpoint.trim_start_matches("https://").parse().unwrap();
    let anonymous = tls_config(&gw.certs(), None);
    let before = gw.store.audit_entries().unwrap().len();
    let tries: Vec<_> = (0..300u32)
        .map(|i| {
            let from = ip(&format!("127.30.0.{}", i % 10 + 1));
            let config = anonymous.clone();
            tokio::spawn(async move { handshake_from(from, server, config).await })
        })
        .collect();
    for t in tries {
        assert!(
            !t.await.unwrap(),
            "no handshake without a certificate succeeds"
        );
    }
    // Every refusal counted, in a bounded number of entries.
    let mut counted = 0;
    let mut entries = Vec::new();
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        entries = gw.store.audit_entries().unwrap()[before..]
            .iter()
            .filter(|e| e.action == "connect")
            .cloned()
            .collect::<Vec<_>>();
        counted = entries
            .iter()
            .map(|e| {
                e.outcome
                    .strip_prefix("refused: ")
                    .and_then(|o| o.split_once(" connections: "))
                    .map_or(1, |(n, _)| n.parse::<u64>().unwrap())
            })
            .sum::<u64>();
        if counted == 300 {
            break;
        }
    }
    assert_eq!(counted, 300, "{entries:#?}");
    assert!(
        entries.len() * 5 <= 300,
        "summarised, not one entry per refusal: {} entries",
        entries.len()
    );
    // At most one entry per address and reason a second. An entry's time is
    // when its write was durable, not when its second's tally was taken: a
    // busy store writer may write one late and the next on time, so the
    // seconds are counted over the span, not between neighbours.
    let mut times = std::collections::HashMap::<_, Vec<i64>>::new();
    for e in &entries {
        let reason = e.outcome.split(": ").last().unwrap().to_owned();
        times
            .entry((e.actor.clone(), reason))
            .or_default()
            .push(e.at_ms);
    }
    for at in times.values() {
        let span_ms = at.iter().max().unwrap() - at.iter().min().unwrap();
        let seconds = usize::try_from(span_ms / 1_000).unwrap();
        assert!(at.len() <= seconds + 2, "{entries:#?}");
    }
    assert!(
        entries
            .iter()
            .all(|e| e.actor.starts_with("peer:loopback:127.30.0.")),
        "{entries:#?}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e.outcome.contains("no client certificate"))
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_refusal_just_before_shutdown_is_still_recorded() {
    let gw = TestGateway::start().await;
    let server: SocketAddr = gw.endpoint.trim_start_matches("https://").parse().unwrap();
    assert!(!handshake_from(ip("127.31.0.1"), server, tls_config(&gw.certs(), None)).await);
    let (dir, config) = gw.stop().await;
    let store = throughcare::store::Store::open(
        &config.data_dir,
        throughcare::store::StoreOptions::default(),
        Arc::new(throughcare::store::SystemClock),
    )
    .unwrap();
    let refusals: Vec<_> = store
        .audit_entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "connect")
        .map(|e| (e.actor, e.outcome))
        .collect();
    assert_eq!(
        refusals,
        [(
            "peer:loopback:127.31.0.1".to_owned(),
            "refused: no client certificate".to_owned()
        )]
    );
    store.close().await.unwrap();
    drop(dir);
}
