//! Documents written by other systems: every element is carried, listed as
//! not carried, or refused; HL7 tables are read by meaning; prescriptions
//! to take away travel in every format.

use serde_json::{Value, json};
use throughcare::clinical::model::{ClinicalSummary, Code, DMD, Prescription, Quantity, RiskKind};
use throughcare::clinical::translate::{self, TextFormat};
use throughcare::clinical::views::View;
use throughcare::clinical::{Limits, fhir, hl7v2};
use throughcare::journey::JourneyEvent;

fn fixture(name: &str) -> ClinicalSummary {
    let path = format!(
        "{}/tests/fixtures/patients/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn naloxone() -> Prescription {
    Prescription {
        code: Code {
            system: DMD.into(),
            code: "3378311000001103".into(),
            display: "Naloxone 1.8mg/0.1ml nasal spray (invented example)".into(),
        },
        status: "active".into(),
        intent: "order".into(),
        authored_on: "2026-11-23T16:45:00+00:00".parse().ok(),
        dosage: Some("One spray into one nostril in suspected opioid overdose".into()),
        quantity: Some(Quantity {
            value: "2".into(),
            unit: "spray".into(),
        }),
        days_supplied: Some(28),
    }
}

fn fhir_json(s: &ClinicalSummary, event: JourneyEvent) -> Value {
    serde_json::from_slice(&fhir::render(s, event).bytes).unwrap()
}

fn parse_fhir(doc: &Value) -> Result<ClinicalSummary, throughcare::clinical::ValidationErrors> {
    fhir::parse(&serde_json::to_vec(doc).unwrap(), &Limits::default()).map(|p| p.summary)
}

fn entry_of<'a>(doc: &'a mut Value, kind: &str) -> (usize, &'a mut Value) {
    let entries = doc["entry"].as_array_mut().unwrap();
    let i = entries
        .iter()
        .position(|e| e["resource"]["resourceType"] == kind)
        .unwrap();
    (i, &mut entries[i]["resource"])
}

#[test]
fn a_resource_type_the_gateway_does_not_read_is_listed_for_the_gp_and_never_for_probation() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    doc["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "urn:uuid:6b1d4e1e-0000-4000-8000-000000000001",
        "resource": {"resourceType": "Procedure", "status": "completed",
                     "code": {"text": "Wound dressing"}, "subject": {"reference": "urn:x"}}
    }));
    let n = doc["entry"].as_array().unwrap().len() - 1;
    let read = parse_fhir(&doc).unwrap();
    let expected = format!(
        "entry[{n}].resource (Procedure): not read: a resource type the gateway does not read"
    );
    assert_eq!(read.not_read, std::slice::from_ref(&expected));
    for format in [TextFormat::Fhir, TextFormat::Hl7v2, TextFormat::ModelJson] {
        let out = translate::write(format, &read, View::Full, JourneyEvent::Release);
        assert!(
            out.not_carried.contains(&expected),
            "{format:?}: {:?}",
            out.not_carried
        );
        // A path can say what was withheld: probation and the treatment
        // services never see the notes on the sender's document.
        for view in [
            View::Probation,
            View::SubstanceMisuseService,
            View::MentalHealthTeam,
        ] {
            let out = translate::write(format, &read, view, JourneyEvent::Release);
            assert!(
                !out.not_carried.iter().any(|n| n.contains("entry[")),
                "{format:?} {view:?}: {:?}",
                out.not_carried
            );
        }
    }
    assert!(translate::notes(&read, View::Full).contains(&expected));
    assert!(!translate::notes(&read, View::Probation).contains(&expected));
}

#[test]
fn unknown_elements_and_extensions_are_listed_by_path_and_never_quote_values() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, patient) = entry_of(&mut doc, "Patient");
    patient["telecom"] = json!([{"system": "phone", "value": "07700 900123"}]);
    patient["extension"] =
        json!([{"url": "https://example.org/ethnicity", "valueString": "secret"}]);
    patient["name"][0]["prefix"] = json!(["Mx"]);
    patient["name"]
        .as_array_mut()
        .unwrap()
        .push(json!({"family": "Alias"}));
    let read = parse_fhir(&doc).unwrap();
    let at = format!("entry[{i}].resource.");
    let mut expected = vec![
        format!(
            "{at}extension[0] (https://example.org/ethnicity): an extension not read by the gateway"
        ),
        format!("{at}name[0].prefix: not read by the gateway"),
        format!("{at}name[1]: only the first repetition is read"),
        format!("{at}telecom: not read by the gateway"),
    ];
    expected.sort();
    let mut got = read.not_read.clone();
    got.sort();
    assert_eq!(got, expected);
    let text = got.join(" ");
    assert!(!text.contains("07700") && !text.contains("secret") && !text.contains("Alias"));
}

#[test]
fn an_unknown_modifier_extension_refuses_the_document() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    med["modifierExtension"] =
        json!([{"url": "https://example.org/not-given", "valueBoolean": true}]);
    let err = parse_fhir(&doc).unwrap_err();
    assert_eq!(err.0.len(), 1, "{err}");
    assert_eq!(
        err.0[0].field,
        format!("entry[{i}].resource.modifierExtension")
    );
}

#[test]
fn a_withdrawn_resource_is_listed_not_carried() {
    let mut s = fixture("06-many-medicines-and-allergies");
    s.diagnoses.clear();
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    med["status"] = json!("entered-in-error");
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.medications.len(), s.medications.len() - 1);
    assert!(
        read.not_read.contains(&format!(
            "entry[{i}].resource (MedicationStatement): not carried: entered in error"
        )),
        "{:?}",
        read.not_read
    );
}

/// FHIR allows `occurrenceString` ("in childhood") for an Immunization; the
/// model dates every vaccination, so it is listed, not refused (a whole
/// release summary refused for a vaccine's date was the failure).
#[test]
fn a_vaccination_dated_in_words_is_listed_and_the_document_taken() {
    let s = fixture("06-many-medicines-and-allergies");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, vaccine) = entry_of(&mut doc, "Immunization");
    let vaccine = vaccine.as_object_mut().unwrap();
    vaccine.remove("occurrenceDateTime");
    vaccine.insert("occurrenceString".into(), json!("in childhood"));
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.vaccinations.len(), s.vaccinations.len() - 1);
    assert!(
        read.not_read.contains(&format!(
            "entry[{i}].resource (Immunization): not carried: its date is recorded as text, not a date (occurrenceString)"
        )),
        "{:?}",
        read.not_read
    );
    assert!(!read.not_read.iter().any(|n| n.contains("childhood")));
}

#[test]
fn a_take_out_prescription_travels_in_every_format() {
    let mut s = fixture("01-ost-released-today");
    s.prescriptions.push(naloxone());
    let fhir_doc = fhir::render(&s, JourneyEvent::Release);
    let text = String::from_utf8(fhir_doc.bytes.clone()).unwrap();
    assert!(text.contains("\"resourceType\":\"MedicationRequest\""));
    let back = fhir::parse(&fhir_doc.bytes, &Limits::default())
        .unwrap()
        .summary;
    assert_eq!(back.prescriptions, s.prescriptions);
    assert!(back.not_read.is_empty(), "{:?}", back.not_read);
    let hl7 = hl7v2::render(&s, JourneyEvent::Release);
    let back = hl7v2::parse(&hl7.bytes, &Limits::default())
        .unwrap()
        .summary;
    assert_eq!(back.prescriptions, s.prescriptions);
    assert!(back.not_read.is_empty(), "{:?}", back.not_read);
    // Clinical content: the probation view leaves it out and says so.
    let probation = translate::write(TextFormat::Fhir, &s, View::Probation, JourneyEvent::Release);
    assert!(
        !String::from_utf8(probation.bytes)
            .unwrap()
            .contains("Naloxone")
    );
    assert!(
        probation
            .not_carried
            .iter()
            .any(|n| n.contains("prescriptions"))
    );
}

/// A medicine taken as needed (PRN) stays as needed in every format: read
/// as a scheduled dose it would be given when it should not be.
#[test]
fn a_medicine_taken_as_needed_stays_as_needed_in_every_format() {
    let mut s = fixture("01-ost-released-today");
    s.medications[0].as_needed = true;
    let doc = fhir_json(&s, JourneyEvent::Release);
    let text = doc.to_string();
    assert!(text.contains("\"asNeededBoolean\":true"), "{text}");
    let back = parse_fhir(&doc).unwrap();
    assert!(back.medications[0].as_needed);
    assert!(back.not_read.is_empty(), "{:?}", back.not_read);
    let hl7 = hl7v2::render(&s, JourneyEvent::Release);
    let back = hl7v2::parse(&hl7.bytes, &Limits::default())
        .unwrap()
        .summary;
    assert!(back.medications[0].as_needed);
    assert!(back.not_read.is_empty(), "{:?}", back.not_read);
    // A scheduled medicine writes nothing about it, and reads as scheduled.
    s.medications[0].as_needed = false;
    assert!(
        !fhir_json(&s, JourneyEvent::Release)
            .to_string()
            .contains("asNeeded")
    );
    let hl7 = String::from_utf8(hl7v2::render(&s, JourneyEvent::Release).bytes).unwrap();
    assert!(!hl7.contains("PRN"), "{hl7}");
    // Needed for a reason is as needed; the reason is listed, not dropped.
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        m["dosage"][0]["asNeededCodeableConcept"] = json!({"text": "for pain"});
    });
    assert!(read.medications[0].as_needed);
    assert_listed(&read, "asNeededCodeableConcept");
    // In HL7 v2 the flag is Y or N; anything else is refused, not read as no.
    let segments = hl7_release(|segs| {
        let at = segs
            .iter()
            .position(|l| l.contains("|MED-SUPERVISED^"))
            .unwrap();
        let mut parts: Vec<String> = segs[at].split('|').map(String::from).collect();
        parts[3] = parts[3].replace("MED-SUPERVISED^Supervised", "MED-PRN^As needed");
        parts[5] = "maybe".into();
        segs.insert(at + 1, parts.join("|"));
    });
    let refused = parse_hl7(&segments).unwrap_err();
    assert!(
        refused
            .0
            .iter()
            .any(|v| v.field.ends_with("-5") && v.description.contains("Y or N")),
        "{refused:?}"
    );
}

/// A diagnosis or an allergy recorded in words only (valid FHIR: a
/// CodeableConcept may hold only `text`; HL7 CE.2 alone) is carried as
/// words in every format, where before it refused the whole summary. A
/// medicine needs its code still, and blank words are no record at all.
#[test]
fn a_diagnosis_or_allergy_in_words_only_is_carried_in_every_format() {
    use throughcare::clinical::model::Code;
    let read = read_after(&fixture("06-many-medicines-and-allergies"), |doc| {
        let (_, c) = entry_of(doc, "Condition");
        c["code"] = json!({"text": "Anxiety since a head injury"});
        let (_, a) = entry_of(doc, "AllergyIntolerance");
        a["code"] = json!({"coding": [{"display": "Sticking plasters"}]});
    });
    assert_eq!(
        read.diagnoses[0].code,
        Code::words("Anxiety since a head injury")
    );
    assert_eq!(
        read.allergies[0].substance,
        Code::words("Sticking plasters")
    );
    // Written back: the words alone, in FHIR, HL7 v2 and the native form.
    let doc = fhir_json(&read, JourneyEvent::Release);
    let mut written = doc.clone();
    let (_, c) = entry_of(&mut written, "Condition");
    assert_eq!(c["code"], json!({"text": "Anxiety since a head injury"}));
    assert_eq!(parse_fhir(&doc).unwrap().diagnoses, read.diagnoses);
    let hl7 = hl7v2::render(&read, JourneyEvent::Release);
    let text = String::from_utf8(hl7.bytes.clone()).unwrap();
    assert!(text.contains("|^Anxiety since a head injury|"), "{text}");
    assert!(
        !hl7.not_carried.iter().any(|n| n.contains("local")),
        "{:?}",
        hl7.not_carried
    );
    let back = hl7v2::parse(&hl7.bytes, &Limits::default())
        .unwrap()
        .summary;
    assert_eq!(
        (back.diagnoses, back.allergies),
        (read.diagnoses.clone(), read.allergies.clone())
    );
    let mut v = throughcare::clinical::ValidationErrors::default();
    let native = throughcare::grpc::summary::from_wire(
        throughcare::grpc::summary::to_wire(&read),
        "summary",
        &mut v,
    )
    .unwrap();
    assert_eq!(native.diagnoses, read.diagnoses);
    // HL7: a CE whose identifier is its alternate (CE.4-6) is that code; a
    // coding system named for no code leaves the words.
    let s = fixture("06-many-medicines-and-allergies");
    for (ce, want) in [
        (
            "^Asthma^^195967001^Asthma^SCT",
            Code {
                system: throughcare::clinical::model::SNOMED.into(),
                code: "195967001".into(),
                display: "Asthma".into(),
            },
        ),
        ("^Penicillin^SCT", Code::words("Penicillin")),
    ] {
        let segments = hl7_of(&s, |segs| {
            let mut fields: Vec<String> =
                segment(segs, "DG1").split('|').map(String::from).collect();
            fields[3] = ce.into();
            *segment(segs, "DG1") = fields.join("|");
        });
        let read = parse_hl7(&segments).unwrap_or_else(|e| panic!("{ce}: {e:?}"));
        assert_eq!(read.diagnoses[0].code, want, "{ce}");
    }
    // FHIR: an allergy in words beside its reaction's coded substance is
    // carried by the code (it routes and matches), the words listed.
    let read = read_after(&s, |doc| {
        let (_, a) = entry_of(doc, "AllergyIntolerance");
        a["code"] = json!({"text": "penicillin"});
        a["reaction"][0]["substance"] = json!({"coding": [{
            "system": "http://snomed.info/sct", "code": "764146007", "display": "Penicillin"
        }]});
    });
    assert_eq!(read.allergies[0].substance.code, "764146007");
    assert_listed(&read, "in words beside");
    // A medicine in words only, or a diagnosis with no words, is refused.
    let refused = refused_at(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        m["medicationCodeableConcept"] = json!({"text": "methadone"});
    });
    assert!(
        refused
            .iter()
            .any(|f| f.ends_with("medicationCodeableConcept.coding")),
        "{refused:?}"
    );
    let refused = refused_at(&s, |doc| {
        let (_, c) = entry_of(doc, "Condition");
        c["code"] = json!({"text": "  "});
    });
    assert!(
        refused.iter().any(|f| f.ends_with("code.coding")),
        "{refused:?}"
    );
}

fn hl7_release(edit: impl FnOnce(&mut Vec<String>)) -> Vec<String> {
    hl7_of(&fixture("01-ost-released-today"), edit)
}

/// `s` as an HL7 v2 release, one string per segment, after `edit`.
fn hl7_of(s: &ClinicalSummary, edit: impl FnOnce(&mut Vec<String>)) -> Vec<String> {
    let text = String::from_utf8(hl7v2::render(s, JourneyEvent::Release).bytes).unwrap();
    let mut segments: Vec<String> = text
        .split('\r')
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    edit(&mut segments);
    segments
}

fn parse_hl7(
    segments: &[String],
) -> Result<ClinicalSummary, throughcare::clinical::ValidationErrors> {
    hl7v2::parse(segments.join("\r").as_bytes(), &Limits::default()).map(|p| p.summary)
}

fn segment<'a>(segments: &'a mut [String], id: &str) -> &'a mut String {
    segments.iter_mut().find(|s| s.starts_with(id)).unwrap()
}

#[test]
fn hl7_segments_fields_and_repetitions_not_read_are_listed() {
    let segments = hl7_release(|segs| {
        segs.insert(3, "NK1|1|Contact^Invented|SIS".into());
        segs.push("ZXY|1|local".into());
        let pid = segment(segs, "PID");
        // PID-13 (phone) and a second address.
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields.resize(14, String::new());
        fields[11] = format!("{}~2 Other Road^^Elsewhere^^ZZ9 9ZZ^^H", fields[11]);
        fields[13] = "07700900123".into();
        *pid = fields.join("|");
    });
    let read = parse_hl7(&segments).unwrap();
    let mut got = read.not_read.clone();
    got.sort();
    assert_eq!(
        got,
        [
            "NK1: a segment the gateway does not read here",
            "PID-11[2]: only the first repetition is read",
            "PID-13: not read by the gateway",
            "ZXY: a segment the gateway does not read here",
        ]
    );
}

#[test]
fn dg1_type_follows_table_0052_a_final_diagnosis_is_active() {
    let mut s = fixture("07-refused-probation-consent");
    let first = s.diagnoses[0].clone();
    s.diagnoses.extend([first.clone(), first]);
    for (i, d) in s.diagnoses.iter_mut().enumerate() {
        d.active = i % 2 == 0;
    }
    let text = String::from_utf8(hl7v2::render(&s, JourneyEvent::Release).bytes).unwrap();
    assert!(text.contains("DG1|1|"));
    // Every DG1 says final; the resolved one is marked in its own OBX.
    let back = hl7v2::parse(text.as_bytes(), &Limits::default())
        .unwrap()
        .summary;
    assert_eq!(back.diagnoses, s.diagnoses);
    for code in ["A", "W", "F"] {
        let segments = hl7_release(|segs| {
            segs.push(format!(
                "DG1|9||F11.2^Opioid dependence^I10||20200101|{code}"
            ));
        });
        let read = parse_hl7(&segments).unwrap();
        assert!(read.diagnoses.iter().all(|d| d.active), "{code}");
    }
    let segments = hl7_release(|segs| segs.push("DG1|9||F11.2^x^I10|||R".into()));
    let err = parse_hl7(&segments).unwrap_err();
    let field = &err.0[0].field;
    assert!(field.starts_with("DG1") && field.ends_with("-6"), "{err}");
}

/// HL7 table 0206: DG1-21 `D` deletes the diagnosis. It must not be
/// carried as an active one; a `DX-ACTIVE` OBX still names its DG1 by
/// position.
#[test]
fn a_dg1_the_sender_deletes_is_left_out_and_the_others_keep_their_status() {
    let segments = hl7_release(|segs| {
        segs.retain(|s| !s.starts_with("DG1"));
        segs.push("DG1|1||F11.2^Opioid dependence^I10||20200101|F".into());
        segs.push(format!("DG1|2||B24^HIV^I10||20200101|F{}D", "|".repeat(15)));
        segs.push(format!(
            "DG1|3||F20.9^Schizophrenia^I10||20200101|F{}X",
            "|".repeat(15)
        ));
        segs.push("OBX|1|ST|DX-ACTIVE^Active^THROUGHCARE|3|N".into());
    });
    let read = parse_hl7(&segments).unwrap();
    let codes: Vec<(&str, bool)> = read
        .diagnoses
        .iter()
        .map(|d| (d.code.code.as_str(), d.active))
        .collect();
    assert_eq!(codes, [("F11.2", true), ("F20.9", false)]);
    // The status goes to the DG1 its set ID names, in whatever order the
    // DG1s come: sub-ID 1 is the DG1 numbered 1, written second here.
    let out_of_order = hl7_release(|segs| {
        segs.retain(|s| !s.starts_with("DG1"));
        segs.push("DG1|2||B24^HIV^I10||20200101|F".into());
        segs.push("DG1|1||B18.2^Hepatitis C^I10||20200101|F".into());
        segs.push("OBX|1|ST|DX-ACTIVE^Active^THROUGHCARE|1|N".into());
    });
    let shuffled = parse_hl7(&out_of_order).unwrap();
    let statuses: Vec<(&str, bool)> = shuffled
        .diagnoses
        .iter()
        .map(|d| (d.code.code.as_str(), d.active))
        .collect();
    assert_eq!(statuses, [("B24", true), ("B18.2", false)]);
    // Two DG1s with one set ID: a status naming it could mean either.
    let twice = hl7_release(|segs| {
        segs.retain(|s| !s.starts_with("DG1"));
        segs.push("DG1|1||B24^HIV^I10||20200101|F".into());
        segs.push("DG1|1||B18.2^Hepatitis C^I10||20200101|F".into());
    });
    let err = parse_hl7(&twice).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field.starts_with("DG1") && v.field.ends_with("-1")),
        "{err}"
    );
    assert!(
        read.not_read
            .iter()
            .any(|n| n.contains("-21: a diagnosis the sender deleted")),
        "{:?}",
        read.not_read
    );
    // Table 0396: SNM is the older SNOMED; an SCTID-shaped code under it is
    // read as SNOMED CT, any other keeps its own system.
    let segments = hl7_release(|segs| {
        segs.retain(|s| !s.starts_with("DG1"));
        segs.push("DG1|1||22298006^Myocardial infarction^SNM||20200101|F".into());
        segs.push("DG1|2||D3-15000^Myocardial infarction^SNM||20200101|F".into());
    });
    let read = parse_hl7(&segments).unwrap();
    let systems: Vec<&str> = read
        .diagnoses
        .iter()
        .map(|d| d.code.system.as_str())
        .collect();
    assert_eq!(systems, ["http://snomed.info/sct", "SNM"]);
    let segments = hl7_release(|segs| {
        segs.push(format!("DG1|9||B24^HIV^I10||20200101|F{}Q", "|".repeat(15)));
    });
    let err = parse_hl7(&segments).unwrap_err();
    assert!(err.0.iter().any(|v| v.field.ends_with("-21")), "{err}");
}

/// HL7 v2.5 §2.5.4: `&` separates subcomponents. FN (PID-5.1), HD (PID-3.4,
/// PV1-3.4) and SAD (PID-11.1) have them, and the first is the value:
/// before, `SMITH&&` became the family name `SMITH\T\\T\` downstream, the
/// prison number went unread and the ODS code in PV1-3.4 was refused.
/// CR ends a segment; an LF inside a CR-terminated message never starts
/// one. AL1-2 is not invented on output.
#[test]
fn subcomponents_are_read_by_their_first_and_only_cr_ends_a_segment() {
    let s = fixture("01-ost-released-today");
    let edit_field = |segs: &mut Vec<String>, id: &str, n: usize, f: &dyn Fn(&str) -> String| {
        let seg = segment(segs, id);
        let mut fields: Vec<String> = seg.split('|').map(String::from).collect();
        fields[n] = f(&fields[n]);
        *seg = fields.join("|");
    };
    let segments = hl7_release(|segs| {
        edit_field(segs, "PID", 5, &|f| {
            let mut comps: Vec<String> = f.split('^').map(String::from).collect();
            comps[0].push_str("&&");
            comps.join("^")
        });
        edit_field(segs, "PID", 3, &|f| {
            f.replace(
                "^^^HMPPS^",
                "^^^HMPPS&2.16.840.1.113883.2.1.3.2.4.18.48&ISO^",
            )
        });
        edit_field(segs, "PV1", 3, &|f| {
            let mut comps: Vec<String> = f.split('^').map(String::from).collect();
            comps[3].push_str("&2.16.840.1.113883.2.1.4.3&ISO");
            comps.join("^")
        });
    });
    assert!(
        segments.iter().any(|l| l.contains("HMPPS&")),
        "{segments:?}"
    );
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(read.patient.family_name, s.patient.family_name);
    assert_eq!(read.patient.prison_number, s.patient.prison_number);
    assert_eq!(read.custody.establishment, s.custody.establishment);

    // A raw LF inside a note of a CR-terminated message is no segment break.
    let mut text = hl7_release(|_| {}).join("\r");
    text.push_str("\rNTE|1||take with food\nAL1|9||^Peanut");
    match hl7v2::parse(text.as_bytes(), &Limits::default()) {
        Ok(p) => assert_eq!(p.summary.allergies, s.allergies),
        Err(e) => assert!(!e.0.is_empty()),
    }
    // CRLF and LF-only messages still read.
    let crlf = hl7_release(|_| {}).join("\r\n");
    assert_eq!(
        hl7v2::parse(crlf.as_bytes(), &Limits::default())
            .unwrap()
            .summary
            .allergies,
        s.allergies
    );
    let lf = hl7_release(|_| {}).join("\n");
    assert!(hl7v2::parse(lf.as_bytes(), &Limits::default()).is_ok());

    // PID-11.7 BA (table 0190, bad address) is no release address.
    let segments = hl7_release(|segs| {
        edit_field(segs, "PID", 11, &|f| {
            let mut comps: Vec<String> = f.split('^').map(String::from).collect();
            comps.resize(7, String::new());
            comps[6] = "BA".into();
            comps.join("^")
        });
    });
    match parse_hl7(&segments) {
        Ok(read) => {
            assert_eq!(read.custody.release_address, None);
            assert!(
                read.not_read
                    .iter()
                    .any(|n| n.starts_with("PID-11: not carried"))
            );
        }
        Err(e) => assert!(
            e.0.iter()
                .any(|v| v.field.contains("address") || v.field.starts_with("PID-11")),
            "{e}"
        ),
    }

    let s = fixture("06-many-medicines-and-allergies");
    let text = String::from_utf8(hl7v2::render(&s, JourneyEvent::Release).bytes).unwrap();
    assert!(
        text.split('\r')
            .filter(|l| l.starts_with("AL1|"))
            .all(|l| l.split('|').nth(2) == Some(""))
    );
}

#[test]
fn pv1_6_is_the_sending_location_only_on_a02_and_null_reads_as_absent() {
    let segments = hl7_release(|segs| {
        let pv1 = segment(segs, "PV1");
        let mut fields: Vec<String> = pv1.split('|').map(String::from).collect();
        fields[6] = "WARD 3^^^Not an ODS code".into();
        *pv1 = fields.join("|");
        segment(segs, "PID").push_str("|\"\"");
    });
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(read.custody.establishment.as_str(), "YP001");
    assert_eq!(read.not_read, ["PV1-6: not read by the gateway"]);
}

/// Rewrites every urn:uuid fullUrl as a RESTful one and every reference as
/// `Type/id`, as a server would write the same document.
fn restful(doc: &mut Value) {
    let mut ids = std::collections::HashMap::new();
    for (n, e) in doc["entry"].as_array_mut().unwrap().iter_mut().enumerate() {
        let kind = e["resource"]["resourceType"].as_str().unwrap().to_owned();
        let id = format!("r{n}");
        ids.insert(
            e["fullUrl"].as_str().unwrap().to_owned(),
            format!("{kind}/{id}"),
        );
        e["resource"]["id"] = json!(id);
        e["fullUrl"] = json!(format!("https://fhir.example.org/R4/{kind}/{id}"));
    }
    fn rewrite(v: &mut Value, ids: &std::collections::HashMap<String, String>) {
        match v {
            Value::Object(map) => {
                for (k, x) in map.iter_mut() {
                    match x {
                        Value::String(s) if k == "reference" => {
                            if let Some(r) = ids.get(s.as_str()) {
                                *s = r.clone();
                            }
                        }
                        _ => rewrite(x, ids),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|x| rewrite(x, ids)),
            _ => {}
        }
    }
    rewrite(doc, &ids);
}

#[test]
fn references_resolve_by_the_bundle_rules_and_section_codes_are_optional() {
    let mut s = fixture("06-many-medicines-and-allergies");
    s.prescriptions.push(naloxone());
    let reference = parse_fhir(&fhir_json(&s, JourneyEvent::Release)).unwrap();
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    restful(&mut doc);
    for section in doc["entry"][0]["resource"]["section"]
        .as_array_mut()
        .unwrap()
    {
        section.as_object_mut().unwrap().remove("code");
    }
    assert!(doc.to_string().contains("\"reference\":\"Patient/r"));
    assert_eq!(parse_fhir(&doc).unwrap(), reference);
}

#[test]
fn an_encounter_period_written_as_a_date_time_is_read_and_its_time_listed() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, enc) = entry_of(&mut doc, "Encounter");
    enc["period"]["start"] = json!("2026-09-02T10:30:00+01:00");
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.custody.reception_date, "2026-09-02".parse().ok());
    assert_eq!(
        read.not_read,
        [format!(
            "entry[{i}].resource.period.start: the time of day is not carried"
        )]
    );
    let (_, enc) = entry_of(&mut doc, "Encounter");
    enc["period"]["start"] = json!("2026-09");
    let err = parse_fhir(&doc).unwrap_err();
    assert_eq!(err.0[0].field, format!("entry[{i}].resource.period.start"));
}

#[test]
fn partial_dates_and_fractional_times_keep_their_precision_in_both_formats() {
    let mut s = fixture("03-hepatitis-c-transfer");
    s.vaccinations[0].date = "2019".parse().unwrap();
    s.diagnoses[0].onset = Some("2014-06".parse().unwrap());
    s.authored_at = "2026-11-24T08:10:00.25+01:00".parse().unwrap();
    let event = JourneyEvent::Transfer;
    let fhir_back = fhir::parse(&fhir::render(&s, event).bytes, &Limits::default()).unwrap();
    let hl7_text = hl7v2::render(&s, event).bytes;
    assert!(String::from_utf8_lossy(&hl7_text).contains("|2019|"));
    let hl7_back = hl7v2::parse(&hl7_text, &Limits::default()).unwrap();
    for back in [fhir_back.summary, hl7_back.summary] {
        assert_eq!(back.vaccinations, s.vaccinations);
        assert_eq!(back.diagnoses[0].onset, s.diagnoses[0].onset);
        assert_eq!(back.authored_at, s.authored_at);
    }
}

#[test]
fn one_date_of_birth_rule_for_every_document() {
    let mut s = fixture("01-ost-released-today");
    for dob in ["1899-12-31", "2999-01-01"] {
        s.patient.date_of_birth = dob.parse().unwrap();
        let err = throughcare::clinical::validate(&s, JourneyEvent::Release).unwrap_err();
        assert_eq!(err.0[0].field, "summary.patient.date_of_birth", "{dob}");
    }
    s.patient.date_of_birth = "1900-01-01".parse().unwrap();
    throughcare::clinical::validate(&s, JourneyEvent::Release).unwrap();
}

#[test]
fn an_obx_value_is_its_first_repetition_and_component() {
    // HL7 v2.5.1 §2.5.3: an unescaped `~` separates repetitions and `^`
    // components; an ST value has none. Both were read into the dose.
    for (value, dose, note) in [
        (
            "2 puffs~10 puffs",
            "2 puffs",
            "-5[2]: only the first repetition is read",
        ),
        ("60 mg^x", "60 mg", "-5.2: not read by the gateway"),
        ("60 mg\\S\\x", "60 mg^x", ""),
    ] {
        let segments = hl7_release(|segs| {
            let obx = segs.iter_mut().find(|s| s.contains("MED-DOSE")).unwrap();
            let mut fields: Vec<String> = obx.split('|').map(String::from).collect();
            fields[5] = value.into();
            *obx = fields.join("|");
        });
        let read = parse_hl7(&segments).unwrap();
        assert_eq!(read.medications[0].dose, dose, "{value}");
        let noted = read
            .not_read
            .iter()
            .any(|n| n.starts_with("OBX") && n.ends_with(note));
        assert_eq!(noted, !note.is_empty(), "{value}: {:?}", read.not_read);
    }
}

#[test]
fn an_hl7_date_that_is_no_day_is_a_data_type_error_where_it_is() {
    use throughcare::clinical::hl7v2::ErrorCode;
    let code_of = |segments: &[String]| {
        let err = parse_hl7(segments).unwrap_err();
        let v = &err.0[0];
        (
            v.field.clone(),
            ErrorCode::of_violation(&v.field, &v.description),
        )
    };
    // Present but no day the calendar has: 102 (HL7 table 0357), not 101.
    let segments = hl7_release(|segs| {
        let pid = segment(segs, "PID");
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields[7] = "20230229".into();
        *pid = fields.join("|");
    });
    assert_eq!(code_of(&segments), ("PID-7".into(), ErrorCode::DataType));
    let segments = hl7_release(|segs| {
        let pid = segment(segs, "PID");
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields[7] = String::new();
        *pid = fields.join("|");
    });
    assert_eq!(
        code_of(&segments),
        ("PID-7".into(), ErrorCode::RequiredFieldMissing)
    );
    // A vaccination's date: the error is at its own OBX, not the code's.
    let s = fixture("03-hepatitis-c-transfer");
    let segments = hl7_of(&s, |segs| {
        let obx = segs.iter_mut().find(|s| s.contains("VAC-DATE")).unwrap();
        let mut fields: Vec<String> = obx.split('|').map(String::from).collect();
        fields[5] = "20230229".into();
        *obx = fields.join("|");
    });
    let at = segments
        .iter()
        .filter(|s| s.starts_with("OBX"))
        .position(|s| s.contains("VAC-DATE"))
        .unwrap();
    assert_eq!(
        code_of(&segments),
        (format!("OBX({})-5", at + 1), ErrorCode::DataType)
    );
}

#[test]
fn hl7_tables_0001_0085_0127_0128_are_read_by_meaning() {
    let segments = hl7_release(|segs| {
        let obx = segs.iter_mut().find(|s| s.contains("MED-DOSE")).unwrap();
        *obx = obx.replace("||||||F", "||||||W");
        segs.push("AL1|9|FA|227493005^Cashew nuts^SCT|U|Hives".into());
    });
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(
        read.medications[0].dose, "",
        "a withdrawn OBX is not carried"
    );
    assert!(
        read.not_read
            .iter()
            .any(|n| n.ends_with("OBX-11 result status W (HL7 table 0085)"))
    );
    let nuts = read.allergies.last().unwrap();
    assert_eq!(
        (nuts.substance.code.as_str(), nuts.severity),
        ("227493005", None)
    );
    assert!(
        read.not_read
            .iter()
            .any(|n| n.starts_with("AL1") && n.contains("-2: the allergen type"))
    );
    for (bad, field) in [("AL1|9|XX|1^x^SCT", "-2"), ("AL1|9|DA|1^x^SCT|HIGH", "-4")] {
        let segments = hl7_release(|segs| segs.push(bad.into()));
        let err = parse_hl7(&segments).unwrap_err();
        assert!(err.0[0].field.ends_with(field), "{err}");
    }
    let segments = hl7_release(|segs| {
        let pid = segment(segs, "PID");
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields[8] = "Q".into();
        *pid = fields.join("|");
    });
    assert_eq!(parse_hl7(&segments).unwrap_err().0[0].field, "PID-8");
}

#[test]
fn bundle_level_elements_and_a_messages_envelope_are_listed() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    doc["signature"] = json!({"type": [{"code": "1.2.840.10065.1.12.1.1"}]});
    doc["entry"][1]["search"] = json!({"mode": "match"});
    let read = parse_fhir(&doc).unwrap();
    let mut got = read.not_read.clone();
    got.sort();
    assert_eq!(
        got,
        [
            "entry[1].search: not read by the gateway",
            "signature: not read by the gateway"
        ]
    );
    let message = json!({
        "resourceType": "Bundle", "type": "message",
        "entry": [
            {"fullUrl": "urn:uuid:6b1d4e1e-0000-4000-8000-0000000000aa",
             "resource": {"resourceType": "MessageHeader", "eventCoding": {"code": "x"}}},
            {"fullUrl": "urn:uuid:6b1d4e1e-0000-4000-8000-0000000000bb", "resource": fhir_json(&s, JourneyEvent::Release)}
        ]
    });
    let read = parse_fhir(&message).unwrap();
    assert_eq!(
        read.not_read,
        ["entry[0].resource (MessageHeader): not read: the message around the document"]
    );
    // bdl-12: the MessageHeader comes first.
    let mut swapped = message.clone();
    swapped["entry"].as_array_mut().unwrap().swap(0, 1);
    let e = parse_fhir(&swapped).unwrap_err();
    assert_eq!(e.0[0].field, "entry[0].resource.resourceType", "{e:?}");
    // A second document (another person's, here) is refused, not passed over.
    let mut two = message.clone();
    let mut other = fhir_json(&fixture("03-hepatitis-c-transfer"), JourneyEvent::Transfer);
    other["id"] = json!("second-document");
    two["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "urn:uuid:6b1d4e1e-0000-4000-8000-0000000000cc", "resource": other
    }));
    let e = parse_fhir(&two).unwrap_err();
    assert_eq!(e.0[0].field, "entry[2].resource", "{e:?}");
}

#[test]
fn an_obx_field_given_twice_lists_the_one_not_read() {
    let segments = hl7_release(|segs| {
        let dose = segs.iter().position(|s| s.contains("MED-DOSE")).unwrap();
        let again = segs[dose].clone();
        segs.insert(dose + 1, again);
    });
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(read.not_read.len(), 1, "{:?}", read.not_read);
    assert!(read.not_read[0].ends_with("-5: not read: the item gives this field again later"));
}

#[test]
fn msh_beyond_the_envelope_is_listed_and_a_training_message_refused() {
    let segments = hl7_release(|segs| {
        let msh = segment(segs, "MSH");
        // Ours ends with MSH-18; give MSH-15 and MSH-16 instead.
        *msh = msh.replace("||||||UNICODE UTF-8", "|||AL|NE");
    });
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(
        read.not_read,
        [
            "MSH-15: not read by the gateway",
            "MSH-16: not read by the gateway"
        ]
    );
    let segments = hl7_release(|segs| {
        let msh = segment(segs, "MSH");
        *msh = msh.replace("|P|2.5.1", "|T|2.5.1");
    });
    assert_eq!(parse_hl7(&segments).unwrap_err().0[0].field, "MSH-11");
}

/// Yes/no and coded OBX values outside their tables are refused by field,
/// never read as "no": a lower-case `y` on opioid substitution or on an
/// active suicide risk must not switch it off (nor skip the last-dose check).
#[test]
fn hl7_flags_and_coded_items_outside_their_tables_are_refused_not_read_as_no() {
    let s = fixture("01-ost-released-today");
    assert!(
        s.risks.iter().any(|r| r.active),
        "the fixture has an active risk"
    );
    for (field, bad) in [
        ("MED-OST", "y"),
        ("MED-SUPERVISED", "yes"),
        ("RISK-ACTIVE", "YES"),
        ("CONSENT-PROBATION", "Given"),
        ("FU-KIND", "Appointment"),
    ] {
        let segments = hl7_release(|segs| {
            let at = segs
                .iter()
                .position(|s| s.contains(&format!("|{field}^")))
                .unwrap_or_else(|| panic!("the fixture writes {field}"));
            let mut parts: Vec<String> = segs[at].split('|').map(String::from).collect();
            parts[5] = bad.into();
            segs[at] = parts.join("|");
        });
        let refused = parse_hl7(&segments).expect_err(field);
        assert!(
            refused.0.iter().any(|v| v.field.starts_with("OBX(")
                && v.field.ends_with("-5")
                && (v.description.contains("Y or N") || v.description.contains("must be one of"))),
            "{field}={bad}: {refused:?}"
        );
    }
}

/// A status that says a resource is not current is not carried as current:
/// a methadone prescription stopped in custody, a referral revoked, an
/// allergy resolved are set aside and listed, never delivered as active.
#[test]
fn resources_that_are_not_current_are_listed_not_carried_as_current() {
    let s = fixture("01-ost-released-today");
    assert!(s.medications.iter().any(|m| m.opioid_substitution));
    for (kind, edit, why) in [
        (
            "MedicationStatement",
            json!({"status": "stopped"}),
            "not a current medicine (status stopped)",
        ),
        (
            "MedicationStatement",
            json!({"status": "on-hold"}),
            "not a current medicine (status on-hold)",
        ),
        (
            "ServiceRequest",
            json!({"status": "revoked"}),
            "not a referral or appointment in place (status revoked)",
        ),
    ] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, resource) = entry_of(&mut doc, kind);
        for (k, v) in edit.as_object().unwrap() {
            resource[k] = v.clone();
        }
        let read = parse_fhir(&doc).unwrap();
        assert!(
            read.not_read
                .contains(&format!("entry[{i}].resource ({kind}): not carried: {why}")),
            "{kind}: {:?}",
            read.not_read
        );
        match kind {
            "MedicationStatement" => {
                assert_eq!(read.medications.len(), s.medications.len() - 1);
                assert!(!read.medications.iter().any(|m| m.opioid_substitution));
            }
            _ => assert_eq!(read.follow_ups.len(), s.follow_ups.len() - 1),
        }
    }
    let mut s = fixture("06-many-medicines-and-allergies");
    s.diagnoses.clear();
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, allergy) = entry_of(&mut doc, "AllergyIntolerance");
    allergy["clinicalStatus"] = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical",
        "code": "resolved"
    }]});
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.allergies.len(), s.allergies.len() - 1);
    assert!(read.not_read.contains(&format!(
        "entry[{i}].resource (AllergyIntolerance): not carried: no longer active (clinicalStatus)"
    )));
    // An observation not yet final is carried (written final) and says so.
    let s = fixture("02-active-self-harm");
    for status in ["preliminary", "registered", "unknown"] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, observation) = entry_of(&mut doc, "Observation");
        observation["status"] = json!(status);
        let read = parse_fhir(&doc).unwrap();
        assert_eq!(read.mental_health, s.mental_health, "{status}");
        assert_eq!(
            read.not_read,
            [format!(
                "entry[{i}].resource.status: not carried: {status} (carried as final)"
            )]
        );
    }
}

/// FHIR modifiers that turn a request or a dose around: a ServiceRequest
/// not to do something, or only proposed or planned, is no referral in
/// place (probation would read "treatment referral in place"); a
/// subpotent vaccination did not count. Statuses outside their required
/// bindings are refused; a yes-or-no observation without its boolean is
/// refused, never read as "no"; a condition no longer active is written
/// `inactive`, which claims no more than the model knows.
#[test]
fn a_status_outside_its_required_binding_refuses_the_document() {
    let s = fixture("01-ost-released-today");
    // Every status the reader acts on is a required binding: a code outside
    // it refuses the document. "Active" read as not current dropped the
    // methadone statement (and the release's urgency) with only a note.
    for kind in [
        "MedicationStatement",
        "ServiceRequest",
        "Consent",
        "Encounter",
    ] {
        for status in [json!("Active"), json!("bogus"), json!(null)] {
            let mut doc = fhir_json(&s, JourneyEvent::Release);
            let (i, resource) = entry_of(&mut doc, kind);
            if status.is_null() {
                resource.as_object_mut().unwrap().remove("status");
            } else {
                resource["status"] = status.clone();
            }
            let err = parse_fhir(&doc).expect_err(&format!("{kind} status {status}"));
            assert!(
                err.0
                    .iter()
                    .any(|v| v.field == format!("entry[{i}].resource.status")),
                "{kind} {status}: {err}"
            );
        }
    }
}

#[test]
fn modifiers_on_requests_and_vaccinations_are_honoured_and_bindings_kept() {
    let s = fixture("01-ost-released-today");
    for (edit, why) in [
        (
            json!({"doNotPerform": true}),
            "a request not to do this (doNotPerform)",
        ),
        (
            json!({"intent": "proposal"}),
            "not a referral or appointment in place (intent proposal)",
        ),
        (
            json!({"intent": "plan"}),
            "not a referral or appointment in place (intent plan)",
        ),
    ] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, resource) = entry_of(&mut doc, "ServiceRequest");
        for (k, v) in edit.as_object().unwrap() {
            resource[k] = v.clone();
        }
        let read = parse_fhir(&doc).unwrap();
        assert_eq!(read.follow_ups.len(), s.follow_ups.len() - 1, "{why}");
        assert!(
            read.not_read.contains(&format!(
                "entry[{i}].resource (ServiceRequest): not carried: {why}"
            )),
            "{:?}",
            read.not_read
        );
    }
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, resource) = entry_of(&mut doc, "ServiceRequest");
    resource["intent"] = json!("Order");
    let err = parse_fhir(&doc).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.intent")),
        "{err}"
    );

    let s = fixture("03-hepatitis-c-transfer");
    assert!(!s.vaccinations.is_empty());
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, resource) = entry_of(&mut doc, "Immunization");
    resource["isSubpotent"] = json!(true);
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.vaccinations.len(), s.vaccinations.len() - 1);
    assert!(read.not_read.contains(&format!(
        "entry[{i}].resource (Immunization): not carried: a dose that did not count (isSubpotent)"
    )));
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, resource) = entry_of(&mut doc, "Immunization");
    resource["status"] = json!("NOT-DONE");
    let err = parse_fhir(&doc).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.status")),
        "{err}"
    );

    let s = fixture("02-active-self-harm");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let entries = doc["entry"].as_array_mut().unwrap();
    let (i, cpa) = entries
        .iter_mut()
        .enumerate()
        .find(|(_, e)| e["resource"]["code"]["coding"][0]["code"] == "care-programme-approach")
        .expect("a CPA observation");
    let cpa = &mut cpa["resource"];
    cpa.as_object_mut().unwrap().remove("valueBoolean");
    cpa["valueCodeableConcept"] = json!({"text": "yes"});
    let err = parse_fhir(&doc).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.valueBoolean")),
        "{err}"
    );

    let mut s = fixture("07-refused-probation-consent");
    s.diagnoses[0].active = false;
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, condition) = entry_of(&mut doc, "Condition");
    assert_eq!(condition["clinicalStatus"]["coding"][0]["code"], "inactive");
    assert_eq!(parse_fhir(&doc).unwrap().diagnoses, s.diagnoses);
}

/// A document is one patient's record: a clinical resource whose subject is
/// another Patient, or nothing in the Bundle, is refused, not filed here.
#[test]
fn a_resource_about_someone_else_is_refused_by_its_subject() {
    let s = fixture("01-ost-released-today");
    for target in [
        "urn:uuid:6f1c2a4e-0000-4000-8000-00000000dead",
        "Patient/someone-else",
    ] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, med) = entry_of(&mut doc, "MedicationStatement");
        med["subject"] = json!({"reference": target});
        let refused = parse_fhir(&doc).expect_err(target);
        assert!(
            refused
                .0
                .iter()
                .any(|v| v.field == format!("entry[{i}].resource.subject.reference")),
            "{target}: {refused:?}"
        );
    }
    // Another Patient in the Bundle, named as a Flag's subject.
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, patient) = entry_of(&mut doc, "Patient");
    let mut other = patient.clone();
    other["id"] = json!("other-patient");
    doc["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "urn:uuid:0d7c9a52-1111-4111-8111-000000000002",
        "resource": other,
    }));
    let (i, flag) = entry_of(&mut doc, "Flag");
    flag["subject"] = json!({"reference": "urn:uuid:0d7c9a52-1111-4111-8111-000000000002"});
    let refused = parse_fhir(&doc).unwrap_err();
    assert!(
        refused
            .0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.subject.reference")),
        "{refused:?}"
    );
    // Another patient named by identifier or display alone cannot be
    // checked; a required subject left out names no one.
    for (kind, element, value) in [
        (
            "MedicationStatement",
            "subject",
            Some(json!({"identifier": {
                "system": "https://fhir.nhs.uk/Id/nhs-number",
                "value": "9990000026"
            }})),
        ),
        (
            "AllergyIntolerance",
            "patient",
            Some(json!({"display": "Someone Else"})),
        ),
        ("Flag", "subject", None),
    ] {
        let s = if kind == "AllergyIntolerance" {
            fixture("06-many-medicines-and-allergies")
        } else {
            s.clone()
        };
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, resource) = entry_of(&mut doc, kind);
        match value {
            Some(v) => resource[element] = v,
            None => {
                resource.as_object_mut().unwrap().remove(element);
            }
        }
        let refused = parse_fhir(&doc).expect_err(kind);
        let at = format!("entry[{i}].resource.{element}");
        assert!(
            refused.0.iter().any(|v| v.field.starts_with(&at)),
            "{kind}: {refused:?}"
        );
    }
}

/// A relative reference (`Patient/1`) that two entries could satisfy (two
/// servers' `Patient/1` in one Bundle) is not guessed at: before, the last
/// one won, which could be another person.
#[test]
fn a_relative_reference_two_entries_could_mean_is_refused() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (pi, patient) = entry_of(&mut doc, "Patient");
    let mut other = patient.clone();
    other["name"][0]["family"] = json!("Someone-Else");
    doc["entry"][pi]["fullUrl"] = json!("https://a.example/fhir/Patient/1");
    doc["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "https://b.example/fhir/Patient/1",
        "resource": other,
    }));
    doc["entry"][0]["resource"]["subject"] = json!({"reference": "Patient/1"});
    let (_, med) = entry_of(&mut doc, "MedicationStatement");
    med["subject"] = json!({"reference": "Patient/1"});
    assert!(parse_fhir(&doc).is_err());
    // One candidate: read as before.
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (pi, _) = entry_of(&mut doc, "Patient");
    let url = doc["entry"][pi]["fullUrl"].clone();
    doc["entry"][pi]["fullUrl"] = json!("https://a.example/fhir/Patient/1");
    let old = url.as_str().unwrap().to_owned();
    let text = serde_json::to_string(&doc)
        .unwrap()
        .replace(&old, "Patient/1");
    let doc: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        parse_fhir(&doc).unwrap().patient.family_name,
        s.patient.family_name
    );
}

/// Two last doses for one medicine are refused: the wrong one risks a
/// double dose on release.
#[test]
fn a_last_dose_given_twice_is_refused() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    let extensions = med["extension"].as_array_mut().unwrap();
    let last = extensions
        .iter()
        .find(|e| e["url"].as_str().is_some_and(|u| u.contains("last-dose")))
        .cloned()
        .expect("the fixture states a last dose");
    let mut earlier = last.clone();
    earlier["valueDateTime"] = json!("2026-11-23T08:10:00Z");
    extensions.push(earlier);
    let k = extensions.len() - 1;
    let refused = parse_fhir(&doc).unwrap_err();
    assert!(
        refused
            .0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.extension[{k}]")),
        "{refused:?}"
    );
}

/// A UK Core sender records a dose given as a MedicationAdministration, not
/// in our extension: methadone with its administrations is opioid
/// substitution with the latest completed oral one given before the summary
/// was written as its last dose given (so it reaches the substance misuse
/// service in time); the others are listed, and never refuse the document.
#[test]
fn an_ost_medicines_last_dose_is_read_from_its_latest_administration() {
    let (mut doc, first, _) = ost_with_administrations();
    let read = parse_fhir(&doc).unwrap();
    let m = &read.medications[0];
    assert!(m.opioid_substitution, "{m:?}");
    assert_eq!(
        m.last_dose_given.map(|t| t.to_string()).as_deref(),
        Some("2026-11-24T07:30:00Z")
    );
    let note = |k: usize| {
        let at = format!("entry[{k}].resource (MedicationAdministration): ");
        read.not_read
            .iter()
            .find_map(|n| n.strip_prefix(&at))
            .map(str::to_owned)
    };
    assert_eq!(note(first + 1), None, "{:?}", read.not_read);
    for k in [first, first + 3, first + 5] {
        assert!(note(k).is_some_and(|n| n.starts_with("not carried: a dose given;")));
    }
    assert_eq!(
        note(first + 2).as_deref(),
        Some("not carried: not a dose given (status not-done)")
    );
    assert_eq!(
        note(first + 4).as_deref(),
        Some("not carried: given after the summary was written")
    );

    // One without its time, or whose subject cannot be read, is listed,
    // not used; one about another patient refuses the document, as any
    // clinical resource does.
    for edit in [
        |r: &mut Value| {
            r.as_object_mut().unwrap().remove("effectiveDateTime");
        },
        |r: &mut Value| r["subject"] = json!("Patient/1"),
    ] {
        let mut listed = doc.clone();
        edit(&mut listed["entry"][first + 1]["resource"]);
        let read = parse_fhir(&listed).unwrap();
        assert_eq!(
            read.medications[0]
                .last_dose_given
                .map(|t| t.to_string())
                .as_deref(),
            Some("2026-11-23T08:05:00Z")
        );
    }
    let mut elsewhere = doc.clone();
    elsewhere["entry"][first + 1]["resource"]["subject"] =
        json!({"reference": "urn:uuid:99999999-9999-4999-8999-999999999999"});
    let err = parse_fhir(&elsewhere).unwrap_err();
    assert!(
        err.0.iter().any(|v| v
            .field
            .starts_with(&format!("entry[{}].resource.subject", first + 1))),
        "{err}"
    );

    // Without an administration of it, methadone stays an ordinary medicine.
    doc["entry"].as_array_mut().unwrap().drain(first..);
    let read = parse_fhir(&doc).unwrap();
    assert!(!read.medications[0].opioid_substitution);
    assert!(read.medications[0].last_dose_given.is_none());
}

/// The OST fixture (written 2026-11-24T07:45:00Z) as a UK Core sender
/// writes it: its methadone without our category or extensions (returned),
/// with six administrations from entry `first` on.
fn ost_with_administrations() -> (Value, usize, Value) {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, med) = entry_of(&mut doc, "MedicationStatement");
    let statement = med.as_object_mut().unwrap();
    let stated = statement.remove("extension").unwrap();
    statement.remove("category");
    let subject = statement["subject"].clone();
    let methadone = statement["medicationCodeableConcept"].clone();
    assert!(methadone.is_object(), "{statement:?}");
    let other = json!({"coding": [{"system": "http://snomed.info/sct", "code": "322236009",
                                   "display": "Paracetamol 500mg tablets"}]});
    let given = |status: &str, medicine: &Value, at: &str| {
        json!({"fullUrl": format!("urn:uuid:{}", uuid_for(at, status)),
               "resource": {"resourceType": "MedicationAdministration", "status": status,
                            "medicationCodeableConcept": medicine, "subject": subject,
                            "effectiveDateTime": at}})
    };
    let entries = doc["entry"].as_array_mut().unwrap();
    let first = entries.len();
    entries.push(given("completed", &methadone, "2026-11-23T08:05:00Z"));
    entries.push(given("completed", &methadone, "2026-11-24T07:30:00+00:00"));
    entries.push(given("not-done", &methadone, "2026-11-24T07:40:00Z"));
    entries.push(given("completed", &other, "2026-11-24T07:35:00Z"));
    entries.push(given("completed", &methadone, "2026-11-24T08:10:00Z"));
    let mut patch = given("completed", &methadone, "2026-11-24T07:42:00Z");
    patch["resource"]["dosage"] = json!({"route": {"text": "transdermal"}});
    entries.push(patch);
    (doc, first, stated)
}

/// [`ost_with_administrations`] with the statement coded by its dm+d code
/// and then methadone's SNOMED CT substance code, and every methadone
/// administration coded `administration(dm+d, substance)`; returns the
/// document, the first administration's entry, the dm+d coding, and how
/// many administrations were recoded.
fn recoded_ost(administration: impl Fn(&Value, &Value) -> Value) -> (Value, usize, Value, usize) {
    let (mut doc, first, _) = ost_with_administrations();
    let (_, med) = entry_of(&mut doc, "MedicationStatement");
    let dmd = med["medicationCodeableConcept"]["coding"][0].clone();
    let substance = json!({"system": "http://snomed.info/sct", "code": "387286002",
                           "display": "Methadone"});
    let methadone = med["medicationCodeableConcept"].clone();
    med["medicationCodeableConcept"]["coding"] = json!([dmd.clone(), substance.clone()]);
    let mut recoded = 0;
    for e in &mut doc["entry"].as_array_mut().unwrap()[first..] {
        if e["resource"]["medicationCodeableConcept"] == methadone {
            e["resource"]["medicationCodeableConcept"]["coding"] = administration(&dmd, &substance);
            recoded += 1;
        }
    }
    (doc, first, dmd, recoded)
}

/// A dose given is matched to its medicine by the codings both write: a
/// sender listing SNOMED CT first on its administrations and dm+d first on
/// the statement (each read by its first national coding) still times the
/// methadone; matched on the coding each carries, it was read as an
/// ordinary medicine and reached no substance misuse service.
#[test]
fn a_dose_given_is_matched_to_its_medicine_by_any_coding_both_write() {
    let (doc, _, dmd, recoded) = recoded_ost(|dmd, substance| json!([substance, dmd]));
    assert_eq!(recoded, 5);
    let read = parse_fhir(&doc).unwrap();
    let m = &read.medications[0];
    assert!(m.opioid_substitution, "{m:?}");
    assert_eq!(m.code.code, dmd["code"].as_str().unwrap());
    assert_eq!(
        m.last_dose_given.map(|t| t.to_string()).as_deref(),
        Some("2026-11-24T07:30:00Z")
    );
}

/// Two products of one substance share its SNOMED CT code but not their
/// dm+d codes: a dose of one (a daily tablet) is never taken as the last
/// dose of the other (a monthly depot), whose next dose it would put weeks
/// late. Found by review: matched on any shared coding, it was.
#[test]
fn a_dose_of_another_product_of_the_same_substance_is_not_its_last_dose() {
    let tablets = json!({"system": "https://dmd.nhs.uk", "code": "39072511000001103",
                         "display": "Methadone 5mg tablets"});
    let (doc, first, _, recoded) = recoded_ost(|_, substance| json!([substance, tablets]));
    assert_eq!(recoded, 5);
    let read = parse_fhir(&doc).unwrap();
    let m = &read.medications[0];
    assert_eq!(m.last_dose_given, None, "{m:?}");
    assert!(!m.opioid_substitution, "{m:?}");
    assert!(
        read.not_read.iter().any(|n| n.starts_with(&format!(
            "entry[{}].resource (MedicationAdministration): not carried: a dose given;",
            first + 1
        ))),
        "{:?}",
        read.not_read
    );
}

/// Beside our extension, a dose given after the one it states refuses the
/// document there: which was the last cannot be told.
#[test]
fn a_dose_given_after_the_last_dose_stated_is_refused() {
    let (doc, first, stated) = ost_with_administrations();
    let mut both = doc.clone();
    let mut stated = stated;
    for e in stated.as_array_mut().unwrap() {
        if e["url"].as_str().is_some_and(|u| u.contains("last-dose")) {
            e["valueDateTime"] = json!("2026-11-23T09:00:00Z");
        }
    }
    entry_of(&mut both, "MedicationStatement").1["extension"] = stated.clone();
    // A dose it states after every administration is no conflict.
    let mut consistent = doc.clone();
    entry_of(&mut consistent, "MedicationStatement").1["extension"] = {
        let mut later = stated;
        for e in later.as_array_mut().unwrap() {
            if e["url"].as_str().is_some_and(|u| u.contains("last-dose")) {
                e["valueDateTime"] = json!("2026-11-24T07:44:00Z");
            }
        }
        later
    };
    assert!(parse_fhir(&consistent).is_ok());
    let err = parse_fhir(&both).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field == format!("entry[{}].resource.effectiveDateTime", first + 1)),
        "{err}"
    );
}

/// A fixed, distinct UUID for a test entry.
fn uuid_for(at: &str, status: &str) -> String {
    let digits: String = format!("{at}{status}")
        .bytes()
        .map(|b| format!("{:x}", b % 16))
        .collect();
    let d = format!("{digits:0<32}");
    format!(
        "{}-{}-{}-{}-{}",
        &d[0..8],
        &d[8..12],
        &d[12..16],
        &d[16..20],
        &d[20..32]
    )
}

/// A field's later repetitions never run into its first: a second name in
/// PID-5 or a second reaction in AL1-5 does not become part of the first.
#[test]
fn a_fields_second_repetition_never_runs_into_the_first() {
    let segments = hl7_release(|segs| {
        let pid = segment(segs, "PID");
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields[5] = format!("{}~Pryce^Dan^^^^^A", fields[5]);
        *pid = fields.join("|");
    });
    let read = parse_hl7(&segments).unwrap();
    assert_eq!(read.patient.given_names, ["Daniel"]);
    assert_eq!(read.patient.family_name, "Okonkwo-Pryce");
    assert!(
        read.not_read.iter().any(|n| n.starts_with("PID-5[2]")),
        "{:?}",
        read.not_read
    );
}

/// Standard segments the gateway does not read (v2.7's UAC, an OBR) are
/// taken and listed as not read, as HL7 v2 chapter 2 asks of a receiver; a
/// line that is not a segment (a line break inside a field) still refuses.
#[test]
fn segments_not_read_are_taken_and_listed_but_a_broken_line_refuses() {
    let segments = hl7_release(|segs| {
        segs.insert(1, "UAC|KERB|token".into());
        segs.push("OBR|1".into());
    });
    let read = parse_hl7(&segments).unwrap();
    for id in ["UAC", "OBR"] {
        assert!(
            read.not_read
                .contains(&format!("{id}: a segment the gateway does not read here")),
            "{id}: {:?}",
            read.not_read
        );
    }
    let segments = hl7_release(|segs| segs.push("take with food|twice".into()));
    let refused = parse_hl7(&segments).unwrap_err();
    assert!(
        refused.0.iter().any(|v| v.field.starts_with("segment ")),
        "{refused:?}"
    );
}

/// Only the Consent about sharing with probation decides it: another
/// Consent (to treatment) placed first is never read as that, a permission
/// with conditions is not read as given, and two probation Consents refuse.
#[test]
fn only_the_probation_consent_decides_and_never_a_conditional_one() {
    use throughcare::clinical::model::ConsentDecision;
    let s = fixture("01-ost-released-today");
    assert_eq!(s.consent.probation_sharing, ConsentDecision::Given);
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        edit(&mut doc);
        parse_fhir(&doc)
    };
    // The patient refuses probation; a consent to treatment comes first.
    let read = with(&|doc| {
        let (i, consent) = entry_of(doc, "Consent");
        consent["provision"] = json!({"type": "deny"});
        let mut other = consent.clone();
        other["category"] = json!([{"text": "Consent to HIV treatment"}]);
        other["provision"] = json!({"type": "permit"});
        doc["entry"].as_array_mut().unwrap().insert(
            i,
            json!({"fullUrl": "urn:uuid:5a0e7c1e-2222-4222-8222-000000000003", "resource": other}),
        );
    })
    .unwrap();
    assert_eq!(read.consent.probation_sharing, ConsentDecision::Refused);
    assert_listed(
        &read,
        "a Consent about something other than sharing with probation",
    );
    // A permission that ended, or that excludes some data, is not "given".
    for provision in [
        json!({"type": "permit", "period": {"end": "2020-01-01"}}),
        json!({"type": "permit", "provision": [{"type": "deny", "class": [{"code": "Flag"}]}]}),
    ] {
        let read = with(&|doc| {
            entry_of(doc, "Consent").1["provision"] = provision.clone();
        })
        .unwrap();
        assert_eq!(
            read.consent.probation_sharing,
            ConsentDecision::NotRecorded,
            "{provision}"
        );
    }
    // A legal basis counts only while its Consent is in force: one on an
    // inactive, rejected or draft Consent shares nothing.
    let basis = |doc: &mut Value, status: &str| {
        let (_, consent) = entry_of(doc, "Consent");
        consent["status"] = json!(status);
        consent["provision"] = json!({"type": "deny"});
        consent["policyRule"] = json!({"coding": [{
            "system": "https://throughcare.invalid/fhir/CodeSystem/throughcare",
            "code": "legal-basis"
        }], "text": "MAPPA level 2"});
    };
    for status in ["active", "proposed"] {
        let read = with(&|doc| basis(doc, status)).unwrap();
        assert_eq!(read.consent.legal_basis.as_deref(), Some("MAPPA level 2"));
        assert!(read.may_share_risk_with_probation(), "{status}");
    }
    for status in ["inactive", "rejected", "draft"] {
        let read = with(&|doc| basis(doc, status)).unwrap();
        assert_eq!(read.consent.legal_basis, None, "{status}");
        assert!(!read.may_share_risk_with_probation(), "{status}");
        assert!(!read.may_share_with_treatment_services(), "{status}");
        assert_listed(&read, "a legal basis on a Consent that is not in force");
    }
    // Two Consents about probation could disagree: refused.
    let refused = with(&|doc| {
        let (_, consent) = entry_of(doc, "Consent");
        let mut second = consent.clone();
        second["provision"] = json!({"type": "deny"});
        doc["entry"].as_array_mut().unwrap().push(
            json!({"fullUrl": "urn:uuid:5a0e7c1e-2222-4222-8222-000000000004", "resource": second}),
        );
    })
    .unwrap_err();
    assert!(
        refused.0.iter().any(|v| v.field.ends_with("category")),
        "{refused:?}"
    );
}

/// What would make the gateway read the wrong thing is refused by field:
/// two entries with one fullUrl (bdl-7), a subject that is not a Patient, a
/// GP that is not an Organization, an old address or name first, an
/// offset no zone has.
#[test]
fn what_would_be_read_as_the_wrong_thing_is_refused_by_field() {
    let s = fixture("01-ost-released-today");
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        edit(&mut doc);
        let e = parse_fhir(&doc).expect_err("refused");
        e.0.iter().map(|v| v.field.clone()).collect::<Vec<_>>()
    };
    let fields = refused(&|doc| {
        let url = doc["entry"][1]["fullUrl"].clone();
        doc["entry"][2]["fullUrl"] = url;
    });
    assert!(
        fields.contains(&"entry[2].fullUrl".to_owned()),
        "{fields:?}"
    );

    let fields = refused(&|doc| {
        let practitioner = full_url_of(doc, "Practitioner");
        doc["entry"][0]["resource"]["subject"]["reference"] = practitioner;
    });
    assert!(
        fields.contains(&"entry[0].resource.subject.reference".to_owned()),
        "{fields:?}"
    );

    let fields = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"][0]["use"] = json!("old");
        patient["name"][0]["use"] = json!("maiden");
    });
    // An old address is never the release address, but a patient may have
    // only that (of no fixed abode): listed, not refused.
    assert!(!fields.iter().any(|f| f.contains("address")), "{fields:?}");
    assert!(
        fields.iter().any(|f| f.ends_with("name[0].use")),
        "{fields:?}"
    );

    // The registered GP is a reference to an Organization; here, to the Patient.
    let fields = refused(&|doc| {
        let (i, _) = entry_of(doc, "Patient");
        let own = doc["entry"][i]["fullUrl"].clone();
        let (_, patient) = entry_of(doc, "Patient");
        patient["generalPractitioner"] = json!([{"reference": own}]);
    });
    assert!(
        fields.iter().any(|f| f.ends_with("resourceType")),
        "{fields:?}"
    );

    let fields = refused(&|doc| {
        let (_, med) = entry_of(doc, "MedicationStatement");
        for e in med["extension"].as_array_mut().unwrap() {
            if e["url"].as_str().is_some_and(|u| u.contains("last-dose")) {
                e["valueDateTime"] = json!("2026-11-24T08:10:00+23:00");
            }
        }
    });
    assert!(
        fields.iter().any(|f| f.contains("valueDateTime")),
        "{fields:?}"
    );
}

/// Coded content without words is listed, never dropped unsaid, and a
/// Flag's own words are its note when it has none.
#[test]
fn coded_reactions_and_routes_without_text_are_listed_and_a_flags_text_is_kept() {
    let mut s = fixture("06-many-medicines-and-allergies");
    s.diagnoses.clear();
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (ai, allergy) = entry_of(&mut doc, "AllergyIntolerance");
    allergy["reaction"] = json!([{
        "manifestation": [{"coding": [{"system": "http://snomed.info/sct", "code": "39579001"}]}],
        "severity": "severe"
    }]);
    let (mi, med) = entry_of(&mut doc, "MedicationStatement");
    med["dosage"][0]["route"] =
        json!({"coding": [{"system": "http://snomed.info/sct", "code": "26643006"}]});
    let read = parse_fhir(&doc).unwrap();
    for path in [
        format!("entry[{ai}].resource.reaction[0].manifestation[0]: not carried"),
        format!("entry[{mi}].resource.dosage[0].route: not carried"),
    ] {
        assert!(
            read.not_read.iter().any(|n| n.starts_with(&path)),
            "{path}: {:?}",
            read.not_read
        );
    }

    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, flag) = entry_of(&mut doc, "Flag");
    flag["code"]["text"] = json!("Ligature attempt 20/11 (invented)");
    if let Some(ext) = flag.get_mut("extension").and_then(Value::as_array_mut) {
        ext.retain(|e| !e["url"].as_str().is_some_and(|u| u.contains("note")));
        if ext.is_empty() {
            // FHIR JSON has no empty array: the element goes.
            flag.as_object_mut().unwrap().remove("extension");
        }
    }
    let read = parse_fhir(&doc).unwrap();
    assert!(
        read.risks
            .iter()
            .any(|r| r.note.as_deref() == Some("Ligature attempt 20/11 (invented)")),
        "{:?}",
        read.risks
    );
}

/// A second PID or PV1, an EVN-1 naming another event, and a date of
/// birth with anything after it are refused, not read past.
#[test]
fn hl7_segments_given_twice_and_dates_with_trailing_text_are_refused() {
    for (edit, field) in [
        (
            Box::new(|segs: &mut Vec<String>| {
                let pid = segment(segs, "PID").clone();
                segs.insert(3, pid);
            }) as Box<dyn Fn(&mut Vec<String>)>,
            "PID(2)",
        ),
        (
            Box::new(|segs: &mut Vec<String>| {
                let evn = segment(segs, "EVN");
                *evn = evn.replacen("EVN|A03|", "EVN|A01|", 1);
            }),
            "EVN-1",
        ),
        (
            Box::new(|segs: &mut Vec<String>| {
                let pid = segment(segs, "PID");
                let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
                fields[7] = format!("{}XYZ", fields[7]);
                *pid = fields.join("|");
            }),
            "PID-7",
        ),
    ] {
        let segments = hl7_release(|segs| edit(segs));
        let refused = parse_hl7(&segments).expect_err(field);
        assert!(
            refused.0.iter().any(|v| v.field == field),
            "{field}: {refused:?}"
        );
    }
    // A date of birth written as a whole timestamp (PID-7 is a TS) is read.
    let segments = hl7_release(|segs| {
        let pid = segment(segs, "PID");
        let mut fields: Vec<String> = pid.split('|').map(String::from).collect();
        fields[7] = format!("{}0000", fields[7]);
        *pid = fields.join("|");
    });
    assert!(parse_hl7(&segments).is_ok());
}

/// A suspected allergy or diagnosis, a Condition in remission and a
/// preliminary document are carried as recorded, and each qualifier listed.
#[test]
fn qualifiers_the_model_cannot_hold_are_listed() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    doc["entry"][0]["resource"]["status"] = json!("preliminary");
    let (ci, condition) = entry_of(&mut doc, "Condition");
    condition["verificationStatus"] = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
        "code": "provisional"
    }]});
    condition["clinicalStatus"] = json!({"coding": [{
        "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
        "code": "remission"
    }]});
    let read = parse_fhir(&doc).unwrap();
    for note in [
        "entry[0].resource.status: not carried: preliminary (carried as final)".to_owned(),
        format!(
            "entry[{ci}].resource.verificationStatus: not carried: provisional (carried as recorded, without the qualifier)"
        ),
        format!(
            "entry[{ci}].resource.clinicalStatus: not carried: remission (carried as inactive)"
        ),
    ] {
        assert!(read.not_read.contains(&note), "{note}: {:?}", read.not_read);
    }
}

/// A medicine given as `medicationReference` to a Medication in the Bundle
/// (as GP Connect sends it) is read like `medicationCodeableConcept`; a
/// reference to anything else is refused at it.
#[test]
fn a_medication_reference_is_read_like_a_medication_concept() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, med) = entry_of(&mut doc, "MedicationStatement");
    let concept = med["medicationCodeableConcept"].take();
    med.as_object_mut()
        .unwrap()
        .remove("medicationCodeableConcept");
    med["medicationReference"] =
        json!({"reference": "urn:uuid:3c1f5e9a-7777-4777-8777-000000000007"});
    doc["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "urn:uuid:3c1f5e9a-7777-4777-8777-000000000007",
        "resource": {"resourceType": "Medication", "code": concept}
    }));
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.medications, s.medications);
    assert!(read.not_read.is_empty(), "{:?}", read.not_read);

    let patient_url = full_url_of(&doc, "Patient");
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    med["medicationReference"] = json!({"reference": patient_url});
    let refused = parse_fhir(&doc).unwrap_err();
    assert!(
        refused
            .0
            .iter()
            .any(|v| v.field == format!("entry[{i}].resource.medicationReference.reference")),
        "{refused:?}"
    );

    // A medicine read from a Medication entered in error would be acted
    // on: refused at the reference.
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    let concept = med["medicationCodeableConcept"].take();
    med.as_object_mut()
        .unwrap()
        .remove("medicationCodeableConcept");
    med["medicationReference"] =
        json!({"reference": "urn:uuid:3c1f5e9a-7777-4777-8777-000000000008"});
    doc["entry"].as_array_mut().unwrap().push(json!({
        "fullUrl": "urn:uuid:3c1f5e9a-7777-4777-8777-000000000008",
        "resource": {"resourceType": "Medication", "status": "entered-in-error", "code": concept}
    }));
    let refused = parse_fhir(&doc).unwrap_err();
    assert!(
        refused.0.iter().any(|v| v.field
            == format!("entry[{i}].resource.medicationReference.reference")
            && v.description.contains("not current")),
        "{refused:?}"
    );
}

/// The custody episode named by `Composition.encounter` gives the dates
/// and deadlines: one entered in error or cancelled is refused, not used.
#[test]
fn a_custody_encounter_entered_in_error_or_cancelled_is_refused() {
    let s = fixture("01-ost-released-today");
    for status in ["entered-in-error", "cancelled"] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        assert!(doc["entry"][0]["resource"]["encounter"].is_object());
        let (_, encounter) = entry_of(&mut doc, "Encounter");
        encounter["status"] = json!(status);
        let refused = parse_fhir(&doc).unwrap_err();
        assert!(
            refused
                .0
                .iter()
                .any(|v| v.field == "entry[0].resource.encounter"
                    && v.description.contains("not current")),
            "{status}: {refused:?}"
        );
    }
}

/// A Flag coded the way an EHR codes it (SNOMED CT, or words alone) is a
/// risk the next carer sees, never a refusal of the whole summary: a known
/// concept names its kind (and so routes to the mental health team), any
/// other is carried to the GP as recorded and to no treatment view.
#[test]
fn flags_coded_in_snomed_or_words_are_carried_and_a_known_concept_names_its_kind() {
    let s = fixture("01-ost-released-today");
    let flag_with = |code: Value| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (fi, flag) = entry_of(&mut doc, "Flag");
        flag["code"] = code;
        // As an EHR writes it: none of the gateway's own extensions.
        flag.as_object_mut().unwrap().remove("extension");
        (fi, parse_fhir(&doc))
    };
    let snomed = |code: &str, display: &str| json!({"system": "http://snomed.info/sct", "code": code, "display": display});

    let (fi, read) = flag_with(json!({"coding": [
        {"system": "http://read.info/ctv3", "code": "XaJ3u"},
        snomed("225444004", "At risk for suicide"),
    ]}));
    let read = read.unwrap();
    assert_eq!(read.risks.len(), 1);
    assert_eq!(read.risks[0].kind, RiskKind::Suicide);
    assert_eq!(read.risks[0].code.as_ref().unwrap().code, "225444004");
    assert!(read.needs_mental_health_team(), "a suicide risk routes");
    assert!(
        read.not_read
            .iter()
            .any(|n| n.starts_with(&format!("entry[{fi}].resource.code.coding[0]: not carried"))),
        "{:?}",
        read.not_read
    );
    let fhir_out = translate::write(TextFormat::Fhir, &read, View::Full, JourneyEvent::Release);
    let out = String::from_utf8(fhir_out.bytes).unwrap();
    assert!(
        out.contains("225444004") && out.contains("\"suicide\""),
        "{out}"
    );
    let hl7_out = translate::write(TextFormat::Hl7v2, &read, View::Full, JourneyEvent::Release);
    let hl7 = String::from_utf8(hl7_out.bytes).unwrap();
    assert!(
        hl7.contains("RISK-CODE") && hl7.contains("225444004^At risk for suicide^SCT"),
        "{hl7}"
    );
    let back = hl7v2::parse(hl7.as_bytes(), &Limits::default())
        .unwrap()
        .summary;
    assert_eq!(back.risks, read.risks);

    let (_, read) = flag_with(json!({"coding": [snomed("1234567008", "At risk of exploitation")]}));
    let read = read.unwrap();
    assert_eq!(read.risks[0].kind, RiskKind::Other);
    assert_eq!(
        read.risks[0].code.as_ref().unwrap().display,
        "At risk of exploitation"
    );
    for view in [
        View::MentalHealthTeam,
        View::SubstanceMisuseService,
        View::Probation,
    ] {
        let mut consented = read.clone();
        consented.consent.probation_sharing = throughcare::clinical::model::ConsentDecision::Given;
        let v = throughcare::clinical::views::apply(&consented, view);
        assert!(v.risks.is_empty(), "{view:?}: {:?}", v.risks);
    }

    let (_, read) = flag_with(json!({"text": "Risk to staff when intoxicated (invented)"}));
    let read = read.unwrap();
    assert_eq!(read.risks[0].kind, RiskKind::Other);
    assert_eq!(
        read.risks[0].note.as_deref(),
        Some("Risk to staff when intoxicated (invented)")
    );

    let (fi, read) = flag_with(json!({"coding": [
        {"system": "https://throughcare.invalid/fhir/CodeSystem/risk", "code": "arson"}
    ]}));
    let paths = fields_of(&read.unwrap_err());
    assert_eq!(paths, [format!("entry[{fi}].resource.code.coding[0].code")]);
    let (fi, read) = flag_with(json!({"coding": [{"display": "no code"}]}));
    let paths = fields_of(&read.unwrap_err());
    assert_eq!(paths, [format!("entry[{fi}].resource.code")]);
}

/// The fullUrl of the first entry holding a `kind` resource.
fn full_url_of(doc: &Value, kind: &str) -> Value {
    doc["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["resourceType"] == kind)
        .map(|e| e["fullUrl"].clone())
        .unwrap_or_else(|| panic!("the document has no {kind}"))
}

/// The fields a refusal names.
fn fields_of(e: &throughcare::clinical::ValidationErrors) -> Vec<String> {
    e.0.iter().map(|v| v.field.clone()).collect()
}

/// The fields a document is refused at, after `edit`.
fn refused_at(s: &ClinicalSummary, edit: impl Fn(&mut Value)) -> Vec<String> {
    let mut doc = fhir_json(s, JourneyEvent::Release);
    edit(&mut doc);
    match parse_fhir(&doc) {
        Ok(read) => panic!("accepted: {:?}", read.not_read),
        Err(e) => fields_of(&e),
    }
}

/// That `read` lists, among what it did not carry, a note containing `words`.
fn assert_listed(read: &ClinicalSummary, words: &str) {
    assert!(
        read.not_read.iter().any(|n| n.contains(words)),
        "{words}: {:?}",
        read.not_read
    );
}

/// Medicine `m`'s dosages as a GP system writes them: the dose in `text`,
/// without our extension (ours puts the whole instruction in `text` and
/// the dose alone in the extension).
fn as_a_gp_system_writes_it(m: &mut Value) {
    for d in m["dosage"].as_array_mut().unwrap() {
        let dose = d["extension"][0]["valueString"].as_str().map(str::to_owned);
        if let Some(dose) = dose {
            d["text"] = json!(dose);
        }
        d.as_object_mut().unwrap().remove("extension");
    }
}

fn read_after(s: &ClinicalSummary, edit: impl Fn(&mut Value)) -> ClinicalSummary {
    let mut doc = fhir_json(s, JourneyEvent::Release);
    edit(&mut doc);
    parse_fhir(&doc).unwrap_or_else(|e| panic!("refused: {e}"))
}

/// What identifies the document, its patient and its episode is read as
/// the standard means it, or refused when it cannot be told: a withdrawn
/// document, a second current NHS number, several Encounters with none
/// named. A section entry the Bundle does not hold is listed.
#[test]
fn document_identity_patient_identifiers_and_the_episode_are_read_as_fhir_means_them() {
    let s = fixture("01-ost-released-today");
    let nhs = |value: &str, use_: Option<&str>| {
        let mut id = json!({"system": "https://fhir.nhs.uk/Id/nhs-number", "value": value});
        if let Some(u) = use_ {
            id["use"] = json!(u);
        }
        id
    };

    let fields = refused_at(&s, |doc| {
        doc["entry"][0]["resource"]["status"] = json!("entered-in-error");
    });
    assert_eq!(fields, ["entry[0].resource.status"]);
    let read = read_after(&s, |doc| {
        doc["entry"][0]["resource"]["status"] = json!("amended");
    });
    assert_eq!(read.patient, s.patient);

    // A retired number (use old) is set aside, before or after the current one.
    for at_front in [true, false] {
        let read = read_after(&s, |doc| {
            let (_, patient) = entry_of(doc, "Patient");
            let ids = patient["identifier"].as_array_mut().unwrap();
            let old = nhs("9990000018", Some("old"));
            if at_front {
                ids.insert(0, old);
            } else {
                ids.push(old);
            }
        });
        assert_eq!(read.patient.nhs_number, s.patient.nhs_number, "{at_front}");
        assert!(read.not_read.iter().any(|n| n.contains("use old")));
    }
    let (pi, _) = entry_of(&mut fhir_json(&s, JourneyEvent::Release), "Patient");
    let fields = refused_at(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["identifier"]
            .as_array_mut()
            .unwrap()
            .push(nhs("9990000018", None));
    });
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert!(
        fields[0].starts_with(&format!("entry[{pi}].resource.identifier[")),
        "{fields:?}"
    );

    let read = read_after(&s, |doc| {
        doc["entry"][0]["resource"]["section"][0]["entry"]
            .as_array_mut()
            .unwrap()
            .push(json!({"reference": "urn:uuid:0f0f0f0f-0000-4000-8000-00000000dead"}));
    });
    assert!(
        read.not_read
            .iter()
            .any(|n| n.starts_with("entry[0].resource.section[0].entry[")
                && n.contains("the Bundle does not hold")),
        "{:?}",
        read.not_read
    );

    // An earlier episode beside the current one: the Composition names which.
    let earlier = |doc: &mut Value| {
        let (_, enc) = entry_of(doc, "Encounter");
        let mut old = enc.clone();
        old["period"] = json!({"start": "2020-01-01", "end": "2020-06-01"});
        doc["entry"].as_array_mut().unwrap().insert(
            1,
            json!({"fullUrl": "urn:uuid:0f0f0f0f-0000-4000-8000-000000000e01", "resource": old}),
        );
    };
    let read = read_after(&s, |doc| {
        earlier(doc);
        assert!(
            doc["entry"][0]["resource"]["encounter"].is_object(),
            "we name it"
        );
    });
    assert_eq!(read.custody.release_date, s.custody.release_date);
    let fields = refused_at(&s, |doc| {
        earlier(doc);
        doc["entry"][0]["resource"]
            .as_object_mut()
            .unwrap()
            .remove("encounter");
    });
    assert_eq!(fields, ["entry[0].resource.encounter"]);
}

/// Approved premises arranged for release: a temporary address whose period
/// covers the release day is where the patient will live; one whose period
/// has ended, or a home left before release, is not. A period that cannot
/// be read, or ends before it starts, is refused.
#[test]
fn an_address_period_decides_where_the_patient_lives_on_release() {
    let s = fixture("01-ost-released-today");
    let day = s.custody.release_date.unwrap();
    let (before, after) = (day.0.previous_day().unwrap(), day.0.next_day().unwrap());
    let premises = json!({"use": "temp", "line": ["Approved Premises (invented)", "1 Quay Street"],
        "postalCode": "ZZ8 8ZZ", "period": {"start": day.to_string()}});
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        let home = patient["address"][0].clone();
        patient["address"] = json!([home, premises.clone()]);
    });
    assert_listed(&read, "address[0]: not carried");
    assert_eq!(read.custody.release_address.unwrap().postcode, "ZZ8 8ZZ");
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        let home = patient["address"][0].clone();
        let mut ended = premises.clone();
        ended["period"] = json!({"start": "2020-01-01", "end": before.to_string()});
        patient["address"] = json!([ended, home]);
    });
    assert_eq!(read.custody.release_address, s.custody.release_address);
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        let mut home = patient["address"][0].clone();
        home["period"] = json!({"end": before.to_string()});
        let mut later = premises.clone();
        later["use"] = json!("home");
        later["period"] = json!({"start": after.to_string()});
        patient["address"] = json!([home, later]);
    });
    assert_eq!(
        read.custody.release_address, None,
        "neither is lived in on the day"
    );
    let fields = refused_at(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"][0]["period"] = json!({"start": "2026-12-02", "end": "2026-12-01"});
    });
    assert_eq!(fields, ["entry[2].resource.address[0].period"]);
    let fields = refused_at(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"][0]["period"] = json!({"start": "next week"});
    });
    assert_eq!(fields, ["entry[2].resource.address[0].period.start"]);
}

/// Where the patient will live, and who their practice is, as NHS systems
/// write them: the home address beside a temporary (prison) one, an address
/// given as text, a practice given by its ODS code alone or after a named GP.
#[test]
fn the_release_address_and_the_practice_are_found_where_nhs_systems_put_them() {
    let s = fixture("01-ost-released-today");
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        let home = patient["address"][0].clone();
        patient["address"] = json!([
            {"use": "temp", "line": ["HMP Ashdown (invented)"], "postalCode": "ZZ9 9ZZ"},
            home,
        ]);
    });
    assert_eq!(read.custody.release_address, s.custody.release_address);

    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"] = json!([{"text": "Flat 2, 9 Mill Lane, Northam ZZ1 4AB"}]);
    });
    let address = read.custody.release_address.unwrap();
    assert_eq!(address.lines, ["Flat 2, 9 Mill Lane, Northam ZZ1 4AB"]);
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"] = json!([{
            "text": "Flat 2, 9 Mill Lane, Northam ZZ1 4AB", "postalCode": "ZZ1 4AB"
        }]);
    });
    let address = read.custody.release_address.unwrap();
    assert_eq!(address.lines, ["Flat 2, 9 Mill Lane, Northam ZZ1 4AB"]);
    assert_eq!(address.postcode, "ZZ1 4AB");

    let gp = s.registered_gp.clone().unwrap();
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["generalPractitioner"] = json!([{"identifier": {
            "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": gp.as_str()
        }}]);
    });
    assert_eq!(read.registered_gp.as_ref(), Some(&gp));

    let read = read_after(&s, |doc| {
        let author = full_url_of(doc, "Practitioner");
        let (_, patient) = entry_of(doc, "Patient");
        let practice = patient["generalPractitioner"][0].clone();
        patient["generalPractitioner"] = json!([{"reference": author}, practice]);
    });
    assert_eq!(read.registered_gp.as_ref(), Some(&gp));
    assert_listed(&read, "generalPractitioner[0]: not carried");
    for person in [
        json!({"type": "Practitioner", "identifier": {
            "system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "G0000001"
        }}),
        json!({"identifier": {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "G0000001"}}),
    ] {
        let read = read_after(&s, |doc| {
            let (_, patient) = entry_of(doc, "Patient");
            let practice = patient["generalPractitioner"][0].clone();
            patient["generalPractitioner"] = json!([person.clone(), practice]);
        });
        assert_eq!(read.registered_gp.as_ref(), Some(&gp), "{person}");
    }
    // A reference the Bundle does not hold, with the practice's ODS code.
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["generalPractitioner"] = json!([{
            "reference": "Organization/not-in-this-bundle",
            "identifier": {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": gp.as_str()}
        }]);
    });
    assert_eq!(read.registered_gp.as_ref(), Some(&gp));
    let read = read_after(&s, |doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["generalPractitioner"] = json!([{"reference": "Organization/not-in-this-bundle"}]);
    });
    assert_eq!(read.registered_gp, None);
    assert_listed(&read, "generalPractitioner[0].reference: not carried");
}

/// A status outside its required binding is refused, never read as a
/// default: a resolved problem must not arrive active, an entered-in-error
/// flag must not arrive as a risk. A cancelled observation is not carried.
#[test]
fn statuses_outside_their_binding_are_refused_and_cancelled_observations_are_not_carried() {
    let s = fixture("01-ost-released-today");
    for (kind, edit) in [
        ("Condition", json!({"clinicalStatus": {"text": "Resolved"}})),
        (
            "Condition",
            json!({"clinicalStatus": {"coding": [{"system": "http://snomed.info/sct", "code": "413322009"}]}}),
        ),
        ("Condition", json!({"abatementDateTime": "2020-01-01"})),
        ("Flag", json!({"status": "Entered-In-Error"})),
    ] {
        let fields = refused_at(&s, |doc| {
            let (_, r) = entry_of(doc, kind);
            if kind == "Condition" {
                r.as_object_mut().unwrap().remove("clinicalStatus");
            }
            for (k, v) in edit.as_object().unwrap() {
                r[k] = v.clone();
            }
        });
        let (i, _) = entry_of(&mut fhir_json(&s, JourneyEvent::Release), kind);
        let element = if kind == "Flag" {
            "status"
        } else {
            "clinicalStatus"
        };
        assert_eq!(fields, [format!("entry[{i}].resource.{element}")], "{edit}");
    }

    let read = read_after(&s, |doc| {
        let (_, c) = entry_of(doc, "Condition");
        c["code"]["coding"].as_array_mut().unwrap().insert(
            0,
            json!({"system": "http://read.info/ctv3", "code": "E2440"}),
        );
    });
    assert_eq!(
        read.diagnoses[0].code, s.diagnoses[0].code,
        "SNOMED CT is read first"
    );
    assert!(
        read.not_read
            .iter()
            .any(|n| n.ends_with("code.coding[0]: only the first repetition is read")),
        "{:?}",
        read.not_read
    );
}

/// A dosage's coded timing and its other instructions reach the GP, or are
/// listed: nothing in a dosage vanishes unsaid.
#[test]
fn coded_timings_are_carried_and_other_instructions_are_listed() {
    let s = fixture("01-ost-released-today");
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        as_a_gp_system_writes_it(m);
        m["dosage"][0]["timing"] = json!({"code": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/v3-GTSAbbreviation",
            "code": "QD", "display": "daily"
        }]}});
        m["dosage"][0]["additionalInstruction"]
            .as_array_mut()
            .unwrap()
            .push(json!({"text": "Do not drink alcohol"}));
    });
    assert_eq!(read.medications[0].frequency, "daily");
    assert!(read.medications[0].supervised);
    assert_listed(&read, "additionalInstruction[1]: not carried");
    // Beside a local coding, the SNOMED CT one is read (and the other listed).
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        as_a_gp_system_writes_it(m);
        m["dosage"][0]["timing"] = json!({"code": {"coding": [
            {"system": "https://pas.invalid/timing", "code": "X1", "display": "as agreed"},
            {"system": "http://snomed.info/sct", "code": "229797004", "display": "Once daily"}
        ]}});
    });
    assert_eq!(read.medications[0].frequency, "Once daily");
    assert_listed(&read, "timing.code.coding[0]");
}

/// How often, given only as numbers (`timing.repeat`, as GP systems send
/// it), is carried in words ("twice a day"); before, the frequency arrived
/// empty. Beside a coded timing the numbers are listed; numbers that do not
/// say how often (no unit, a zero) are listed, not guessed at.
#[test]
fn a_frequency_given_as_numbers_is_carried_in_words() {
    let s = fixture("01-ost-released-today");
    let with_timing = |timing: Value| {
        read_after(&s, move |doc| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            as_a_gp_system_writes_it(m);
            m["dosage"][0]["timing"] = timing.clone();
        })
    };
    for (repeat, words) in [
        (
            json!({"frequency": 2, "period": 1, "periodUnit": "d"}),
            "twice a day",
        ),
        (
            json!({"frequency": 1, "period": 2, "periodUnit": "wk"}),
            "once every 2 weeks",
        ),
        (
            json!({"frequency": 3, "period": 1, "periodUnit": "d"}),
            "3 times a day",
        ),
        (
            json!({"frequency": 1, "period": 1.0, "periodUnit": "h"}),
            "once an hour",
        ),
    ] {
        let read = with_timing(json!({ "repeat": repeat }));
        assert_eq!(read.medications[0].frequency, words, "{repeat}");
        assert!(read.not_read.is_empty(), "{:?}", read.not_read);
    }
    let read = with_timing(json!({
        "code": {"text": "at night"},
        "repeat": {"frequency": 1, "period": 1, "periodUnit": "d", "when": ["HS"]}
    }));
    assert_eq!(read.medications[0].frequency, "at night");
    assert_listed(&read, "timing.repeat");
    for repeat in [
        json!({"frequency": 1, "period": 1}),
        json!({"frequency": 0, "period": 1, "periodUnit": "d"}),
    ] {
        let read = with_timing(json!({ "repeat": repeat }));
        assert_eq!(read.medications[0].frequency, "", "{repeat}");
        assert_listed(&read, "timing.repeat");
    }
}

/// `Dosage.text` is the whole instruction, as R4 means it ("free text
/// dosage instructions", which a receiver may show alone): a GP system
/// showing only it showed "60 mg", with no frequency and no word of
/// supervision. The dose alone travels in our extension and is read back
/// from it; a text beside it that says something else is listed, not
/// dropped unsaid.
#[test]
fn the_dosage_text_is_the_whole_instruction_and_reads_back_as_its_parts() {
    let s = fixture("01-ost-released-today");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, m) = entry_of(&mut doc, "MedicationStatement");
    let dosage = &m["dosage"][0];
    assert_eq!(
        dosage["text"], "60 mg once daily, oral, supervised consumption",
        "{dosage}"
    );
    assert_eq!(dosage["extension"][0]["valueString"], "60 mg", "{dosage}");
    assert_eq!(dosage["timing"]["code"]["text"], "once daily");
    let read = parse_fhir(&doc).unwrap();
    assert_eq!(read.medications, s.medications);
    assert!(read.not_read.is_empty(), "{:?}", read.not_read);
    // Taken as needed, said in the words once.
    let mut prn = s.clone();
    prn.medications[0].as_needed = true;
    prn.medications[0].supervised = false;
    let mut doc = fhir_json(&prn, JourneyEvent::Release);
    let (_, m) = entry_of(&mut doc, "MedicationStatement");
    assert_eq!(m["dosage"][0]["text"], "60 mg once daily, oral, as needed");
    assert_eq!(parse_fhir(&doc).unwrap().medications, prn.medications);
    // Words beside our dose that say otherwise (a clinician edited them in
    // a system that kept the extension) win: carried as the dose, as any
    // sender's text is, and the extension listed. A blank extension is none.
    for text in [
        "30 mg once daily, oral, supervised consumption",
        "60 mg once daily, oral, supervised; not on Sundays",
    ] {
        let read = read_after(&s, |doc| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            m["dosage"][0]["text"] = json!(text);
        });
        assert_eq!(read.medications[0].dose, text);
        assert_listed(&read, "dosage[0].extension: not carried");
    }
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        m["dosage"][0]["extension"][0]["valueString"] = json!(" ");
    });
    assert_eq!(
        read.medications[0].dose,
        "60 mg once daily, oral, supervised consumption"
    );
    // A dose that already says how often says it once in the words.
    let mut said = s.clone();
    said.medications[0].dose = "60 mg once daily".into();
    let mut doc = fhir_json(&said, JourneyEvent::Release);
    let (_, m) = entry_of(&mut doc, "MedicationStatement");
    assert_eq!(
        m["dosage"][0]["text"],
        "60 mg once daily, oral, supervised consumption"
    );
    assert_eq!(parse_fhir(&doc).unwrap().medications, said.medications);
    // A second dose extension is refused, as any extension given twice.
    let fields = refused_at(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        let ext = m["dosage"][0]["extension"][0].clone();
        m["dosage"][0]["extension"]
            .as_array_mut()
            .unwrap()
            .push(ext);
    });
    assert!(
        fields.iter().any(|f| f.contains("dosage[0].extension[1]")),
        "{fields:?}"
    );
    // With no dose, no text (it would be read back as the dose).
    let mut no_dose = s.clone();
    no_dose.medications[0].dose.clear();
    no_dose.medications[0].opioid_substitution = false;
    no_dose.medications[0].last_dose_given = None;
    let mut doc = fhir_json(&no_dose, JourneyEvent::Release);
    let (_, m) = entry_of(&mut doc, "MedicationStatement");
    assert!(m["dosage"][0].get("text").is_none(), "{}", m["dosage"][0]);
    assert_eq!(parse_fhir(&doc).unwrap().medications, no_dose.medications);
}

/// A dose given only as a quantity (`doseAndRate[0].doseQuantity`, as GP
/// systems send it) is carried as "value unit", where before the dose
/// arrived empty; beside a dose in words, the quantity is listed, and what
/// else a dose may hold (a second dose, a rate) is listed too.
#[test]
fn a_dose_given_as_a_quantity_is_carried() {
    let s = fixture("01-ost-released-today");
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        as_a_gp_system_writes_it(m);
        m["dosage"][0].as_object_mut().unwrap().remove("text");
        m["dosage"][0]["doseAndRate"] = json!([{"doseQuantity": {
            "value": 60, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"
        }}]);
    });
    assert_eq!(read.medications[0].dose, "60 mg");
    assert!(
        !read.not_read.iter().any(|n| n.contains("doseAndRate")),
        "{:?}",
        read.not_read
    );
    let read = read_after(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        as_a_gp_system_writes_it(m);
        m["dosage"][0]["doseAndRate"] = json!([
            {"doseQuantity": {"value": 60, "unit": "mg"}, "rateQuantity": {"value": 1, "unit": "mg/h"}},
            {"doseQuantity": {"value": 30, "unit": "mg"}}
        ]);
    });
    assert_eq!(
        read.medications[0].dose, s.medications[0].dose,
        "the words win"
    );
    // A bound is not a dose; a code outside UCUM is no unit to print.
    for (quantity, dose, listed) in [
        (
            json!({"value": 10, "comparator": "<", "unit": "mg"}),
            "",
            "comparator",
        ),
        (
            json!({"value": 2, "system": "http://snomed.info/sct", "code": "732936001"}),
            "2",
            "the unit is not carried",
        ),
    ] {
        let read = read_after(&s, |doc| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            as_a_gp_system_writes_it(m);
            m["dosage"][0].as_object_mut().unwrap().remove("text");
            m["dosage"][0]["doseAndRate"] = json!([{ "doseQuantity": quantity.clone() }]);
        });
        assert_eq!(read.medications[0].dose, dose, "{quantity}");
        assert_listed(&read, listed);
    }
    assert_listed(&read, "doseAndRate[0].doseQuantity");
    assert_listed(&read, "rateQuantity");
    assert_listed(&read, "doseAndRate[1]");
    // A take-out prescription's instruction given as numbers is carried in
    // words: the dose and how often.
    let mut s = s;
    s.prescriptions.push(naloxone());
    let read = read_after(&s, |doc| {
        let (_, r) = entry_of(doc, "MedicationRequest");
        r["dosageInstruction"] = json!([{
            "doseAndRate": [{"doseQuantity": {"value": 400, "unit": "micrograms"}}],
            "timing": {"repeat": {"frequency": 1, "period": 2, "periodUnit": "min"}}
        }]);
    });
    assert_eq!(
        read.prescriptions[0].dosage.as_deref(),
        Some("400 micrograms once every 2 minutes")
    );
    assert!(read.not_read.is_empty(), "{:?}", read.not_read);
}

/// A custody day is England's: a release at 23:30 UTC on a summer evening
/// is the next day (00:30 BST), in FHIR and in HL7 v2; in winter it is the
/// same day. A date of birth is kept as written.
#[test]
fn a_custody_time_with_an_offset_falls_on_englands_day() {
    let s = fixture("01-ost-released-today");
    for (end, day) in [
        ("2026-06-30T23:30:00Z", "2026-07-01"),
        ("2026-06-30T23:30:00+01:00", "2026-06-30"),
        ("2026-12-30T23:30:00Z", "2026-12-30"),
    ] {
        let read = read_after(&s, |doc| {
            let (_, enc) = entry_of(doc, "Encounter");
            enc["period"]["end"] = json!(end);
        });
        assert_eq!(read.custody.release_date.unwrap().to_string(), day, "{end}");
    }
    for (pv1_45, day) in [
        ("202606302330+0000", "2026-07-01"),
        ("20260630", "2026-06-30"),
    ] {
        let segments = hl7_release(|segs| {
            let pv1 = segment(segs, "PV1");
            let mut fields: Vec<String> = pv1.split('|').map(String::from).collect();
            fields.resize(46, String::new());
            fields[45] = pv1_45.into();
            *pv1 = fields.join("|");
        });
        let read = parse_hl7(&segments).unwrap();
        assert_eq!(
            read.custody.release_date.unwrap().to_string(),
            day,
            "{pv1_45}"
        );
        assert_eq!(read.patient.date_of_birth, s.patient.date_of_birth);
    }
}

/// Valid R4 shapes EHRs write are read (an allergy named by its reaction's
/// substance, a contained Medication); what FHIR says must refuse does
/// (a key named twice, a modifier on an entry, implicit rules on the
/// Bundle).
#[test]
fn contained_medicines_and_reaction_substances_are_read_and_ambiguous_json_is_refused() {
    let s = fixture("06-many-medicines-and-allergies");
    let read = read_after(&s, |doc| {
        let (_, a) = entry_of(doc, "AllergyIntolerance");
        let code = a.as_object_mut().unwrap().remove("code").unwrap();
        a["reaction"][0]["substance"] = code;
    });
    assert_eq!(read.allergies[0].substance, s.allergies[0].substance);
    // The medicine moved into its MedicationStatement; `shape` makes `contained`.
    let contained = |shape: fn(Value) -> Value| {
        move |doc: &mut Value| {
            let (_, m) = entry_of(doc, "MedicationStatement");
            let code = m
                .as_object_mut()
                .unwrap()
                .remove("medicationCodeableConcept")
                .unwrap();
            m["contained"] =
                shape(json!({"resourceType": "Medication", "id": "med1", "code": code}));
            m["medicationReference"] = json!({"reference": "#med1"});
        }
    };
    let read = read_after(&s, contained(|m| json!([m])));
    assert_eq!(read.medications[0].code, s.medications[0].code);
    assert!(
        !read.not_read.iter().any(|n| n.contains("contained")),
        "{:?}",
        read.not_read
    );
    let (mi, _) = entry_of(
        &mut fhir_json(&s, JourneyEvent::Release),
        "MedicationStatement",
    );
    let fields = refused_at(&s, |doc| {
        let (_, m) = entry_of(doc, "MedicationStatement");
        m.as_object_mut()
            .unwrap()
            .remove("medicationCodeableConcept");
        m["medicationReference"] = json!({"reference": "#absent"});
    });
    assert_eq!(
        fields,
        [format!(
            "entry[{mi}].resource.medicationReference.reference"
        )]
    );
    let fields = refused_at(&s, contained(|m| m));
    assert!(
        fields.contains(&format!("entry[{mi}].resource.contained")),
        "{fields:?}"
    );

    let fields = refused_at(&s, |doc| {
        doc["entry"][1]["modifierExtension"] =
            json!([{"url": "https://example.invalid/ext", "valueBoolean": true}]);
        doc["implicitRules"] = json!("https://example.invalid/rules");
    });
    assert_eq!(fields, ["entry[1].modifierExtension", "implicitRules"]);

    // A key named twice: parsers disagree on which value wins.
    let text = serde_json::to_string(&fhir_json(&s, JourneyEvent::Release)).unwrap();
    let twice = text.replacen(
        "\"status\":\"final\"",
        "\"status\":\"final\",\"status\":\"entered-in-error\"",
        1,
    );
    assert_ne!(twice, text);
    let err = fhir::parse(twice.as_bytes(), &Limits::default()).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].field, "document");
    assert!(err.0[0].description.contains("`status` twice"), "{err}");
}

/// A document Bundle carries its own identifier and timestamp (R4 bdl-9,
/// bdl-10): without them it cannot be told from another or dated.
#[test]
fn a_document_bundle_without_its_identifier_or_timestamp_is_refused() {
    let s = fixture("01-ost-released-today");
    for (key, value) in [
        ("identifier", None),
        ("identifier", Some(json!({"system": "urn:ietf:rfc:3986"}))),
        ("timestamp", None),
        ("timestamp", Some(json!("2026-11-24"))),
    ] {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        match value {
            Some(v) => doc[key] = v,
            None => {
                doc.as_object_mut().unwrap().remove(key);
            }
        }
        let err = parse_fhir(&doc).unwrap_err();
        assert!(err.0.iter().any(|v| v.field == key), "{key}: {err}");
    }
    assert!(parse_fhir(&fhir_json(&s, JourneyEvent::Release)).is_ok());
    // Patient.active is a modifier: false says the record may not be valid.
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (pi, patient) = entry_of(&mut doc, "Patient");
    patient["active"] = json!(false);
    let err = parse_fhir(&doc).unwrap_err();
    assert!(
        err.0
            .iter()
            .any(|v| v.field == format!("entry[{pi}].resource.active")),
        "{err}"
    );
    let (_, patient) = entry_of(&mut doc, "Patient");
    patient["active"] = json!(true);
    let read = parse_fhir(&doc).unwrap();
    assert!(read.not_read.is_empty(), "{:?}", read.not_read);
}

/// FHIR JSON (R4 json.html) has no empty string, object or array, and no
/// `null` outside an array: a reader would take each as absent, the sender
/// may have meant otherwise. A risk coded `"system": ""` used to be stored
/// and then panicked the FHIR renderer at every pull.
#[test]
fn empty_values_and_nulls_are_refused_as_fhir_json_forbids() {
    let s = fixture("01-ost-released-today");
    let refused = |edit: &dyn Fn(&mut Value)| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        edit(&mut doc);
        let err = parse_fhir(&doc).unwrap_err();
        assert_eq!(err.0.len(), 1, "{err}");
        assert_eq!(err.0[0].field, "document");
        err.0[0].description.clone()
    };
    let why = refused(&|doc| {
        let (_, flag) = entry_of(doc, "Flag");
        flag["code"]["coding"] = json!([{"system": "", "code": "", "display": "Risk to staff"}]);
    });
    assert!(why.starts_with("an empty string"), "{why}");
    let why = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["birthDate"] = Value::Null;
    });
    assert!(why.starts_with("null"), "{why}");
    let why = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["address"] = json!([]);
    });
    assert!(why.starts_with("an empty array"), "{why}");
    let why = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["meta"] = json!({});
    });
    assert!(why.starts_with("an empty object"), "{why}");
    // A choice element once, with one type (R4 json.html); a reader would
    // take either of two.
    let why = refused(&|doc| {
        let (_, condition) = entry_of(doc, "Condition");
        condition["onsetString"] = json!("in his twenties");
        condition["onsetDateTime"] = json!("2014-06-01");
    });
    assert!(why.contains("`onset[x]` twice"), "{why}");
    // `null` lines a value up with its `_name` extension inside an array.
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, patient) = entry_of(&mut doc, "Patient");
    let given = patient["name"][0]["given"].as_array_mut().unwrap();
    given.push(Value::Null);
    let n = given.len();
    let mut extensions = vec![Value::Null; n];
    extensions[n - 1] =
        json!({"extension": [{"url": "https://example.invalid/x", "valueString": "y"}]});
    patient["name"][0]["_given"] = Value::Array(extensions);
    let read = parse_fhir(&doc).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(read.patient.given_names, s.patient.given_names);
    // ... and nowhere else: not without the extension, nor outside a
    // repeating primitive.
    let why = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        patient["name"][0]["given"]
            .as_array_mut()
            .unwrap()
            .push(Value::Null);
    });
    assert!(why.contains("`given` holds a null"), "{why}");
    let why = refused(&|doc| {
        let (_, patient) = entry_of(doc, "Patient");
        let n = patient["name"][0]["given"].as_array().unwrap().len();
        patient["name"][0]["given"]
            .as_array_mut()
            .unwrap()
            .push(Value::Null);
        patient["name"][0]["_given"] = Value::Array(vec![Value::Null; n + 1]);
    });
    assert!(why.contains("`given` holds a null"), "{why}");
    let why = refused(&|doc| {
        let (_, flag) = entry_of(doc, "Flag");
        flag["code"]["coding"]
            .as_array_mut()
            .unwrap()
            .push(Value::Null);
    });
    assert!(why.contains("`coding` holds a null"), "{why}");
}

/// Patient.deceased[x] and Patient.link are modifiers (R4): a summary saying
/// the patient has died, or that its record was replaced by another, is
/// refused naming the element, never routed as if it did not; a
/// `deceasedBoolean` of false or a `seealso` link is no reason to refuse.
#[test]
fn a_patient_recorded_as_deceased_or_replaced_is_refused() {
    let s = fixture("01-ost-released-today");
    let refused_at = |edit: &dyn Fn(&mut Value)| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, patient) = entry_of(&mut doc, "Patient");
        edit(patient);
        let fields: Vec<String> = match parse_fhir(&doc) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|v| v.field).collect(),
        };
        (i, fields)
    };
    let (i, fields) = refused_at(&|p| p["deceasedBoolean"] = json!(true));
    assert_eq!(fields, [format!("entry[{i}].resource.deceasedBoolean")]);
    let (i, fields) = refused_at(&|p| p["deceasedDateTime"] = json!("2026-11-20T04:10:00Z"));
    assert_eq!(fields, [format!("entry[{i}].resource.deceasedDateTime")]);
    let (i, fields) = refused_at(&|p| {
        p["link"] = json!([
            {"other": {"reference": "urn:uuid:4c0f6a2e-2f63-4b53-9d55-3a4f1e8b7c10"}, "type": "seealso"},
            {"other": {"reference": "urn:uuid:4c0f6a2e-2f63-4b53-9d55-3a4f1e8b7c11"}, "type": "replaced-by"}
        ]);
    });
    assert_eq!(fields, [format!("entry[{i}].resource.link[1].type")]);
    let (_, fields) = refused_at(&|p| p["deceasedBoolean"] = json!(false));
    assert!(fields.is_empty(), "{fields:?}");
    // `refer` says this record is the one in use.
    let (_, fields) = refused_at(&|p| {
        p["link"] = json!([{"other": {"reference": "urn:uuid:4c0f6a2e-2f63-4b53-9d55-3a4f1e8b7c12"}, "type": "refer"}]);
    });
    assert!(fields.is_empty(), "{fields:?}");
}

/// Where a released patient went (Encounter.hospitalization.dischargeDisposition)
/// is never dropped unsaid: home is a release like any other; a hospital is
/// listed as not carried; a death is refused, since it is not a release.
#[test]
fn a_discharge_other_than_home_is_listed_and_a_death_refused() {
    let s = fixture("01-ost-released-today");
    let with = |code: &str| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (i, enc) = entry_of(&mut doc, "Encounter");
        enc["hospitalization"]["dischargeDisposition"] = json!({"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/discharge-disposition",
            "code": code
        }]});
        (i, parse_fhir(&doc))
    };
    let (_, home) = with("home");
    assert!(home.unwrap().not_read.is_empty());
    let (i, psy) = with("psy");
    let at = format!("entry[{i}].resource.hospitalization.dischargeDisposition");
    assert_eq!(
        psy.unwrap().not_read,
        [format!("{at}: not carried: a discharge disposition of psy")]
    );
    let (_, died) = with("exp");
    let fields: Vec<String> = died.unwrap_err().0.into_iter().map(|v| v.field).collect();
    assert_eq!(fields, std::slice::from_ref(&at));
    // UK Core's own codes: 79 is a death; 19 (the usual place of residence,
    // no fixed abode included) is listed, never read as plain home.
    let uk_core = |code: &str| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let (_, enc) = entry_of(&mut doc, "Encounter");
        enc["hospitalization"]["dischargeDisposition"] = json!({"coding": [{
            "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-DischargeDestinationEngland",
            "code": code
        }]});
        parse_fhir(&doc)
    };
    assert_eq!(
        uk_core("19").unwrap().not_read,
        [format!("{at}: not carried: a discharge disposition of 19")]
    );
    assert!(uk_core("79").is_err());
}

/// The care programme approach, its coordinator, substance misuse treatment
/// and its service are given once: a second observation saying otherwise is
/// refused (a later `false` silently undid a CPA of `true`, and the
/// community mental health team was never told); the same said twice is
/// taken.
#[test]
fn a_second_observation_saying_otherwise_is_refused() {
    let s = fixture("02-active-self-harm");
    assert!(
        s.mental_health
            .as_ref()
            .is_some_and(|m| m.care_programme_approach)
    );
    let doc = fhir_json(&s, JourneyEvent::Release);
    let cpa = doc["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e.to_string().contains("care-programme-approach"))
        .cloned()
        .expect("the fixture is on CPA");
    let twice = |value: bool| {
        let mut doc = doc.clone();
        let mut again = cpa.clone();
        again["fullUrl"] = json!("urn:uuid:7d1f0b4e-9a3c-4e2b-8f61-2c5d9e0a1b23");
        again["resource"]["valueBoolean"] = json!(value);
        doc["entry"].as_array_mut().unwrap().push(again);
        parse_fhir(&doc)
    };
    let refused = twice(false).unwrap_err();
    assert!(
        refused
            .0
            .iter()
            .any(|v| v.description.contains("care-programme-approach")),
        "{refused:?}"
    );
    let same = twice(true).unwrap();
    assert!(same.mental_health.unwrap().care_programme_approach);
}

/// An extension the gateway reads is read once, from its one value type: a
/// risk note given twice, or as `valueMarkdown`, and a last dose given as
/// `valueInstant` are refused at the extension; before, the second note and
/// the other types were passed over unsaid (a note lost, a last dose
/// unknown).
#[test]
fn an_extension_read_once_from_its_value_type_is_refused_otherwise() {
    let s = fixture("02-active-self-harm");
    let note_url = "https://throughcare.invalid/fhir/StructureDefinition/note";
    let refused_at = |edit: &dyn Fn(&mut Value) -> String| {
        let mut doc = fhir_json(&s, JourneyEvent::Release);
        let field = edit(&mut doc);
        let fields: Vec<String> = match parse_fhir(&doc) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.into_iter().map(|v| v.field).collect(),
        };
        assert!(fields.contains(&field), "{field} not in {fields:?}");
    };
    refused_at(&|doc| {
        let (i, flag) = entry_of(doc, "Flag");
        let ext = flag["extension"]
            .as_array_mut()
            .expect("the risk has a note");
        let mut second = ext[0].clone();
        second["valueString"] = json!("A second note");
        ext.push(second);
        format!("entry[{i}].resource.extension[{}]", ext.len() - 1)
    });
    refused_at(&|doc| {
        let (i, flag) = entry_of(doc, "Flag");
        flag["extension"] = json!([{"url": note_url, "valueMarkdown": "Ligature risk"}]);
        format!("entry[{i}].resource.extension[0]")
    });
    let s = fixture("06-many-medicines-and-allergies");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (i, med) = entry_of(&mut doc, "MedicationStatement");
    med["extension"] = json!([{
        "url": "https://throughcare.invalid/fhir/StructureDefinition/last-dose-given",
        "valueInstant": "2026-11-23T08:10:00Z"
    }]);
    let fields: Vec<String> = parse_fhir(&doc)
        .unwrap_err()
        .0
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert!(
        fields.contains(&format!("entry[{i}].resource.extension[0]")),
        "{fields:?}"
    );
}

/// Elements R4 makes optional are optional here too: a Consent without
/// `patient` or without `provision.type`, and an Observation without
/// `subject`, are read in the document's patient's context; before, any of
/// them refused the whole release summary.
#[test]
fn elements_r4_makes_optional_do_not_refuse_the_document() {
    use throughcare::clinical::model::ConsentDecision;
    let s = fixture("02-active-self-harm");
    let mut doc = fhir_json(&s, JourneyEvent::Release);
    let (_, consent) = entry_of(&mut doc, "Consent");
    consent.as_object_mut().unwrap().remove("patient");
    consent["provision"] = json!({"period": {"start": "2026-01-01"}});
    let (_, observation) = entry_of(&mut doc, "Observation");
    observation.as_object_mut().unwrap().remove("subject");
    let read = parse_fhir(&doc).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(read.consent.probation_sharing, ConsentDecision::NotRecorded);
    assert_eq!(read.mental_health, s.mental_health);
}
