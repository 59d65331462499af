"""Sandboxes: local, real HTTP services that stand in for the outside world on the default
stack (`paysaga run` starts them), like a payment provider's test mode. Each is runnable as
`python -m sandboxes.<name> --host H --port P --data-dir DIR`, keeps its own state under its
data directory, answers `/healthz`, and shows what it received on a small page at `/`."""
