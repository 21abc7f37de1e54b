"""A benchmark-only relay with no logic: the transport floor of ``mercato bench overhead``.

It serves ``InferenceService.Generate`` and does only what any relay written on
grpc-python must do: read the client's request, send it to one fixed node as a message
on a ``Session`` stream (:class:`coordinator.worker_session.WorkerLink`, the coordinator's
own link), and forward the node's deltas as they come. It checks nothing, routes
nothing, bills nothing, counts nothing, never fails over; it is not a product path and
never runs outside the benchmark.

``mercato bench overhead`` times it beside the direct path and the real coordinator:
``floor - direct`` is what the two extra gRPC message hops cost on this machine, and
``routed - floor`` is what the coordinator's own work (validation, routing, bookkeeping,
the relay's checks) adds on top.

Run as ``python -m coordinator.benchmarks.passthrough --node HOST:PORT``; it prints
``MERCATO_PASSTHROUGH_READY {"address": ...}`` once it listens, and stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from mercato.v1 import inference_pb2, node_pb2

from coordinator.worker_session import WorkerLink
from marketplace.placement import parse_cpus, pin

READY_PREFIX = "MERCATO_PASSTHROUGH_READY"
_DELTA_TAG = 0x0A  # field 1: TextDelta, in both WorkerGenerateResponse and GenerateResponse


class _Passthrough:
    def __init__(self, link: WorkerLink) -> None:
        self._link = link
        self._ids = itertools.count(1)

    async def generate(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        parsed = inference_pb2.GenerateRequest.FromString(request)
        worker = node_pb2.WorkerGenerateRequest(
            request_id=f"passthrough-{next(self._ids)}",
            model=parsed.model,
            chat=parsed.chat,
            sampling=parsed.sampling,
        )
        stream = await self._link.open(worker, None)
        while True:
            message = await stream.read()
            if message is grpc.aio.EOF or message[0] != _DELTA_TAG:
                return  # the final (or an error): the benchmark reads deltas only
            yield message


async def _serve(node_address: str) -> None:
    channel = grpc.aio.insecure_channel(node_address)
    relay = _Passthrough(WorkerLink(channel, ()))
    server = grpc.aio.server(options=(("grpc.so_reuseport", 0),))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "mercato.v1.InferenceService",
                {
                    "Generate": grpc.unary_stream_rpc_method_handler(
                        relay.generate, request_deserializer=None, response_serializer=None
                    )
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    gc.collect()
    gc.freeze()  # as the coordinator does after its start
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    sys.stdout.write(f"{READY_PREFIX} {json.dumps({'address': f'127.0.0.1:{port}'})}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await server.stop(0)
        await channel.close()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="the node's worker address, HOST:PORT")
    parser.add_argument("--cpus", help="run on these CPUs only, as the coordinator's --cpus")
    args = parser.parse_args()
    if args.cpus:
        pin(parse_cpus(args.cpus))  # before gRPC starts its threads, as the coordinator
    uvloop.run(_serve(args.node))


if __name__ == "__main__":
    main()
