"""Integrations with HuggingFace transformers models."""

from .xlnet import patch_xlnet

__all__ = ["patch_xlnet"]
