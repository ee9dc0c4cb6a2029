"""One process of the 2-process training test (run by tests/test_train_distributed.py)."""

import sys

import jax
import numpy as np

from vlax.train.distributed import global_batch, initialize


def main(port: str, process_id: int, out_path: str) -> None:
    initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from flax import nnx

    from test_train_state import Toy, loss_fn
    from vlax.train import make_mesh
    from vlax.train.optimizer import OptimizerConfig, make_optimizer
    from vlax.train.state import create_train_state, jit_train_step, make_train_step

    mesh = make_mesh(data=2)
    model = Toy(nnx.Rngs(0))
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1), nnx.state(model, nnx.Param))
    graphdef, state, shardings = create_train_state(model, tx, jax.random.key(7), mesh=mesh, use_ema=True)
    step = jit_train_step(make_train_step(graphdef, loss_fn, tx, ema_decay=0.9), shardings, mesh)
    rs = np.random.RandomState(0)
    losses = []
    for _ in range(5):
        full = {"x": rs.randn(8, 6, 32).astype(np.float32), "y": rs.randn(8, 6, 3).astype(np.float32)}
        local = {k: v[process_id * 4:(process_id + 1) * 4] for k, v in full.items()}  # this host's shard
        state, metrics = step(state, global_batch(local, mesh))
        losses.append(float(metrics["loss"]))
    np.save(out_path, np.array(losses))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
