"""Process exit that survives temporalio's interpreter-shutdown crash (sdk-python#300)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from infra.gc_tuning import tune_garbage_collector


def hard_exit(status: int) -> None:
    """Leave without running interpreter finalizers, after flushing what we wrote: temporalio
    can abort in ~1 of 5 processes during finalization after all work succeeded."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_and_exit(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `main` on uvloop (libuv: a fraction of asyncio's per-callback cost, which a worker
    pays on every activity, database round trip and Kafka acknowledgement), with the garbage
    collector tuned for a service (infra/gc_tuning.py), then hard-exit."""
    tune_garbage_collector()
    status = 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
    except KeyboardInterrupt:
        status = 130
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        logging.getLogger("paysaga").exception("fatal error")
        status = 1
    hard_exit(status)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: a long-running process's `main` waits on it, then
    shuts down in order (call it from inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
