"""The ledger (PostgreSQL here, CockroachDB in production): one home for its tables
(`tables.py`), what goes in and comes out (`records.py`), the SERIALIZABLE write path and its
reads (`store.py`), and its Temporal activities (`activity.py`). The pure rules (balanced
transactions, account codes) are the domain's: `domain/ledger.py`.
"""
