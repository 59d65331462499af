"""Shared test helpers, one place: the API client (api_client.py), saga, follow-up, ledger and
Kafka helpers, the private stack's settings, the fake CRM (fake_crm.py: a stand-in for the
CRMs' far side, as a real server), and the repository's root (paths.py)."""
