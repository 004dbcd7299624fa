"""Random valid summaries (tests/integration/clinical_generated.rs: every optional part
present or absent, hostile text in every text field) rendered by the gateway,
judged by implementations nobody here wrote: fhir.resources (pydantic models,
R4B, plus explicit checks of what R4 4.0.1 says differently) and hl7apy
(HL7 v2.5.1, STRICT)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from conftest import ROOT

CORPUS = ROOT / "target" / "tmp" / "clinical-corpus"
MINIMUM = 500

# R4 4.0.1 regular expressions (datatypes.html), stricter in places than R4B's models.
R4_DATE = re.compile(r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1]))?)?$")
R4_DATETIME = re.compile(
    r"^([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)(-(0[1-9]|1[0-2])(-(0[1-9]|[1-2][0-9]|3[0-1])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?$"
)
R4_CODE = re.compile(r"^[^\s]+(\s[^\s]+)*$")
UK_CORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-"
# Elements R4 types as date or dateTime in the resources we write.
DATES = {"birthDate", "onsetDateTime", "occurrenceDateTime", "authoredOn", "start", "end", "date",
         "valueDateTime", "valueDate"}


def corpus() -> list[Path]:
    if len(list(CORPUS.glob("*.fhir.json"))) < MINIMUM:
        # Not yet generated (tests/run runs cargo first; a lone pytest does it here).
        subprocess.run(["cargo", "test", "--quiet", "--test", "clinical_generated"], cwd=ROOT, check=True,
                       env={**os.environ, "CARGO_TERM_COLOR": "never"})
    return sorted(CORPUS.glob("*.fhir.json"))


@pytest.fixture(scope="module")
def documents():
    docs = corpus()
    assert len(docs) >= MINIMUM
    return docs


def walk(value, path="Bundle"):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from walk(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk(v, f"{path}[{i}]")
    yield path, value


def r4_problems(doc: dict) -> list[str]:
    """What R4 4.0.1 forbids that an R4B model might let through."""
    problems = []
    for path, value in walk(doc):
        if value in ("", [], {}, None):
            problems.append(f"{path}: empty")
        name = path.rsplit(".", 1)[-1]
        if isinstance(value, str) and name in DATES:
            if not (R4_DATE.match(value) or R4_DATETIME.match(value)):
                problems.append(f"{path}: not an R4 date/dateTime")
        if isinstance(value, str) and name == "code" and not R4_CODE.match(value):
            problems.append(f"{path}: not an R4 code")
    for entry in doc["entry"]:
        resource = entry["resource"]
        profiles = resource.get("meta", {}).get("profile", [])
        if not any(p.startswith(UK_CORE) for p in profiles):
            problems.append(f"{resource['resourceType']}: no UK Core profile")
    return problems


def test_at_least_500_generated_bundles_are_valid_fhir(documents):
    failures = []
    for path in documents:
        text = path.read_text()
        try:
            bundle = Bundle.model_validate_json(text)
            assert bundle.type == "document"
            assert bundle.entry[0].resource.__resource_type__ == "Composition"
        except Exception as e:  # noqa: BLE001 - collect every failure, report a few
            failures.append(f"{path.name}: {str(e)[:300]}")
            continue
        failures += [f"{path.name}: {p}" for p in r4_problems(json.loads(text))]
    assert not failures, "\n".join(failures[:20])


def test_at_least_500_generated_hl7_messages_pass_strict_validation(documents):
    failures = []
    for path in documents:
        hl7 = path.with_name(path.name.replace(".fhir.json", ".hl7"))
        text = hl7.read_bytes().decode()
        try:
            message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
            assert message.validate()
        except Exception as e:  # noqa: BLE001
            failures.append(f"{hl7.name}: {str(e)[:300]}")
    assert not failures, "\n".join(failures[:20])


def test_take_out_prescriptions_reach_fhir_as_medication_requests(documents):
    seen = 0
    for path in documents:
        model = json.loads(path.with_name(path.name.replace(".fhir.json", ".model.json")).read_text())
        bundle = json.loads(path.read_text())
        requests = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "MedicationRequest"]
        assert len(requests) == len(model.get("prescriptions", [])), path.name
        for rx, r in zip(model.get("prescriptions", []), requests):
            assert r["medicationCodeableConcept"]["coding"][0]["code"] == rx["code"]["code"]
            assert r["status"] == rx["status"] and r["intent"] == rx["intent"]
            seen += 1
    assert seen > 50
