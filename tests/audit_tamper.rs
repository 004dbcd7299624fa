//! The audit chain verifies after a workload, and flipping one byte of one
//! entry in a copy of the store is found by `throughcare admin audit verify`.

mod support;

use std::path::Path;
use std::process::Command;

use support::*;
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

fn verify(data: &Path) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["admin", "audit", "verify", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn a_flipped_byte_in_one_audit_entry_is_found() {
    let gw = TestGateway::start().await;
    let mut prison = gw.client("YP001").await;
    for i in 0..10 {
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
    let _ = prison.submit(release("t-0", 99, &["YG001"], "other")).await;
    let _ = riverside
        .ack(pb::AckRequest {
            delivery_id: 999,
            attempt: 1,
        })
        .await;
    let entries = gw.store.audit_entries().unwrap().len();
    assert!(entries >= 17, "{entries}");
    let data = gw.config.data_dir.clone();
    let (dir, _) = gw.stop().await;

    let (ok, text) = verify(&data);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("audit chain verifies: {entries} entries")),
        "{text}"
    );

    // A copy with one byte of entry 7 flipped ("ok" becomes "oK").
    let copy = dir.path().join("copy");
    copy_dir(&data, &copy);
    {
        let db = sled::open(copy.join("sled")).unwrap();
        let audit = db.open_tree("audit").unwrap();
        let key = 7u64.to_be_bytes();
        let mut value = audit.get(key).unwrap().unwrap().to_vec();
        let at = value.windows(9).position(|w| w == b"\"outcome\"").unwrap() + 11;
        assert_eq!(value[at], b'o', "{}", String::from_utf8_lossy(&value));
        value[at] ^= 0x20;
        audit.insert(key, value).unwrap();
        db.flush().unwrap();
    }
    let (ok, text) = verify(&copy);
    assert!(!ok, "tampering must fail verification: {text}");
    assert!(
        text.contains("does NOT verify") && text.contains("broken at entry 7"),
        "{text}"
    );
    // The original still verifies.
    assert!(verify(&data).0);
}
