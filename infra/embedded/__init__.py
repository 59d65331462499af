"""The embedded development stack: real Temporal, a Kafka-protocol broker and PostgreSQL from
wheels, their process supervision, and the sandboxes `paysaga run` starts beside them.

`paysaga run` and the test fixtures both use this package; there is one implementation.
Nothing in production imports it.
"""
