"""Plain Flax Linen model definitions (no adapter code is imported here)."""

from oftjax.models import gemma

__all__ = ["gemma"]
