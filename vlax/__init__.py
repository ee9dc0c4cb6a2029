"""vlax: Vision-Language-Action robot policies in JAX/Flax."""

__version__ = "0.1.0"
