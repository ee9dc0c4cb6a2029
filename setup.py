"""vlax: Vision-Language-Action policies in JAX/Flax."""

from setuptools import find_packages, setup

# Ranges that were tested together; constraints.txt pins the exact set CI installs.
INSTALL_REQUIRES = [
    "jax>=0.10,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "einops>=0.8,<0.9",
    "absl-py>=2.1",
    "ml-collections>=1.0",
    "numpy>=1.26",
    "safetensors>=0.4",
    "tensorflow-cpu>=2.18,<2.22",
    "tensorflow-datasets>=4.9.9,<4.10",
    # tensorflow-datasets imports it without declaring it.
    "importlib_resources",
    "tqdm",
    "tokenizers>=0.20",
    # SentencePiece tokenizers (PaliGemma / Gemma families), the same library openpi tokenizes with.
    "sentencepiece>=0.2",
    # The policy server: openpi's websocket protocol (msgpack frames).
    "websockets>=13",
    "msgpack>=1.0",
    "tensorboard>=2.18",
    "pyarrow>=15",
    # LeRobot v3 video decoding (bundles FFmpeg with AV1 / H.264) and image encoding of generated datasets.
    "av>=14,<19",
    "pillow>=10",
]

EXTRAS = {
    # torch==2.13.0 exactly: the CPU wheel. A looser spec pulls a multi-GB CUDA build.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "transformers>=5.0,<6", "diffusers>=0.35,<0.43"],
    "sim": ["metaworld==3.1.1", "mujoco==3.3.0", "packaging", "imageio", "matplotlib"],
}

setup(
    name="vlax",
    version="0.1.0",
    description="Vision-Language-Action robot policies in JAX/Flax: encoders, backbones, action heads, training.",
    packages=find_packages(include=["vlax", "vlax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
