"""The MESH edge judged by NHS England's own client (`mesh-client`, PyPI)
against NHS England's MESH sandbox (`mesh-sandbox`, PyPI), both on
127.0.0.1 with mutual TLS and full NHSMESH authentication.

A prison (sandbox mailbox X26ABC3, mapped to YP001) sends a release through
MESH; the gateway submits it, acknowledges it in MESH only once durable,
and pushes the practice's delivery (YG001, mailbox X26ABC2) from the
gateway's mailbox (X26ABC1); the practice reads it with mesh-client and
acknowledges it. A message the gateway cannot accept comes back as a
refusal report.
"""

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import BIN, ROOT, free_port

mesh_client = pytest.importorskip("mesh_client")

GATEWAY_MB, PRACTICE_MB, PRISON_MB = "X26ABC1", "X26ABC2", "X26ABC3"
SHARED_KEY = "TestKey"
FIXTURE = ROOT / "tests" / "fixtures" / "patients" / "01-ost-released-today.json"
MAX_DOCUMENT_BYTES = 64 * 1024


def wait_port(port: int, proc: subprocess.Popen, what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert proc.poll() is None, f"{what} exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen")


def eventually(what: str, f, seconds: float = 30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        got = f()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def mesh():
    """The sandbox and a gateway whose [mesh] section points at it; the
    practice on MESH is YG001 (FHIR)."""
    yield from sandbox_and_gateway("YG001")


@pytest.fixture
def mesh_hl7():
    """The same, with YG002 (HL7 v2) the practice on MESH."""
    yield from sandbox_and_gateway("YG002")


def sandbox_and_gateway(practice: str):
    d = Path(tempfile.mkdtemp(prefix="throughcare-mesh-"))
    certs = d / "certs"
    subprocess.run([BIN, "certs", "init", "--dir", str(certs)], check=True, capture_output=True)
    registry = (certs / "registry.toml").read_text()
    for ods, mb in ((practice, PRACTICE_MB), ("YP001", PRISON_MB)):
        registry = registry.replace(f'ods = "{ods}"\n', f'ods = "{ods}"\nmesh_mailbox = "{mb}"\n')
    (certs / "registry.toml").write_text(registry)
    (d / "store").mkdir()
    sandbox_port = free_port()
    sandbox_log = open(d / "sandbox.log", "wb")
    sandbox = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "python" / "run_mesh_sandbox.py"), "--port", str(sandbox_port),
         "--cert", str(certs / "server.pem"), "--key", str(certs / "server.key"), "--ca", str(certs / "ca.pem"),
         "--store", str(d / "store"), "--shared-key", SHARED_KEY, "--lifetime", "300"],
        stdin=subprocess.PIPE, stdout=sandbox_log, stderr=subprocess.STDOUT,
    )
    gateway = None
    try:
        wait_port(sandbox_port, sandbox, "the MESH sandbox")
        (d / "password").write_text("password")
        (d / "shared-key").write_text(SHARED_KEY)
        env = dict(os.environ)
        env.update({
            "THROUGHCARE_MESH_ENABLED": "true",
            "THROUGHCARE_MESH_URL": f"https://127.0.0.1:{sandbox_port}",
            "THROUGHCARE_MESH_MAILBOX": GATEWAY_MB,
            "THROUGHCARE_MESH_PASSWORD_FILE": str(d / "password"),
            "THROUGHCARE_MESH_SHARED_KEY_FILE": str(d / "shared-key"),
            "THROUGHCARE_MESH_CLIENT_CERT_FILE": str(certs / "clients" / "YG002.pem"),
            "THROUGHCARE_MESH_CLIENT_KEY_FILE": str(certs / "clients" / "YG002.key"),
            "THROUGHCARE_MESH_CA_FILE": str(certs / "ca.pem"),
            "THROUGHCARE_MESH_POLL_INTERVAL_MS": "200",
            "THROUGHCARE_MESH_CHUNK_BYTES": "4096",
            # Small enough that the gzip bomb below is cheap to make.
            "THROUGHCARE_LIMITS_MAX_DOCUMENT_BYTES": str(MAX_DOCUMENT_BYTES),
        })
        port = free_port()
        gateway_log = open(d / "gateway.log", "wb")
        gateway = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(d / "data"),
             "--certs-dir", str(certs), "--metrics-listen", "127.0.0.1:0"],
            stdout=gateway_log, stderr=subprocess.STDOUT, env=env,
        )
        wait_port(port, gateway, "the gateway", 20)

        def client(mailbox: str):
            return mesh_client.MeshClient(
                f"https://127.0.0.1:{sandbox_port}", mailbox, "password", shared_key=SHARED_KEY.encode(),
                cert=(str(certs / "clients" / "YG001.pem"), str(certs / "clients" / "YG001.key")),
                verify=str(certs / "ca.pem"), max_chunk_size=4096,
            )

        yield client
        log = (d / "gateway.log").read_text(errors="replace")
        assert "password" not in log and SHARED_KEY not in log and "NHSMESH" not in log, "a MESH secret was logged"
    finally:
        for p in (gateway, sandbox):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def release_fhir() -> bytes:
    args = [BIN, "convert", "--from", "model-json", "--to", "fhir", "--event", "release", str(FIXTURE)]
    return subprocess.run(args, capture_output=True, check=True).stdout


def headers(message) -> dict:
    return {k.lower().removeprefix("mex-"): v for k, v in message.mex_headers()}


def prison_sends_release(mesh, practice: str, local_id: str) -> None:
    """The prison sends the fixture's release for `practice` through MESH,
    with a medicine taken as needed for a reason the model cannot hold (the
    gateway lists that reason as not carried), and waits for the gateway's
    acknowledgement, which comes once the submit is durable."""
    document = json.loads(release_fhir().replace(b"YG001", practice.encode()))
    statement = next(e["resource"] for e in document["entry"]
                     if e["resource"]["resourceType"] == "MedicationStatement")
    statement["dosage"][0]["asNeededCodeableConcept"] = {"text": "for breakthrough pain"}
    with mesh(PRISON_MB) as prison:
        sent = prison.send_message(GATEWAY_MB, json.dumps(document).encode(),
                                   workflow_id="THROUGHCARE_RELEASE",
                                   local_id=local_id, subject="release")
        eventually("the gateway's acknowledgement",
                   lambda: prison.track_message(sent)["status"] == "acknowledged")


def test_a_release_sent_through_mesh_by_a_prison_reaches_the_practice_through_mesh(mesh):
    nhs = json.loads(FIXTURE.read_text())["patient"]["nhs_number"]
    prison_sends_release(mesh, "YG001", "py-mesh-release-1")
    with mesh(PRACTICE_MB) as practice:
        ids = eventually("the practice's delivery", practice.list_messages)
        assert len(ids) == 1
        message = practice.retrieve_message(ids[0])
        h = headers(message)
        assert h["from"] == GATEWAY_MB
        assert h["workflowid"] == "THROUGHCARE_RELEASE"
        assert re.fullmatch(r"throughcare-\d+", h["localid"]), h
        body = message.read()
        bundle = json.loads(body)
        assert bundle["resourceType"] == "Bundle"
        assert nhs in json.dumps(bundle)
        # What the gRPC contract lists beside the document travels in it over
        # MESH, as a section of text: still a valid FHIR R4 document.
        from fhir.resources.R4B.bundle import Bundle
        Bundle.model_validate_json(body)
        composition = bundle["entry"][0]["resource"]
        listed = [s for s in composition["section"]
                  if s.get("title") == "Not carried by this format or view"]
        assert len(listed) == 1, [s.get("title") for s in composition["section"]]
        assert "asNeeded" in listed[0]["text"]["div"], listed[0]
        assert "breakthrough pain" not in listed[0]["text"]["div"], "a value in the list"
        message.acknowledge()
        assert practice.list_messages() == []


def test_an_hl7_practice_on_mesh_reads_what_was_not_carried_in_the_message(mesh_hl7):
    """Over MESH an HL7 v2 message says in itself, as OBX segments, what the
    gRPC contract lists beside it; hl7apy still reads it as valid v2.5.1."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    prison_sends_release(mesh_hl7, "YG002", "py-mesh-hl7-1")
    with mesh_hl7(PRACTICE_MB) as practice:
        ids = eventually("the practice's delivery", practice.list_messages)
        assert len(ids) == 1
        message = practice.retrieve_message(ids[0])
        body = message.read().decode()
        assert body.startswith("MSH|"), body[:80]
        parsed = parse_message(body, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        assert parsed.validate()
        # One OBX to an entry, set IDs and sub-IDs in order.
        listed = [s.split("|") for s in body.split("\r") if "|DOC-NOT-CARRIED^" in s]
        assert listed, body
        assert [f[4] for f in listed] == [str(i + 1) for i in range(len(listed))], listed
        assert all(f[2] in ("ST", "FT") and f[11] == "F" for f in listed), listed
        assert any("asNeeded" in f[5] for f in listed), listed
        assert "breakthrough pain" not in body, "a value in the list"
        message.acknowledge()


def test_a_message_the_gateway_cannot_accept_is_refused_back_to_its_sender(mesh):
    with mesh(PRISON_MB) as prison:
        bad = prison.send_message(GATEWAY_MB, b"this is not a clinical document",
                                  workflow_id="THROUGHCARE_RELEASE", local_id="py-mesh-bad-1")
        ids = eventually("the refusal report", prison.list_messages)
        report = prison.retrieve_message(ids[0])
        h = headers(report)
        assert h["workflowid"] == "THROUGHCARE_REFUSAL"
        body = json.loads(report.read())
        assert body["refused_message_id"] == bad
        assert body["local_id"] == "py-mesh-bad-1"
        assert body["reason"] == "INVALID_ARGUMENT"
        assert [v["field"] for v in body["field_violations"]] == ["content"]
        report.acknowledge()
        # Refused, then acknowledged: never left to expire unseen.
        eventually("the bad message acknowledged", lambda: prison.track_message(bad)["status"] == "acknowledged")


def test_a_release_compressed_by_mesh_client_is_read_chunk_by_chunk(mesh):
    """mesh-client gzips each chunk on its own (Content-Encoding: gzip); the
    gateway reads the members as one document."""
    nhs = json.loads(FIXTURE.read_text())["patient"]["nhs_number"]
    document = release_fhir()
    assert len(document) > 2 * 4096, "the release goes in several chunks"
    with mesh(PRISON_MB) as prison:
        sent = prison.send_message(GATEWAY_MB, document, workflow_id="THROUGHCARE_RELEASE",
                                   local_id="py-mesh-gzip-1", subject="release", compress=True)
        eventually("the gateway's acknowledgement",
                   lambda: prison.track_message(sent)["status"] == "acknowledged")
        assert prison.list_messages() == [], "no refusal came back"
    with mesh(PRACTICE_MB) as practice:
        ids = eventually("the practice's delivery", practice.list_messages)
        message = practice.retrieve_message(ids[0])
        assert headers(message)["localid"].startswith("throughcare-")
        assert nhs in message.read().decode()
        message.acknowledge()


def test_a_gzip_bomb_is_refused_without_expanding_it(mesh):
    """A few KiB that would expand past the document limit is refused back,
    naming the content (the sandbox's size headers, or the bounded decoder:
    src/mesh/inbound.rs's tests)."""
    import gzip
    document = b'{"resourceType": "Bundle", "x": "' + b"a" * (4 * MAX_DOCUMENT_BYTES) + b'"}'
    assert len(gzip.compress(document)) < MAX_DOCUMENT_BYTES // 16
    with mesh(PRISON_MB) as prison:
        sent = prison.send_message(GATEWAY_MB, document, workflow_id="THROUGHCARE_RELEASE",
                                   local_id="py-mesh-bomb-1", compress=True)
        ids = eventually("the refusal report", prison.list_messages)
        body = json.loads(prison.retrieve_message(ids[0]).read())
        assert body["refused_message_id"] == sent
        assert body["reason"] == "INVALID_ARGUMENT"
        assert [v["field"] for v in body["field_violations"]] == ["content"]
        assert "larger than the 65536 bytes" in body["field_violations"][0]["description"]
