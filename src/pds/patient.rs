//! The few fields of a PDS FHIR R4 `Patient` the gateway reads: its `id`
//! (the NHS number; another than the one asked for means superseded),
//! `birthDate`, `deceasedDateTime`, `meta.security` (`R` restricted, `V`
//! very restricted, `REDACTED`), the `Extension-PDS-RemovalFromRegistration`
//! extension (the record was removed from registration: emigrated, moved
//! to another UK nation, ...) and `generalPractitioner` (the registered
//! practice's ODS code, within its period: PDS lists practices a patient
//! "is, or was, registered" with, and a start may be in the future).
//! Everything else is ignored.

use serde::Deserialize;

/// The URL of PDS's removal-from-registration extension on `Patient`
/// (personal-demographics-service-api, `RemovalFromRegistration.yaml`).
pub const REMOVAL_EXTENSION: &str =
    "https://fhir.nhs.uk/StructureDefinition/Extension-PDS-RemovalFromRegistration";

/// The ODS code system of `generalPractitioner.identifier`.
pub const ODS_SYSTEM: &str = "https://fhir.nhs.uk/Id/ods-organization-code";

/// What PDS says about one patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PdsPatient {
    /// The resource id: the patient's current NHS number.
    pub id: String,
    /// Date of birth as PDS holds it (`YYYY-MM-DD`, or less precise).
    pub birth_date: Option<String>,
    /// PDS records a death.
    pub deceased: bool,
    /// A restricted, very restricted or redacted record.
    pub restricted: bool,
    /// PDS records the patient's removal from registration: the practice
    /// it lists may no longer hold them.
    pub removed: bool,
    /// The registered practice's ODS code, as PDS gives it (unvalidated).
    pub practice: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Resource {
    resource_type: String,
    id: String,
    #[serde(default)]
    birth_date: Option<String>,
    #[serde(default)]
    deceased_date_time: Option<String>,
    #[serde(default)]
    deceased_boolean: Option<bool>,
    #[serde(default)]
    meta: Option<Meta>,
    #[serde(default)]
    general_practitioner: Vec<Reference>,
    #[serde(default)]
    extension: Vec<Extension>,
}

#[derive(Deserialize)]
struct Extension {
    #[serde(default)]
    url: Option<String>,
}

#[derive(Deserialize)]
struct Meta {
    #[serde(default)]
    security: Vec<Coding>,
}

#[derive(Deserialize)]
struct Coding {
    #[serde(default)]
    code: Option<String>,
}

#[derive(Deserialize)]
struct Reference {
    #[serde(default)]
    identifier: Option<Identifier>,
}

#[derive(Deserialize)]
struct Identifier {
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    period: Option<Period>,
}

#[derive(Deserialize)]
struct Period {
    #[serde(default)]
    start: Option<String>,
    #[serde(default)]
    end: Option<String>,
}

/// The code of an OperationOutcome's first issue
/// (`issue[0].details.coding[0].code`: `RESOURCE_NOT_FOUND`,
/// `INVALID_RESOURCE_ID`, ...), if `body` is one.
pub fn outcome_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    if v.get("resourceType")?.as_str()? != "OperationOutcome" {
        return None;
    }
    v.pointer("/issue/0/details/coding/0/code")?
        .as_str()
        .map(str::to_owned)
}

/// Reads a `Patient` resource; `today` (`YYYY-MM-DD`) decides whether a
/// registration period has ended.
///
/// # Errors
/// Not JSON, or not a Patient (the message carries no patient data).
pub fn parse(body: &[u8], today: &str) -> Result<PdsPatient, String> {
    let r: Resource = serde_json::from_slice(body)
        .map_err(|e| format!("not a Patient resource: {}", e.classify_name()))?;
    if r.resource_type != "Patient" {
        return Err("not a Patient resource".into());
    }
    let restricted = r
        .meta
        .iter()
        .flat_map(|m| &m.security)
        .any(|c| matches!(c.code.as_deref(), Some("R" | "V" | "REDACTED")));
    let practice = r
        .general_practitioner
        .iter()
        .filter_map(|g| g.identifier.as_ref())
        .filter(|i| i.system.as_deref().is_none_or(|s| s == ODS_SYSTEM))
        .filter(|i| {
            // Current today: not ended, and not starting later (the
            // dates compare as text, at whatever precision PDS gives).
            i.period.as_ref().is_none_or(|p| {
                p.end.as_deref().is_none_or(|end| end >= today)
                    && p.start
                        .as_deref()
                        .is_none_or(|start| start.get(..10).unwrap_or(start) <= today)
            })
        })
        .find_map(|i| i.value.clone());
    let removed = r
        .extension
        .iter()
        .any(|e| e.url.as_deref() == Some(REMOVAL_EXTENSION));
    Ok(PdsPatient {
        id: r.id,
        birth_date: r.birth_date,
        deceased: r.deceased_date_time.is_some() || r.deceased_boolean == Some(true),
        restricted,
        removed,
        practice,
    })
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "i/o",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "unexpected content",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_practice_the_restriction_and_a_death() {
        let body = br#"{"resourceType":"Patient","id":"9990000018","birthDate":"1985-06-15",
            "meta":{"versionId":"2","security":[{"system":"http://terminology.hl7.org/CodeSystem/v3-Confidentiality","code":"U","display":"unrestricted"}]},
            "generalPractitioner":[{"id":"254406A3","type":"Organization","identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"YG001","period":{"start":"2020-01-01"}}}]}"#;
        let p = parse(body, "2026-11-29").unwrap();
        assert_eq!(p.practice.as_deref(), Some("YG001"));
        assert!(!p.restricted && !p.deceased);
        let ended = br#"{"resourceType":"Patient","id":"1","generalPractitioner":[{"identifier":{"value":"YG001","period":{"start":"2020-01-01","end":"2021-01-01"}}}]}"#;
        assert_eq!(parse(ended, "2026-11-29").unwrap().practice, None);
        // A registration that starts later is not today's practice; the
        // current one beside it is.
        let later = br#"{"resourceType":"Patient","id":"1","generalPractitioner":[
            {"identifier":{"value":"YG002","period":{"start":"2026-12-07"}}},
            {"identifier":{"value":"YG001","period":{"start":"2019-03-01T00:00:00+00:00"}}}]}"#;
        let p = parse(later, "2026-11-29").unwrap();
        assert_eq!(p.practice.as_deref(), Some("YG001"));
        assert!(!p.removed);
        // PDS's removal from registration (its specification's shape).
        let removed = br#"{"resourceType":"Patient","id":"1",
            "extension":[{"url":"https://fhir.nhs.uk/StructureDefinition/Extension-PDS-RemovalFromRegistration",
              "extension":[{"url":"removalFromRegistrationCode","valueCodeableConcept":{"coding":[{"system":"https://fhir.nhs.uk/CodeSystem/PDS-RemovalReasonExitCode","code":"SCT","display":"Transferred to Scotland"}]}},
                           {"url":"effectiveTime","valuePeriod":{"start":"2020-01-01T00:00:00+00:00"}}]}],
            "generalPractitioner":[{"identifier":{"system":"https://fhir.nhs.uk/Id/ods-organization-code","value":"YG001"}}]}"#;
        assert!(parse(removed, "2026-11-29").unwrap().removed);
        let r = br#"{"resourceType":"Patient","id":"1","meta":{"security":[{"code":"R"}]},"deceasedDateTime":"2010-10-22T00:00:00+00:00"}"#;
        let p = parse(r, "2026-11-29").unwrap();
        assert!(p.restricted && p.deceased);
        assert!(
            parse(
                br#"{"resourceType":"OperationOutcome","id":"x"}"#,
                "2026-01-01"
            )
            .is_err()
        );
    }
}
