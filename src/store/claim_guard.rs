//! What the claim guard (`handover::claim_guard`) reads back from the store at
//! start: the recent failed claims, from the audit trail. The failures are
//! written as ordinary audit entries (durable before the caller is answered),
//! so the counters survive a restart without a tree or a writer job of their
//! own, and a deploy cannot reset them.

use super::records::{self, TreeId};
use super::{SledStore, StoreError};
use crate::audit::AuditEntry;

impl SledStore {
    /// Audit entries with `action` written at or after `since_ms`, newest
    /// first. Reads the trail backwards and stops at the first older entry,
    /// so the cost follows the window, not the trail's length.
    ///
    /// # Errors
    /// Store failures or an undecodable entry.
    pub fn audit_since(&self, action: &str, since_ms: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let tree = &self.inner.trees[TreeId::Audit as usize];
        let mut out = Vec::new();
        let (Some((first, _)), Some((last, _))) = (tree.first()?, tree.last()?) else {
            return Ok(out);
        };
        let first = records::from_be(&first).unwrap_or(0);
        let mut end = records::from_be(&last).unwrap_or(0).saturating_add(1);
        let field = format!("\"action\":{}", serde_json::Value::from(action));
        // Backwards a run at a time, each run read forwards: sled walks a
        // range forwards leaf to leaf, but each step backwards from the root.
        while end > first {
            let start = end.saturating_sub(RUN).max(first);
            let run = tree
                .range(records::be(start)..records::be(end))
                .values()
                .collect::<Result<Vec<_>, _>>()?;
            for value in run.iter().rev() {
                // Most entries are not the action sought: read only when and
                // whether it may be (nothing allocated) before decoding one
                // whole.
                let (at_ms, maybe) = stamp(value, &field, action)?;
                if at_ms < since_ms {
                    return Ok(out);
                }
                if maybe {
                    let entry: AuditEntry = serde_json::from_slice(value)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    if entry.action == action {
                        out.push(entry);
                    }
                }
            }
            end = start;
        }
        Ok(out)
    }
}

/// When an audit entry was written, and whether it may be `action`'s
/// (`field` is `"action":` and `action` as JSON).
///
/// An audit trail is mostly other actions, and at start the claim guard
/// reads a day of it (215–234 ms with 100,000 submits in the day, about a
/// third of it decoding each entry; the rest is sled reading them). So an
/// entry laid out as the writer lays it out
/// (`{"seq":N,"at_ms":M,` first, compact) is read from its bytes: its time
/// from that prefix, and whether it names the action by a search for
/// `field`. A false "may be" (another field holding the same text) is
/// settled by the caller's full decode; an entry in any other layout is
/// decoded as before.
fn stamp(value: &[u8], field: &str, action: &str) -> Result<(i64, bool), StoreError> {
    if let Some(at_ms) = laid_out_time(value) {
        return Ok((
            at_ms,
            memchr::memmem::find(value, field.as_bytes()).is_some(),
        ));
    }
    let stamp: Stamp<'_> =
        serde_json::from_slice(value).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok((stamp.at_ms, stamp.action == action))
}

/// `M` of an entry that starts `{"seq":N,"at_ms":M,` (digits only, `M`
/// with an optional minus sign), or `None`.
fn laid_out_time(value: &[u8]) -> Option<i64> {
    let rest = value.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let rest = rest[digits..]
        .strip_prefix(b",\"at_ms\":")
        .filter(|_| digits > 0)?;
    let (negative, rest) = match rest.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, rest),
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b',') {
        return None;
    }
    let magnitude: i64 = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

/// Audit entries read forwards at a time.
const RUN: u64 = 1_024;

/// When an audit entry was written and its action.
#[derive(serde::Deserialize)]
struct Stamp<'a> {
    at_ms: i64,
    #[serde(borrow)]
    action: std::borrow::Cow<'a, str>,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::audit::AuditEvent;
    use crate::store::{ManualClock, Store, StoreOptions};

    /// An entry laid out as the writer lays it out is timed from its
    /// bytes; any other layout is decoded, with the same answer.
    #[test]
    fn an_entry_is_timed_from_its_bytes_or_else_decoded() {
        use super::{laid_out_time, stamp};
        assert_eq!(
            laid_out_time(br#"{"seq":7,"at_ms":1234,"actor":"x"}"#),
            Some(1234)
        );
        assert_eq!(
            laid_out_time(br#"{"seq":7,"at_ms":-5,"actor":"x"}"#),
            Some(-5)
        );
        for other in [
            &br#"{"seq": 7, "at_ms": 1234, "actor": "x"}"#[..],
            br#"{"at_ms":1234,"seq":7,"actor":"x"}"#,
            br#"{"seq":7,"at_ms":1234}"#,
            br#"{"seq":,"at_ms":1234,"actor":"x"}"#,
            br#"{"seq":7,"at_ms":99999999999999999999,"actor":"x"}"#,
        ] {
            assert_eq!(
                laid_out_time(other),
                None,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        let field = r#""action":"claim_failure""#;
        let sought = |v: &[u8]| stamp(v, field, "claim_failure").unwrap();
        assert_eq!(
            sought(br#"{"seq": 7, "at_ms": 12, "action": "claim_failure"}"#),
            (12, true)
        );
        assert_eq!(
            sought(br#"{"seq": 7, "at_ms": 12, "action": "connect"}"#),
            (12, false)
        );
        // The action's text inside another field is escaped, so not found.
        assert_eq!(
            sought(
                br#"{"seq":7,"at_ms":12,"actor":"a","action":"connect","outcome":"\"action\":\"claim_failure\""}"#
            ),
            (12, false)
        );
        assert_eq!(
            sought(br#"{"seq":7,"at_ms":12,"actor":"a","action":"claim_failure","outcome":"x"}"#),
            (12, true)
        );
    }

    /// Across runs of the backwards read: every entry of the action in the
    /// window, newest first, and nothing from before the first older entry.
    #[tokio::test]
    async fn the_window_is_read_back_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000);
        let store = Store::open(
            &dir.path().join("data"),
            StoreOptions::default(),
            Arc::new(clock.clone()),
        )
        .unwrap();
        for i in 0..2_600u32 {
            clock.advance(1);
            let action = if i % 7 == 0 {
                "claim_failure"
            } else {
                "connect"
            };
            store
                .record(AuditEvent {
                    actor: format!("urn:ods:P{i}"),
                    action,
                    outcome: "ok".into(),
                    ..AuditEvent::default()
                })
                .await
                .unwrap();
        }
        // Entries at 1,001 ..= 3,600; the window starts at 1,101.
        let found = store.audit_since("claim_failure", 1_101).unwrap();
        let actors: Vec<u32> = found
            .iter()
            .map(|e| e.actor.trim_start_matches("urn:ods:P").parse().unwrap())
            .collect();
        let expected: Vec<u32> = (100..2_600).rev().filter(|i| i % 7 == 0).collect();
        assert_eq!(actors, expected);
        assert!(
            store
                .audit_since("claim_failure", 9_999)
                .unwrap()
                .is_empty()
        );
        store.close().await.unwrap();
    }
}
