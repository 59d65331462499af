"""Engines, SERIALIZABLE transactions with bounded retries, and migrations.

The same code runs on PostgreSQL (`postgresql+psycopg://`) and CockroachDB
(`cockroachdb+psycopg://`): both are SERIALIZABLE here, and both report contention as
SQLSTATE 40001, after which the *whole* transaction is run again. The one exception is the
events store's background bookkeeping (`make_bookkeeping_engine`), at READ COMMITTED.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from temporalio.exceptions import ApplicationError

from domain.errors import FailureType
from infra.metrics import LEDGER_SERIALIZATION_RETRIES

log = logging.getLogger(__name__)
T = TypeVar("T")

SERIALIZATION_FAILURE = "40001"
# CockroachDB: the commit may or may not have happened. Safe to retry only because every
# ledger write is idempotent (unique business keys + ON CONFLICT DO NOTHING).
AMBIGUOUS_RESULT = "40003"
RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, AMBIGUOUS_RESULT})

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def insert_unless_present(
    table: sa.Table, columns: Sequence[str], conflict: Sequence[str], returning: Sequence[str] = ()
) -> sa.TextClause | sa.TextualSelect:
    """`INSERT INTO table (columns) VALUES (:column, …) ON CONFLICT (conflict) DO NOTHING
    [RETURNING …]`, its parameters typed by the table's columns, to execute with a dict of
    values. SQLAlchemy 2.0 never caches the PostgreSQL `insert()` construct (its ON CONFLICT
    clause opts out of the statement cache), so that statement is compiled again on every
    call: measured at about a tenth of a worker's CPU on the payment path (README
    Performance). This text is compiled once and cached like any other."""
    names = ", ".join(columns)
    values = ", ".join(f":{c}" for c in columns)
    sql = (
        f"INSERT INTO {table.name} ({names}) VALUES ({values}) "
        f"ON CONFLICT ({', '.join(conflict)}) DO NOTHING"
    )
    if returning:
        sql += f" RETURNING {', '.join(returning)}"
    statement = sa.text(sql).bindparams(*(sa.bindparam(c, type_=table.c[c].type) for c in columns))
    return statement.columns(*(table.c[c] for c in returning)) if returning else statement


# What a failed statement means for the step that ran it (SQLSTATE classes, PostgreSQL and
# CockroachDB alike):
# - data errors, class 22 (a value too long, out of range, malformed) and class 23 (a
#   constraint refused the row): the same input fails every time, so the step fails at once
#   with a named, non-retryable reason (the idempotent claims never raise 23505: they are
#   ON CONFLICT DO NOTHING);
# - everything else is transient or operational and is retried with backoff: connection
#   errors (class 08, or no SQLSTATE at all: the socket went away), serialization failures and
#   ambiguous commits (40001, 40003), deadlocks (40P01), an administrator or crash shutdown
#   (57P01, 57P02, 57P03), resources exhausted (class 53), and schema errors (class 42, e.g. a
#   migration not yet applied: the step resumes once the operator migrates).
DATA_ERROR_CLASSES = frozenset({"22", "23"})
TRANSIENT_SQLSTATES = frozenset({SERIALIZATION_FAILURE, AMBIGUOUS_RESULT, "40P01"})
TRANSIENT_CLASSES = frozenset({"08", "53", "57"})


def is_data_error(exc: BaseException) -> bool:
    """The database refused the data itself: retrying the same statement cannot help."""
    state = sqlstate(exc)
    return state is not None and state[:2] in DATA_ERROR_CLASSES


def is_transient(exc: BaseException) -> bool:
    """Connection trouble, contention or a server going down: worth retrying as it is."""
    state = sqlstate(exc)
    if state is None:
        return (isinstance(exc, DBAPIError) and exc.connection_invalidated) or _no_server(exc)
    return state in TRANSIENT_SQLSTATES or state[:2] in TRANSIENT_CLASSES


def _no_server(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return type(orig).__name__ in ("OperationalError", "InterfaceError")


class TooMuchContention(RuntimeError):
    """The transaction kept conflicting; the caller (a Temporal activity) retries later."""


# The failure type of a step the database could not serve right now (down, shutting down,
# contention): retried by the step's retry policy, unlike the FailureType names.
DATABASE_UNAVAILABLE = "DatabaseUnavailable"


def step_failure(exc: BaseException, what: str) -> ApplicationError:
    """What an activity raises for a database error, `from None`: a data error fails the step
    for good (`DataRejected`: a 22001 retried forever would wedge every later step of the
    payment); anything else is retried as `DatabaseUnavailable`.

    Never the driver's exception itself: temporalio's failure converter follows `__cause__`,
    and on psycopg's errors of a database shutting down it went to Python's recursion limit on
    every attempt (thousands of traceback lines a second while the database was down, a worker
    too busy to finish its workflow tasks in time: the faults simulation, seed 2)."""
    first_line = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0][:300]
    state = sqlstate(exc)
    if is_data_error(exc):
        return ApplicationError(
            f"the database refused {what} (SQLSTATE {state}): {first_line}",
            type=FailureType.DATA_REJECTED.value,
            non_retryable=True,
        )
    where = f"SQLSTATE {state}" if state else type(getattr(exc, "orig", None) or exc).__name__
    return ApplicationError(
        f"the database could not serve {what} ({where}): {first_line}", type=DATABASE_UNAVAILABLE
    )


def sqlstate(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None)


# A pooled connection that sat unused this long is pinged before it is handed out (and
# replaced if the ping fails); one used more recently is handed out as it is.
PING_IF_IDLE_SECONDS = 1.0


def make_engine(
    url: str,
    pool_size: int = 10,
    max_overflow: int | None = None,
    *,
    isolation: str = "SERIALIZABLE",
) -> AsyncEngine:
    """At most `pool_size` + `max_overflow` (default: `pool_size`) connections; the overflow
    ones are closed as soon as they are returned. Transactions run at `isolation`; the
    one-statement ones of `run_statement` take the session's default, which is the database's
    (SERIALIZABLE: the embedded PostgreSQL is started so, CockroachDB always is) or, for
    another `isolation`, that one, set when the connection opens."""
    connect_args: dict[str, str] = {}
    if isolation != "SERIALIZABLE":
        session_default = isolation.lower().replace(" ", "\\ ")
        connect_args["options"] = f"-c default_transaction_isolation={session_default}"
    engine = create_async_engine(
        url,
        isolation_level=isolation,
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        pool_recycle=300,
        connect_args=connect_args,
    )
    _ping_when_idle(engine)
    return engine


def make_bookkeeping_engine(url: str, pool_size: int = 2) -> AsyncEngine:
    """For the events store's background bookkeeping only: the outbox relay, the webhook
    dispatcher and the record of Kafka's acknowledgements. They run at READ COMMITTED.

    Their statements mark or read many `outbox_events` rows at once (`published_at`,
    `dispatched_at`, the partial indexes of what is owed). Under SERIALIZABLE each one took
    predicate locks on those indexes' pages, and PostgreSQL's SSI then aborted the ledger
    postings that inserted their events into the same pages: under load most serialization
    failures were such pairs (README Performance), a posting run again for bookkeeping that
    needs no isolation at all. Every one of these writes is idempotent or a compare-and-set
    on one row (an acknowledgement, a dispatch mark, the relay's epoch and sweep cursor),
    which READ COMMITTED re-checks on the row it waited for; the ledger and every other
    write stay SERIALIZABLE. CockroachDB runs READ COMMITTED where the cluster allows it and
    SERIALIZABLE otherwise, which is only slower."""
    return make_engine(url, pool_size=pool_size, isolation="READ COMMITTED")


def _ping_when_idle(engine: AsyncEngine) -> None:
    """SQLAlchemy's `pool_pre_ping`, but only for a connection idle for PING_IF_IDLE_SECONDS.
    The pre-ping was a `SELECT 1` round trip before every transaction: under load about a
    sixth of the API's CPU and a fourteenth of a worker's (py-spy, README Performance), for
    connections that had served a transaction milliseconds before. A database that went away
    (stopped, restarted) is still found out before use on any connection that waited through
    it; one lost within the last second fails its transaction as it would mid-transaction
    (a transient database error: retried by the activity, a 503 to an API client, whose
    retry with the same key is safe), and SQLAlchemy then replaces the pool's other
    connections."""
    dialect = engine.sync_engine.dialect

    @sa.event.listens_for(engine.sync_engine, "checkin")
    def _returned(dbapi_connection: DBAPIConnection, record: sa.pool.ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @sa.event.listens_for(engine.sync_engine, "checkout")
    def _checked_out(
        dbapi_connection: DBAPIConnection,
        record: sa.pool.ConnectionPoolEntry,
        proxy: sa.pool.PoolProxiedConnection,
    ) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_IF_IDLE_SECONDS:
            return  # just connected, or in use a moment ago
        try:
            dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool throws this connection away and hands out a fresh one.
            raise sa.exc.DisconnectionError(f"pre-use ping failed: {exc}") from exc


class RetryStats:
    """Counts 40001/40003 retries in this process. The same count is exported as the
    `paysaga_ledger_serialization_retries_total` metric (by SQLSTATE)."""

    serialization_retries = 0


# Backoff between attempts after 40001/40003: doubling from the first, capped, jittered.
_BASE_DELAY_SECONDS = 0.01
_MAX_DELAY_SECONDS = 0.5


async def run_serializable(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    max_attempts: int = 8,
    base_delay: float = _BASE_DELAY_SECONDS,
    max_delay: float = _MAX_DELAY_SECONDS,
) -> T:
    """Run `work` in one SERIALIZABLE transaction, re-running all of it on 40001/40003 with
    jittered exponential backoff, at most `max_attempts` times."""
    return await _retried(engine, work, max_attempts, base_delay, max_delay, autocommit=False)


async def run_statement(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    max_attempts: int = 8,
) -> T:
    """`run_serializable` for `work` that executes exactly ONE statement: it runs outside an
    explicit transaction (autocommit), so the statement is its own, with the databases'
    default isolation (SERIALIZABLE: the embedded PostgreSQL is started so, CockroachDB always
    is), and the BEGIN and COMMIT round trips are saved — two of the three a one-statement
    transaction costs (the idempotency claim of every payment, payments.raw in the events store,
    Kafka's acknowledgements). Retried on 40001/40003 the same way. Never for work of two
    statements: each would commit on its own."""
    return await _retried(
        engine, work, max_attempts, _BASE_DELAY_SECONDS, _MAX_DELAY_SECONDS, autocommit=True
    )


async def _retried(
    engine: AsyncEngine,
    work: Callable[[AsyncConnection], Awaitable[T]],
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    *,
    autocommit: bool,
) -> T:
    for attempt in range(1, max_attempts + 1):
        try:
            if autocommit:
                async with engine.connect() as conn:
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                    return await work(conn)
            async with engine.begin() as conn:
                return await work(conn)
        except DBAPIError as exc:
            state = sqlstate(exc)
            if state not in RETRYABLE_SQLSTATES:
                raise
            RetryStats.serialization_retries += 1
            LEDGER_SERIALIZATION_RETRIES.labels(state).inc()
            if attempt == max_attempts:
                raise TooMuchContention(
                    f"ledger transaction still conflicting (SQLSTATE {state}) after "
                    f"{max_attempts} attempts"
                ) from exc
            delay = min(max_delay, base_delay * 2 ** (attempt - 1))
            await asyncio.sleep(delay * (0.5 + random.random()))
            log.info(
                "retrying serializable transaction",
                extra={"sqlstate": state, "attempt": attempt, "work": work.__qualname__},
            )
    raise AssertionError("unreachable")


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to `revision`. Idempotent: re-running at head changes nothing."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = create_engine(url, isolation_level="SERIALIZABLE")
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def head_revision() -> str:
    """The newest migration this code brings (what `migrate` upgrades to)."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None
    return head


def revision_before(revision: str) -> str | None:
    """The migration `revision` follows."""
    from alembic.script import ScriptDirectory

    found = ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision)
    assert found is not None
    down = found.down_revision
    assert down is None or isinstance(down, str), "not a merge revision"
    return down


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
