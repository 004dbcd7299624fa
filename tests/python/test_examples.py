"""The integrator's examples (examples/) run against the real gateway, so they
cannot rot: Python with grpcio and Node.js with @grpc/grpc-js, each submitting
a release, pulling and acknowledging it, and tracking it over mutual TLS."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

NODE_MODULES = ROOT / "target" / "node" / "node_modules"


def run_example(command, gateway, env=None):
    out = subprocess.run(
        command + ["--server", f"127.0.0.1:{gateway.port}", "--certs", str(gateway.certs)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, f"{command} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def check(stdout):
    lines = stdout.splitlines()
    assert lines[-1] == "ok", stdout
    assert any(line.startswith("track: YG001 DELIVERED") for line in lines), stdout
    assert any(line.startswith("submitted ") and "YG001" in line for line in lines), stdout


def test_python_example(gateway):
    check(run_example([sys.executable, str(ROOT / "examples" / "python" / "release_round_trip.py")], gateway))


def test_node_example(gateway):
    node = shutil.which("node")
    installed = (NODE_MODULES / "@grpc" / "grpc-js").is_dir()
    if node is None or not installed:
        if os.environ.get("THROUGHCARE_REQUIRE_NODE") == "1":
            pytest.fail("node or the example's npm packages are missing (tests/run installs them)")
        pytest.skip("node or @grpc/grpc-js not installed; tests/run installs them")
    stdout = run_example(
        [node, str(ROOT / "examples" / "node" / "release_round_trip.js")],
        gateway,
        env={"NODE_PATH": str(NODE_MODULES)},
    )
    check(stdout)
