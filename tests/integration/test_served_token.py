"""A served token, end to end: client → coordinator → node (real vLLM) → client."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from mercato.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from marketplace.cli.processes import Service

from .conftest import MODEL, authorized_channel

pytestmark = pytest.mark.integration

MESSAGES = [("user", "Write one sentence about the sea.")]


def _request(**sampling: object) -> inference_pb2.GenerateRequest:
    params = {"max_tokens": 48, "temperature": 0.0, **sampling}
    return inference_pb2.GenerateRequest(
        model=MODEL,
        chat=common_pb2.ChatInput(
            messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in MESSAGES]
        ),
        sampling=common_pb2.SamplingParams(**params),
    )


def _collect(stub: inference_pb2_grpc.InferenceServiceStub, request, timeout_s: float = 120):
    text, token_ids, final = [], [], None
    for response in stub.Generate(request, timeout=timeout_s):
        kind = response.WhichOneof("chunk")
        if kind == "delta":
            text.append(response.delta.text)
            token_ids.extend(response.delta.token_ids)
        else:
            assert kind == "final", response
            final = response.final
    assert final is not None
    return "".join(text), token_ids, final


@pytest.fixture(scope="module")
def stub(coordinator_address: str, node: Service):
    with authorized_channel(coordinator_address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
async def direct_output(vllm_engine) -> tuple[str, list[int]]:
    """The same request run by the engine in this process, without any network."""
    from node.engine import GenerationRequest

    text, token_ids = [], []
    request = GenerationRequest("direct", messages=MESSAGES, max_tokens=48, temperature=0.0)
    async for delta in vllm_engine.generate(request):
        text.append(delta.text)
        token_ids.extend(delta.token_ids)
    return "".join(text), token_ids


def test_greedy_text_through_coordinator_equals_engine(stub, direct_output) -> None:
    text, token_ids, final = _collect(stub, _request())
    assert (text, token_ids) == direct_output
    assert final.finish_reason in (
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    )


def test_token_counts_equal_the_tokenizers(stub, prepared_model: Path, node: Service) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(prepared_model), local_files_only=True)
    text, token_ids, final = _collect(stub, _request(max_tokens=40))
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in MESSAGES],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    assert final.input_tokens == len(prompt_ids)
    assert final.output_tokens == len(token_ids)
    assert tokenizer.decode(token_ids, skip_special_tokens=True) == text
    assert final.node_id == node.ready["node_id"]
    assert [s.node_id for s in final.segments] == [node.ready["node_id"]]
    assert final.request_id


def _running_on(stub, node_id: str) -> int:
    listed = stub.ListNodes(inference_pb2.ListNodesRequest(), timeout=5)
    [info] = [n for n in listed.nodes if n.node_id == node_id]
    return info.load.running_requests + info.load.waiting_requests


def test_cancelling_mid_stream_frees_the_engine(stub, node: Service) -> None:
    node_id = node.ready["node_id"]
    call = stub.Generate(_request(max_tokens=1500, temperature=0.8, seed=7), timeout=120)
    received = 0
    for response in call:
        received += response.HasField("delta")
        if received == 5:
            break
    # The node reports the engine busy with our request while it streams...
    deadline = time.monotonic() + 15
    seen_busy = False
    while time.monotonic() < deadline and not seen_busy:
        seen_busy = _running_on(stub, node_id) > 0
        time.sleep(0.1)
    call.cancel()
    assert seen_busy, "the node never reported the running request"
    # ...and idle soon after the client cancels (heartbeats carry the engine's load).
    deadline = time.monotonic() + 30
    while _running_on(stub, node_id) > 0:
        assert time.monotonic() < deadline, "the engine request was not aborted"
        time.sleep(0.2)
    # The node still serves.
    _, token_ids, _ = _collect(stub, _request(max_tokens=4))
    assert token_ids


@pytest.mark.parametrize(
    ("change", "code", "needle"),
    [
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "no-such-model"),
        ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"max_tokens": -3}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        ({"temperature": -0.5}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ({"messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        ({"prompt": "word " * 200_000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        # Under the coordinator's character limit but longer than the model's context:
        # the node refuses it, and the coordinator must not retry it elsewhere.
        ({"prompt": "word " * 5_000}, grpc.StatusCode.INVALID_ARGUMENT, "context"),
    ],
)
def test_bad_input_gets_a_clear_status(stub, change, code, needle) -> None:
    request = _request()
    if "model" in change:
        request.model = change["model"]
    if "max_tokens" in change:
        request.sampling.max_tokens = change["max_tokens"]
    if "temperature" in change:
        request.sampling.temperature = change["temperature"]
    if "messages" in change:
        del request.chat.messages[:]
    if "prompt" in change:
        request.prompt = change["prompt"]
    with pytest.raises(grpc.RpcError) as caught:
        _collect(stub, request)
    assert caught.value.code() == code
    assert needle in caught.value.details()
