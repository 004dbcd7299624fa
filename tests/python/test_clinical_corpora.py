"""Documents nobody here wrote, through the real server.

1. NHS England's own UK Core examples (tests/fixtures/ukcore/, verbatim, source in SOURCE.md),
   assembled into document Bundles: each accepted or refused for a stated journey reason, and
   what is not carried listed on the delivery.
2. An independent corpus: FHIR built with fhir.resources objects and HL7 v2 built with hl7apy,
   submitted, pulled in every format, compared value by value with what was sent.
"""

import importlib
import json
import time
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from conftest import ROOT

UKCORE = ROOT / "tests" / "fixtures" / "ukcore"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
SCT = "http://snomed.info/sct"
DMD = "https://dmd.nhs.uk"


def ukcore(name: str) -> dict:
    """One NHS example as FHIR JSON: the published XML read by fhir.resources, nothing changed."""
    path = UKCORE / f"UKCore-{name}-Example.xml"
    kind = name.split("-")[0]
    cls = getattr(importlib.import_module(f"fhir.resources.R4B.{kind.lower()}"), kind)
    return json.loads(cls.model_validate_xml(path.read_bytes()).model_dump_json(exclude_none=True))


def restful(resource: dict) -> str:
    return f"https://fhir.example.nhs.uk/R4/{resource['resourceType']}/{resource['id']}"


# The Composition refers to these four by urn:uuid; every other entry has a RESTful fullUrl and
# is found through the `Type/id` references the examples use.
COMPOSITION_REFS = {
    "Patient-RichardSmith": "urn:uuid:c8225cc8-8026-466f-80f8-fc2832a4b9d5",
    "Encounter-InpatientEncounter": "urn:uuid:9a20cb92-354a-4015-82ec-ab0252efc5b9",
    "Practitioner-ConsultantSandraGose": "urn:uuid:369d88a8-9f6b-407f-8560-6ee9d7ccc8bb",
    "Organization-LeedsTeachingHospital": "urn:uuid:120633ae-1a20-4e0e-b807-b78fb59679cc",
}
CLINICAL = [
    "MedicationStatement-Amoxicillin",
    "MedicationRequest-Amoxicillin",
    "AllergyIntolerance-Amoxicillin",
    "AllergyIntolerance-EnteredInError",
    "Condition-BleedingFromEar",
    "Immunization-InfluenzaVaccine",
    "Procedure-ExaminationOfSkin",
    "Observation-VitalSigns-BodyWeight",
    "Organization-WhiteRoseMedicalCentre",
]


def nhs_bundle() -> dict:
    entries = [{"fullUrl": "urn:uuid:7d0a0f33-0000-4000-8000-00000000c0de", "resource": ukcore("Composition-Discharge")}]
    for name, url in COMPOSITION_REFS.items():
        entries.append({"fullUrl": url, "resource": ukcore(name)})
    for name in CLINICAL:
        r = ukcore(name)
        entries.append({"fullUrl": restful(r), "resource": r})
    return {"resourceType": "Bundle", "type": "document",
            "identifier": {"system": "urn:ietf:rfc:3986", "value": "urn:uuid:7d0a0f33-0000-4000-8000-00000000b0d1"},
            "timestamp": "2026-11-24T09:00:00+00:00", "entry": entries}


def violations(err) -> list:
    from google.rpc import error_details_pb2, status_pb2

    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [(v.field, v.description) for v in bad.field_violations]
    return []


def pull_every_format(gateway, pb, ods: str) -> dict:
    """The same delivery rendered natively, as FHIR and as HL7 v2 (a one-second lease, let lapse)."""
    stub = pb.grpc.HandoverServiceStub(gateway.channel(ods))
    out = {}
    for fmt in (pb.h.DOCUMENT_FORMAT_NATIVE, pb.h.DOCUMENT_FORMAT_FHIR_JSON, pb.h.DOCUMENT_FORMAT_HL7V2):
        deadline = time.time() + 10
        while True:
            got = stub.Pull(pb.h.PullRequest(max_deliveries=1, lease=Duration(seconds=1), format=fmt), timeout=10).deliveries
            if got or time.time() > deadline:
                break
            time.sleep(0.2)
        assert got, f"nothing to pull in format {fmt}"
        out[got[0].WhichOneof("document")] = got[0]
    return out


def first_code(cc: dict) -> str:
    return cc["coding"][0]["code"]


def test_nhs_examples_as_a_transfer_are_refused_for_want_of_a_receiving_prison(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    with pytest.raises(grpc.RpcError) as err:
        prison.Submit(pb.h.SubmitRequest(message_id="nhs-transfer", event=pb.h.JOURNEY_EVENT_TRANSFER,
                                         fhir_json=json.dumps(nhs_bundle())), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A hospital discharge names no receiving prison and no transfer time: the journey's
    # reasons, and the only ones (dateTime periods, Type/id references, sections without our
    # codes are all read).
    fields = sorted(f for f, _ in violations(err.value))
    assert fields == ["summary.custody.transfer_at", "summary.custody.transfer_to"], fields


def test_nhs_examples_as_published_are_a_release_carried_or_listed(gateway, pb):
    bundle = nhs_bundle()
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    prison.Submit(pb.h.SubmitRequest(message_id="nhs-release", event=pb.h.JOURNEY_EVENT_RELEASE, destinations=["YG001"],
                                     fhir_json=json.dumps(bundle)), timeout=10)
    by_type = {}
    for i, e in enumerate(bundle["entry"]):
        by_type.setdefault(e["resource"]["resourceType"], []).append(i)
    track = prison.Track(pb.h.TrackRequest(message_id="nhs-release"), timeout=10)
    notes = list(track.deliveries[0].not_carried)
    listed = lambda i, why: f"entry[{i}].resource ({bundle['entry'][i]['resource']['resourceType']}): {why}"
    assert listed(by_type["Procedure"][0], "not read: a resource type the gateway does not read") in notes
    assert listed(by_type["Observation"][0], "not carried: an observation of a kind the gateway does not read") in notes
    assert listed(by_type["AllergyIntolerance"][1], "not carried: entered in error (verificationStatus)") in notes
    assert listed(by_type["Organization"][1], "not read: beyond the one of its type the gateway reads, "
                  "and referred to by nothing it reads") in notes
    enc = by_type["Encounter"][0]
    assert f"entry[{enc}].resource.period.start: the time of day is not carried" in notes
    assert f"entry[{enc}].resource.participant: not read by the gateway" in notes
    assert not any("fhir_comments" in n or "FHIR does not define" in n for n in notes), notes
    assert not any("Richard" in n or "Smith" in n for n in notes), "notes never quote values"

    docs = pull_every_format(gateway, pb, "YG001")
    native, fhir, hl7 = docs["native"].native, json.loads(docs["fhir_json"].fhir_json), docs["hl7v2"].hl7v2
    for d in docs.values():
        assert list(d.not_carried) == notes
    src = {k: bundle["entry"][v[0]]["resource"] for k, v in by_type.items()}
    nhs = next(i["value"] for i in src["Patient"]["identifier"] if i["system"] == NHS)
    assert native.patient.nhs_number == nhs and f"{nhs}^^^NHS^NH" in hl7
    # The take-out prescription travels in every format.
    rx = first_code(src["MedicationRequest"]["medicationCodeableConcept"])
    assert [p.code.code for p in native.prescriptions] == [rx]
    out = {}
    for e in fhir["entry"]:
        out.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    assert [first_code(r["medicationCodeableConcept"]) for r in out["MedicationRequest"]] == [rx]
    assert out["MedicationRequest"][0]["status"] == src["MedicationRequest"]["status"]
    assert f"RX-CODE^Prescription^THROUGHCARE|1|{rx}^" in hl7
    med = first_code(src["MedicationStatement"]["medicationCodeableConcept"])
    assert [m.code.code for m in native.medications] == [med]
    allergy = first_code(src["AllergyIntolerance"]["code"])
    assert [a.substance.code for a in native.allergies] == [allergy]
    assert [first_code(c["code"]) for c in out["Condition"]] == [first_code(src["Condition"]["code"])]
    vaccine = src["Immunization"]
    assert [(v.code.code, v.date) for v in native.vaccinations] == [
        (first_code(vaccine["vaccineCode"]), vaccine["occurrenceDateTime"])]
    assert all(r.get("meta", {}).get("profile") for rs in out.values() for r in rs)
    message = parse_message(hl7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()


# --- 2. an independent corpus ------------------------------------------------------------


def built_bundle(n: int) -> tuple[dict, dict]:
    """A release Bundle built with fhir.resources objects, and the values it states."""
    from fhir.resources.R4B.allergyintolerance import AllergyIntolerance
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.composition import Composition
    from fhir.resources.R4B.condition import Condition
    from fhir.resources.R4B.encounter import Encounter
    from fhir.resources.R4B.immunization import Immunization
    from fhir.resources.R4B.medicationrequest import MedicationRequest
    from fhir.resources.R4B.medicationstatement import MedicationStatement
    from fhir.resources.R4B.organization import Organization
    from fhir.resources.R4B.patient import Patient

    nhs = ["9990003033", "9990002029", "9990001014", "9990000018"][n % 4]
    want = {
        "nhs": nhs, "family": f"Indep{n}-O'Hara", "given": ["Jo", "Lee"][: 1 + n % 2], "dob": f"19{60 + n}-0{1 + n % 9}-1{n % 9}",
        "gender": ["male", "female", "other", "unknown"][n % 4], "reception": "2026-03-01", "release": "2026-11-24",
        "med": ("39720311000001101", "Methadone 1mg/ml oral solution", "60 mg", "oral", "once daily"),
        "rx": ("3378311000001103", "Naloxone 1.8mg nasal spray", "active", "order", 2 + n, "spray", 28),
        "allergy": ("764146007", "Penicillin", "Hives", "moderate"),
        "condition": ("191816009", ["2014", "2014-06", "2014-06-02", "2014-06-02T10:00:00+01:00"][n % 4], n % 2 == 0),
        "vaccine": ("1324681000000101", "2021-10-0" + str(1 + n % 8)),
    }
    u = lambda k: f"urn:uuid:5e1f0000-0000-4000-8000-{n:06d}{k:06d}"
    prison = Organization(identifier=[{"system": ODS, "value": "YP001"}])
    patient = Patient(identifier=[{"system": NHS, "value": nhs}], name=[{"family": want["family"], "given": want["given"]}],
                      birthDate=want["dob"], gender=want["gender"],
                      address=[{"line": ["1 Invented Way"], "city": "Northam", "postalCode": "ZZ9 9ZZ"}])
    enc = Encounter(status="finished", class_fhir={"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
                    subject={"reference": u(1)}, period={"start": want["reception"], "end": want["release"]},
                    serviceProvider={"reference": u(2)})
    code, display, dose, route, freq = want["med"]
    med = MedicationStatement(status="active", subject={"reference": u(1)},
                              medicationCodeableConcept={"coding": [{"system": DMD, "code": code, "display": display}]},
                              dosage=[{"text": dose, "route": {"text": route}, "timing": {"code": {"text": freq}}}])
    rcode, rdisplay, status, intent, qty, unit, days = want["rx"]
    rx = MedicationRequest(status=status, intent=intent, subject={"reference": u(1)},
                           medicationCodeableConcept={"coding": [{"system": DMD, "code": rcode, "display": rdisplay}]},
                           dispenseRequest={"quantity": {"value": qty, "unit": unit},
                                            "expectedSupplyDuration": {"value": days, "unit": "days",
                                                                       "system": "http://unitsofmeasure.org", "code": "d"}})
    acode, adisplay, reaction, severity = want["allergy"]
    allergy = AllergyIntolerance(patient={"reference": u(1)}, code={"coding": [{"system": SCT, "code": acode, "display": adisplay}]},
                                 reaction=[{"manifestation": [{"text": reaction}], "severity": severity}])
    ccode, onset, active = want["condition"]
    condition = Condition(subject={"reference": u(1)}, code={"coding": [{"system": SCT, "code": ccode}]}, onsetDateTime=onset,
                          clinicalStatus={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                                      "code": "active" if active else "resolved"}]})
    vcode, vdate = want["vaccine"]
    vaccine = Immunization(status="completed", patient={"reference": u(1)}, occurrenceDateTime=vdate,
                           vaccineCode={"coding": [{"system": SCT, "code": vcode}]})
    comp = Composition(status="final", type={"coding": [{"system": SCT, "code": "373942005"}]}, subject={"reference": u(1)},
                       date="2026-11-24T09:00:00+00:00", author=[{"reference": u(2)}], custodian={"reference": u(2)},
                       title="Release summary")
    resources = [comp, patient, prison, enc, med, rx, allergy, condition, vaccine]
    bundle = Bundle(type="document", identifier={"system": "urn:ietf:rfc:3986", "value": u(99)},
                    timestamp="2026-11-24T09:00:00+00:00",
                    entry=[{"fullUrl": u(i), "resource": r} for i, r in enumerate(resources)])
    return json.loads(bundle.model_dump_json(exclude_none=True)), want


def hl7_field(message: str, segment: str, n: int) -> str:
    for line in message.split("\r"):
        if line.startswith(segment + "|"):
            return line.split("|")[n]
    return ""


def check_every_format(docs: dict, want: dict):
    native = docs["native"].native
    fhir = json.loads(docs["fhir_json"].fhir_json)
    hl7 = docs["hl7v2"].hl7v2
    res = {}
    for e in fhir["entry"]:
        res.setdefault(e["resource"]["resourceType"], []).append(e["resource"])
    # Patient.
    assert native.patient.nhs_number == want["nhs"]
    assert native.patient.family_name == want["family"] and list(native.patient.given_names) == want["given"]
    assert native.patient.date_of_birth == want["dob"] == res["Patient"][0]["birthDate"]
    assert hl7_field(hl7, "PID", 7) == want["dob"].replace("-", "")
    assert res["Patient"][0]["gender"] == want["gender"]
    assert hl7_field(hl7, "PID", 8) == {"male": "M", "female": "F", "other": "O", "unknown": "U"}[want["gender"]]
    # Custody.
    assert native.custody.release_date == want["release"] and native.custody.reception_date == want["reception"]
    assert hl7_field(hl7, "PV1", 45) == want["release"].replace("-", "")
    # Medicine, in every format.
    code, display, dose, route, freq = want["med"]
    m = native.medications[0]
    assert (m.code.code, m.code.display, m.dose, m.route, m.frequency) == want["med"]
    ms = res["MedicationStatement"][0]
    # Dosage.text is the whole instruction (R4: a receiver may show nothing
    # else), the parts beside it.
    dosage = ms["dosage"][0]
    assert dosage["text"] == f"{dose} {freq}, {route}", dosage
    assert dosage["route"]["text"] == route and dosage["timing"]["code"]["text"] == freq
    assert f"MED-DOSE^Dose^THROUGHCARE|1|{dose}|" in hl7 and f"MED-FREQ^Frequency^THROUGHCARE|1|{freq}|" in hl7
    # Prescription.
    rcode, _, status, intent, qty, unit, days = want["rx"]
    p = native.prescriptions[0]
    assert (p.code.code, p.status, p.intent, p.quantity.value, p.quantity.unit, p.days_supplied) == (
        rcode, status, intent, str(qty), unit, days)
    mr = res["MedicationRequest"][0]
    assert mr["dispenseRequest"]["quantity"]["value"] == qty and mr["dispenseRequest"]["expectedSupplyDuration"]["value"] == days
    assert f"RX-QTY^Quantity^THROUGHCARE|1|{qty}|" in hl7 and f"RX-DAYS^Days supplied^THROUGHCARE|1|{days}|" in hl7
    # Allergy.
    acode, _, reaction, severity = want["allergy"]
    a = native.allergies[0]
    assert (a.substance.code, a.reaction) == (acode, reaction)
    assert res["AllergyIntolerance"][0]["reaction"][0]["severity"] == severity
    assert hl7_field(hl7, "AL1", 4) == {"mild": "MI", "moderate": "MO", "severe": "SV"}[severity]
    # Diagnosis: precision of the onset and status kept.
    ccode, onset, active = want["condition"]
    d = native.diagnoses[0]
    assert (d.code.code, d.onset, d.active) == (ccode, onset.replace("+00:00", "Z"), active)
    assert res["Condition"][0]["onsetDateTime"] == onset
    assert hl7_field(hl7, "DG1", 6) == "F", "table 0052: a recorded diagnosis is final"
    # Vaccination.
    assert [(v.code.code, v.date) for v in native.vaccinations] == [want["vaccine"]]
    message = parse_message(hl7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()


@pytest.mark.parametrize("n", range(4))
def test_fhir_built_with_fhir_resources_survives_every_format(gateway, pb, n):
    bundle, want = built_bundle(n)
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    prison.Submit(pb.h.SubmitRequest(message_id=f"indep-{n}", event=pb.h.JOURNEY_EVENT_RELEASE, destinations=["YG001"],
                                     fhir_json=json.dumps(bundle)), timeout=10)
    docs = pull_every_format(gateway, pb, "YG001")
    check_every_format(docs, want)


def test_hl7_built_with_hl7apy_survives_every_format(gateway, pb):
    from hl7apy.core import Message

    m = Message("ADT_A03", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = "OTHERPAS"
    m.msh.msh_4 = "YP001"
    m.msh.msh_7 = "20261124093000.25+0000"
    m.msh.msh_9 = "ADT^A03^ADT_A03"
    m.msh.msh_10 = "MSG00077"
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.5.1"
    m.evn.evn_1 = "A03"
    m.evn.evn_2 = "20261124093000.25+0000"
    m.pid.pid_3 = "9990002029^^^NHS^NH"
    m.pid.pid_5 = "Whitcombe^Ellis"
    m.pid.pid_7 = "19900214"
    m.pid.pid_8 = "F"
    m.pid.pid_11 = "3 Invented Row^^Northam^^ZZ1 1ZZ^^H"
    m.pid.pid_13 = "07700900000"
    m.pv1.pv1_2 = "I"
    m.pv1.pv1_3 = "^^^YP001"
    m.pv1.pv1_6 = "WARD A^^^Not a prison"
    m.pv1.pv1_44 = "20260301"
    m.pv1.pv1_45 = "20261124"
    al1 = m.add_segment("AL1")
    al1.al1_1, al1.al1_2, al1.al1_3, al1.al1_4, al1.al1_5 = "1", "DA", "764146007^Penicillin^SCT", "SV", "Anaphylaxis"
    dg1 = m.add_segment("DG1")
    dg1.dg1_1, dg1.dg1_3, dg1.dg1_5, dg1.dg1_6 = "1", "191816009^Opioid dependence^SCT", "201406", "F"
    assert m.validate()
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    prison.Submit(pb.h.SubmitRequest(message_id="indep-hl7", event=pb.h.JOURNEY_EVENT_RELEASE, destinations=["YG001"],
                                     hl7v2=m.to_er7()), timeout=10)
    docs = pull_every_format(gateway, pb, "YG001")
    native = docs["native"].native
    fhir = json.loads(docs["fhir_json"].fhir_json)
    assert native.patient.nhs_number == "9990002029" and native.patient.family_name == "Whitcombe"
    assert native.custody.establishment == "YP001", "PV1-6 on an A03 is not the sending location"
    assert native.custody.release_date == "2026-11-24" and native.custody.reception_date == "2026-03-01"
    assert native.authored_at == "2026-11-24T09:30:00.25Z"
    assert [(a.substance.code, a.reaction) for a in native.allergies] == [("764146007", "Anaphylaxis")]
    cond = [e["resource"] for e in fhir["entry"] if e["resource"]["resourceType"] == "Condition"]
    assert [(c["code"]["coding"][0]["code"], c["clinicalStatus"]["coding"][0]["code"], c["onsetDateTime"]) for c in cond] == [
        ("191816009", "active", "2014-06")], "DG1-6 F is a final, active diagnosis; onset precision kept"
    notes = list(docs["native"].not_carried)
    assert "PID-13: not read by the gateway" in notes and "PV1-6: not read by the gateway" in notes, notes
    assert not any("07700900000" in n for n in notes)
