"""The worker over the REAL vLLM engine (loaded once per session), through real gRPC.

Models dir: $MERCATO_TEST_MODELS_DIR or <repo>/.cache/models (prepared once, reused).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import grpc.aio
import pytest
from mercato.v1 import common_pb2, market_pb2, node_pb2, node_pb2_grpc

from marketplace.identity import Identity, verify
from node.engine import Engine, FinishReason, GenerationRequest
from node.engine.vllm_engine import _unfinished_requests
from node.errors import RequestInvalid
from node.receipts import RECEIPT_DOMAIN
from node.worker import NodeWorker
from node.worker_server import start_worker_server

pytestmark = [
    pytest.mark.integration,
    # Raised by torch and transformers while vLLM loads; not ours to fix.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*"),
    pytest.mark.filterwarnings("ignore::FutureWarning:torch.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:transformers.*"),
]

REPO = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France? Answer in one sentence."


def _models_dir() -> Path:
    return Path(os.environ.get("MERCATO_TEST_MODELS_DIR", REPO / ".cache" / "models"))


class Served:
    def __init__(self, engine: Engine, identity: Identity, stub: Any, worker: NodeWorker) -> None:
        self.engine, self.identity, self.stub, self.worker = engine, identity, stub, worker


@pytest.fixture(scope="session")
async def served(vllm_engine: Engine) -> AsyncIterator[Served]:
    identity = Identity.generate()
    worker = NodeWorker(
        vllm_engine,
        identity,
        price_input_micro_usd_per_mtok=1,
        price_output_micro_usd_per_mtok=2,
        max_concurrency=64,
    )
    server, port, _ = await start_worker_server(worker, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield Served(vllm_engine, identity, node_pb2_grpc.NodeWorkerServiceStub(channel), worker)
    await channel.close()
    await server.stop(0)


def _chat(content: str, max_tokens: int, request_id: str = "it-1", **sampling: Any):  # type: ignore[no-untyped-def]
    return node_pb2.WorkerGenerateRequest(
        request_id=request_id,
        model=MODEL,
        chat=common_pb2.ChatInput(messages=[common_pb2.ChatMessage(role="user", content=content)]),
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, **sampling),
    )


async def _collect(call: Any) -> tuple[str, list[int], node_pb2.WorkerFinal]:
    text, ids, final = "", [], None
    async for response in call:
        if response.HasField("delta"):
            text += response.delta.text
            ids.extend(response.delta.token_ids)
        elif response.HasField("final"):
            final = response.final
    assert final is not None
    return text, ids, final


async def _direct(engine: Engine, request: GenerationRequest) -> tuple[str, list[int], Any]:
    text, ids, reason = "", [], None
    async for delta in engine.generate(request):
        text += delta.text
        ids.extend(delta.token_ids)
        reason = delta.finish_reason or reason
    return text, ids, reason


async def test_greedy_stream_equals_the_engine_driven_directly(served: Served) -> None:
    text, ids, final = await _collect(served.stub.Generate(_chat(QUESTION, 40)))
    direct_text, direct_ids, direct_reason = await _direct(
        served.engine,
        GenerationRequest("direct-1", messages=[("user", QUESTION)], max_tokens=40, temperature=0),
    )
    assert ids == direct_ids
    assert text == direct_text
    assert "Paris" in text
    expected = {FinishReason.STOP: 1, FinishReason.LENGTH: 2}[direct_reason]
    assert final.finish_reason == expected


async def test_token_counts_equal_the_tokenizers(served: Served) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_models_dir() / MODEL), local_files_only=True)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    text, ids, final = await _collect(served.stub.Generate(_chat(QUESTION, 24, "it-count")))
    assert final.input_tokens == len(prompt_ids)
    assert final.output_tokens == len(ids) > 0
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    receipt = market_pb2.UsageReceipt.FromString(final.receipt.receipt)
    assert (receipt.input_tokens, receipt.output_tokens) == (len(prompt_ids), len(ids))


async def test_receipt_signature_verifies(served: Served) -> None:
    _, _, final = await _collect(served.stub.Generate(_chat("Say hi.", 8, "it-receipt")))
    signed = final.receipt
    assert signed.node_public_key == served.identity.public_key
    assert verify(signed.node_public_key, RECEIPT_DOMAIN, signed.receipt, signed.node_signature)
    receipt = market_pb2.UsageReceipt.FromString(signed.receipt)
    assert receipt.node_id == served.identity.node_id
    assert receipt.request_id == "it-receipt" and receipt.model == MODEL
    forged = market_pb2.UsageReceipt.FromString(signed.receipt)
    forged.output_tokens = 1
    assert not verify(
        signed.node_public_key, RECEIPT_DOMAIN, forged.SerializeToString(), signed.node_signature
    )


async def test_cancelling_mid_stream_leaves_nothing_running(served: Served) -> None:
    call = served.stub.Generate(_chat("Write a long story about a dragon.", 400, "it-cancel"))
    deltas = 0
    while (response := await call.read()) is not grpc.aio.EOF:
        if response.HasField("delta"):
            deltas += 1
            if deltas == 3:
                break
    assert served.engine.load().running_requests == 1
    call.cancel()
    async with asyncio.timeout(20):
        while served.engine.load().running_requests or served.worker.in_flight:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    assert served.engine.load().running_requests == 0
    llm = served.engine._llm  # type: ignore[attr-defined]
    assert _unfinished_requests(llm) == 0  # vLLM's own count, not only the node's


async def test_closing_the_direct_stream_aborts_in_the_engine(vllm_engine: Engine) -> None:
    request = GenerationRequest("it-close", prompt="Once upon a time", max_tokens=300)
    async with aclosing(vllm_engine.generate(request)) as stream:
        async for _ in stream:
            assert vllm_engine.load().running_requests == 1
            break
    assert vllm_engine.load().running_requests == 0


async def test_resume_continues_the_greedy_output(served: Served) -> None:
    _, ids, _ = await _collect(served.stub.Generate(_chat(QUESTION, 12, "it-whole")))
    assert len(ids) >= 8
    resumed = _chat(QUESTION, len(ids) - 4, "it-resume")
    resumed.resume_token_ids.extend(ids[:4])
    resumed.segment_index = 1
    _, rest, final = await _collect(served.stub.Generate(resumed))
    assert rest == ids[4:]
    _, _, whole_final = await _collect(served.stub.Generate(_chat(QUESTION, 1, "it-one")))
    assert final.input_tokens == whole_final.input_tokens + 4


async def test_stop_strings_end_the_output(served: Served) -> None:
    text, _, _ = await _collect(served.stub.Generate(_chat(QUESTION, 40, "it-free")))
    word = text.split()[2]
    stopped, _, final = await _collect(
        served.stub.Generate(_chat(QUESTION, 40, "it-stop", stop=[word]))
    )
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert word not in stopped
    assert text.startswith(stopped)


async def test_a_resume_gets_the_text_vllm_held_back_for_a_stop_string(served: Served) -> None:
    """vLLM streams a token's id at once but holds its text back while it could start a
    stop string (here 9 characters, for a 10-character stop). A node dying then leaves
    the client with token ids whose text it never got; the node resuming from them
    (told how many characters the client has, as the coordinator does) sends that text
    first, so the client's text is the resumed tokens' text in full."""
    stop = "zzzzzzzzzz"
    request = _chat(
        "Tell a short story about a lighthouse keeper.", 40, request_id="it-held", stop=[stop]
    )
    deltas = [r.delta async for r in served.stub.Generate(request) if r.HasField("delta")]
    cut = len(deltas) // 2
    ids = [i for delta in deltas[:cut] for i in delta.token_ids]
    delivered = "".join(delta.text for delta in deltas[:cut])
    whole = served.engine.decode(ids)
    assert len(delivered) < len(whole), "vLLM held no text back: nothing to test"
    assert whole.startswith(delivered)

    resumed = _chat(
        "Tell a short story about a lighthouse keeper.",
        40 - len(ids),
        request_id="it-held:1",
        stop=[stop],
    )
    resumed.resume_token_ids.extend(ids)
    resumed.resume_text_chars = len(delivered)
    resumed.segment_index = 1
    text, new_ids, final = await _collect(served.stub.Generate(resumed))
    assert (delivered + text).startswith(whole)
    assert final.output_tokens == len(new_ids) > 0


async def test_a_prompt_longer_than_the_context_is_refused(served: Served) -> None:
    long_prompt = "word " * 3000
    request = node_pb2.WorkerGenerateRequest(
        request_id="it-long",
        model=MODEL,
        prompt=long_prompt,
        sampling=common_pb2.SamplingParams(max_tokens=10),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _collect(served.stub.Generate(request))
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE  # this node's context
    assert "context length 2048" in (raised.value.details() or "")


async def test_parameters_the_engine_refuses_are_the_requests_fault(
    vllm_engine: Engine,
) -> None:
    # The node's checks stop temperatures above 2 first; the engine's own refusal of
    # anything they miss must still read as a bad request (INVALID_ARGUMENT: no failover,
    # no mark against the node), not as a failed node.
    request = GenerationRequest("it-refused", prompt="Hello", max_tokens=4, temperature=9.0)
    with pytest.raises(RequestInvalid, match=r"^sampling: the engine refused .*temperature"):
        await _direct(vllm_engine, request)
    assert _unfinished_requests(vllm_engine._llm) == 0  # type: ignore[attr-defined]


async def test_a_busy_engine_streams_fewer_larger_deltas(vllm_engine: Engine) -> None:
    async def run(request: GenerationRequest) -> list[list[int]]:
        async with aclosing(vllm_engine.generate(request)) as stream:
            return [list(delta.token_ids) async for delta in stream]

    def counted(request_id: str) -> GenerationRequest:
        # ignore_eos is not exposed: a prompt that keeps the model talking for 24 tokens
        return GenerationRequest(request_id, prompt="Once upon a time", max_tokens=24)

    if not vllm_engine._per_request_interval:  # type: ignore[attr-defined]
        pytest.skip("this vLLM has no per-request stream interval (0.24 lacks it)")
    alone = await run(counted("it-alone"))
    assert all(len(ids) == 1 for ids in alone)  # an idle engine streams every token
    background = [
        asyncio.create_task(run(GenerationRequest(f"it-bg-{i}", prompt="Tell me", max_tokens=48)))
        for i in range(16)
    ]
    async with asyncio.timeout(30):
        while vllm_engine.load().running_requests < 16:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    interval = vllm_engine.stream_interval.tokens_per_delta(16)  # type: ignore[attr-defined]
    assert interval > 1  # the default settings gather tokens at this load
    busy = await run(counted("it-busy"))  # starts with 16 running
    await asyncio.gather(*background)
    # (Batched greedy decoding may pick other tokens than the same prompt alone: float
    # sums differ with the batch, so only the shape of the stream is compared.)
    assert len(busy[0]) == 1  # the first token still comes at once
    assert max(len(ids) for ids in busy) == interval
    assert all(len(ids) == interval for ids in busy[1:-1])
    assert sum(len(ids) for ids in busy) == sum(len(ids) for ids in alone) == 24
