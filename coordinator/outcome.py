"""What one Generate produced: the deltas delivered and, per node, the segment it served.

The relay fills a :class:`RelayOutcome` as it streams (see :mod:`coordinator.relay`);
the API builds the client's GenerateFinal from it with :meth:`RelayOutcome.final`, and
billing reads :attr:`RelayOutcome.segments` (prices, token counts, each node's receipt).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError
from mercato.v1 import common_pb2, inference_pb2, market_pb2


def worker_request_id(request_id: str, segment_index: int) -> str:
    """The node request id of a segment: the client's request id for the first segment,
    ``<request id>:<segment index>`` for a resumed one."""
    return request_id if segment_index == 0 else f"{request_id}:{segment_index}"


def client_request_id(worker_request_id: str, segment_index: int) -> str:
    """The client's request id of a node request id (the inverse of ``worker_request_id``)."""
    suffix = f":{segment_index}"
    if segment_index and worker_request_id.endswith(suffix):
        return worker_request_id[: -len(suffix)]
    return worker_request_id


class DeliveredOutput:
    """Every delta relayed to the client, as GenerateResponse wire bytes, in order."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def __len__(self) -> int:
        return len(self.messages)

    def merged(self, start: int = 0, stop: int | None = None) -> common_pb2.TextDelta:
        """One TextDelta holding the token ids of messages[start:stop] (text: the last
        one's). Raises DecodeError if a forwarded delta was malformed."""
        joined = b"".join(self.messages[start:stop])
        return inference_pb2.GenerateResponse.FromString(joined).delta

    def token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Output token ids delivered so far (what a resumed attempt continues from)."""
        return list(self.merged(start, stop).token_ids)

    def text_chars(self) -> int:
        """Characters (code points) of text delivered so far; parses every message, so
        for resumes only. Raises DecodeError if a forwarded delta was malformed."""
        parse = inference_pb2.GenerateResponse.FromString
        return sum(len(parse(message).delta.text) for message in self.messages)


@dataclass(slots=True)
class SegmentOutcome:
    """One node's part of the output: who served it, at what price, and what it made."""

    node_id: str
    region: str
    # The WorkerGenerateRequest.request_id of this attempt ("<request id>:<segment index>").
    worker_request_id: str
    # 0 for the first node; +1 for each resume.
    segment_index: int
    price_input_micro_usd_per_mtok: int
    price_output_micro_usd_per_mtok: int
    # Output tokens of earlier segments sent to this node as resume_token_ids.
    resumed_tokens: int
    # Index in DeliveredOutput.messages of this segment's first delta.
    first_message: int
    # Prompt tokens the node processed, resumed ones included: the node's WorkerFinal
    # count; for a node that died before its final, derived from a later segment's
    # count (its prompt part is the same for every segment); 0 if nothing tells.
    input_tokens: int = 0
    # Output tokens relayed from this node, counted by the coordinator from the token
    # ids it forwarded (never the node's claim).
    output_tokens: int = 0
    # The node's FinishReason; UNSPECIFIED while streaming or when the node died.
    finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
    # The node's signed receipt from its WorkerFinal, or from the error it ended with
    # after streaming output (its engine failed); None when it sent neither (it died,
    # or the stream was cut off: then a live node sends its receipt late, on its
    # heartbeat stream, and billing matches it by worker_request_id).
    receipt: market_pb2.SignedReceipt | None = None
    # True once the node's final arrived (the segment ended normally).
    completed: bool = False
    # Whether input_tokens was derived from a later segment instead of reported.
    input_tokens_derived: bool = False

    def served_segment(self) -> inference_pb2.ServedSegment:
        return inference_pb2.ServedSegment(
            node_id=self.node_id,
            region=self.region,
            price_input_micro_usd_per_mtok=self.price_input_micro_usd_per_mtok,
            price_output_micro_usd_per_mtok=self.price_output_micro_usd_per_mtok,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
        )


class RelayOutcome:
    """Filled by :meth:`coordinator.relay.Relay.stream`; read after it ends (or fails)."""

    __slots__ = ("delivered", "finish_reason", "request_id", "segments")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.delivered = DeliveredOutput()
        # One per node that served part of the output, in order.
        self.segments: list[SegmentOutcome] = []
        # Why the generation stopped (set when the last segment's final arrived).
        self.finish_reason: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED

    @property
    def complete(self) -> bool:
        """Whether a node finished the request (its final arrived)."""
        return bool(self.segments) and self.segments[-1].completed

    @property
    def input_tokens(self) -> int:
        """Prompt tokens: the first segment's count (0 before any segment)."""
        return self.segments[0].input_tokens if self.segments else 0

    @property
    def output_tokens(self) -> int:
        """Output tokens relayed to the client over every segment."""
        return sum(segment.output_tokens for segment in self.segments)

    def token_ids(self) -> list[int]:
        """Every output token id relayed so far, in order."""
        return self.delivered.token_ids()

    def count_segment(self, segment: SegmentOutcome) -> None:
        """Set ``segment.output_tokens`` from the deltas relayed since it started.
        Raises DecodeError if one was malformed."""
        stop = self._segment_stop(segment)
        segment.output_tokens = len(self.delivered.merged(segment.first_message, stop).token_ids)

    def count_unreadable_as_zero(self, segment: SegmentOutcome) -> None:
        """``count_segment``, for a segment that ended without its final: 0 if a delta
        was malformed (nothing is billed on output that cannot be counted)."""
        try:
            self.count_segment(segment)
        except DecodeError:
            segment.output_tokens = 0

    def count_unfinished(self) -> None:
        """Count the output relayed by every segment without a final. The relay counts a
        segment at its final or when its node fails; one cut off by a client cancel or
        deadline is counted here, so billing sees what was relayed."""
        for segment in self.segments:
            if not segment.completed:
                self.count_unreadable_as_zero(segment)

    def derive_input_tokens(self) -> None:
        """Fill in input_tokens of segments whose node died before its final, from a
        segment that reported it: prompt = reported - resumed tokens. (A node that failed
        with a receipt reported its own.)"""
        reported = next((s for s in self.segments if s.completed and s.input_tokens), None)
        if reported is None:
            return
        prompt_tokens = max(0, reported.input_tokens - reported.resumed_tokens)
        for segment in self.segments:
            if not segment.completed and segment.receipt is None:
                segment.input_tokens = prompt_tokens + segment.resumed_tokens
                segment.input_tokens_derived = True

    def final(self) -> inference_pb2.GenerateFinal:
        """The client's GenerateFinal, without cost_micro_usd and receipts (billing's)."""
        last = self.segments[-1] if self.segments else None
        return inference_pb2.GenerateFinal(
            request_id=self.request_id,
            finish_reason=self.finish_reason,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            node_id=last.node_id if last else "",
            region=last.region if last else "",
            segments=[segment.served_segment() for segment in self.segments],
        )

    def _segment_stop(self, segment: SegmentOutcome) -> int | None:
        index = self.segments.index(segment) if segment in self.segments else -1
        if 0 <= index < len(self.segments) - 1:
            return self.segments[index + 1].first_message
        return None
