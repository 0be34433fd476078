"""Exact pure-PyTorch references: the contract every fused backend is tested against."""

from .attention import t5_relative_bucket, two_stream_attention
from .electra import gumbel_noise, linear_cross_entropy, rtd_loss, rtd_stats
from .philox import draw_seed, philox_uniform

__all__ = ["two_stream_attention", "t5_relative_bucket", "rtd_loss", "rtd_stats", "linear_cross_entropy",
           "gumbel_noise", "philox_uniform", "draw_seed"]
