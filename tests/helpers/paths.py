"""Where things are, for tests that read the repository's files or run a process in it: one
root computed once, so a test module can move between tests/ folders without its paths moving.

Pure path arithmetic on the (absolute) module path, no `resolve()`: test modules that define
workflows import this inside Temporal's workflow sandbox, which refuses filesystem calls."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).parents[2]
