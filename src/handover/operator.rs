//! The operator calls: queues at a glance, quarantine and redrive, parked
//! releases, the registry, the audit trail, break-glass reads and retention.
//! Operator identities only; payload-free except the audited break-glass read.

use super::claiming::{Claimed, claimant};
use super::envelope::PatientRef;
use super::page::{Listing, Page, PageRequest, page_of, page_sorted};
use super::{Caller, Decoded, Error, Gateway};
use crate::audit::{AuditEntry, AuditEvent};
use crate::clinical::{ClinicalSummary, NhsNumber, OdsCode, PrisonNumber, ValidationErrors};
use crate::journey::{JourneyEvent, OrgKind, Organisation};
use crate::store::{
    DeliveryRecord, HandoverRecord, IdentityConflict, MailboxStats, PARKED_MAILBOX,
    PARKED_MENTAL_HEALTH_MAILBOX, PARKED_SUBSTANCE_MISUSE_MAILBOX, RedriveOutcome, RetentionPolicy,
    RetentionStats, StoreError,
};

/// Most rows one listing returns.
pub const MAX_LIST: usize = 1_000;

/// Every mailbox's figures, as of `now_ms`.
#[derive(Debug, Clone)]
pub struct Mailboxes {
    /// One row per mailbox, by name.
    pub mailboxes: Page<MailboxStats>,
    /// When, ms since the epoch.
    pub now_ms: i64,
    /// MESH-reached mailboxes: their MESH mailbox id and how many of their
    /// deliveries wait for the recipient's MESH acknowledgement.
    pub mesh: std::collections::BTreeMap<String, (String, u64)>,
}

/// A delivery as an operator sees it (no clinical content).
#[derive(Debug, Clone)]
pub struct DeliveryInfo {
    /// The delivery.
    pub record: DeliveryRecord,
    /// Who sent its handover.
    pub sender: String,
    /// The event it carries, when its handover is still held.
    pub event: Option<JourneyEvent>,
    /// Past its due time.
    pub overdue: bool,
}

/// What a redrive names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedriveTarget {
    /// These deliveries.
    Deliveries(Vec<u64>),
    /// Everything quarantined in this mailbox.
    Mailbox(String),
}

/// An operator's claim on a practice's behalf.
#[derive(Debug, Clone)]
pub struct ClaimParkedCommand {
    /// The patient (identifier and date of birth), as the edge read it.
    pub patient: Decoded<Option<PatientRef>>,
    /// The practice's ODS code.
    pub practice: String,
    /// Why, in words (no patient data).
    pub reason: String,
}

/// Whose audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditSubject {
    /// One handover.
    HandoverId(u64),
    /// A patient by NHS number (as given; checked here).
    NhsNumber(String),
    /// A patient by prison number (as given; checked here).
    PrisonNumber(String),
}

/// An audit trail and whether the chain checked out.
#[derive(Debug, Clone)]
pub struct AuditTrail {
    /// Entries about the subject, oldest first.
    pub entries: Page<AuditEntry>,
    /// The whole chain verified.
    pub chain_verified: bool,
}

/// What a break-glass read returns.
#[derive(Debug, Clone)]
pub struct BreakGlassRead {
    /// The handover.
    pub handover: HandoverRecord,
    /// Its patient.
    pub patient: PatientRef,
    /// Its summary, whole.
    pub summary: ClinicalSummary,
}

/// Retention figures and policy, as of `now_ms`.
#[derive(Debug, Clone)]
pub struct RetentionStatus {
    /// The figures.
    pub stats: RetentionStats,
    /// The policy in force.
    pub policy: RetentionPolicy,
    /// When, ms since the epoch.
    pub now_ms: i64,
}

fn check_reason(reason: &str, v: &mut ValidationErrors) {
    super::free_text::check_reason("reason", reason, 1, v);
}

impl Gateway {
    /// Every mailbox's figures.
    ///
    /// # Errors
    /// Refusals for non-operators, and store failures.
    pub async fn list_mailboxes(
        &self,
        caller: &Caller,
        page: &PageRequest,
    ) -> Result<Mailboxes, Error> {
        self.operator(caller)?;
        let (size, after) = page.read(Listing::Mailboxes)?;
        let mut mailboxes = self.store.mailbox_stats().await?;
        mailboxes.sort_by(|a, b| a.mailbox.cmp(&b.mailbox));
        let key = |m: &MailboxStats| m.mailbox.as_bytes().to_vec();
        Ok(Mailboxes {
            mailboxes: page_sorted(Listing::Mailboxes, mailboxes, key, after.as_deref(), size),
            now_ms: self.clock.now_ms(),
            mesh: self.mesh_mailboxes()?,
        })
    }

    /// Every MESH-reached organisation's MESH mailbox and its deliveries
    /// waiting for a MESH acknowledgement.
    fn mesh_mailboxes(&self) -> Result<std::collections::BTreeMap<String, (String, u64)>, Error> {
        let mut mesh: std::collections::BTreeMap<String, (String, u64)> = self
            .registry
            .read()
            .iter()
            .filter_map(|o| Some((o.ods.as_str().to_owned(), (o.mesh_mailbox.clone()?, 0))))
            .collect();
        for r in self.store.mesh_records()? {
            if r.state == crate::store::MeshState::Sent
                && let Some(entry) = mesh.get_mut(&r.mailbox)
            {
                entry.1 += 1;
            }
        }
        Ok(mesh)
    }

    fn info(&self, d: &DeliveryRecord, now: i64) -> Result<DeliveryInfo, Error> {
        let h = self.store.handover(d.handover_id)?;
        Ok(DeliveryInfo {
            record: d.clone(),
            sender: h.as_ref().map(|h| h.sender.clone()).unwrap_or_default(),
            event: h.map(|h| h.event),
            overdue: d.is_overdue(now),
        })
    }

    /// A page of delivery rows (fetched one beyond `size`) as operators see
    /// them. Each row shown tells the operator something about a patient
    /// (a release waiting, what PDS said of them, a delivery that failed),
    /// so each handover shown is on its patient's audit trail before the
    /// page is returned, and the page is refused if that fails.
    async fn info_page(
        &self,
        actor: String,
        listing: Listing,
        rows: Vec<(Vec<u8>, DeliveryRecord)>,
        size: usize,
    ) -> Result<Page<DeliveryInfo>, Error> {
        let now = self.clock.now_ms();
        let rows = rows
            .into_iter()
            .map(|(k, d)| Ok((k, self.info(&d, now)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let page = page_of(listing, rows, size);
        let action = match listing {
            Listing::Parked => "list_parked",
            _ => "list_quarantine",
        };
        let shown: std::collections::BTreeMap<u64, &str> = page
            .items
            .iter()
            .map(|i| (i.record.handover_id, i.record.patient_key.as_str()))
            .collect();
        futures_util::future::try_join_all(shown.into_iter().map(|(handover, patient)| {
            self.store.record(AuditEvent {
                actor: actor.clone(),
                action,
                handover_id: Some(handover),
                patient_key: Some(patient.to_owned()),
                outcome: "ok: listed".into(),
                ..AuditEvent::default()
            })
        }))
        .await?;
        Ok(page)
    }

    /// Quarantined deliveries, of one mailbox or all.
    ///
    /// # Errors
    /// Refusals for non-operators, and store failures.
    pub async fn list_quarantine(
        &self,
        caller: &Caller,
        mailbox: Option<String>,
        page: &PageRequest,
    ) -> Result<Page<DeliveryInfo>, Error> {
        let actor = self.operator(caller)?;
        let (size, after) = page.read(Listing::Quarantine)?;
        // A cursor of another mailbox's listing is another call's token.
        if let (Some(m), Some(cursor)) = (&mailbox, &after)
            && !cursor.starts_with(&crate::store::records::mailbox_prefix(m))
        {
            return Err(Error::invalid(
                "page_token",
                "not a token this call gave: it lists another mailbox",
            ));
        }
        let rows = self
            .store
            .quarantined_page(mailbox.as_deref(), after.as_deref(), size + 1)?;
        self.info_page(actor, Listing::Quarantine, rows, size).await
    }

    /// Deliveries parked in a holding mailbox: releases waiting for a GP
    /// (`@parked`, first), then treatment copies held for want of a service
    /// in the release area (`@parked-mental-health`,
    /// `@parked-substance-misuse`); each names its holding mailbox.
    ///
    /// # Errors
    /// Refusals for non-operators, and store failures.
    pub async fn list_parked(
        &self,
        caller: &Caller,
        page: &PageRequest,
    ) -> Result<Page<DeliveryInfo>, Error> {
        let actor = self.operator(caller)?;
        let (size, after) = page.read(Listing::Parked)?;
        // The cursor names the holding mailbox the last page ended in.
        let holding = [
            PARKED_MAILBOX,
            PARKED_MENTAL_HEALTH_MAILBOX,
            PARKED_SUBSTANCE_MISUSE_MAILBOX,
        ];
        let resume = match after.as_deref() {
            None => 0,
            Some(cursor) => crate::store::records::split_mailbox_key(cursor)
                .and_then(|(m, _)| holding.iter().position(|h| *h == m))
                .ok_or_else(|| Error::invalid("page_token", "not a token of this listing"))?,
        };
        let mut rows = Vec::new();
        for (i, mailbox) in holding.iter().enumerate().skip(resume) {
            if rows.len() > size {
                break;
            }
            let from = after.as_deref().filter(|_| i == resume);
            rows.extend(
                self.store
                    .parked_page(mailbox, from, size + 1 - rows.len())?,
            );
        }
        self.info_page(actor, Listing::Parked, rows, size).await
    }

    /// Submits refused because an identifier was linked to another patient.
    ///
    /// # Errors
    /// Refusals for non-operators, and store failures.
    pub async fn list_identity_conflicts(
        &self,
        caller: &Caller,
        page: &PageRequest,
    ) -> Result<Page<IdentityConflict>, Error> {
        self.operator(caller)?;
        let (size, before) = page.read(Listing::Conflicts)?;
        let rows = self
            .store
            .identity_conflicts_page(before.as_deref(), size + 1)?;
        Ok(page_of(Listing::Conflicts, rows, size))
    }

    /// Puts quarantined deliveries back in their queues.
    ///
    /// # Errors
    /// Refusals (non-operators, too many ids, neither or both targets) and
    /// store failures.
    pub async fn redrive(
        &self,
        caller: &Caller,
        target: Decoded<RedriveTarget>,
    ) -> Result<Vec<(u64, RedriveOutcome)>, Error> {
        let actor = self.operator(caller)?;
        let ids = match target? {
            RedriveTarget::Deliveries(ids) if ids.len() <= MAX_LIST => ids,
            RedriveTarget::Deliveries(_) => {
                return Err(Error::invalid(
                    "deliveries.ids",
                    format!("at most {MAX_LIST} at a time"),
                ));
            }
            RedriveTarget::Mailbox(mailbox) => self
                .store
                .quarantined(Some(&mailbox), MAX_LIST)?
                .iter()
                .map(|d| d.id)
                .collect(),
        };
        let results = self.store.redrive(&actor, ids).await?;
        tracing::info!(deliveries = results.len(), "redrive");
        Ok(results)
    }

    /// An operator claims a patient's parked releases for a practice, with a
    /// reason on record first: the way out for a practice locked out by
    /// failed claims (operators are not limited).
    ///
    /// # Errors
    /// Refusals (non-operators, field violations, nothing to claim) and
    /// store failures.
    pub async fn claim_parked(
        &self,
        caller: &Caller,
        cmd: ClaimParkedCommand,
    ) -> Result<Vec<Claimed>, Error> {
        let actor = self.operator(caller)?;
        let mut v = ValidationErrors::default();
        check_reason(&cmd.reason, &mut v);
        let practice = self.claiming_practice(&cmd.practice, &mut v);
        let (patient, dob) = claimant(cmd.patient, "patient", v)?;
        let Some(practice) = practice else {
            return Err(Error::invalid("practice", "required"));
        };
        // The operator's reason is on record before anything moves (fail
        // closed), on the trail of the patient the identifier resolves to
        // (a prison number's own hash is no patient's once linked). What the
        // claim then did is audited at each release it moved or refused.
        let patient_key = self.resolved_patient(&patient)?;
        self.store
            .record(AuditEvent {
                actor: actor.clone(),
                action: "claim_parked",
                patient_key: Some(patient_key),
                outcome: format!(
                    "requested: operator claim for {practice}: {}",
                    cmd.reason.trim()
                ),
                ..AuditEvent::default()
            })
            .await?;
        self.claim_patient(
            &actor,
            &patient,
            &dob,
            (
                practice.as_str(),
                "an operator's claim, its reason recorded before",
            ),
        )
        .await
    }

    /// The practice an operator claims for: an active GP practice.
    fn claiming_practice(&self, practice: &str, v: &mut ValidationErrors) -> Option<OdsCode> {
        match practice.parse::<OdsCode>() {
            Ok(code) => match self.registry.get(&code) {
                Some(org) if org.active && org.kind == OrgKind::GpPractice => Some(code),
                Some(_) => {
                    v.add("practice", format!("{code} is not an active GP practice"));
                    None
                }
                None => {
                    v.add("practice", "no registered organisation has this ODS code");
                    None
                }
            },
            Err(e) => {
                v.add("practice", e.to_string());
                None
            }
        }
    }

    /// The registry.
    ///
    /// # Errors
    /// Refusals for non-operators.
    pub async fn list_organisations(
        &self,
        caller: &Caller,
        page: &PageRequest,
    ) -> Result<Page<Organisation>, Error> {
        self.operator(caller)?;
        let (size, after) = page.read(Listing::Organisations)?;
        let mut orgs: Vec<Organisation> = self.registry.read().iter().cloned().collect();
        orgs.sort_by(|a, b| a.ods.as_str().cmp(b.ods.as_str()));
        let key = |o: &Organisation| o.ods.as_str().as_bytes().to_vec();
        Ok(page_sorted(
            Listing::Organisations,
            orgs,
            key,
            after.as_deref(),
            size,
        ))
    }

    /// Adds or replaces an organisation.
    ///
    /// # Errors
    /// Refusals (non-operators, field violations) and store failures.
    pub async fn put_organisation(
        &self,
        caller: &Caller,
        org: Decoded<Organisation>,
    ) -> Result<Organisation, Error> {
        let actor = self.operator(caller)?;
        let org = org?;
        let _one_at_a_time = self.registry_changes.lock().await;
        if let Some(mailbox) = &org.mesh_mailbox {
            let taken = self
                .registry
                .read()
                .by_mesh_mailbox(mailbox)
                .map(|o| o.ods.clone());
            if let Some(other) = taken.filter(|other| *other != org.ods) {
                return Err(Error::invalid(
                    "organisation.mesh_mailbox",
                    format!(
                        "already the MESH mailbox of {other}: one mailbox names one organisation"
                    ),
                ));
            }
        }
        self.save_locked(&actor, org).await
    }

    /// Enables or disables an organisation.
    ///
    /// # Errors
    /// Refusals (non-operators, a malformed code), an unknown code
    /// ([`Error::UnknownOrganisation`]) and store failures.
    pub async fn set_organisation_active(
        &self,
        caller: &Caller,
        ods_code: &str,
        active: bool,
    ) -> Result<Organisation, Error> {
        let actor = self.operator(caller)?;
        let code = ods_code
            .parse::<OdsCode>()
            .map_err(|e| Error::invalid("ods_code", e.to_string()))?;
        let _one_at_a_time = self.registry_changes.lock().await;
        let Some(mut org) = self.registry.get(&code) else {
            return Err(Error::UnknownOrganisation);
        };
        org.active = active;
        self.save_locked(&actor, org).await
    }

    /// Makes the change durable (and audited) first, then visible.
    async fn save_locked(&self, actor: &str, org: Organisation) -> Result<Organisation, Error> {
        let record = serde_json::to_vec(&org).expect("organisations serialise");
        self.store
            .put_registry_record(actor, org.ods.as_str(), record)
            .await?;
        tracing::info!(ods = %org.ods, kind = org.kind.as_str(), active = org.active, "registry changed");
        self.registry.put(org.clone());
        // Tasks that act per organisation (the MESH edge) look again.
        self.store.registry_signal().notify_waiters();
        // A service registered (or enabled, or a prison given a region) may
        // now serve copies held for want of one: routed at once, not at the
        // next periodic pass. The change itself stands either way.
        if let Err(e) = self.route_held_copies(actor).await {
            tracing::error!(error = %e, "routing held treatment copies failed; retried periodically");
        }
        Ok(org)
    }

    /// Retention figures and policy.
    ///
    /// # Errors
    /// Refusals for non-operators, and store failures.
    pub async fn retention_status(&self, caller: &Caller) -> Result<RetentionStatus, Error> {
        self.operator(caller)?;
        let stats = self.store.retention_stats().await?;
        Ok(RetentionStatus {
            stats,
            policy: self.store.retention_policy().clone(),
            now_ms: self.clock.now_ms(),
        })
    }
}

/// Eight bytes that name an audit query's subject in its page tokens.
fn trail_scope(handover: Option<u64>, patient: Option<&str>) -> [u8; 8] {
    use sha2::Digest;
    let subject = format!("{handover:?}|{patient:?}");
    let digest = sha2::Sha256::digest(subject.as_bytes());
    let mut scope = [0u8; 8];
    scope.copy_from_slice(&digest[..8]);
    scope
}

/// Audit actions that read every record the store holds (no patient of
/// their own): on the trail of every patient held then.
/// An export opens every payload to check it; so does an import into
/// PostgreSQL, whose entry follows the imported trail.
const WHOLE_STORE_READS: &[&str] = &["store_export", "store_import"];

impl Gateway {
    /// The patient handover `id` was about, as its audit trail names it.
    async fn patient_on_trail_of(&self, id: u64) -> Result<Option<String>, Error> {
        let store = self.store.clone();
        let entries = tokio::task::spawn_blocking(move || store.audit_entries())
            .await
            .map_err(|e| {
                Error::Store(StoreError::Unavailable(format!("audit reader failed: {e}")))
            })??;
        Ok(entries
            .into_iter()
            .find(|e| e.handover_id == Some(id) && e.patient_key.is_some())
            .and_then(|e| e.patient_key))
    }
}

/// The audit trail and the break-glass read: both are themselves accesses
/// to a patient's record, so both are audited before anything is read.
impl Gateway {
    /// The audit entries about one handover or one patient (across every
    /// identifier linked to them).
    ///
    /// # Errors
    /// Refusals (non-operators, field violations) and store failures; the
    /// query is refused if it cannot be audited.
    pub async fn audit_trail(
        &self,
        caller: &Caller,
        subject: Option<AuditSubject>,
        reason: &str,
        page: &PageRequest,
    ) -> Result<AuditTrail, Error> {
        let actor = self.operator(caller)?;
        let mut v = ValidationErrors::default();
        check_reason(reason, &mut v);
        let filter = self.audit_filter(subject, &mut v);
        let Some((handover, patient)) = filter.filter(|_| v.0.is_empty()) else {
            return Err(v.into());
        };
        let (size, after) = page.read(Listing::Audit)?;
        // One patient across identifiers: every key linked or merged into it.
        let patient_keys = match &patient {
            Some(identifier) => self.store.patient_keys(identifier)?,
            None => Vec::new(),
        };
        // The query is itself an access to the patient's record: audited
        // first, on that patient's trail (a query by handover too), and
        // refused if that fails (fail closed).
        let queried = match (handover, patient_keys.first()) {
            (_, Some(key)) => Some(key.clone()),
            (Some(id), None) => match self.store.handover(id)?.map(|h| h.patient_key) {
                Some(key) => Some(key),
                // Removed under retention (its trail is kept longer): the
                // trail still names its patient.
                None => self.patient_on_trail_of(id).await?,
            },
            (None, None) => None,
        };
        self.store
            .record(AuditEvent {
                actor,
                action: "audit_query",
                handover_id: handover,
                patient_key: queried,
                outcome: format!("ok: {}", reason.trim()),
                ..AuditEvent::default()
            })
            .await?;
        let store = self.store.clone();
        let (entries, chain_verified) = tokio::task::spawn_blocking(move || {
            let verified = store.verify_audit().is_ok();
            store.audit_entries().map(|e| (e, verified))
        })
        .await
        .map_err(|e| {
            Error::Store(StoreError::Unavailable(format!("audit reader failed: {e}")))
        })??;
        // A token holds its trail's subject and the newest entry of its first
        // page: later pages list no further, or each page's own audit entry
        // (about this subject) would make one more page for ever.
        let scope = trail_scope(handover, patient_keys.first().map(String::as_str));
        let upper = match after.as_deref() {
            None => entries.last().map_or(0, |e| e.seq),
            Some(cursor) if cursor.len() == 24 && cursor[..8] == scope => {
                u64::from_be_bytes(cursor[8..16].try_into().unwrap_or_default())
            }
            Some(_) => {
                return Err(Error::invalid(
                    "page_token",
                    "not a token of this trail: it pages another subject's entries",
                ));
            }
        };
        let own = |e: &AuditEntry| {
            handover.is_some_and(|h| e.handover_id == Some(h))
                || e.patient_key
                    .as_ref()
                    .is_some_and(|p| patient_keys.contains(p))
        };
        // A read of the whole store (an export file) read this record too,
        // once a handover of it was held: from its accepted submit (not a
        // query, a failed claim or this call's own entry).
        let first_own = entries
            .iter()
            .find(|e| {
                own(e)
                    && e.handover_id.is_some()
                    && e.action == "submit"
                    && e.outcome.starts_with("ok")
            })
            .map(|e| e.seq);
        let whole_store = |e: &AuditEntry| {
            WHOLE_STORE_READS.contains(&e.action.as_str())
                && e.outcome.starts_with("ok")
                && e.patient_key.is_none()
                && first_own.is_some_and(|first| e.seq > first)
        };
        let entries = entries
            .into_iter()
            .filter(|e| e.seq <= upper && (own(e) || whole_store(e)));
        let key = |e: &AuditEntry| {
            [scope.as_slice(), &upper.to_be_bytes(), &e.seq.to_be_bytes()].concat()
        };
        let entries = page_sorted(Listing::Audit, entries, key, after.as_deref(), size);
        Ok(AuditTrail {
            entries,
            chain_verified,
        })
    }

    /// The handover id or patient key an audit query filters by.
    fn audit_filter(
        &self,
        subject: Option<AuditSubject>,
        v: &mut ValidationErrors,
    ) -> Option<(Option<u64>, Option<String>)> {
        match subject {
            Some(AuditSubject::HandoverId(id)) if id > 0 => Some((Some(id), None)),
            Some(AuditSubject::NhsNumber(n)) => match n.parse::<NhsNumber>() {
                Ok(n) => Some((None, Some(self.keyer.key(Some(&n), None)))),
                Err(e) => {
                    v.add("nhs_number", e.to_string());
                    None
                }
            },
            Some(AuditSubject::PrisonNumber(p)) => match p.parse::<PrisonNumber>() {
                Ok(p) => Some((None, Some(self.keyer.key(None, Some(&p))))),
                Err(e) => {
                    v.add("prison_number", e.to_string());
                    None
                }
            },
            _ => {
                v.add(
                    "subject",
                    "required: a handover_id, an nhs_number or a prison_number",
                );
                None
            }
        }
    }

    /// An operator reads a handover's clinical content, with a stated
    /// reason: audited before anything is read or returned (fail closed).
    ///
    /// # Errors
    /// Refusals (non-operators, field violations, an unknown, removed or
    /// shredded handover) and store failures.
    pub async fn break_glass_read(
        &self,
        caller: &Caller,
        handover_id: u64,
        reason: &str,
    ) -> Result<BreakGlassRead, Error> {
        let actor = self.operator(caller)?;
        let mut v = ValidationErrors::default();
        if handover_id == 0 {
            v.add("handover_id", "required");
        }
        super::free_text::check_reason("reason", reason, 20, &mut v);
        v.into_result()?;
        let Some(handover) = self.store.handover(handover_id)? else {
            let error = match self.store.tombstone(handover_id)? {
                Some(t) => StoreError::Removed {
                    removed_at_ms: t.removed_at_ms,
                },
                None => StoreError::UnknownHandover,
            };
            // An operator asking for clinical content by id is on the trail
            // under that id, whether or not it is there (probing ids, or
            // asking for one removed under retention).
            self.store
                .record(AuditEvent {
                    actor,
                    action: "break_glass_read",
                    handover_id: Some(handover_id),
                    outcome: format!("refused: {error}: {}", reason.trim()),
                    ..AuditEvent::default()
                })
                .await?;
            return Err(Error::Store(error));
        };
        let refusal = handover
            .shredded_at_ms
            .map(|shredded_at_ms| StoreError::Shredded { shredded_at_ms });
        // Nothing clinical is read or returned when shredded; the attempt is still audited.
        self.store
            .record(AuditEvent {
                actor,
                action: "break_glass_read",
                handover_id: Some(handover.id),
                patient_key: Some(handover.patient_key.clone()),
                outcome: match &refusal {
                    Some(error) => format!("refused: {error}"),
                    None => format!("ok: {}", reason.trim()),
                },
                ..AuditEvent::default()
            })
            .await?;
        if let Some(error) = refusal {
            return Err(Error::Store(error));
        }
        tracing::warn!(
            handover_id = handover.id,
            "break-glass read of clinical content by an operator"
        );
        let (patient, summary) = self.read_stored(&handover).await?;
        Ok(BreakGlassRead {
            handover,
            patient,
            summary,
        })
    }
}
