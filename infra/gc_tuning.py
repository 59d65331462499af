"""Python's cyclic garbage collector, tuned for the long-running service processes."""

from __future__ import annotations

import gc

# A young-generation collection after this many net allocations (CPython's default: 700). A
# worker allocates tens of thousands of short-lived objects per payment (protobuf activations,
# pydantic models, SQLAlchemy rows, log records); at 700 the collector ran hundreds of times per
# payment, each pass walking every young container. Measured with `paysaga bench` (README
# "Performance", third pass): the workers' CPU per payment −8 %, the API's −15 %, peak RSS no
# higher than the run-to-run spread. Reference cycles are still collected, only in fewer passes.
YOUNG_COLLECTION_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Call once at the start of a worker, API or intake process."""
    # The older generations: collected every 20 young passes (default 10), the oldest every 50
    # middle ones (default 10), as measured.
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, 20, 50)
