//! A backup restore against the real binary: the whole data directory put
//! back from an older copy refuses to start (exit 65) naming the gap; so does
//! a deleted or rolled-back witness; `admin store accept-rollback` lists the
//! acknowledged handovers the store lost (ids, sender, message id), re-bases
//! the witness, audits itself, and the gateway then starts.

use crate::support::{BIN, Server, free_port};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

fn serve_command(dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--certs-dir")
        .arg(dir.join("certs"));
    cmd
}

fn serve(dir: &Path, port: u16) -> Server {
    Server(
        serve_command(dir, port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Starts the gateway expecting a refusal; returns its stderr. A gateway
/// that starts serving instead is stopped and the test fails.
fn refused(dir: &Path) -> String {
    let mut child = serve_command(dir, free_port())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the gateway started instead of refusing: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    stderr
}

fn submit(dir: &Path, port: u16, message_id: &str) -> Output {
    let mut last = None;
    for _ in 0..100 {
        let out = Command::new(BIN)
            .args(["submit", "--as", "YP001", "--server"])
            .arg(format!("https://localhost:{port}"))
            .arg("--certs-dir")
            .arg(dir.join("certs"))
            .args(["--message-id", message_id, "--event", "release"])
            .args([
                "--to",
                "YG001",
                "--nhs",
                "9990000018",
                "--text",
                "synthetic",
            ])
            .output()
            .unwrap();
        if out.status.success() {
            return out;
        }
        last = Some(out);
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("submit never succeeded: {last:?}");
}

fn stop(mut server: Server) {
    let pid = server.0.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "graceful stop: {status:?}");
}

fn admin(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .arg("admin")
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env("USER", "restore-test")
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn replace_dir(dir: &Path, with: &Path) {
    std::fs::remove_dir_all(dir).unwrap();
    copy_dir(with, dir);
}

/// The handover id a submit's output names.
fn handover_id(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace().nth(1).unwrap().to_owned()
}

fn witness(dir: &Path) -> PathBuf {
    dir.join("data.witness")
}

#[test]
fn a_restored_backup_is_refused_until_an_operator_accepts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = serve(dir.path(), port);
    submit(dir.path(), port, "before-backup");
    stop(server);
    let backup = dir.path().join("backup");
    copy_dir(&dir.path().join("data"), &backup);

    let server = serve(dir.path(), port);
    let lost: Vec<String> = ["after-1", "after-2"]
        .iter()
        .map(|m| handover_id(&submit(dir.path(), port, m)))
        .collect();
    stop(server);

    // An ordinary restore: the whole data directory (keys included) from the backup.
    replace_dir(&dir.path().join("data"), &backup);
    let stderr = refused(dir.path());
    assert!(
        stderr.contains("lost acknowledged data")
            && stderr.contains("batches missing")
            && stderr.contains("2 acknowledged handovers")
            && stderr.contains("accept-rollback"),
        "{stderr}"
    );
    assert!(!stderr.contains("9990000018"), "{stderr}");

    // The decision needs a reason, and the reason no patient identifier.
    let (ok, text) = admin(dir.path(), &["store", "accept-rollback", "--reason", " "]);
    assert!(!ok && text.contains("--reason"), "{text}");
    let (ok, text) = admin(
        dir.path(),
        &["store", "accept-rollback", "--reason", "patient 9990000018"],
    );
    assert!(
        !ok && text.contains("must not contain patient data"),
        "{text}"
    );
    assert!(refused(dir.path()).contains("lost acknowledged data"));

    let (ok, text) = admin(
        dir.path(),
        &[
            "store",
            "accept-rollback",
            "--reason",
            "restored from the nightly backup after a disk failure, ticket 4711",
        ],
    );
    assert!(ok, "{text}");
    assert!(
        text.contains("2 acknowledged handovers") && text.contains("ask each sender"),
        "{text}"
    );
    for (id, message) in lost.iter().zip(["after-1", "after-2"]) {
        let line = text
            .lines()
            .find(|l| l.contains(message))
            .unwrap_or_else(|| panic!("{message} not listed: {text}"));
        assert!(line.contains(id) && line.contains("YP001"), "{line}");
    }
    assert!(!text.contains("before-backup"), "{text}");
    assert!(!text.contains("9990000018"), "{text}");

    // Ids go on from a new range: the lost handovers' ids (which their
    // senders hold as receipts, and their deliveries' ids, which a
    // recipient may have pulled) are not handed out again.
    assert!(
        text.contains("new handover and delivery ids start at 1099511627777"),
        "{text}"
    );
    // Now it starts, and the senders can resend.
    let server = serve(dir.path(), port);
    let resent = handover_id(&submit(dir.path(), port, "after-1"));
    // The ids skipped are no payloads: the store holds the backup's one
    // and the resent one.
    let out = Command::new(BIN)
        .args(["admin", "retention", "--json", "--server"])
        .arg(format!("https://localhost:{port}"))
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let held = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["what"] == "payloads held")
        .unwrap_or_else(|| panic!("{rows}"));
    assert_eq!(held["count"], 2, "{rows}");
    stop(server);
    assert!(!lost.contains(&resent), "{resent} handed out twice");
    assert_eq!(resent, "1099511627777");
    let (ok, list) = admin(dir.path(), &["audit", "list"]);
    assert!(ok, "{list}");
    let entry = list
        .lines()
        .find(|l| l.contains("\"accept_rollback\""))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(
        entry.contains("local:restore-test")
            && entry.contains("ticket 4711")
            && entry.contains("2 acknowledged handovers missing"),
        "{entry}"
    );
    let (ok, text) = admin(dir.path(), &["audit", "verify"]);
    assert!(ok, "{text}");
}

#[test]
fn a_deleted_or_rolled_back_witness_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = serve(dir.path(), port);
    submit(dir.path(), port, "one");
    stop(server);
    let old_witness = dir.path().join("old-witness");
    copy_dir(&witness(dir.path()), &old_witness);
    // One more batch only: after a clean close the witness must match exactly.
    let server = serve(dir.path(), port);
    submit(dir.path(), port, "more");
    stop(server);
    let current = dir.path().join("current-witness");
    copy_dir(&witness(dir.path()), &current);

    // Deleted (the audit key beside it stays: it is backed up apart).
    std::fs::remove_file(witness(dir.path()).join("witness")).unwrap();
    let stderr = refused(dir.path());
    assert!(
        stderr.contains("missing") && stderr.contains("accept-rollback"),
        "{stderr}"
    );
    // Rolled back to an older copy.
    replace_dir(&witness(dir.path()), &old_witness);
    let stderr = refused(dir.path());
    assert!(stderr.contains("rolled back"), "{stderr}");
    // Its head forged by hand (a higher promise) without the key.
    replace_dir(&witness(dir.path()), &current);
    let file = witness(dir.path()).join("witness");
    let mut bytes = std::fs::read(&file).unwrap();
    for slot in [0, 512] {
        bytes[slot + 15] = bytes[slot + 15].wrapping_add(1);
        let crc = crc32fast::hash(&bytes[slot..slot + 168]);
        bytes[slot + 168..slot + 172].copy_from_slice(&crc.to_be_bytes());
    }
    std::fs::write(&file, &bytes).unwrap();
    let stderr = refused(dir.path());
    assert!(
        stderr.contains("not signed by this store's audit key"),
        "{stderr}"
    );

    // The operator decides: nothing the store lacks, so nothing to list.
    std::fs::remove_file(witness(dir.path()).join("witness")).unwrap();
    let (ok, text) = admin(
        dir.path(),
        &[
            "store",
            "accept-rollback",
            "--reason",
            "witness volume replaced",
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("0 acknowledged handovers"), "{text}");
    let server = serve(dir.path(), port);
    submit(dir.path(), port, "after");
    stop(server);
}

/// A store from before the witness and the audit key: plain-hash (v1) audit
/// entries, data, no witness. Refused until an operator decides; then its
/// chain continues keyed from the decision's own entry, and the boundary is
/// anchored.
#[tokio::test]
async fn a_store_from_before_the_key_is_upgraded_by_an_explicit_decision() {
    use std::sync::Arc;
    use throughcare::audit::{AuditChain, AuditEvent};
    use throughcare::store::{Store, StoreError, StoreOptions, SystemClock};

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let db = crate::support::open_sled(&data.join("sled"));
        let audit = db.open_tree("audit").unwrap();
        let mut chain = AuditChain::resume(None, None);
        for i in 0..3 {
            let e = chain.link(
                AuditEvent {
                    actor: "urn:ods:YP001".into(),
                    action: "connect",
                    outcome: "ok".into(),
                    ..AuditEvent::default()
                },
                i,
            );
            assert_eq!(e.chain, None);
            audit
                .insert(e.seq.to_be_bytes(), serde_json::to_vec(&e).unwrap())
                .unwrap();
        }
        db.open_tree("meta")
            .unwrap()
            .insert("commit_seq", &3u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let open = || Store::open(&data, StoreOptions::default(), Arc::new(SystemClock));
    match open() {
        Err(e @ StoreError::Witness(_)) => assert!(e.to_string().contains("missing"), "{e}"),
        other => panic!("an old store must be refused: {:?}", other.err()),
    }
    let rollback = Store::accept_rollback(
        &data,
        StoreOptions::default(),
        Arc::new(SystemClock),
        "local:upgrade",
        "upgrade to the keyed audit chain",
    )
    .await
    .unwrap();
    assert!(rollback.witness.is_none() && rollback.missing.is_empty());
    let store = open().unwrap();
    let entries = store.audit_entries().unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(entries[3].action, "accept_rollback");
    assert_eq!(entries[3].chain, Some(throughcare::audit::KEYED));
    store.close().await.unwrap();
    drop(store);
    let verified =
        throughcare::store::integrity::verify_audit(&data, &StoreOptions::default(), &[]).unwrap();
    assert_eq!((verified.entries, verified.keyed_from), (4, Some(4)));
}

#[test]
fn a_witness_or_audit_key_inside_the_data_directory_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for (flag, value, field) in [
        (
            "--witness-dir",
            data.join("witness"),
            "integrity.witness_dir",
        ),
        (
            "--witness-dir",
            dir.path().to_path_buf(),
            "integrity.witness_dir",
        ),
    ] {
        let out = serve_command(dir.path(), free_port())
            .arg(flag)
            .arg(&value)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{stderr}");
        assert!(stderr.contains(field), "{stderr}");
    }
    let config = dir.path().join("throughcare.toml");
    std::fs::write(
        &config,
        format!(
            "[integrity]\naudit_key_file = \"{}\"\n",
            data.join("audit-key").display()
        ),
    )
    .unwrap();
    let out = serve_command(dir.path(), free_port())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("integrity.audit_key_file"), "{stderr}");
    assert!(!data.exists(), "nothing was created");
}
