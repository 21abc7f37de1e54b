"""What a writer remembers between its batches, and when that memory may be trusted.

Every write that moves money advances the journal head (``journal_head``: sequence and
hash of the last entry), and every writer locks that row for its whole batch. So when a
batch finds the head exactly where this writer left it, nobody else has written since,
and the state this writer knows — account balances, the provider account of each node,
the holds it saw open — is still the database's. When the head has moved on (another
coordinator, the operator CLI), the entries written since name every account and every
open hold that changed (a balance or a hold changes only by a journal entry): the batch
forgets those, and every limited key's usage, and keeps the rest (``caught_up``). Either way the batch starts from that
state instead of reading it again, and skips the look-ups that only find earlier rows
of a retried request (a settlement, a receipt, a hold transfer): if such a row exists
after all, its unique key refuses the insert, the transaction rolls back, the memory is
dropped, and the batch runs again reading everything (``optimistic`` below is then
False). Any failure, or a last head of this writer's that the journal no longer has as
it was (or one too far behind), drops the memory the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

_ACCOUNTS_REMEMBERED_MAX = 200_000
_HOLDS_REMEMBERED_MAX = 500_000
_KEYS_REMEMBERED_MAX = 200_000


# An account as batches see it: (kind, must_not_overdraw, node_id, debits_posted,
# credits_posted, debits_pending, credits_pending). A flat tuple on purpose: the cache
# keeps up to _ACCOUNTS_REMEMBERED_MAX of them for the life of the process, and the
# collector stops tracking a tuple of strings, booleans and integers the first time a
# collection sees it, where an object (and the list its sums were kept in) stayed
# tracked for good, so every full collection walked them all: 41 ms per collection over
# 200k cached accounts, during which a coordinator's event loop and its writer both
# stop; 7 ms with tuples. (A tuple holding a tracked tuple needs a second collection, so
# the sums are not nested.) A batch replaces an account's tuple when it changes the sums.
AccountState = tuple[str, bool, str | None, int, int, int, int]
KIND: Final = 0
MUST_NOT_OVERDRAW: Final = 1


def available(state: AccountState) -> int:
    """What the account can spend: credits posted - debits posted - debits pending."""
    return state[4] - state[3] - state[5]


@dataclass
class WriterCache:
    """State kept by one writer (one connection) across its batches."""

    head_seq: int | None = None  # None: nothing remembered
    head_hash: bytes = b""
    accounts: dict[str, AccountState] = field(default_factory=dict)
    provider_by_node: dict[str, str] = field(default_factory=dict)
    open_holds: dict[str, dict[str, Any]] = field(default_factory=dict)  # request id -> row
    # Limited keys' usage, key id -> [spent, {owner: open holds}] (applier._Batch.key_usage).
    # Forgotten whenever another writer wrote (its entries do not name the keys they
    # charged), so it is kept only while this writer is the only one.
    key_usage: dict[str, list[Any]] = field(default_factory=dict)
    pending_head: tuple[int, bytes] | None = None  # the head the open batch will commit
    hits: int = 0  # batches that started from memory
    caught_up: int = 0  # batches that started from memory less what others changed
    misses: int = 0  # batches that read everything

    def matches(self, seq: int, hash_: bytes) -> bool:
        """True when the locked head is the one this writer committed last."""
        return self.head_seq is not None and seq == self.head_seq and hash_ == self.head_hash

    def clear(self) -> None:
        """Forget everything (a failed batch, or the head moved under us)."""
        self.head_seq = None
        self.head_hash = b""
        self.accounts.clear()
        self.provider_by_node.clear()
        self.open_holds.clear()
        self.key_usage.clear()
        self.pending_head = None

    def committed(self) -> None:
        """The open batch committed: its head, and the state it left, are now the truth."""
        if self.pending_head is None:
            return
        self.head_seq, self.head_hash = self.pending_head
        self.pending_head = None
        if (
            len(self.accounts) > _ACCOUNTS_REMEMBERED_MAX
            or len(self.open_holds) > _HOLDS_REMEMBERED_MAX
            or len(self.key_usage) > _KEYS_REMEMBERED_MAX
        ):
            self.clear()  # bounded memory; the next batch reads what it needs
