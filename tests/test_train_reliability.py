"""The trainer under bad luck: a NaN batch, a signal, an exception mid-save, a changed config, a lost data-iterator
state, a corrupted shard, a URL workdir.

Most runs read the in-memory source of ``tests/train_worker.py`` (kind ``test_arrays``): 6 trajectories of 8
frames read in order, so batch k is trajectory k-1 and a NaN placed in trajectory 2 is met exactly at step 3.
Every run shares one model shape (byte tokenizer, 32 px, 4-dim state and action) and a persistent XLA compilation
cache, so only the first run of the module compiles.
"""

from __future__ import annotations

import ast
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorflow as tf

import train_worker
from train_helpers import tiny_config
from vlax.checkpoint import Checkpointer, as_path
from vlax.data import source_config

ROOT = Path(__file__).resolve().parents[1]
OPENED = train_worker.OPENED


@pytest.fixture(autouse=True)
def array_source_kind(monkeypatch):
    monkeypatch.setitem(source_config.SOURCE_KINDS, *train_worker.KIND)
    OPENED.clear()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the module: every run after the first loads its executables."""
    from jax._src import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    cc.reset_cache()
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    cc.reset_cache()


def array_config(workdir: Path, path: str = "frames=8", **train):
    c = tiny_config(workdir, Path("unused"), **train)
    c.data.sources = [{"kind": "test_arrays", "path": path, "name": "arrays"}]
    c.data.shuffle_buffer = 1  # frames in order: batch k is trajectory k-1
    c.data.augment = False
    c.model.tokenizer = "byte"
    return c


def _train(c) -> dict:
    from experiments.train import train

    return train(c)


def _all_finite(tree) -> bool:
    floats = [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
    assert floats, "no floating-point arrays restored"
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in floats)


def _leftovers(workdir: Path) -> list[str]:
    """Half-written orbax step directories (temporary names) anywhere under the workdir."""
    return [str(p) for p in Path(workdir).rglob("*") if "orbax-checkpoint-tmp" in p.name]


# ---- NaN / inf -----------------------------------------------------------------------------------------------------

def test_nan_at_step_3_is_named_and_never_saved(tmp_path):
    from vlax.train.nonfinite import NonFiniteLossError

    c = array_config(tmp_path / "run", "poison=2", steps=10, log_every=10, save_every=2, keep=5)
    with pytest.raises(NonFiniteLossError, match=r"not finite at step 3 ") as info:
        _train(c)
    assert "arrays" in str(info.value)  # the batch's datasets
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [2], "a checkpoint after the last finite step was written"
    assert _all_finite(ckpt.restore_raw(2))
    ckpt.close()
    assert sorted(p.name for p in (tmp_path / "run" / "data_iterators").iterdir()) == ["step_2"]
    assert not _leftovers(tmp_path / "run")


# ---- signals, handlers, exceptions ---------------------------------------------------------------------------------

def _writer_that(action, at_step: int):
    """A MetricWriter that runs ``action()`` when it writes ``at_step`` (inside the training loop)."""
    from vlax.train.metrics import MetricWriter

    class Writer(MetricWriter):
        def write(self, step, scalars):
            super().write(step, scalars)
            if step == at_step:
                action()

    return Writer


def test_sigint_saves_like_sigterm_and_handlers_come_back(tmp_path, monkeypatch, capsys):
    import experiments.train as train_module

    def mine(signum, frame):  # the caller's own handlers must be back once train() returns
        raise AssertionError("the test's handler ran during training")

    previous = {s: signal.signal(s, mine) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        monkeypatch.setattr(train_module, "MetricWriter",
                            _writer_that(lambda: os.kill(os.getpid(), signal.SIGINT), at_step=3))
        summary = _train(array_config(tmp_path / "run", steps=1000, save_every=1000))
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    assert summary["final_step"] == 3
    assert "stopping at step 3 (SIGINT); checkpoint saved" in capsys.readouterr().out
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [3] and ckpt.read_json(3, "data")["step"] == 3
    ckpt.close()
    assert (tmp_path / "run" / "data_iterators" / "step_3" / "host_0" / "iterator.index").exists()


def test_exception_in_the_loop_waits_for_the_async_save(tmp_path, monkeypatch):
    import experiments.train as train_module

    def fail():
        raise RuntimeError("boom at step 3")

    monkeypatch.setattr(train_module, "MetricWriter", _writer_that(fail, at_step=3))
    with pytest.raises(RuntimeError, match="boom at step 3"):
        _train(array_config(tmp_path / "run", steps=1000, save_every=2))
    assert signal.getsignal(signal.SIGTERM) is not None and not _leftovers(tmp_path / "run")
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    assert ckpt.all_steps() == [2]
    assert _all_finite(ckpt.restore_raw(2))  # complete: every array reads back
    ckpt.close()


# ---- resuming ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_step_run(tmp_path_factory):
    """A workdir holding a clean run's checkpoint at step 2 (copied by each test that resumes it)."""
    workdir = tmp_path_factory.mktemp("two_steps") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(source_config.SOURCE_KINDS, *train_worker.KIND)
        _train(array_config(workdir, steps=2, save_every=2))
    return workdir


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def test_resume_with_another_head_says_so_before_reading_data(tmp_path, two_step_run):
    from vlax.train.resume import ResumeConfigError

    workdir = _copy(two_step_run, tmp_path / "run")
    OPENED.clear()
    c = array_config(workdir, steps=4, save_every=2)
    c.model.head = "flow"
    with pytest.raises(ResumeConfigError) as info:
        _train(c)
    message = str(info.value)
    assert "model.head: saved 'chunk', now 'flow'" in message
    assert "--config.workdir=" in message and f"--config.finetune.checkpoint={workdir}" in message
    assert OPENED == [], "the data source was opened before the config check"

    summary = _train(array_config(workdir, steps=4, save_every=2))  # only train.steps changed: resumes
    assert summary["final_step"] == 4 and len(summary["losses"]) == 2


def test_resume_without_the_data_iterator_state_needs_the_flag(tmp_path, two_step_run, capsys):
    workdir = _copy(two_step_run, tmp_path / "run")
    shutil.rmtree(workdir / "data_iterators" / "step_2")
    with pytest.raises(FileNotFoundError, match=r"--config\.train\.resume_without_data_state=True"):
        _train(array_config(workdir, steps=3, save_every=2))

    c = array_config(workdir, steps=3, save_every=2)
    c.train.resume_without_data_state = True
    summary = _train(c)
    assert summary["final_step"] == 3 and "resumed from step 2" in capsys.readouterr().out


# ---- a corrupted TFRecord ------------------------------------------------------------------------------------------

def test_corrupted_tfrecord_names_the_file_and_ignore_errors_trains(tmp_path, tiny_metaworld):
    from vlax.data.rlds_reader import CorruptedDataError

    data = tmp_path / "data"
    shutil.copytree(tiny_metaworld, data)
    shards = sorted(p for p in data.rglob("*.tfrecord*") if p.is_file())
    damaged = shards[-1]
    raw = bytearray(damaged.read_bytes())
    at = len(raw) * 9 // 10  # late in the file: the episodes before it stay readable for ignore_errors
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])  # same size, other bytes
    damaged.write_bytes(bytes(raw))

    c = array_config(tmp_path / "run", steps=2, save_every=1000)
    c.data.sources = [{"kind": "rlds", "path": str(data / "metaworld_experts"), "name": "metaworld"}]
    with pytest.raises(CorruptedDataError, match=damaged.name) as info:
        _train(c)
    assert str(damaged) in str(info.value)

    c.data.sources = [{"kind": "rlds", "path": str(data / "metaworld_experts"), "name": "metaworld",
                       "ignore_errors": True}]
    c.workdir = str(tmp_path / "run_ignoring")
    summary = _train(c)
    assert summary["final_step"] == 2 and np.all(np.isfinite(summary["losses"]))


# ---- cloud paths ---------------------------------------------------------------------------------------------------

def test_as_path_keeps_urls():
    for url in ("gs://bucket/run", "s3://bucket/run"):
        path = as_path(url)
        assert str(path) == url and os.fspath(path) == url
        assert str(path / "checkpoints" / "7") == f"{url}/checkpoints/7"
    assert str(as_path("relative/run")) == os.path.abspath("relative/run")


TRAINER_FILES = ("experiments/train.py", "vlax/checkpoint.py", "vlax/train/data_iterator.py",
                 "vlax/train/metrics.py", "vlax/train/resume.py", "vlax/train/stopping.py")


@pytest.mark.parametrize("name", TRAINER_FILES)
def test_trainer_files_never_make_a_pathlib_path(name):
    """Workdirs, checkpoints, iterator states and metrics travel as ``epath.Path`` / strings: no ``pathlib`` and no
    ``os.path`` joins, which would turn ``gs://b/r`` into a local ``gs:/b/r``."""
    tree = ast.parse((ROOT / name).read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            bad += [f"line {node.lineno}: imports pathlib" for m in modules if m.split(".")[0] == "pathlib"]
        elif isinstance(node, ast.Attribute) and node.attr == "join" and ast.unparse(node.value) == "os.path":
            bad.append(f"line {node.lineno}: os.path.join")
    assert not bad, f"{name}: {bad}"


def test_data_iterator_state_keeps_a_url_directory(tmp_path, monkeypatch):
    """``file://`` is a URL tf.io writes locally: the state must land under it, not in a relative ``file:``
    directory of the working directory (what ``pathlib`` makes of a URL)."""
    from vlax.train.data_iterator import DataIterator

    monkeypatch.chdir(tmp_path)
    it = DataIterator(tf.data.Dataset.range(10).batch(2))
    next(it)
    url = f"file://{tmp_path}/state/step_1"
    prefix = it.save(url)
    assert prefix.startswith(url) and (tmp_path / "state" / "step_1" / "host_0" / "iterator.index").exists()
    assert not (tmp_path / "file:").exists()
    again = DataIterator(tf.data.Dataset.range(10).batch(2))
    again.restore(url)
    assert list(next(again)) == [2, 3]
