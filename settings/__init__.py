"""The settings layer: every config section, the stage graph they are checked against, YAML
loading with ``extends``, ``key=value`` overrides and one-line errors.

It imports pydantic and PyYAML only, so any layer may import it (``hvae.models``,
``hvae.stages``, ``hvae.pipeline``) and a fully reused run plans without torch or Ray.
"""
