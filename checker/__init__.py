"""The invariant checker behind `paysaga check`: the promises of the ledger, Kafka and Temporal,
verified against a live system.

Each check reads what the system *did* (ledger entries, outbox rows, Kafka records, workflow
search attributes) and never trusts a summary column on its own: the amounts a payment moved
are recomputed from its ledger entries and only then compared with the payments register.

Reads are set-based (a handful of SQL statements, one pass over each Kafka topic, paged
visibility listings), so thousands of payments take seconds.

The checker judges a *quiescent* system. A payment whose workflow is still between steps
(received, requires_review, processing) is counted as in flight and not judged; an event that
is committed to the outbox but not yet published shows up as missing until it is. Run it after
traffic stops, or give `settle_seconds` to re-check for a while before calling a difference a
violation.

`report.py` names the promises and shapes the report; `ledger.py`, `kafka.py` and
`workflows.py` check them; `runner.py` runs them all.
"""
