//! The operator's dashboard in a real browser: a scripted workload through
//! the real server over mutual TLS, then headless Chromium loads `GET /` from
//! the loopback metrics listener; the rendered DOM is checked and a
//! screenshot kept in `target/artefacts/dashboard.png`.
//!
//! Chromium is Debian's `chromium`, installed by `tests/run` when it runs as
//! root with apt-get; without it this test prints SKIPPED and passes, unless
//! the browser was required (`THROUGHCARE_REQUIRE_CHROMIUM`, which `tests/run`
//! sets where it can install it, or `CI`): then a missing browser fails it.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::*;
use throughcare::clinical::ClinicalSummary;
use throughcare::grpc::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The manual clock's start, `T0`, is 2027-01-15 08:00:00 UTC (GMT).
const HOUR: i64 = 3_600_000;

fn summary(patient: u32, gp: Option<&str>, release: &str, marker: &str) -> ClinicalSummary {
    let mut s = throughcare::clinical::synthetic::release_summary(
        nhs(patient).parse().ok(),
        None,
        "YP001".parse().unwrap(),
        gp.map(|g| g.parse().unwrap()),
        marker,
    );
    s.custody.release_date = Some(release.parse().unwrap());
    s
}

fn submit(id: &str, event: pb::JourneyEvent, s: &ClinicalSummary) -> pb::SubmitRequest {
    pb::SubmitRequest {
        message_id: id.into(),
        event: event.into(),
        patient: None,
        destinations: Vec::new(),
        document: Some(pb::submit_request::Document::Native(
            throughcare::grpc::summary::to_wire(s),
        )),
    }
}

/// The browser, or why there is none.
async fn chromium() -> Result<PathBuf, String> {
    let out = tokio::process::Command::new("chromium")
        .arg("--version")
        .output()
        .await
        .map_err(|e| format!("chromium is not installed ({e}); tests/run installs it as root"))?;
    if !out.status.success() {
        return Err(format!("`chromium --version` failed: {}", out.status));
    }
    Ok(PathBuf::from("chromium"))
}

/// Runs headless Chromium with a fresh profile on `url` plus `args`, within a
/// minute; returns its standard output.
async fn run_chromium(browser: &Path, profile: &Path, args: &[String], url: &str) -> String {
    let mut cmd = tokio::process::Command::new(browser);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(url)
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("chromium finishes within a minute")
        .expect("chromium starts");
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("the DOM is UTF-8")
}

/// The text of the `<tr>` whose opening tag contains `attr`.
fn row<'a>(dom: &'a str, attr: &str) -> &'a str {
    let at = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no row {attr} in {dom}"));
    let start = dom[..at].rfind("<tr").expect("in a row");
    let len = dom[start..].find("</tr>").expect("a closed row");
    &dom[start..start + len]
}

/// The section with id `id`.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("<section id=\"{id}\""))
        .unwrap_or_else(|| panic!("no section {id}"));
    let len = dom[start..].find("</section>").expect("a closed section");
    &dom[start..start + len]
}

/// The text and classes of the `<td>` in `row` whose class list has `name`.
fn cell(row: &str, name: &str) -> (String, Vec<String>) {
    let mut rest = row;
    while let Some(at) = rest.find("<td class=\"") {
        rest = &rest[at + 11..];
        let classes: Vec<String> = rest[..rest.find('"').unwrap()]
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if classes.iter().any(|c| c == name) {
            let body = &rest[rest.find('>').unwrap() + 1..rest.find("</td>").unwrap()];
            // Strip inner tags (<time>, <span>).
            let mut text = String::new();
            let mut in_tag = false;
            for c in body.chars() {
                match c {
                    '<' => in_tag = true,
                    '>' => in_tag = false,
                    c if !in_tag => text.push(c),
                    _ => {}
                }
            }
            return (text, classes);
        }
    }
    panic!("no cell {name} in {row}")
}

fn text(row: &str, name: &str) -> String {
    cell(row, name).0
}

fn has_class(row: &str, name: &str, class: &str) -> bool {
    cell(row, name).1.iter().any(|c| c == class)
}

/// Status line and head of a plain-HTTP GET.
async fn head_of(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    raw.split_once("\r\n\r\n")
        .expect("an HTTP response")
        .0
        .to_owned()
}

const MINUTE: i64 = 60_000;

/// The queue-depth chart's points, as the page draws them (an empty list
/// before there are two samples in the window, "no data yet" before one).
fn depth_points(page: &str) -> Option<Vec<String>> {
    let figure = page.split("id=\"trend-depth\"").nth(1)?;
    let figure = &figure[..figure.find("</figure>")?];
    if figure.contains("no data yet") {
        return None;
    }
    Some(match figure.split("points=\"").nth(1) {
        Some(points) => points[..points.find('"')?]
            .split(' ')
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    })
}

async fn wait_for_depth_points(addr: std::net::SocketAddr, want: usize) {
    let mut last = None;
    for _ in 0..200 {
        let page = body_of(addr, "/").await;
        last = depth_points(&page);
        let seen = last.as_ref().map(|p| p.len().max(1));
        if seen == Some(want) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the trend chart never showed {want} points: {last:?}");
}

async fn body_of(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let raw = String::from_utf8(raw).unwrap();
    raw.split_once("\r\n\r\n")
        .expect("an HTTP response")
        .1
        .to_owned()
}

#[tokio::test]
async fn chromium_renders_the_dashboard_after_a_workload() {
    let browser = match chromium().await {
        Ok(b) => b,
        Err(why)
            if std::env::var_os("CI").is_none()
                && std::env::var_os("THROUGHCARE_REQUIRE_CHROMIUM").is_none() =>
        {
            println!("SKIPPED: {why}");
            return;
        }
        Err(why) => panic!("the browser test is required here: {why}"),
    };
    let (gw, clock) = TestGateway::start_manual(|_| {}).await;
    let parked = submit_workload(&gw).await;
    let quarantined = quarantine_with_careless_reasons(&gw).await;
    // A day and an hour later the admission notice is overdue; the releases
    // are not (yet). The last two minutes a minute at a time, each waited
    // out until the sweeper has sampled it: three points on the trend charts.
    clock.advance(25 * HOUR - 2 * MINUTE);
    for points in 1..=3 {
        if points > 1 {
            clock.advance(MINUTE);
        }
        wait_for_depth_points(gw.metrics_addr, points).await;
    }

    let url = format!("http://{}/", gw.metrics_addr);
    let head = head_of(gw.metrics_addr, "/").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );

    let profile = tempfile::tempdir().unwrap();
    let dom = run_chromium(
        &browser,
        &profile.path().join("dump"),
        &["--dump-dom".to_owned()],
        &url,
    )
    .await;

    assert!(
        dom.contains("<title>Throughcare · 2027-01-16 09:00 GMT</title>"),
        "the gateway's own clock: {dom}"
    );
    mailboxes_are_highlighted(&dom);
    quarantine_and_parked_are_listed(&dom, quarantined, parked);
    totals_and_trends_are_drawn(&dom);
    no_patient_data_on_the_page(&dom, &gw);
    screenshot(&browser, profile.path(), &url).await;
    gw.stop().await;
}

/// Three releases to YG001 and two to YG002 (each also to the prison's
/// probation region, YPR01), a release with no known GP (parked), and an
/// admission notice to YG002. Returns the parked delivery's id.
async fn submit_workload(gw: &TestGateway) -> u64 {
    let mut prison = gw.client("YP001").await;
    let release = pb::JourneyEvent::Release;
    for (i, gp) in [
        (1, "YG001"),
        (2, "YG001"),
        (3, "YG001"),
        (4, "YG002"),
        (5, "YG002"),
    ] {
        prison
            .submit(submit(
                &format!("rel-{i}"),
                release,
                &summary(i, Some(gp), "2027-02-01", &format!("follow-up marker {i}")),
            ))
            .await
            .unwrap();
    }
    // A release with no known GP is parked until the end of its release day.
    let parked = prison
        .submit(submit(
            "rel-no-gp",
            release,
            &summary(6, None, "2027-01-20", "follow-up marker 6"),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(parked.deliveries[0].destination, "@parked");
    // An admission notice to the registered GP, YG002, due in 24 hours.
    let mut admitted = summary(7, Some("YG002"), "2027-02-01", "follow-up marker 7");
    admitted.custody.release_date = None;
    admitted.custody.release_address = None;
    prison
        .submit(submit("adm-7", pb::JourneyEvent::Admission, &admitted))
        .await
        .unwrap();
    parked.deliveries[0].delivery_id
}

/// YG001 rejects its oldest delivery for good, after careless reasons are
/// refused. Returns the quarantined delivery's id.
async fn quarantine_with_careless_reasons(gw: &TestGateway) -> u64 {
    // YG001 rejects its oldest delivery for good. A reason with (carelessly)
    // an NHS number, or a date of birth, is refused and says why; one with
    // markup, a name and a drug cannot be recognised and is taken, but the
    // page never shows a recipient's words.
    let mut yg001 = gw.client("YG001").await;
    let pulled = yg001.pull(pull(1)).await.unwrap().into_inner().deliveries;
    assert_eq!(pulled.len(), 1);
    let nack = |reason: String| pb::NackRequest {
        delivery_id: pulled[0].delivery_id,
        attempt: pulled[0].attempt,
        permanent: true,
        reason,
    };
    for (careless, what) in [
        (
            format!("rejected: not our patient {}", nhs(1)),
            "a long number",
        ),
        (
            "rejected: Alex Example born 15/06/1985".to_owned(),
            "a date of birth",
        ),
        (
            "rejected: DOB 15 June 1985 does not match".to_owned(),
            "a date of birth",
        ),
    ] {
        let err = yg001.nack(nack(careless)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert_eq!(violations(&err), ["reason"]);
        assert!(err.message().contains(what), "{err:?}");
        assert!(!err.message().contains(&nhs(1)) && !err.message().contains("1985"));
    }
    yg001
        .nack(nack(
            "practice system rejected it: template XJ-42 <unknown> for Alex Example, Paracetamol"
                .into(),
        ))
        .await
        .unwrap();
    pulled[0].delivery_id
}

/// Mailboxes: depth, overdue and quarantined, with highlights.
fn mailboxes_are_highlighted(dom: &str) {
    let mailboxes = section(dom, "mailboxes");
    assert!(mailboxes.contains("<h2>Mailboxes<span class=\"count\">4</span></h2>"));
    let yg001 = row(mailboxes, "data-mailbox=\"YG001\"");
    assert_eq!(text(yg001, "depth"), "2");
    assert_eq!(text(yg001, "quarantined"), "1");
    assert!(has_class(yg001, "quarantined", "warn"));
    assert_eq!(text(yg001, "overdue"), "0");
    assert!(!has_class(yg001, "overdue", "alert"));
    let yg002 = row(mailboxes, "data-mailbox=\"YG002\"");
    assert_eq!(text(yg002, "depth"), "3");
    assert_eq!(text(yg002, "overdue"), "1");
    assert!(has_class(yg002, "overdue", "alert"));
    assert_eq!(text(yg002, "quarantined"), "0");
    assert_eq!(text(yg002, "oldest"), "25h");
    assert!(yg001.starts_with("<tr class=\"warn\""), "{yg001}");
    assert!(yg002.starts_with("<tr class=\"alert\""), "{yg002}");
    let probation = row(mailboxes, "data-mailbox=\"YPR01\"");
    assert!(probation.starts_with("<tr data-mailbox"), "{probation}");
    assert_eq!(text(probation, "depth"), "6");
    let holding = row(mailboxes, "data-mailbox=\"@parked\"");
    assert_eq!(text(holding, "depth"), "1");
}

/// The quarantine with the gateway's words only, and the parked release with its deadline.
fn quarantine_and_parked_are_listed(dom: &str, quarantined: u64, parked: u64) {
    // The quarantine with the gateway's words only: the recipient's free text
    // (a name, a drug, markup) is not on the page.
    let quarantine = section(dom, "quarantine");
    assert!(quarantine.contains("<h2>Quarantine<span class=\"count\">1</span></h2>"));
    let q = row(quarantine, &format!("data-delivery=\"{}\"", quarantined));
    assert_eq!(text(q, "mailbox"), "YG001");
    assert_eq!(text(q, "sender"), "YP001");
    assert_eq!(text(q, "event"), "RELEASE");
    assert_eq!(text(q, "attempts"), "1");
    assert_eq!(
        text(q, "reason"),
        "permanent nack: (the recipient's words: not shown here)"
    );
    assert_eq!(text(q, "when"), "2027-01-15 08:00 GMT (25h ago)");
    // The parked release with its deadline.
    let parked_section = section(dom, "parked");
    assert!(parked_section.contains("<h2>Parked releases<span class=\"count\">1</span></h2>"));
    let p = row(parked_section, &format!("data-delivery=\"{}\"", parked));
    assert_eq!(text(p, "sender"), "YP001");
    assert_eq!(text(p, "event"), "RELEASE");
    assert_eq!(text(p, "queued"), "2027-01-15 08:00 GMT (25h ago)");
    assert_eq!(text(p, "due"), "2027-01-20 23:59 GMT (in 4d)");
    assert_eq!(text(p, "overdue"), "no");
}

/// The totals' tiles and the four trend charts.
fn totals_and_trends_are_drawn(dom: &str) {
    // Totals.
    let tile = |id: &str| {
        let at = dom.find(&format!("id=\"{id}\"")).expect("a tile");
        let start = dom[..at].rfind("<li").unwrap();
        &dom[start..start + dom[start..].find("</li>").unwrap()]
    };
    assert!(tile("total-overdue").contains("class=\"alert\""));
    assert!(tile("total-overdue").ends_with("<b>1</b>overdue"));
    assert!(tile("total-quarantined").ends_with("<b>1</b>quarantined"));
    assert!(tile("total-waiting").ends_with("<b>11</b>waiting or on lease"));
    // Trends: four server-drawn charts; the depth chart's three samples, one
    // a minute at the right edge of the six-hour window, all at the top (11
    // is the highest).
    let trends = section(dom, "trends");
    assert_eq!(trends.matches("<svg").count(), 4, "{trends}");
    for id in [
        "trend-depth",
        "trend-submits",
        "trend-delivered",
        "trend-oldest",
    ] {
        assert!(trends.contains(&format!("id=\"{id}\"")), "{id}");
    }
    assert_eq!(
        depth_points(trends).unwrap(),
        ["318.2,0.0", "319.1,0.0", "320.0,0.0"],
        "{trends}"
    );
    assert!(trends.contains("11 deliveries"), "{trends}");
}

/// No patient data: identifiers, names, dates of birth, document text or
/// patient keys.
fn no_patient_data_on_the_page(dom: &str, gw: &TestGateway) {
    let mut forbidden: Vec<String> = (1..=7).map(nhs).collect();
    forbidden.extend(
        [
            "Alex",
            "Example (invented)",
            "1985-06-15",
            "Invented Street",
            "ZZ1 1ZZ",
            "Paracetamol",
            "follow-up marker",
        ]
        .map(str::to_owned),
    );
    let handovers: Vec<_> = (0..=20)
        .filter_map(|id| gw.store.handover(id).unwrap())
        .collect();
    assert_eq!(handovers.len(), 7, "every submit's handover");
    for h in handovers {
        forbidden.push(h.patient_key);
        forbidden.push(h.message_id);
    }
    for f in &forbidden {
        assert!(!dom.contains(f.as_str()), "{f:?} is on the page");
    }
}

/// The screenshot, kept as an artefact of the run: a 1280x900 PNG with more
/// than a blank page's bytes.
async fn screenshot(browser: &Path, profile: &Path, url: &str) {
    let artefacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let png = artefacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    run_chromium(
        browser,
        &profile.join("shot"),
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1280,900".to_owned(),
        ],
        url,
    )
    .await;
    let bytes = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 900));
    // A blank 1280x900 PNG compresses to a few kilobytes; tables and text do not.
    assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
    println!("screenshot: {}", png.display());
}

/// The dashboard answers only when `Host` is an address or `localhost`: a
/// hostile web page whose DNS name was rebound to 127.0.0.1 makes the
/// visitor's browser send its own name, and is refused, so it cannot read
/// mailboxes and quarantine reasons through the browser. `/metrics` stays
/// open to scrapers by any name.
#[tokio::test]
async fn the_dashboard_refuses_a_host_name_that_is_not_this_machines() {
    let gw = TestGateway::start().await;
    let port = gw.metrics_addr.port();
    let status = |host: String, path: &'static str| {
        let addr = gw.metrics_addr;
        async move {
            let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request =
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.unwrap();
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.unwrap();
            String::from_utf8_lossy(&raw)
                .split(' ')
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        }
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "127.0.0.1".to_owned(),
    ] {
        assert_eq!(status(host.clone(), "/").await, "200", "{host}");
    }
    for host in [
        format!("rebind.example.com:{port}"),
        "rebind.example.com".to_owned(),
        "localhost.example.com".to_owned(),
        "[::1".to_owned(),
    ] {
        assert_eq!(status(host.clone(), "/").await, "403", "{host}");
        assert_eq!(status(host.clone(), "/dashboard").await, "403", "{host}");
    }
    assert_eq!(
        status("prometheus.internal:9464".into(), "/metrics").await,
        "200"
    );
    gw.stop().await;
}
