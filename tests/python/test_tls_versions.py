"""TLS below 1.2 is refused at the handshake, and the refusal is audited.

rustls clients cannot offer TLS 1.1, so Python's `ssl` (OpenSSL) plays the
old client. OpenSSL 3 only offers TLS 1.0/1.1 at security level 0, which the
test asks for; if this OpenSSL was built without them at all, it says so.
"""

import json
import socket
import ssl
import subprocess

import pytest

from conftest import BIN

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def old_client_context(gateway, version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(gateway.certs / "ca.pem"))
    ctx.load_cert_chain(str(gateway.certs / "clients" / "YP001.pem"), str(gateway.certs / "clients" / "YP001.key"))
    try:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version = version
        ctx.maximum_version = version
    except (ValueError, ssl.SSLError) as e:
        pytest.skip(f"this OpenSSL cannot be configured for {version.name}: {e}")
    return ctx


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_below_1_2_is_refused_and_audited(gateway, version):
    ctx = old_client_context(gateway, version)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.recv(1)
    if "NO_PROTOCOLS_AVAILABLE" in str(refused.value) or "no protocols available" in str(refused.value):
        pytest.skip(f"this OpenSSL will not offer {version.name} at all: {refused.value}")
    # The server, not our client, ended it: rustls answers with an alert
    # (handshake_failure: no version in common).
    assert "ALERT" in str(refused.value).upper(), refused.value

    # A modern client still works on the same gateway.
    ok = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ok.load_verify_locations(str(gateway.certs / "ca.pem"))
    ok.load_cert_chain(str(gateway.certs / "clients" / "YP001.pem"), str(gateway.certs / "clients" / "YP001.key"))
    ok.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw:
        with ok.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")

    gateway.stop()
    out = subprocess.run(
        [BIN, "admin", "audit", "list", "--data-dir", str(gateway.dir / "data")],
        check=True, capture_output=True, text=True,
    ).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    refusals = [e for e in entries if e["action"] == "connect"]
    assert any("incompatible TLS client" in e["outcome"] for e in refusals), refusals
    assert all(e["actor"] == "peer:loopback:127.0.0.1" for e in refusals), refusals
