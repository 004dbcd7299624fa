//! `throughcare demo` runs in the suite, so it cannot rot: the real binary
//! plays the whole journey and each step's outcome is checked in its output.

use std::process::Command;

#[test]
fn the_demo_plays_a_whole_journey_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_throughcare"))
        .arg("demo")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = [
        // 1. the admission notice reaches the registered GP, without clinical detail
        "-> YG001 (due",
        "Riverside receives an admission notice",
        "medicines 0 (a notice carries no clinical detail)",
        // 2. the community summary goes back to the admitting prison, urgent
        "-> YP001 URGENT",
        "first Methadone",
        // 3. the transfer reaches the receiving prison, medicines first
        "-> YP002 URGENT",
        "medicines first: Methadone 1mg/ml oral solution 60 mg",
        "last dose given",
        // 4. the release with no GP is parked; probation has its own delivery
        "-> @parked URGENT",
        "-> YPR01 (due",
        // 5. a practice claims it and receives HL7 v2
        "claimed 1 release(s)",
        "MSH|^~\\&|THROUGHCARE|YP002",
        "ADT^A03",
        "PID|1||9990000018^^^NHS^NH",
        // 6. probation sees only its view: no medicines, no risks without consent
        "medicines 0, risk flags 0",
        // 7. track
        "to YG002  Delivered (claimed by urn:ods:YG002)",
        "to YPR01  Delivered",
        // 8. an admission over MLLP: AA once durable, and AA again for the resend
        "ACK once the admission is durable: MSA|AA|demo-mllp-1",
        "resent after a lost ACK: MSA|AA|demo-mllp-1",
        "The gateway drained and stopped",
    ];
    let mut from = 0;
    for e in expected {
        let at = text[from..]
            .find(e)
            .unwrap_or_else(|| panic!("missing, or out of order: {e:?}\n{text}"));
        from += at + e.len();
    }
}
