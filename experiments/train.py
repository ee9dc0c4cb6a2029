"""Train a VLA from a config, on one CPU, one GPU or every host of a TPU pod (the same code everywhere).

    python -m experiments.train --config=experiments/configs/metaworld.py:tiny --config.model.head=flow

Resumes from the newest checkpoint in ``config.workdir`` (parameters, optimizer, RNG and data position exactly);
SIGTERM saves a checkpoint before exiting; a NaN/inf loss stops the run naming the step.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlax import data as vdata  # noqa: E402
from vlax.build import build_policy, policy_spec  # noqa: E402
from vlax.nn import count_params  # noqa: E402
from vlax.tokenizers import WordTokenizer, tokenizer_from_json  # noqa: E402
from vlax.train import distributed  # noqa: E402
from vlax.train.batch import model_batch  # noqa: E402
from vlax.checkpoint import Checkpointer  # noqa: E402
from vlax.train.data_iterator import DataIterator  # noqa: E402
from vlax.train.finetune import transplant  # noqa: E402
from vlax.train.flops import count_flops  # noqa: E402
from vlax.train.metrics import MetricWriter, matmul_peak, memory_report  # noqa: E402
from vlax.train.optimizer import OptimizerConfig, frozen_paths, make_optimizer, schedule  # noqa: E402
from vlax.train.sharding import make_mesh  # noqa: E402
from vlax.train.state import check_finite, create_train_state, jit_train_step, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path[:variant])")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")


# ---- pieces of a run ---------------------------------------------------------------------------------------------

def generate_dataset(cfg: ml_collections.ConfigDict) -> str:
    """The configured Meta-World dataset's directory, generated on first use and reused afterwards."""
    return vdata.generate_metaworld_dataset(
        cfg.data.dir, tasks=cfg.data.tasks, episodes_per_task=cfg.data.episodes_per_task,
        image_size=cfg.data.generate_image_size, cameras=(cfg.data.camera,), num_workers=cfg.data.num_workers)


def prepare_data(cfg: ml_collections.ConfigDict, *, train: bool = True, expected_artifact=None):
    """Generate (or reuse) the Meta-World dataset and build this host's pipeline."""
    if jax.process_index() == 0:
        path = generate_dataset(cfg)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("dataset ready")
        path = generate_dataset(cfg)  # every host now finds it and reuses it
    if cfg.data.batch_size % jax.process_count():
        raise ValueError(f"batch_size {cfg.data.batch_size} is not divisible by {jax.process_count()} processes")
    data_config = vdata.DataConfig(
        batch_size=cfg.data.batch_size // jax.process_count(), action_horizon=cfg.data.action_horizon,
        image_size=cfg.data.image_size, normalization=cfg.data.normalization, augment=cfg.data.augment,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, train=train)
    source = vdata.metaworld_source(path)
    expected = None if expected_artifact is None else {source.name: expected_artifact}
    pipeline = vdata.build_pipeline([source], data_config, process_index=jax.process_index(),
                                    process_count=jax.process_count(), expected_artifacts=expected)
    return pipeline, pipeline.artifacts[source.name]


def task_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """The configured tasks (``mt10``, ``mt50`` or names, with or without ``-v3``); unknown names are an error."""
    from vlax.envs.metaworld.task_sets import resolve_tasks

    return list(resolve_tasks(cfg.data.tasks))


def make_tokenizer(cfg: ml_collections.ConfigDict) -> WordTokenizer:
    """A word vocabulary over every instruction template of the configured tasks (saved with the checkpoint)."""
    return WordTokenizer.build(text for task in task_names(cfg) for text in vdata.INSTRUCTIONS[task])


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps,
                           weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm or None,
                           accumulate_steps=o.accumulate_steps, freeze=o.freeze or None, groups=tuple(o.groups))


def loss_fn(model, batch: dict, rng: jax.Array):
    return model.loss(batch["obs"], batch["actions"], action_mask=batch["action_mask"], rngs=rng, train=True)


def load_finetune_params(cfg: ml_collections.ConfigDict, state) -> Any:
    """Parameters from ``finetune.checkpoint`` moved into this model (re-initialising ``finetune.reinit``)."""
    source = Path(cfg.finetune.checkpoint)
    ckpt = Checkpointer(source / "checkpoints" if (source / "checkpoints").exists() else source)
    step = ckpt.latest_step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {source} to fine-tune from")
    raw = ckpt.restore_raw(step)
    params, reinit, unused = transplant(nnx.to_pure_dict(state.params), raw["params"], cfg.finetune.reinit)
    print(f"fine-tuning from {source} step {step}: re-initialised {len(reinit)} parameters "
          f"{reinit[:12]}{' ...' if len(reinit) > 12 else ''}; {len(unused)} checkpoint parameters unused")
    new = jax.tree.map(lambda old, p: jax.device_put(np.asarray(p, old.dtype), old.sharding),
                       nnx.to_pure_dict(state.params), params)
    nnx.replace_by_pure_dict(state.params, new)
    return state


# ---- the run -----------------------------------------------------------------------------------------------------

def train(cfg: ml_collections.ConfigDict) -> dict:
    """Run (or resume) training; returns a summary (final loss, steps/s, parameter count, ...)."""
    workdir = Path(cfg.workdir)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep)
    resume_step = ckpt.latest_step

    # What a checkpoint carries wins over what the config would build afresh.
    expected_artifact = tokenizer = None
    if resume_step is not None:
        saved = ckpt.read_json(resume_step, "normalization")
        expected_artifact = vdata.NormalizationArtifact.from_dict(saved)
        tokenizer = tokenizer_from_json(ckpt.read_json(resume_step, "tokenizer"))
    pipeline, artifact = prepare_data(cfg, expected_artifact=expected_artifact)
    tokenizer = tokenizer or make_tokenizer(cfg)
    spec = policy_spec(cfg)

    mesh = make_mesh(**cfg.mesh)
    policy = build_policy(cfg.model, spec, tokenizer.vocab_size, nnx.Rngs(cfg.seed))
    opt_cfg = optimizer_config(cfg)
    tx = make_optimizer(opt_cfg, nnx.state(policy, nnx.Param))
    graphdef, state, shardings = create_train_state(policy, tx, jax.random.key(cfg.seed), mesh=mesh,
                                                    use_ema=cfg.train.ema_decay > 0)
    del policy
    num_params = count_params(state.params)
    if opt_cfg.freeze:
        print(f"frozen: {len(frozen_paths(nnx.to_pure_dict(state.params), opt_cfg))} parameter arrays")

    data_iter = DataIterator(pipeline.dataset)
    start = 0
    if resume_step is not None:
        start, state, _ = ckpt.restore_latest(state)
        data_iter.restore(workdir / "data_iterators" / f"step_{start}")
        print(f"resumed from step {start}")
    elif cfg.finetune.checkpoint:
        state = load_finetune_params(cfg, state)

    pure_step = make_train_step(graphdef, loss_fn, tx, ema_decay=cfg.train.ema_decay or None,
                                learning_rate_fn=schedule(opt_cfg))
    step_fn = jit_train_step(pure_step, shardings, mesh)

    def next_batch():
        return distributed.global_batch(model_batch(next(data_iter), spec, tokenizer), mesh)

    batch = next_batch()
    compiled = step_fn.lower(state, batch).compile()
    flops_per_step = count_flops(pure_step, state, batch)  # matmul/conv FLOPs, scanned layers counted per layer
    peak = matmul_peak()
    print(f"{cfg.model.head} policy: {num_params / 1e6:.2f}M parameters, {flops_per_step / 1e9:.2f} GFLOP/step, "
          f"{memory_report(compiled, state)}")

    def save(step: int) -> None:
        data_iter.save(workdir / "data_iterators" / f"step_{step}")
        ckpt.save(step, state, force=True, config=json.loads(cfg.to_json_best_effort()),
                  normalization=artifact.to_dict(), tokenizer=tokenizer.to_json(),
                  data={"step": step, "iterator": f"data_iterators/step_{step}"})
        _prune_iterators(workdir, ckpt, keep_also=step)

    stop = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("sigterm", True))
    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard)
    deadline = time.time() + 60 * cfg.train.max_minutes if cfg.train.max_minutes > 0 else None
    losses, t_last, steps_since = [], time.perf_counter(), 0
    step = start
    while step < cfg.train.steps:
        state, metrics = compiled(state, batch)
        step += 1
        steps_since += 1
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics = jax.device_get(metrics)
            check_finite(step, metrics)
            elapsed = time.perf_counter() - t_last
            rate = steps_since / elapsed
            metrics.update(steps_per_s=rate, examples_per_s=rate * cfg.data.batch_size,
                           flop_utilisation=flops_per_step * rate / (peak * jax.device_count()))
            writer.write(step, metrics)
            losses.append(float(metrics["loss"]))
            print(f"step {step:6d}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
                  f"lr {metrics['learning_rate']:.2e}  {rate:.2f} steps/s  "
                  f"util {metrics['flop_utilisation']:.1%}", flush=True)
            t_last, steps_since = time.perf_counter(), 0
        if step % cfg.train.save_every == 0 or stop["sigterm"] or (deadline and time.time() > deadline):
            save(step)
        if stop["sigterm"] or (deadline and time.time() > deadline):
            print(f"stopping at step {step} ({'SIGTERM' if stop['sigterm'] else 'time budget'}); checkpoint saved")
            break
        if step < cfg.train.steps:
            batch = next_batch()
    if step == cfg.train.steps and step % cfg.train.save_every:
        save(step)
    ckpt.wait()
    ckpt.close()
    return {"final_step": step, "losses": losses, "num_params": num_params, "flops_per_step": flops_per_step}


def _prune_iterators(workdir: Path, ckpt: Checkpointer, keep_also: int) -> None:
    """Drop data-iterator states whose checkpoint step was pruned."""
    import shutil

    keep = set(ckpt.all_steps()) | {keep_also}
    for d in (workdir / "data_iterators").glob("step_*"):
        if int(d.name.split("_")[1]) not in keep:
            shutil.rmtree(d, ignore_errors=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress goes to stdout; checkpoint libraries log every file at INFO
    distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    summary = train(_CONFIG.value)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
