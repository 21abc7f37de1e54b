"""``AccountService``: a client's own balance, receipts, usage and leases over gRPC.

Every call authenticates with the API key in the ``authorization: Bearer <key>``
metadata (``Ledger.authenticate``: a revoked or unknown key is UNAUTHENTICATED, a key
over its rate limit RESOURCE_EXHAUSTED) and only ever reads or changes the account that
key belongs to: another account's lease or request is answered NOT_FOUND, exactly as if
it did not exist. Ledger errors become their ``grpc_status`` with the ledger's message,
which says what to do; errors of this service are drawn here::

    AccountServiceError        (its own code)
    └── LeasesNotOffered       UNIMPLEMENTED   this coordinator has no market prices

Register with ``add_account_service(server, ledger, lease_terms=..., on_leases_changed=...)``;
``lease_terms`` looks up a node's current price per GPU-hour and GPU count (from the
coordinator's market), and without it CreateLease is UNIMPLEMENTED; ``on_leases_changed``
(the coordinator's lease refresh) runs after a lease is created or ended, so serverless
traffic leaves a newly leased node at once. A node is leased whole (all its GPUs) and
to one client at a time (the ledger refuses a second active lease). API keys are never
logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio
from mercato.v1 import account_pb2, account_pb2_grpc

from marketplace.ledger import (
    AccountKind,
    AccountView,
    InvalidInput,
    LeaseRecord,
    LeaseStatus,
    Ledger,
    LedgerError,
    Principal,
    Unauthenticated,
    UnknownLease,
)
from marketplace.ledger.errors import LeaseNotActive
from marketplace.ledger.ledger import check_lease_hours

__all__ = [
    "AccountServiceError",
    "AccountServicer",
    "LeaseTerms",
    "LeaseTermsLookup",
    "LeasesNotOffered",
    "add_account_service",
]

log = logging.getLogger(__name__)

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 500
_ID_CHARS_MAX = 128
_INT64_MAX = 2**63 - 1  # the database's BIGINT
_T = TypeVar("_T")

_KINDS = {
    AccountKind.CLIENT.value: account_pb2.ACCOUNT_KIND_CLIENT,
    AccountKind.PROVIDER.value: account_pb2.ACCOUNT_KIND_PROVIDER,
}
_LEASE_STATUSES = {
    LeaseStatus.ACTIVE.value: account_pb2.LEASE_STATUS_ACTIVE,
    LeaseStatus.ENDED.value: account_pb2.LEASE_STATUS_ENDED,
    LeaseStatus.FAILED.value: account_pb2.LEASE_STATUS_FAILED,
}


class AccountServiceError(Exception):
    """Base of this service's own refusals."""

    grpc_status: grpc.StatusCode = grpc.StatusCode.INTERNAL


class LeasesNotOffered(AccountServiceError):
    grpc_status = grpc.StatusCode.UNIMPLEMENTED


@dataclass(frozen=True)
class LeaseTerms:
    """What leasing a node costs, from its current signed offer."""

    price_micro_usd_per_gpu_hour: int
    gpus: int  # GPUs that can be leased (a CPU node counts as one)


LeaseTermsLookup = Callable[[str], LeaseTerms | None]


class AccountServicer(account_pb2_grpc.AccountServiceServicer):
    """The caller's account, authenticated by API key."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        lease_terms: LeaseTermsLookup | None = None,
        on_leases_changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._ledger = ledger
        self._lease_terms = lease_terms
        self._on_leases_changed = on_leases_changed

    async def _leases_changed(self) -> None:
        """Tell routing at once (not at its next refresh) that a lease began or ended."""
        if self._on_leases_changed is not None:
            try:
                await self._on_leases_changed()
            except Exception:  # the lease is durable; routing catches up at its refresh
                log.exception("routing did not take the lease change; its refresh will")

    # ------------------------------------------------------------ plumbing

    async def _principal(self, context: grpc.aio.ServicerContext) -> Principal:
        key = None
        for name, value in context.invocation_metadata() or ():
            if name == "authorization" and isinstance(value, str):
                scheme, _, token = value.strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    key = token.strip()
        if key is None:
            raise Unauthenticated(
                "missing API key: send gRPC metadata 'authorization: Bearer mk_<id>_<secret>' "
                "(issue a key with 'mercato keys issue')"
            )
        return await self._ledger.authenticate(key)

    async def _answer(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        work: Callable[[Principal], Awaitable[_T]],
    ) -> _T:
        """Authenticate, run ``work``, and turn a refusal into its gRPC status."""
        try:
            principal = await self._principal(context)
            return await work(principal)
        except (LedgerError, AccountServiceError) as exc:
            await context.abort(exc.grpc_status, str(exc))
        except Exception:
            log.exception("AccountService.%s failed", method)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"the account service failed on {method}; try again, and report it if it "
                "keeps failing",
            )
        raise AssertionError("context.abort returned")  # pragma: no cover

    async def _own_lease(self, principal: Principal, lease_id: str) -> LeaseRecord:
        _check_id(lease_id, "lease_id")
        lease = await self._ledger.lease(lease_id)
        if lease is None or lease.account_id != principal.account_id:
            raise UnknownLease(
                f"lease {lease_id!r} is not one of your leases; ListLeases shows yours"
            )
        return lease

    # ------------------------------------------------------------ RPCs

    async def GetBalance(
        self, request: account_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.GetBalanceResponse:
        async def work(principal: Principal) -> account_pb2.GetBalanceResponse:
            account: AccountView = await self._ledger.balance(principal.account_id)
            spent, held = await self._ledger.key_usage(principal.key_id)
            response = account_pb2.GetBalanceResponse(
                account_id=account.id,
                account_name=account.name,
                kind=_KINDS.get(account.kind, account_pb2.ACCOUNT_KIND_UNSPECIFIED),
                posted_micro_usd=account.posted_micro_usd,
                held_micro_usd=account.pending_debits_micro_usd,
                available_micro_usd=account.available_micro_usd,
                api_key_id=principal.key_id,
                key_spent_micro_usd=spent,
                key_held_micro_usd=held,
            )
            limit = principal.spend_limit_micro_usd
            if limit is not None:
                response.key_spend_limit_micro_usd = limit
                response.key_spend_left_micro_usd = max(0, limit - spent - held)
            return response

        return await self._answer(context, "GetBalance", work)

    async def ListReceipts(
        self, request: account_pb2.ListReceiptsRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.ListReceiptsResponse:
        async def work(principal: Principal) -> account_pb2.ListReceiptsResponse:
            size = _page_size(request.page_size)
            if request.since_unix_ms < 0:
                raise InvalidInput("since_unix_ms must be 0 or a Unix time in milliseconds")
            if request.request_id:
                _check_id(request.request_id, "request_id")
            rows = await self._ledger.receipt_page(
                principal.account_id,
                limit=size + 1,
                after=_decode_page_token(request.page_token) if request.page_token else None,
                request_id=request.request_id or None,
                since_unix_ms=request.since_unix_ms or None,
            )
            response = account_pb2.ListReceiptsResponse()
            for row in rows[:size]:
                item = response.receipts.add(
                    request_id=row.request_id,
                    segment_index=row.segment_index,
                    node_id=row.node_id,
                    model=row.model,
                    input_tokens=row.input_tokens,
                    output_tokens=row.output_tokens,
                    cost_micro_usd=row.cost_micro_usd,
                    settled_at_unix_ms=row.settled_at_unix_ms,
                )
                item.receipt.CopyFrom(row.signed)
            response.next_page_token = _next_page_token(
                rows, size, lambda row: (row.settled_at_unix_ms, row.worker_request_id)
            )
            return response

        return await self._answer(context, "ListReceipts", work)

    async def GetUsage(
        self, request: account_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.GetUsageResponse:
        async def work(principal: Principal) -> account_pb2.GetUsageResponse:
            if request.since_unix_ms < 0:
                raise InvalidInput("since_unix_ms must be 0 or a Unix time in milliseconds")
            rows = await self._ledger.usage(
                principal.account_id,
                since_unix_ms=request.since_unix_ms or None,
                api_key_id=request.api_key_id or None,
                model=request.model or None,
            )
            response = account_pb2.GetUsageResponse()
            for row in rows:
                response.rows.add(
                    day=row.day,
                    api_key_id=row.api_key_id or "",
                    model=row.model,
                    requests=row.requests,
                    input_tokens=row.input_tokens,
                    output_tokens=row.output_tokens,
                    cost_micro_usd=row.cost_micro_usd,
                )
            return response

        return await self._answer(context, "GetUsage", work)

    async def CreateLease(
        self, request: account_pb2.CreateLeaseRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.CreateLeaseResponse:
        async def work(principal: Principal) -> account_pb2.CreateLeaseResponse:
            principal.require_client()
            _check_id(request.node_id, "node_id")
            check_lease_hours(request.hours)  # (1..LEASE_HOURS_MAX, as the CLI)
            if request.lease_id:
                _check_id(request.lease_id, "lease_id")
                # A retry answers the lease made (its node may be offline since); a
                # taken id is IdConflict.
                existing = await self._ledger.existing_lease(
                    request.lease_id, principal.account_id, request.node_id, request.hours
                )
                if existing is not None:
                    return account_pb2.CreateLeaseResponse(lease=_lease(existing))
            if self._lease_terms is None:
                raise LeasesNotOffered(
                    "this coordinator does not offer leases (it was started without market "
                    "prices); use another coordinator or serverless requests"
                )
            terms = self._lease_terms(request.node_id)
            if terms is None:
                raise UnknownLease(
                    f"node {request.node_id!r} has no current offer to lease; ListNodes shows "
                    "the nodes online"
                )
            gpus = request.gpus or terms.gpus
            if gpus != terms.gpus:
                raise InvalidInput(
                    f"gpus: node {request.node_id!r} is leased whole and has {terms.gpus} "
                    f"GPU(s) (a CPU node counts as one); send gpus={terms.gpus}, or 0 for all"
                )
            cap = request.max_price_micro_usd_per_gpu_hour
            if cap and terms.price_micro_usd_per_gpu_hour > cap:
                raise InvalidInput(
                    f"node {request.node_id!r} costs {terms.price_micro_usd_per_gpu_hour} "
                    f"micro-USD per GPU-hour, above your max_price_micro_usd_per_gpu_hour of "
                    f"{cap}; raise the cap or choose another node"
                )
            lease = await self._ledger.create_lease(
                principal,
                request.node_id,
                gpus=gpus,
                price_micro_usd_per_gpu_hour=terms.price_micro_usd_per_gpu_hour,
                hours=request.hours,
                lease_id=request.lease_id or None,
            )
            await self._leases_changed()
            return account_pb2.CreateLeaseResponse(lease=_lease(lease))

        return await self._answer(context, "CreateLease", work)

    async def EndLease(
        self, request: account_pb2.EndLeaseRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.EndLeaseResponse:
        async def work(principal: Principal) -> account_pb2.EndLeaseResponse:
            # A lease that has ended already (a retry of this call, its node failed, its
            # hours ran out) is answered as it is: the caller asked for it to be over.
            lease = await self._own_lease(principal, request.lease_id)
            if lease.status == LeaseStatus.ACTIVE.value:
                try:
                    lease = await self._ledger.end_lease(request.lease_id)
                except LeaseNotActive:  # ended meanwhile, by a twin of this call or its node
                    lease = await self._own_lease(principal, request.lease_id)
                await self._leases_changed()
            return account_pb2.EndLeaseResponse(lease=_lease(lease))

        return await self._answer(context, "EndLease", work)

    async def GetLease(
        self, request: account_pb2.GetLeaseRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.GetLeaseResponse:
        async def work(principal: Principal) -> account_pb2.GetLeaseResponse:
            lease = await self._own_lease(principal, request.lease_id)
            return account_pb2.GetLeaseResponse(lease=_lease(lease))

        return await self._answer(context, "GetLease", work)

    async def ListLeases(
        self, request: account_pb2.ListLeasesRequest, context: grpc.aio.ServicerContext
    ) -> account_pb2.ListLeasesResponse:
        async def work(principal: Principal) -> account_pb2.ListLeasesResponse:
            size = _page_size(request.page_size)
            rows = await self._ledger.lease_page(
                principal.account_id,
                limit=size + 1,
                after=_decode_page_token(request.page_token) if request.page_token else None,
                active_only=request.active_only,
            )
            return account_pb2.ListLeasesResponse(
                leases=[_lease(row) for row in rows[:size]],
                next_page_token=_next_page_token(
                    rows, size, lambda row: (row.started_at_unix_ms, row.lease_id)
                ),
            )

        return await self._answer(context, "ListLeases", work)


def add_account_service(
    server: grpc.aio.Server,
    ledger: Ledger,
    *,
    lease_terms: LeaseTermsLookup | None = None,
    on_leases_changed: Callable[[], Awaitable[None]] | None = None,
) -> AccountServicer:
    """Serve AccountService on ``server`` from ``ledger`` (already started);
    ``on_leases_changed`` is awaited after a lease is created or ended."""
    servicer = AccountServicer(ledger, lease_terms=lease_terms, on_leases_changed=on_leases_changed)
    account_pb2_grpc.add_AccountServiceServicer_to_server(servicer, server)
    return servicer


def _page_size(asked: int) -> int:
    size = asked or PAGE_SIZE_DEFAULT
    if size > PAGE_SIZE_MAX:
        raise InvalidInput(f"page_size must be at most {PAGE_SIZE_MAX}, got {size}")
    return size


def _check_id(value: str, field: str) -> None:
    if not value:
        raise InvalidInput(f"{field} is required")
    if len(value) > _ID_CHARS_MAX or not value.isprintable() or value.strip() != value:
        raise InvalidInput(
            f"{field} must be 1..{_ID_CHARS_MAX} printable characters without surrounding spaces"
        )


def _lease(record: LeaseRecord) -> account_pb2.Lease:
    return account_pb2.Lease(
        lease_id=record.lease_id,
        node_id=record.node_id,
        status=_LEASE_STATUSES.get(record.status, account_pb2.LEASE_STATUS_UNSPECIFIED),
        held_micro_usd=record.total_micro_usd,
        charged_micro_usd=record.charged_micro_usd,
        refunded_micro_usd=record.refunded_micro_usd,
        periods_total=record.periods_total,
        periods_charged=record.periods_charged,
        started_at_unix_ms=record.started_at_unix_ms,
        ends_at_unix_ms=record.ends_at_unix_ms,
    )


def _next_page_token(
    rows: Sequence[_T], size: int, position: Callable[[_T], tuple[int, str]]
) -> str:
    """The token of the page after ``rows[:size]`` (``rows`` was read with one row more
    than a page, to know whether there is a next one); empty when this page is the last."""
    if len(rows) <= size:
        return ""
    return _encode_page_token(*position(rows[size - 1]))


def _encode_page_token(unix_ms: int, row_id: str) -> str:
    """Where the next page starts: the (time, id) of this page's last row."""
    raw = json.dumps([unix_ms, row_id], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_page_token(token: str) -> tuple[int, str]:
    """The (time, id) a page token names; InvalidInput for any token this service could
    not have issued (a time outside a 64-bit integer would fail in the database)."""
    try:
        raw: Any = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        unix_ms, row_id = raw
        if (
            isinstance(unix_ms, int)
            and not isinstance(unix_ms, bool)
            and 0 <= unix_ms <= _INT64_MAX
            and isinstance(row_id, str)
            and "\x00" not in row_id
        ):
            return unix_ms, row_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise InvalidInput(
        "page_token is not one this service issued; start again without a page_token"
    )
