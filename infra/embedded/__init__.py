"""The embedded development stack: real Temporal, a Kafka-protocol broker and PostgreSQL from
wheels, their process supervision, and the sandboxes `paysaga run` starts beside them.

`paysaga run` and the test fixtures both use this package; there is one implementation.
The API, the worker and the intake never import it; `paysaga check` only reads the embedded
database's name from it, to find the stack `paysaga run` started when no database is configured.
"""
