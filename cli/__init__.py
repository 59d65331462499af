"""The `paysaga` command: `run` starts the whole system; the others talk to its REST API."""
