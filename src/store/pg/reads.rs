//! Reads on PostgreSQL: records, operator pages, payloads, the audit trail
//! and its verification. Each reads committed state (no lock taken).
//! Synchronous ones block the calling thread on the engine's runtime, as a
//! sled read blocks on its disk.

use sha2::{Digest, Sha256};
use tokio_postgres::types::Json;

use super::PgStore;
use super::sql::{self, LIVE, db, id};
use crate::audit::{AuditEntry, hex};
use crate::journey::JourneyEvent;
use crate::store::records::{self, IdentityConflict, PatientRecord};
use crate::store::{
    CopyFacts, DeliveryRecord, HandoverRecord, MailboxStats, ReleaseFacts, StoreError,
};

/// Handovers read per page by the continuity scan.
const SCAN_PAGE: i64 = 200;

impl PgStore {
    /// One delivery's record.
    ///
    /// # Errors
    /// Database failures.
    pub fn delivery(&self, delivery_id: u64) -> Result<Option<DeliveryRecord>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let row = client
                .query_opt(
                    "SELECT record FROM deliveries WHERE id = $1",
                    &[&id(delivery_id)],
                )
                .await
                .map_err(db)?;
            Ok(row.map(|r| r.get::<_, Json<DeliveryRecord>>(0).0))
        })
    }

    /// Whether a submit from `sender` under `message_id` was accepted and
    /// is still held.
    ///
    /// # Errors
    /// Database failures.
    pub fn accepted_before(&self, sender: &str, message_id: &str) -> Result<bool, StoreError> {
        let (sender, message_id) = (sender.to_owned(), message_id.to_owned());
        self.block(move |s| async move {
            let client = s.client().await?;
            let row = client
                .query_opt(
                    "SELECT 1 FROM handovers WHERE sender = $1 AND message_id = $2",
                    &[&sender, &message_id],
                )
                .await
                .map_err(db)?;
            Ok(row.is_some())
        })
    }

    /// One handover's record.
    ///
    /// # Errors
    /// Database failures.
    pub fn handover(&self, handover_id: u64) -> Result<Option<HandoverRecord>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            sql::handover(&**client, handover_id).await
        })
    }

    /// Commits a transaction that writes a row and removes it (nothing
    /// committed stays): it returns once a connection was free and the
    /// commit is as durable as a submit's (with a synchronous standby, on both
    /// machines). What a health check waits on to tell a stuck database
    /// (a standby gone, a full disk, every connection hung) from a busy one.
    ///
    /// # Errors
    /// Database failures.
    pub async fn probe(&self) -> Result<(), StoreError> {
        self.run(move |s| async move {
            let now = s.now();
            let mut client = s.client().await?;
            let tx = client.transaction().await.map_err(db)?;
            // A row written and removed: the commit has WAL to wait for. A
            // transaction id alone (`txid_current()`) commits without
            // waiting for the standby, so a lost standby went unnoticed
            // whenever a connection was free (`V4__probe.sql`).
            tx.execute("INSERT INTO store_probe (at_ms) VALUES ($1)", &[&now])
                .await
                .map_err(db)?;
            tx.execute("DELETE FROM store_probe", &[])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)
        })
        .await
    }

    /// Every mailbox with live or quarantined deliveries, at a glance.
    ///
    /// # Errors
    /// Database failures.
    pub async fn mailbox_stats(&self) -> Result<Vec<MailboxStats>, StoreError> {
        self.run(move |s| async move {
            let now = s.now();
            let client = s.client().await?;
            let rows = client
                .query(
                    &format!(
                        "SELECT mailbox, \
                         count(*) FILTER (WHERE state IN {LIVE}), \
                         count(*) FILTER (WHERE state = 'leased' AND lease_until_ms > $1), \
                         count(*) FILTER (WHERE state IN {LIVE} AND urgent), \
                         count(*) FILTER (WHERE state IN {LIVE} AND due_ms <= $1), \
                         count(*) FILTER (WHERE state = 'quarantined'), \
                         min((record->>'queued_at_ms')::bigint) FILTER (WHERE state IN {LIVE}) \
                         FROM deliveries WHERE state IN ('queued', 'leased', 'parked', 'quarantined') \
                         GROUP BY mailbox ORDER BY mailbox"
                    ),
                    &[&now],
                )
                .await
                .map_err(db)?;
            let count = |r: &tokio_postgres::Row, i: usize| u64::try_from(r.get::<_, i64>(i)).unwrap_or(0);
            Ok(rows
                .iter()
                .map(|r| MailboxStats {
                    mailbox: r.get(0),
                    depth: count(r, 1),
                    leased: count(r, 2),
                    urgent: count(r, 3),
                    overdue: count(r, 4),
                    quarantined: count(r, 5),
                    oldest_age_ms: r
                        .get::<_, Option<i64>>(6)
                        .map(|t| now.saturating_sub(t)),
                })
                .collect())
        })
        .await
    }

    /// Operators' registry changes, as stored.
    ///
    /// # Errors
    /// Database failures.
    pub fn registry_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query("SELECT record FROM registry ORDER BY code", &[])
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// A page of deliveries in one of `states` (of `mailbox`, or all), ordered by
    /// (mailbox, id) as the sled indexes are; the cursor is the same
    /// mailbox key.
    fn page(
        &self,
        states: &'static [&'static str],
        mailbox: Option<&str>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        let mailbox = mailbox.map(str::to_owned);
        let (after_mailbox, after_id) = match after {
            Some(key) => records::split_mailbox_key(key)
                .map(|(m, i)| (Some(m), id(i)))
                .ok_or_else(|| StoreError::Corrupt("page cursor layout".into()))?,
            None => (None, 0),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query(
                    "SELECT record FROM deliveries WHERE state = ANY($1) \
                     AND ($2::text IS NULL OR mailbox = $2) \
                     AND ($3::text IS NULL OR (mailbox, id) > ($3, $4)) \
                     ORDER BY mailbox, id LIMIT $5",
                    &[&states, &mailbox, &after_mailbox, &after_id, &limit],
                )
                .await
                .map_err(db)?;
            Ok(sql::deliveries(&rows)
                .into_iter()
                .map(|d| (records::mailbox_key(&d.mailbox, d.id), d))
                .collect())
        })
    }

    /// A page of quarantined deliveries, each with its cursor.
    ///
    /// # Errors
    /// Database failures.
    pub fn quarantined_page(
        &self,
        mailbox: Option<&str>,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.page(&["quarantined"], mailbox, after, limit)
    }

    /// A page of parked releases, oldest first, each with its cursor.
    ///
    /// # Errors
    /// Database failures.
    pub fn parked_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.page(&["parked"], Some(mailbox), after, limit)
    }

    /// A page of `mailbox`'s live deliveries (queued, leased or parked).
    ///
    /// # Errors
    /// Database failures.
    pub fn live_page(
        &self,
        mailbox: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, DeliveryRecord)>, StoreError> {
        self.page(&["queued", "leased", "parked"], Some(mailbox), after, limit)
    }

    /// Every patient key an identifier stands for.
    ///
    /// # Errors
    /// Database failures.
    pub fn patient_keys(&self, identifier: &str) -> Result<Vec<String>, StoreError> {
        let identifier = identifier.to_owned();
        self.block(move |s| async move {
            let client = s.client().await?;
            let resolved: String = client
                .query_opt(
                    "SELECT patient_key FROM identities WHERE identifier = $1",
                    &[&identifier],
                )
                .await
                .map_err(db)?
                .map_or(identifier, |r| r.get(0));
            let record = client
                .query_opt(
                    "SELECT record FROM patients WHERE patient_key = $1",
                    &[&resolved],
                )
                .await
                .map_err(db)?
                .map(|r| r.get::<_, Json<PatientRecord>>(0).0)
                .unwrap_or_default();
            let mut keys = vec![resolved];
            keys.extend(record.aliases);
            Ok(keys)
        })
    }

    /// See [`crate::store::SledStore::latest_custody`].
    ///
    /// # Errors
    /// Database failures.
    pub fn latest_custody(&self, identifier: &str) -> Result<Option<HandoverRecord>, StoreError> {
        let identifier = identifier.to_owned();
        let events: Vec<String> = records::CUSTODY_EVENTS
            .iter()
            .map(ToString::to_string)
            .collect();
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query(
                    "SELECT h.record FROM lineage l JOIN handovers h ON h.id = l.handover_id \
                     WHERE l.patient_key = COALESCE(\
                     (SELECT patient_key FROM identities WHERE identifier = $1), $1) \
                     AND l.event = ANY($2)",
                    &[&identifier, &events],
                )
                .await
                .map_err(db)?;
            // Ordered by when each movement was first reported, as on sled
            // (`HandoverRecord::movement_start`).
            let mut latest: Option<(u64, HandoverRecord)> = None;
            for row in rows {
                let head = row.get::<_, Json<HandoverRecord>>(0).0;
                let start = super::identity::movement_start(&**client, &head).await?;
                if latest
                    .as_ref()
                    .is_none_or(|(s, h)| (start, head.id) > (*s, h.id))
                {
                    latest = Some((start, head));
                }
            }
            Ok(latest.map(|(_, h)| h))
        })
    }

    /// A page of identity conflicts, newest first, each with its cursor.
    ///
    /// # Errors
    /// Database failures.
    pub fn identity_conflicts_page(
        &self,
        before: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, IdentityConflict)>, StoreError> {
        let before = before.and_then(records::from_be).map_or(i64::MAX, id);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query(
                    "SELECT id, record FROM identity_conflicts WHERE id < $1 \
                     ORDER BY id DESC LIMIT $2",
                    &[&before, &limit],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| {
                    let key = records::be(sql::un_id(r.get(0))).to_vec();
                    (key, r.get::<_, Json<IdentityConflict>>(1).0)
                })
                .collect())
        })
    }

    /// Calls `visit` with what the continuity indicators read of each
    /// handover of `event` submitted in `[from_ms, to_ms)` and of its
    /// deliveries, newest first, a page at a time.
    ///
    /// # Errors
    /// Database failures.
    pub fn for_each_handover_submitted_between(
        &self,
        event: JourneyEvent,
        from_ms: i64,
        to_ms: i64,
        mut visit: impl FnMut(&ReleaseFacts, &[CopyFacts]),
    ) -> Result<(), StoreError> {
        let mut before = i64::MAX;
        loop {
            let page = self.block(move |s| async move {
                let client = s.client().await?;
                let rows = client
                    .query(
                        "SELECT h.id, h.record, \
                         COALESCE((SELECT jsonb_agg(d.record ORDER BY d.id) FROM deliveries d \
                                   WHERE d.handover_id = h.id), '[]'::jsonb) \
                         FROM handovers h WHERE h.event = $1 AND h.submitted_at_ms >= $2 \
                         AND h.submitted_at_ms < $3 AND h.id < $4 ORDER BY h.id DESC LIMIT $5",
                        &[&event.to_string(), &from_ms, &to_ms, &before, &SCAN_PAGE],
                    )
                    .await
                    .map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| {
                        (
                            r.get::<_, i64>(0),
                            r.get::<_, Json<ReleaseFacts>>(1).0,
                            r.get::<_, Json<Vec<CopyFacts>>>(2).0,
                        )
                    })
                    .collect::<Vec<_>>())
            })?;
            let Some(last) = page.last().map(|(i, _, _)| *i) else {
                return Ok(());
            };
            before = last;
            for (_, h, deliveries) in page {
                visit(&h, &deliveries);
            }
        }
    }

    /// Reads a handover's payload: opened with its data key, checked
    /// against the handover's SHA-256.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] when it is missing or fails a check; the
    /// database failing.
    pub async fn payload(&self, handover: &HandoverRecord) -> Result<Vec<u8>, StoreError> {
        let mut one = self.payloads(vec![handover.clone()]).await?;
        one.pop()
            .unwrap_or_else(|| Err(StoreError::Unavailable("no payload read".into())))
    }

    /// The payloads of several handovers, read in one query, each with its
    /// own result: a payload missing or failing its checks fails alone.
    ///
    /// # Errors
    /// The database failing (the whole read).
    pub async fn payloads(
        &self,
        handovers: Vec<HandoverRecord>,
    ) -> Result<Vec<Result<Vec<u8>, StoreError>>, StoreError> {
        if handovers.is_empty() {
            return Ok(Vec::new());
        }
        self.run(move |s| async move {
            let client = s.client().await?;
            let ids: Vec<i64> = handovers.iter().map(|h| id(h.id)).collect();
            let rows = client
                .query(
                    "SELECT handover_id, data_key, sealed FROM payloads \
                     WHERE handover_id = ANY($1)",
                    &[&ids],
                )
                .await
                .map_err(db)?;
            let mut found: std::collections::HashMap<i64, (Option<Vec<u8>>, Vec<u8>)> = rows
                .iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect();
            Ok(handovers
                .iter()
                .map(|h| {
                    let (data_key, sealed) = found.remove(&id(h.id)).ok_or_else(|| {
                        StoreError::Corrupt(format!("payload of handover {} is missing", h.id))
                    })?;
                    let payload = s.cipher.open(h.id, data_key.as_deref(), &sealed)?;
                    if hex(&Sha256::digest(&payload)) != h.payload_hash {
                        return Err(StoreError::Corrupt(format!(
                            "payload of handover {} does not match its SHA-256",
                            h.id
                        )));
                    }
                    Ok(payload)
                })
                .collect())
        })
        .await
    }

    /// The audit trail's entries as stored (the bytes the chain hashes), in order.
    fn audit_raw(&self, action: Option<String>, since_ms: i64) -> Result<Vec<Vec<u8>>, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let rows = client
                .query(
                    "SELECT entry FROM audit WHERE ($1::text IS NULL OR action = $1) \
                     AND at_ms >= $2 ORDER BY seq",
                    &[&action, &since_ms],
                )
                .await
                .map_err(db)?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// Every audit entry, in order.
    ///
    /// # Errors
    /// Database failures or undecodable entries.
    pub fn audit_entries(&self) -> Result<Vec<AuditEntry>, StoreError> {
        decode(self.audit_raw(None, i64::MIN)?)
    }

    /// Audit entries with `action` written at or after `since_ms`, newest first.
    ///
    /// # Errors
    /// Database failures or undecodable entries.
    pub fn audit_since(&self, action: &str, since_ms: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let mut entries = decode(self.audit_raw(Some(action.to_owned()), since_ms)?)?;
        entries.reverse();
        Ok(entries)
    }

    /// Verifies the chain (one chain across every node) from its signed
    /// retention cut, when entries were removed; the cut and the entries
    /// are read from one snapshot.
    ///
    /// # Errors
    /// The first broken link, or a database failure.
    pub fn verify_audit_from(&self) -> Result<crate::audit::Verified, StoreError> {
        self.verify_audit_anchored(&[])
    }

    /// Verifies the whole chain against checkpoints recorded elsewhere
    /// (each `(where from, checkpoint)`, as [`Self::audit_checkpoint`]
    /// printed them): each must be signed by the audit key, and the chain
    /// must still hold its entry unchanged and reach it. A database
    /// restored from an older backup, truncated or rewritten is found.
    ///
    /// # Errors
    /// A checkpoint not signed by this audit key, the first broken link or
    /// a chain short of a checkpoint, or a database failure.
    pub fn verify_audit_anchored(
        &self,
        anchors: &[(String, crate::audit::SignedCheckpoint)],
    ) -> Result<crate::audit::Verified, StoreError> {
        for (from, signed) in anchors {
            if !signed.verifies(self.audit_key()) {
                return Err(StoreError::Corrupt(format!(
                    "the checkpoint in {from} is not signed by this audit key"
                )));
            }
        }
        let (cut, raw) = self.audit_chain()?;
        let verify = |anchor: Option<&crate::audit::Checkpoint>| {
            crate::audit::verify_from(
                raw.iter().map(Vec::as_slice),
                Some(self.audit_key()),
                anchor,
                cut.as_ref(),
            )
        };
        let mut verified = verify(None).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        for (from, signed) in anchors {
            verified = verify(Some(&signed.checkpoint))
                .map_err(|e| StoreError::Corrupt(format!("{e} (checkpoint: {from})")))?;
        }
        Ok(verified)
    }

    /// The head of the chain as a checkpoint signed with the audit key
    /// (Ed25519), after verifying the whole chain: for an outside system to
    /// record, and `verify_audit_anchored` to check later. `commit_seq` is
    /// sled's batch count and is 0 here.
    ///
    /// # Errors
    /// The chain does not verify, or a database failure.
    pub fn audit_checkpoint(
        &self,
        now_ms: i64,
    ) -> Result<crate::audit::SignedCheckpoint, StoreError> {
        let (cut, raw) = self.audit_chain()?;
        let v = crate::audit::verify_from(
            raw.iter().map(Vec::as_slice),
            Some(self.audit_key()),
            None,
            cut.as_ref(),
        )
        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let audit_hash = match raw.last() {
            Some(last) => {
                serde_json::from_slice::<crate::audit::AuditEntry>(last)
                    .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?
                    .hash
            }
            None => crate::audit::GENESIS.to_owned(),
        };
        let checkpoint = crate::audit::Checkpoint {
            commit_seq: 0,
            audit_seq: v.last,
            audit_hash,
            keyed_from: v.keyed_from.unwrap_or(v.last + 1),
            at_ms: now_ms,
        };
        Ok(checkpoint.sign(self.audit_key()))
    }

    /// The signed retention cut (if any) and every audit entry, in order,
    /// read in one snapshot.
    #[allow(clippy::type_complexity)]
    fn audit_chain(
        &self,
    ) -> Result<(Option<crate::audit::SignedAuditCut>, Vec<Vec<u8>>), StoreError> {
        self.block(move |s| async move {
            let mut client = s.client().await?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(db)?;
            let cut = super::retention::audit_cut(&*tx).await?;
            let rows = tx
                .query("SELECT entry FROM audit ORDER BY seq", &[])
                .await
                .map_err(db)?;
            tx.commit().await.map_err(db)?;
            Ok((
                cut,
                rows.iter()
                    .map(|r| r.get::<_, Vec<u8>>(0))
                    .collect::<Vec<_>>(),
            ))
        })
    }

    /// SHA-256 over every handover, delivery, payload, identity, lineage and
    /// registry row: equal digests mean no queue state changed.
    ///
    /// # Errors
    /// Database failures.
    pub fn content_digest(&self) -> Result<String, StoreError> {
        self.block(move |s| async move {
            let client = s.client().await?;
            let mut hasher = Sha256::new();
            for query in [
                "SELECT id::text || record::text FROM handovers ORDER BY id",
                "SELECT id::text || record::text FROM deliveries ORDER BY id",
                "SELECT handover_id::text || encode(sha256(sealed), 'hex') FROM payloads ORDER BY handover_id",
                "SELECT identifier || ' ' || patient_key FROM identities ORDER BY identifier",
                "SELECT patient_key || record::text FROM patients ORDER BY patient_key",
                "SELECT patient_key || sender || event || handover_id::text FROM lineage \
                 ORDER BY patient_key, sender, event",
                "SELECT code || encode(record, 'hex') FROM registry ORDER BY code",
            ] {
                for row in client.query(query, &[]).await.map_err(db)? {
                    let text: String = row.get(0);
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
            }
            Ok(hex(&hasher.finalize()))
        })
    }
}

fn decode(raw: Vec<Vec<u8>>) -> Result<Vec<AuditEntry>, StoreError> {
    raw.iter()
        .map(|v| serde_json::from_slice(v).map_err(|e| StoreError::Corrupt(e.to_string())))
        .collect()
}
