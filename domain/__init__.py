"""Domain types: plain, typed, framework-free (pydantic is only used for validation)."""
