"""`mercato accounts create/list`, `mercato keys issue/revoke/list`,
`mercato credits deposit`, `mercato balance`: accounts, keys and money in.

Same conventions as ``ledger_cmd``: ``--database-url``, ``--json``, one-line errors.
"""

from __future__ import annotations

import typer

from marketplace.cli.ledger_cmd import DatabaseUrl, JsonOutput, emit, open_store, table

accounts_app = typer.Typer(no_args_is_help=True, help="Client and provider accounts.")
keys_app = typer.Typer(no_args_is_help=True, help="API keys (shown once, stored hashed).")
credits_app = typer.Typer(no_args_is_help=True, help="Put money into accounts.")


@accounts_app.command("create")
def accounts_create(
    name: str = typer.Option(..., "--name", help="Unique name, e.g. alice or acme-gpu-1."),
    kind: str = typer.Option("client", "--kind", help="client or provider."),
    node_id: str | None = typer.Option(
        None, "--node-id", help="Provider accounts: the node's id (12D3KooW...)."
    ),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Create a client account, or a provider account bound to a node."""
    from marketplace.ledger.errors import InvalidInput
    from marketplace.ledger.models import AccountKind

    with open_store(database_url, json_output) as store:
        if kind not in (AccountKind.CLIENT.value, AccountKind.PROVIDER.value):
            raise InvalidInput(f"--kind must be client or provider, got {kind!r}")
        account = store.create_account(AccountKind(kind), name, node_id=node_id)
    emit(
        account,
        json_output,
        lambda: print(f"created {account.kind} account {account.id} ({account.name})"),
    )


@accounts_app.command("list")
def accounts_list(
    kind: str | None = typer.Option(None, "--kind", help="Only client, provider or platform."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Every account with its balance (micro-USD)."""
    from marketplace.ledger.errors import InvalidInput
    from marketplace.ledger.models import AccountKind

    with open_store(database_url, json_output) as store:
        if kind is not None and kind not in {k.value for k in AccountKind}:
            raise InvalidInput(f"--kind must be client, provider or platform, got {kind!r}")
        accounts = store.accounts(AccountKind(kind) if kind else None)
    emit(
        accounts,
        json_output,
        lambda: table(
            "Accounts",
            ["id", "kind", "name", "node", "posted µUSD", "held µUSD", "available µUSD"],
            [
                [
                    a.id,
                    a.kind,
                    a.name,
                    a.node_id or "-",
                    a.posted_micro_usd,
                    a.pending_debits_micro_usd,
                    a.available_micro_usd,
                ]
                for a in accounts
            ],
        ),
    )


@keys_app.command("issue")
def keys_issue(
    account: str = typer.Option(..., "--account", help="Account id or name."),
    name: str = typer.Option("default", "--name", help="A label for the key."),
    spend_limit_micro_usd: int | None = typer.Option(
        None, "--spend-limit-micro-usd", min=1, help="Most this key may ever spend."
    ),
    rate_limit_per_minute: int | None = typer.Option(
        None, "--rate-limit-per-minute", min=1, help="Most requests per minute."
    ),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Issue an API key. The key is printed once; only its hash is stored."""
    with open_store(database_url, json_output) as store:
        issued = store.issue_key(
            account,
            name,
            spend_limit_micro_usd=spend_limit_micro_usd,
            rate_limit_per_minute=rate_limit_per_minute,
        )

    def human() -> None:
        print(f"API key {issued.key.id} for account {issued.key.account_id}:")
        print(f"  {issued.secret_key}")
        print("Store it now: it is shown only once.")

    emit({"key": issued.key, "api_key": issued.secret_key}, json_output, human)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str = typer.Argument(..., help="Key id (or the full key)."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Revoke a key; it stops working at once."""
    with open_store(database_url, json_output) as store:
        key = store.revoke_key(key_id)
    emit(key, json_output, lambda: print(f"revoked key {key.id}"))


@keys_app.command("list")
def keys_list(
    account: str | None = typer.Option(None, "--account", help="Only this account's keys."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Keys (ids and limits; never secrets)."""
    with open_store(database_url, json_output) as store:
        keys = store.keys(account)
    emit(
        keys,
        json_output,
        lambda: table(
            "API keys",
            ["id", "account", "name", "revoked", "spend limit µUSD", "rate limit /min"],
            [
                [
                    k.id,
                    k.account_id,
                    k.name,
                    "yes" if k.revoked_at_unix_ms else "no",
                    k.spend_limit_micro_usd or "-",
                    k.rate_limit_per_minute or "-",
                ]
                for k in keys
            ],
        ),
    )


@credits_app.command("deposit")
def credits_deposit(
    account: str = typer.Argument(..., help="Account id or name."),
    amount_micro_usd: int = typer.Argument(..., help="Amount in micro-USD (1 USD = 1000000)."),
    transfer_id: str | None = typer.Option(
        None, "--transfer-id", help="Idempotency id: the same id deposits once."
    ),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """Credit an account (credits bought)."""
    with open_store(database_url, json_output) as store:
        result = store.deposit(account, amount_micro_usd, transfer_id)
        view = store.account(account)
    emit(
        {"transfer": result, "account": view},
        json_output,
        lambda: print(
            f"{'deposited' if result.created else 'already deposited'} {result.amount} µUSD "
            f"({result.transfer_id}); {view.name} has {view.available_micro_usd} µUSD available"
        ),
    )


def balance(
    account: str = typer.Argument(..., help="Account id, name or node id."),
    database_url: str | None = DatabaseUrl,
    json_output: bool = JsonOutput,
) -> None:
    """An account's posted, held and available balance (micro-USD)."""
    with open_store(database_url, json_output) as store:
        view = store.account(account)
    emit(
        view,
        json_output,
        lambda: print(
            f"{view.name} ({view.id}, {view.kind}): posted {view.posted_micro_usd} µUSD, "
            f"held {view.pending_debits_micro_usd}, available {view.available_micro_usd}"
        ),
    )


def register(app: typer.Typer) -> None:
    """Adds this module's commands to the root app."""
    app.add_typer(accounts_app, name="accounts", help="Client and provider accounts.")
    app.add_typer(keys_app, name="keys", help="API keys (shown once, stored hashed).")
    app.add_typer(credits_app, name="credits", help="Put money into accounts.")
    app.command("balance")(balance)
