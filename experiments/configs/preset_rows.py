"""Published families as rows of the Meta-World head ablation (``experiments/ablate_heads.py --heads``): each row's
config overrides of ``experiments/configs/metaworld.py``. Kept apart from the ablation script, which defines
command-line flags on import."""

# Rows that are published families rather than heads on the generic VLA: the preset with its own head, at the
# tiny sizes of its config, on the same data and budget. Diffusion Policy and RoboFlamingo see one observation step
# here, to keep every row's cost per example equal; add data.obs_history=2 (Diffusion Policy's n_obs_steps) or 12
# (RoboFlamingo's window) to a row for their published histories, which the evaluator keeps step by step. Octo keeps
# its window of 2: its readouts are trained per window step on their own chunks, which is what Octo is.
PRESET_ROWS = {
    "act": ("model.preset=act", "model.head=act", "model.state_input=head", "data.normalization=normal"),
    "diffusion_policy": ("model.preset=diffusion_policy", "model.head=diffusion_unet", "model.state_input=head",
                         "data.normalization=min_max"),
    # RoboFlamingo at a 128-wide size, its LSTM head predicting the chunk from one frame (see above)
    "roboflamingo": ("model.preset=roboflamingo", "model.head=lstm", "model.state_input=none",
                     "data.normalization=bounds"),
    # RT-2-style: PaliGemma-shaped ViT + LM writing the actions as tokens of its vocabulary
    "rt2": ("model.preset=rt2", "model.head=binned_lm", "model.state_input=none"),
    # Helix-style: the S2 VLM plans every model.helix.plan_every steps, the fast S1 acts with its latest latent
    "helix": ("model.preset=helix", "model.head=chunk", "model.state_input=head"),
    # Octo: window 2, block-causal readouts, the MLP-ResNet diffusion head; Meta-World's state as its proprio tokens
    "octo": ("model.preset=octo", "model.head=diffusion", "model.state_input=none", "model.octo.proprio=True",
             "data.obs_history=2", "data.action_chunks=every_step", "data.normalization=normal"),
    # OpenVLA: DINOv2 + SigLIP fused patches, the GELU MLP projector, Llama writing 256-bin action tokens; the tiny
    # towers on a 4 x 4 grid of 14 px patches, hence 56 px
    "openvla": ("model.preset=openvla", "model.head=binned_lm", "model.state_input=none", "model.prompt=openvla",
                "data.image_size=56"),
}
