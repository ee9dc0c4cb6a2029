"""Parameters are created in their shardings: no transfer, each device computes only its shards, same values.

A tiny Meta-World policy on the 8 forced CPU devices, mesh data x fsdp x tensor = 1 x 4 x 2, with the FSDP
threshold lowered so most arrays are split over ``fsdp`` as well as by the tensor rules.
"""

import jax
import numpy as np
import pytest
from flax import nnx

from train_helpers import tiny_config
from vlax.build import build_policy, policy_spec
from vlax.train.optimizer import OptimizerConfig, make_optimizer
from vlax.train.sharding import make_mesh, state_shardings
from vlax.train.state import create_train_state, create_train_state_sharded
from xla_flags import xla_flags

pytestmark = pytest.mark.eight_devices  # sharding layouts over an 8-device mesh

FSDP_MIN_BYTES = 4096


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    c = tiny_config(tmp_path_factory.mktemp("w"), tmp_path_factory.mktemp("d"))
    spec = policy_spec(c)

    def build():
        return build_policy(c.model, spec, 40, nnx.Rngs(0))

    abstract = nnx.eval_shape(build)
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-3, warmup_steps=1), nnx.state(abstract, nnx.Param))
    mesh = make_mesh(1, 4, 2)
    key = jax.random.key(3)  # made before the guard: creating a key is itself a host-to-device transfer
    with jax.transfer_guard("disallow"):
        graphdef, state, shardings = create_train_state_sharded(build, tx, key, mesh=mesh, use_ema=True,
                                                                fsdp_min_bytes=FSDP_MIN_BYTES)
        jax.block_until_ready(state)
    return dict(build=build, abstract=abstract, tx=tx, mesh=mesh, key=key, graphdef=graphdef, state=state,
                shardings=shardings)


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_every_array_has_its_sharding_and_each_device_holds_only_its_shard(setup):
    state, mesh = setup["state"], setup["mesh"]
    expected = _flat(state_shardings(nnx.state(setup["abstract"], nnx.Param), mesh, fsdp_min_bytes=FSDP_MIN_BYTES))
    params = _flat(state.params)
    assert params.keys() == expected.keys() and len(params) > 20
    split_both = 0
    for name, x in params.items():
        assert x.sharding == expected[name], name
        shard_shape = x.sharding.shard_shape(x.shape)
        assert all(s.data.shape == shard_shape for s in x.addressable_shards), name
        assert len(x.addressable_shards) == 8
        if "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)) and "tensor" in jax.tree.leaves(tuple(x.sharding.spec)):
            split_both += 1  # an eighth of the array on each device, and the eight eighths are distinct
            assert int(np.prod(shard_shape)) * 8 == x.size, name
            assert len({tuple((sl.start, sl.stop) for sl in s.index) for s in x.addressable_shards}) == 8
    assert split_both >= 4
    big = [n for n, x in params.items() if x.nbytes >= FSDP_MIN_BYTES and x.ndim >= 2]
    assert big and all("fsdp" in str(params[n].sharding.spec) for n in big if max(params[n].shape) % 4 == 0)
    # optimizer moments and EMA: the same layout as their parameter; step and RNG replicated
    moments = 0
    for leaf_name, x in _flat(state.opt_state).items():
        for name in params:
            if leaf_name.endswith(name) and x.shape == params[name].shape:
                assert x.sharding == params[name].sharding, leaf_name
                moments += 1
    assert moments == 2 * len(params)  # mu and nu of every parameter
    for name, x in _flat(state.ema).items():
        assert x.sharding == params[name].sharding, name
    assert state.step.sharding.is_fully_replicated and state.rng.sharding.is_fully_replicated


def test_values_equal_the_unsharded_init(setup):
    """Bit-identical to the same jitted init on one device (threefry draws do not depend on the layout), and to
    the eager host-built model of :func:`create_train_state` within one float32 ulp (XLA folds an initializer's
    scale into the jitted draw)."""
    _, single, _ = create_train_state_sharded(setup["build"], setup["tx"], setup["key"], mesh=None, use_ema=True)
    sharded = _flat(jax.device_get(setup["state"].params))
    for name, x in _flat(jax.device_get(single.params)).items():
        np.testing.assert_array_equal(sharded[name], x, err_msg=name)
    for name, x in _flat(jax.device_get(setup["state"].ema)).items():
        np.testing.assert_array_equal(sharded[name], x, err_msg=name)
    _, host, _ = create_train_state(setup["build"](), setup["tx"], setup["key"], use_ema=True)
    for name, x in _flat(jax.device_get(host.params)).items():
        np.testing.assert_allclose(sharded[name], x, rtol=2 ** -23, atol=1e-8, err_msg=name)
    np.testing.assert_array_equal(jax.random.key_data(setup["state"].rng), jax.random.key_data(host.rng))
    # the trainer's jit_train_step takes these shardings: same tree as the state's
    assert jax.tree.structure(setup["shardings"]) == jax.tree.structure(setup["state"])


def test_finetune_transplant_lands_on_the_policys_shardings(setup):
    """A checkpoint's parameters (host arrays, as restored raw) moved into the sharded policy, head re-initialised:
    every array on its sharding, values copied exactly, head kept as initialised."""
    from vlax.train.finetune import transplant_sharded

    state = setup["state"]
    target = nnx.to_pure_dict(state.params)
    rs = np.random.RandomState(0)
    source = jax.tree.map(lambda x: rs.randn(*x.shape).astype(np.float32), target)
    params, reinit, unused = transplant_sharded(target, source, reinit=r"^head/")
    assert reinit and all(n.startswith("head/") for n in reinit) and unused == reinit
    flat_new, flat_src, flat_old = _flat(params), _flat(source), _flat(target)
    for name, x in flat_new.items():
        assert x.sharding == flat_old[name].sharding, name
        if name.startswith("['head']"):
            assert x is flat_old[name]
        else:
            np.testing.assert_array_equal(np.asarray(x), flat_src[name], err_msg=name)
    copy = jax.tree.map(lambda x: x, state.params)  # a fresh State: the fixture's stays as initialised
    nnx.replace_by_pure_dict(copy, params)  # how the trainer installs them
    embedding = params["backbone"]["embed_tokens"]["embedding"]
    assert _flat(copy)["['backbone']['embed_tokens']['embedding'].value"] is embedding


def test_published_size_policy_estimates_abstractly_in_seconds():
    """OpenVLA's layout (Llama-2-7B on DINOv2 + SigLIP) is built abstractly: Llama-2-7B's published count, and a
    per-device state that is the parameters split over the mesh (Adam's two float32 moments, EMA, gradients)."""
    import time

    from experiments.estimate_memory import backbone_params, estimate, openvla_model, report

    start = time.perf_counter()
    model, spec, vocab = openvla_model()
    result = estimate(model, spec, vocab, fsdp=4, tensor=2, use_ema=True)
    assert time.perf_counter() - start < 60  # abstract: seconds, nothing allocated
    assert result["components"]["backbone"] == backbone_params("llama2_7b") == 6_738_415_616
    assert result["num_params"] > 7.4e9
    d, total = result["per_device_bytes"], result["total_bytes"]
    assert total["params"] == 4 * result["num_params"]  # float32 parameters
    assert total["params"] / 8 <= d["params"] < 1.01 * total["params"] / 8  # split 8 ways, little replicated
    assert abs(d["optimizer"] - 2 * d["params"]) < 1024 and d["ema"] == d["params"] == d["gradients"]
    assert "GiB" in report(result, 16)


WORKER = '''
import json, os, sys
os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"  # the parent's compile flags kept
import jax
import numpy as np
from vlax.train.distributed import initialize

port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from flax import nnx
from test_train_state import Toy
from vlax.train import make_mesh
from vlax.train.optimizer import OptimizerConfig, make_optimizer
from vlax.train.state import create_train_state_sharded

build = lambda: Toy(nnx.Rngs(0))
tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1), nnx.state(nnx.eval_shape(build), nnx.Param))
mesh = make_mesh(1, 2, 2)  # fsdp spans the two processes
key = jax.random.key(7)
with jax.transfer_guard("disallow"):
    _, state, _ = create_train_state_sharded(build, tx, key, mesh=mesh, use_ema=True, fsdp_min_bytes=1024)
shards = {}
for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
    assert not x.is_fully_addressable  # one global array over both processes' devices
    for s in x.addressable_shards:
        bounds = [[sl.start, sl.stop] for sl in s.index]
        shards[f"{jax.tree_util.keystr(path)}|{json.dumps(bounds)}"] = np.asarray(s.data)
np.savez(out, **{str(i): v for i, v in enumerate(shards.values())}, names=np.array(list(shards)))
'''


def test_two_processes_create_their_own_shards(tmp_path):
    """Two processes (2 CPU devices each) on one global 1 x 2 x 2 mesh: each builds only the shards of its own
    devices, and those equal the same slices of the one-process init."""
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from test_train_state import Toy
    from vlax.train.optimizer import OptimizerConfig, make_optimizer

    here = Path(__file__).resolve().parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, XLA_FLAGS=xla_flags())  # the same compile flags as this process: equal init values
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent)])
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), port, str(i), str(tmp_path / f"{i}.npz")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]

    build = lambda: Toy(nnx.Rngs(0))  # noqa: E731
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                        nnx.state(nnx.eval_shape(build), nnx.Param))
    _, single, _ = create_train_state_sharded(build, tx, jax.random.key(7), mesh=None, use_ema=True)
    reference = {jax.tree_util.keystr(p): np.asarray(x)
                 for p, x in jax.tree_util.tree_flatten_with_path(single.params)[0]}
    split = 0
    for i in range(2):
        saved = np.load(tmp_path / f"{i}.npz")
        for j, name in enumerate(saved["names"]):
            path, index = name.split("|")
            full = reference[path]
            part = saved[str(j)]
            np.testing.assert_array_equal(part, full[tuple(slice(a, b) for a, b in json.loads(index))], err_msg=name)
            split += part.size < full.size
    assert split > 0  # some arrays really were cut between the processes


def test_frozen_accumulating_optimizer_state_is_laid_out_and_trains_like_the_host_path():
    """Optimizer states with frozen (masked) leaves, gradient accumulation and clipping get shardings too, and the
    trainer's jitted step runs on them to the losses of the host-built state."""
    from test_train_state import Toy, loss_fn
    from vlax.train.state import jit_train_step, make_train_step

    build = lambda: Toy(nnx.Rngs(0))  # noqa: E731
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, accumulate_steps=2, freeze="^out/", grad_clip_norm=1.0)
    tx = make_optimizer(cfg, nnx.state(nnx.eval_shape(build), nnx.Param))
    mesh = make_mesh(2, 2, 2)
    losses = {}
    for name in ("sharded", "host"):
        if name == "sharded":
            graphdef, state, shardings = create_train_state_sharded(build, tx, jax.random.key(1), mesh=mesh,
                                                                    use_ema=True, fsdp_min_bytes=1024)
        else:
            graphdef, state, shardings = create_train_state(build(), tx, jax.random.key(1), mesh=mesh, use_ema=True)
        step = jit_train_step(make_train_step(graphdef, loss_fn, tx, ema_decay=0.9), shardings, mesh)
        rs, out = np.random.RandomState(0), []
        for _ in range(4):
            state, metrics = step(state, {"x": rs.randn(8, 6, 32).astype(np.float32),
                                          "y": rs.randn(8, 6, 3).astype(np.float32)})
            out.append(float(metrics["loss"]))
        losses[name] = out
    np.testing.assert_allclose(losses["sharded"], losses["host"], rtol=1e-5)
