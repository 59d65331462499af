"""The one error a service paysaga needs raises when it cannot be reached or set up."""

from __future__ import annotations


class StackError(RuntimeError):
    """A part of the stack cannot start or be set up; the message says what to do."""
