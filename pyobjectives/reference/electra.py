"""Pure-PyTorch ELECTRA objective pieces: RTD loss and generator linear + cross-entropy with sampling.

These materialize what the fused kernels avoid (the ``[N, V]`` logits); they
define the exact results. Arguments are validated by the public functions in
:mod:`pyobjectives.ops`; call those unless the inputs are known to be well formed.
"""

from __future__ import annotations

import torch

from .philox import philox_uniform


def _reduce(per_item: torch.Tensor, weight: torch.Tensor, reduction: str) -> torch.Tensor:
    """Weighted mean / sum / none; the mean of nothing is 0.0, with no host synchronisation.

    Items of weight 0 (padding, ignored rows) contribute exactly 0, even when they are NaN: they are
    not part of the loss (HF drops them before the loss).
    """
    weighted = torch.where(weight != 0, per_item * weight, torch.zeros_like(per_item))
    if reduction == "none":
        return weighted
    total = weighted.sum()
    if reduction == "sum":
        return total
    return total / weight.sum().clamp(min=1)


def rtd_loss(logits_or_hidden, corrupted_ids, original_ids, attention_mask=None, *, loss_weight=1.0,
             reduction="mean", head_weight=None, head_bias=None, return_stats=False, upcast=False):
    """Replaced-token-detection loss; arguments as :func:`pyobjectives.rtd_loss`.

    ``upcast=True`` computes in float32 for half / bfloat16 inputs.
    """
    x = logits_or_hidden
    if upcast and x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
        head_weight = None if head_weight is None else head_weight.float()
        head_bias = None if head_bias is None else head_bias.float()
    if head_weight is not None:
        logits = x @ head_weight.to(x.dtype)
        if head_bias is not None:
            logits = logits + head_bias.to(x.dtype)
    else:
        logits = x
    replaced = corrupted_ids != original_ids
    label = replaced.to(logits.dtype)
    per_token = torch.nn.functional.softplus(logits) - label * logits
    real = (torch.ones_like(replaced) if attention_mask is None else attention_mask != 0).to(logits.dtype)
    loss = loss_weight * _reduce(per_token, real, reduction)
    if not return_stats:
        return loss
    return loss, rtd_stats(logits, replaced, real)


def rtd_stats(logits: torch.Tensor, replaced: torch.Tensor, real: torch.Tensor) -> dict:
    """ELECTRA's logged discriminator metrics over real tokens, as 0-dim float32 tensors.

    ``accuracy``: (logit > 0) == replaced; ``precision`` / ``recall`` of the
    "replaced" class (0.0 when their denominator is 0); ``replaced``: number of
    replaced real tokens; ``tokens``: number of real tokens.
    """
    real = real.detach() > 0
    predicted = logits.detach() > 0
    tp = (predicted & replaced & real).sum().float()
    n_real = real.sum().float()
    n_pred = (predicted & real).sum().float()
    n_replaced = (replaced & real).sum().float()
    return {
        "accuracy": ((predicted == replaced) & real).sum().float() / n_real.clamp(min=1),
        "precision": tp / n_pred.clamp(min=1),
        "recall": tp / n_replaced.clamp(min=1),
        "replaced": n_replaced,
        "tokens": n_real,
    }


def gumbel_noise(seed: int, rows: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 Gumbel noise ``-log(-log(u))`` at ``[len(rows), V]``, u keyed on offset ``row * V + v``."""
    offsets = rows.to(torch.int64)[:, None] * vocab_size + torch.arange(vocab_size, device=rows.device)
    return -torch.log(-torch.log(philox_uniform(seed, offsets)))


def linear_cross_entropy(hidden, weight, targets, bias=None, *, ignore_index=-100, reduction="mean", sample=False,
                         temperature=1.0, seed=None, disallow=None, upcast=False):
    """Cross-entropy of ``hidden @ weight.T + bias``, and optionally Gumbel-max samples from it.

    Arguments as :func:`pyobjectives.linear_cross_entropy`. Sampling always runs in
    float32 (``z.float() / temperature + g``) so that every backend draws the same
    ids; it carries no gradient. ``upcast=True`` computes the loss in float32 for
    half / bfloat16 inputs.
    """
    if upcast and hidden.dtype in (torch.float16, torch.bfloat16):
        hidden, weight = hidden.float(), weight.float()
        bias = None if bias is None else bias.float()
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    # an unchecked out-of-range target (no value checks on accelerators) is ignored, as on every backend
    keep = (targets != ignore_index) & (targets >= 0) & (targets < logits.shape[1])
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()
    target_logit = torch.gather(logits, 1, safe_targets[:, None])[:, 0]
    per_row = torch.where(keep, torch.logsumexp(logits, dim=1) - target_logit, torch.zeros_like(target_logit))
    loss = _reduce(per_row, keep.to(per_row.dtype), reduction)
    if not sample:
        return loss
    N, V = logits.shape
    scores = logits.detach().float() / temperature + gumbel_noise(seed, torch.arange(N, device=logits.device), V)
    if disallow is not None:
        banned = (torch.arange(V, device=logits.device)[None, :] == disallow[:, None].long())
        scores = scores.masked_fill(banned, float("-inf"))
    return loss, scores.argmax(dim=1)
