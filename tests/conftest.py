"""Test-wide setup: 8 fake CPU devices before JAX initialises, no hub access, and caches in a temporary directory."""

import atexit
import os
import shutil
import tempfile

# Before any vlax import: vlax caches (statistics, file digests) default to ~/.cache/vlax, and tests must never
# write outside temporary directories. A run that sets VLAX_CACHE_DIR itself keeps its choice.
if not os.environ.get("VLAX_CACHE_DIR"):
    os.environ["VLAX_CACHE_DIR"] = tempfile.mkdtemp(prefix="vlax_test_cache_")
    atexit.register(shutil.rmtree, os.environ["VLAX_CACHE_DIR"], ignore_errors=True)

# Fake CPU devices: 8 for the tests marked `eight_devices` (sharding layouts, topology changes), 2 elsewhere via
# VLAX_TEST_DEVICES=2 (`make test` runs the two groups apart): partitioning a training step for 8 devices and running
# 8 device threads on 2 cores costs ~30 % more CPU than 2 devices (measured on the Helix fine-tuning test).
TEST_DEVICES = int(os.environ.get("VLAX_TEST_DEVICES", "8"))
from xla_flags import xla_flags  # noqa: E402

os.environ.setdefault("XLA_FLAGS", xla_flags(TEST_DEVICES))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MUJOCO_GL", "egl")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")

# One persistent XLA compilation cache per test run, shared by the xdist workers: many tests build the same tiny
# programs (one config trained by several tests, one model sampled by several), and each is then compiled once.
# Per run, never reused across runs, so a run's timing and results never depend on an earlier one.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"solo{os.getpid()}"
XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), f"vlax_test_xla_cache_{_RUN_ID}")
if not os.environ.get("VLAX_TEST_NO_XLA_CACHE"):
    jax.config.update("jax_compilation_cache_dir", XLA_CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    # the trainer / evaluator subprocesses that tests launch share it too (a resumed run loads its executables)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE_DIR)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "eight_devices: needs 8 (fake CPU) devices; run with VLAX_TEST_DEVICES=8 (the "
                                       "default)")


# The files that take longest, longest first. `make test` hands whole files to two workers in collection order, and
# alphabetical order put the heaviest (test_train_*) last, so one worker ran them alone while the other sat idle at
# the end; starting them first lets the many small files fill in around them.
HEAVY_FIRST = (
    "test_train_loop.py", "test_train_multiprocess.py", "test_inference_finetune.py", "test_preset_helix.py",
    "test_preset_openvla.py", "test_preset_octo.py", "test_train_reliability.py", "test_heads_learning.py",
    "test_readme.py", "test_eval_metaworld.py", "test_preset_rt2.py", "test_train_distributed.py",
    "test_preset_pi0_lerobot.py", "test_finetune_lerobot.py", "test_preset_diffusion_policy.py",
    "test_preset_smolvla.py", "test_preset_act.py", "test_eval_metaworld_cameras.py", "test_preset_roboflamingo.py",
    "test_finetune_rlds.py", "test_finetune_published.py", "test_heads_lifting.py",
)


@pytest.hookimpl(trylast=True)  # after -m has deselected
def pytest_collection_modifyitems(config, items):
    """The heavy files first (a stable sort: the order within a file and among the rest is kept). Selecting an
    eight-device test in a process with fewer devices is a usage error, not a confusing failure."""
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))
    devices = len(jax.devices())
    needing = [item.nodeid for item in items if item.get_closest_marker("eight_devices")]
    if needing and devices < 8:
        raise pytest.UsageError(f"{len(needing)} selected tests need 8 devices (e.g. {needing[0]}) but this run has "
                                f"{devices} (VLAX_TEST_DEVICES={TEST_DEVICES}); deselect them with "
                                "-m 'not eight_devices' or run with VLAX_TEST_DEVICES=8")


def pytest_sessionfinish(session):
    """The run's compilation cache goes with the run (removed by the controller, after every worker is done)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        shutil.rmtree(XLA_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_metaworld(tmp_path_factory):
    """A Meta-World RLDS dataset of 2 tasks x 2 expert episodes at 64 px, generated once per test session."""
    from vlax.envs.metaworld import generate_metaworld_dataset

    path = tmp_path_factory.mktemp("metaworld_tiny")
    generate_metaworld_dataset(str(path), tasks="reach,push", episodes_per_task=2, image_size=64,
                               cameras=("corner2",), num_workers=2)
    return path
