//! The operator service on gRPC: each handler decodes its request, calls
//! the use case in `handover` (operator identities only), and encodes the
//! answer; refusals are logged, audited and mapped in one place.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::field::Empty;
use tracing::instrument;

use super::handover::{answer, answer_of, claimed_to_wire, traced};
use super::pb;
use super::wire::{self, Violations};
use crate::clinical::OdsCode;
use crate::handover::{
    AuditSubject, ClaimParkedCommand, Continuity, ContinuityRow, ContinuityWindow, DeliveryInfo,
    Gateway, PageRequest, RedriveTarget, RetentionStatus, Share, Subject,
};
use crate::journey::{Format, OrgKind, Organisation};
use crate::store::{DeliveryRecord, RedriveOutcome};

/// The tonic operator service over a shared [`Gateway`].
#[derive(Clone)]
pub struct OperatorGrpc {
    gateway: Arc<Gateway>,
}

impl OperatorGrpc {
    /// A service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

fn info_to_wire(i: DeliveryInfo) -> pb::DeliveryInfo {
    let d = i.record;
    pb::DeliveryInfo {
        delivery_id: d.id,
        handover_id: d.handover_id,
        mailbox: d.mailbox,
        sender: i.sender,
        event: i.event.map_or(0, |e| wire::event_to_wire(e).into()),
        state: wire::state_to_wire(d.state).into(),
        attempts: d.attempt,
        urgent: d.urgent,
        queued_at: Some(wire::timestamp(d.queued_at_ms)),
        due_at: d.due_ms.map(wire::timestamp),
        overdue: i.overdue,
        reason: d.reason.unwrap_or_default(),
        quarantined_at: d.quarantined_at_ms.map(wire::timestamp),
    }
}

fn infos_to_wire(infos: Vec<DeliveryInfo>) -> Vec<pb::DeliveryInfo> {
    infos.into_iter().map(info_to_wire).collect()
}

fn redrive_from_wire(req: pb::RedriveRequest) -> Result<RedriveTarget, Violations> {
    use pb::redrive_request::Target;
    let pb::RedriveRequest { target } = req;
    match target {
        Some(Target::Deliveries(pb::DeliveryIds { ids })) if !ids.is_empty() => {
            Ok(RedriveTarget::Deliveries(ids))
        }
        Some(Target::Deliveries(_)) => Err(Violations::one(
            "deliveries.ids",
            "required: at least one delivery id",
        )),
        Some(Target::Mailbox(mailbox)) if !mailbox.is_empty() => {
            Ok(RedriveTarget::Mailbox(mailbox))
        }
        Some(Target::Mailbox(_)) => Err(Violations::one("mailbox", "required: a mailbox name")),
        None => Err(Violations::one(
            "target",
            "required: the deliveries to redrive, or a mailbox",
        )),
    }
}

fn redrive_to_wire(results: Vec<(u64, RedriveOutcome)>) -> pb::RedriveResponse {
    use pb::RedriveOutcome as Wire;
    let results = results
        .into_iter()
        .map(|(id, outcome)| {
            let (outcome, state) = match outcome {
                RedriveOutcome::Requeued => (Wire::Requeued, pb::DeliveryState::Queued),
                RedriveOutcome::NotQuarantined(s) => (Wire::NotQuarantined, wire::state_to_wire(s)),
                RedriveOutcome::Unknown => (Wire::UnknownDelivery, pb::DeliveryState::Unspecified),
                RedriveOutcome::Outdated => (Wire::Outdated, pb::DeliveryState::Quarantined),
            };
            pb::RedriveResult {
                delivery_id: id,
                outcome: outcome.into(),
                state: state.into(),
            }
        })
        .collect();
    pb::RedriveResponse { results }
}

fn page(page_size: i32, page_token: String) -> PageRequest {
    PageRequest {
        size: page_size,
        token: page_token,
    }
}

fn audit_subject(subject: Option<pb::audit_trail_request::Subject>) -> Option<AuditSubject> {
    use pb::audit_trail_request::Subject;
    match subject? {
        Subject::HandoverId(id) => Some(AuditSubject::HandoverId(id)),
        Subject::NhsNumber(n) => Some(AuditSubject::NhsNumber(n)),
        Subject::PrisonNumber(p) => Some(AuditSubject::PrisonNumber(p)),
    }
}

fn continuity_from_wire(req: pb::GetContinuityRequest) -> Result<ContinuityWindow, Violations> {
    let pb::GetContinuityRequest { from, to, period } = req;
    let mut v = Violations::default();
    let from_ms = wire::timestamp_from_wire(from, "from", &mut v);
    let to_ms = wire::timestamp_from_wire(to, "to", &mut v);
    let period = wire::duration_from_wire(period, "period", &mut v)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    v.into_result().map(|()| ContinuityWindow {
        from_ms,
        to_ms,
        period_ms: period,
    })
}

fn share_to_wire(s: Share) -> pb::ContinuityShare {
    match s {
        Share::Of(numerator, denominator) => pb::ContinuityShare {
            suppressed: false,
            numerator,
            denominator,
        },
        Share::Suppressed => pb::ContinuityShare {
            suppressed: true,
            numerator: 0,
            denominator: 0,
        },
    }
}

fn continuity_to_wire(c: Continuity) -> pb::GetContinuityResponse {
    let Continuity {
        rows,
        now_ms,
        covered_from_ms,
    } = c;
    let row = |r: ContinuityRow| pb::ContinuityRow {
        prison: r.prison,
        period_start: Some(wire::timestamp(r.period_start_ms)),
        period_end: Some(wire::timestamp(r.period_end_ms)),
        releases: r.releases,
        gp_within_deadline: Some(share_to_wire(r.gp_within_deadline)),
        parked_over_three_days: Some(share_to_wire(r.parked_over_three_days)),
        parked_over_seven_days: Some(share_to_wire(r.parked_over_seven_days)),
        median_to_gp: r.median_to_gp_ms.map(wire::duration_ms),
        ost_before_next_dose: Some(share_to_wire(r.ost_before_next_dose)),
        mental_health_within_72h: Some(share_to_wire(r.mental_health_within_72h)),
    };
    pb::GetContinuityResponse {
        rows: rows.into_iter().map(row).collect(),
        at: Some(wire::timestamp(now_ms)),
        covered_from: Some(wire::timestamp(covered_from_ms)),
    }
}

fn retention_to_wire(r: RetentionStatus) -> pb::RetentionStatusResponse {
    let RetentionStatus {
        stats: s,
        policy: p,
        now_ms,
    } = r;
    pb::RetentionStatusResponse {
        payloads_held: s.payloads_held,
        payloads_in_grace: s.payloads_in_grace,
        payloads_shredded: s.payloads_shredded,
        metadata_expiring: s.metadata_expiring,
        metadata_removed: s.metadata_removed,
        tombstones: s.tombstones,
        key_epochs: s.key_epochs,
        next_due_at: s.next_due_ms.map(wire::timestamp),
        at: Some(wire::timestamp(now_ms)),
        payload_grace: Some(wire::duration_ms(p.payload_grace_ms)),
        metadata_period: Some(wire::duration_ms(p.metadata_ms)),
        tombstone_period: Some(wire::duration_ms(p.tombstone_ms)),
        key_epoch: Some(wire::duration_ms(p.key_epoch_ms)),
        audit_period: Some(wire::duration_ms(p.audit_ms)),
        audit_entries_held: s.audit_entries_held,
        audit_entries_removed: s.audit_entries_removed,
        identity_records_held: s.identity_records_held,
        identity_records_removed: s.identity_records_removed,
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
            OrgKind::SubstanceMisuseService => pb::OrganisationKind::SubstanceMisuseService,
            OrgKind::MentalHealthTeam => pb::OrganisationKind::MentalHealthTeam,
            OrgKind::Operator => pb::OrganisationKind::Unspecified,
        }
        .into(),
        name: o.name.clone(),
        format: format_to_wire(o.format).into(),
        region: o.region.clone().unwrap_or_default(),
        active: o.active,
        mesh_mailbox: o.mesh_mailbox.clone().unwrap_or_default(),
    }
}

fn org_from_wire(o: pb::Organisation) -> Result<Organisation, Violations> {
    let pb::Organisation {
        ods_code,
        kind,
        name,
        format,
        region,
        active,
        mesh_mailbox,
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
        Ok(pb::OrganisationKind::SubstanceMisuseService) => Some(OrgKind::SubstanceMisuseService),
        Ok(pb::OrganisationKind::MentalHealthTeam) => Some(OrgKind::MentalHealthTeam),
        _ => {
            v.add(
                "organisation.kind",
                "required: PRISON, GP_PRACTICE, PROBATION, SUBSTANCE_MISUSE_SERVICE or \
                 MENTAL_HEALTH_TEAM",
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
    if !mesh_mailbox.is_empty() && !crate::journey::is_mesh_mailbox_id(&mesh_mailbox) {
        v.add(
            "organisation.mesh_mailbox",
            "a MESH mailbox id: 1 to 20 letters and digits",
        );
    }
    match (ods, kind) {
        (Some(ods), Some(kind)) if v.0.is_empty() => Ok(Organisation {
            ods,
            kind,
            name,
            format,
            region: (!region.is_empty()).then_some(region),
            active,
            mesh_mailbox: (!mesh_mailbox.is_empty()).then(|| mesh_mailbox.to_ascii_uppercase()),
        }),
        _ => Err(v),
    }
}

#[tonic::async_trait]
impl pb::operator_service_server::OperatorService for OperatorGrpc {
    #[instrument(name = "retention_status", skip_all, fields(caller = Empty))]
    async fn retention_status(
        &self,
        request: Request<pb::RetentionStatusRequest>,
    ) -> Result<Response<pb::RetentionStatusResponse>, Status> {
        let caller = traced(&request);
        let pb::RetentionStatusRequest {} = request.into_inner();
        let result = self
            .gateway
            .retention_status(&caller)
            .await
            .map(retention_to_wire);
        answer(&self.gateway, &caller, "retention_status", result).await
    }

    #[instrument(name = "get_continuity", skip_all, fields(caller = Empty))]
    async fn get_continuity(
        &self,
        request: Request<pb::GetContinuityRequest>,
    ) -> Result<Response<pb::GetContinuityResponse>, Status> {
        let caller = traced(&request);
        let window = continuity_from_wire(request.into_inner());
        let result = self
            .gateway
            .continuity(&caller, window)
            .await
            .map(continuity_to_wire);
        answer(&self.gateway, &caller, "get_continuity", result).await
    }

    #[instrument(name = "list_mailboxes", skip_all, fields(caller = Empty))]
    async fn list_mailboxes(
        &self,
        request: Request<pb::ListMailboxesRequest>,
    ) -> Result<Response<pb::ListMailboxesResponse>, Status> {
        let caller = traced(&request);
        let pb::ListMailboxesRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let asked = page(page_size, page_token);
        let result = self.gateway.list_mailboxes(&caller, &asked).await.map(|m| {
            let mesh = m.mesh;
            pb::ListMailboxesResponse {
                next_page_token: m.mailboxes.next_token,
                mailboxes: m
                    .mailboxes
                    .items
                    .into_iter()
                    .map(|m| {
                        let (mesh_mailbox, mesh_awaiting_ack) =
                            mesh.get(&m.mailbox).cloned().unwrap_or_default();
                        pb::MailboxStats {
                            mailbox: m.mailbox,
                            depth: m.depth,
                            leased: m.leased,
                            urgent: m.urgent,
                            overdue: m.overdue,
                            quarantined: m.quarantined,
                            oldest_age: m.oldest_age_ms.map(wire::duration_ms),
                            mesh_mailbox,
                            mesh_awaiting_ack,
                        }
                    })
                    .collect(),
                at: Some(wire::timestamp(m.now_ms)),
            }
        });
        answer(&self.gateway, &caller, "list_mailboxes", result).await
    }

    #[instrument(name = "list_quarantine", skip_all, fields(caller = Empty))]
    async fn list_quarantine(
        &self,
        request: Request<pb::ListQuarantineRequest>,
    ) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        let caller = traced(&request);
        let pb::ListQuarantineRequest {
            mailbox,
            page_size,
            page_token,
        } = request.into_inner();
        let mailbox = (!mailbox.is_empty()).then_some(mailbox);
        let asked = page(page_size, page_token);
        let result = self.gateway.list_quarantine(&caller, mailbox, &asked).await;
        let result = result.map(|d| pb::ListQuarantineResponse {
            deliveries: infos_to_wire(d.items),
            next_page_token: d.next_token,
        });
        answer(&self.gateway, &caller, "list_quarantine", result).await
    }

    #[instrument(name = "redrive", skip_all, fields(caller = Empty))]
    async fn redrive(
        &self,
        request: Request<pb::RedriveRequest>,
    ) -> Result<Response<pb::RedriveResponse>, Status> {
        let caller = traced(&request);
        let target = redrive_from_wire(request.into_inner());
        let result = self
            .gateway
            .redrive(&caller, target)
            .await
            .map(redrive_to_wire);
        answer(&self.gateway, &caller, "redrive", result).await
    }

    #[instrument(name = "list_parked", skip_all, fields(caller = Empty))]
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        let caller = traced(&request);
        let pb::ListParkedRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let result = (self.gateway)
            .list_parked(&caller, &page(page_size, page_token))
            .await;
        let result = result.map(|d| pb::ListParkedResponse {
            pds_findings: d
                .items
                .iter()
                .filter_map(|i| pds_finding(&i.record))
                .collect(),
            deliveries: infos_to_wire(d.items),
            next_page_token: d.next_token,
        });
        answer(&self.gateway, &caller, "list_parked", result).await
    }

    #[instrument(name = "list_identity_conflicts", skip_all, fields(caller = Empty))]
    async fn list_identity_conflicts(
        &self,
        request: Request<pb::ListIdentityConflictsRequest>,
    ) -> Result<Response<pb::ListIdentityConflictsResponse>, Status> {
        let caller = traced(&request);
        let pb::ListIdentityConflictsRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let result = (self.gateway)
            .list_identity_conflicts(&caller, &page(page_size, page_token))
            .await;
        let result = result.map(|c| pb::ListIdentityConflictsResponse {
            next_page_token: c.next_token,
            conflicts: c
                .items
                .into_iter()
                .map(|c| pb::IdentityConflict {
                    at: Some(wire::timestamp(c.at_ms)),
                    sender: c.sender,
                    message_id: c.message_id,
                    field: c.field,
                })
                .collect(),
        });
        answer(&self.gateway, &caller, "list_identity_conflicts", result).await
    }

    #[instrument(name = "claim_parked", skip_all, fields(caller = Empty))]
    async fn claim_parked(
        &self,
        request: Request<pb::ClaimParkedRequest>,
    ) -> Result<Response<pb::ClaimParkedResponse>, Status> {
        let caller = traced(&request);
        let pb::ClaimParkedRequest {
            patient,
            practice,
            reason,
        } = request.into_inner();
        let cmd = ClaimParkedCommand {
            patient: wire::patient_decoded(patient, "patient"),
            practice,
            reason,
        };
        let result = self.gateway.claim_parked(&caller, cmd).await;
        let result = result.map(|c| pb::ClaimParkedResponse {
            claimed: claimed_to_wire(c),
        });
        answer(&self.gateway, &caller, "claim_parked", result).await
    }

    #[instrument(name = "list_organisations", skip_all, fields(caller = Empty))]
    async fn list_organisations(
        &self,
        request: Request<pb::ListOrganisationsRequest>,
    ) -> Result<Response<pb::ListOrganisationsResponse>, Status> {
        let caller = traced(&request);
        let pb::ListOrganisationsRequest {
            page_size,
            page_token,
        } = request.into_inner();
        let result = (self.gateway)
            .list_organisations(&caller, &page(page_size, page_token))
            .await;
        let result = result.map(|o| pb::ListOrganisationsResponse {
            organisations: o.items.iter().map(org_to_wire).collect(),
            next_page_token: o.next_token,
        });
        answer(&self.gateway, &caller, "list_organisations", result).await
    }

    #[instrument(name = "put_organisation", skip_all, fields(caller = Empty))]
    async fn put_organisation(
        &self,
        request: Request<pb::PutOrganisationRequest>,
    ) -> Result<Response<pb::PutOrganisationResponse>, Status> {
        let caller = traced(&request);
        let pb::PutOrganisationRequest { organisation } = request.into_inner();
        let org = organisation
            .ok_or_else(|| Violations::one("organisation", "required"))
            .and_then(org_from_wire);
        let result = self.gateway.put_organisation(&caller, org).await;
        let result = result.map(|o| pb::PutOrganisationResponse {
            organisation: Some(org_to_wire(&o)),
        });
        answer(&self.gateway, &caller, "put_organisation", result).await
    }

    #[instrument(name = "set_organisation_active", skip_all, fields(caller = Empty))]
    async fn set_organisation_active(
        &self,
        request: Request<pb::SetOrganisationActiveRequest>,
    ) -> Result<Response<pb::SetOrganisationActiveResponse>, Status> {
        let caller = traced(&request);
        let pb::SetOrganisationActiveRequest { ods_code, active } = request.into_inner();
        let result = self
            .gateway
            .set_organisation_active(&caller, &ods_code, active)
            .await;
        let result = result.map(|o| pb::SetOrganisationActiveResponse {
            organisation: Some(org_to_wire(&o)),
        });
        answer(&self.gateway, &caller, "set_organisation_active", result).await
    }

    #[instrument(name = "break_glass_read", skip_all, fields(caller = Empty))]
    async fn break_glass_read(
        &self,
        request: Request<pb::BreakGlassReadRequest>,
    ) -> Result<Response<pb::BreakGlassReadResponse>, Status> {
        let caller = traced(&request);
        let pb::BreakGlassReadRequest {
            handover_id,
            reason,
        } = request.into_inner();
        let result = self
            .gateway
            .break_glass_read(&caller, handover_id, &reason)
            .await;
        let result = result.map(|r| pb::BreakGlassReadResponse {
            handover_id: r.handover.id,
            sender: r.handover.sender.clone(),
            event: wire::event_to_wire(r.handover.event).into(),
            patient: Some(wire::patient_to_wire(&r.patient)),
            summary: Some(super::summary::to_wire(&r.summary)),
        });
        let subject = Subject::handover(handover_id);
        answer_of(
            &self.gateway,
            &caller,
            ("break_glass_read", subject),
            result,
        )
        .await
    }

    #[instrument(name = "audit_trail", skip_all, fields(caller = Empty))]
    async fn audit_trail(
        &self,
        request: Request<pb::AuditTrailRequest>,
    ) -> Result<Response<pb::AuditTrailResponse>, Status> {
        let caller = traced(&request);
        let pb::AuditTrailRequest {
            subject,
            reason,
            page_size,
            page_token,
        } = request.into_inner();
        let asked = page(page_size, page_token);
        let result = self
            .gateway
            .audit_trail(&caller, audit_subject(subject), &reason, &asked)
            .await;
        let result = result.map(|t| pb::AuditTrailResponse {
            next_page_token: t.entries.next_token,
            entries: t
                .entries
                .items
                .into_iter()
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
            chain_verified: t.chain_verified,
        });
        answer(&self.gateway, &caller, "audit_trail", result).await
    }
}
