"""The Kafka intake, an entry point beside `api/`: billing systems and agents request payments
over Kafka. `consumer.py` reads the clients' topics and starts payments; `messages.py` says
what a message must be and what its dead letter carries. `python -m intake` runs it in its own
process, or the worker runs it with PAYSAGA_KAFKA_INTAKE_ENABLED=true.
"""
