"""kdjax: knowledge distillation and data augmentation research in JAX/Flax."""
__version__ = "0.1.0"
