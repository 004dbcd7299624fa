"""Standard gRPC tooling, without our .proto files: discover the gateway through
server reflection, call a method from the reflected descriptors alone, and
health-check it (grpc.health.v1), always over mutual TLS."""

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

HANDOVER = "throughcare.v1.HandoverService"
OPERATOR = "throughcare.v1.OperatorService"


def test_reflection_lists_services_and_resolves_methods(gateway):
    with gateway.channel("operator-oncall") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {HANDOVER, OPERATOR, "grpc.health.v1.Health"} <= services, services
        assert any(s.startswith("grpc.reflection.") for s in services), services

        pool = descriptor_pool.DescriptorPool(db)
        handover = pool.FindServiceByName(HANDOVER)
        assert {m.name for m in handover.methods} == {"Submit", "Pull", "Ack", "AckBatch", "Nack", "Track", "Claim"}
        operator = pool.FindServiceByName(OPERATOR)
        assert {"ListMailboxes", "Redrive", "ClaimParked", "AuditTrail"} <= {m.name for m in operator.methods}
        submit = handover.FindMethodByName("Submit")
        assert submit.input_type.full_name == "throughcare.v1.SubmitRequest"
        assert submit.output_type.full_name == "throughcare.v1.SubmitResponse"
        # Dependencies resolve too: our summary file and the well-known Timestamp.
        delivery = pool.FindMessageTypeByName("throughcare.v1.Delivery")
        assert delivery.fields_by_name["submitted_at"].message_type.full_name == "google.protobuf.Timestamp"
        native = pool.FindMessageTypeByName("throughcare.v1.SubmitRequest").fields_by_name["native"]
        assert native.message_type.file.name == "throughcare/v1/summary.proto"


def test_reflection_serves_the_error_details_so_tools_decode_refusals(gateway):
    """What grpcurl does with grpc-status-details-bin: resolve each Any's type
    through reflection and decode it, with no .proto file of ours or Google's."""
    with gateway.channel("YP001") as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        bad_request = pool.FindMessageTypeByName("google.rpc.BadRequest")
        assert "field_violations" in bad_request.fields_by_name
        assert pool.FindMessageTypeByName("google.rpc.ErrorInfo").fields_by_name["reason"]
        retry = pool.FindMessageTypeByName("google.rpc.RetryInfo")
        assert retry.fields_by_name["retry_delay"].message_type.full_name == "google.protobuf.Duration"
        track = pool.FindServiceByName(HANDOVER).FindMethodByName("Track")
        request_class = message_factory.GetMessageClass(track.input_type)
        call = channel.unary_unary(
            f"/{HANDOVER}/Track",
            request_serializer=request_class.SerializeToString,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.RpcError) as invalid:
            call(request_class(), timeout=10)
        raw = dict(invalid.value.trailing_metadata())["grpc-status-details-bin"]
        status_type = message_factory.GetMessageClass(_status_descriptor(pool))
        status = status_type.FromString(raw)
        decoded = {}
        for any_detail in status.details:
            name = any_detail.type_url.rsplit("/", 1)[-1]
            message = message_factory.GetMessageClass(pool.FindMessageTypeByName(name))()
            message.ParseFromString(any_detail.value)
            decoded[name] = message
        assert [v.field for v in decoded["google.rpc.BadRequest"].field_violations] == ["handover"]
        assert decoded["google.rpc.ErrorInfo"].reason == "INVALID_ARGUMENT"


def _status_descriptor(pool):
    """google.rpc.Status is grpc's own envelope (tools know it built in); the
    details inside it are what reflection must supply."""
    from google.rpc import status_pb2

    return status_pb2.Status.DESCRIPTOR


def test_a_method_called_from_reflected_descriptors_alone(gateway):
    with gateway.channel("YP001") as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        track = pool.FindServiceByName(HANDOVER).FindMethodByName("Track")
        request_class = message_factory.GetMessageClass(track.input_type)
        response_class = message_factory.GetMessageClass(track.output_type)
        call = channel.unary_unary(
            f"/{HANDOVER}/Track",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        with pytest.raises(grpc.RpcError) as refused:
            call(request_class(message_id="never-sent"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as invalid:
            call(request_class(), timeout=10)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_health_check_reports_serving(gateway):
    with gateway.channel("YG001") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", HANDOVER):
            answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.RpcError) as unknown:
            health.Check(health_pb2.HealthCheckRequest(service="throughcare.v1.Nothing"), timeout=10)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_health_needs_a_client_certificate(gateway):
    with gateway.channel(None) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_watch_says_not_serving_on_sigterm(gateway):
    with gateway.channel("YG001") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=HANDOVER), timeout=30
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        gateway.proc.terminate()
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert gateway.proc.wait(timeout=20) == 0
