"""The node daemon: identity, hardware, model, engine, worker server, agent — then wait.

Start-up order, each step failing loudly with a message a provider can act on::

    identity (0600 key file) → hardware probe → model folder (converted once)
    → engine start (handshake with a timeout) → worker gRPC server (+ health, reflection)
    → agent (register + heartbeat) → ``MERCATO_NODE_READY {json}`` on stdout

SIGINT / SIGTERM (:func:`_drain`): the next heartbeat tells the coordinator the node is
draining, so it routes nothing new here (new requests are refused UNAVAILABLE anyway);
open generations get the shutdown grace; the rest are cut off, and their late receipts
go out on the heartbeat stream before the agent stops, so the provider is paid for all
the output that went out. Then the engine is shut down inside the loop. If the engine
dies, the node reports it (health NOT_SERVING, an error in the log) and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable
from typing import TypeVar

import grpc.aio
from grpc_health.v1 import health
from mercato.v1 import market_pb2, node_pb2

from marketplace.aio import wait_then_cancel
from marketplace.identity import Identity
from node.agent import NodeAgent
from node.engine.base import Engine
from node.engine.registry import build_engine, needs_model_files
from node.errors import EngineDeadError
from node.hardware import HardwareInfo, probe
from node.offer import build_offer, sign_offer
from node.receipts import ReceiptOutbox
from node.settings import NodeSettings
from node.worker import NodeWorker
from node.worker_server import ensure_port_free, set_not_serving, start_worker_server

logger = logging.getLogger(__name__)

READY_PREFIX = "MERCATO_NODE_READY"
_ENGINE_WATCH_INTERVAL_S = 1.0
# After the grace: how long cut-off generations get to hand over their late receipts,
# and the coordinator to acknowledge them.
_CUT_OFF_WAIT_S = 5.0
_LATE_RECEIPT_DELIVERY_WAIT_S = 5.0
T = TypeVar("T")


def node_load(engine: Engine, worker: NodeWorker) -> node_pb2.NodeLoad:
    """The load a heartbeat reports: the engine's view, never below the worker's count."""
    load = engine.load()
    running = max(load.running_requests, worker.in_flight - load.waiting_requests)
    return node_pb2.NodeLoad(
        running_requests=max(running, 0),
        waiting_requests=load.waiting_requests,
        kv_cache_usage_permille=min(max(round(load.kv_cache_usage * 1000), 0), 1000),
        output_tokens_per_s=max(round(load.output_tokens_per_s), 0),
    )


async def run_node(settings: NodeSettings) -> None:
    """Run a provider node until SIGINT/SIGTERM (or until its engine dies)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await _run(settings, stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


async def _run(settings: NodeSettings, stop: asyncio.Event) -> None:
    identity = Identity.load_or_create(settings.identity_path)
    visible = probe()
    hardware = visible.serving()  # what the offer sells
    logger.info(
        "node %s: %d CPU cores, %d GPU(s) visible, %d offered (the engine runs on one)",
        identity.node_id,
        visible.cpu_cores,
        len(visible.gpus),
        len(hardware.gpus),
    )
    ensure_port_free(settings.listen_host, settings.port)  # before minutes of loading
    model_path = None
    if needs_model_files(settings.engine):
        from node.model_store import ensure_model

        done, model_path = await _unless_stopped(
            asyncio.to_thread(
                ensure_model, settings.models_dir, settings.model, show_progress=True
            ),
            stop,
        )
        if not done:
            return
    engine = build_engine(settings, model_path)
    started = time.monotonic()
    try:
        done, _ = await _unless_stopped(engine.start(settings.engine_start_timeout_s), stop)
        if not done:
            return
        logger.info("engine ready in %.1f s", time.monotonic() - started)
        await _serve(settings, identity, hardware, engine, stop)
    finally:
        await engine.shutdown()


async def _serve(
    settings: NodeSettings,
    identity: Identity,
    hardware: HardwareInfo,
    engine: Engine,
    stop: asyncio.Event,
) -> None:
    # Receipts of calls cut off before their final: from the worker to the agent.
    late_receipts = ReceiptOutbox()
    worker = NodeWorker(
        engine,
        identity,
        price_input_micro_usd_per_mtok=settings.price_input_micro_usd_per_mtok,
        price_output_micro_usd_per_mtok=settings.price_output_micro_usd_per_mtok,
        max_concurrency=settings.max_concurrency,
        on_late_receipt=late_receipts.put,
    )
    server, port, health_servicer = await start_worker_server(
        worker, settings.listen_host, settings.port
    )
    worker_address = settings.worker_address(port)

    def signed_offer(sequence: int) -> market_pb2.SignedOffer:
        offer = build_offer(
            settings,
            public_key=identity.public_key,
            worker_address=worker_address,
            hardware=hardware,
            context_length=engine.context_length,
            sequence=sequence,
        )
        return sign_offer(identity, offer)

    agent = NodeAgent(
        settings.coordinator_address,
        signed_offer,
        lambda: node_load(engine, worker),
        backoff_initial_s=settings.register_backoff_initial_ms / 1000,
        backoff_max_s=settings.register_backoff_max_ms / 1000,
        late_receipts=late_receipts,
        count_dispatched=worker.in_flight_tagged,
    )
    agent.start()
    engine_died = False
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settings.ready_wait_for_registration_ms / 1000):
                await agent.registered.wait()
        ready = {
            "node_id": identity.node_id,
            "worker_address": worker_address,
            "model": engine.model_name,
            "region": settings.region,
            "engine": settings.engine.value,
            "registered": agent.registered.is_set(),
        }
        sys.stdout.write(f"{READY_PREFIX} {json.dumps(ready, sort_keys=True)}\n")
        sys.stdout.flush()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_ENGINE_WATCH_INTERVAL_S):
                    await stop.wait()
            if not engine.healthy and not stop.is_set():
                engine_died = True
                logger.error("the engine died; the node stops serving (restart it)")
                break
    finally:
        await _drain(settings, agent, worker, server, health_servicer)
        late_receipts.close("the node stopped; the coordinator connection is gone")
    if engine_died:
        raise EngineDeadError("the engine died; restart the node")


async def _drain(
    settings: NodeSettings,
    agent: NodeAgent,
    worker: NodeWorker,
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
) -> None:
    """Stop so that no work goes unpaid: the coordinator is told first (it routes
    nothing new here), open generations get the shutdown grace, the rest are cut off
    and their late receipts go out on the heartbeat stream, which ends last."""
    agent.drain()
    worker.drain()
    if not await worker.wait_idle(settings.shutdown_grace_s):
        logger.warning(
            "shutdown grace of %.1f s is over: cutting off %d generation(s)",
            settings.shutdown_grace_s,
            worker.in_flight,
        )
    await set_not_serving(health_servicer)
    await server.stop(0)
    await worker.wait_idle(_CUT_OFF_WAIT_S)
    if not await agent.wait_delivered(_LATE_RECEIPT_DELIVERY_WAIT_S):
        logger.warning(
            "late receipts not acknowledged by the coordinator within %.0f s",
            _LATE_RECEIPT_DELIVERY_WAIT_S,
        )
    await agent.stop()


async def _unless_stopped(work: Awaitable[T], stop: asyncio.Event) -> tuple[bool, T | None]:
    """Await ``work`` unless ``stop`` is set first: (True, result), or (False, None)."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopper), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return True, task.result()
    await wait_then_cancel(task)
    return False, None
