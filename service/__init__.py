"""The application service: what every entry point asks of paysaga, in one place.

Start a payment (`start`), load it (`lookup`), ask it a follow-up (`follow_ups`): the REST API
(api/), the Kafka intake (intake/) and, through the API, the CLI (cli/) are thin adapters that
translate their protocol into these calls and their outcomes back. Nothing here knows HTTP or
Kafka; errors are this package's own exceptions, which each entry point maps to its answers.
"""
