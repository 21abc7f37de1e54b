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


# A number list to continue (raw text, about 400 tokens): the CPU engine counted on to
# max_tokens, greedy and sampled (600 of 600 tokens), and so did an H100 until the
# cancel. A chat prompt does not hold: "one sentence" stops after about 20 tokens, and a
# sampled "count from 1 to 2000" ran to 700 tokens here but stopped after 20 on the H100
# (bf16 sampled another path).
COUNTING = ", ".join(str(i) for i in range(1, 101)) + ", "


def test_cancelling_mid_stream_frees_the_engine(stub, node: Service) -> None:
    """A client cancelling mid-stream aborts the node's generation: the node reports its
    engine idle well before the answer could have run to its end by itself.

    The time the answer would need is measured from the stream's own pace, so the check
    holds on a slow CPU engine (1,500 tokens take over a minute); on an H100 the whole
    answer takes under 4 s, too short to tell apart from a heartbeat's delay, and the test
    says so rather than pass (the earlier 20-token answer passed there and here whether
    the engine aborted or not)."""
    node_id = node.ready["node_id"]
    max_tokens = 1500
    request = inference_pb2.GenerateRequest(
        model=MODEL,
        prompt=COUNTING,
        sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    call = stub.Generate(request, timeout=300)
    received, first_at = 0, 0.0
    for response in call:
        if response.HasField("delta"):
            received += len(response.delta.token_ids)
            first_at = first_at or time.monotonic()
            if received >= 30:
                break
    assert received >= 30, "the answer ended early: the prompt no longer keeps the engine busy"
    per_token_s = (time.monotonic() - first_at) / received
    # The node reports the engine busy with our request while it streams...
    deadline = time.monotonic() + 15
    seen_busy = False
    while time.monotonic() < deadline and not seen_busy:
        seen_busy = _running_on(stub, node_id) > 0
        time.sleep(0.1)
    call.cancel()
    cancelled_at = time.monotonic()
    assert seen_busy, "the node never reported the running request"
    # ...and idle soon after the client cancels (heartbeats carry the engine's load),
    # well before the generation would have ended by itself.
    left_s = first_at + max_tokens * per_token_s - cancelled_at
    if left_s < 3:
        # Seeing the node idle takes up to a heartbeat (1 s) after the abort. An engine
        # this fast (an H100: 1,500 tokens in under 4 s) ends the answer by itself in
        # about that time, so no wait could tell an abort from the end of the answer.
        # On the CPU engine CI runs, about a minute is left at this point.
        pytest.skip(f"inconclusive: this engine ends the answer {left_s:.1f} s after the cancel")
    limit_s = min(30.0, 0.8 * left_s)
    while _running_on(stub, node_id) > 0:
        waited = time.monotonic() - cancelled_at
        assert waited < limit_s, (
            f"the engine request was not aborted: still running {waited:.1f} s after the "
            f"cancel (the whole answer would take {left_s:.1f} s more)"
        )
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
