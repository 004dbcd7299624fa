//! The README's "Try it by hand" as a newcomer runs it, through the real
//! binary: any invented patient can be submitted, a pulled summary reads
//! under its headings, errors end with a newline and name the next step,
//! empty tables say so, the demo's story carries no log lines, and the
//! binary names its commit and ships completions and a manual page.

use crate::support::{BIN, Server, free_port};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn serve(dir: &Path, port: u16) -> Server {
    let server = Server(
        Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return server;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the gateway did not start");
}

/// Runs `throughcare <verb> --as <who> --server … --certs-dir … <args>`.
fn client(dir: &Path, port: u16, verb: &str, who: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args([verb, "--as", who, "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--certs-dir")
        .arg(dir.join("certs"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn any_invented_patient_goes_through_and_reads_under_its_headings() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = serve(dir.path(), port);
    let out = client(
        dir.path(),
        port,
        "submit",
        "YP001",
        &[
            "--message-id",
            "r2",
            "--event",
            "release",
            "--to",
            "YG001",
            "--nhs",
            "9434765919",
            "--dob",
            "1980-01-02",
            "--text",
            "note",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("-> YG001"),
        "{}",
        text(&out.stdout)
    );

    let out = client(dir.path(), port, "pull", "YG001", &["--show", "--ack"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    for heading in ["\nPatient\n", "\nCustody\n", "\nMedicines\n", "\nConsent\n"] {
        assert!(shown.contains(heading), "{heading:?} in {shown}");
    }
    assert!(shown.contains("NHS number 9434765919"), "{shown}");
    assert!(shown.contains("born 1980-01-02"), "{shown}");
    assert!(shown.find("\nMedicines").unwrap() < shown.find("\nConsent").unwrap());

    // The raw document, on request, in the format asked for: HL7 one segment a line.
    client(
        dir.path(),
        port,
        "submit",
        "YP001",
        &[
            "--message-id",
            "r3",
            "--event",
            "release",
            "--to",
            "YG001",
            "--prison-number",
            "A1234BC",
        ],
    );
    let out = client(
        dir.path(),
        port,
        "pull",
        "YG001",
        &["--raw", "--format", "hl7v2"],
    );
    let raw = text(&out.stdout);
    assert!(raw.lines().any(|l| l.starts_with("MSH|")), "{raw}");
    assert!(raw.lines().any(|l| l.starts_with("PID|")), "{raw}");
    assert!(!raw.contains('\r'));
}

#[test]
fn errors_end_with_a_newline_and_name_the_next_step() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _server = serve(dir.path(), port);
    let out = client(
        dir.path(),
        port,
        "submit",
        "YP001",
        &["--message-id", "x", "--event", "release", "--to", "YG001"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.ends_with('\n'), "{err:?}");
    assert!(
        err.contains("--nhs") && err.contains("--prison-number"),
        "{err}"
    );

    let out = client(
        dir.path(),
        port,
        "track",
        "YP001",
        &["--message-id", "never-sent"],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.ends_with('\n'), "{err:?}");
    assert!(err.contains("never-sent"), "names the message id: {err}");
    assert!(
        err.contains("next:") && err.contains("only what it sent"),
        "{err}"
    );

    let out = Command::new(BIN)
        .args(["admin", "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .arg("parked")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "no parked releases\n");
}

#[test]
fn the_demo_tells_its_story_without_log_lines() {
    let out = Command::new(BIN).arg("demo").output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let story = text(&out.stdout);
    assert!(story.contains("Throughcare demo"), "{story}");
    for level in [" INFO ", " WARN ", " DEBUG ", "\u{1b}["] {
        assert!(
            !story.contains(level),
            "log line {level:?} in the story:\n{story}"
        );
    }
    assert!(
        !text(&out.stderr).contains(" INFO "),
        "the gateway is quiet unless --verbose"
    );
}

#[test]
fn the_binary_names_its_commit_and_ships_completions_and_a_manual() {
    let version = text(&Command::new(BIN).arg("--version").output().unwrap().stdout);
    assert!(version.starts_with("throughcare 0."), "{version}");
    assert!(version.contains('('), "names the commit: {version}");
    let bash = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(bash.status.success());
    assert!(text(&bash.stdout).contains("throughcare"));
    let man = Command::new(BIN).arg("man").output().unwrap();
    assert!(man.status.success());
    assert!(text(&man.stdout).contains(".TH throughcare"));
}
