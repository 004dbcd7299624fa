//! Claim: a GP practice that registered a patient takes the releases parked
//! for them, by identifier and date of birth, under the failed-claim limit.

use std::time::Duration;

use super::claim_guard::{FAILURE_ACTION, Failure, Locked};
use super::envelope::PatientRef;
use super::{Caller, Decoded, Error, Gateway};
use crate::clinical::ValidationErrors;
use crate::journey::{JourneyEvent, OrgKind};
use crate::store::StoreError;

/// A practice's claim, as asked.
#[derive(Debug, Clone)]
pub struct ClaimCommand {
    /// The patient (identifier and date of birth), as the edge read it.
    pub patient: Decoded<Option<PatientRef>>,
    /// The date the practice registered the patient, `YYYY-MM-DD`, if stated.
    pub registration_date: Option<String>,
}

/// One delivery a claim moved to the practice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The delivery.
    pub delivery_id: u64,
    /// Its handover.
    pub handover_id: u64,
    /// The event it carries.
    pub event: Option<JourneyEvent>,
}

impl Gateway {
    /// Claims the releases parked for a patient for the calling practice.
    ///
    /// # Errors
    /// Refusals (not a practice, field violations, `ClaimsLocked`,
    /// `NothingToClaim`) and store failures.
    pub async fn claim(&self, caller: &Caller, cmd: ClaimCommand) -> Result<Vec<Claimed>, Error> {
        let (org, actor) = self.organisation(caller, "claim parked releases")?;
        if org.kind != OrgKind::GpPractice {
            return Err(Error::PermissionDenied(format!(
                "only a GP practice claims parked releases; {} is a {}",
                org.ods,
                org.kind.as_str()
            )));
        }
        let now = self.clock.now_ms();
        let mut v = ValidationErrors::default();
        let registered = registration_date(
            cmd.registration_date,
            "evidence.registration_date",
            now,
            &mut v,
        );
        let (patient, dob) = claimant(cmd.patient, "patient", v)?;
        if registered.as_deref().is_some_and(|r| r < dob.as_str()) {
            return Err(Error::invalid(
                "evidence.registration_date",
                "must not be before the date of birth",
            ));
        }
        // Counted against the patient the identifier resolves to, so a
        // guesser who knows both numbers gets no more tries by asking with
        // one, then the other.
        let patient_key = self.resolved_patient(&patient)?;
        let ticket = self
            .claims
            .admit_shared(&self.store, &actor, &patient_key, now)?
            .map_err(|locked| self.claims_locked(&locked, &patient_key, now))?;
        // Keyed like a claim key, but over the registration date instead of
        // the date of birth: checkable by whoever holds the key, and never
        // equal to a real claim key. Recorded with the claim, won or lost.
        let evidence = registered
            .and_then(|date| {
                self.keyer
                    .claim_keys(
                        patient.nhs_number.as_ref(),
                        patient.prison_number.as_ref(),
                        &format!("registered:{date}"),
                    )
                    .into_iter()
                    .next()
            })
            .map_or_else(
                || "no evidence given".to_owned(),
                |hash| format!("evidence: registration date (keyed {hash})"),
            );
        let result = self
            .claim_patient(&actor, &patient, &dob, (org.ods.as_str(), &evidence))
            .await;
        if !matches!(result, Err(Error::Store(StoreError::NothingToClaim))) {
            return result; // claimed, or not decided: neither counts as a failure
        }
        let failure = ticket.failed(now);
        let what = ("no parked release matches", evidence.as_str());
        self.record_failed_claim(actor, patient_key, &failure, what)
            .await?;
        result
    }

    /// The refusal of a claim (or of a practice's date of birth check,
    /// `submit`) while a failed-claim counter of `patient_key` is full.
    pub(super) fn claims_locked(&self, locked: &Locked, patient_key: &str, now: i64) -> Error {
        tracing::warn!(
            alert = "claims_locked",
            scope = locked.scope,
            "claim refused: the failed-claim limit is reached"
        );
        Error::ClaimsLocked {
            scope: locked.scope,
            window_hours: self.claims.window_hours(),
            retry_after: Duration::from_millis(
                u64::try_from(locked.until_ms.saturating_sub(now)).unwrap_or(0),
            ),
            patient_key: patient_key.to_owned(),
        }
    }

    /// Audits one failed claim (fail closed) and raises the alert when it
    /// locked a counter. `what`: what failed, and what the entry adds.
    pub(super) async fn record_failed_claim(
        &self,
        actor: String,
        patient_key: String,
        failure: &Failure,
        (refusal, detail): (&str, &str),
    ) -> Result<(), Error> {
        tracing::info!(
            failures = failure.pair_failures,
            limit = failure.pair_limit,
            "claim matched no parked release"
        );
        if !failure.now_locked.is_empty() {
            tracing::warn!(
                alert = "repeated_failed_claims",
                caller = %actor,
                locked = ?failure.now_locked,
                "ALERT: repeated failed claims (a date of birth may be being guessed); claims locked"
            );
        }
        let locked = if failure.now_locked.is_empty() {
            String::new()
        } else {
            format!("; claims now locked: {}", failure.now_locked.join(", "))
        };
        self.store
            .record(crate::audit::AuditEvent {
                actor,
                action: FAILURE_ACTION,
                patient_key: Some(patient_key),
                outcome: format!(
                    "refused: {refusal}; failed claim {} of {} for this patient from this practice within {} h; {detail}{locked}",
                    failure.pair_failures,
                    failure.pair_limit,
                    self.claims.window_hours(),
                ),
                ..crate::audit::AuditEvent::default()
            })
            .await?;
        Ok(())
    }

    /// The patient key `patient`'s identifier resolves to (its own keyed
    /// hash when it was never linked).
    pub(crate) fn resolved_patient(&self, patient: &PatientRef) -> Result<String, Error> {
        let identifier = self
            .keyer
            .key(patient.nhs_number.as_ref(), patient.prison_number.as_ref());
        Ok((self.store.patient_keys(&identifier)?)
            .into_iter()
            .next()
            .unwrap_or(identifier))
    }

    /// Claims the parked releases of `patient` (born `dob`) for `practice`,
    /// `evidence` in each claim's audit entry. The failed-claim limit is the
    /// caller's business: operators are not limited (they claim with a
    /// reason), practices are (`claim`).
    pub(crate) async fn claim_patient(
        &self,
        actor: &str,
        patient: &PatientRef,
        dob: &str,
        (practice, evidence): (&str, &str),
    ) -> Result<Vec<Claimed>, Error> {
        let keys = self.keyer.claim_keys(
            patient.nhs_number.as_ref(),
            patient.prison_number.as_ref(),
            dob,
        );
        let claimed = self.store.claim(actor, keys, (practice, evidence)).await?;
        if claimed.is_empty() {
            return Err(Error::Store(StoreError::NothingToClaim));
        }
        tracing::info!(
            claimed = claimed.len(),
            to = practice,
            "parked releases claimed"
        );
        Ok(claimed
            .iter()
            .map(|d| Claimed {
                delivery_id: d.id,
                handover_id: d.handover_id,
                event: d.event,
            })
            .collect())
    }
}

/// The patient a claim names, with the date of birth it must carry; `v`
/// holds violations found earlier in the request.
pub(super) fn claimant(
    patient: Decoded<Option<PatientRef>>,
    field: &str,
    mut v: ValidationErrors,
) -> Result<(PatientRef, String), Error> {
    let patient = match patient {
        Ok(None) if v.0.is_empty() => {
            return Err(Error::invalid(
                field,
                "required: NHS number or prison number, and date of birth",
            ));
        }
        Ok(Some(p)) if v.0.is_empty() => p,
        Ok(_) => return Err(v.into()),
        Err(e) => {
            v.0.extend(e.0);
            return Err(v.into());
        }
    };
    let Some(dob) = patient.date_of_birth.clone() else {
        return Err(Error::invalid(
            format!("{field}.date_of_birth"),
            "required to claim: it must match the release",
        ));
    };
    Ok((patient, dob))
}

/// The registration date a claim states, when it states one: a calendar
/// date `YYYY-MM-DD` not after the day of `now_ms` (UTC). Violations never
/// quote the value.
fn registration_date(
    date: Option<String>,
    field: &str,
    now_ms: i64,
    v: &mut ValidationErrors,
) -> Option<String> {
    let date = date.filter(|d| !d.is_empty())?;
    let Some(day) = super::calendar_date(&date) else {
        v.add(field, "must be a calendar date written YYYY-MM-DD");
        return None;
    };
    if day.0.year() < 1900 {
        v.add(field, "must not be before 1900");
        return None;
    }
    // Today as England's calendar has it: a registration made at 00:30 BST
    // is dated the day that is still yesterday in UTC.
    let today = time::OffsetDateTime::from_unix_timestamp(now_ms.div_euclid(1_000))
        .map(|t| crate::clinical::model::date_in_england(t).to_string())
        .unwrap_or_default();
    if date > today {
        v.add(field, "must not be in the future");
        return None;
    }
    Some(date)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registration_date_refusal_names_its_fault() {
        let now_ms = 1_764_460_800_000; // 2025-11-30
        let fault = |date: &str| {
            let mut v = ValidationErrors::default();
            registration_date(
                Some(date.into()),
                "evidence.registration_date",
                now_ms,
                &mut v,
            );
            v.0.first().map(|f| f.description.clone())
        };
        assert_eq!(
            fault("2999-01-01").as_deref(),
            Some("must not be in the future")
        );
        assert_eq!(
            fault("1850-01-01").as_deref(),
            Some("must not be before 1900")
        );
        assert_eq!(
            fault("2025-02-30").as_deref(),
            Some("must be a calendar date written YYYY-MM-DD")
        );
        assert_eq!(fault("2025-11-30"), None);
        // 23:30 UTC on 30 June is 00:30 BST on 1 July: registered "today".
        let mut v = ValidationErrors::default();
        let summer_night = 1_782_862_200_000; // 2026-06-30T23:30:00Z
        registration_date(
            Some("2026-07-01".into()),
            "evidence.registration_date",
            summer_night,
            &mut v,
        );
        assert!(v.0.is_empty(), "{:?}", v.0);
    }
}
