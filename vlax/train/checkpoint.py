"""Kept for imports written before checkpoints moved to :mod:`vlax.checkpoint` (inference must not need the
trainer)."""

from vlax.checkpoint import Checkpointer, checkpoints_dir  # noqa: F401
