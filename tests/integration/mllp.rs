//! HL7 v2 over MLLP against the real server on 127.0.0.1: mutual TLS with
//! the dev PKI's client certificates (and plain TCP on loopback), each ADT
//! event accepted with an AA only once durable, duplicates, field errors in
//! ERR segments, framing and connection limits, and an AA that survives a
//! kill -9.

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use throughcare::clinical::hl7v2;
use throughcare::clinical::{ClinicalSummary, JourneyEvent};
use throughcare::config::Config;
use throughcare::mllp::frame::{self, FrameReader};
use throughcare::store::SystemClock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

/// A gateway serving MLLP over mutual TLS on a free port, with `tweak`.
async fn gateway(tweak: impl FnOnce(&mut Config)) -> TestGateway {
    TestGateway::start_with(
        |c| {
            c.mllp.enabled = true;
            c.mllp.listen = "127.0.0.1:0".parse().unwrap();
            tweak(c);
        },
        Arc::new(SystemClock),
    )
    .await
}

fn client_config(ca: &[u8], cert: &[u8], key: &[u8]) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// A TLS connection to `addr` presenting `cert`/`key`, trusting `ca`.
async fn connect_with(
    addr: std::net::SocketAddr,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> std::io::Result<Conn> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(client_config(ca, cert, key));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    Ok(Box::new(connector.connect(name, tcp).await?))
}

/// A TLS connection as dev PKI identity `name`, to the gateway's MLLP listener.
async fn connect(gw: &TestGateway, name: &str) -> Conn {
    let (cert, key) = gw.paths().client(name);
    connect_with(
        gw.mllp_addr.expect("MLLP is enabled"),
        &gw.ca_pem(),
        &read(&cert),
        &read(&key),
    )
    .await
    .expect("MLLP connects")
}

/// Sends one framed message and reads the framed answer.
async fn exchange(conn: &mut Conn, message: &str) -> String {
    frame::write(conn, message.as_bytes()).await.unwrap();
    let reply = FrameReader::new(1 << 20)
        .next(conn)
        .await
        .expect("an answer")
        .expect("an ACK before the connection closed");
    String::from_utf8(reply).unwrap()
}

/// Whether the gateway closed the connection (EOF or reset) within 5 s.
async fn closed(conn: &mut Conn) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Sends release `id` of `patient` padded to about 8 KB (over a 4,096-byte
/// limit) and reads the answer.
async fn oversized(conn: &mut Conn, id: &str, patient: u32) -> String {
    let big = message(
        id,
        JourneyEvent::Release,
        &summary(patient, None, &"x".repeat(8000)),
    );
    frame::write(conn, big.as_bytes()).await.ok();
    let reply = FrameReader::new(1 << 20).next(conn).await.unwrap().unwrap();
    String::from_utf8(reply).unwrap()
}

/// Field `n` of the first `segment` of `ack` (HL7 numbering, MSH too).
fn field(ack: &str, segment: &str, n: usize) -> String {
    let seg = ack
        .split('\r')
        .find(|s| s.starts_with(segment))
        .unwrap_or_else(|| panic!("no {segment} in {ack:?}"));
    let i = if segment == "MSH" { n - 1 } else { n };
    seg.split('|').nth(i).unwrap_or_default().to_owned()
}

fn errs(ack: &str) -> Vec<Vec<String>> {
    ack.split('\r')
        .filter(|s| s.starts_with("ERR|"))
        .map(|s| s.split('|').map(str::to_owned).collect())
        .collect()
}

fn summary(patient: u32, gp: Option<&str>, marker: &str) -> ClinicalSummary {
    throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        gp.map(|g| g.parse().unwrap()),
        marker,
    )
}

fn admission(patient: u32) -> ClinicalSummary {
    let mut s = summary(patient, Some("YG001"), "admission");
    s.custody.release_date = None;
    s.custody.release_address = None;
    s
}

fn transfer(patient: u32) -> ClinicalSummary {
    let mut s = summary(patient, Some("YG001"), "transfer");
    s.custody.transfer_to = Some("YP002".parse().unwrap());
    s.custody.transfer_at = Some("2030-01-01T09:00:00Z".parse().unwrap());
    s.custody.release_date = None;
    s
}

fn community(patient: u32) -> ClinicalSummary {
    let mut s = summary(patient, Some("YG001"), "community");
    s.author.organisation = "YG001".parse().unwrap();
    s
}

/// `s` as an HL7 v2 message with control id `id`, sent by `PAS` at the
/// author's organisation to `THROUGHCARE` at `GATEWAY`.
fn message(id: &str, event: JourneyEvent, s: &ClinicalSummary) -> String {
    let text = String::from_utf8(hl7v2::render(s, event).bytes).unwrap();
    let (msh, rest) = text.split_once('\r').unwrap();
    let mut f: Vec<String> = msh.split('|').map(str::to_owned).collect();
    f[2] = "PAS".into();
    f[4] = "THROUGHCARE".into();
    f[5] = "GATEWAY".into();
    f[9] = id.into();
    format!("{}\r{rest}", f.join("|"))
}

/// A message with its segment `segment`'s field `n` replaced by `value`.
fn with_field(message: &str, segment: &str, n: usize, value: &str) -> String {
    message
        .split('\r')
        .map(|s| {
            if !s.starts_with(segment) {
                return s.to_owned();
            }
            let mut f: Vec<&str> = s.split('|').collect();
            let i = if segment == "MSH" { n - 1 } else { n };
            while f.len() <= i {
                f.push("");
            }
            f[i] = value;
            f.join("|")
        })
        .collect::<Vec<_>>()
        .join("\r")
}

fn metric(gw: &TestGateway, series: &str) -> f64 {
    let text = gw.metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the metrics"))
}

#[tokio::test]
async fn each_adt_event_is_answered_aa_once_durable() {
    let gw = gateway(|_| {}).await;
    // Every MLLP family is there, at zero, before the first connection.
    for series in [
        "throughcare_mllp_acks_total{ack=\"AA\"}",
        "throughcare_mllp_acks_total{ack=\"AE\"}",
        "throughcare_mllp_acks_total{ack=\"AR\"}",
        "throughcare_mllp_refusals_total{reason=\"connection_limit\"}",
        "throughcare_mllp_refusals_total{reason=\"idle_timeout\"}",
        "throughcare_mllp_connections",
    ] {
        assert_eq!(metric(&gw, series), 0.0, "{series}");
    }
    let mut prison = connect(&gw, "YP001").await;
    let mut gp = connect(&gw, "YG001").await;
    let cases = [
        ("adm-1", JourneyEvent::Admission, admission(1), "A01"),
        ("tra-1", JourneyEvent::Transfer, transfer(2), "A02"),
        (
            "rel-1",
            JourneyEvent::Release,
            summary(3, Some("YG001"), "r"),
            "A03",
        ),
        ("cs-1", JourneyEvent::CommunitySummary, community(1), "A08"),
    ];
    for (id, event, s, trigger) in cases {
        let conn = if event == JourneyEvent::CommunitySummary {
            &mut gp
        } else {
            &mut prison
        };
        let ack = exchange(conn, &message(id, event, &s)).await;
        assert_eq!(field(&ack, "MSA", 1), "AA", "{id}: {ack:?}");
        assert_eq!(field(&ack, "MSA", 2), id);
        assert!(errs(&ack).is_empty(), "{ack:?}");
        // Sender and receiver swapped; a new control id; the version echoed.
        assert_eq!(field(&ack, "MSH", 3), "THROUGHCARE");
        assert_eq!(field(&ack, "MSH", 4), "GATEWAY");
        assert_eq!(field(&ack, "MSH", 5), "PAS");
        assert_eq!(field(&ack, "MSH", 6), s.author.organisation.as_str());
        assert_eq!(field(&ack, "MSH", 9), format!("ACK^{trigger}^ACK"));
        assert!(!field(&ack, "MSH", 10).is_empty() && field(&ack, "MSH", 10) != id);
        assert_eq!(field(&ack, "MSH", 12), "2.5.1");
    }
    // Each is stored, with its application and control id as the message id, and routed.
    let mut yp001 = gw.client("YP001").await;
    for id in ["adm-1", "tra-1", "rel-1"] {
        let t = track_message(&mut yp001, &format!("PAS:{id}")).await;
        assert!(t.handover_id > 0 && !t.deliveries.is_empty(), "{id}");
    }
    let t = track_message(&mut gw.client("YG001").await, "PAS:cs-1").await;
    assert_eq!(t.deliveries[0].destination, "YP001");
    let got = pull_and_ack(&mut gw.client("YP002").await).await;
    assert_eq!(got.len(), 1, "the transfer reached the receiving prison");
    assert_eq!(metric(&gw, "throughcare_mllp_acks_total{ack=\"AA\"}"), 4.0);
    gw.stop().await;
}

#[tokio::test]
async fn a_repeated_control_id_is_answered_aa_and_stored_once() {
    let gw = gateway(|_| {}).await;
    let m = message("dup-1", JourneyEvent::Release, &summary(4, None, "x"));
    let mut conn = connect(&gw, "YP001").await;
    assert_eq!(field(&exchange(&mut conn, &m).await, "MSA", 1), "AA");
    let after_first = gw.store.content_digest().unwrap();
    // The same message again, on another connection (a sender that lost
    // the first ACK): AA again, nothing new stored.
    let mut again = connect(&gw, "YP001").await;
    let ack = exchange(&mut again, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "dup-1");
    assert_eq!(gw.store.content_digest().unwrap(), after_first);
    // The same control id for other content: AE, 205 at MSH-10, nothing stored.
    let other = message("dup-1", JourneyEvent::Release, &summary(5, None, "y"));
    let ack = exchange(&mut again, &other).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    let e = &errs(&ack)[0];
    assert_eq!(e[2], "MSH^1^10");
    assert!(e[3].starts_with("205^"), "{e:?}");
    assert_eq!(e[5], "ALREADY_EXISTS^^THROUGHCARE");
    assert_eq!(gw.store.content_digest().unwrap(), after_first);
    // MSH-10 is one string: ids that differ after a `^` are not one id cut
    // short, and are refused at MSH-10.
    for id in ["dup-1^2", "dup-1^", "dup-1~2"] {
        let split = with_field(&m, "MSH", 10, id);
        let ack = exchange(&mut again, &split).await;
        assert_eq!(field(&ack, "MSA", 1), "AE", "{id}: {ack:?}");
        assert_eq!(errs(&ack)[0][2], "MSH^1^10", "{id}: {ack:?}");
    }
    assert_eq!(gw.store.content_digest().unwrap(), after_first);
    // A control id is unique only within its sending application (MSH-3):
    // the prison's second engine numbering from the same start is another
    // message, accepted, and tracked by its application and control id.
    let pharmacy = with_field(&other, "MSH", 3, "PHARMACY^1.2.3^ISO");
    let ack = exchange(&mut again, &pharmacy).await;
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "dup-1");
    let mut grpc = gw.client("YP001").await;
    let first = track_message(&mut grpc, "PAS:dup-1").await;
    let second = track_message(&mut grpc, "PHARMACY%5E1.2.3%5EISO:dup-1").await;
    assert_ne!(first.handover_id, second.handover_id);
    // An ACK that echoes UTF-8 (the sending application's name) says so in
    // MSH-18; an ASCII one leaves it empty (ASCII).
    let named = with_field(&m, "MSH", 3, "ZOË-PAS");
    let ack = exchange(&mut again, &named).await;
    assert_eq!(field(&ack, "MSH", 5), "ZOË-PAS", "{ack:?}");
    assert_eq!(field(&ack, "MSH", 18), "UNICODE UTF-8", "{ack:?}");
    assert_eq!(field(&exchange(&mut again, &m).await, "MSH", 18), "");
    gw.stop().await;
}

/// A prison number has no check digit: a message naming one known with
/// another date of birth is refused, and the ERR names PID-7 (the date of
/// birth the store could not match), not PID-3, as gRPC names the field.
#[tokio::test]
async fn an_identity_conflict_names_the_field_that_conflicts() {
    let gw = gateway(|_| {}).await;
    let mut conn = connect(&gw, "YP001").await;
    let with_prison_number = |dob: &str| {
        let mut s = throughcare::clinical::synthetic::release_summary(
            None,
            Some("A1234BC".parse().unwrap()),
            "YP001".parse().unwrap(),
            Some("YG001".parse().unwrap()),
            "idc",
        );
        s.patient.date_of_birth = dob.parse().unwrap();
        s
    };
    let first = with_prison_number("1985-06-15");
    let ack = exchange(&mut conn, &message("idc-1", JourneyEvent::Release, &first)).await;
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    let before = gw.store.content_digest().unwrap();
    let other = with_prison_number("1991-02-03");
    let ack = exchange(&mut conn, &message("idc-2", JourneyEvent::Release, &other)).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    let e = errs(&ack);
    assert_eq!(e.len(), 1, "{ack:?}");
    assert_eq!(e[0][2], "PID^1^7", "{ack:?}");
    assert_eq!(gw.store.content_digest().unwrap(), before);
    gw.stop().await;
}

#[tokio::test]
async fn a_field_error_is_an_ae_naming_the_field_and_stores_nothing() {
    let gw = gateway(|_| {}).await;
    let before = gw.store.content_digest().unwrap();
    let mut conn = connect(&gw, "YP001").await;
    let good = message("bad-1", JourneyEvent::Release, &summary(6, None, "x"));
    let ack = exchange(&mut conn, &with_field(&good, "PID", 7, "")).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "bad-1");
    let e = &errs(&ack);
    assert_eq!(e.len(), 1, "{ack:?}");
    assert_eq!(e[0][2], "PID^1^7", "ERR-2 names the place");
    assert_eq!(e[0][3], "101^Required field missing^HL70357");
    assert_eq!(e[0][4], "E");
    assert!(e[0][8].contains("PID-7"), "ERR-8 says what: {:?}", e[0][8]);
    assert!(!ack.contains(&nhs(6)), "the ACK quotes patient data");
    // An unreadable date: a data type error at its place.
    let ack = exchange(&mut conn, &with_field(&good, "PID", 7, "1985XX15")).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    // No NHS or prison number in PID-3 (only a local MR): required, at PID-3.
    let ack = exchange(&mut conn, &with_field(&good, "PID", 3, "X99^^^LOCAL^MR")).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][2], "PID^1^3", "{ack:?}");
    assert_eq!(errs(&ack)[0][3], "101^Required field missing^HL70357");
    // Two different NHS numbers: which is the patient's cannot be told.
    let two = format!("{}^^^NHS^NH~{}^^^NHS^NH", nhs(6), nhs(7));
    let ack = exchange(&mut conn, &with_field(&good, "PID", 3, &two)).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert!(errs(&ack)[0][2].starts_with("PID^1^3"), "{ack:?}");
    // Message-level problems are rejected (AR) with their own codes.
    for (n, value, code) in [
        (9, "ORU^R01^ORU_R01", "200"),
        (9, "ADT^A40", "201"),
        (11, "T", "202"),
    ] {
        let ack = exchange(&mut conn, &with_field(&good, "MSH", n, value)).await;
        assert_eq!(field(&ack, "MSA", 1), "AR", "MSH-{n} {value}: {ack:?}");
        assert!(
            errs(&ack).iter().any(|e| e[3].starts_with(code)),
            "MSH-{n} {value}: {ack:?}"
        );
    }
    let ack = exchange(&mut conn, &with_field(&good, "MSH", 10, "")).await;
    assert_eq!(field(&ack, "MSA", 1), "AE");
    assert_eq!(errs(&ack)[0][2], "MSH^1^10");
    // A time in the future is named where the sender wrote it: EVN-2, or
    // MSH-7 when EVN-2 is empty (the summary's time was read from there).
    let future = "20991231120000+0000";
    let ack = exchange(&mut conn, &with_field(&good, "EVN", 2, future)).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][2], "EVN^1^2", "{ack:?}");
    let from_msh = with_field(&with_field(&good, "EVN", 2, ""), "MSH", 7, future);
    let ack = exchange(&mut conn, &from_msh).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][2], "MSH^1^7", "{ack:?}");
    assert_eq!(gw.store.content_digest().unwrap(), before, "nothing stored");
    // Each refusal is on the audit trail.
    let audited = gw.store.audit_entries().unwrap();
    assert!(
        audited
            .iter()
            .filter(|e| e.action == "submit" && e.outcome.starts_with("refused"))
            .count()
            >= 8
    );
    gw.stop().await;
}

#[tokio::test]
async fn malformed_and_oversized_frames_are_refused_and_audited() {
    let gw = gateway(|c| c.mllp.max_message_bytes = 4096).await;
    let mut conn = connect(&gw, "YP001").await;
    conn.write_all(b"MSH|^~\\&|no start block\r").await.unwrap();
    assert!(closed(&mut conn).await, "bytes outside a frame close it");
    // Over the limit: AE naming the control id, then closed, never buffered whole.
    let mut conn = connect(&gw, "YP001").await;
    let ack = oversized(&mut conn, "big-1", 7).await;
    // AE: resending the same message can never succeed (AR means resend).
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "big-1");
    assert_eq!(errs(&ack)[0][5], "MESSAGE_TOO_LARGE^^THROUGHCARE");
    assert!(closed(&mut conn).await);
    // A message just under the limit still goes through.
    let mut conn = connect(&gw, "YP001").await;
    let ok = message("small-1", JourneyEvent::Release, &summary(7, None, "x"));
    assert!(ok.len() < 4096);
    assert_eq!(field(&exchange(&mut conn, &ok).await, "MSA", 1), "AA");
    let reason = |r: &str| {
        metric(
            &gw,
            &format!("throughcare_mllp_refusals_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("malformed_frame"), 1.0);
    assert_eq!(reason("message_too_large"), 1.0);
    // Counted as the AE it was, not as AR.
    assert_eq!(metric(&gw, "throughcare_mllp_acks_total{ack=\"AE\"}"), 1.0);
    assert_eq!(metric(&gw, "throughcare_mllp_acks_total{ack=\"AR\"}"), 0.0);
    let audited = gw.store.audit_entries().unwrap();
    let frames: Vec<_> = audited
        .iter()
        .filter(|e| e.action == "connect" && e.outcome.starts_with("refused: MLLP"))
        .collect();
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert!(frames.iter().all(|e| e.actor == "urn:ods:YP001"));
    gw.stop().await;
}

#[tokio::test]
async fn identity_comes_from_the_client_certificate() {
    let gw = gateway(|_| {}).await;
    let before = gw.store.content_digest().unwrap();
    let m = message("who-1", JourneyEvent::Release, &summary(8, None, "x"));
    // A GP may not send a release.
    let ack = exchange(&mut connect(&gw, "YG001").await, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][5], "PERMISSION_DENIED^^THROUGHCARE");
    // A prison may not sign as another: the sending facility (MSH-4, the
    // author's organisation) and the establishment are YP002's.
    let mut theirs = summary(8, None, "x");
    crate::support::written_by(&mut theirs, "YP002");
    let spoofed = message("who-2", JourneyEvent::Release, &theirs);
    assert_eq!(field(&spoofed, "MSH", 4), "YP002", "{spoofed:?}");
    let ack = exchange(&mut connect(&gw, "YP001").await, &spoofed).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][5], "PERMISSION_DENIED^^THROUGHCARE");
    // A certificate of our CA for an organisation not in the registry.
    let stranger = gw.ca().issue_client_now("urn:ods:YX999").unwrap();
    let mut conn = connect_with(
        gw.mllp_addr.unwrap(),
        &gw.ca_pem(),
        stranger.cert_pem.as_bytes(),
        stranger.key_pem.as_bytes(),
    )
    .await
    .unwrap();
    let ack = exchange(&mut conn, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AE", "{ack:?}");
    assert_eq!(errs(&ack)[0][5], "UNREGISTERED_CALLER^^THROUGHCARE");
    // A certificate from another CA never gets a connection.
    let other = throughcare::certs::CertAuthority::generate("elsewhere").unwrap();
    let forged = other.issue_client_now("urn:ods:YP001").unwrap();
    let refused = async {
        let mut conn = connect_with(
            gw.mllp_addr.unwrap(),
            &gw.ca_pem(),
            forged.cert_pem.as_bytes(),
            forged.key_pem.as_bytes(),
        )
        .await?;
        frame::write(&mut conn, m.as_bytes()).await?;
        FrameReader::new(1 << 20)
            .next(&mut conn)
            .await
            .map_err(std::io::Error::other)
    };
    assert!(
        !matches!(refused.await, Ok(Some(_))),
        "a foreign certificate got an answer"
    );
    assert_eq!(gw.store.content_digest().unwrap(), before);
    gw.stop().await;
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let gw = gateway(|c| c.mllp.idle_timeout_ms = 1_000).await;
    let mut conn = connect(&gw, "YP001").await;
    let ok = message("idle-1", JourneyEvent::Release, &summary(9, None, "x"));
    assert_eq!(field(&exchange(&mut conn, &ok).await, "MSA", 1), "AA");
    // Half a frame, then silence: open for a while, closed once the idle
    // time is up.
    conn.write_all(&[frame::START]).await.unwrap();
    conn.write_all(&ok.as_bytes()[..20]).await.unwrap();
    let mut buf = [0u8; 8];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), conn.read(&mut buf))
            .await
            .is_err(),
        "closed before the idle time"
    );
    assert!(closed(&mut conn).await);
    assert_eq!(
        metric(
            &gw,
            "throughcare_mllp_refusals_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
    gw.stop().await;
}

/// A sender refused for a frame over the limit may connect again at once:
/// while the gateway reads the rest of the refused frame (so that its AE is
/// not lost to a reset), the sender's connection slot is already free.
#[tokio::test]
async fn a_sender_refused_for_size_may_reconnect_at_once() {
    let gw = gateway(|c| {
        c.mllp.max_message_bytes = 4096;
        c.mllp.max_connections_per_identity = 1;
    })
    .await;
    let mut conn = connect(&gw, "YP001").await;
    assert_eq!(
        field(&oversized(&mut conn, "big-3", 9).await, "MSA", 1),
        "AE"
    );
    // The first connection stays open (the gateway lingers on it); a
    // second one is admitted at once and served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = connect(&gw, "YP001").await;
    let ok = message("after-big", JourneyEvent::Release, &summary(9, None, "x"));
    assert_eq!(field(&exchange(&mut again, &ok).await, "MSA", 1), "AA");
    drop(conn);
    gw.stop().await;
}

#[tokio::test]
async fn connections_are_limited_per_identity_and_in_total() {
    let gw = gateway(|c| {
        c.mllp.max_connections = 2;
        c.mllp.max_connections_per_identity = 1;
    })
    .await;
    let mut first = connect(&gw, "YP001").await;
    let mut second = connect(&gw, "YP001").await;
    assert!(closed(&mut second).await, "a second connection for YP001");
    let _gp = connect(&gw, "YG001").await;
    // Let the gateway count the GP's connection before the third identity.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = connect(&gw, "YP002").await;
    assert!(closed(&mut third).await, "a third connection in total");
    // The connection within the limits still works.
    let ok = message("lim-1", JourneyEvent::Release, &summary(10, None, "x"));
    assert_eq!(field(&exchange(&mut first, &ok).await, "MSA", 1), "AA");
    let reason = |r: &str| {
        metric(
            &gw,
            &format!("throughcare_mllp_refusals_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("identity_connection_limit"), 1.0);
    assert_eq!(reason("connection_limit"), 1.0);
    let audited = gw.store.audit_entries().unwrap();
    assert_eq!(
        audited
            .iter()
            .filter(|e| e.action == "connect" && e.outcome.contains("open MLLP connections"))
            .count(),
        2
    );
    gw.stop().await;
}

#[tokio::test]
async fn an_unavailable_store_is_answered_ar_to_resend_later() {
    let gw = gateway(|_| {}).await;
    let mut conn = connect(&gw, "YP001").await;
    gw.store.close().await.unwrap();
    let m = message("down-1", JourneyEvent::Release, &summary(11, None, "x"));
    let ack = exchange(&mut conn, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AR", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "down-1");
    let e = &errs(&ack)[0];
    assert!(e[3].starts_with("207^"), "{e:?}");
    assert!(e[8].contains("resend"), "{e:?}");
}

/// No plaintext mode outside tests: the MLLP listener is mutual TLS, and a
/// configuration asking for plain TCP (even on loopback, where it was once
/// allowed behind a TLS terminator) is refused by name, exit 64, before any
/// port is bound.
#[test]
fn plaintext_mllp_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .env("THROUGHCARE_MLLP_ENABLED", "true")
        .env("THROUGHCARE_MLLP_LISTEN", "127.0.0.1:0")
        .env("THROUGHCARE_MLLP_PLAIN", "true")
        .env("THROUGHCARE_MLLP_PLAIN_SENDER_ODS", "YP001")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mllp.plain"), "{stderr}");
}

#[tokio::test]
async fn an_aa_is_never_lost_to_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mllp_port) = (free_port(), free_port());
    let start = || {
        Server(
            std::process::Command::new(BIN)
                .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
                .args(["--metrics-listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(dir.path().join("data"))
                .arg("--certs-dir")
                .arg(dir.path().join("certs"))
                .env("THROUGHCARE_MLLP_ENABLED", "true")
                .env("THROUGHCARE_MLLP_LISTEN", format!("127.0.0.1:{mllp_port}"))
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let certs = dir.path().join("certs");
    let connect_binary = || async {
        let paths = throughcare::certs::DevPaths { dir: certs.clone() };
        let (cert, key) = paths.client("YP001");
        for _ in 0..300 {
            if let Ok(c) = connect_with(
                format!("127.0.0.1:{mllp_port}").parse().unwrap(),
                &std::fs::read(paths.ca_cert()).unwrap_or_default(),
                &std::fs::read(&cert).unwrap_or_default(),
                &std::fs::read(&key).unwrap_or_default(),
            )
            .await
            {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the gateway's MLLP listener did not come up");
    };
    let mut server = start();
    let mut conn = connect_binary().await;
    let m = message("k9-1", JourneyEvent::Release, &summary(13, None, "x"));
    let ack = exchange(&mut conn, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AA");
    // Killed the moment the AA arrived.
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    drop(server);
    let _server = start();
    let mut conn = connect_binary().await;
    let endpoint = format!("https://127.0.0.1:{port}");
    let mut client = throughcare::cli::client::handover(&endpoint, &certs, "YP001")
        .await
        .unwrap();
    let kept = track_message(&mut client, "PAS:k9-1").await;
    assert!(kept.handover_id > 0, "the acknowledged handover survived");
    // The sender's resend is the same handover, answered AA again.
    assert_eq!(field(&exchange(&mut conn, &m).await, "MSA", 1), "AA");
    assert_eq!(
        track_message(&mut client, "PAS:k9-1").await.handover_id,
        kept.handover_id
    );
}

/// Refusals nobody audits (the gated listener has no audit to test).
struct Unaudited;

impl throughcare::tls::RefusalSink for Unaudited {
    fn record(
        &self,
        _refusal: throughcare::tls::Refusal,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async {})
    }
}

/// Holds every durability barrier while `held`, and fails it while `fail`.
#[derive(Default)]
struct Gate {
    held: std::sync::Mutex<bool>,
    moved: std::sync::Condvar,
    fail: std::sync::atomic::AtomicBool,
}

impl Gate {
    fn hold(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.moved.notify_all();
    }
}

impl throughcare::store::BarrierObserver for Gate {
    fn synced(&self, _barrier: u64) -> std::io::Result<()> {
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.moved.wait(held).unwrap();
        }
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("injected fdatasync failure"));
        }
        Ok(())
    }
}

/// The use cases over a store whose barrier `gate` controls, served by the
/// MLLP listener alone (plain, as YP001) on a free port.
async fn gated_listener(
    dir: &std::path::Path,
    gate: Arc<Gate>,
) -> (
    std::net::SocketAddr,
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    use throughcare::store::{Clock, Store, StoreOptions};
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let store = Store::open(
        &dir.join("data"),
        StoreOptions {
            observer: Some(gate),
            ..StoreOptions::default()
        },
        clock.clone(),
    )
    .unwrap();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let gateway = crate::support::gateway_over(store, clock, stopping.clone());
    let metrics = Arc::new(throughcare::operator::metrics::Metrics::new(
        dir.join("none.pem"),
        dir.join("none.pem"),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = throughcare::mllp::spawn(
        listener,
        throughcare::mllp::Transport::Plain("YP001".parse().unwrap()),
        (gateway, metrics, Arc::new(Unaudited)),
        throughcare::mllp::Settings {
            max_message_bytes: 1 << 20,
            idle_timeout: Duration::from_secs(30),
            max_connections: 4,
            max_connections_per_identity: 4,
        },
        stopping,
    );
    (addr, stop, task)
}

#[tokio::test]
async fn an_aa_is_written_only_after_the_durability_barrier() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (addr, stop, task) = gated_listener(dir.path(), gate.clone()).await;
    let mut conn: Conn = Box::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    // The barrier is held: the message is in the store's hands, not durable,
    // and no answer comes.
    gate.hold(true);
    let m = message("gate-1", JourneyEvent::Release, &summary(14, None, "x"));
    frame::write(&mut conn, m.as_bytes()).await.unwrap();
    let mut reader = FrameReader::new(1 << 20);
    let early = tokio::time::timeout(Duration::from_millis(700), reader.next(&mut conn)).await;
    assert!(early.is_err(), "an answer before the barrier: {early:?}");
    // The barrier completes: now the AA.
    gate.hold(false);
    let ack = String::from_utf8(reader.next(&mut conn).await.unwrap().unwrap()).unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "gate-1");
    // A barrier that fails is never an AA: AR, resend later.
    gate.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let m = message("gate-2", JourneyEvent::Release, &summary(15, None, "x"));
    let ack = exchange(&mut conn, &m).await;
    assert_eq!(field(&ack, "MSA", 1), "AR", "{ack:?}");
    assert!(errs(&ack)[0][3].starts_with("207^"), "{ack:?}");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the listener drains on shutdown")
        .unwrap();
}

#[tokio::test]
async fn a_shutdown_answers_the_message_in_hand_first() {
    let dir = tempfile::tempdir().unwrap();
    let gate = Arc::new(Gate::default());
    let (addr, stop, task) = gated_listener(dir.path(), gate.clone()).await;
    let mut conn: Conn = Box::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let mut reader = FrameReader::new(1 << 20);
    // Shutdown with a message in the store's hands: its answer still comes
    // (after its barrier), then the listener ends and closes the connection.
    gate.hold(true);
    let m = message("gate-3", JourneyEvent::Release, &summary(16, None, "x"));
    frame::write(&mut conn, m.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !task.is_finished(),
        "the listener ended with a message in hand"
    );
    gate.hold(false);
    let ack = String::from_utf8(reader.next(&mut conn).await.unwrap().unwrap()).unwrap();
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    assert_eq!(field(&ack, "MSA", 2), "gate-3");
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the listener drains on shutdown")
        .unwrap();
    assert!(closed(&mut conn).await);
}

/// MLLP is not HTTP/2: a sender whose TLS client names its own application
/// protocol (ALPN) is served, not refused for not offering gRPC's `h2`.
#[tokio::test]
async fn a_sender_naming_its_own_application_protocol_is_served() {
    let gw = gateway(|_| {}).await;
    let (cert, key) = gw.paths().client("YP001");
    let mut config = (*client_config(&gw.ca_pem(), &read(&cert), &read(&key))).clone();
    config.alpn_protocols = vec![b"mllp".to_vec()];
    let tcp = tokio::net::TcpStream::connect(gw.mllp_addr.unwrap())
        .await
        .unwrap();
    let mut conn: Conn = Box::new(
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(
                rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .expect("the handshake completes without h2"),
    );
    let ack = exchange(
        &mut conn,
        &message("alpn-1", JourneyEvent::Admission, &admission(41)),
    )
    .await;
    assert_eq!(field(&ack, "MSA", 1), "AA", "{ack:?}");
    gw.stop().await;
}
