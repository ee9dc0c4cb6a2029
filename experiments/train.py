"""Train a VLA from a config, on one CPU, one GPU or every host of a TPU pod / GPU cluster (the same code everywhere).

    python -m experiments.train --config=experiments/configs/metaworld.py:tiny --config.model.head=flow
    python -m experiments.train --config=experiments/configs/finetune.py:tiny \\
        --config.data.sources[0].path=/data/my_lerobot_ds --config.workdir=runs/my_arm

Everything is checked before any data is read: component names, data sources, dims. Resumes from the newest
checkpoint in ``config.workdir`` (parameters, optimizer, RNG and data position exactly); SIGTERM / SIGINT or the
time budget save a checkpoint at a step every host agrees on; a NaN/inf loss stops the run naming the step and its
batch, and a non-finite state is never saved.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import collections  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vlax import data as vdata  # noqa: E402
from vlax.build import build_policy, check_components, policy_spec  # noqa: E402
from vlax.checkpoint import Checkpointer, as_path, checkpoints_dir  # noqa: E402
from vlax.data.source_config import check_sources, open_source  # noqa: E402
from vlax.eval.open_loop import open_loop_metrics  # noqa: E402
from vlax.nn import count_params  # noqa: E402
from vlax.observation import ObservationPipeline, read_artifacts  # noqa: E402
from vlax.prompts import get_prompt, tokenize_prompts  # noqa: E402
from vlax.tokenizers import ByteTokenizer, Tokenizer, WordTokenizer, load_tokenizer, tokenizer_from_json  # noqa: E402
from vlax.train import distributed  # noqa: E402
from vlax.train.augment import shift_cameras  # noqa: E402
from vlax.train.data_iterator import DataIterator  # noqa: E402
from vlax.train.finetune import check_transplant, transplant_sharded  # noqa: E402
from vlax.train.flops import count_flops  # noqa: E402
from vlax.train.metrics import MetricWriter, matmul_peak, memory_report  # noqa: E402
from vlax.train.nonfinite import NonFiniteLossError, guard_nonfinite, no_bad_step  # noqa: E402
from vlax.train.optimizer import OptimizerConfig, frozen_paths, make_optimizer, schedule  # noqa: E402
from vlax.train.resume import check_resumable  # noqa: E402
from vlax.train.sharding import make_mesh  # noqa: E402
from vlax.train.state import create_train_state_sharded, make_train_step  # noqa: E402
from vlax.train.stopping import StopPolicy  # noqa: E402
from vlax.weights.policy_checkpoint import detect_format, read_policy_params  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (path[:variant])")
flags.DEFINE_string("coordinator", None, "host:port of process 0 for multi-process runs")
flags.DEFINE_integer("num_processes", None, "number of processes in a multi-process run")
flags.DEFINE_integer("process_id", None, "this process's index in a multi-process run")


# ---- data ----------------------------------------------------------------------------------------------------------

def open_sources(entries: list[dict]) -> tuple[list[Any], list[float]]:
    """The configured data sources (generated first where a source kind generates) and their mixture weights."""
    sources = [open_source(e) for e in entries]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError(f"data sources share names {names}; give each a distinct data.sources[i].name")
    return sources, [float(e["weight"]) for e in entries]


def data_dims(cfg: ml_collections.ConfigDict, sources: list[Any]) -> tuple[int, int]:
    """The policy's (state_dim, action_dim): the data's, unless the config pads explicitly; mismatches are errors
    now, not after training."""
    dims = {"state": max(s.state_dim for s in sources), "action": max(s.action_dim for s in sources)}
    out = []
    for key in ("state", "action"):
        want, pad = int(cfg.model[f"{key}_dim"]), int(cfg.data.get(f"max_{key}_dim", 0) or 0)
        have = pad or dims[key]
        per_source = ", ".join(f"{s.name}: {getattr(s, f'{key}_dim')}" for s in sources)
        if pad and pad < dims[key]:
            raise ValueError(f"data.max_{key}_dim={pad} is below the data's {dims[key]} {key} dims ({per_source})")
        if want and want != have:
            raise ValueError(
                f"model.{key}_dim={want} but the data's {key} has {have} dims ({per_source}); set "
                f"--config.model.{key}_dim={have} (or 0 to take the data's), or pad the data explicitly with "
                f"--config.data.max_{key}_dim={want}")
        out.append(have)
    return out[0], out[1]


def data_config(cfg: ml_collections.ConfigDict, *, train: bool, split: str, state_dim: int,
                action_dim: int) -> vdata.DataConfig:
    if cfg.data.batch_size % jax.process_count():
        raise ValueError(f"batch_size {cfg.data.batch_size} is not divisible by {jax.process_count()} processes")
    return vdata.DataConfig(
        batch_size=cfg.data.batch_size // jax.process_count(), action_horizon=cfg.data.action_horizon,
        window=int(cfg.data.get("obs_history", 1)),
        image_size=cfg.data.image_size, image_resize=str(cfg.data.get("image_resize", "stretch")),
        normalization=cfg.data.normalization, augment=cfg.data.augment,
        shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.seed, train=train, split=split,
        val_fraction=float(cfg.data.get("val_fraction", 0.0)), max_action_dim=action_dim, max_state_dim=state_dim,
        drop_remainder=train)


def make_tokenizer(cfg: ml_collections.ConfigDict, sources: list[Any]) -> Tokenizer:
    """``model.tokenizer``: ``word`` (a vocabulary over the sources' instructions), ``byte``, or the path of a
    pretrained backbone's tokenizer file/directory."""
    kind = cfg.model.get("tokenizer", "word")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "word":
        texts = []
        for s in sources:
            if not hasattr(s, "instructions"):
                raise ValueError(f"source {s.name!r} cannot list its instructions for a word vocabulary; use "
                                 "--config.model.tokenizer=byte or a tokenizer file")
            texts.extend(s.instructions())
        return WordTokenizer.build(texts)
    return load_tokenizer(kind)


def build_data(cfg, sources, weights, tokenize, dims, expected, resume_step, workdir):
    """This host's training batches (tokenized inside tf.data) and the normalization artifacts."""
    config = data_config(cfg, train=True, split="train", state_dim=dims[0], action_dim=dims[1])
    try:
        data = vdata.build_pipeline(sources, config, weights=weights, process_index=jax.process_index(),
                                    process_count=jax.process_count(), expected_artifacts=expected,
                                    tokenize=tokenize)
    except vdata.NormalizationMismatchError as e:
        raise vdata.NormalizationMismatchError(
            f"{e} (recorded in checkpoint step {resume_step}, item {workdir}/checkpoints/{resume_step}/"
            "normalization). The data changed since that run: resume it on its own data, or train on the new data "
            "in a new workdir (with --config.finetune.checkpoint to start from its weights).") from None
    return data


def validation(cfg, sources, tokenize, dims) -> dict[str, Any]:
    """Per-source held-out batch factories (episodes chosen by ``data.val_fraction``), for open-loop metrics."""
    if not cfg.data.get("val_fraction", 0.0) or not cfg.data.get("val_every", 0):
        return {}
    if jax.process_count() > 1:
        logging.warning("open-loop validation runs in single-process runs only; skipped")
        return {}
    config = data_config(cfg, train=False, split="val", state_dim=dims[0], action_dim=dims[1])

    def batches(source):
        return lambda: iter(vdata.build_pipeline([source], config, process_index=0, process_count=1,
                                                 tokenize=tokenize))

    return {s.name: batches(s) for s in sources}


def load_finetune_params(cfg: ml_collections.ConfigDict, state, spec) -> Any:
    """Parameters from ``finetune.checkpoint`` moved into this model (re-initialising ``finetune.reinit``): a vlax
    workdir, or a published checkpoint (openpi, Octo, OpenVLA, LeRobot, RoboFlamingo; see
    :mod:`vlax.weights.policy_checkpoint`). Its normalization statistics are not used: the new data's are."""
    fmt = detect_format(cfg.finetune.checkpoint)
    if fmt == "vlax":
        ckpt, step = _finetune_checkpoint(cfg)
        try:
            old = ckpt.restore_raw(step)["params"]
        finally:
            ckpt.close()
        origin = f"{ckpt.directory} step {step}"
    else:
        importer = cfg.finetune.get("importer") or {}
        old = read_policy_params(cfg.finetune.checkpoint, cfg.model, spec,
                                 **(importer.to_dict() if hasattr(importer, "to_dict") else dict(importer)))
        origin = f"{cfg.finetune.checkpoint} ({fmt} checkpoint)"
    # Each array is placed on its sharding from the slices this host's devices hold.
    params, reinit, unused = transplant_sharded(nnx.to_pure_dict(state.params), old, cfg.finetune.reinit)
    print(f"fine-tuning from {origin}: re-initialised {len(reinit)} parameters "
          f"{reinit[:12]}{' ...' if len(reinit) > 12 else ''}; {len(unused)} checkpoint parameters unused")
    nnx.replace_by_pure_dict(state.params, params)
    return state


def _finetune_checkpoint(cfg: ml_collections.ConfigDict) -> tuple[Checkpointer, int]:
    """The vlax workdir of ``finetune.checkpoint`` opened, and its newest step."""
    ckpt = Checkpointer(checkpoints_dir(cfg.finetune.checkpoint))
    step = ckpt.latest_step
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no checkpoint under {cfg.finetune.checkpoint} to fine-tune from")
    return ckpt, step


def check_finetune_paths(cfg: ml_collections.ConfigDict, abstract_params: Any) -> None:
    """For a vlax workdir in ``finetune.checkpoint``: every parameter of the new model is in the checkpoint with its
    shape or matches ``finetune.reinit``, read from the checkpoint's metadata (published formats are checked when
    they are read)."""
    if detect_format(cfg.finetune.checkpoint) != "vlax":
        return
    ckpt, step = _finetune_checkpoint(cfg)
    try:
        saved = ckpt.array_shapes(step)["params"]
    finally:
        ckpt.close()
    check_transplant(nnx.to_pure_dict(abstract_params), saved, cfg.finetune.reinit)


def optimizer_config(cfg: ml_collections.ConfigDict) -> OptimizerConfig:
    o = cfg.optim
    return OptimizerConfig(learning_rate=o.learning_rate, warmup_steps=o.warmup_steps, total_steps=cfg.train.steps,
                           weight_decay=o.weight_decay, grad_clip_norm=o.grad_clip_norm or None,
                           accumulate_steps=o.accumulate_steps, freeze=o.freeze or None, groups=tuple(o.groups))


def make_loss_fn(cfg: ml_collections.ConfigDict):
    """The training loss of a batch; ``data.random_shift`` > 0 first translates every camera's images by up to that
    many pixels, on the device (:mod:`vlax.train.augment`)."""
    shift = int(cfg.data.get("random_shift", 0) or 0)
    if shift < 0:
        raise ValueError(f"data.random_shift={shift}; use 0 (off) or a number of pixels, e.g. 4")

    def loss_fn(model, batch: dict, rng: jax.Array):
        obs = batch["obs"]
        if shift:
            rng, key = jax.random.split(rng)
            obs = {**obs, "images": shift_cameras(obs["images"], key, shift)}
        return model.loss(obs, batch["actions"], action_mask=batch["action_mask"], rngs=rng, train=True)

    return loss_fn


def jit_guarded_step(pure_step, state_shardings, mesh):
    """The guarded step (see :mod:`vlax.train.nonfinite`), state donated, batch split over ``data`` x ``fsdp``."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    return jax.jit(guard_nonfinite(pure_step), donate_argnums=0,
                   in_shardings=(state_shardings, replicated, batch),
                   out_shardings=(state_shardings, replicated, replicated))


def check_batch_fits_mesh(batch_size: int, mesh) -> None:
    """The global batch is split over the mesh's data and fsdp axes: it must divide evenly, and each process
    must hold whole examples."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        fit = (batch_size // shards + 1) * shards
        raise ValueError(f"data.batch_size={batch_size} does not split over the {shards} batch shards of the mesh "
                         f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}, {mesh.devices.size} devices); "
                         f"use a multiple of {shards}, e.g. --config.data.batch_size={fit}, or change --config.mesh")
    if batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={batch_size} is not divisible by the {jax.process_count()} processes")


# ---- the run -------------------------------------------------------------------------------------------------------

def train(cfg: ml_collections.ConfigDict) -> dict:
    """Run (or resume) training; returns a summary (final loss, steps/s, parameter count, ...)."""
    # Everything that can be checked without reading data is checked first.
    check_components(cfg.model)
    loss_fn = make_loss_fn(cfg)
    entries = check_sources(cfg.data.sources)
    mesh = make_mesh(**cfg.mesh)
    check_batch_fits_mesh(cfg.data.batch_size, mesh)
    workdir = as_path(cfg.workdir)
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=cfg.train.keep)
    resume_step = ckpt.latest_step
    config_json = json.loads(cfg.to_json_best_effort())

    # What a checkpoint carries wins over what the config would build afresh.
    expected = saved_tokenizer = None
    if resume_step is not None:
        check_resumable(ckpt.read_json(resume_step, "config") or {}, config_json, workdir=str(workdir),
                        step=resume_step)
        expected = read_artifacts(ckpt.read_json(resume_step, "normalization"))
        saved_tokenizer = tokenizer_from_json(ckpt.read_json(resume_step, "tokenizer"))

    sources, weights = open_sources(entries)
    dims = data_dims(cfg, sources)
    tokenizer = saved_tokenizer or make_tokenizer(cfg, sources)
    cameras = tuple(dict.fromkeys(c for s in sources for c in s.image_keys))
    spec = policy_spec(cfg, cameras=cameras, state_dim=dims[0], action_dim=dims[1])
    prompt = get_prompt(cfg.model.get("prompt", "plain")).to_json()

    def tokenize(instructions, states, state_dims=None):  # runs inside tf.data, the same function inference calls
        return tokenize_prompts(tokenizer, prompt, instructions, spec.max_text_len, states, state_dims)

    data = build_data(cfg, sources, weights, tokenize, dims, expected, resume_step, workdir)
    pipeline = ObservationPipeline(spec, tokenizer, data.artifacts, prompt=prompt)
    val_sets = validation(cfg, sources, tokenize, dims)

    # Parameters are created in their shardings by one jit: no host ever holds the whole tree.
    def build():
        return build_policy(cfg.model, spec, tokenizer.vocab_size, nnx.Rngs(cfg.seed))

    opt_cfg = optimizer_config(cfg)
    abstract_params = nnx.state(nnx.eval_shape(build), nnx.Param)
    if resume_step is None and cfg.finetune.checkpoint:
        check_finetune_paths(cfg, abstract_params)  # a missing or misshapen parameter, before anything compiles
    tx = make_optimizer(opt_cfg, abstract_params)
    graphdef, state, shardings = create_train_state_sharded(build, tx, jax.random.key(cfg.seed), mesh=mesh,
                                                            use_ema=cfg.train.ema_decay > 0)
    num_params = count_params(state.params)
    if opt_cfg.freeze:
        print(f"frozen: {len(frozen_paths(nnx.to_pure_dict(state.params), opt_cfg))} parameter arrays")

    data_iter = DataIterator(data)  # names the damaged file if a TFRecord turns out corrupted mid-run
    start = 0
    if resume_step is not None:
        start, state, _ = ckpt.restore_latest(state)
        restore_iterator(cfg, data_iter, workdir, start)
        print(f"resumed from step {start}")
    elif cfg.finetune.checkpoint:
        state = load_finetune_params(cfg, state, spec)

    pure_step = make_train_step(graphdef, loss_fn, tx, ema_decay=cfg.train.ema_decay or None,
                                learning_rate_fn=schedule(opt_cfg))
    step_fn = jit_guarded_step(pure_step, shardings, mesh)
    recent = collections.deque(maxlen=max(cfg.train.log_every, 1) + 1)  # (step, datasets) of the recent batches

    def next_batch(step: int):
        host = next(data_iter)
        recent.append((step, collections.Counter(n.decode() for n in host["dataset_name"])))
        # Async transfer: the copy of batch s+1 overlaps step s on the devices (no host sync per step).
        return distributed.global_batch(pipeline.from_batch(host), mesh)

    batch = next_batch(start + 1)
    bad_step = jax.device_put(no_bad_step(), NamedSharding(mesh, PartitionSpec()))
    compiled = step_fn.lower(state, bad_step, batch).compile()
    flops_per_step = count_flops(pure_step, state, batch)  # matmul/conv FLOPs, scanned layers counted per layer
    peak = matmul_peak()
    print(f"{cfg.model.head} policy: {num_params / 1e6:.2f}M parameters, {flops_per_step / 1e9:.2f} GFLOP/step, "
          f"{memory_report(compiled, state)}")

    def check_finite() -> None:
        """One host sync: stop at the first non-finite step, naming it and its batch."""
        bad = int(jax.device_get(bad_step))
        if bad >= 0:
            datasets = dict(next((c for s, c in recent if s == bad), {}))
            raise NonFiniteLossError(
                f"loss or gradient is not finite at step {bad} (its batch: number {bad} of this run's data stream, "
                f"seed {cfg.seed}, samples per dataset {datasets or 'unknown'}); the state is kept as of step "
                f"{bad - 1} and nothing after it was saved; the newest checkpoint in {workdir}/checkpoints is "
                "intact. Lower the learning rate, check that data for NaN/inf, or resume from that checkpoint.")

    def save(step: int) -> None:
        check_finite()  # never save a non-finite state
        iterator = data_iter.save(workdir / "data_iterators" / f"step_{step}")  # written before the commit below
        ckpt.save(step, state, force=True, config=config_json, policy=pipeline.to_json(),
                  normalization={n: a.to_dict() for n, a in pipeline.artifacts.items()},
                  tokenizer=tokenizer.to_json(), data={"step": step, "iterator": iterator})
        _prune_iterators(workdir, ckpt, keep_also=step)

    writer = MetricWriter(workdir, tensorboard=cfg.train.tensorboard)
    progress = _progress(cfg, start)
    losses, t_last, steps_since = [], time.perf_counter(), 0
    step, saved_step = start, start
    try:
        with StopPolicy(max_minutes=cfg.train.max_minutes,
                        check_every=cfg.train.get("stop_check_every", 10)) as stop:
            while step < cfg.train.steps:
                state, bad_step, metrics = compiled(state, bad_step, batch)
                step += 1
                steps_since += 1
                if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                    metrics = jax.device_get(metrics)
                    check_finite()
                    rate = steps_since / (time.perf_counter() - t_last)
                    metrics.update(steps_per_s=rate, examples_per_s=rate * cfg.data.batch_size,
                                   flop_utilisation=flops_per_step * rate / (peak * jax.device_count()))
                    writer.write(step, metrics)
                    losses.append(float(metrics["loss"]))
                    _report(progress, step, metrics, rate)
                    t_last, steps_since = time.perf_counter(), 0
                if val_sets and step % cfg.data.val_every == 0:
                    writer.write(step, validate(graphdef, state, val_sets, pipeline, cfg))
                stopping = stop.should_stop(step)
                if step % cfg.train.save_every == 0 or stopping:
                    save(step)
                    saved_step = step
                if stopping:
                    print(f"stopping at step {step} ({stop.reason}); checkpoint saved", flush=True)
                    break
                if step < cfg.train.steps:
                    batch = next_batch(step + 1)
                if progress is not None:
                    progress.update(1)
            if step == cfg.train.steps and saved_step != step:
                save(step)
    finally:
        if progress is not None:
            progress.close()
        ckpt.wait()  # an exception must not leave an async save half-written behind
        ckpt.close()
    return {"final_step": step, "losses": losses, "num_params": num_params, "flops_per_step": flops_per_step}


def validate(graphdef, state, val_sets: dict, pipeline: ObservationPipeline, cfg) -> dict[str, float]:
    """Open-loop action MSE / L1 (dataset units) on the held-out episodes of each source, with the EMA weights
    when the run keeps them."""
    params = state.ema if state.ema is not None else state.params
    model = nnx.merge(graphdef, params, state.rest)
    out = {}
    for name, batches in val_sets.items():
        metrics = open_loop_metrics(model, batches(), cfg.data.val_batches, pipeline=pipeline.with_options(dataset=name))
        out.update({f"val/{name}/{k}": v for k, v in metrics.items() if k.startswith("action_")})
    print("  ".join(f"{k} {v:.4g}" for k, v in out.items()), flush=True)
    return out


def restore_iterator(cfg, data_iter: DataIterator, workdir, step: int) -> None:
    try:
        data_iter.restore(workdir / "data_iterators" / f"step_{step}")
    except FileNotFoundError as e:
        if not cfg.train.get("resume_without_data_state", False):
            raise FileNotFoundError(f"{e}. Resume anyway (the data order restarts) with "
                                    "--config.train.resume_without_data_state=True") from None
        logging.warning("resuming step %d without its data-iterator state: the data order restarts", step)


def _progress(cfg, start: int):
    if not cfg.train.get("progress", True) or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                mininterval=1.0)


def _report(progress, step: int, metrics: dict, rate: float) -> None:
    line = (f"step {step:6d}  loss {metrics['loss']:.4f}  grad_norm {metrics['grad_norm']:.3f}  "
            f"lr {metrics['learning_rate']:.2e}  {rate:.2f} steps/s  util {metrics['flop_utilisation']:.1%}")
    if progress is not None:
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", steps_s=f"{rate:.2f}", refresh=False)
        progress.write(line)
    else:
        print(line, flush=True)


def _prune_iterators(workdir, ckpt: Checkpointer, keep_also: int) -> None:
    """Drop data-iterator states whose checkpoint step was pruned."""
    keep = set(ckpt.all_steps()) | {keep_also}
    root = workdir / "data_iterators"
    if not root.exists():
        return
    for d in root.glob("step_*"):
        if int(d.name.split("_")[1]) not in keep:
            d.rmtree(missing_ok=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # progress goes to stdout; checkpoint libraries log every file at INFO
    layout = distributed.detect_layout(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if layout is not None:
        print(f"multi-process run: {layout.describe()}", flush=True)
    distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
    if layout is not None:
        print(f"joined as process {jax.process_index()} of {jax.process_count()} with "
              f"{jax.local_device_count()} local device(s)", flush=True)
    summary = train(_CONFIG.value)
    print(json.dumps({k: v for k, v in summary.items() if k != "losses"}))


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
