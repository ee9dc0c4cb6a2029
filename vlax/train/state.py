"""Train state and the sharded, jitted train step.

The model lives as ``graphdef`` + pure parameter arrays, so the step is a pure function that ``jax.jit`` compiles
once with explicit in/out shardings and a donated state (no Python walk of the module graph per step).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlax.train.optimizer import ema_update
from vlax.train.sharding import DEFAULT_RULES, FSDP_MIN_BYTES, spec_for, state_shardings

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jax.Array, dict]]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # nnx.State of the trainable nnx.Param variables
    rest: Any            # every other variable of the model (kept, not trained)
    opt_state: Any
    rng: jax.Array       # base key; step keys are fold_in(rng, step), so a resumed run draws the same numbers
    ema: Any = None


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Any, Any]:
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def place(tree: Any, shardings: Any) -> Any:
    """Lay out ``tree`` (identical on every host) with ``shardings``; works across processes, unlike device_put."""
    return jax.jit(lambda x: x, out_shardings=shardings)(tree)


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, rng: jax.Array, *,
                       mesh: Mesh | None = None, use_ema: bool = False) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, state_shardings)`` from a model already built on the host; with a mesh, parameters are
    placed by the logical-axis rules. For models that should never exist whole on one host (anything large, any
    multi-host run) use :func:`create_train_state_sharded`, which builds them in place."""
    graphdef, params, rest = split_model(model)
    if mesh is not None:
        params = place(params, state_shardings(params, mesh))
        rest = place(rest, state_shardings(rest, mesh))
    opt_state = jax.jit(tx.init)(params)  # moments inherit the parameters' shardings
    if mesh is not None:  # scalars (step counts) come back on one device: replicate them
        replicated = NamedSharding(mesh, PartitionSpec())
        opt_state = place(opt_state, jax.tree.map(
            lambda x: x.sharding if isinstance(getattr(x, "sharding", None), NamedSharding) else replicated,
            opt_state))
    ema = jax.tree.map(jnp.copy, params) if use_ema else None
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, rest=rest, opt_state=opt_state,
                       rng=rng, ema=ema)
    if mesh is not None:
        replicated = NamedSharding(mesh, PartitionSpec())
        state = state.replace(step=place(state.step, replicated), rng=place(rng, replicated))
    shardings = jax.tree.map(lambda x: x.sharding, state) if mesh is not None else None
    return graphdef, state, shardings


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def abstract_shardings(tree: Any, mesh: Mesh, *, rules=DEFAULT_RULES, fsdp_min_bytes: int = FSDP_MIN_BYTES) -> Any:
    """``NamedSharding`` per leaf of an abstract (or concrete) state tree: variables by their logical axes
    (:func:`vlax.train.sharding.state_shardings`); other arrays (optimizer leaves that lost their variable) by FSDP
    alone; scalars, RNG keys and anything small replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if isinstance(x, nnx.Variable):
            if not hasattr(x.get_value(), "shape"):  # e.g. optax's MaskedNode for a frozen leaf: holds no array
                return x
            if _is_key(x.get_value()):
                return x.replace(replicated)
            return state_shardings(x, mesh, rules=rules, fsdp_min_bytes=fsdp_min_bytes)
        if not hasattr(x, "shape") or _is_key(x) or not np.shape(x):
            return replicated
        spec = spec_for(x.shape, [None] * len(x.shape), mesh, rules=rules, itemsize=np.dtype(x.dtype).itemsize,
                        fsdp_min_bytes=fsdp_min_bytes)
        return NamedSharding(mesh, spec)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_train_state_sharded(build_fn: Callable[[], nnx.Module], tx: optax.GradientTransformation,
                               rng: jax.Array, *, mesh: Mesh | None = None, use_ema: bool = False,
                               rules=DEFAULT_RULES, fsdp_min_bytes: int = FSDP_MIN_BYTES,
                               ) -> tuple[nnx.GraphDef, TrainState, Any]:
    """``(graphdef, state, state_shardings)`` with every array created directly in its sharding.

    ``build_fn() -> nnx.Module`` builds the model (it must create its own ``nnx.Rngs`` from a fixed seed, so the
    values do not depend on the layout). The model is first built abstractly (``nnx.eval_shape``: shapes and
    logical axes only), the layout is computed from that, then ONE ``jax.jit`` with ``out_shardings`` builds the
    module, splits it, and initialises the optimizer state and EMA: each device computes only its shards, no host
    ever holds the whole tree, and every process of a multi-host run executes the same program on the global mesh.
    With ``mesh=None`` the same jit runs on the default device.
    """
    typed = _is_key(rng)
    # A host constant, not an argument: every process passes the same numbers, no cross-host input placement.
    rng_data = np.asarray(jax.random.key_data(rng) if typed else rng)
    impl = jax.random.key_impl(rng) if typed else None

    def init() -> TrainState:
        _, params, rest = split_model(build_fn())
        key = jax.random.wrap_key_data(rng_data, impl=impl) if typed else jnp.asarray(rng_data)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest, opt_state=tx.init(params),
                          rng=key, ema=jax.tree.map(jnp.copy, params) if use_ema else None)

    graphdef = split_model(nnx.eval_shape(build_fn))[0]
    if mesh is None:
        return graphdef, jax.jit(init)(), None
    abstract = jax.eval_shape(init)
    shardings = abstract_shardings(abstract, mesh, rules=rules, fsdp_min_bytes=fsdp_min_bytes)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, jax.tree.map(lambda x: x.sharding, state)


def module_norms(grads: Any, updates: Any, params: Any) -> dict:
    """Per top-level module (encoder, backbone, head, ...): ``grad_norm/<module>`` and ``update_ratio/<module>``,
    the norm of the step's update over the norm of the parameters. A module whose ratio stays orders of magnitude
    below the others' is barely learning, which the global gradient norm hides."""
    updates, params = nnx.to_pure_dict(updates), nnx.to_pure_dict(params)
    out = {}
    for name, grad in nnx.to_pure_dict(grads).items():
        out[f"grad_norm/{name}"] = optax.tree.norm(grad)
        out[f"update_ratio/{name}"] = optax.tree.norm(updates[name]) / jnp.maximum(optax.tree.norm(params[name]), 1e-12)
    return out


def make_train_step(graphdef: nnx.GraphDef, loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    ema_decay: float | None = None, learning_rate_fn: Callable | None = None):
    """Pure ``step(state, batch) -> (state, metrics)``; jit it with :func:`jit_train_step`."""

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        step_rng = jax.random.fold_in(state.rng, state.step)

        def compute(params):
            model = nnx.merge(graphdef, params, state.rest)
            return loss_fn(model, batch, step_rng)

        (loss, metrics), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, ema_decay) if state.ema is not None and ema_decay else state.ema
        metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                       **module_norms(grads, updates, state.params))
        if learning_rate_fn is not None:
            metrics["learning_rate"] = learning_rate_fn(state.step)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new_state, metrics

    return step


def jit_train_step(step_fn, state_shardings_tree: Any = None, mesh: Mesh | None = None):
    """``jax.jit`` of the step with the state donated; with a mesh, every batch leaf is split on its leading axis
    over ``data`` x ``fsdp`` and the state keeps its shardings. The result has ``.lower()`` for cost analysis."""
    if mesh is None:
        return jax.jit(step_fn, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))  # a prefix spec: trailing axes replicated
    return jax.jit(step_fn, donate_argnums=0, in_shardings=(state_shardings_tree, batch),
                   out_shardings=(state_shardings_tree, replicated))


def check_finite(step: int, metrics: dict) -> None:
    """Stop a run on a NaN/inf loss, naming the step."""
    loss = float(metrics["loss"])
    if not jnp.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; stopping (last checkpoint is intact)")
