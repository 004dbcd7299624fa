//! Submit: read the document, check it against the event and the patient
//! named, route it, and store it durably with its deliveries.

use super::claim_guard::Ticket;
use super::deliver::{not_carried, view_name};
use super::envelope::{Envelope, PatientRef};
use super::{Caller, Decoded, Error, Gateway};
use crate::clinical::translate::{self, TextFormat};
use crate::clinical::{ClinicalSummary, OdsCode, ValidationErrors, View};
use crate::journey::{Format, JourneyEvent, OrgKind, Organisation, Recipient, Route};
use crate::store::records::DocumentFormat;
use crate::store::{
    NewDelivery, NewHandover, PARKED_MAILBOX, PARKED_MENTAL_HEALTH_MAILBOX,
    PARKED_SUBSTANCE_MISUSE_MAILBOX, StoreError, SubmitOutcome,
};

/// A refusal's field paths as the request names them. A native document
/// is the summary, so a rule checked on the summary as read
/// (`summary.medications[0].last_dose_given`) is named where the caller
/// wrote it (`document.native.medications[0].last_dose_given`), the same
/// path its decoding uses. FHIR and HL7 v2 documents keep the summary's
/// paths (their own locations are named where the reader finds a fault).
fn in_request_paths(e: Error, document: &IncomingDocument) -> Error {
    match (e, document) {
        (Error::Invalid(violations), IncomingDocument::Native(_)) => Error::Invalid(
            violations
                .into_iter()
                .map(|mut v| {
                    if let Some(rest) = v.field.strip_prefix("summary.") {
                        v.field = format!("document.native.{rest}");
                    }
                    v
                })
                .collect(),
        ),
        (e, _) => e,
    }
}

/// How far ahead of the gateway's clock a time that has passed (the
/// document's authored time, a last dose given) may be.
const AHEAD_MS: i64 = 5 * 60 * 1000;

/// A document as received, before it is read.
#[derive(Debug, Clone)]
pub enum IncomingDocument {
    /// The native summary, as the edge read it from its wire form.
    Native(Box<Decoded<ClinicalSummary>>),
    /// FHIR R4 JSON.
    FhirJson(String),
    /// HL7 v2 text.
    Hl7v2(String),
}

/// A submit whose fields are well formed, before the document is read and
/// routed.
#[derive(Debug, Clone)]
pub struct SubmitCommand {
    /// Sender's idempotency key.
    pub message_id: String,
    /// The journey event.
    pub event: JourneyEvent,
    /// The patient, when the caller named one (it must match the document).
    pub patient: Option<PatientRef>,
    /// Requested destinations, in order.
    pub destinations: Vec<OdsCode>,
    /// The document.
    pub document: IncomingDocument,
}

/// One delivery a submit made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryReceipt {
    /// The mailbox it waits in.
    pub destination: String,
    /// The delivery.
    pub delivery_id: u64,
    /// When it is due, ms since the epoch.
    pub due_ms: Option<i64>,
    /// Served first.
    pub urgent: bool,
}

/// What a durable submit answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubmitReceipt {
    /// The handover.
    pub handover_id: u64,
    /// Its deliveries, in routing order.
    pub deliveries: Vec<DeliveryReceipt>,
    /// A repeat of an earlier submit (same sender, message id and content).
    pub duplicate: bool,
    /// The handover that had already replaced this one when it arrived: a
    /// summary from the same sender about the same patient and event,
    /// written later and received earlier. This one is stored but never
    /// offered.
    pub superseded_on_arrival_by: Option<u64>,
}

/// A calendar date written `YYYY-MM-DD` (any year 0000 to 9999), read
/// as the clinical model reads dates.
#[must_use]
pub fn calendar_date(s: &str) -> Option<crate::clinical::model::Date> {
    if s.len() != 10 {
        return None;
    }
    s.parse().ok()
}

/// A calendar date `YYYY-MM-DD` that is a plausible date of birth (from
/// 1900, not after tomorrow).
#[must_use]
pub fn is_iso_date(s: &str) -> bool {
    calendar_date(s).is_some_and(crate::clinical::model::Date::is_plausible_birth_date)
}

/// A document speaks for the organisation whose certificate sends it: it
/// may not name another organisation of this network (one in the
/// registry) as its author, nor, for a prison's event, as the prison
/// holding the patient. Otherwise one prison could sign a summary as
/// another, and a recipient fed only the document would see the other's
/// name. An organisation outside the network (the healthcare provider
/// that authors a prison's records, a hospital) is the sender's to name.
fn speaks_for_sender(
    registry: &crate::journey::SharedRegistry,
    org: &Organisation,
    event: JourneyEvent,
    s: &ClinicalSummary,
) -> Result<(), Error> {
    let another = |ods: &OdsCode| *ods != org.ods && registry.get(ods).is_some();
    let mut named = Vec::new();
    if another(&s.author.organisation) {
        named.push(("summary.author.organisation", &s.author.organisation));
    }
    if event != JourneyEvent::CommunitySummary && another(&s.custody.establishment) {
        named.push(("summary.custody.establishment", &s.custody.establishment));
    }
    if named.is_empty() {
        return Ok(());
    }
    let named: Vec<String> = named
        .iter()
        .map(|(field, ods)| format!("{field} is {ods}"))
        .collect();
    Err(Error::PermissionDenied(format!(
        "{}, another organisation of this network: a document is sent in its own name, and \
         this certificate is {}",
        named.join(", "),
        org.ods
    )))
}

/// The date (or time) of the custody movement an `event` reports: a
/// correction of the movement names the same one, a new movement of the
/// same kind another (`store::NewHandover::movement`). A time is the
/// instant, written in UTC: the same moment written with another offset
/// (`+01:00` in summer, `Z`, or an HL7 v2 time without one, read as UK
/// local time) is the same movement.
fn movement_of(event: JourneyEvent, custody: &crate::clinical::model::Custody) -> Option<String> {
    match event {
        JourneyEvent::Admission => custody.reception_date.map(|d| d.to_string()),
        JourneyEvent::Transfer => custody.transfer_at.map(|t| {
            crate::clinical::model::DateTime(t.0.to_offset(time::UtcOffset::UTC)).to_string()
        }),
        JourneyEvent::Release => custody.release_date.map(|d| d.to_string()),
        JourneyEvent::CommunitySummary => None,
    }
}

/// A document read and checked, with the patient it is about.
struct Checked {
    summary: ClinicalSummary,
    /// `summary` as stored (`serde_json`), written once for both the check
    /// and the envelope.
    json: Vec<u8>,
    source_format: DocumentFormat,
    patient: PatientRef,
}

impl Gateway {
    /// Accepts a handover: acknowledged only once it is durable.
    ///
    /// # Errors
    /// Refusals (authorisation, field violations, routing, identity
    /// conflicts, a message id reused for other content) and store failures.
    pub async fn submit(
        &self,
        caller: &Caller,
        cmd: Decoded<SubmitCommand>,
    ) -> Result<SubmitReceipt, Error> {
        let (org, actor) = self.organisation(caller, "submit handovers")?;
        // Authorised first: an organisation that may send nothing (probation,
        // a treatment service) learns nothing of the request's faults.
        if !matches!(org.kind, OrgKind::Prison | OrgKind::GpPractice) {
            return Err(Error::PermissionDenied(format!(
                "a {} sends no handovers",
                org.kind.as_str()
            )));
        }
        let cmd = cmd?;
        if org.kind != cmd.event.sender_kind() {
            return Err(Error::PermissionDenied(format!(
                "a {} cannot send {}",
                org.kind.as_str(),
                cmd.event
            )));
        }
        let in_request = |e| in_request_paths(e, &cmd.document);
        let checked = self.read_checked(&cmd).map_err(in_request)?;
        let routes = speaks_for_sender(&self.registry, &org, cmd.event, &checked.summary)
            .and_then(|()| self.route(&cmd, &checked.summary, &org).map_err(in_request));
        // A retry of an accepted submit is answered by the store (the
        // original receipt, or ALREADY_EXISTS for other content) whatever
        // the registry says now: a practice disabled since, or a prison
        // that changed its name, must not turn the retry into a refusal
        // that tells the sender to resend under a new id.
        let mut routes = match routes {
            Ok(routes) => routes,
            Err(refusal) => {
                if !self
                    .store
                    .accepted_before(org.ods.as_str(), &cmd.message_id)?
                {
                    return Err(refusal);
                }
                Vec::new()
            }
        };
        if cmd.event == JourneyEvent::CommunitySummary {
            self.to_current_prison(&checked.patient, &mut routes)?;
        }
        let guessing = self.date_of_birth_check(&org, &cmd.message_id, &checked.patient)?;
        let handover = self.new_handover(actor, &org, &cmd, checked, &routes);
        let outcome = match (self.store.submit(handover).await, guessing) {
            (
                Err(StoreError::IdentityConflict { field }),
                Some((ticket, practice, patient_key)),
            ) if field == "patient.date_of_birth"
                && !ticket.counted_before(&practice, &cmd.message_id, self.clock.now_ms()) =>
            {
                let failure = ticket.failed(self.clock.now_ms());
                let what = (
                    "a date of birth its prison number did not come with",
                    "submit",
                );
                self.record_failed_claim(practice, patient_key, &failure, what)
                    .await?;
                return Err(StoreError::IdentityConflict { field }.into());
            }
            (outcome, _) => outcome?,
        };
        tracing::Span::current().record("handover_id", outcome.handover_id);
        tracing::info!(
            deliveries = outcome.deliveries.len(),
            duplicate = outcome.duplicate,
            "submit accepted"
        );
        if !outcome.duplicate {
            alert_held_treatment_copies(outcome.handover_id, &routes);
        }
        self.receipt(outcome, &routes)
    }

    /// A practice's summary that names its patient by prison number alone
    /// is checked against the date of birth that number came with, as a
    /// claim is: each mismatch counts as a failed claim, and a full counter
    /// refuses it (`CLAIMS_LOCKED`) before the store is asked. Unlimited, it
    /// told the practice which date of birth goes with a prison number,
    /// which is what opens a parked release (`claim_guard`). Counted
    /// against the practice as its claims are (`urn:ods:…`, whether the
    /// summary came over gRPC or MESH); a retry of a summary accepted
    /// before is answered as it was. `None` for any other summary, else
    /// the ticket, the practice and the patient.
    fn date_of_birth_check(
        &self,
        org: &Organisation,
        message_id: &str,
        patient: &PatientRef,
    ) -> Result<Option<(Ticket<'_>, String, String)>, Error> {
        if org.kind != OrgKind::GpPractice
            || patient.nhs_number.is_some()
            || patient.prison_number.is_none()
        {
            return Ok(None);
        }
        let practice = Caller::Organisation(org.ods.clone()).actor();
        let patient_key = self.resolved_patient(patient)?;
        let now = self.clock.now_ms();
        match self
            .claims
            .admit_shared(&self.store, &practice, &patient_key, now)?
        {
            Ok(ticket) => Ok(Some((ticket, practice, patient_key))),
            Err(_) if self.store.accepted_before(org.ods.as_str(), message_id)? => Ok(None),
            Err(locked) => Err(self.claims_locked(&locked, &patient_key, now)),
        }
    }

    /// Reads the document into the canonical summary, with the event it states.
    fn read_document(
        &self,
        document: &IncomingDocument,
    ) -> Result<(ClinicalSummary, Option<JourneyEvent>, DocumentFormat), Error> {
        match document {
            IncomingDocument::Native(summary) => match summary.as_ref() {
                Ok(s) => Ok((s.clone(), None, DocumentFormat::Native)),
                Err(v) => Err(Error::Invalid(v.0.clone())),
            },
            IncomingDocument::FhirJson(text) => {
                translate::read(TextFormat::Fhir, text.as_bytes(), &self.limits)
                    .map(|r| (r.summary, r.event, DocumentFormat::FhirJson))
                    .map_err(Error::from)
            }
            IncomingDocument::Hl7v2(text) => {
                translate::read(TextFormat::Hl7v2, text.as_bytes(), &self.limits)
                    .map(|r| (r.summary, r.event, DocumentFormat::Hl7v2))
                    .map_err(Error::from)
            }
        }
    }

    /// The summary, checked against the event and patient the caller named
    /// and against the event's rules, with the patient it is about.
    fn read_checked(&self, cmd: &SubmitCommand) -> Result<Checked, Error> {
        let (summary, stated, source_format) = self.read_document(&cmd.document)?;
        let mut v = ValidationErrors::default();
        if let Some(stated) = stated.filter(|e| *e != cmd.event) {
            v.add("event", format!("the document states {stated}"));
        }
        let from_document = PatientRef {
            nhs_number: summary.patient.nhs_number.clone(),
            prison_number: summary.patient.prison_number.clone(),
            date_of_birth: Some(summary.patient.date_of_birth.to_string()),
        };
        if let Some(given) = &cmd.patient {
            fn differs<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
                a.is_some() && a != b
            }
            if differs(&given.nhs_number, &from_document.nhs_number)
                || differs(&given.prison_number, &from_document.prison_number)
                || differs(&given.date_of_birth, &from_document.date_of_birth)
            {
                v.add("patient", "does not match the patient in the document");
            }
        }
        // What has happened cannot be dated ahead of the gateway's clock: a
        // document so dated would stay "newer" than every correction
        // written before that time, and a last dose "given" tomorrow would
        // time the next one wrongly.
        let latest = self.clock.now_ms() + AHEAD_MS;
        let past = std::iter::once(("summary.authored_at".to_owned(), summary.authored_at)).chain(
            summary.medications.iter().enumerate().filter_map(|(i, m)| {
                let at = m.last_dose_given?;
                Some((format!("summary.medications[{i}].last_dose_given"), at))
            }),
        );
        for (field, at) in past {
            if at.unix_ms() > latest {
                v.add(
                    field,
                    "must not be in the future (5 minutes' difference between clocks is allowed)",
                );
            }
        }
        let json = serde_json::to_vec(&summary).expect("the model serialises");
        if let Err(e) = crate::clinical::validate_serialised(&summary, cmd.event, &json) {
            v.0.extend(e.0);
        }
        v.into_result()?;
        Ok(Checked {
            summary,
            json,
            source_format,
            patient: from_document,
        })
    }

    fn route(
        &self,
        cmd: &SubmitCommand,
        summary: &ClinicalSummary,
        org: &Organisation,
    ) -> Result<Vec<Route>, Error> {
        let registry = self.registry.read();
        crate::journey::route(
            cmd.event,
            summary,
            org,
            &cmd.destinations,
            &registry,
            &self.deadlines,
            self.clock.now_ms(),
        )
        .map_err(|violations| {
            let mut v = ValidationErrors::default();
            for (field, reason) in violations {
                v.add(field, reason);
            }
            Error::from(v)
        })
    }

    /// A community summary goes to the prison that holds its patient now.
    /// Its author names the admitting prison, as the admission notice told
    /// it; a transfer since (or an admission elsewhere) moved the patient,
    /// and the record follows them: the prison they left no longer cares
    /// for them. A patient released since, or whom no prison has sent,
    /// keeps the prison named (`docs/journey.md`).
    fn to_current_prison(&self, patient: &PatientRef, routes: &mut [Route]) -> Result<(), Error> {
        let identifiers = [
            (patient.nhs_number.as_ref()).map(|n| self.keyer.key(Some(n), None)),
            (patient.prison_number.as_ref()).map(|p| self.keyer.key(None, Some(p))),
        ];
        let mut latest: Option<crate::store::HandoverRecord> = None;
        for identifier in identifiers.iter().flatten() {
            if let Some(h) = self.store.latest_custody(identifier)?
                && latest.as_ref().is_none_or(|l| h.id > l.id)
            {
                latest = Some(h);
            }
        }
        let now_at = match latest {
            Some(h) if h.event == JourneyEvent::Admission => Some(h.sender),
            Some(h) if h.event == JourneyEvent::Transfer => self.received_by(&h)?,
            _ => None,
        };
        let Some(now_at) = now_at.and_then(|c| c.parse::<OdsCode>().ok()) else {
            return Ok(());
        };
        // Disabled or not: the record waits for the prison that holds the
        // patient (it pulls once enabled again) rather than go to one they
        // left, which has no care of them.
        let prison = (self.registry.read().get(&now_at)).is_some_and(|o| o.kind == OrgKind::Prison);
        if !prison {
            return Ok(());
        }
        for route in routes {
            if let Recipient::Org(named) = &mut route.recipient
                && *named != now_at
            {
                tracing::info!(named = %named, to = %now_at, "community summary sent on to the prison that holds the patient now");
                *named = now_at.clone();
            }
        }
        Ok(())
    }

    /// The prison transfer `h` went to: its summary's copy.
    fn received_by(&self, h: &crate::store::HandoverRecord) -> Result<Option<String>, Error> {
        for id in &h.deliveries {
            if let Some(d) = self.store.delivery(*id)?
                && d.view == view_name(View::Full)
                && !d.mailbox.starts_with('@')
            {
                return Ok(Some(d.mailbox));
            }
        }
        Ok(None)
    }

    /// The change the store makes durable: the handover, its deliveries,
    /// the keys that link or claim its patient, and the stored envelope.
    fn new_handover(
        &self,
        actor: String,
        org: &Organisation,
        cmd: &SubmitCommand,
        checked: Checked,
        routes: &[Route],
    ) -> NewHandover {
        let Checked {
            summary,
            json,
            source_format,
            patient: from_document,
        } = checked;
        let summary = &summary;
        let parked = routes.iter().any(|r| r.recipient == Recipient::Parked);
        let linking = from_document.nhs_number.is_some() && from_document.prison_number.is_some();
        // Claim keys serve a parked release, and a link of both identifiers
        // (which lets earlier parked releases be claimed by either).
        // A release may come to be parked later too (its practice disabled
        // before it pulled), so a release always carries them.
        let claim_keys = if parked || linking || cmd.event == JourneyEvent::Release {
            self.keyer.claim_keys(
                from_document.nhs_number.as_ref(),
                from_document.prison_number.as_ref(),
                &summary.patient.date_of_birth.to_string(),
            )
        } else {
            Vec::new()
        };
        let destinations = routes
            .iter()
            .map(|r| {
                let mut d = self.new_delivery(r, summary, cmd.event);
                d.may_follow = self.may_follow(org, r, summary, cmd);
                d
            })
            .collect();
        // Each identifier's keyed hash on its own: the store links them.
        let patient = crate::store::PatientIds {
            nhs: (from_document.nhs_number.as_ref()).map(|n| self.keyer.key(Some(n), None)),
            prison: (from_document.prison_number.as_ref()).map(|p| self.keyer.key(None, Some(p))),
            dob: Some(
                self.keyer
                    .birth_key(&summary.patient.date_of_birth.to_string()),
            ),
        };
        let payload = Envelope {
            patient: from_document,
            source_format,
            document: json,
        }
        .encode();
        NewHandover {
            actor,
            sender: org.ods.as_str().to_owned(),
            message_id: cmd.message_id.clone(),
            event: cmd.event,
            patient,
            claim_keys,
            requested_destinations: cmd
                .destinations
                .iter()
                .map(|c| c.as_str().to_owned())
                .collect(),
            destinations,
            payload,
            supersede: true,
            trace_parent: crate::telemetry::current_traceparent(),
            authored_at_ms: Some(summary.authored_at.unix_ms()),
            // A recipient of an earlier summary that this one does not go
            // to is told, first in line, that the earlier one no longer
            // applies (nothing clinical: consent may have been withdrawn).
            // Every notice is due within the urgent deadline of its
            // submission, whatever the summary holds: a deadline taken from
            // the summary's routes told a probation service without consent
            // (or a mental health team, of opioid substitution) what its
            // view withholds.
            withdrawal: Some(Box::new(NewDelivery {
                mailbox: String::new(),
                urgent: true,
                view: view_name(View::Withdrawn).to_owned(),
                not_carried: not_carried(summary, Format::Native, View::Withdrawn, cmd.event),
                due_ms: Some(self.clock.now_ms().saturating_add(self.deadlines.urgent_ms)),
                may_follow: Vec::new(),
            })),
            episode: summary
                .custody
                .reception_date
                .map(|d| self.keyer.episode_key(&d.to_string())),
            movement: movement_of(cmd.event, &summary.custody)
                .map(|m| self.keyer.movement_key(&format!("{}:{m}", cmd.event))),
            movement_as_written: (cmd.event == JourneyEvent::Transfer)
                .then_some(summary.custody.transfer_at)
                .flatten()
                .filter(|t| !t.0.offset().is_utc())
                .map(|t| self.keyer.movement_key(&format!("{}:{t}", cmd.event))),
        }
    }

    /// For a treatment copy the area rule routed (the sender named no
    /// service of its kind), the active services of its kind in the
    /// sender's area it may go to instead, with what each one's format
    /// does not carry: a correction's copy goes to the one given the
    /// earlier copy (the store decides, from the deliveries it holds).
    fn may_follow(
        &self,
        sender: &Organisation,
        r: &Route,
        summary: &ClinicalSummary,
        cmd: &SubmitCommand,
    ) -> Vec<(String, Vec<String>)> {
        let kind = match r.view {
            View::SubstanceMisuseService => OrgKind::SubstanceMisuseService,
            View::MentalHealthTeam => OrgKind::MentalHealthTeam,
            _ => return Vec::new(),
        };
        let registry = self.registry.read();
        let named = |ods: &OdsCode| cmd.destinations.contains(ods);
        if matches!(&r.recipient, Recipient::Org(code) if named(code)) {
            return Vec::new();
        }
        let Some(region) = sender.region.as_deref() else {
            return Vec::new();
        };
        registry
            .iter()
            .filter(|o| o.active && o.kind == kind && o.region.as_deref() == Some(region))
            .map(|o| {
                let not_carried = not_carried(summary, o.format, r.view, cmd.event);
                (o.ods.as_str().to_owned(), not_carried)
            })
            .collect()
    }

    fn new_delivery(
        &self,
        r: &Route,
        summary: &ClinicalSummary,
        event: JourneyEvent,
    ) -> NewDelivery {
        let (mailbox, format) = match &r.recipient {
            Recipient::Org(code) => (
                code.as_str().to_owned(),
                self.registry
                    .read()
                    .get(code)
                    .map_or(Format::Native, |o| o.format),
            ),
            Recipient::Parked => (PARKED_MAILBOX.to_owned(), Format::Native),
            Recipient::Held(OrgKind::MentalHealthTeam) => {
                (PARKED_MENTAL_HEALTH_MAILBOX.to_owned(), Format::Native)
            }
            Recipient::Held(_) => (PARKED_SUBSTANCE_MISUSE_MAILBOX.to_owned(), Format::Native),
        };
        NewDelivery {
            mailbox,
            urgent: r.urgent,
            view: view_name(r.view).to_owned(),
            not_carried: not_carried(summary, format, r.view, event),
            due_ms: Some(r.due_ms).filter(|d| *d != i64::MAX),
            may_follow: Vec::new(),
        }
    }

    fn receipt(&self, outcome: SubmitOutcome, routes: &[Route]) -> Result<SubmitReceipt, Error> {
        let mut deliveries = Vec::with_capacity(outcome.deliveries.len());
        for (i, (destination, delivery_id)) in outcome.deliveries.into_iter().enumerate() {
            // A repeat answers with the original deliveries, routed then.
            let (due_ms, urgent) = match routes.get(i) {
                Some(r) if !outcome.duplicate => (Some(r.due_ms), r.urgent),
                _ => self
                    .store
                    .delivery(delivery_id)?
                    .map_or((None, false), |d| (d.due_ms, d.urgent)),
            };
            deliveries.push(DeliveryReceipt {
                destination,
                delivery_id,
                due_ms: due_ms.filter(|d| *d != i64::MAX),
                urgent,
            });
        }
        Ok(SubmitReceipt {
            handover_id: outcome.handover_id,
            deliveries,
            duplicate: outcome.duplicate,
            superseded_on_arrival_by: outcome.superseded_on_arrival_by,
        })
    }
}

/// Alerts operators at once to a treatment copy held for want of a
/// service in the release area: an opioid substitution copy is due before
/// the next dose, so the deadline alert would come when the dose is
/// already missed. Ids, kinds and times only.
fn alert_held_treatment_copies(handover_id: u64, routes: &[Route]) {
    for r in routes {
        if let Recipient::Held(kind) = &r.recipient {
            tracing::warn!(
                alert = "treatment_copy_held",
                handover_id,
                kind = kind.as_str(),
                urgent = r.urgent,
                due_ms = Some(r.due_ms).filter(|d| *d != i64::MAX),
                "ALERT: a treatment copy is held: no active service of its kind serves the \
                 release area; register or enable one (or name the service) before it is due"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert!(is_iso_date("2024-02-29"));
        assert!(!is_iso_date("2023-02-29"));
        assert!(!is_iso_date("2023-2-28"));
        assert!(!is_iso_date("1800-01-01"));
        // A real date that is no birth date is a calendar date all the same,
        // so a refusal can say which fault it is.
        assert!(!is_iso_date("2999-01-01"));
        assert!(calendar_date("2999-01-01").is_some());
        assert!(calendar_date("1800-01-01").is_some());
        assert!(calendar_date("2023-02-29").is_none());
        assert!(calendar_date("2023-02-2x").is_none());
    }
}
