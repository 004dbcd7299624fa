//! The operator service: queues at a glance, quarantine and redrive, parked
//! releases, the registry, and the audit trail. Operator certificates only;
//! payload-free (no clinical content, no patient identifiers in clear).

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::instrument;

use super::error::ApiError;
use super::handover::{Caller, Gateway};
use super::pb;
use super::wire::{self, Violations};
use crate::audit::AuditEvent;
use crate::clinical::{NhsNumber, OdsCode, PrisonNumber};
use crate::journey::{Format, OrgKind, Organisation};
use crate::store::{DeliveryRecord, RedriveOutcome};

/// Most rows one listing returns.
const MAX_LIST: usize = 1_000;

/// The tonic operator service over a shared [`Gateway`].
#[derive(Clone)]
pub struct OperatorGrpc {
    gateway: Arc<Gateway>,
    /// Registry changes are made one at a time (store first, then memory).
    registry_changes: Arc<tokio::sync::Mutex<()>>,
}

impl OperatorGrpc {
    /// A service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self {
            gateway,
            registry_changes: Arc::default(),
        }
    }

    /// The operator's certificate identity, or a refusal for anyone else.
    fn operator<T>(&self, req: &Request<T>) -> Result<String, ApiError> {
        match self.gateway.caller(req)? {
            (Caller::Operator, actor) => Ok(actor),
            (Caller::Org(org), _) => Err(ApiError::PermissionDenied(format!(
                "operator calls need an operator certificate; {} is a {}",
                org.ods,
                org.kind.as_str()
            ))),
        }
    }

    fn info(&self, d: &DeliveryRecord, now: i64) -> Result<pb::DeliveryInfo, ApiError> {
        let h = self.gateway.store.handover(d.handover_id)?;
        Ok(pb::DeliveryInfo {
            delivery_id: d.id,
            handover_id: d.handover_id,
            mailbox: d.mailbox.clone(),
            sender: h.as_ref().map(|h| h.sender.clone()).unwrap_or_default(),
            event: h.map_or(0, |h| wire::event_to_wire(h.event).into()),
            state: wire::state_to_wire(d.state).into(),
            attempts: d.attempt,
            urgent: d.urgent,
            queued_at: Some(wire::timestamp(d.queued_at_ms)),
            due_at: d.due_ms.map(wire::timestamp),
            overdue: d.is_overdue(now),
            reason: d.reason.clone().unwrap_or_default(),
            quarantined_at: d.quarantined_at_ms.map(wire::timestamp),
        })
    }

    async fn list_mailboxes(
        &self,
        req: Request<pb::ListMailboxesRequest>,
    ) -> Result<pb::ListMailboxesResponse, ApiError> {
        self.operator(&req)?;
        let pb::ListMailboxesRequest {} = req.into_inner();
        let stats = self.gateway.store.mailbox_stats().await?;
        Ok(pb::ListMailboxesResponse {
            mailboxes: stats
                .into_iter()
                .map(|m| pb::MailboxStats {
                    mailbox: m.mailbox,
                    depth: m.depth,
                    leased: m.leased,
                    urgent: m.urgent,
                    overdue: m.overdue,
                    quarantined: m.quarantined,
                    oldest_age_ms: m.oldest_age_ms.map_or(0, |a| u64::try_from(a).unwrap_or(0)),
                })
                .collect(),
            at: Some(wire::timestamp(self.gateway.clock.now_ms())),
        })
    }

    async fn list_quarantine(
        &self,
        req: Request<pb::ListQuarantineRequest>,
    ) -> Result<pb::ListQuarantineResponse, ApiError> {
        self.operator(&req)?;
        let pb::ListQuarantineRequest { mailbox, limit } = req.into_inner();
        let limit = limit_of(limit);
        let mailbox = (!mailbox.is_empty()).then_some(mailbox);
        let now = self.gateway.clock.now_ms();
        let records = self.gateway.store.quarantined(mailbox.as_deref(), limit)?;
        Ok(pb::ListQuarantineResponse {
            deliveries: records
                .iter()
                .map(|d| self.info(d, now))
                .collect::<Result<_, _>>()?,
        })
    }

    async fn redrive(
        &self,
        req: Request<pb::RedriveRequest>,
    ) -> Result<pb::RedriveResponse, ApiError> {
        let actor = self.operator(&req)?;
        let pb::RedriveRequest {
            delivery_ids,
            mailbox,
        } = req.into_inner();
        let ids = match (delivery_ids.is_empty(), mailbox.is_empty()) {
            (false, true) if delivery_ids.len() <= MAX_LIST => delivery_ids,
            (false, true) => {
                return Err(ApiError::invalid(
                    "delivery_ids",
                    format!("at most {MAX_LIST} at a time"),
                ));
            }
            (true, false) => self
                .gateway
                .store
                .quarantined(Some(&mailbox), MAX_LIST)?
                .iter()
                .map(|d| d.id)
                .collect(),
            _ => {
                return Err(ApiError::invalid(
                    "delivery_ids",
                    "name the deliveries to redrive, or a mailbox (not both)",
                ));
            }
        };
        let results = self.gateway.store.redrive(&actor, ids).await?;
        let mut out = Vec::with_capacity(results.len());
        for (id, outcome) in results {
            let (name, state) = match outcome {
                RedriveOutcome::Requeued => ("REQUEUED", pb::DeliveryState::Queued),
                RedriveOutcome::NotQuarantined(s) => ("NOT_QUARANTINED", wire::state_to_wire(s)),
                RedriveOutcome::Unknown => ("UNKNOWN", pb::DeliveryState::Unspecified),
            };
            out.push(pb::RedriveResult {
                delivery_id: id,
                outcome: name.into(),
                state: state.into(),
            });
        }
        tracing::info!(deliveries = out.len(), "redrive");
        Ok(pb::RedriveResponse { results: out })
    }

    async fn list_parked(
        &self,
        req: Request<pb::ListParkedRequest>,
    ) -> Result<pb::ListParkedResponse, ApiError> {
        self.operator(&req)?;
        let pb::ListParkedRequest { limit } = req.into_inner();
        let now = self.gateway.clock.now_ms();
        let records = self.gateway.store.parked(limit_of(limit))?;
        Ok(pb::ListParkedResponse {
            deliveries: records
                .iter()
                .map(|d| self.info(d, now))
                .collect::<Result<_, _>>()?,
            pds_findings: records.iter().filter_map(pds_finding).collect(),
        })
    }

    async fn list_identity_conflicts(
        &self,
        req: Request<pb::ListIdentityConflictsRequest>,
    ) -> Result<pb::ListIdentityConflictsResponse, ApiError> {
        self.operator(&req)?;
        let pb::ListIdentityConflictsRequest { limit } = req.into_inner();
        let conflicts = self.gateway.store.identity_conflicts(limit_of(limit))?;
        Ok(pb::ListIdentityConflictsResponse {
            conflicts: conflicts
                .into_iter()
                .map(|c| pb::IdentityConflict {
                    at: Some(wire::timestamp(c.at_ms)),
                    sender: c.sender,
                    message_id: c.message_id,
                    field: c.field,
                })
                .collect(),
        })
    }

    async fn claim_parked(
        &self,
        req: Request<pb::ClaimParkedRequest>,
    ) -> Result<pb::ClaimParkedResponse, ApiError> {
        let actor = self.operator(&req)?;
        let pb::ClaimParkedRequest {
            patient,
            practice,
            reason,
        } = req.into_inner();
        let mut v = Violations::default();
        check_reason(&reason, &mut v);
        let practice = match practice.parse::<OdsCode>() {
            Ok(code) => match self.gateway.registry.get(&code) {
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
        };
        let (patient, dob) = super::handover::claimant(patient, "patient", v)?;
        let Some(practice) = practice else {
            return Err(ApiError::invalid("practice", "required"));
        };
        // The way out for a practice locked out by failed claims: the
        // operator's reason is on record before anything moves (fail closed).
        let keyer = &self.gateway.keyer;
        self.gateway
            .store
            .record(AuditEvent {
                actor: actor.clone(),
                action: "claim_parked",
                patient_key: Some(
                    keyer.key(patient.nhs_number.as_ref(), patient.prison_number.as_ref()),
                ),
                outcome: format!("ok: operator claim for {practice}: {}", reason.trim()),
                ..AuditEvent::default()
            })
            .await?;
        let pb::ClaimResponse { claimed } = self
            .gateway
            .claim_patient(&actor, &patient, &dob, practice.as_str())
            .await?;
        Ok(pb::ClaimParkedResponse { claimed })
    }

    async fn list_organisations(
        &self,
        req: Request<pb::ListOrganisationsRequest>,
    ) -> Result<pb::ListOrganisationsResponse, ApiError> {
        self.operator(&req)?;
        let pb::ListOrganisationsRequest {} = req.into_inner();
        let registry = self.gateway.registry.read();
        Ok(pb::ListOrganisationsResponse {
            organisations: registry.iter().map(org_to_wire).collect(),
        })
    }

    async fn put_organisation(
        &self,
        req: Request<pb::PutOrganisationRequest>,
    ) -> Result<pb::PutOrganisationResponse, ApiError> {
        let actor = self.operator(&req)?;
        let pb::PutOrganisationRequest { organisation } = req.into_inner();
        let Some(org) = organisation else {
            return Err(ApiError::invalid("organisation", "required"));
        };
        let org = org_from_wire(org)?;
        Ok(pb::PutOrganisationResponse {
            organisation: Some(self.save(&actor, org).await?),
        })
    }

    async fn set_organisation_active(
        &self,
        req: Request<pb::SetOrganisationActiveRequest>,
    ) -> Result<pb::SetOrganisationActiveResponse, ApiError> {
        let actor = self.operator(&req)?;
        let pb::SetOrganisationActiveRequest { ods_code, active } = req.into_inner();
        let code = ods_code
            .parse::<OdsCode>()
            .map_err(|e| ApiError::invalid("ods_code", e.to_string()))?;
        let _one_at_a_time = self.registry_changes.lock().await;
        let Some(mut org) = self.gateway.registry.get(&code) else {
            return Err(ApiError::invalid(
                "ods_code",
                "no registered organisation has this ODS code",
            ));
        };
        org.active = active;
        Ok(pb::SetOrganisationActiveResponse {
            organisation: Some(self.save_locked(&actor, org).await?),
        })
    }

    async fn save(&self, actor: &str, org: Organisation) -> Result<pb::Organisation, ApiError> {
        let _one_at_a_time = self.registry_changes.lock().await;
        self.save_locked(actor, org).await
    }

    /// Makes the change durable (and audited) first, then visible.
    async fn save_locked(
        &self,
        actor: &str,
        org: Organisation,
    ) -> Result<pb::Organisation, ApiError> {
        let record = serde_json::to_vec(&org).expect("organisations serialise");
        self.gateway
            .store
            .put_registry_record(actor, org.ods.as_str(), record)
            .await?;
        tracing::info!(ods = %org.ods, kind = org.kind.as_str(), active = org.active, "registry changed");
        let wire = org_to_wire(&org);
        self.gateway.registry.put(org);
        Ok(wire)
    }

    async fn audit_trail(
        &self,
        req: Request<pb::AuditTrailRequest>,
    ) -> Result<pb::AuditTrailResponse, ApiError> {
        use pb::audit_trail_request::Subject;
        let actor = self.operator(&req)?;
        let pb::AuditTrailRequest { subject, reason } = req.into_inner();
        let mut v = Violations::default();
        check_reason(&reason, &mut v);
        let keyer = &self.gateway.keyer;
        let filter = match subject {
            Some(Subject::HandoverId(id)) if id > 0 => Some((Some(id), None)),
            Some(Subject::NhsNumber(n)) => match n.parse::<NhsNumber>() {
                Ok(n) => Some((None, Some(keyer.key(Some(&n), None)))),
                Err(e) => {
                    v.add("nhs_number", e.to_string());
                    None
                }
            },
            Some(Subject::PrisonNumber(p)) => match p.parse::<PrisonNumber>() {
                Ok(p) => Some((None, Some(keyer.key(None, Some(&p))))),
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
        };
        let Some((handover, patient)) = filter.filter(|_| v.0.is_empty()) else {
            return Err(ApiError::Invalid(v.0));
        };
        // One patient across identifiers: every key linked or merged into it.
        let patient_keys = match &patient {
            Some(identifier) => self.gateway.store.patient_keys(identifier)?,
            None => Vec::new(),
        };
        // The query is itself an access to the patient's record: audited
        // first, and refused if that fails (fail closed).
        self.gateway
            .store
            .record(AuditEvent {
                actor,
                action: "audit_query",
                handover_id: handover,
                patient_key: patient_keys.first().cloned(),
                outcome: format!("ok: {}", reason.trim()),
                ..AuditEvent::default()
            })
            .await?;
        let store = self.gateway.store.clone();
        let (entries, verified) = tokio::task::spawn_blocking(move || {
            let verified = store.verify_audit().is_ok();
            store.audit_entries().map(|e| (e, verified))
        })
        .await
        .map_err(|e| {
            ApiError::Store(crate::store::StoreError::Unavailable(format!(
                "audit reader failed: {e}"
            )))
        })??;
        Ok(pb::AuditTrailResponse {
            entries: entries
                .into_iter()
                .filter(|e| {
                    handover.is_some_and(|h| e.handover_id == Some(h))
                        || e.patient_key
                            .as_ref()
                            .is_some_and(|p| patient_keys.contains(p))
                })
                .map(|e| pb::AuditEntry {
                    seq: e.seq,
                    at: Some(wire::timestamp(e.at_ms)),
                    actor: e.actor,
                    action: e.action,
                    handover_id: e.handover_id.unwrap_or(0),
                    delivery_id: e.delivery_id.unwrap_or(0),
                    outcome: e.outcome,
                    hash: e.hash,
                })
                .collect(),
            chain_verified: verified,
        })
    }
}

impl OperatorGrpc {
    async fn retention_status(
        &self,
        req: Request<pb::RetentionStatusRequest>,
    ) -> Result<pb::RetentionStatusResponse, ApiError> {
        self.operator(&req)?;
        let pb::RetentionStatusRequest {} = req.into_inner();
        let s = self.gateway.store.retention_stats().await?;
        let p = self.gateway.store.retention_policy();
        let seconds = |ms: i64| u64::try_from(ms / 1_000).unwrap_or(0);
        Ok(pb::RetentionStatusResponse {
            payloads_held: s.payloads_held,
            payloads_in_grace: s.payloads_in_grace,
            payloads_shredded: s.payloads_shredded,
            metadata_expiring: s.metadata_expiring,
            metadata_removed: s.metadata_removed,
            tombstones: s.tombstones,
            key_epochs: s.key_epochs,
            next_due_at: s.next_due_ms.map(wire::timestamp),
            payload_grace_seconds: seconds(p.payload_grace_ms),
            metadata_seconds: seconds(p.metadata_ms),
            tombstone_seconds: seconds(p.tombstone_ms),
            key_epoch_seconds: seconds(p.key_epoch_ms),
            at: Some(wire::timestamp(self.gateway.clock.now_ms())),
            audit_entries_held: s.audit_entries_held,
            audit_entries_removed: s.audit_entries_removed,
            identity_records_held: s.identity_records_held,
            identity_records_removed: s.identity_records_removed,
            audit_seconds: seconds(p.audit_ms),
        })
    }

    async fn break_glass_read(
        &self,
        req: Request<pb::BreakGlassReadRequest>,
    ) -> Result<pb::BreakGlassReadResponse, ApiError> {
        let actor = self.operator(&req)?;
        let pb::BreakGlassReadRequest {
            handover_id,
            reason,
        } = req.into_inner();
        let mut v = Violations::default();
        if handover_id == 0 {
            v.add("handover_id", "required");
        }
        super::free_text::check_reason("reason", &reason, 20, &mut v);
        if !v.0.is_empty() {
            return Err(ApiError::Invalid(v.0));
        }
        let Some(handover) = self.gateway.store.handover(handover_id)? else {
            return Err(ApiError::Store(
                match self.gateway.store.tombstone(handover_id)? {
                    Some(t) => crate::store::StoreError::Removed {
                        removed_at_ms: t.removed_at_ms,
                    },
                    None => crate::store::StoreError::UnknownHandover,
                },
            ));
        };
        if let Some(shredded_at_ms) = handover.shredded_at_ms {
            // Nothing clinical is read or returned; the attempt is still audited.
            let error = crate::store::StoreError::Shredded { shredded_at_ms };
            self.gateway
                .store
                .record(AuditEvent {
                    actor,
                    action: "break_glass_read",
                    handover_id: Some(handover.id),
                    patient_key: Some(handover.patient_key.clone()),
                    outcome: format!("refused: {error}"),
                    ..AuditEvent::default()
                })
                .await?;
            return Err(ApiError::Store(error));
        }
        // Audited before anything is read or returned (fail closed).
        self.gateway
            .store
            .record(AuditEvent {
                actor,
                action: "break_glass_read",
                handover_id: Some(handover.id),
                patient_key: Some(handover.patient_key.clone()),
                outcome: format!("ok: {}", reason.trim()),
                ..AuditEvent::default()
            })
            .await?;
        tracing::warn!(
            handover_id = handover.id,
            "break-glass read of clinical content by an operator"
        );
        let (patient, summary) = self.gateway.read_stored(&handover).await?;
        Ok(pb::BreakGlassReadResponse {
            handover_id: handover.id,
            sender: handover.sender.clone(),
            event: wire::event_to_wire(handover.event).into(),
            patient: Some(wire::patient_to_wire(&patient)),
            summary: Some(super::summary::to_wire(&summary)),
        })
    }
}

/// What PDS said about a parked release, for operators (a restricted
/// record's practice is never stored, so never shown).
fn pds_finding(d: &DeliveryRecord) -> Option<pb::list_parked_response::PdsFinding> {
    let f = d.pds.as_ref()?;
    Some(pb::list_parked_response::PdsFinding {
        delivery_id: d.id,
        status: f.status.as_str().to_owned(),
        practice: f.practice.clone().unwrap_or_default(),
        reason: f.reason(),
        checked_at: Some(wire::timestamp(f.checked_at_ms)),
        next_check_at: f.next_check_ms.map(wire::timestamp),
    })
}

fn limit_of(limit: u32) -> usize {
    match limit {
        0 => MAX_LIST,
        n => (n as usize).min(MAX_LIST),
    }
}

fn check_reason(reason: &str, v: &mut Violations) {
    super::free_text::check_reason("reason", reason, 1, v);
}

fn format_to_wire(f: Format) -> pb::DocumentFormat {
    match f {
        Format::Native => pb::DocumentFormat::Native,
        Format::Fhir => pb::DocumentFormat::FhirJson,
        Format::Hl7v2 => pb::DocumentFormat::Hl7v2,
    }
}

fn org_to_wire(o: &Organisation) -> pb::Organisation {
    pb::Organisation {
        ods_code: o.ods.as_str().to_owned(),
        kind: match o.kind {
            OrgKind::Prison => pb::OrganisationKind::Prison,
            OrgKind::GpPractice => pb::OrganisationKind::GpPractice,
            OrgKind::Probation => pb::OrganisationKind::Probation,
            OrgKind::Operator => pb::OrganisationKind::Unspecified,
        }
        .into(),
        name: o.name.clone(),
        format: format_to_wire(o.format).into(),
        region: o.region.clone().unwrap_or_default(),
        active: o.active,
    }
}

fn org_from_wire(o: pb::Organisation) -> Result<Organisation, ApiError> {
    let pb::Organisation {
        ods_code,
        kind,
        name,
        format,
        region,
        active,
    } = o;
    let mut v = Violations::default();
    let ods = ods_code
        .parse::<OdsCode>()
        .map_err(|e| v.add("organisation.ods_code", e.to_string()))
        .ok();
    let kind = match pb::OrganisationKind::try_from(kind) {
        Ok(pb::OrganisationKind::Prison) => Some(OrgKind::Prison),
        Ok(pb::OrganisationKind::GpPractice) => Some(OrgKind::GpPractice),
        Ok(pb::OrganisationKind::Probation) => Some(OrgKind::Probation),
        _ => {
            v.add(
                "organisation.kind",
                "required: PRISON, GP_PRACTICE or PROBATION",
            );
            None
        }
    };
    if name.trim().is_empty() || name.len() > 200 {
        v.add("organisation.name", "required: 1 to 200 characters");
    }
    let format = match pb::DocumentFormat::try_from(format) {
        Ok(pb::DocumentFormat::Unspecified | pb::DocumentFormat::Native) => Format::Native,
        Ok(pb::DocumentFormat::FhirJson) => Format::Fhir,
        Ok(pb::DocumentFormat::Hl7v2) => Format::Hl7v2,
        Err(_) => {
            v.add("organisation.format", "unknown document format");
            Format::Native
        }
    };
    if region.len() > 100 {
        v.add("organisation.region", "at most 100 characters");
    }
    match (ods, kind) {
        (Some(ods), Some(kind)) if v.0.is_empty() => Ok(Organisation {
            ods,
            kind,
            name,
            format,
            region: (!region.is_empty()).then_some(region),
            active,
        }),
        _ => Err(ApiError::Invalid(v.0)),
    }
}

/// Runs an operator call; a refusal is logged and audited (fail closed: a
/// refusal that cannot be audited is answered UNAVAILABLE).
macro_rules! operator_call {
    ($self:ident, $req:ident, $method:ident) => {{
        let actor = $req
            .extensions()
            .get::<crate::tls::ConnInfo>()
            .map_or_else(|| "unknown".to_owned(), |i| i.identity.to_string());
        let result = $self.$method($req).await;
        if let Err(e) = &result {
            tracing::info!(code = ?e.code(), error = %e, "operator call refused");
            if let Some(unrecorded) =
                super::handover::audit_refusal(&$self.gateway, actor, stringify!($method), e).await
            {
                return Err(unrecorded);
            }
        }
        result.map(Response::new).map_err(Status::from)
    }};
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for OperatorGrpc {
    #[instrument(name = "retention_status", skip_all)]
    async fn retention_status(
        &self,
        request: Request<pb::RetentionStatusRequest>,
    ) -> Result<Response<pb::RetentionStatusResponse>, Status> {
        operator_call!(self, request, retention_status)
    }

    #[instrument(name = "list_mailboxes", skip_all)]
    async fn list_mailboxes(
        &self,
        request: Request<pb::ListMailboxesRequest>,
    ) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        operator_call!(self, request, list_mailboxes)
    }

    #[instrument(name = "list_quarantine", skip_all)]
    async fn list_quarantine(
        &self,
        request: Request<pb::ListQuarantineRequest>,
    ) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        operator_call!(self, request, list_quarantine)
    }

    #[instrument(name = "redrive", skip_all)]
    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        operator_call!(self, request, redrive)
    }

    #[instrument(name = "list_parked", skip_all)]
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        operator_call!(self, request, list_parked)
    }

    #[instrument(name = "list_identity_conflicts", skip_all)]
    async fn list_identity_conflicts(
        &self,
        request: Request<pb::ListIdentityConflictsRequest>,
    ) -> Result<Response<pb::ListIdentityConflictsResponse>, Status> {
        operator_call!(self, request, list_identity_conflicts)
    }

    #[instrument(name = "claim_parked", skip_all)]
    async fn claim_parked(
        &self,
        request: Request<pb::ClaimParkedRequest>,
    ) -> Result<Response<pb::ClaimParkedResponse>, Status> {
        operator_call!(self, request, claim_parked)
    }

    #[instrument(name = "list_organisations", skip_all)]
    async fn list_organisations(
        &self,
        request: Request<pb::ListOrganisationsRequest>,
    ) -> Result<Response<pb::ListOrganisationsResponse>, Status> {
        operator_call!(self, request, list_organisations)
    }

    #[instrument(name = "put_organisation", skip_all)]
    async fn put_organisation(
        &self,
        request: Request<pb::PutOrganisationRequest>,
    ) -> Result<Response<pb::PutOrganisationResponse>, Status> {
        operator_call!(self, request, put_organisation)
    }

    #[instrument(name = "set_organisation_active", skip_all)]
    async fn set_organisation_active(
        &self,
        request: Request<pb::SetOrganisationActiveRequest>,
    ) -> Result<Response<pb::SetOrganisationActiveResponse>, Status> {
        operator_call!(self, request, set_organisation_active)
    }

    #[instrument(name = "break_glass_read", skip_all)]
    async fn break_glass_read(
        &self,
        request: Request<pb::BreakGlassReadRequest>,
    ) -> Result<Response<pb::BreakGlassReadResponse>, Status> {
        operator_call!(self, request, break_glass_read)
    }

    #[instrument(name = "audit_trail", skip_all)]
    async fn audit_trail(
        &self,
        request: Request<pb::AuditTrailRequest>,
    ) -> Result<Response<pb::AuditTrailResponse>, Status> {
        operator_call!(self, request, audit_trail)
    }
}
