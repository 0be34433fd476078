"""Integrations with HuggingFace transformers models."""

from .t5 import patch_t5
from .xlnet import patch_xlnet

__all__ = ["patch_t5", "patch_xlnet"]
