"""The Kafka intake, an entry point beside `api/`: billing systems and agents request payments
over Kafka (`consumer.py`); `python -m intake` runs it in its own process, or the worker runs
it with PAYSAGA_KAFKA_INTAKE_ENABLED=true.
"""
