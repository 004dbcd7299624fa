//! The audit chain verifies after a workload, and `throughcare admin audit
//! verify` finds every way of tampering with a copy of the store: one flipped
//! byte, the newest entries deleted, an old entry rewritten with every later
//! hash recomputed (keyed with a guessed key, or downgraded to the plain
//! hashes of the chain before the key), and a consistent rollback of both the
//! store and its witness once a checkpoint was recorded elsewhere.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use support::*;
use throughcare::audit::{AuditChain, AuditEntry, AuditEvent, AuditKey};
use throughcare::grpc::pb;

const BIN: &str = env!("CARGO_BIN_EXE_throughcare");

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn run(args: &[&str], data: &Path, witness: &Path, extra: &[&Path]) -> (bool, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--data-dir")
        .arg(data)
        .arg("--witness-dir")
        .arg(witness)
        .env("RUST_LOG", "error");
    for file in extra {
        cmd.arg("--checkpoint").arg(file);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn verify(data: &Path, witness: &Path) -> (bool, String) {
    run(&["admin", "audit", "verify"], data, witness, &[])
}

fn witness_of(data: &Path) -> PathBuf {
    data.with_file_name("data.witness")
}

/// Submits, pulls, acks and provokes refusals; returns the entries written.
async fn workload(gw: &TestGateway, first: u32) -> usize {
    let mut prison = gw.client("YP001").await;
    for i in first..first + 10 {
        prison
            .submit(release(&format!("t-{i}"), i, &["YG001", "YPR01"], "tamper"))
            .await
            .unwrap();
    }
    let mut riverside = gw.client("YG001").await;
    for d in riverside
        .pull(pull(5))
        .await
        .unwrap()
        .into_inner()
        .deliveries
    {
        riverside
            .ack(pb::AckRequest {
                delivery_id: d.delivery_id,
                attempt: d.attempt,
            })
            .await
            .unwrap();
    }
    // Refusals are in the chain too.
    let _ = prison
        .submit(release(&format!("t-{first}"), 99, &["YG001"], "other"))
        .await;
    let _ = riverside
        .ack(pb::AckRequest {
            delivery_id: 999,
            attempt: 1,
        })
        .await;
    gw.store.audit_entries().unwrap().len()
}

/// Rewrites the audit tree of the store copy at `data` with `edit`.
fn edit_audit(data: &Path, edit: impl FnOnce(&sled::Tree, Vec<AuditEntry>)) {
    let db = crate::support::open_sled(&data.join("sled"));
    let audit = db.open_tree("audit").unwrap();
    let entries = audit
        .iter()
        .values()
        .map(|v| serde_json::from_slice(&v.unwrap()).unwrap())
        .collect();
    edit(&audit, entries);
    db.flush().unwrap();
}

fn put(tree: &sled::Tree, e: &AuditEntry) {
    tree.insert(e.seq.to_be_bytes(), serde_json::to_vec(e).unwrap())
        .unwrap();
}

/// Entry `from` says "refused" now, and every later one is relinked by
/// `relink` (as a forger without the audit key would).
fn rewrite_from(
    data: &Path,
    from: u64,
    relink: impl Fn(&AuditEntry, AuditEntry) -> AuditEntry,
) -> String {
    let mut what = String::new();
    edit_audit(data, |tree, entries| {
        let mut prev = entries[from as usize - 2].clone();
        for mut e in entries.into_iter().skip(from as usize - 1) {
            if e.seq == from {
                what = format!("{} {}", e.action, e.outcome);
                e.outcome = "refused: nothing happened here".into();
            }
            let e = relink(&prev, e);
            put(tree, &e);
            prev = e;
        }
    });
    what
}

#[tokio::test]
async fn a_flipped_byte_in_one_audit_entry_is_found() {
    let gw = TestGateway::start().await;
    let entries = workload(&gw, 0).await;
    assert!(entries >= 17, "{entries}");
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let witness = witness_of(&data);

    let (ok, text) = verify(&data, &witness);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!(
            "audit chain verifies: {entries} entries (keyed from entry 1;"
        )),
        "{text}"
    );

    // A copy with one byte of entry 7 flipped ("ok" becomes "oK").
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    edit_audit(&copy, |tree, entries| {
        let mut value = serde_json::to_vec(&entries[6]).unwrap();
        let at = value.windows(9).position(|w| w == b"\"outcome\"").unwrap() + 11;
        assert_eq!(value[at], b'o', "{}", String::from_utf8_lossy(&value));
        value[at] ^= 0x20;
        tree.insert(7u64.to_be_bytes(), value).unwrap();
    });
    let (ok, text) = verify(&copy, &witness);
    assert!(!ok, "tampering must fail verification: {text}");
    assert!(
        text.contains("does NOT verify") && text.contains("broken at entry 7"),
        "{text}"
    );
    // The original still verifies.
    assert!(verify(&data, &witness).0);
}

#[tokio::test]
async fn deleting_the_newest_entries_is_found_and_counted() {
    let gw = TestGateway::start().await;
    let entries = workload(&gw, 0).await as u64;
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let witness = witness_of(&data);
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    edit_audit(&copy, |tree, _| {
        for seq in entries - 2..=entries {
            tree.remove(seq.to_be_bytes()).unwrap();
        }
    });
    let (ok, text) = verify(&copy, &witness);
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "promises {entries} entries but the store holds {}",
            entries - 3
        )) && text.contains("(3 entries missing)"),
        "{text}"
    );
    // The gateway will not serve it either.
    let out = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(&copy)
        .arg("--witness-dir")
        .arg(&witness)
        .arg("--certs-dir")
        .arg(dir.path().join("certs"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{stderr}");
    assert!(stderr.contains("3 missing"), "{stderr}");
}

#[tokio::test]
async fn rewriting_an_old_entry_and_recomputing_every_later_hash_is_found() {
    let gw = TestGateway::start().await;
    workload(&gw, 0).await;
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let witness = witness_of(&data);

    // As before the key: recompute plain SHA-256 hashes from entry 5 on.
    let downgraded = dir.path().join("downgraded");
    copy_dir(&data, &downgraded);
    let what = rewrite_from(&downgraded, 5, |prev, mut e| {
        e.chain = None;
        e.prev_hash.clone_from(&prev.hash);
        e.hash = e.compute_hash();
        e
    });
    assert!(what.contains("ok"), "{what}");
    let (ok, text) = verify(&downgraded, &witness);
    assert!(!ok, "{text}");
    assert!(
        text.contains("broken at entry 5: unkeyed entry after the chain was keyed"),
        "{text}"
    );

    // Keyed, with a key the forger guessed.
    let guessed = dir.path().join("guessed");
    copy_dir(&data, &guessed);
    let key = Arc::new(AuditKey::from_secret(&[7u8; 32]));
    rewrite_from(&guessed, 5, |prev, e| {
        let mut chain = AuditChain::resume(Some(prev), Some(key.clone()));
        chain.link(
            AuditEvent {
                actor: e.actor,
                action: Box::leak(e.action.into_boxed_str()),
                handover_id: e.handover_id,
                delivery_id: e.delivery_id,
                patient_key: e.patient_key,
                outcome: e.outcome,
            },
            e.at_ms,
        )
    });
    let (ok, text) = verify(&guessed, &witness);
    assert!(!ok, "{text}");
    assert!(
        text.contains("broken at entry 5: content does not match its hash"),
        "{text}"
    );

    // The whole trail rewritten as a plain chain: the anchor's key boundary finds it.
    let all = dir.path().join("all");
    copy_dir(&data, &all);
    edit_audit(&all, |tree, entries| {
        let mut prev = throughcare::audit::GENESIS.to_owned();
        for mut e in entries {
            e.chain = None;
            e.prev_hash = prev;
            e.hash = e.compute_hash();
            put(tree, &e);
            prev = e.hash;
        }
    });
    let (ok, text) = verify(&all, &witness);
    assert!(!ok, "{text}");
    assert!(
        text.contains("broken at entry 1: unkeyed entry at or after the key boundary"),
        "{text}"
    );
}

/// Restoring the store *and* its witness from the same old backup is
/// consistent, so only a checkpoint recorded elsewhere can reveal it; the
/// anchor metric tells the recorder how far the chain is anchored.
#[tokio::test]
async fn a_checkpoint_recorded_elsewhere_finds_a_rollback_of_store_and_witness() {
    let gw = TestGateway::start().await;
    workload(&gw, 0).await;
    let data = gw.config.data_dir.clone();
    let witness = witness_of(&data);
    let (dir, config) = gw.stop().await;
    let backup = dir.path().join("backup");
    copy_dir(&data, &backup.join("data"));
    copy_dir(&witness, &backup.join("data.witness"));

    let gw = TestGateway::start_in(dir, config, Arc::new(throughcare::store::SystemClock)).await;
    let entries = workload(&gw, 20).await as u64;
    let scraped = reqwest_metrics(gw.metrics_addr).await;
    let anchored: u64 = scraped
        .lines()
        .find_map(|l| l.strip_prefix("throughcare_audit_anchored_seq "))
        .unwrap_or_else(|| panic!("{scraped}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        anchored > 17 && anchored <= entries,
        "{anchored} of {entries}"
    );
    let (dir, _) = gw.stop().await;

    let (ok, anchor) = run(&["admin", "audit", "anchor"], &data, &witness, &[]);
    assert!(ok, "{anchor}");
    let signed: serde_json::Value = serde_json::from_str(anchor.trim()).unwrap();
    assert!(signed["audit_seq"].as_u64().unwrap() >= entries, "{anchor}");
    assert!(
        signed["signature"].as_str().unwrap().len() == 128,
        "{anchor}"
    );
    let recorded = dir.path().join("recorded-checkpoint.json");
    std::fs::write(&recorded, &anchor).unwrap();

    // Both restored from the backup: the witness agrees with the store ...
    std::fs::remove_dir_all(&data).unwrap();
    std::fs::remove_dir_all(&witness).unwrap();
    copy_dir(&backup.join("data"), &data);
    copy_dir(&backup.join("data.witness"), &witness);
    assert!(verify(&data, &witness).0);
    // ... but not with the checkpoint recorded elsewhere.
    let (ok, text) = run(&["admin", "audit", "verify"], &data, &witness, &[&recorded]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("entries missing") && text.contains("recorded-checkpoint.json"),
        "{text}"
    );

    // A forged checkpoint (another key) is refused, not trusted.
    let mut forged = signed.clone();
    forged["audit_seq"] = serde_json::json!(entries + 100);
    std::fs::write(&recorded, forged.to_string()).unwrap();
    let (ok, text) = run(&["admin", "audit", "verify"], &data, &witness, &[&recorded]);
    assert!(
        !ok && text.contains("not signed by the audit key"),
        "{text}"
    );
}

async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// `throughcare serve` on a copy: its exit code and stderr (it must refuse
/// before it binds or writes the witness; one still serving after 30 s is
/// stopped and reported as `None`).
fn serve(data: &Path, witness: &Path, certs: &Path) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(data)
        .arg("--witness-dir")
        .arg(witness)
        .arg("--certs-dir")
        .arg(certs)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let code = match child.try_wait().unwrap() {
        Some(status) => status.code(),
        None => {
            child.kill().unwrap();
            child.wait().unwrap();
            None
        }
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (code, stderr)
}

/// Rewrites the `meta` tree of the store copy at `data` with `edit`.
fn edit_meta(data: &Path, edit: impl FnOnce(&sled::Tree)) {
    let db = crate::support::open_sled(&data.join("sled"));
    edit(&db.open_tree("meta").unwrap());
    db.flush().unwrap();
}

/// Removes audit entries `seqs` from the store copy at `data`.
fn remove_entries(data: &Path, seqs: impl IntoIterator<Item = u64>) {
    edit_audit(data, |tree, _| {
        for seq in seqs {
            assert!(tree.remove(seq.to_be_bytes()).unwrap().is_some(), "{seq}");
        }
    });
}

/// Entries past the audit period go behind a signed cut and the rest
/// verifies "from entry N"; removing entries that are not past the period
/// (the oldest kept, the middle, the newest), removing or moving the cut, or
/// rewriting a kept entry is still found, and the gateway will not start on
/// a trail whose oldest kept entries are gone.
#[tokio::test]
async fn after_a_retention_cut_the_rest_verifies_and_removing_more_is_found() {
    const DAY_MS: i64 = 86_400_000;
    let (gw, clock) =
        TestGateway::start_manual(|c| c.retention.audit_seconds = Some(90 * 86_400)).await;
    workload(&gw, 0).await;
    clock.advance(91 * DAY_MS);
    workload(&gw, 20).await;
    let pass = gw.store.retention().await.unwrap();
    assert!(pass.audit_removed > 10, "{pass:?}");
    let v = gw.store.verify_audit_from().unwrap();
    let first = v.from;
    assert_eq!(first, pass.audit_removed as u64 + 1);
    let kept = gw.store.audit_entries().unwrap();
    assert_eq!(kept[0].seq, first);
    let before = T0 + DAY_MS;
    assert!(
        kept.iter().all(|e| e.at_ms >= before),
        "only old entries go"
    );
    assert!(
        kept.iter().any(|e| e.action == "audit_prune"
            && e.outcome.contains(&format!("entries 1 to {}", first - 1)))
    );
    assert_eq!(pass.stats.audit_entries_removed, first - 1);
    assert_eq!(pass.stats.audit_entries_held, kept.len() as u64);
    let last = kept.last().unwrap().seq;
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let witness = witness_of(&data);
    let certs = dir.path().join("certs");
    let (ok, text) = verify(&data, &witness);
    assert!(
        ok && text.contains(&format!(
            "from entry {first} (entries before {first} removed under the retention policy on"
        )),
        "{text}"
    );

    let tampered = |name: &str, edit: &dyn Fn(&Path)| -> (PathBuf, String) {
        let copy = dir.path().join(name);
        copy_dir(&data, &copy);
        edit(&copy);
        let (ok, text) = verify(&copy, &witness);
        assert!(!ok, "{name}: {text}");
        (copy, text)
    };
    // The oldest kept entries, not past the period.
    let (copy, text) = tampered("head", &|c| remove_entries(c, first..first + 3));
    assert!(
        text.contains("after the signed retention cut are missing"),
        "{text}"
    );
    let (code, stderr) = serve(&copy, &witness, &certs);
    assert_eq!(code, Some(65), "{stderr}");
    assert!(stderr.contains("signed retention cut"), "{stderr}");
    // The middle, and the newest.
    let (_, text) = tampered("middle", &|c| remove_entries(c, first + 5..first + 7));
    assert!(text.contains("out of order"), "{text}");
    let (_, text) = tampered("tail", &|c| remove_entries(c, last - 1..=last));
    assert!(text.contains("(2 entries missing)"), "{text}");
    // The cut removed: the missing head is tampering again.
    let (copy, text) = tampered("no-cut", &|c| {
        edit_meta(c, |meta| {
            meta.remove("audit_cut").unwrap().unwrap();
        });
    });
    assert!(text.contains("no signed cut"), "{text}");
    assert_eq!(serve(&copy, &witness, &certs).0, Some(65));
    // The cut moved on (to hide more) without the audit key.
    let (_, text) = tampered("moved-cut", &|c: &Path| {
        edit_meta(c, |meta| {
            let mut cut: serde_json::Value =
                serde_json::from_slice(&meta.get("audit_cut").unwrap().unwrap()).unwrap();
            cut["first_kept"] = (first + 3).into();
            cut["prev_hash"] = kept[2].hash.clone().into();
            meta.insert("audit_cut", serde_json::to_vec(&cut).unwrap())
                .unwrap();
        });
        remove_entries(c, first..first + 3);
    });
    assert!(text.contains("not signed by the audit key"), "{text}");
    // A kept entry rewritten.
    let (_, text) = tampered("rewritten", &|c| {
        edit_audit(c, |tree, entries| {
            let mut e = entries[4].clone();
            e.outcome = "refused: nothing happened here".into();
            put(tree, &e);
        });
    });
    assert!(text.contains("does not match its hash"), "{text}");
    // The untouched store still verifies and serves.
    assert!(verify(&data, &witness).0);
}

/// Without a retention cut, the oldest entries removed (as someone hiding
/// old accesses would) are found by `verify` and refused at start-up.
#[tokio::test]
async fn deleting_the_oldest_entries_without_a_cut_is_found_at_start_up() {
    let gw = TestGateway::start().await;
    workload(&gw, 0).await;
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;
    let witness = witness_of(&data);
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    remove_entries(&copy, 1..=3);
    let (ok, text) = verify(&copy, &witness);
    assert!(!ok && text.contains("no signed cut"), "{text}");
    let (code, stderr) = serve(&copy, &witness, &dir.path().join("certs"));
    assert_eq!(code, Some(65), "{stderr}");
    assert!(stderr.contains("oldest audit entry held is 4"), "{stderr}");
}
