"""Running a sandbox (`sandboxes/`) as a child process of the stack, and the secrets it shares
with the worker."""

from __future__ import annotations

import os
import secrets
import sys
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from infra.embedded.process import ManagedProcess, wait_until


@dataclass
class SandboxService:
    """`python -m sandboxes.<name> --host 127.0.0.1 --port <port> --data-dir <dir> <args>`."""

    name: str
    port: int
    data_dir: Path
    args: list[str] = field(default_factory=list)
    process: ManagedProcess | None = None
    # Secrets the sandbox reads from its environment (never its command line, which `ps` shows).
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        argv = [
            sys.executable, "-m", f"sandboxes.{self.name}",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), *self.args,
        ]  # fmt: skip
        self.process = ManagedProcess(
            f"{self.name} sandbox",
            argv,
            self.data_dir / "sandbox.log",
            env={**os.environ, **self.env},
        )
        self.process.start()
        wait_until(
            lambda: (
                (self.process is not None and self.process.alive_or_raise()) and self._healthy()
            ),
            f"the {self.name} sandbox on port {self.port}",
            timeout,
            self.process.log_path,
        )

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()


def load_or_create_secret(path: Path, prefix: str = "whsec_") -> str:
    """A random secret kept (mode 0600) so a restart keeps verifying what it signed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as secret_file:
            secret_file.write(prefix + secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
