"""Production adapters: the database engine, the payload codec, the Temporal client, Kafka topic
administration, observability (metrics, logs, tracing), migrations, the idempotency register,
the outbox relay and the provisioning jobs. The embedded development stack is `infra.embedded`.
"""
