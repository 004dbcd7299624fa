//! The TLS refusal matrix over real sockets on 127.0.0.1: every kind of bad
//! client is refused, and every refusal is in the audit trail with the actor
//! as far as it is known and the reason.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use throughcare::certs::CertAuthority;
use throughcare::store::SystemClock;
use tonic::Code;

/// Calls Pull presenting `identity` (PEM cert and key), trusting the dev CA.
/// `Ok` only when the call succeeded; `Err` carries the status code when the
/// refusal came as a gRPC status, `None` when the connection failed.
async fn call_with(gw: &TestGateway, identity: Option<(&str, &str)>) -> Result<(), Option<Code>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(gw.ca_pem()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(gw.endpoint.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|_| None)?;
    let mut client =
        throughcare::grpc::pb::handover_service_client::HandoverServiceClient::new(channel);
    match client.pull(pull(1)).await {
        Ok(_) => Ok(()),
        // A handshake refused after the client thought it finished shows up
        // as a transport error inside a status of code Unknown/Unavailable.
        Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
            Err(Some(s.code()))
        }
        Err(_) => Err(None),
    }
}

/// Waits (bounded) for an audit entry of `action` whose outcome contains
/// `reason`; returns it.
async fn audited(gw: &TestGateway, action: &str, reason: &str) -> throughcare::audit::AuditEntry {
    audited_where(gw, |e| e.action == action && e.outcome.contains(reason)).await
}

async fn audited_where(
    gw: &TestGateway,
    wanted: impl Fn(&throughcare::audit::AuditEntry) -> bool,
) -> throughcare::audit::AuditEntry {
    for _ in 0..100 {
        if let Some(e) = gw.store.audit_entries().unwrap().into_iter().find(&wanted) {
            return e;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all: Vec<String> = gw
        .store
        .audit_entries()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e.actor, e.action, e.outcome))
        .collect();
    panic!("no such audit entry; trail:\n{}", all.join("\n"));
}

fn self_signed(uri: &str) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "self-signed rogue");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A key usage without digitalSignature: the key may not sign the
/// handshake (RFC 5280 §4.2.1.3 and §4.2.1.12; RFC 8446 §4.4.2.2), whatever
/// its extended key usage says. webpki checks only the latter.
#[tokio::test]
async fn a_client_certificate_whose_key_may_not_sign_is_refused_and_audited() {
    let gw = TestGateway::start().await;
    let signing = gw
        .ca()
        .issue_client_with_key_usages(
            "urn:ods:YP001",
            vec![rcgen::KeyUsagePurpose::DigitalSignature],
        )
        .unwrap();
    assert_eq!(
        call_with(&gw, Some((&signing.cert_pem, &signing.key_pem))).await,
        Ok(())
    );
    let no_signing = gw
        .ca()
        .issue_client_with_key_usages(
            "urn:ods:YP001",
            vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ],
        )
        .unwrap();
    assert!(
        call_with(&gw, Some((&no_signing.cert_pem, &no_signing.key_pem)))
            .await
            .is_err()
    );
    let e = audited(&gw, "connect", "not for client authentication").await;
    assert_eq!(e.actor, "urn:ods:YP001");
    gw.stop().await;
}

/// A certificate the CA issued without an extended key usage (valid for
/// any purpose under RFC 5280, and so accepted by webpki) or for servers
/// only is no caller, whatever identity it carries.
#[tokio::test]
async fn a_client_certificate_not_issued_for_client_authentication_is_refused() {
    let gw = TestGateway::start().await;
    for (what, extended) in [
        ("no extended key usage", vec![]),
        (
            "server authentication only",
            vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth],
        ),
    ] {
        let cert = gw
            .ca()
            .issue_client_for(
                "urn:ods:YP001",
                vec![rcgen::KeyUsagePurpose::DigitalSignature],
                extended,
            )
            .unwrap();
        assert!(
            call_with(&gw, Some((&cert.cert_pem, &cert.key_pem)))
                .await
                .is_err(),
            "{what}"
        );
    }
    // Both refusals are audited; the one webpki passes (no extended key
    // usage) names the identity the CA issued it for.
    audited(&gw, "connect", "not for client authentication").await;
    let named = || {
        gw.store.audit_entries().unwrap().into_iter().any(|e| {
            e.action == "connect"
                && e.actor == "urn:ods:YP001"
                && e.outcome.contains("not for client authentication")
        })
    };
    for _ in 0..100 {
        if named() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(named());
    gw.stop().await;
}

#[tokio::test]
async fn every_bad_client_is_refused_and_audited() {
    let gw = TestGateway::start().await;
    let now = time::OffsetDateTime::now_utc();
    let day = time::Duration::days(1);

    // The genuine certificate works (the baseline).
    let good = gw.ca().issue_client_now("urn:ods:YP001").unwrap();
    assert_eq!(
        call_with(&gw, Some((&good.cert_pem, &good.key_pem))).await,
        Ok(())
    );

    // No client certificate.
    assert!(call_with(&gw, None).await.is_err());
    let e = audited(&gw, "connect", "no client certificate").await;
    assert_eq!(e.actor, "peer:loopback:127.0.0.1");

    // Self-signed.
    let (cert, key) = self_signed("urn:ods:YP002");
    assert!(call_with(&gw, Some((&cert, &key))).await.is_err());
    let e = audited(&gw, "connect", "not issued by the gateway's CA").await;
    assert_eq!(
        e.actor, "peer:loopback:127.0.0.1",
        "a certificate the CA did not issue is the caller's own words: not named"
    );

    // Issued by another CA.
    let other = CertAuthority::generate("another CA").unwrap();
    let foreign = other.issue_client_now("urn:ods:YG002").unwrap();
    assert!(
        call_with(&gw, Some((&foreign.cert_pem, &foreign.key_pem)))
            .await
            .is_err()
    );
    for _ in 0..100 {
        let foreign_refusals = gw
            .store
            .audit_entries()
            .unwrap()
            .into_iter()
            .filter(|x| x.outcome.contains("not issued by the gateway's CA"))
            .count();
        if foreign_refusals == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let trail = serde_json::to_string(&gw.store.audit_entries().unwrap()).unwrap();
    assert!(
        !trail.contains("YG002") && !trail.contains("YP002") && !trail.contains("rogue"),
        "names in certificates the CA did not issue are never recorded: {trail}"
    );

    // Expired, and not yet valid.
    let expired = gw
        .ca()
        .issue_client("urn:ods:YG001", now - day * 30, now - day)
        .unwrap();
    assert!(
        call_with(&gw, Some((&expired.cert_pem, &expired.key_pem)))
            .await
            .is_err()
    );
    let e = audited(&gw, "connect", "expired").await;
    assert_eq!(e.actor, "urn:ods:YG001");
    let early = gw
        .ca()
        .issue_client("urn:ods:YPR01", now + day, now + day * 30)
        .unwrap();
    assert!(
        call_with(&gw, Some((&early.cert_pem, &early.key_pem)))
            .await
            .is_err()
    );
    let e = audited(&gw, "connect", "not yet valid").await;
    assert_eq!(e.actor, "urn:ods:YPR01");

    // A certificate naming no identity the gateway knows.
    let nameless = gw
        .ca()
        .issue_client_now("https://example.invalid/x")
        .unwrap();
    assert!(
        call_with(&gw, Some((&nameless.cert_pem, &nameless.key_pem)))
            .await
            .is_err()
    );
    let e = audited(&gw, "connect", "no urn:ods: or urn:operator: SAN URI").await;
    assert!(e.actor.starts_with("subject:"), "{}", e.actor);

    // A valid certificate for an unregistered ODS code: refused per call.
    let stranger = gw.ca().issue_client_now("urn:ods:YX999").unwrap();
    assert_eq!(
        call_with(&gw, Some((&stranger.cert_pem, &stranger.key_pem))).await,
        Err(Some(Code::Unauthenticated))
    );
    let e = audited(&gw, "pull", "Unauthenticated").await;
    assert_eq!(e.actor, "urn:ods:YX999");

    // Refusals leave the chain intact and change nothing else.
    let connects = gw
        .store
        .audit_entries()
        .unwrap()
        .iter()
        .filter(|e| e.action == "connect")
        .count();
    assert_eq!(connects, 6, "one entry per refused connection");
    assert_eq!(gw.store.verify_audit().unwrap(), 7);
    gw.stop().await;
}

/// A gateway's configuration in `dir` with the certificates in `certs`.
fn config_in(dir: &std::path::Path, certs: &std::path::Path) -> throughcare::config::Config {
    throughcare::config::Config {
        data_dir: dir.join("data"),
        certs_dir: certs.to_owned(),
        shutdown_grace_ms: 2_000,
        metrics: throughcare::config::MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        ..Default::default()
    }
}

fn write_atomically(path: &std::path::Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_crl_refuses_revoked_clients_and_a_new_one_applies_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let paths = throughcare::certs::init_dev_pki(&certs).unwrap();
    let ca = CertAuthority::load(&paths.ca_cert(), &paths.ca_key()).unwrap();
    let revoked_early = ca.issue_client_now("urn:ods:YG001").unwrap();
    let revoked_later = ca.issue_client_now("urn:ods:YG002").unwrap();
    let crl = dir.path().join("revoked.pem");
    write_atomically(
        &crl,
        &ca.crl(std::slice::from_ref(&revoked_early.serial)).unwrap(),
    );

    let config = throughcare::config::Config {
        data_dir: dir.path().join("data"),
        certs_dir: certs.clone(),
        shutdown_grace_ms: 2_000,
        tls: throughcare::config::TlsConfig {
            crl: Some(crl.clone()),
            ..Default::default()
        },
        metrics: throughcare::config::MetricsConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
        },
        ..Default::default()
    };
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;

    let early = (&*revoked_early.cert_pem, &*revoked_early.key_pem);
    let later = (&*revoked_later.cert_pem, &*revoked_later.key_pem);
    assert!(call_with(&gw, Some(early)).await.is_err());
    let e = audited(&gw, "connect", "revoked").await;
    assert_eq!(e.actor, "urn:ods:YG001");
    assert_eq!(call_with(&gw, Some(later)).await, Ok(()));

    // Publish a new CRL while the gateway runs: within a couple of seconds
    // the newly revoked certificate is refused, with no restart.
    write_atomically(
        &crl,
        &ca.crl(&[revoked_early.serial.clone(), revoked_later.serial.clone()])
            .unwrap(),
    );
    let mut refused = false;
    for _ in 0..50 {
        if call_with(&gw, Some(later)).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the replaced CRL was not applied within 5 s");
    // The second revocation is audited.
    audited_where(&gw, |x| {
        x.actor == "urn:ods:YG002" && x.outcome.contains("revoked")
    })
    .await;
    // An unreadable replacement keeps the last good CRL in force.
    write_atomically(&crl, "not a CRL");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(call_with(&gw, Some(later)).await.is_err());
    let fine = gw.client("YP001").await.pull(pull(1)).await;
    assert!(fine.is_ok(), "valid clients keep working: {fine:?}");
    // So does one in the CA's name but signed with another key: put in
    // force, it would refuse every client (webpki fails its signature).
    let other = tempfile::tempdir().unwrap();
    let other_paths = throughcare::certs::init_dev_pki(other.path()).unwrap();
    let impostor = CertAuthority::load(&other_paths.ca_cert(), &other_paths.ca_key()).unwrap();
    write_atomically(&crl, &impostor.crl(&[]).unwrap());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let fine = gw.client("YP001").await.pull(pull(1)).await;
    assert!(fine.is_ok(), "a forged CRL is not put in force: {fine:?}");
    assert!(
        call_with(&gw, Some(later)).await.is_err(),
        "the last good CRL stays"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_silent_client_is_cut_off_at_the_handshake_timeout_and_audited() {
    let gw = TestGateway::start_with(
        |c| c.tls.handshake_timeout_ms = Some(300),
        Arc::new(SystemClock),
    )
    .await;
    let addr = gw.endpoint.trim_start_matches("https://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await
    .expect("the gateway closes the connection");
    assert!(matches!(read, Ok(0) | Err(_)), "closed: {read:?}");
    let e = audited(&gw, "connect", "timed out").await;
    assert_eq!(e.actor, "peer:loopback:127.0.0.1");
    gw.stop().await;
}

#[tokio::test]
async fn an_open_connection_of_a_revoked_client_is_closed_when_the_crl_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let paths = throughcare::certs::init_dev_pki(&certs).unwrap();
    let ca = CertAuthority::load(&paths.ca_cert(), &paths.ca_key()).unwrap();
    let client = ca.issue_client_now("urn:ods:YG001").unwrap();
    let crl = dir.path().join("revoked.pem");
    write_atomically(&crl, &ca.crl(&[]).unwrap());
    let mut config = config_in(dir.path(), &certs);
    config.tls.crl = Some(crl.clone());
    // MLLP too: its listener shares the TLS files, and its connections have
    // no maximum age, so a revocation must reach them as well.
    config.mllp.enabled = true;
    config.mllp.listen = "127.0.0.1:0".parse().unwrap();
    let held_pki = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(held_pki.path().join("clients")).unwrap();
    std::fs::copy(paths.ca_cert(), held_pki.path().join("ca.pem")).unwrap();
    std::fs::write(held_pki.path().join("clients/YG001.pem"), &client.cert_pem).unwrap();
    std::fs::write(held_pki.path().join("clients/YG001.key"), &client.key_pem).unwrap();
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let mut held = gw
        .client_with(
            &gw.ca_pem(),
            client.cert_pem.as_bytes(),
            client.key_pem.as_bytes(),
        )
        .await
        .unwrap();
    held.pull(pull(1)).await.unwrap();
    let tcp = tokio::net::TcpStream::connect(gw.mllp_addr.unwrap())
        .await
        .unwrap();
    let mut held_mllp =
        tokio_rustls::TlsConnector::from(tls_client_config(held_pki.path(), "YG001"))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
    let mut bystander = gw.client("YP001").await;
    bystander.pull(pull(1)).await.unwrap();
    write_atomically(&crl, &ca.crl(std::slice::from_ref(&client.serial)).unwrap());
    // The same channel keeps calling; within the reload second its open
    // connection is closed, and the reconnect is refused.
    let mut cut = false;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if held.pull(pull(1)).await.is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "the revoked client still calls on its old connection after 6 s"
    );
    // Its MLLP connection is closed in the same reload, whichever listener
    // noticed the new list first.
    let mut buf = [0u8; 64];
    let mllp_closed = matches!(
        tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut held_mllp, &mut buf)
        )
        .await,
        Ok(Ok(0) | Err(_))
    );
    assert!(
        mllp_closed,
        "the revoked client's MLLP connection is still open"
    );
    audited(&gw, "connect", "revoked").await;
    gw.stop().await;
}

/// The built-in client checks the gateway's certificate against the host its
/// endpoint names: a server certificate the same CA issued to another host
/// (here `localhost`, while the endpoint names 127.0.0.1) does not pass for
/// the gateway. Before, every endpoint was checked as `localhost`; every
/// other test connects to 127.0.0.1 with the dev certificate, which names it.
#[tokio::test]
async fn the_client_checks_the_gateways_certificate_against_the_endpoints_host() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let paths = throughcare::certs::init_dev_pki(&certs).unwrap();
    let ca = CertAuthority::load(&paths.ca_cert(), &paths.ca_key()).unwrap();
    let elsewhere = ca.issue_server(&["localhost"]).unwrap();
    let (cert, key) = (dir.path().join("other.pem"), dir.path().join("other.key"));
    std::fs::write(&cert, &elsewhere.cert_pem).unwrap();
    std::fs::write(&key, &elsewhere.key_pem).unwrap();
    let mut config = config_in(dir.path(), &certs);
    config.tls.cert = Some(cert);
    config.tls.key = Some(key);
    let gw = TestGateway::start_in(dir, config, Arc::new(SystemClock)).await;
    let (client_cert, client_key) = paths.client("YP001");
    let connected = throughcare::tls::client_channel(
        &gw.endpoint,
        &std::fs::read(paths.ca_cert()).unwrap(),
        &std::fs::read(client_cert).unwrap(),
        &std::fs::read(client_key).unwrap(),
    )
    .await;
    assert!(
        connected.is_err(),
        "a certificate for localhost passed for {}",
        gw.endpoint
    );
    gw.stop().await;
}
