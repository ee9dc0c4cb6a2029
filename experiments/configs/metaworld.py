"""Meta-World policies trained from scratch on scripted-expert RLDS data.

    python -m experiments.train --config=experiments/configs/metaworld.py:tiny --config.model.head=flow

Variants: ``tiny`` (trains on a 2-core CPU: 64 px conv stem, 4-layer width-128 backbone) and ``small`` (one GPU:
ViT-B/16 at 224 px from scratch with a SmolLM2-135M-shaped backbone).
"""

from __future__ import annotations

import ml_collections


def metaworld_source(path: str, *, tasks: str, episodes_per_task: int, image_size: int,
                     camera: str = "corner2") -> ml_collections.ConfigDict:
    """A ``kind: metaworld`` entry of ``data.sources`` (see :mod:`vlax.data.source_config`)."""
    return ml_collections.ConfigDict({
        "kind": "metaworld", "path": path, "tasks": tasks, "episodes_per_task": episodes_per_task,
        "image_size": image_size, "cameras": {camera: camera}, "num_workers": 2, "weight": 1.0})


def _base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.workdir = "runs/metaworld"

    c.data = ml_collections.ConfigDict()
    # One source: the scripted-expert dataset, generated on first use under `path` and reused afterwards.
    c.data.sources = [metaworld_source("data_cache/metaworld", tasks="mt10", episodes_per_task=50, image_size=128)]
    c.data.image_size = 64                        # resized by the pipeline
    c.data.batch_size = 32
    c.data.action_horizon = 8                     # predicted per chunk; evaluation executes 4 then re-plans
    c.data.normalization = "bounds"
    c.data.augment = True                         # the input pipeline's crop + colour jitter (vlax.data)
    c.data.random_shift = 0                       # > 0: shift images by up to this many pixels, on the device
    c.data.shuffle_buffer = 2000
    c.data.val_fraction = 0.0                     # > 0 holds episodes out for open-loop validation
    c.data.val_every = 0                          # steps between validations (0: never)
    c.data.val_batches = 4

    c.model = ml_collections.ConfigDict()
    c.model.head = "chunk"
    c.model.head_kwargs = ml_collections.ConfigDict()
    # Head sizes matched to the width-128 backbone (the published defaults are sized for 2B-parameter VLAs), so an
    # ablation compares heads of similar cost; applied only to the chosen head.
    c.model.head_defaults = ml_collections.ConfigDict({
        "chunk": {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 512},
        "chunk_cvae": {"width": 128, "depth": 2, "num_heads": 4, "mlp_dim": 512, "encoder_depth": 2},
        "diffusion_unet": {"denoiser_kwargs": {"down_dims": (64, 128), "step_embed_dim": 64}},
    })
    c.model.encoder = "conv_stem"
    # Four stride-2 stages: a 64 px frame becomes 4 x 4 = 16 tokens, which keeps the backbone cheap on a CPU.
    c.model.encoder_kwargs = ml_collections.ConfigDict({"width": 128, "channels": (32, 64, 128, 128)})
    c.model.backbone = "tiny"
    c.model.backbone_overrides = ml_collections.ConfigDict(
        {"width": 128, "depth": 4, "mlp_dim": 384, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32})
    c.model.state_input = "prefix"                # prefix | discrete (π0.5 bins) | head | none
    c.model.state_bins = 256
    c.model.num_readouts = 0
    c.model.max_text_len = 16
    c.model.tokenizer = "word"                    # word | byte | a tokenizer.json / SentencePiece .model path
    c.model.prompt = "plain"                      # a template of vlax.prompts, or a string with {instruction}
    c.model.state_dim = 4
    c.model.action_dim = 4
    c.model.dtype = "float32"

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 3e-4
    c.optim.warmup_steps = 200
    c.optim.weight_decay = 1e-4
    c.optim.grad_clip_norm = 1.0
    c.optim.accumulate_steps = 1
    c.optim.freeze = ""
    c.optim.groups = ()

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})

    c.train = ml_collections.ConfigDict()
    c.train.steps = 3000
    c.train.log_every = 50
    c.train.save_every = 500
    c.train.keep = 2
    c.train.ema_decay = 0.0                       # > 0 keeps an EMA of the weights
    c.train.tensorboard = True
    c.train.max_minutes = 0.0                     # > 0: stop (and save) after this wall time
    c.train.stop_check_every = 10                 # multi-process: steps between agreed stop checks (signal/time)
    c.train.progress = True                       # progress bar on process 0
    c.train.resume_without_data_state = False     # True: resume a checkpoint lacking its data-iterator state

    # Published families as rows of the head ablation (model.preset); their settings are read only when chosen.
    from experiments.configs import act, diffusion_policy, roboflamingo

    c.model.preset = ""                           # "" is the generic VLA; act | diffusion_policy | ...
    c.model.act = act.preset_settings("tiny")
    c.model.diffusion_policy = diffusion_policy.preset_settings("tiny")
    c.model.roboflamingo = roboflamingo.preset_settings("metaworld")
    c.model.head_defaults.lstm = dict(hidden_dim=128, num_layers=2, dropout=0.0, tower_dims=(128,))
    from experiments.configs import helix, octo, openvla, rt2

    c.model.rt2 = rt2.preset_settings("tiny")
    c.model.helix = helix.preset_settings("tiny")
    c.model.octo = octo.preset_settings("tiny")
    c.model.openvla = openvla.preset_settings("metaworld")
    c.data.obs_history = 1                        # observation steps per example ([B, T, ...] when > 1)
    c.data.action_chunks = "oldest"               # with a history: the oldest step's chunk, or every_step's own

    c.finetune = ml_collections.ConfigDict()
    c.finetune.checkpoint = ""                    # a workdir or checkpoint dir to start from
    c.finetune.reinit = ""                        # regex of parameter paths initialised afresh
    # keyword arguments of a published checkpoint's importer, e.g. {"vision_backbone": <OFT+ FiLM file>} for
    # OpenVLA, {"sizes": {...}, "tokenizer": <dir>} for a LeRobot π0, {"step": N} for Octo (set in a config file)
    c.finetune.importer = ml_collections.ConfigDict()
    return c


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    c = _base()
    if variant == "tiny":
        pass
    elif variant == "small":
        c.data.image_size = 224
        c.data.sources[0].image_size = 224
        c.data.batch_size = 128
        c.model.encoder = "siglip_b16_224"
        c.model.encoder_kwargs = ml_collections.ConfigDict()
        c.model.backbone = "smollm2_135m"
        c.model.backbone_overrides = ml_collections.ConfigDict({"remat": "dots"})
        c.model.head_defaults = ml_collections.ConfigDict()  # the published head sizes
        c.model.dtype = "bfloat16"
        c.train.steps = 20000
    else:
        raise ValueError(f"unknown variant {variant!r}; known: 'tiny', 'small'")
    return c
