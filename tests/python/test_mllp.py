"""HL7 v2 over MLLP judged by software nobody here wrote: python-hl7's
`MLLPClient`, over mutual TLS (the gateway's MLLP has no plaintext mode),
sends ADT messages that hl7apy built (and validated), and hl7apy parses and
strictly validates the ACKs we answer."""

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hl7.client import MLLPClient
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message
from hl7apy.parser import parse_message, parse_segment

from conftest import BIN, free_port

NHS = "9990002029"  # invented: 999 range, valid check digit


class MllpGateway:
    """The real binary with `[mllp]` enabled through its environment variables."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="throughcare-mllp-"))
        self.certs = self.dir / "certs"
        subprocess.run([BIN, "certs", "init", "--dir", str(self.certs)], check=True, capture_output=True)
        self.port, self.mllp_port = free_port(), free_port()
        env = dict(os.environ, THROUGHCARE_MLLP_ENABLED="true",
                   THROUGHCARE_MLLP_LISTEN=f"127.0.0.1:{self.mllp_port}")
        self.log = open(self.dir / "gateway.log", "wb")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.dir / "data"),
             "--certs-dir", str(self.certs), "--metrics-listen", "127.0.0.1:0"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.time() + 15
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.mllp_port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("the gateway's MLLP listener did not start")

    def tls_socket(self, name: str):
        """A socket to the MLLP listener in mutual TLS as `name`."""
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        ctx.load_cert_chain(self.certs / "clients" / f"{name}.pem", self.certs / "clients" / f"{name}.key")
        raw = socket.create_connection(("127.0.0.1", self.mllp_port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    def tls_client(self, name: str = "YP001") -> MLLPClient:
        """python-hl7's client, its socket wrapped in mutual TLS as `name`."""
        client = MLLPClient.__new__(MLLPClient)
        client.encoding = "utf-8"
        client.socket = self.tls_socket(name)
        return client

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def gateway():
    g = MllpGateway()
    yield g
    g.stop()


def admission(control_id: str, dob: str = "19900214", version: str = "2.5.1") -> str:
    """An ADT^A01 admission at YP001 built (and strictly validated) by hl7apy."""
    m = Message("ADT_A01", version=version, validation_level=VALIDATION_LEVEL.STRICT)
    m.msh.msh_3 = "OTHERPAS"
    m.msh.msh_4 = "YP001"
    m.msh.msh_5 = "THROUGHCARE"
    m.msh.msh_6 = "GATEWAY"
    m.msh.msh_7 = "20261124093000"
    m.msh.msh_9 = "ADT^A01^ADT_A01" if version >= "2.5" else "ADT^A01"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = version
    m.evn.evn_1 = "A01"
    m.evn.evn_2 = "20261124093000+0000"
    m.pid.pid_3 = f"{NHS}^^^NHS^NH"
    m.pid.pid_5 = "Whitcombe^Ellis"
    if dob:
        m.pid.pid_7 = dob
    m.pid.pid_8 = "M"
    m.pv1.pv1_2 = "N"
    m.pv1.pv1_3 = "^^^YP001"
    m.pv1.pv1_44 = "20261124"
    assert m.validate()
    return m.to_er7()


def parsed_ack(raw) -> Message:
    """Our ACK, unframed, parsed and strictly validated by hl7apy."""
    if isinstance(raw, bytes):
        raw = raw.decode()
    text = raw.strip().strip("\x0b\x1c\r\n")
    ack = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=False)
    assert ack.validate(), text
    return ack


def test_python_hl7_delivers_an_admission_and_hl7apy_validates_the_aa(gateway):
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(admission("PY-ADM-1")))
    assert ack.msa.msa_1.to_er7() == "AA"
    assert ack.msa.msa_2.to_er7() == "PY-ADM-1"
    # Sender and receiver swapped, the version echoed, a new control id.
    assert ack.msh.msh_3.to_er7() == "THROUGHCARE" and ack.msh.msh_4.to_er7() == "GATEWAY"
    assert ack.msh.msh_5.to_er7() == "OTHERPAS" and ack.msh.msh_6.to_er7() == "YP001"
    assert ack.msh.msh_12.to_er7() == "2.5.1"
    assert ack.msh.msh_10.to_er7() not in ("", "PY-ADM-1")


def test_a_missing_field_comes_back_as_an_ae_naming_it(gateway):
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(admission("PY-BAD-1", dob="")))
    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.msa.msa_2.to_er7() == "PY-BAD-1"
    err = ack.err
    assert err.err_2.to_er7() == "PID^1^7"
    assert err.err_3.to_er7().startswith("101^")
    assert err.err_4.to_er7() == "E"
    assert NHS not in err.to_er7()


def test_an_older_version_is_answered_in_its_own_shape(gateway):
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(admission("PY-OLD-1", dob="", version="2.4")))
    assert ack.msh.msh_12.to_er7() == "2.4"
    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.err.err_1.to_er7().startswith("PID^1^7^101")


def test_python_hl7_over_mutual_tls_and_a_resend(gateway):
    message = admission("PY-TLS-1")
    with gateway.tls_client("YP001") as client:
        first = parsed_ack(client.send_message(message))
        again = parsed_ack(client.send_message(message))
    assert first.msa.msa_1.to_er7() == "AA"
    assert again.msa.msa_1.to_er7() == "AA", "a resend of the same control id"
    assert again.msa.msa_2.to_er7() == "PY-TLS-1"
    # A GP's certificate may not send an admission: refused by identity.
    with gateway.tls_client("YG001") as client:
        refused = parsed_ack(client.send_message(admission("PY-TLS-2")))
    assert refused.msa.msa_1.to_er7() == "AE"
    assert refused.err.err_5.to_er7().startswith("PERMISSION_DENIED")


def test_several_errors_in_an_older_version_make_one_valid_err(gateway):
    """v2.4 and earlier allow one ERR: several errors repeat its ERR-1."""
    bad_sex = admission("PY-OLD-2", dob="", version="2.4").replace("|||M\r", "|||Q\r", 1)
    assert "|||Q\r" in bad_sex
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(bad_sex))
    assert ack.msa.msa_1.to_er7() == "AE"
    assert len(ack.children.get("ERR")) == 1
    places = [rep.to_er7() for rep in ack.err.children.get("ERR_1")]
    assert len(places) == 2, places
    assert places[0].startswith("PID^1^7^101") and places[1].startswith("PID^1^8^103")


def test_v2_3_is_answered_without_a_message_structure(gateway):
    """v2.3's MSH-9 has two components; hl7apy refuses a third under STRICT."""
    with gateway.tls_client() as client:
        raw = client.send_message(admission("PY-OLD-3", version="2.3"))
    lines = raw.decode().strip("\x0b\x1c\r\n").split("\r")
    msh = parse_segment(lines[0], version="2.3", validation_level=VALIDATION_LEVEL.STRICT)
    assert msh.validate()
    assert msh.msh_9.to_er7() == "ACK^A01"
    msa = parse_segment(lines[1], version="2.3", validation_level=VALIDATION_LEVEL.STRICT)
    assert msa.msa_1.to_er7() == "AA" and msa.msa_2.to_er7() == "PY-OLD-3"


def send_frames(gateway, *messages: bytes) -> bytes:
    """Sends raw messages, each framed, on one connection (as YP001); returns the first reply frame."""
    with gateway.tls_socket("YP001") as s:
        for m in messages:
            s.sendall(b"\x0b" + m + b"\x1c\r")
        reply = b""
        while not reply.endswith(b"\x1c\r"):
            chunk = s.recv(4096)
            assert chunk, reply
            reply += chunk
    return reply


def test_a_latin_1_message_is_read_as_msh_18_declares(gateway):
    """HL7 table 0211: 8859/1 is decoded (the name is not refused as bad UTF-8)."""
    text = admission("PY-L1-1").replace("Whitcombe^Ellis", "Whitcombe^Zo\u00eb")
    msh, rest = text.split("\r", 1)
    latin = (msh + "||||||8859/1\r" + rest).encode("latin-1")
    ack = parsed_ack(send_frames(gateway, latin))
    assert ack.msa.msa_1.to_er7() == "AA", reply
    # A set the gateway does not read is refused at MSH-18.
    other = admission("PY-L1-2")
    msh, rest = other.split("\r", 1)
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(msh + "||||||ISO IR87\r" + rest))
    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.err.err_2.to_er7() == "MSH^1^18"


def test_other_delimiters_are_refused_with_an_ack_that_names_the_message(gateway):
    """MSH-1/MSH-2 define a message's delimiters: a refusal read by them names its MSH-10."""
    text = admission("PY-DELIM-1").replace("^", "$")
    assert text.startswith("MSH|$~\\&|")
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(text))
    assert ack.msa.msa_1.to_er7() == "AE"
    assert ack.msa.msa_2.to_er7() == "PY-DELIM-1"
    assert ack.msh.msh_9.to_er7() == "ACK^A01^ACK"
    assert ack.err.err_2.to_er7() == "MSH^1^2"


def with_ack_types(text: str, accept: str, application: str) -> str:
    msh, rest = text.split("\r", 1)
    return f"{msh}|||{accept}|{application}\r{rest}"


def test_enhanced_mode_gets_commit_acks_as_msh_15_asks(gateway):
    """HL7 v2 §2.9.3: MSH-15 AL gets a commit ACK (CA); NE gets none at all."""
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(with_ack_types(admission("PY-ENH-1"), "AL", "NE")))
    assert ack.msa.msa_1.to_er7() == "CA"
    assert ack.msa.msa_2.to_er7() == "PY-ENH-1"
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(with_ack_types(admission("PY-ENH-2", dob=""), "AL", "NE")))
    assert ack.msa.msa_1.to_er7() == "CE"
    # NE: no acknowledgement; the next message on the connection is answered as usual.
    quiet = with_ack_types(admission("PY-ENH-3"), "NE", "NE")
    reply = send_frames(gateway, quiet.encode(), admission("PY-ENH-4").encode())
    ack = parsed_ack(reply)
    assert ack.msa.msa_1.to_er7() == "AA"
    assert ack.msa.msa_2.to_er7() == "PY-ENH-4", "no ACK was sent for the NE message"


def test_enhanced_mode_sends_the_application_ack_msh_16_asks_when_msh_15_asks_none(gateway):
    """HL7 v2 §2.9.3, table 0155: MSH-15 NE with MSH-16 ER asks to hear of errors only, by
    application acknowledgement; a refused message gets its AE (never silence, which the sender
    reads as success), an accepted one nothing. MSH-16 AL gets the AA of an accepted one."""
    with gateway.tls_client() as client:
        ack = parsed_ack(
            client.send_message(with_ack_types(admission("PY-APP-1", dob=""), "NE", "ER"))
        )
    assert ack.msa.msa_1.to_er7() == "AE", "an application error, not a commit code"
    assert ack.msa.msa_2.to_er7() == "PY-APP-1"
    assert ack.err.err_3.to_er7().startswith("101")
    accepted = with_ack_types(admission("PY-APP-2"), "NE", "ER")
    reply = send_frames(gateway, accepted.encode(), admission("PY-APP-3").encode())
    assert parsed_ack(reply).msa.msa_2.to_er7() == "PY-APP-3", "nothing for an accepted ER message"
    with gateway.tls_client() as client:
        ack = parsed_ack(client.send_message(with_ack_types(admission("PY-APP-4"), "NE", "AL")))
    assert ack.msa.msa_1.to_er7() == "AA"
    assert ack.msa.msa_2.to_er7() == "PY-APP-4"


def test_a_segment_or_header_value_the_standard_forbids_gets_the_standards_err(gateway):
    """HL7 table 0357 codes and ERL locations, judged by hl7apy: a second PID and a
    missing PV1 are segment sequence errors (100) placed at the segment; an MSH-15
    outside table 0155 is 103; an archived message (MSH-11.2 A, table 0207) is 202;
    a six-character MSH-2 is refused at MSH-2; a batch is refused, not read as one message."""
    base = admission("PY-SEQ-0")
    pid = next(s for s in base.split("\r") if s.startswith("PID|"))
    cases = {
        "PY-SEQ-1": (base.replace(pid, pid + "\r" + pid.replace("Ellis", "Morgan")), "PID^2", "100"),
        "PY-SEQ-2": ("\r".join(s for s in base.split("\r") if not s.startswith("PV1|")), "PV1^1", "100"),
        "PY-SEQ-3": (with_ack_types(base, "XX", ""), "MSH^1^15", "103"),
        "PY-SEQ-4": (base.replace("|PY-SEQ-0|P|", "|PY-SEQ-0|P^A|"), "MSH^1^11^1^2", "202"),
        "PY-SEQ-5": (base.replace("MSH|^~\\&|", "MSH|^~\\&##|"), "MSH^1^2", "102"),
    }
    for control_id, (text, location, code) in cases.items():
        with gateway.tls_client() as client:
            ack = parsed_ack(client.send_message(text.replace("PY-SEQ-0", control_id)))
        assert ack.msa.msa_1.to_er7() in ("AE", "AR", "CE", "CR"), control_id
        assert ack.msa.msa_2.to_er7() == control_id
        assert ack.err.err_2.to_er7() == location, control_id
        assert ack.err.err_3.to_er7().startswith(code + "^"), (control_id, ack.err.err_3.to_er7())
    batch = f"FHS|^~\\&|OTHERPAS|YP001\rBHS|^~\\&|OTHERPAS|YP001\r{base}\rBTS|1\rFTS|1"
    with gateway.tls_client() as client:
        raw = client.send_message(batch).decode().strip("\x0b\x1c\r\n")
    # Its MSA-2 is empty (nothing names the message), so hl7apy reads it tolerantly.
    ack = parse_message(raw, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
    assert ack.msh.msh_9.to_er7() == "ACK^^ACK"
    assert ack.msa.msa_1.to_er7() in ("AE", "AR")
    assert "batch" in ack.err.err_8.to_er7(), raw
