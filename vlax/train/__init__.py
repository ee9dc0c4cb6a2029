"""Training: mesh and sharding rules (more to come: optimizer, train state, loop, checkpoints)."""

from vlax.train.sharding import DEFAULT_RULES, batch_sharding, make_mesh, spec_for, state_shardings

__all__ = ["DEFAULT_RULES", "batch_sharding", "make_mesh", "spec_for", "state_shardings"]
