"""The worker's Generate through a real in-process grpc.aio server over the FakeEngine."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from mercato.v1 import common_pb2, market_pb2, node_pb2

from marketplace.dispatch import DISPATCH_METADATA
from marketplace.identity import verify
from node.receipts import RECEIPT_DOMAIN

from .conftest import MODEL, PRICE_INPUT, PRICE_OUTPUT, WorkerHarness, chat_request, collect


async def test_streams_deltas_then_a_final_with_counts(harness: WorkerHarness) -> None:
    deltas, final = await collect(harness.stub.Generate(chat_request(max_tokens=5)))
    assert final is not None
    # Deltas that arrive while a write is in flight go out merged (see node.worker).
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert all(d.token_ids and d.text for d in deltas)
    assert final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.output_tokens == 5
    prompt_ids = harness.engine.render_chat([("user", "hello")])
    assert final.input_tokens == len(prompt_ids)


async def test_receipt_is_signed_by_the_node_and_matches_the_final(
    harness: WorkerHarness,
) -> None:
    request = chat_request(max_tokens=3, request_id="receipt-1")
    request.segment_index = 2
    request.lease_id = "lease-9"
    _, final = await collect(harness.stub.Generate(request))
    assert final is not None
    signed = final.receipt
    assert signed.node_public_key == harness.identity.public_key
    assert verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature)
    receipt = market_pb2.UsageReceipt.FromString(signed.receipt)
    assert receipt.request_id == "receipt-1"
    assert receipt.node_id == harness.identity.node_id
    assert receipt.model == MODEL
    assert (receipt.input_tokens, receipt.output_tokens) == (final.input_tokens, 3)
    assert receipt.price_input_micro_usd_per_mtok == PRICE_INPUT
    assert receipt.price_output_micro_usd_per_mtok == PRICE_OUTPUT
    assert receipt.segment_index == 2 and receipt.lease_id == "lease-9"
    assert receipt.started_at_unix_ms <= receipt.finished_at_unix_ms
    assert not signed.coordinator_signature


async def test_a_tampered_receipt_does_not_verify(harness: WorkerHarness) -> None:
    _, final = await collect(harness.stub.Generate(chat_request(max_tokens=2)))
    assert final is not None
    receipt = market_pb2.UsageReceipt.FromString(final.receipt.receipt)
    receipt.output_tokens += 1
    tampered = receipt.SerializeToString()
    assert not verify(
        final.receipt.node_public_key, RECEIPT_DOMAIN, tampered, final.receipt.node_signature
    )


async def test_resume_token_ids_count_as_input(harness: WorkerHarness) -> None:
    plain = chat_request(max_tokens=2)
    resumed = chat_request(max_tokens=2)
    resumed.resume_token_ids.extend([260, 261, 262])
    _, final_plain = await collect(harness.stub.Generate(plain))
    _, final_resumed = await collect(harness.stub.Generate(resumed))
    assert final_plain is not None and final_resumed is not None
    assert final_resumed.input_tokens == final_plain.input_tokens + 3


async def test_raw_prompt_and_stop_strings(harness: WorkerHarness) -> None:
    request = node_pb2.WorkerGenerateRequest(
        request_id="p", model=MODEL, prompt="abc", sampling=common_pb2.SamplingParams(max_tokens=50)
    )
    deltas, final = await collect(harness.stub.Generate(request))
    assert final is not None and final.input_tokens == 3
    text = "".join(d.text for d in deltas)
    stop_word = text.split()[3]
    request.sampling.stop.append(stop_word)
    deltas, final = await collect(harness.stub.Generate(request))
    assert final is not None
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert stop_word not in "".join(d.text for d in deltas)


def _ten_token_prompt(max_tokens: int) -> node_pb2.WorkerGenerateRequest:
    """A prompt of 10 tokens for the fake engine (one per byte) asking ``max_tokens``."""
    return node_pb2.WorkerGenerateRequest(
        request_id="r",
        model=MODEL,
        prompt="0123456789",
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
    )


@pytest.mark.parametrize(
    ("request_factory", "code", "needle"),
    [
        (lambda: chat_request(model="other-model"), grpc.StatusCode.NOT_FOUND, "model"),
        (lambda: chat_request(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (lambda: chat_request(temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (lambda: chat_request(temperature=2.5), grpc.StatusCode.INVALID_ARGUMENT, "[0, 2]"),
        (lambda: chat_request(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (lambda: chat_request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (lambda: chat_request(stop=["x"] * 9), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop"),
        (lambda: chat_request(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "sampling.stop[0]"),
        (lambda: chat_request(stop=["y" * 129]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
        (lambda: chat_request(request_id=""), grpc.StatusCode.INVALID_ARGUMENT, "request_id"),
        (
            lambda: node_pb2.WorkerGenerateRequest(request_id="r", model=MODEL),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input",
        ),
        (
            lambda: node_pb2.WorkerGenerateRequest(
                request_id="r", model=MODEL, chat=common_pb2.ChatInput()
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages",
        ),
        (
            lambda: node_pb2.WorkerGenerateRequest(
                request_id="r",
                model=MODEL,
                chat=common_pb2.ChatInput(
                    messages=[common_pb2.ChatMessage(role="wizard", content="hi")]
                ),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "chat.messages[0].role",
        ),
        (
            # 256-token context: a 10-token prompt plus 250 new tokens does not fit.
            lambda: _ten_token_prompt(max_tokens=250),
            grpc.StatusCode.OUT_OF_RANGE,  # this node's limit: another may take it
            "context length 256",
        ),
        (
            lambda: node_pb2.WorkerGenerateRequest(
                request_id="r", model=MODEL, prompt="x", resume_token_ids=[10**6]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "resume_token_ids",
        ),
        (
            # One past the inclusive limit (246 fits; see the next test).
            lambda: _ten_token_prompt(max_tokens=247),
            grpc.StatusCode.OUT_OF_RANGE,  # this node's limit: another may take it
            "context length 256",
        ),
        (
            lambda: node_pb2.WorkerGenerateRequest(request_id="r", model=MODEL, prompt=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt: must not be empty",
        ),
        (
            # The fake engine's vocabulary has 272 ids (0..271).
            lambda: node_pb2.WorkerGenerateRequest(
                request_id="r", model=MODEL, prompt="x", resume_token_ids=[272]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "resume_token_ids",
        ),
        (lambda: chat_request(seed=2**63), grpc.StatusCode.INVALID_ARGUMENT, "sampling.seed"),
        (
            lambda: chat_request(request_id="x" * 129),
            grpc.StatusCode.INVALID_ARGUMENT,
            "request_id",
        ),
        (
            lambda: chat_request(temperature=float("nan")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
    ],
)
async def test_invalid_requests_get_a_status_naming_the_field(
    harness: WorkerHarness, request_factory, code: grpc.StatusCode, needle: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(harness.stub.Generate(request_factory()))
    assert raised.value.code() == code
    assert needle in (raised.value.details() or "")
    assert harness.engine.running_request_ids == frozenset()


async def test_the_context_limit_is_inclusive(harness: WorkerHarness) -> None:
    _, final = await collect(harness.stub.Generate(_ten_token_prompt(max_tokens=246)))
    assert final is not None and final.output_tokens == 246


async def test_client_cancel_aborts_the_engine_request() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        call = harness.stub.Generate(chat_request(max_tokens=200, request_id="to-cancel"))
        received = 0
        async for response in call:
            if response.HasField("delta"):
                received += 1
                if received == 2:
                    break
        assert harness.engine.running_request_ids == frozenset({"to-cancel"})
        call.cancel()
        for _ in range(200):
            if not harness.engine.running_request_ids:
                break
            await asyncio.sleep(0.01)
        assert harness.engine.running_request_ids == frozenset()
        assert harness.engine.aborted_request_ids == ["to-cancel"]
        assert harness.worker.in_flight == 0
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_deadline_aborts_the_engine_request() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(
                harness.stub.Generate(chat_request(max_tokens=200, request_id="slow"), timeout=0.3)
            )
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):
            if "slow" in harness.engine.aborted_request_ids:
                break
            await asyncio.sleep(0.01)
        assert harness.engine.aborted_request_ids == ["slow"]
        assert harness.engine.running_request_ids == frozenset()
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_more_than_max_concurrency_is_resource_exhausted() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=20, max_concurrency=2)
    try:
        calls = [
            harness.stub.Generate(chat_request(max_tokens=100, request_id=f"c{i}"))
            for i in range(2)
        ]
        for call in calls:  # both are running once each has produced a token
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await collect(harness.stub.Generate(chat_request(max_tokens=1, request_id="c3")))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrency" in (raised.value.details() or "")
        for call in calls:
            call.cancel()
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_open_calls_are_counted_per_dispatch_tag() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=20, max_concurrency=8)
    worker = harness.worker
    try:
        tagged = [
            harness.stub.Generate(
                chat_request(max_tokens=100, request_id=f"t{i}"),
                metadata=((DISPATCH_METADATA, "session-a"),),
            )
            for i in range(2)
        ]
        other = harness.stub.Generate(
            chat_request(max_tokens=100, request_id="o"),
            metadata=((DISPATCH_METADATA, "session-b"),),
        )
        untagged = harness.stub.Generate(chat_request(max_tokens=100, request_id="u"))
        for call in (*tagged, other, untagged):
            await call.read()
        assert worker.in_flight == 4
        assert worker.in_flight_tagged("session-a") == 2
        assert worker.in_flight_tagged("session-b") == 1
        assert worker.in_flight_tagged("session-c") == 0
        tagged[0].cancel()
        other.cancel()
        async with asyncio.timeout(5):
            while worker.in_flight > 2:  # noqa: ASYNC110 (the server's tasks finish the calls)
                await asyncio.sleep(0.01)
        assert worker.in_flight_tagged("session-a") == 1
        assert worker.in_flight_tagged("session-b") == 0
        tagged[1].cancel()
        untagged.cancel()
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_a_dead_engine_ends_the_stream_with_unavailable() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        call = harness.stub.Generate(chat_request(max_tokens=100, request_id="dies"))
        first = await call.read()
        assert first.HasField("delta")
        harness.engine.kill()
        responses = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
            await call  # the status, which must not be OK
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        errors = [r.error for r in responses if r.HasField("error")]
        assert errors and errors[0].code == common_pb2.ERROR_CODE_UNAVAILABLE
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_an_engine_failing_mid_stream_signs_a_receipt_for_what_was_streamed() -> None:
    """The output before the failure is paid for: the error carries the node's receipt."""
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        call = harness.stub.Generate(chat_request(max_tokens=100, request_id="dies-late"))
        responses = [await call.read(), await call.read()]
        harness.engine.kill()
        with pytest.raises(grpc.aio.AioRpcError):
            while (response := await call.read()) is not grpc.aio.EOF:
                responses.append(response)
        streamed = sum(len(r.delta.token_ids) for r in responses if r.HasField("delta"))
        failed = [r for r in responses if r.HasField("error")]
        assert streamed >= 2 and len(failed) == 1
        signed = failed[0].error_receipt
        assert verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature)
        receipt = market_pb2.UsageReceipt.FromString(signed.receipt)
        assert receipt.request_id == "dies-late"
        assert receipt.node_id == harness.identity.node_id
        assert receipt.output_tokens == streamed and receipt.input_tokens > 0
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_health_and_reflection_are_served(harness: WorkerHarness) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(harness.channel)
    answer = await stub.Check(health_pb2.HealthCheckRequest(service="mercato.v1.NodeWorkerService"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(harness.channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in reflection.ServerReflectionInfo(one_request()):
        names = {s.name for s in response.list_services_response.service}
        assert "mercato.v1.NodeWorkerService" in names
        break


async def _until(predicate, timeout_s: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 (state owned by grpc tasks)
            await asyncio.sleep(0.01)


async def test_cancelled_call_hands_over_a_signed_late_receipt() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        request = chat_request(max_tokens=200, request_id="cut-1:1")
        request.segment_index = 1
        request.lease_id = "lease-3"
        call = harness.stub.Generate(request)
        received = 0
        async for response in call:
            assert response.HasField("delta")
            received += len(response.delta.token_ids)
            if received >= 3:
                break
        call.cancel()
        await _until(lambda: harness.late_receipts)
        [signed] = harness.late_receipts
        assert signed.node_public_key == harness.identity.public_key
        assert verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature)
        usage = market_pb2.UsageReceipt.FromString(signed.receipt)
        assert (usage.request_id, usage.node_id, usage.model) == (
            "cut-1:1",
            harness.identity.node_id,
            MODEL,
        )
        assert (usage.segment_index, usage.lease_id) == (1, "lease-3")
        assert usage.input_tokens == len(harness.engine.render_chat([("user", "hello")]))
        assert received <= usage.output_tokens < 200  # what it wrote, in flight included
        assert (usage.price_input_micro_usd_per_mtok, usage.price_output_micro_usd_per_mtok) == (
            PRICE_INPUT,
            PRICE_OUTPUT,
        )
        assert usage.started_at_unix_ms <= usage.finished_at_unix_ms
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_deadline_cut_call_hands_over_a_late_receipt() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=50)
    try:
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for response in harness.stub.Generate(
                chat_request(max_tokens=200, request_id="slow"), timeout=0.4
            ):
                received += len(response.delta.token_ids)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: harness.late_receipts)
        [signed] = harness.late_receipts
        usage = market_pb2.UsageReceipt.FromString(signed.receipt)
        assert usage.request_id == "slow" and 0 < received <= usage.output_tokens < 200
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_no_late_receipt_for_a_call_cut_before_any_output() -> None:
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=1)  # the first token after 1 s
    try:
        call = harness.stub.Generate(chat_request(max_tokens=5, request_id="early"))
        await asyncio.sleep(0.2)
        call.cancel()
        await _until(lambda: "early" in harness.engine.aborted_request_ids)
        await _until(lambda: harness.worker.in_flight == 0)
        assert harness.late_receipts == []  # nothing went out: nothing to bill
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_no_late_receipt_for_a_finished_call(harness: WorkerHarness) -> None:
    _, final = await collect(harness.stub.Generate(chat_request(max_tokens=3)))
    assert final is not None and final.receipt.receipt  # the receipt went in the final
    await _until(lambda: harness.worker.in_flight == 0)
    assert harness.late_receipts == []


class _DirectContext:
    """What Generate uses of a ServicerContext, for driving the handler without gRPC."""

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"aborted {code}: {details}")


async def test_late_receipt_counts_exactly_the_tokens_written() -> None:
    """A handler closed mid-stream signs a late receipt whose output count is exactly the
    tokens it yielded (no in-flight slack when driven directly) and whose input count is
    the prompt's."""
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=0)
    try:
        stream = harness.worker.Generate(
            chat_request(max_tokens=50, request_id="exact"), _DirectContext()
        )
        written = 0
        async for response in stream:
            written += len(response.delta.token_ids)
            if written >= 4:
                break
        await stream.aclose()  # the inner generator is closed as grpc's would be: by the loop
        del stream
        await _until(lambda: harness.late_receipts)
        [signed] = harness.late_receipts
        usage = market_pb2.UsageReceipt.FromString(signed.receipt)
        assert usage.output_tokens == written
        assert usage.input_tokens == len(harness.engine.render_chat([("user", "hello")]))
        assert verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature)
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_cut_while_writing_the_final_hands_over_its_receipt() -> None:
    """A call cut off at the final (the coordinator may not have it) hands the final's
    receipt to the late-receipt sink, so that work is still billed."""
    from .conftest import start_harness

    harness, server = await start_harness(tokens_per_s=0)
    try:
        stream = harness.worker.Generate(
            chat_request(max_tokens=3, request_id="at-final"), _DirectContext()
        )
        final = None
        async for response in stream:
            if response.HasField("final"):
                final = response.final
                break
        await stream.aclose()
        del stream
        await _until(lambda: harness.late_receipts)
        assert final is not None
        assert harness.late_receipts == [final.receipt]
    finally:
        await harness.channel.close()
        await server.stop(0)


async def test_resumed_token_ids_are_appended_to_the_prompt_and_are_not_output(
    harness: WorkerHarness,
) -> None:
    """Resume: the engine sees the prompt followed by resume_token_ids (the fake engine's
    output depends on the whole prompt), and they count as input, never as output."""
    sampling = common_pb2.SamplingParams(max_tokens=6)
    resumed = node_pb2.WorkerGenerateRequest(
        request_id="resumed", model=MODEL, prompt="abc", sampling=sampling
    )
    resumed.resume_token_ids.extend(b"de")
    whole = node_pb2.WorkerGenerateRequest(
        request_id="whole", model=MODEL, prompt="abcde", sampling=sampling
    )
    deltas_resumed, final_resumed = await collect(harness.stub.Generate(resumed))
    deltas_whole, final_whole = await collect(harness.stub.Generate(whole))
    assert final_resumed is not None and final_whole is not None
    assert [t for d in deltas_resumed for t in d.token_ids] == [
        t for d in deltas_whole for t in d.token_ids
    ]
    assert (final_resumed.input_tokens, final_resumed.output_tokens) == (5, 6)
    usage = market_pb2.UsageReceipt.FromString(final_resumed.receipt.receipt)
    assert (usage.input_tokens, usage.output_tokens) == (5, 6)
