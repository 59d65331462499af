"""Sandbox services: real HTTP stand-ins for the outside world, run by `make run` and tests."""
