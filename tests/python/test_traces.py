"""Traces over OTLP: an OTLP TraceService of our own (opentelemetry-proto + grpcio) records what
the real gateway exports, and one handover is followed from the prison's submit to the GP's ack."""

import json
import re
import threading
import time
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from conftest import ROOT, Gateway
from test_grpc_client import release

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
UNSAMPLED_TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4737"
REFUSED_TRACE_ID = "6bf92f3577b34da6a3ce929d0e0e4738"
TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-0[01]$")


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every exported span with its resource."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend((resource_spans.resource, s) for s in scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self):
        with self.lock:
            return list(self.spans)


@pytest.fixture
def receiver():
    r = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(r, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    r.endpoint = f"http://127.0.0.1:{port}"
    yield r
    server.stop(grace=None)


def traceparent_of(call):
    for key, value in call.initial_metadata() or ():
        if key == "traceparent":
            return value
    return None


def attributes(kvs):
    return {kv.key: kv.value for kv in kvs}


def value_of(any_value):
    """An attribute's value as text (a u64 id arrives as a string, a smaller number as an int)."""
    kind = any_value.WhichOneof("value")
    return str(getattr(any_value, kind)) if kind else ""


def every_text(resource, span):
    """Everything a span carries that a person could read: name, attributes, events, links."""
    texts = [span.name]
    texts += [f"{kv.key}={kv.value}" for kv in resource.attributes]
    texts += [f"{kv.key}={kv.value}" for kv in span.attributes]
    for event in span.events:
        texts.append(event.name)
        texts += [f"{kv.key}={kv.value}" for kv in event.attributes]
    for link in span.links:
        texts += [f"{kv.key}={kv.value}" for kv in link.attributes]
    return texts


def test_one_handover_is_one_trace_from_submit_to_ack(pb, receiver):
    gateway = Gateway(env={
        "THROUGHCARE_TELEMETRY_ENABLED": "true",
        "THROUGHCARE_TELEMETRY_OTLP_ENDPOINT": receiver.endpoint,
        "THROUGHCARE_TELEMETRY_SERVICE_NAME": "throughcare-test",
    })
    try:
        prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
        receipt, call = prison.Submit.with_call(
            release(pb, "py-trace-1"),
            metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("tracestate", "prison=1")],
            timeout=10,
        )
        answered = TRACEPARENT.match(traceparent_of(call) or "")
        assert answered and answered.group(1) == TRACE_ID, traceparent_of(call)
        # A caller that does not sample its trace is not recorded.
        prison.Submit(
            release(pb, "py-trace-unsampled", fixture="06-many-medicines-and-allergies.json", to=("YG002",)),
            metadata=[("traceparent", f"00-{UNSAMPLED_TRACE_ID}-{PARENT_ID}-00")],
            timeout=10,
        )
        # A refusal is traced with its gRPC status; the invalid NHS number is nowhere in it.
        with pytest.raises(grpc.RpcError):
            prison.Submit(
                release(pb, "py-trace-refused", nhs="9990000017"),
                metadata=[("traceparent", f"00-{REFUSED_TRACE_ID}-{PARENT_ID}-01")],
                timeout=10,
            )

        gp = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
        pulled, call = gp.Pull.with_call(pb.h.PullRequest(max_deliveries=5), timeout=10)
        (delivery,) = pulled.deliveries
        assert delivery.handover_id == receipt.handover_id
        pull_answer = TRACEPARENT.match(traceparent_of(call) or "")
        assert pull_answer and pull_answer.group(1) != TRACE_ID, "the GP's call is its own trace"
        _, call = gp.Ack.with_call(
            pb.h.AckRequest(delivery_id=delivery.delivery_id, attempt=delivery.attempt), timeout=10
        )
        assert TRACEPARENT.match(traceparent_of(call) or "")
    finally:
        gateway.stop()  # SIGTERM: the gateway exports what is queued before it exits
    assert gateway.proc.returncode == 0

    deadline = time.time() + 20
    while time.time() < deadline and not any(s.name == "delivery.acked" for _, s in receiver.snapshot()):
        time.sleep(0.2)
    spans = receiver.snapshot()
    by_name = {}
    for resource, span in spans:
        by_name.setdefault(span.name, []).append(span)
    names = sorted(by_name)

    submit_call = [s for s in by_name.get("throughcare.v1.HandoverService/Submit", ()) if s.trace_id.hex() == TRACE_ID]
    assert len(submit_call) == 1, names
    (submit_call,) = submit_call
    assert submit_call.parent_span_id.hex() == PARENT_ID
    assert submit_call.kind == submit_call.SPAN_KIND_SERVER
    assert attributes(submit_call.attributes)["rpc.method"].string_value == "Submit"
    assert submit_call.trace_state == "prison=1"
    assert answered.group(2) == submit_call.span_id.hex(), "the answer names the submit's span"
    (submit,) = [s for s in by_name["submit"] if s.trace_id.hex() == TRACE_ID]
    assert submit.parent_span_id == submit_call.span_id

    # The GP's pull and ack: each a span in the submitter's trace, child of the submit.
    (deliver,) = [s for s in by_name["deliver"] if s.trace_id.hex() == TRACE_ID]
    assert deliver.parent_span_id == submit.span_id
    assert value_of(attributes(deliver.attributes)["delivery_id"]) == str(delivery.delivery_id)
    (acked,) = by_name["delivery.acked"]
    assert acked.trace_id.hex() == TRACE_ID and acked.parent_span_id == submit.span_id
    # ... linked to the GP's own calls, which are in the GP's trace.
    (pull_call,) = by_name["throughcare.v1.HandoverService/Pull"]
    (ack_call,) = by_name["throughcare.v1.HandoverService/Ack"]
    assert pull_call.trace_id.hex() == pull_answer.group(1)
    pull_span = next(s for s in by_name["pull"] if s.trace_id == pull_call.trace_id)
    assert [(l.trace_id, l.span_id) for l in deliver.links] == [(pull_span.trace_id, pull_span.span_id)]
    ack_span = next(s for s in by_name["ack"] if s.trace_id == ack_call.trace_id)
    assert [(l.trace_id, l.span_id) for l in acked.links] == [(ack_span.trace_id, ack_span.span_id)]

    assert not [s for _, s in spans if s.trace_id.hex() == UNSAMPLED_TRACE_ID], "unsampled trace recorded"
    (refused,) = [s for s in by_name["throughcare.v1.HandoverService/Submit"] if s.trace_id.hex() == REFUSED_TRACE_ID]
    assert value_of(attributes(refused.attributes)["rpc.grpc.status_code"]) == "3"  # INVALID_ARGUMENT
    assert refused.status.code == refused.status.STATUS_CODE_ERROR
    resource = attributes(spans[0][0].attributes)
    assert resource["service.name"].string_value == "throughcare-test"

    # No patient data anywhere in what left the gateway.
    patient = json.loads((ROOT / "tests/fixtures/patients/01-ost-released-today.json").read_text())["patient"]
    secrets = [patient["nhs_number"], patient["prison_number"], patient["crn"], patient["family_name"],
               patient["date_of_birth"], *patient["given_names"], "py-trace-1"]
    for resource, span in spans:
        for text in every_text(resource, span):
            for secret in secrets:
                assert secret not in text, f"{secret!r} in span {span.name}: {text}"
            assert not re.search(r"999\d{7}", text), f"an NHS number in span {span.name}: {text}"


def test_without_telemetry_nothing_is_exported(pb, receiver):
    gateway = Gateway(env={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
    try:
        prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
        _, call = prison.Submit.with_call(
            release(pb, "py-untraced"),
            metadata=[("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01")],
            timeout=10,
        )
        assert traceparent_of(call) is None
    finally:
        gateway.stop()
    time.sleep(1)
    assert receiver.snapshot() == []
