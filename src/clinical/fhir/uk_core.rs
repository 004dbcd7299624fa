//! UK Core (R4 4.0.1, UK Core 2.x): the profiles our resources conform to
//! and the national headings our sections use. Where no national code
//! exists we keep a project-local one; each is listed, with why, in
//! `docs/clinical-formats.md`.

macro_rules! profiles {
    ($($name:ident = $profile:literal),* $(,)?) => {$(
        #[doc = concat!("UK Core profile ", $profile, ".")]
        pub(super) const $name: &str = concat!("https://fhir.hl7.org.uk/StructureDefinition/", $profile);
    )*};
}

profiles! {
    ALLERGY_INTOLERANCE = "UKCore-AllergyIntolerance",
    COMPOSITION = "UKCore-Composition",
    CONDITION = "UKCore-Condition",
    CONSENT = "UKCore-Consent",
    ENCOUNTER = "UKCore-Encounter",
    FLAG = "UKCore-Flag",
    IMMUNIZATION = "UKCore-Immunization",
    MEDICATION_STATEMENT = "UKCore-MedicationStatement",
    OBSERVATION = "UKCore-Observation",
    ORGANIZATION = "UKCore-Organization",
    PATIENT = "UKCore-Patient",
    PRACTITIONER = "UKCore-Practitioner",
    SERVICE_REQUEST = "UKCore-ServiceRequest",
}

/// UK Core's record standard headings (PRSB), a national code system.
pub(super) const HEADINGS: &str =
    "https://fhir.hl7.org.uk/CodeSystem/UKCore-RecordStandardHeadings";

/// The section code for our heading `local`: the national PRSB heading
/// where one exists, else our own (infections, mental health).
pub(super) fn heading(
    local: &'static str,
    title: &'static str,
) -> (&'static str, &'static str, &'static str) {
    let national = match local {
        "medications" => Some((
            "medications-and-medical-devices",
            "Medications and medical devices",
        )),
        "allergies" => Some((
            "allergies-and-adverse-reaction",
            "Allergies and adverse reaction",
        )),
        "risks" => Some(("risk-information", "Risk information")),
        "problems" => Some(("problems-and-issues", "Problems and issues")),
        "vaccinations" => Some(("immunisations", "Immunisations")),
        "substance-misuse" => Some(("drug/substance-use", "Drug/substance use")),
        "plan" => Some(("plan-and-requested-actions", "Plan and requested actions")),
        "consent" => Some((
            "consent-for-information-sharing",
            "Consent for information sharing",
        )),
        "custody" => Some((
            "patient-encounter-administration-data",
            "Patient encounter administration data",
        )),
        _ => None,
    };
    match national {
        Some((code, display)) => (HEADINGS, code, display),
        None => (super::SYS_HEADING, local, title),
    }
}
