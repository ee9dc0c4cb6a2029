"""Shared pieces of the training-loop tests: a tiny config over a tiny generated dataset."""

from pathlib import Path

import ml_collections

from experiments.configs import finetune
from experiments.configs.metaworld import get_config


def tiny_config(workdir: Path, data_dir: Path, **train):
    c = get_config("tiny")
    c.workdir = str(workdir)
    source = c.data.sources[0]
    source.path, source.tasks, source.episodes_per_task, source.image_size = str(data_dir), "reach,push", 2, 64
    c.data.image_size = 32
    c.data.batch_size = 8
    c.data.shuffle_buffer = 64
    c.model.encoder_kwargs = {"width": 32, "channels": (16, 32)}
    c.model.backbone_overrides = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 2, "num_kv_heads": 1,
                                  "head_dim": 16}
    for head in ("chunk", "chunk_cvae"):
        c.model.head_defaults[head].update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.model.head_defaults.diffusion_unet.denoiser_kwargs.update(down_dims=(16, 32), step_embed_dim=16)
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 2
    c.train.log_every = 1
    c.train.tensorboard = False
    c.train.progress = False
    for k, v in train.items():
        setattr(c.train, k, v)
    return c


def config_flags(c) -> list[str]:
    """The same config as command-line overrides of the tiny variant."""
    flat = {
        "workdir": c.workdir, "data.sources[0].path": c.data.sources[0].path,
        "data.sources[0].tasks": c.data.sources[0].tasks,
        "data.sources[0].episodes_per_task": c.data.sources[0].episodes_per_task,
        "data.sources[0].image_size": c.data.sources[0].image_size,
        "data.image_size": c.data.image_size, "data.batch_size": c.data.batch_size,
        "data.shuffle_buffer": c.data.shuffle_buffer, "model.encoder_kwargs.width": 32,
        "model.encoder_kwargs.channels": "(16,32)", "model.backbone_overrides.width": 32,
        "model.backbone_overrides.depth": 2, "model.backbone_overrides.mlp_dim": 64,
        "model.backbone_overrides.num_heads": 2, "model.backbone_overrides.num_kv_heads": 1,
        "model.backbone_overrides.head_dim": 16, **{
            f"model.head_defaults.{h}.{k}": v for h in ("chunk", "chunk_cvae")
            for k, v in dict(width=32, depth=1, num_heads=2, mlp_dim=64).items()}, "optim.learning_rate": c.optim.learning_rate,
        "optim.warmup_steps": c.optim.warmup_steps, "train.log_every": 1, "train.tensorboard": False,
        "train.progress": False,
        "train.steps": c.train.steps, "train.save_every": c.train.save_every,
    }
    return ["--config=experiments/configs/metaworld.py:tiny"] + [f"--config.{k}={v}" for k, v in flat.items()]


def tiny_finetune_config(workdir: Path, source: dict, steps: int = 3) -> ml_collections.ConfigDict:
    """finetune.py:tiny with the tiny model, optimizer and train settings of the loop tests."""
    small = tiny_config(workdir, workdir / "unused")  # only its sizes are taken
    c = finetune.get_config("tiny")
    c.workdir = str(workdir)
    c.data.sources = [ml_collections.ConfigDict({**c.data.sources[0].to_dict(), **source})]
    c.data.image_size, c.data.batch_size, c.data.shuffle_buffer = 32, 8, 16  # 8: one example per device
    c.data.action_horizon = 4
    for key in ("encoder_kwargs", "backbone_overrides", "head_defaults"):
        c.model[key] = small.model[key]
    c.optim = small.optim
    c.train = small.train
    c.train.steps, c.train.save_every = steps, steps
    return c


def apply_preset_row(c: ml_collections.ConfigDict, row: str) -> ml_collections.ConfigDict:
    """``c`` with the ablation's preset row applied, its values read as the command line reads them."""
    import ast

    from experiments.configs.preset_rows import PRESET_ROWS

    for setting in PRESET_ROWS[row]:
        key, value = setting.split("=", 1)
        *parents, leaf = key.split(".")
        node = c
        for p in parents:
            node = node[p]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            node[leaf] = value  # a plain string
    return c


def preset_row_config(row: str, workdir: Path, data: Path):
    """The tiny Meta-World config of the loop tests with the ablation's preset row applied, 2 training steps."""
    return apply_preset_row(tiny_config(workdir, data, steps=2, save_every=2), row)
