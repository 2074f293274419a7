"""A third-party lowbit plugin package: a number format, a precision recipe and a positional encoding.

Nothing here is imported by ``import lowbit``: lowbit finds the plugins through this
distribution's entry points (``pyproject.toml``) and imports a module the first time a run asks
for one of its plugins.
"""
