"""Developer scripts, run with `python -m scripts.<name>`; not shipped in the image.

record_histories.py records the workflow histories tests/workflows/test_replay.py replays.
"""
