"""Shared fixtures: the real throughcare binary on 127.0.0.1 with fresh dev certificates."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("THROUGHCARE_BIN", str(ROOT / "target" / "debug" / "throughcare"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """Python stubs generated from our .proto files by grpcio-tools (not by us)."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("stubs")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # Ours only: proto/google/ is vendored for reflection; Python has its own (googleapis-common-protos).
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto" / "throughcare").rglob("*.proto"))
    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    )
    assert rc == 0, "grpc_tools.protoc failed"
    sys.path.insert(0, str(out))
    from throughcare.v1 import handover_pb2, handover_pb2_grpc, summary_pb2

    return type("pb", (), {"h": handover_pb2, "grpc": handover_pb2_grpc, "s": summary_pb2})


class Gateway:
    def __init__(self, env=None):
        self.dir = Path(tempfile.mkdtemp(prefix="throughcare-py-"))
        self.certs = self.dir / "certs"
        subprocess.run([BIN, "certs", "init", "--dir", str(self.certs)], check=True, capture_output=True)
        self.port = free_port()
        self.log = open(self.dir / "gateway.log", "wb")
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", str(self.dir / "data"),
             "--certs-dir", str(self.certs), "--metrics-listen", "127.0.0.1:0"],
            stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        deadline = time.time() + 15
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("gateway did not start")

    def credentials(self, name=None):
        import grpc

        root = (self.certs / "ca.pem").read_bytes()
        if name is None:
            return grpc.ssl_channel_credentials(root_certificates=root)
        cert = (self.certs / "clients" / f"{name}.pem").read_bytes()
        key = (self.certs / "clients" / f"{name}.key").read_bytes()
        return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)

    def channel(self, name=None):
        import grpc

        return grpc.secure_channel(
            f"127.0.0.1:{self.port}",
            self.credentials(name),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def gateway():
    g = Gateway()
    yield g
    g.stop()
