"""Our FHIR and HL7 v2 output judged by implementations nobody here wrote:
fhir.resources (pydantic models of FHIR R4B) and hl7apy (HL7 v2 structure
validation). And their output fed to our parsers."""

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from conftest import BIN, ROOT

FIXTURES = sorted((ROOT / "tests" / "fixtures" / "patients").glob("*.json"))


def event_of(fixture: Path) -> str:
    custody = json.loads(fixture.read_text())["custody"]
    if custody.get("transfer_to"):
        return "transfer"
    if custody.get("release_date"):
        return "release"
    return "admission"


def convert(path: Path, src: str, dst: str, view="full", event=None) -> subprocess.CompletedProcess:
    args = [BIN, "convert", "--from", src, "--to", dst, "--view", view, str(path)]
    if event:
        args += ["--event", event]
    return subprocess.run(args, capture_output=True, check=True)


def test_there_are_enough_synthetic_patients():
    assert len(FIXTURES) >= 6


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
@pytest.mark.parametrize(
    "view", ["full", "probation", "admission", "substance-misuse", "mental-health"]
)
def test_every_bundle_we_render_is_valid_fhir_r4(fixture, view):
    out = convert(fixture, "model-json", "fhir", view, event_of(fixture)).stdout
    bundle = Bundle.model_validate_json(out)
    assert bundle.type == "document"
    assert bundle.identifier is not None and bundle.timestamp is not None
    assert bundle.entry[0].resource.__resource_type__ == "Composition"
    composition = bundle.entry[0].resource
    assert composition.type.coding[0].system == "http://snomed.info/sct"
    assert composition.type.coding[0].code == "373942005"
    urls = [e.fullUrl for e in bundle.entry]
    assert len(urls) == len(set(urls)), "fullUrls must be unique"
    patient = next(e.resource for e in bundle.entry if e.resource.__resource_type__ == "Patient")
    data = json.loads(fixture.read_text())
    nhs = data["patient"].get("nhs_number")
    systems = {i.system: i.value for i in (patient.identifier or [])}
    if nhs:
        assert systems["https://fhir.nhs.uk/Id/nhs-number"] == nhs
    types = [e.resource.__resource_type__ for e in bundle.entry]
    if view == "probation":
        assert "MedicationStatement" not in types and "Condition" not in types
        if data["consent"]["probation_sharing"] != "given" and not data["consent"].get("legal_basis"):
            assert "Flag" not in types, "risk flags reached probation without consent"
    if view == "full" and data["medications"]:
        assert "MedicationStatement" in types
    if view in ("substance-misuse", "mental-health"):
        # The treatment views carry no allergies, infections or vaccinations.
        assert "AllergyIntolerance" not in types and "Immunization" not in types
        statements = types.count("MedicationStatement")
        if view == "substance-misuse":
            ost = [m for m in data["medications"] if m.get("opioid_substitution")]
            assert statements == len(ost), "only opioid substitution therapy"
        else:
            assert statements <= len(data["medications"])


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_every_hl7_message_we_render_passes_strict_structure_validation(fixture):
    event = event_of(fixture)
    text = convert(fixture, "model-json", "hl7v2", "full", event).stdout.decode()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    expected = {"admission": "ADT_A01", "transfer": "ADT_A02", "release": "ADT_A03"}[event]
    assert message.name == expected
    data = json.loads(fixture.read_text())
    nhs = data["patient"].get("nhs_number")
    pid3 = message.pid.pid_3.value
    if nhs:
        assert f"{nhs}^^^NHS^NH" in pid3
    assert message.pid.pid_5.pid_5_1.value == data["patient"]["family_name"]


def test_a_community_summary_renders_as_a08(tmp_path):
    text = convert(FIXTURES[0], "model-json", "hl7v2", "full", "community-summary").stdout.decode()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    assert message.msh.msh_9.to_er7() == "ADT^A08^ADT_A01"


def test_escaping_survives_a_strict_parser(tmp_path):
    data = json.loads(FIXTURES[0].read_text())
    data["patient"]["family_name"] = "O|Brien^Smith&Co~\\x"
    src = tmp_path / "escaped.json"
    src.write_text(json.dumps(data))
    text = convert(src, "model-json", "hl7v2", "full", "release").stdout.decode()
    message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert message.validate()
    assert len(message.children) > 3
    back = json.loads(convert(_write(tmp_path, "m.hl7", text), "hl7v2", "model-json").stdout)
    assert back["patient"]["family_name"] == "O|Brien^Smith&Co~\\x"


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


def test_our_parser_reads_an_adt_built_by_hl7apy(tmp_path):
    from hl7apy.core import Message

    m = Message("ADT_A01", version="2.5.1", validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = "OTHERPAS"
    m.msh.msh_4 = "YP002"
    m.msh.msh_7 = "20261124093000"
    m.msh.msh_9 = "ADT^A01^ADT_A01"
    m.msh.msh_10 = "MSG00001"
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.5.1"
    m.evn.evn_1 = "A01"
    m.evn.evn_2 = "20261124093000+0000"
    m.pid.pid_3 = "9990002029^^^NHS^NH"
    m.pid.add_field("pid_3").value = "H1234JK^^^HMPPS^PI"
    m.pid.pid_5 = "Whitcombe^Ellis"
    m.pid.pid_7 = "19900214"
    m.pid.pid_8 = "M"
    m.pv1.pv1_2 = "N"
    m.pv1.pv1_3 = "^^^YP002"
    m.pv1.pv1_44 = "20261124"
    al1 = m.add_segment("AL1")
    al1.al1_1 = "1"
    al1.al1_2 = "DA"
    al1.al1_3 = "764146007^Penicillin^SCT"
    al1.al1_4 = "SV"
    al1.al1_5 = "Anaphylaxis"
    assert m.validate()
    out = convert(_write(tmp_path, "a01.hl7", m.to_er7()), "hl7v2", "model-json").stdout
    summary = json.loads(out)
    assert summary["patient"]["nhs_number"] == "9990002029"
    assert summary["patient"]["prison_number"] == "H1234JK"
    assert summary["patient"]["family_name"] == "Whitcombe"
    assert summary["custody"]["establishment"] == "YP002"
    assert summary["custody"]["reception_date"] == "2026-11-24"
    assert summary["allergies"][0]["substance"]["code"] == "764146007"
    assert summary["allergies"][0]["severity"] == "severe"


def test_our_parser_reads_a_bundle_built_by_fhir_resources(tmp_path):
    from fhir.resources.R4B.bundle import Bundle, BundleEntry
    from fhir.resources.R4B.composition import Composition
    from fhir.resources.R4B.encounter import Encounter
    from fhir.resources.R4B.organization import Organization
    from fhir.resources.R4B.patient import Patient

    ods = "https://fhir.nhs.uk/Id/ods-organization-code"
    prison = Organization(identifier=[{"system": ods, "value": "YP001"}], name="HMP Ashdown (invented)")
    patient = Patient(
        identifier=[{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990003033"}],
        name=[{"family": "Marsh", "given": ["Tobias"]}],
        birthDate="1975-07-08",
        gender="male",
    )
    encounter = Encounter(
        status="finished",
        class_fhir={"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
        subject={"reference": "urn:uuid:p"},
        period={"start": "2026-05-11", "end": "2026-11-24"},
        serviceProvider={"reference": "urn:uuid:o"},
    )
    composition = Composition(
        status="final",
        type={"coding": [{"system": "http://snomed.info/sct", "code": "373942005"}]},
        subject={"reference": "urn:uuid:p"},
        date="2026-11-24T09:00:00Z",
        author=[{"reference": "urn:uuid:o"}],
        custodian={"reference": "urn:uuid:o"},
        title="Release summary",
    )
    bundle = Bundle(
        type="document",
        identifier={"system": "urn:ietf:rfc:3986", "value": "urn:uuid:0b7c0e4e-0000-4000-8000-000000000001"},
        timestamp="2026-11-24T09:00:00Z",
        entry=[
            BundleEntry(fullUrl="urn:uuid:c", resource=composition),
            BundleEntry(fullUrl="urn:uuid:p", resource=patient),
            BundleEntry(fullUrl="urn:uuid:o", resource=prison),
            BundleEntry(fullUrl="urn:uuid:e", resource=encounter),
        ],
    )
    src = _write(tmp_path, "bundle.json", bundle.model_dump_json())
    summary = json.loads(convert(src, "fhir", "model-json", event="release").stdout)
    assert summary["patient"]["nhs_number"] == "9990003033"
    assert summary["patient"]["family_name"] == "Marsh"
    assert summary["custody"]["establishment"] == "YP001"
    assert summary["custody"]["release_date"] == "2026-11-24"


def _ost_without_our_extension():
    """Fixture 01 as a FHIR document whose methadone carries neither our
    last-dose extension nor our category (as a UK Core sender writes it),
    and its MedicationStatement."""
    fixture = ROOT / "tests" / "fixtures" / "patients" / "01-ost-released-today.json"
    doc = json.loads(convert(fixture, "model-json", "fhir", event="release").stdout)
    statement = next(
        e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "MedicationStatement"
    )
    statement.pop("extension", None)
    statement.pop("category", None)
    return doc, statement


def _read_with_a_dose_given(tmp_path, doc, statement, concept, name):
    """Adds to `doc` a dose of `concept` given at 07:45 (a MedicationAdministration
    built and validated by fhir.resources), and returns the gateway's reading."""
    from fhir.resources.R4B.bundle import BundleEntry
    from fhir.resources.R4B.medicationadministration import MedicationAdministration

    given = MedicationAdministration(
        status="completed",
        medicationCodeableConcept=concept,
        subject=statement["subject"],
        effectiveDateTime="2026-11-24T07:45:00+00:00",
    )
    url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, name)}"
    doc["entry"].append(json.loads(BundleEntry(fullUrl=url, resource=given).model_dump_json()))
    Bundle.model_validate(doc)
    src = _write(tmp_path, name, json.dumps(doc))
    return json.loads(convert(src, "fhir", "model-json", event="release").stdout)


def test_a_uk_core_dose_given_times_an_ost_medicine(tmp_path):
    """A UK Core sender records methadone's last dose as a MedicationAdministration
    (built and validated here by fhir.resources), not in our extension: the gateway
    reads the medicine as opioid substitution with that dose as its last dose given."""
    doc, statement = _ost_without_our_extension()
    concept = statement["medicationCodeableConcept"]
    summary = _read_with_a_dose_given(tmp_path, doc, statement, concept, "uk-core.json")
    [methadone] = summary["medications"]
    assert methadone["opioid_substitution"] is True
    assert methadone["last_dose_given"] == "2026-11-24T07:45:00Z"
    # Without it, the same medicine is an ordinary one.
    doc["entry"].pop()
    src = _write(tmp_path, "uk-core-no-dose.json", json.dumps(doc))
    summary = json.loads(convert(src, "fhir", "model-json", event="release").stdout)
    assert summary["medications"][0]["opioid_substitution"] is False


def test_a_dose_given_coded_the_other_way_round_still_times_the_ost_medicine(tmp_path):
    """The statement lists dm+d first and SNOMED CT second; the administration
    (built and validated by fhir.resources) lists SNOMED CT first: the gateway
    matches them by the coding both write, not by the first each lists."""
    doc, statement = _ost_without_our_extension()
    [dmd] = statement["medicationCodeableConcept"]["coding"]
    snomed = {"system": "http://snomed.info/sct", "code": "387286002", "display": "Methadone"}
    statement["medicationCodeableConcept"]["coding"] = [dmd, snomed]
    concept = {"coding": [snomed, dmd]}
    summary = _read_with_a_dose_given(tmp_path, doc, statement, concept, "uk-core-reordered.json")
    [methadone] = summary["medications"]
    assert methadone["code"]["code"] == dmd["code"]
    assert methadone["opioid_substitution"] is True
    assert methadone["last_dose_given"] == "2026-11-24T07:45:00Z"
