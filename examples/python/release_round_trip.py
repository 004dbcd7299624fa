#!/usr/bin/env python3
"""A prison releases a patient, the GP practice pulls and acknowledges the
summary, and the prison tracks it: the whole handover contract from Python
(grpcio), over mutual TLS.

    pip install grpcio grpcio-tools
    python3 examples/python/release_round_trip.py --server 127.0.0.1:7443 --certs certs

`--certs` is a directory laid out like the dev PKI (`throughcare certs init`):
`ca.pem` (the gateway's CA) and `clients/<NAME>.pem` + `clients/<NAME>.key`
(each organisation's certificate, SAN `urn:ods:<ODS code>`). The stubs are
generated from `proto/` at start-up, so the example always matches the
contract it is run against. The patient is invented (999 test range).
"""

import argparse
import os
import importlib
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from google.protobuf.duration_pb2 import Duration

PROTO = Path(__file__).resolve().parents[2] / "proto"


def stubs():
    """Generates and imports the Python stubs for throughcare.v1."""
    import grpc_tools
    from grpc_tools import protoc

    out = tempfile.mkdtemp(prefix="throughcare-stubs-")
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = [str(p.relative_to(PROTO)) for p in sorted(PROTO.rglob("*.proto"))]
    args = ["protoc", f"-I{PROTO}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + protos) != 0:
        sys.exit("could not generate stubs from proto/")
    sys.path.insert(0, out)
    return (
        importlib.import_module("throughcare.v1.handover_pb2"),
        importlib.import_module("throughcare.v1.handover_pb2_grpc"),
        importlib.import_module("throughcare.v1.summary_pb2"),
    )


def channel(server, certs, name, target_name):
    """A mutual-TLS channel as organisation `name`."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=(certs / "ca.pem").read_bytes(),
        private_key=(certs / "clients" / f"{name}.key").read_bytes(),
        certificate_chain=(certs / "clients" / f"{name}.pem").read_bytes(),
    )
    return grpc.secure_channel(server, creds, options=[("grpc.ssl_target_name_override", target_name)])


def release_summary(s, prison, gp):
    """An invented patient's release summary in the native format."""
    return s.ClinicalSummary(
        patient=s.Patient(
            nhs_number="9990000018",
            family_name="Example (invented)",
            given_names=["Sam"],
            date_of_birth="1985-06-15",
            sex=s.SEX_UNKNOWN,
        ),
        custody=s.Custody(
            establishment=prison,
            release_date=time.strftime("%Y-%m-%d"),
            release_address=s.Address(lines=["1 Invented Street"], city="Northam", postcode="ZZ1 1ZZ"),
        ),
        registered_gp=gp,
        medications=[
            s.Medication(
                code=s.Code(system="https://dmd.nhs.uk", code="39695411000001103", display="Paracetamol 500mg tablets"),
                dose="1 g",
                route="oral",
                frequency="four times daily when required",
            )
        ],
        consent=s.Consent(probation_sharing=s.CONSENT_DECISION_GIVEN),
        author=s.Author(name="Dr Invented", role="Prison GP", organisation=prison),
        authored_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


def says_when_to_retry(err):
    """Whether the refusal carries google.rpc.RetryInfo (a rate or claim limit
    does; MESSAGE_TOO_LARGE does not, and will never succeed as sent)."""
    details = dict(err.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
    return b"google.rpc.RetryInfo" in details


def submit_with_retries(stub, request, attempts=5):
    """Submit is idempotent on message_id: retry UNAVAILABLE, deadline
    failures and RESOURCE_EXHAUSTED that says when, with the same request; a
    duplicate receipt is a success."""
    for attempt in range(attempts):
        try:
            return stub.Submit(request, timeout=10)
        except grpc.RpcError as err:
            retryable = err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or (
                err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and says_when_to_retry(err))
            if not retryable or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise RuntimeError("unreachable")


def store_durably(inbox, d):
    """The practice system's own store: the document is on disk (fsync)
    before the delivery is acked. Keyed by delivery id, so a repeat (delivery
    is at-least-once) overwrites itself."""
    path = inbox / f"delivery-{d.delivery_id}.bin"
    with open(path, "wb") as f:
        f.write(d.SerializeToString())
        f.flush()
        os.fsync(f.fileno())


def state_name(h, state):
    """DELIVERY_STATE_DELIVERED reads as DELIVERED."""
    return h.DeliveryState.Name(state).removeprefix("DELIVERY_STATE_")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:7443")
    parser.add_argument("--certs", type=Path, default=Path("certs"))
    parser.add_argument("--tls-name", default="localhost", help="the name in the gateway's certificate")
    parser.add_argument("--prison", default="YP001")
    parser.add_argument("--inbox", type=Path, default=None,
                        help="where the practice stores what it pulls (default: a temporary directory)")
    parser.add_argument("--gp", default="YG001")
    args = parser.parse_args()
    h, h_grpc, s = stubs()

    prison = h_grpc.HandoverServiceStub(channel(args.server, args.certs, args.prison, args.tls_name))
    message_id = f"example-py-{uuid.uuid4()}"
    request = h.SubmitRequest(
        message_id=message_id,
        event=h.JOURNEY_EVENT_RELEASE,
        destinations=[args.gp],
        native=release_summary(s, args.prison, args.gp),
    )
    receipt = submit_with_retries(prison, request)
    print(f"submitted {message_id} as handover {receipt.handover_id}: "
          + ", ".join(d.destination for d in receipt.deliveries))

    gp = h_grpc.HandoverServiceStub(channel(args.server, args.certs, args.gp, args.tls_name))
    inbox = args.inbox or Path(tempfile.mkdtemp(prefix="practice-inbox-"))
    inbox.mkdir(parents=True, exist_ok=True)
    # The pull loop: long-poll, store each delivery, ack that attempt.
    mine = None
    deadline = time.time() + 20
    while mine is None and time.time() < deadline:
        pulled = gp.Pull(h.PullRequest(max_deliveries=10, wait=Duration(seconds=2)), timeout=10)
        for d in pulled.deliveries:
            # Stored durably first, then acked: an ack is the gateway's licence to forget it.
            store_durably(inbox, d)
            gp.Ack(h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt), timeout=10)
            if d.handover_id == receipt.handover_id:
                mine = d
    if mine is None:
        sys.exit("the practice never received the release")
    print(f"{args.gp} received handover {mine.handover_id} (delivery {mine.delivery_id}, "
          f"attempt {mine.attempt}, not carried: {list(mine.not_carried) or 'nothing'})")

    status = prison.Track(h.TrackRequest(message_id=message_id), timeout=10)
    for d in status.deliveries:
        print(f"track: {d.destination} {state_name(h, d.state)}")
    delivered = {d.destination: state_name(h, d.state) for d in status.deliveries}
    if delivered.get(args.gp) != "DELIVERED":
        sys.exit(f"tracking says {delivered}")
    print("ok")


if __name__ == "__main__":
    main()
