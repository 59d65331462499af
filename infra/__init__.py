"""The embedded stack: real Temporal, a Kafka-protocol broker and PostgreSQL from wheels.

`paysaga run` and the test fixtures both use this package; there is one implementation.
"""
