//! Which clinical items the treatment views carry: the substance misuse
//! service's (`View::SubstanceMisuseService`) and the community mental
//! health team's (`View::MentalHealthTeam`).
//!
//! The model records a diagnosis as a SNOMED CT code and a medicine as a
//! dm+d code with its name; neither says "mental health" or "psychotropic".
//! Without a terminology server the gateway recognises them from short,
//! named lists: SNOMED CT codes of mental and substance-use disorders, and
//! medicine names (the display's words). What a list misses is left out of
//! the treatment view, never guessed in, and every treatment delivery says
//! so in `not_carried`; the GP's copy carries everything (hazard H16).

use super::model::{Code, Diagnosis, Medication, Prescription, SNOMED};

/// SNOMED CT codes of mental disorders the mental health team's view carries.
pub const MENTAL_HEALTH_DIAGNOSES: &[&str] = &[
    "74732009",  // Mental disorder
    "35489007",  // Depressive disorder
    "370143000", // Major depressive disorder
    "58214004",  // Schizophrenia
    "68890003",  // Schizoaffective disorder
    "69322001",  // Psychotic disorder
    "13746004",  // Bipolar disorder
    "197480006", // Anxiety disorder
    "21897009",  // Generalised anxiety disorder
    "231504006", // Mixed anxiety and depressive disorder
    "47505003",  // Post-traumatic stress disorder
    "191736004", // Obsessive-compulsive disorder
    "33449004",  // Personality disorder
    "20010003",  // Borderline personality disorder
    "406506008", // Attention deficit hyperactivity disorder
    "56882008",  // Anorexia nervosa
];

/// SNOMED CT codes of substance-use disorders the substance misuse
/// service's view carries.
pub const SUBSTANCE_USE_DIAGNOSES: &[&str] = &[
    "75544000",  // Opioid dependence
    "191816009", // Drug dependence
    "26416006",  // Drug abuse
    "66590003",  // Alcohol dependence
    "7200002",   // Alcoholism
];

/// Psychotropic medicines (antidepressants, antipsychotics, mood
/// stabilisers, anxiolytics and hypnotics, ADHD medicines), by the name a
/// dm+d display starts with or contains.
pub const PSYCHOTROPIC_MEDICINES: &[&str] = &[
    "sertraline",
    "fluoxetine",
    "citalopram",
    "escitalopram",
    "paroxetine",
    "mirtazapine",
    "venlafaxine",
    "duloxetine",
    "amitriptyline",
    "trazodone",
    "vortioxetine",
    "olanzapine",
    "quetiapine",
    "risperidone",
    "aripiprazole",
    "clozapine",
    "haloperidol",
    "amisulpride",
    "paliperidone",
    "lurasidone",
    "zuclopenthixol",
    "flupentixol",
    "chlorpromazine",
    "lithium",
    "valproate",
    "lamotrigine",
    "carbamazepine",
    "diazepam",
    "lorazepam",
    "zopiclone",
    "zolpidem",
    "promethazine",
    "pregabalin",
    "methylphenidate",
    "atomoxetine",
    "lisdexamfetamine",
];

/// Opioid substitution medicines, by name: methadone and buprenorphine and
/// their UK brands. A buprenorphine patch (for pain: `transdermal`,
/// BuTrans, Transtec) is not one ([`is_opioid_substitution_medicine`]).
pub const OPIOID_SUBSTITUTION_MEDICINES: &[&str] = &[
    "methadone",
    "physeptone",
    "metharose",
    "methadose",
    "buprenorphine",
    "subutex",
    "espranor",
    "suboxone",
    "zubsolv",
    "buvidal",
    "sublocade",
];

/// Words that make a medicine named in [`OPIOID_SUBSTITUTION_MEDICINES`]
/// a pain patch, not opioid substitution.
const PAIN_PATCHES: &[&str] = &["transdermal", "patch", "butrans", "transtec"];

fn snomed_in(code: &Code, list: &[&str]) -> bool {
    code.system == SNOMED && list.contains(&code.code.as_str())
}

fn names(code: &Code, list: &[&str]) -> bool {
    let display = code.display.to_lowercase();
    list.iter().any(|name| display.contains(name))
}

/// A mental health diagnosis.
pub fn is_mental_health_diagnosis(d: &Diagnosis) -> bool {
    snomed_in(&d.code, MENTAL_HEALTH_DIAGNOSES)
}

/// A substance-use diagnosis.
pub fn is_substance_use_diagnosis(d: &Diagnosis) -> bool {
    snomed_in(&d.code, SUBSTANCE_USE_DIAGNOSES)
}

/// A psychotropic medicine.
pub fn is_psychotropic(m: &Medication) -> bool {
    names(&m.code, PSYCHOTROPIC_MEDICINES)
}

/// A psychotropic take-away supply.
pub fn is_psychotropic_prescription(p: &Prescription) -> bool {
    names(&p.code, PSYCHOTROPIC_MEDICINES)
}

/// A medicine used for opioid substitution therapy, by its name (dm+d
/// display or text), on any route but through the skin (`route` as
/// recorded, when it is).
pub fn is_opioid_substitution_medicine(code: &Code, route: Option<&str>) -> bool {
    // Through the skin, not under it: a monthly buprenorphine injection
    // (Buvidal) is subcutaneous, and is substitution therapy.
    let through_skin = route.is_some_and(|r| {
        let r = r.to_lowercase();
        r.contains("transdermal") || r.replace("subcutaneous", "").contains("cutaneous")
    });
    names(code, OPIOID_SUBSTITUTION_MEDICINES) && !names(code, PAIN_PATCHES) && !through_skin
}

/// A take-away supply of an opioid substitution medicine (a bridging or
/// take-home supply on release): the service that prescribes next must
/// know what was issued, or a patient is supplied twice.
pub fn is_ost_prescription(p: &Prescription) -> bool {
    is_opioid_substitution_medicine(&p.code, None)
}

/// Naloxone supplied on release (by name: `Naloxone 1.8mg nasal spray`,
/// `Prenoxad 1mg/1ml`, `Nyxoid`).
pub fn is_naloxone(p: &Prescription) -> bool {
    names(&p.code, &["naloxone", "prenoxad", "nyxoid"])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(system: &str, code: &str, display: &str) -> Code {
        Code {
            system: system.into(),
            code: code.into(),
            display: display.into(),
        }
    }

    #[test]
    fn diagnoses_are_recognised_by_snomed_code_only() {
        let depression = Diagnosis {
            code: code(SNOMED, "35489007", "Depressive disorder"),
            active: true,
            onset: None,
        };
        assert!(is_mental_health_diagnosis(&depression));
        assert!(!is_substance_use_diagnosis(&depression));
        let local = Diagnosis {
            code: code(
                "http://example.org/local",
                "35489007",
                "Depressive disorder",
            ),
            ..depression
        };
        assert!(!is_mental_health_diagnosis(&local));
    }

    #[test]
    fn medicines_are_recognised_by_name_whatever_the_case() {
        let p = |d: &str| Prescription {
            code: code(super::super::model::DMD, "1", d),
            status: "active".into(),
            intent: "order".into(),
            authored_on: None,
            dosage: None,
            quantity: None,
            days_supplied: None,
        };
        assert!(is_naloxone(&p("Naloxone 1.8mg/0.1ml nasal spray")));
        assert!(is_naloxone(&p("Prenoxad 1mg/1ml")));
        assert!(!is_naloxone(&p("Paracetamol 500mg tablets")));
        assert!(is_psychotropic_prescription(&p("Olanzapine 10mg tablets")));
        assert!(!is_psychotropic_prescription(&p("Ramipril 5mg capsules")));
        assert!(is_ost_prescription(&p(
            "Methadone 1mg/ml oral solution sugar free"
        )));
        assert!(is_ost_prescription(&p("Espranor 8mg oral lyophilisates")));
        assert!(is_ost_prescription(&p(
            "Buvidal 64mg/0.18ml prolonged-release injection"
        )));
        assert!(!is_ost_prescription(&p(
            "BuTrans 10micrograms/hour transdermal patches"
        )));
        assert!(!is_ost_prescription(&p("Naloxone 1.8mg/0.1ml nasal spray")));
        let oral = code(
            super::super::model::DMD,
            "1",
            "Buprenorphine 8mg sublingual tablets",
        );
        assert!(is_opioid_substitution_medicine(&oral, Some("Sublingual")));
        assert!(!is_opioid_substitution_medicine(
            &oral,
            Some("Transdermal route")
        ));
        let depot = code(
            super::super::model::DMD,
            "1",
            "Buvidal 128mg/0.36ml injection",
        );
        assert!(is_opioid_substitution_medicine(
            &depot,
            Some("Subcutaneous route")
        ));
    }
}
