"""pyobjectives: fast, verified kernels for XLNet's two-stream relative attention and ELECTRA's objective.

Public API::

    pyobjectives.two_stream_attention(q, k, v, r, r_w_bias, r_r_bias, ...)
    pyobjectives.rtd_loss(logits_or_hidden, corrupted_ids, original_ids, ...)
    pyobjectives.linear_cross_entropy(hidden, weight, targets, ...)
    pyobjectives.nn, pyobjectives.integrations, pyobjectives.data, pyobjectives.reference

``python -m pyobjectives info`` lists the backends and why any is unavailable.
"""

from . import data, integrations, nn, reference
from .backends import BackendUnavailableError
from .functional import linear_cross_entropy, rtd_loss, two_stream_attention

__version__ = "0.1.0"

__all__ = ["two_stream_attention", "rtd_loss", "linear_cross_entropy", "BackendUnavailableError", "nn",
           "integrations", "data", "reference", "__version__"]
