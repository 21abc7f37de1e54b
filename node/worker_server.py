"""The node's gRPC server: the worker service, health checking and reflection."""

from __future__ import annotations

import socket

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from mercato.v1 import node_pb2, node_pb2_grpc

from node.worker import NodeWorker

WORKER_SERVICE_NAME = node_pb2.DESCRIPTOR.services_by_name["NodeWorkerService"].full_name
_MESSAGE_BYTES_MAX = 16 * 1024 * 1024


def port_taken_error(host: str, port: int) -> OSError:
    return OSError(
        f"cannot listen on {_join(host, port)}; is the port in use? Choose another --port "
        "(0 picks a free one)"
    )


def ensure_port_free(host: str, port: int) -> None:
    """Fail now, not after minutes of loading a model, when ``port`` is already taken
    (another node running, say). The server binds for real later; this only asks the
    kernel once, with a socket closed at once."""
    if port == 0:
        return
    for family, kind, proto, _name, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(address)
            except OSError as exc:
                raise port_taken_error(host, port) from exc


async def start_worker_server(
    worker: NodeWorker, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start serving; returns the server, the port it got, and its health servicer.

    Health starts SERVING for the worker service and the server as a whole; the caller
    flips it to NOT_SERVING when the engine dies or the node shuts down.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", _MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", _MESSAGE_BYTES_MAX),
            ("grpc.so_reuseport", 0),
        ]
    )
    node_pb2_grpc.add_NodeWorkerServiceServicer_to_server(worker, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (WORKER_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        bound_port = server.add_insecure_port(_join(host, port))
    except RuntimeError:  # grpc's "Failed to bind"
        bound_port = 0
    if bound_port == 0:
        raise port_taken_error(host, port)
    await server.start()
    for service in ("", WORKER_SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return server, bound_port, health_servicer


async def set_not_serving(health_servicer: health.aio.HealthServicer) -> None:
    for service in ("", WORKER_SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)


def _join(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
