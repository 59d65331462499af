"""Shared test helpers, one place: the API client (api_client.py), saga, follow-up, ledger and
Kafka helpers, the private stack's settings, and the fake CRM (fake_crm.py: a stand-in for the
CRMs' far side, as a real server)."""
