"""Python's grpcio as a second, independent client of the handover service."""

import json
import subprocess
import tempfile

import grpc
import pytest
from fhir.resources.R4B.bundle import Bundle
from google.rpc import error_details_pb2, status_pb2

from conftest import BIN, ROOT


FIXTURES = ROOT / "tests" / "fixtures" / "patients"


def fhir_of(fixture: str, sender: str = "YP001") -> str:
    """A FHIR Bundle of a synthetic patient, rendered by our converter, as
    prison `sender` writes it (its own establishment and name as author: a
    document naming another prison of the network is refused)."""
    summary = json.loads((FIXTURES / fixture).read_text())
    summary["custody"]["establishment"] = sender
    summary["author"]["organisation"] = sender
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(summary, f)
        f.flush()
        out = subprocess.run(
            [BIN, "convert", "--from", "model-json", "--to", "fhir", "--event", "release", f.name],
            check=True,
            capture_output=True,
        )
    return out.stdout.decode()


def release(pb, message_id, fixture="01-ost-released-today.json", nhs=None, to=("YG001",)):
    request = pb.h.SubmitRequest(
        message_id=message_id,
        event=pb.h.JOURNEY_EVENT_RELEASE,
        destinations=list(to),
        fhir_json=fhir_of(fixture),
    )
    if nhs is not None:
        request.patient.nhs_number = nhs
    return request


def bad_request_fields(err):
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return [v.field for v in bad.field_violations]
    return []


def details_of(err):
    """The google.rpc details of a refusal, by type name."""
    found = {}
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == err.code().value[0]
            for detail in status.details:
                for kind in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
                    message = kind()
                    if detail.Unpack(message):
                        found[kind.DESCRIPTOR.name] = message
    return found


def test_submit_pull_ack_track(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    receipt = prison.Submit(release(pb, "py-1"), timeout=10)
    assert not receipt.duplicate
    # The named practice, and the probation region of the releasing prison.
    assert [d.destination for d in receipt.deliveries] == ["YG001", "YPR01"]
    assert all(d.HasField("due_at") for d in receipt.deliveries)

    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
    pulled = gp.Pull(pb.h.PullRequest(max_deliveries=5), timeout=10).deliveries
    assert len(pulled) == 1
    d = pulled[0]
    assert d.handover_id == receipt.handover_id
    assert d.sender == "YP001"
    assert d.patient.nhs_number == "9990001014"
    assert d.urgent, "opioid substitution therapy makes a release urgent"
    # Riverside (YG001) is registered for FHIR: the Bundle is valid R4.
    assert d.WhichOneof("document") == "fhir_json"
    bundle = Bundle.model_validate_json(d.fhir_json)
    types = [e.resource.__resource_type__ for e in bundle.entry]
    assert "MedicationStatement" in types
    gp.Ack(pb.h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt), timeout=10)

    track = prison.Track(pb.h.TrackRequest(message_id="py-1"), timeout=10)
    assert track.deliveries[0].state == pb.h.DELIVERY_STATE_DELIVERED
    assert track.deliveries[0].delivered_at.seconds > 0


def test_duplicate_and_conflicting_submits(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    first = prison.Submit(release(pb, "py-dup"), timeout=10)
    again = prison.Submit(release(pb, "py-dup"), timeout=10)
    assert again.duplicate and again.handover_id == first.handover_id
    with pytest.raises(grpc.RpcError) as err:
        prison.Submit(release(pb, "py-dup", fixture="06-many-medicines-and-allergies.json"), timeout=10)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_field_violations_come_as_google_rpc_bad_request(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    with pytest.raises(grpc.RpcError) as err:
        prison.Submit(release(pb, "py-bad", nhs="9990000017"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["patient.nhs_number"]
    assert "9990000017" not in err.value.details()


def test_a_refusal_with_many_violations_fits_a_default_grpcio_channel(gateway, pb):
    # A default grpcio channel refuses trailers over 8-16 KiB: a refusal
    # listing every one of many violations would reach the caller as
    # RESOURCE_EXHAUSTED (which clients retry) instead of INVALID_ARGUMENT.
    # Sixteen destinations (the most a submit may name), each invalid.
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    with pytest.raises(grpc.RpcError) as err:
        prison.Submit(release(pb, "py-many", to=["not an ods code"] * 16), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    details = details_of(err.value)
    fields = [v.field for v in details["BadRequest"].field_violations]
    assert 1 <= len(fields) <= 10
    assert all(f.startswith("destinations") for f in fields), fields
    assert int(details["ErrorInfo"].metadata["violations"]) > len(fields)
    assert "more" in err.value.details()
    # More than sixteen is refused whole, before any is read.
    with pytest.raises(grpc.RpcError) as err:
        prison.Submit(release(pb, "py-many", to=["not an ods code"] * 300), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert [v.field for v in details_of(err.value)["BadRequest"].field_violations] == ["destinations"]


def test_no_client_certificate_is_refused(gateway, pb):
    anonymous = pb.grpc.HandoverServiceStub(gateway.channel(None))
    with pytest.raises(grpc.RpcError) as err:
        anonymous.Pull(pb.h.PullRequest(max_deliveries=1), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_one_practice_cannot_ack_anothers_delivery(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    prison.Submit(release(pb, "py-iso"), timeout=10)
    riverside = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
    d = riverside.Pull(pb.h.PullRequest(max_deliveries=1), timeout=10).deliveries[0]
    hillview = pb.grpc.HandoverServiceStub(gateway.channel("YG002"))
    assert not hillview.Pull(pb.h.PullRequest(max_deliveries=5), timeout=10).deliveries
    with pytest.raises(grpc.RpcError) as err:
        hillview.Ack(pb.h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    riverside.Ack(pb.h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt), timeout=10)


def test_every_refusal_names_its_reason_in_error_info(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
    with pytest.raises(grpc.RpcError) as invalid:
        prison.Submit(release(pb, "py-reason", nhs="9990000017"), timeout=10)
    with pytest.raises(grpc.RpcError) as denied:
        gp.Submit(release(pb, "py-reason-2"), timeout=10)
    with pytest.raises(grpc.RpcError) as unknown:
        gp.Ack(pb.h.AckRequest(delivery_id=999999, attempt=1), timeout=10)
    prison.Submit(release(pb, "py-stale"), timeout=10)
    d = gp.Pull(pb.h.PullRequest(max_deliveries=1), timeout=10).deliveries[0]
    with pytest.raises(grpc.RpcError) as stale:
        gp.Ack(pb.h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt + 1), timeout=10)
    for err, code, reason in [
        (invalid, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (denied, grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
        (unknown, grpc.StatusCode.NOT_FOUND, "UNKNOWN_DELIVERY"),
        (stale, grpc.StatusCode.FAILED_PRECONDITION, "STALE_ATTEMPT"),
    ]:
        assert err.value.code() == code
        details = details_of(err.value)
        assert details["ErrorInfo"].reason == reason, details
        assert details["ErrorInfo"].domain == "throughcare.v1"
        assert "RetryInfo" not in details
    fields = [v.field for v in details_of(invalid.value)["BadRequest"].field_violations]
    assert fields == ["patient.nhs_number"]


def test_list_calls_page_with_opaque_tokens(gateway, pb):
    """Every list call pages; walking ListOrganisations two at a time gives the
    whole registry once, in ODS-code order, and a made-up token is refused."""
    from throughcare.v1 import operator_pb2, operator_pb2_grpc

    op = operator_pb2_grpc.OperatorServiceStub(gateway.channel("operator-oncall"))
    whole = op.ListOrganisations(operator_pb2.ListOrganisationsRequest(), timeout=10)
    assert whole.next_page_token == ""
    walked, token, pages = [], "", 0
    while True:
        page = op.ListOrganisations(operator_pb2.ListOrganisationsRequest(page_size=2, page_token=token), timeout=10)
        assert len(page.organisations) <= 2
        walked += [o.ods_code for o in page.organisations]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert walked == sorted(o.ods_code for o in whole.organisations)
    assert pages >= 3
    with pytest.raises(grpc.RpcError) as err:
        op.ListParked(operator_pb2.ListParkedRequest(page_size=2, page_token="made-up"), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(err.value) == ["page_token"]


def test_batch_ack_answers_each_attempt_on_its_own(gateway, pb):
    prison = pb.grpc.HandoverServiceStub(gateway.channel("YP001"))
    for i, fixture in enumerate(
        ["01-ost-released-today.json", "06-many-medicines-and-allergies.json", "07-refused-probation-consent.json"]
    ):
        prison.Submit(release(pb, f"py-batch-{i}", fixture=fixture), timeout=10)
    prison.Submit(release(pb, "py-batch-other", fixture="04-release-no-gp.json", to=("YG002",)), timeout=10)
    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
    mine = gp.Pull(pb.h.PullRequest(max_deliveries=10), timeout=10).deliveries
    assert len(mine) == 3
    hillview = pb.grpc.HandoverServiceStub(gateway.channel("YG002"))
    theirs = hillview.Pull(pb.h.PullRequest(max_deliveries=10), timeout=10).deliveries[0]

    def item(d, attempt=None):
        return pb.h.DeliveryAttempt(delivery_id=d.delivery_id, attempt=attempt or d.attempt)

    batch = pb.h.AckBatchRequest(
        attempts=[item(mine[0]), item(mine[1], mine[1].attempt + 1), item(theirs), item(mine[0]), item(mine[2])]
    )
    results = gp.AckBatch(batch, timeout=10).results
    assert [(r.delivery_id, r.outcome) for r in results] == [
        (mine[0].delivery_id, pb.h.ACK_OUTCOME_ACKNOWLEDGED),
        (mine[1].delivery_id, pb.h.ACK_OUTCOME_STALE_ATTEMPT),
        (theirs.delivery_id, pb.h.ACK_OUTCOME_UNKNOWN_DELIVERY),
        (mine[0].delivery_id, pb.h.ACK_OUTCOME_ALREADY_ACKNOWLEDGED),
        (mine[2].delivery_id, pb.h.ACK_OUTCOME_ACKNOWLEDGED),
    ]
    assert results[1].current_attempt == mine[1].attempt
    assert results[1].state == pb.h.DELIVERY_STATE_LEASED
    # Another practice's delivery is not described, only not found.
    assert results[2].state == pb.h.DELIVERY_STATE_UNSPECIFIED and results[2].current_attempt == 0
    # Neither refusal touched its delivery: both owners can still ack theirs.
    hillview.Ack(pb.h.AckRequest(delivery_id=theirs.delivery_id, attempt=theirs.attempt), timeout=10)
    again = gp.AckBatch(batch, timeout=10).results
    assert [r.outcome for r in again] == [
        pb.h.ACK_OUTCOME_ALREADY_ACKNOWLEDGED,
        pb.h.ACK_OUTCOME_STALE_ATTEMPT,
        pb.h.ACK_OUTCOME_UNKNOWN_DELIVERY,
        pb.h.ACK_OUTCOME_ALREADY_ACKNOWLEDGED,
        pb.h.ACK_OUTCOME_ALREADY_ACKNOWLEDGED,
    ]
    gp.Ack(pb.h.AckRequest(delivery_id=mine[1].delivery_id, attempt=mine[1].attempt), timeout=10)


def test_batch_ack_refuses_a_malformed_call_whole(gateway, pb):
    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG001"))
    for attempts, field in [
        ([], "attempts"),
        ([pb.h.DeliveryAttempt(delivery_id=i + 1, attempt=1) for i in range(501)], "attempts"),
        ([pb.h.DeliveryAttempt(delivery_id=1, attempt=1), pb.h.DeliveryAttempt(attempt=1)], "attempts[1].delivery_id"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            gp.AckBatch(pb.h.AckBatchRequest(attempts=attempts), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_request_fields(err.value) == [field]


def valid_nhs_number(start):
    """The first NHS number in the 999 test range from `start` with a valid check digit."""
    for n in range(start, start + 100):
        digits = f"999{n:06d}"
        total = sum(int(d) * (10 - i) for i, d in enumerate(digits))
        check = (11 - total % 11) % 11
        if check != 10:
            return digits + str(check)
    raise ValueError(start)


def test_a_pull_answer_fits_a_default_grpcio_channel(gateway, pb, tmp_path):
    """Three releases of about 1.5 MB each: together over the 4 MiB a default
    grpcio channel accepts. The gateway answers the two that fit; the third
    waits, first in line, its attempt not counted."""
    base = json.loads((FIXTURES / "04-release-no-gp.json").read_text())
    prison = pb.grpc.HandoverServiceStub(gateway.channel(base["custody"]["establishment"]))
    numbers = []
    for i in range(3):
        summary = json.loads(json.dumps(base))
        number = valid_nhs_number(7000 + 100 * i)
        numbers.append(number)
        summary["patient"]["nhs_number"] = number
        summary["patient"]["prison_number"] = f"D70{i}0EF"
        summary["follow_ups"][0]["service"] = f"Outreach {i}. " + "Seen weekly at the day centre. " * 50_000
        path = tmp_path / f"big-{i}.json"
        path.write_text(json.dumps(summary))
        fhir = subprocess.run(
            [BIN, "convert", "--from", "model-json", "--to", "fhir", "--event", "release", str(path)],
            check=True,
            capture_output=True,
        ).stdout.decode()
        assert 1_400_000 < len(fhir) < 2_000_000
        prison.Submit(
            pb.h.SubmitRequest(
                message_id=f"py-big-{i}",
                event=pb.h.JOURNEY_EVENT_RELEASE,
                destinations=["YG002"],
                fhir_json=fhir,
            ),
            timeout=30,
        )
    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG002"))
    first = gp.Pull(pb.h.PullRequest(max_deliveries=10), timeout=30).deliveries
    second = gp.Pull(pb.h.PullRequest(max_deliveries=10), timeout=30).deliveries
    assert [len(first), len(second)] == [2, 1]
    assert [d.attempt for d in [*first, *second]] == [1, 1, 1]
    assert sorted(d.patient.nhs_number for d in [*first, *second]) == sorted(numbers)
    for d in [*first, *second]:
        gp.Ack(pb.h.AckRequest(delivery_id=d.delivery_id, attempt=d.attempt), timeout=10)
    assert gp.Pull(pb.h.PullRequest(max_deliveries=10), timeout=30).deliveries == []


def test_a_long_poll_answers_empty_before_the_callers_deadline(gateway, pb):
    """A pull asking to wait longer than the caller's deadline allows answers,
    empty, before the deadline (read from grpc-timeout), not with an error
    (tonic's CANCELLED, "Timeout expired") at it."""
    import time

    from google.protobuf.duration_pb2 import Duration

    gp = pb.grpc.HandoverServiceStub(gateway.channel("YG002"))
    gp.Pull(pb.h.PullRequest(max_deliveries=1), timeout=10)  # connected
    started = time.monotonic()
    answer = gp.Pull(pb.h.PullRequest(max_deliveries=1, wait=Duration(seconds=20)), timeout=2)
    took = time.monotonic() - started
    assert list(answer.deliveries) == []
    assert 1.0 < took < 2.0, took


def gzip_channel(gateway, name):
    return grpc.secure_channel(
        f"127.0.0.1:{gateway.port}",
        gateway.credentials(name),
        options=[("grpc.ssl_target_name_override", "localhost")],
        compression=grpc.Compression.Gzip,
    )


def test_gzip_compressed_calls_are_accepted_and_a_compressed_bomb_refused(gateway, pb):
    """grpcio with gzip on the channel (a common client setting): submit, pull
    and ack work. A message small compressed but over the limit once
    decompressed is RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE) and nothing is
    stored."""
    prison = pb.grpc.HandoverServiceStub(gzip_channel(gateway, "YP001"))
    receipt = prison.Submit(release(pb, "py-gzip-1", to=("YG002",)), timeout=10)
    gp = pb.grpc.HandoverServiceStub(gzip_channel(gateway, "YG002"))
    pulled = gp.Pull(pb.h.PullRequest(max_deliveries=5), timeout=10).deliveries
    assert [d.handover_id for d in pulled] == [receipt.handover_id]
    gp.Ack(pb.h.AckRequest(delivery_id=pulled[0].delivery_id, attempt=pulled[0].attempt), timeout=10)

    bomb = pb.h.SubmitRequest(
        message_id="py-gzip-bomb",
        event=pb.h.JOURNEY_EVENT_RELEASE,
        destinations=["YG002"],
        fhir_json='{"resourceType": "Bundle", "note": "' + "x" * (6 * 1024 * 1024) + '"}',
    )
    with pytest.raises(grpc.RpcError) as refused:
        prison.Submit(bomb, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "once decompressed" in refused.value.details()
    with pytest.raises(grpc.RpcError) as unknown:
        prison.Track(pb.h.TrackRequest(message_id="py-gzip-bomb"), timeout=10)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unknown_method_is_unimplemented_with_the_contracts_details(gateway, pb):
    """A method no service here has: UNIMPLEMENTED carrying google.rpc.Status
    details with ErrorInfo, like every other refusal (section 5 of the guide)."""
    channel = gateway.channel("YP001")
    for path in ("/throughcare.v1.HandoverService/NoSuchMethod", "/throughcare.v2.HandoverService/Submit"):
        call = channel.unary_unary(path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as refused:
            call(b"", timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        info = details_of(refused.value)["ErrorInfo"]
        assert (info.reason, info.domain) == ("UNIMPLEMENTED", "throughcare.v1")
