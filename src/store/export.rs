//! Moving a stopped sled store to PostgreSQL (docs/store-engines.md,
//! "Moving a sled store to PostgreSQL"): [`export`] reads the sled store
//! into an export file ([`super::export_file`]), [`import`] writes one into
//! an empty PostgreSQL database in one transaction.
//!
//! # Invariants
//! - The export opens the sled store as a gateway would (witness and audit
//!   checks included), so a store another process holds is refused, and so
//!   is one that fails its checks. Its first act is an audit entry
//!   (`store_export`) in the sled chain, so the file carries the record of
//!   its own making.
//! - Payloads stay sealed: each data key is unwrapped in memory only to be
//!   wrapped again under the master key, and each payload is opened in
//!   memory only to check its SHA-256 against its handover record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::export_file::{self, ExportWriter, Header, Line, MoveError, b64};
use super::records::{self, RetentionKind, TreeId};
use super::{Clock, SledStore, StoreError, StoreOptions, crypt::PayloadCipher, pg};
use crate::audit::{AuditEntry, AuditEvent, AuditKey};

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The file.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// Records in it, by kind.
    pub carried: BTreeMap<String, u64>,
    /// What the store held that it does not carry.
    pub not_carried: BTreeMap<String, u64>,
    /// Its digest, hex.
    pub sha256: String,
}

/// Exports the stopped sled store in `dir` to a new file `out`, audited in
/// the store's own chain as `actor`.
///
/// # Errors
/// [`MoveError::InUse`] while another process holds the store;
/// [`MoveError::Unsupported`] when `dir` holds no sled store; any store or
/// file failure.
pub async fn export(
    dir: &Path,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    actor: &str,
    out: &Path,
) -> Result<ExportSummary, MoveError> {
    if !dir.join("sled").is_dir() {
        return Err(MoveError::Unsupported(format!(
            "there is no sled store in {}",
            dir.display()
        )));
    }
    let store = SledStore::open(dir, options, clock.clone()).map_err(|e| match e {
        StoreError::Sled(sled::Error::Io(io)) if io.to_string().contains("acquire lock") => {
            MoveError::InUse(dir.to_path_buf())
        }
        e => MoveError::Store(e),
    })?;
    let done = export_open(&store, clock.now_ms(), actor, out).await;
    let closed = store.close().await;
    let summary = done?;
    closed?;
    Ok(summary)
}

async fn export_open(
    store: &SledStore,
    now: i64,
    actor: &str,
    out: &Path,
) -> Result<ExportSummary, MoveError> {
    let trees = store.inner.trees.clone();
    store.verify_audit_from()?;
    let name = out
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    store
        .record(AuditEvent {
            actor: actor.to_owned(),
            action: "store_export",
            outcome: format!("ok: every record read for a move to PostgreSQL (export file {name})"),
            ..AuditEvent::default()
        })
        .await?;
    let source = Source {
        trees,
        cipher: store.inner.cipher.clone(),
        key: store.inner.audit_key.clone(),
        metadata_ms: store.retention_policy().metadata_ms,
        now_ms: now,
    };
    let (actor, out) = (actor.to_owned(), out.to_path_buf());
    tokio::task::spawn_blocking(move || source.write(now, &actor, &out))
        .await
        .map_err(|e| StoreError::Unavailable(format!("export failed: {e}")))?
        .map_err(MoveError::Store)
}

/// Imports the export file `file` into the empty PostgreSQL database `pg`
/// names, with the key files of `options` (they must exist: the sled
/// gateway's), audited as `actor`.
///
/// # Errors
/// [`MoveError::MissingKey`], [`MoveError::File`], [`MoveError::NotEmpty`];
/// database failures. Nothing is imported on any of them.
pub async fn import(
    pg_options: &pg::PgOptions,
    options: StoreOptions,
    clock: Arc<dyn Clock>,
    dir: &Path,
    actor: &str,
    file: &Path,
) -> Result<pg::ImportSummary, MoveError> {
    let master = options
        .master_key_file
        .clone()
        .unwrap_or_else(|| dir.join("master-key"));
    let audit = options.audit_key_file.clone().unwrap_or_else(|| {
        options
            .witness_dir
            .clone()
            .unwrap_or_else(|| super::high_water::default_dir(dir))
            .join("audit-key")
    });
    for (what, path) in [("the master key", master), ("the audit key", audit)] {
        if !path.is_file() {
            return Err(MoveError::MissingKey { what, path });
        }
    }
    let store = pg::PgStore::open(pg_options, options, clock, dir)?;
    let done = store.import(file, actor).await;
    store.close().await?;
    done
}

/// A sled store's trees and keys, read into a file.
struct Source {
    trees: Vec<sled::Tree>,
    cipher: Arc<PayloadCipher>,
    key: Arc<AuditKey>,
    /// The retention policy's metadata period, ms.
    metadata_ms: i64,
    /// When the export runs, ms since the epoch.
    now_ms: i64,
}

/// Counts by kind.
type Counts = BTreeMap<String, u64>;

fn bump(counts: &mut Counts, kind: &str) {
    *counts.entry(kind.to_owned()).or_default() += 1;
}

impl Source {
    fn tree(&self, t: TreeId) -> &sled::Tree {
        &self.trees[t as usize]
    }

    fn write(&self, now: i64, actor: &str, out: &Path) -> Result<ExportSummary, StoreError> {
        let header = self.header(now, actor)?;
        let mut w = ExportWriter::create(out)?;
        let mut carried = Counts::new();
        w.line(&Line::Header(header.clone()))?;
        for entry in self.tree(TreeId::Registry).iter() {
            let (k, v) = entry?;
            w.line(&Line::Registry {
                code: String::from_utf8_lossy(&k).into_owned(),
                record: b64(&v),
            })?;
            bump(&mut carried, "registry");
        }
        self.handovers(&mut w, &mut carried)?;
        self.deliveries(&mut w, &mut carried)?;
        self.identity_links(&mut w, &mut carried)?;
        self.retention_state(&mut w, &mut carried)?;
        for entry in self.tree(TreeId::Mesh).iter().values() {
            w.line(&Line::Mesh {
                record: decode(&entry?, "mesh record")?,
            })?;
            bump(&mut carried, "mesh_records");
        }
        for entry in self.tree(TreeId::Audit).iter().values() {
            let v = entry?;
            let entry = String::from_utf8(v.to_vec())
                .map_err(|_| StoreError::Corrupt("an audit entry is not UTF-8".into()))?;
            w.line(&Line::Audit { entry })?;
            bump(&mut carried, "audit_entries");
        }
        let not_carried = self.not_carried()?;
        w.line(&Line::Summary {
            carried: carried.clone(),
            not_carried: not_carried.clone(),
        })?;
        let sha256 = w.finish(&self.key)?;
        Ok(ExportSummary {
            path: out.to_path_buf(),
            header,
            carried,
            not_carried,
            sha256,
        })
    }

    fn header(&self, now: i64, actor: &str) -> Result<Header, StoreError> {
        let meta = self.tree(TreeId::Meta);
        let counter = |k: &[u8]| -> Result<u64, StoreError> {
            Ok(meta.get(k)?.and_then(|v| records::from_be(&v)).unwrap_or(0))
        };
        let last: Option<AuditEntry> = self
            .tree(TreeId::Audit)
            .last()?
            .map(|(_, v)| decode(&v, "audit entry"))
            .transpose()?;
        Ok(Header {
            format: export_file::FORMAT.into(),
            version: export_file::VERSION,
            source: "sled".into(),
            exported_at_ms: now,
            exported_by: actor.to_owned(),
            last_handover_id: counter(records::META_LAST_HANDOVER)?,
            last_delivery_id: counter(records::META_LAST_DELIVERY)?,
            audit_seq: last.as_ref().map_or(0, |e| e.seq),
            audit_hash: last.map_or_else(|| crate::audit::GENESIS.into(), |e| e.hash),
            audit_public_key: self.key.public_key_hex(),
        })
    }

    /// Every handover with its payload sealed and its data key wrapped by
    /// the master key; each payload is checked against its SHA-256 first.
    fn handovers(&self, w: &mut ExportWriter, carried: &mut Counts) -> Result<(), StoreError> {
        let (next, last) = self.backfill_range()?;
        for entry in self.tree(TreeId::Handovers).iter().values() {
            let mut record: records::HandoverRecord = decode(&entry?, "handover")?;
            if (next..=last).contains(&record.id) && record.finished_at_ms.is_none() {
                record.finished_at_ms = self.finished_at(&record)?;
            }
            let wrapped = self.tree(TreeId::DataKeys).get(records::be(record.id))?;
            let (data_key, sealed) = match wrapped {
                None if record.shredded_at_ms.is_some() => {
                    bump(carried, "payloads_shredded");
                    (None, None)
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "handover {} has no data key and was not shredded",
                        record.id
                    )));
                }
                Some(wrapped) => {
                    let sealed = self.sealed(record.id)?;
                    let payload = self.cipher.open(record.id, Some(&wrapped), &sealed)?;
                    if crate::audit::hex(&Sha256::digest(&payload)) != record.payload_hash {
                        return Err(StoreError::Corrupt(format!(
                            "payload of handover {} does not match its SHA-256",
                            record.id
                        )));
                    }
                    drop(zeroize::Zeroizing::new(payload));
                    let data_key = self.cipher.rewrap_under_master(record.id, &wrapped)?;
                    bump(carried, "payloads");
                    (Some(b64(&data_key)), Some(b64(&sealed)))
                }
            };
            w.line(&Line::Handover {
                record,
                data_key,
                sealed,
            })?;
            bump(carried, "handovers");
        }
        Ok(())
    }

    /// The handovers sled's one-off look at what was stored before
    /// retention existed has still to look at (none once it is done).
    fn backfill_range(&self) -> Result<(u64, u64), StoreError> {
        let meta = self.tree(TreeId::Meta);
        Ok(match meta.get(super::writer::retention::META_BACKFILL)? {
            Some(v) if v.len() == 16 => (
                records::from_be(&v[..8]).unwrap_or(1),
                records::from_be(&v[8..]).unwrap_or(0),
            ),
            _ => (
                1,
                meta.get(records::META_LAST_HANDOVER)?
                    .and_then(|v| records::from_be(&v))
                    .unwrap_or(0),
            ),
        })
    }

    /// When a handover stored before retention existed finished, as
    /// sled's look would find it: the latest of its deliveries' (a
    /// superseded one's: its replacement's), or when submitted if it went
    /// to nobody; `None` while one is not finished. PostgreSQL finds due
    /// work from this field only.
    fn finished_at(&self, h: &records::HandoverRecord) -> Result<Option<i64>, StoreError> {
        if h.deliveries.is_empty() {
            return Ok(Some(h.submitted_at_ms));
        }
        let delivery = |id: u64| -> Result<Option<records::DeliveryRecord>, StoreError> {
            self.tree(TreeId::Deliveries)
                .get(records::be(id))?
                .map(|v| decode(&v, "delivery"))
                .transpose()
        };
        let mut finished = Some(i64::MIN);
        for id in &h.deliveries {
            let at = match delivery(*id)? {
                // Superseded by a correction that went to no one: done.
                Some(d) if d.is_superseded() && d.superseded_by.is_none() => d
                    .finished_at()
                    .or(d.superseded_at_ms)
                    .or(Some(d.queued_at_ms)),
                Some(d) if d.state == records::DeliveryState::Superseded => {
                    delivery(d.superseded_by.unwrap_or(0))?
                        .as_ref()
                        .and_then(records::DeliveryRecord::finished_at)
                }
                Some(d) => d.finished_at(),
                None => None,
            };
            finished = finished.zip(at).map(|(a, b)| a.max(b));
        }
        Ok(finished)
    }

    /// A handover's sealed payload, its chunks' CRCs checked.
    fn sealed(&self, handover_id: u64) -> Result<Vec<u8>, StoreError> {
        let mut sealed = Vec::new();
        for entry in self
            .tree(TreeId::Payloads)
            .scan_prefix(records::be(handover_id))
        {
            let (_, value) = entry?;
            let chunk = records::decode_chunk(&value).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "payload chunk of handover {handover_id} fails its CRC"
                ))
            })?;
            sealed.extend_from_slice(chunk);
        }
        Ok(sealed)
    }

    /// Every delivery as it stands. Records from before deliveries named
    /// their sender and event get them from their handover (the
    /// PostgreSQL engine supersedes by those columns).
    fn deliveries(&self, w: &mut ExportWriter, carried: &mut Counts) -> Result<(), StoreError> {
        for entry in self.tree(TreeId::Deliveries).iter().values() {
            let mut record: records::DeliveryRecord = decode(&entry?, "delivery")?;
            if record.sender.is_none() || record.event.is_none() {
                let raw = self
                    .tree(TreeId::Handovers)
                    .get(records::be(record.handover_id))?
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "delivery {} names a handover the store lacks",
                            record.id
                        ))
                    })?;
                let h: records::HandoverRecord = decode(&raw, "handover")?;
                record.sender.get_or_insert(h.sender);
                record.event.get_or_insert(h.event);
            }
            bump(carried, &delivery_kind(record.state));
            w.line(&Line::Delivery { record })?;
        }
        Ok(())
    }

    /// What retention left and keeps: tombstones, the signed audit cut,
    /// the identity checks due and the counters. The rest of sled's
    /// schedule is found again from the records on PostgreSQL.
    fn retention_state(
        &self,
        w: &mut ExportWriter,
        carried: &mut Counts,
    ) -> Result<(), StoreError> {
        for entry in self.tree(TreeId::Tombstones).scan_prefix(b"h") {
            let (_, v) = entry?;
            w.line(&Line::Tombstone {
                record: decode(&v, "tombstone")?,
            })?;
            bump(carried, "tombstones");
        }
        let meta = self.tree(TreeId::Meta);
        if let Some(cut) = super::integrity::audit_cut(meta)? {
            w.line(&Line::AuditCut { cut })?;
            bump(carried, "audit_cut");
        }
        for entry in self.tree(TreeId::Retention).iter() {
            let (k, v) = entry?;
            let Some((due_ms, RetentionKind::Identity, _)) = records::split_retention_key(&k)
            else {
                continue;
            };
            w.line(&Line::IdentityExpiry {
                patient_key: utf8(&v)?,
                due_ms,
            })?;
            bump(carried, "identity_expiry");
        }
        self.identity_backfill(w, carried)?;
        let counter = |k: &[u8]| -> Result<u64, StoreError> {
            Ok(meta.get(k)?.and_then(|v| records::from_be(&v)).unwrap_or(0))
        };
        w.line(&Line::RetentionCounters {
            payloads_shredded: counter(super::writer::retention::META_SHREDDED)?,
            metadata_removed: counter(super::writer::retention::META_REMOVED)?,
            identity_removed: counter(super::writer::retention::META_IDENTITY_REMOVED)?,
        })?;
        bump(carried, "retention_counters");
        Ok(())
    }

    /// sled's one-off look through the lineage, if still under way: a
    /// patient whose lineage points only at removed handovers, with nothing
    /// live, parked or quarantined, gets an identity check a metadata
    /// period from now, as sled's next passes would give them.
    fn identity_backfill(
        &self,
        w: &mut ExportWriter,
        carried: &mut Counts,
    ) -> Result<(), StoreError> {
        let meta = self.tree(TreeId::Meta);
        let cursor = meta.get(super::writer::identity_expiry::META_IDENTITY_BACKFILL)?;
        let after = match cursor.as_deref() {
            Some([1]) => return Ok(()),
            Some([0, last @ ..]) => std::ops::Bound::Excluded(last.to_vec()),
            _ => std::ops::Bound::Unbounded,
        };
        let mut tracked = std::collections::BTreeSet::new();
        for entry in self.tree(TreeId::Deliveries).iter().values() {
            let d: records::DeliveryRecord = decode(&entry?, "delivery")?;
            if matches!(
                d.state,
                records::DeliveryState::Queued
                    | records::DeliveryState::Leased
                    | records::DeliveryState::Parked
                    | records::DeliveryState::Quarantined
            ) {
                tracked.insert(d.patient_key);
            }
        }
        let handovers = self.tree(TreeId::Handovers);
        let mut held = std::collections::BTreeSet::new();
        let mut orphaned = std::collections::BTreeSet::new();
        for entry in self.tree(TreeId::Lineage).iter() {
            let (key, value) = entry?;
            let patient = utf8(key.split(|b| *b == 0).next().unwrap_or_default())?;
            let id = records::from_be(&value).unwrap_or(0);
            if handovers.contains_key(records::be(id))? {
                held.insert(patient);
            } else if after_bound(&after, &key) {
                orphaned.insert(patient);
            }
        }
        let due_ms = self.now_ms.saturating_add(self.metadata_ms);
        for patient_key in orphaned {
            if held.contains(&patient_key) || tracked.contains(&patient_key) {
                continue;
            }
            w.line(&Line::IdentityExpiry {
                patient_key,
                due_ms,
            })?;
            bump(carried, "identity_expiry");
        }
        Ok(())
    }

    fn identity_links(&self, w: &mut ExportWriter, carried: &mut Counts) -> Result<(), StoreError> {
        for entry in self.tree(TreeId::Identities).iter() {
            let (k, v) = entry?;
            w.line(&Line::Identity {
                identifier: utf8(&k)?,
                patient_key: utf8(&v)?,
            })?;
            bump(carried, "identities");
        }
        for entry in self.tree(TreeId::Patients).iter() {
            let (k, v) = entry?;
            w.line(&Line::Patient {
                patient_key: utf8(&k)?,
                record: decode(&v, "patient")?,
            })?;
            bump(carried, "patients");
        }
        for entry in self.tree(TreeId::Lineage).iter() {
            let (k, v) = entry?;
            let parts: Vec<&[u8]> = k.split(|b| *b == 0).collect();
            let [patient_key, sender, event] = parts[..] else {
                return Err(StoreError::Corrupt("lineage key layout".into()));
            };
            w.line(&Line::Lineage {
                patient_key: utf8(patient_key)?,
                sender: utf8(sender)?,
                event: utf8(event)?,
                handover_id: records::from_be(&v)
                    .ok_or_else(|| StoreError::Corrupt("lineage value".into()))?,
            })?;
            bump(carried, "lineage");
        }
        for entry in self.tree(TreeId::Conflicts).iter().values() {
            w.line(&Line::Conflict {
                record: decode(&entry?, "identity conflict")?,
            })?;
            bump(carried, "identity_conflicts");
        }
        Ok(())
    }

    /// What the sled store holds that the PostgreSQL engine keeps no copy
    /// of, because it finds the same from the records or needs none
    /// (docs/store-engines.md says which is which).
    fn not_carried(&self) -> Result<Counts, StoreError> {
        let mut counts = Counts::new();
        let mut schedule = 0;
        for key in self.tree(TreeId::Retention).iter().keys() {
            let kind = records::split_retention_key(&key?).map(|(_, kind, _)| kind);
            schedule += u64::from(kind != Some(RetentionKind::Identity));
        }
        counts.insert("retention_schedule".into(), schedule);
        counts.insert(
            "superseded_waits".into(),
            self.tree(TreeId::Superseded).len() as u64,
        );
        counts.insert("key_epochs".into(), self.cipher.epochs().len() as u64);
        Ok(counts)
    }
}

/// Whether lineage key `key` comes after the cursor of sled's look.
fn after_bound(after: &std::ops::Bound<Vec<u8>>, key: &[u8]) -> bool {
    match after {
        std::ops::Bound::Excluded(last) => key > last.as_slice(),
        _ => true,
    }
}

/// The count a delivery in `state` adds to (`deliveries_queued`, ...).
pub(crate) fn delivery_kind(state: records::DeliveryState) -> String {
    let name = serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    format!("deliveries_{name}")
}

fn decode<T: serde::de::DeserializeOwned>(raw: &[u8], what: &str) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt(format!("{what} record: {e}")))
}

fn utf8(raw: &[u8]) -> Result<String, StoreError> {
    String::from_utf8(raw.to_vec())
        .map_err(|_| StoreError::Corrupt("a key of the identity trees is not UTF-8".into()))
}
