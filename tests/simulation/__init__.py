"""The saga's randomized simulation ("our VOPR"): a seeded script of payments and follow-ups run
concurrently against the real API, worker, ledger and broker, judged by an oracle."""
