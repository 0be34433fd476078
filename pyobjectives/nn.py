"""``torch.nn`` modules over the functional API."""

from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _checks as check
from . import functional as F
from . import reference
from .backends import BACKEND_NAMES


def _check_options(backend: str, empty_rows: str) -> None:
    check.choice("backend", backend, BACKEND_NAMES)
    check.choice("empty_rows", empty_rows, F.EMPTY_ROWS)


class RTDLoss(nn.Module):
    """ELECTRA replaced-token-detection loss; see :func:`pyobjectives.rtd_loss`."""

    def __init__(self, loss_weight: float = 1.0, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.loss_weight, self.reduction, self.backend = loss_weight, reduction, backend

    def forward(self, logits_or_hidden, corrupted_ids, original_ids, attention_mask=None, head_weight=None,
                head_bias=None, return_stats=False):
        return F.rtd_loss(logits_or_hidden, corrupted_ids, original_ids, attention_mask, loss_weight=self.loss_weight,
                          reduction=self.reduction, head_weight=head_weight, head_bias=head_bias,
                          return_stats=return_stats, backend=self.backend)


class LinearCrossEntropy(nn.Module):
    """Fused ``hidden @ weight.T + bias`` + cross-entropy (+ Gumbel-max sampling); see
    :func:`pyobjectives.linear_cross_entropy`. The weight is an argument, not a parameter,
    because it is usually the tied embedding matrix."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend

    def forward(self, hidden, weight, targets, bias=None, sample=False, temperature=1.0, seed=None, disallow=None):
        return F.linear_cross_entropy(hidden, weight, targets, bias, ignore_index=self.ignore_index,
                                      reduction=self.reduction, sample=sample, temperature=temperature, seed=seed,
                                      disallow=disallow, backend=self.backend)


_mapping_cache: tuple = (None, -1, None)


def target_positions(target_mapping: torch.Tensor) -> torch.Tensor | None:
    """``target_pos [B, P]`` from HF's time-major ``target_mapping [P, Lq, B]``, or None when it is not
    a partial permutation (each row one-hot or empty, each position used at most once).

    Every layer of a model receives the same mapping tensor, so the result (one
    host synchronisation) is remembered for that tensor until it is modified.
    """
    global _mapping_cache
    ref, version, result = _mapping_cache
    if ref is not None and ref() is target_mapping and version == target_mapping._version:
        return result
    tm = target_mapping.permute(2, 0, 1)
    row_sum, col_sum = tm.sum(-1), tm.sum(-2)
    checks = torch.stack([((tm == 0) | (tm == 1)).all(), (row_sum <= 1).all(), (col_sum <= 1).all()])
    result = None
    if bool(checks.all()):
        result = torch.where(row_sum > 0, tm.argmax(-1), torch.full_like(row_sum, -1, dtype=torch.long))
    _mapping_cache = (weakref.ref(target_mapping), target_mapping._version, result)
    return result


def _dense_mask(hf_mask: torch.Tensor, batch: int) -> torch.Tensor:
    """HF's float mask ``[Lq, Lk, B or 1, 1]`` (> 0 = masked) as bool ``[B, Lq, Lk]``."""
    if hf_mask.dim() != 4 or hf_mask.shape[3] != 1:
        raise ValueError(f"attention masks must have HF's shape [qlen, klen, batch, 1], got {tuple(hf_mask.shape)}")
    return (hf_mask[..., 0] > 0).permute(2, 0, 1).expand(batch, -1, -1)


class TwoStreamRelativeAttention(nn.Module):
    """XLNet's two-stream relative attention layer computed through :func:`pyobjectives.two_stream_attention`.

    Parameter names and shapes are those of HF's ``XLNetRelativeAttention``
    (``q, k, v, o, r [d_model, n_head, d_head]``, ``r_w_bias, r_r_bias, r_s_bias
    [n_head, d_head]``, ``seg_embed [2, n_head, d_head]``, ``layer_norm``), so
    state dicts load either way, and ``forward`` takes HF's time-major arguments:
    ``h [Lq, B, d_model]``, ``g [P, B, d_model]``, float masks ``[Lq, Lk, B, 1]``
    (> 0 = masked), ``r [R, B, d_model]``, one-hot ``seg_mat [Lq, Lk, B, 2]``,
    ``mems [M, B, d_model]``, ``target_mapping [P, Lq, B]``.

    Masks are assumed to come from ``XLNetModel`` (``attn_mask_h`` is
    ``attn_mask_g`` with the diagonal unmasked), which lets both streams run in
    one call. A one-hot ``target_mapping`` becomes ``target_pos`` (the query
    stream then costs P rows, not Lq); any other mapping is applied as HF does,
    by scattering to all Lq rows. Telling the two apart reads the mapping's
    values, so while being traced (``torch.compile``, ``torch.export``) or
    captured in a CUDA graph, where values cannot be read, every mapping takes
    HF's scattering path: the same result (a one-hot scatter and gather copy
    rows exactly), the query stream then costing Lq rows instead of P.
    ``output_attentions=True`` runs the reference.
    ``empty_rows="uniform"`` (default) reproduces HF on fully masked rows, gradient
    included. One HF artefact is not reproduced: with ``attn_type="uni"`` HF's
    ``rel_shift`` reads a neighbouring row's position scores for masked pairs;
    they change no output, but on a row whose keys are *all* masked they reach
    HF's gradient. Here those pairs use 0, as the spec defines.
    """

    def __init__(self, d_model: int, n_head: int, d_head: int | None = None, *, layer_norm_eps: float = 1e-12,
                 dropout: float = 0.1, backend: str = "auto", empty_rows: str = "uniform"):
        super().__init__()
        _check_options(backend, empty_rows)
        if d_head is None:
            if d_model % n_head:
                raise ValueError(f"d_model ({d_model}) must be a multiple of n_head ({n_head}) when d_head is not given")
            d_head = d_model // n_head
        self.n_head, self.d_head, self.d_model = n_head, d_head, d_model
        self.scale = 1 / d_head**0.5
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, nn.Parameter(torch.empty(d_model, n_head, d_head)))
        for name in ("r_r_bias", "r_s_bias", "r_w_bias"):
            setattr(self, name, nn.Parameter(torch.empty(n_head, d_head)))
        self.seg_embed = nn.Parameter(torch.empty(2, n_head, d_head))
        self.layer_norm = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)
        self.backend, self.empty_rows = backend, empty_rows
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02):
        """HF XLNet's initialisation: normal(0, initializer_range) for projections and biases."""
        for p in (self.q, self.k, self.v, self.o, self.r, self.r_r_bias, self.r_s_bias, self.r_w_bias, self.seg_embed):
            nn.init.normal_(p, std=std)
        self.layer_norm.reset_parameters()

    @classmethod
    def from_hf(cls, module: nn.Module, backend: str = "auto", empty_rows: str = "uniform"):
        """Wrap an HF ``XLNetRelativeAttention``, sharing (not copying) its parameters and submodules."""
        _check_options(backend, empty_rows)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.n_head, new.d_head, new.d_model, new.scale = module.n_head, module.d_head, module.d_model, module.scale
        for name in ("q", "k", "v", "o", "r", "r_r_bias", "r_s_bias", "r_w_bias", "seg_embed"):
            setattr(new, name, getattr(module, name))
        new.layer_norm, new.dropout = module.layer_norm, module.dropout
        new.backend, new.empty_rows = backend, empty_rows
        return new

    def _project(self, x, weight):
        return torch.einsum("ibh,hnd->ibnd", x, weight)

    def post_attention(self, h, attn_vec, residual=True):
        out = self.dropout(torch.einsum("ibnd,hnd->ibh", attn_vec, self.o))
        return self.layer_norm(out + h if residual else out)

    def forward(self, h, g, attn_mask_h, attn_mask_g, r, seg_mat, mems=None, target_mapping=None,
                output_attentions=False):
        B = h.shape[1]
        cat = torch.cat([mems, h], dim=0) if mems is not None and mems.dim() > 1 else h
        k_head = self._project(cat, self.k).transpose(0, 1)
        v_head = self._project(cat, self.v).transpose(0, 1)
        q_head = self._project(h, self.q).transpose(0, 1)
        r = r.type(self.r.dtype)
        if r.shape[1] == 1 or r.stride(1) == 0:
            # XLNetModel broadcasts one position table over the batch: project it once.
            r_head = torch.einsum("ih,hnd->ind", r[:, 0], self.r)
        else:
            r_head = self._project(r, self.r).transpose(0, 1)

        mask_src = attn_mask_g if g is not None and attn_mask_g is not None else attn_mask_h
        kwargs = dict(attn_mask=None if mask_src is None else _dense_mask(mask_src, B), scale=self.scale,
                      empty_rows=self.empty_rows)
        if seg_mat is not None:
            kwargs.update(seg_diff=(seg_mat[..., 1] > 0).permute(2, 0, 1), r_s_bias=self.r_s_bias,
                          seg_embed=self.seg_embed)

        scattered = False
        if g is not None:
            q_g = self._project(g, self.q)
            target_pos = None
            if target_mapping is not None and not output_attentions and check.values_checkable(target_mapping):
                target_pos = target_positions(target_mapping)
            if target_mapping is not None and target_pos is None:
                q_g = torch.einsum("mbnd,mlb->lbnd", q_g, target_mapping)
                scattered = True
            if target_pos is None:
                target_pos = torch.arange(q_g.shape[0], device=h.device).expand(B, -1)
            kwargs.update(q_g=q_g.transpose(0, 1), target_pos=target_pos)

        args = (q_head, k_head, v_head, r_head, self.r_w_bias, self.r_r_bias)
        dropout_p = self.dropout.p if self.training else 0.0
        if output_attentions:
            out_h, out_g, probs_h, probs_g = reference.two_stream_attention(
                *args, **kwargs, dropout_p=dropout_p, seed=reference.draw_seed(), return_probs=True)
        else:
            out_h, out_g = F.two_stream_attention(*args, **kwargs, dropout_p=dropout_p, backend=self.backend)

        output_h = self.post_attention(h, out_h.transpose(0, 1))
        output_g = None
        if g is not None:
            attn_vec_g = out_g.transpose(0, 1)
            if scattered:
                attn_vec_g = torch.einsum("lbnd,mlb->mbnd", attn_vec_g, target_mapping)
            output_g = self.post_attention(g, attn_vec_g)
        if not output_attentions:
            return output_h, output_g
        to_hf = lambda p: torch.einsum("bnij->ijbn", p)  # noqa: E731
        probs = (to_hf(probs_h), to_hf(probs_g)) if g is not None else to_hf(probs_h)
        return output_h, output_g, probs

from .electra import ElectraObjective  # noqa: E402,F401
